"""Tokenization speed and memory: this pipeline vs the seed's turn-by-turn recipe vs raw HF batch encode.

    python bench/tokenize_speed.py                       # 20,000 conversations, workers 1 and 2, RSS at 1x and 10x
    python bench/tokenize_speed.py --n 2000 --no-rss     # quick look

All three paths run in this one process on the same generated multi-turn code conversations:
  (a) qwen-sft: read → render with the chat template → tokenize → labels → write (tokenize_chatml_file);
  (b) the seed's style: one tokenizer call per turn, labels by role, one process, json in and out;
  (c) HF fast tokenizer batch encode of the already rendered texts (no reading, labels or writing).
Peak RSS is measured in a fresh subprocess per input size, so each number is that run's own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script (bench/ first on sys.path): the repository root, uninstalled

WORDS = ("parse", "load", "config", "user", "token", "cache", "result", "items", "path", "value", "index", "batch",
         "model", "record", "buffer", "stream", "retry", "limit", "offset", "count")
ASKS = ("Write a Python function that {v}s the {n}.", "Why does my `{f}` fail on empty input?",
        "Refactor this to be faster:\n```python\n{code}```", "Add type hints and a docstring to `{f}`.",
        "이 함수가 무엇을 하는지 설명해 주세요: `{f}`", "Can you write a test for `{f}`?")


def _code(rng: random.Random) -> str:
    f = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}"
    a, b = rng.sample(WORDS, 2)
    body = [f"def {f}({a}, {b}=None):", f"    \"\"\"Return the {a} for {b}.\"\"\"", f"    if not {a}:",
            "        return []", f"    out = [x for x in {a} if x != {b}]"]
    for _ in range(rng.randint(0, 4)):
        body.append(f"    out.append(len({rng.choice(WORDS)}) + {rng.randint(0, 999)})")
    return "\n".join(body + ["    return out", ""])


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "You are a careful senior Python engineer."})
    for _ in range(rng.randint(1, 3)):
        code = _code(rng)
        ask = rng.choice(ASKS).format(v=rng.choice(WORDS), n=rng.choice(WORDS), f=code.split("(")[0][4:], code=code)
        lead = "\n" if rng.random() < 0.2 else ""  # content starting with a newline: the boundary the seed gets wrong
        answer = f"{lead}Here is a version:\n\n```python\n{code}```\n\nIt returns early on empty input."
        messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")


def seed_style(src: Path, dst: Path, tok) -> tuple[int, list[list[int]]]:
    """(b) The seed recipe's way: a default system prompt, fixed header/end ids, one tokenizer call per turn.

    Headers are tokenized apart from the content, so a content that starts with a newline gets other ids
    than the template gives; user turns' end tokens are trained on. Returns (tokens, ids of the first 2000).
    """
    from qwen_sft.samples import IGNORE_INDEX, INPUT_IDS, LABEL

    cache: dict[str, list[int]] = {}

    def fixed(text: str) -> list[int]:
        if text not in cache:
            cache[text] = tok(text, add_special_tokens=False).input_ids
        return cache[text]

    tokens, first = 0, []
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            messages = json.loads(line)["messages"]
            if messages[0]["role"] != "system":
                messages = [{"role": "system", "content": "You are a helpful assistant."}, *messages]
            ids, labels = [], []
            for m in messages:
                head, body, end = fixed(f"<|im_start|>{m['role']}\n"), tok(m["content"]).input_ids, fixed("<|im_end|>\n")
                ids += head + body + end
                if m["role"] == "assistant":
                    labels += [IGNORE_INDEX] * len(head) + body + end
                else:
                    labels += [IGNORE_INDEX] * (len(head) + len(body)) + (end if m["role"] == "user" else [IGNORE_INDEX] * len(end))
            tokens += len(ids)
            if len(first) < 2000:
                first.append(ids)
            fout.write(json.dumps({INPUT_IDS: ids, LABEL: labels}) + "\n")
    return tokens, first


def rss_child(src: Path, workers: int) -> None:
    """Run the pipeline once; print the peak RSS (MiB) of this process and of its whole tree (workers included).

    VmHWM is read from /proc because ru_maxrss survives fork + exec (it would report the bench's own
    peak); the tree peak is the sum of RSS over this process and its workers, sampled every 20 ms
    (shared copy-on-write pages are counted in each process, so it overstates, never understates).
    """
    import threading

    import psutil

    from qwen_sft.tokenize.pipeline import tokenize_chatml_file

    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak[0] = max(peak[0], total)
            done.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    tokenize_chatml_file(src, src.with_name(src.name + ".rss.arrow"), model="offline", workers=workers, progress=False)
    done.set()
    thread.join()
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"{hwm / 1024:.1f} {peak[0] / 2**20:.1f}")


def rss_run(src: Path, workers: int) -> tuple[float, float]:
    """(peak RSS of the pipeline process, peak RSS summed over it and its workers), MiB, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(src), str(workers)], capture_output=True,
                         text=True, check=True, cwd=REPO)
    own, tree = map(float, out.stdout.split()[-2:])
    return own, tree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="conversations (default 20,000)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs per path; the best counts (default 3)")
    p.add_argument("--no-rss", action="store_true", help="skip the 1x / 10x peak-RSS runs")
    p.add_argument("--rss-child", nargs=2, metavar=("SRC", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        rss_child(Path(args.rss_child[0]), int(args.rss_child[1]))
        return 0
    from qwen_sft.samples.files import iter_samples
    from qwen_sft.tokenize.pipeline import tokenize_chatml_file
    from qwen_sft.tokenizer import load_tokenizer

    tok = load_tokenizer("offline")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "chatml.jsonl"
        generate(src, args.n)
        # Start-up (encoder layout from the vocabulary, probes) is paid once per process: timed apart.
        generate(Path(tmp) / "tiny.jsonl", 10)
        t = time.perf_counter()
        tokenize_chatml_file(Path(tmp) / "tiny.jsonl", Path(tmp) / "tiny.out.jsonl", model="offline", progress=False)
        startup = time.perf_counter() - t
        # The machine is shared: each path runs --repeat times, interleaved, and the best time counts.
        results: dict[str, float] = {}
        stats = {}
        for _ in range(args.repeat):
            for workers in (1, 2):
                t = time.perf_counter()
                stats[workers] = tokenize_chatml_file(src, Path(tmp) / f"a{workers}.jsonl", model="offline",
                                                      max_len=1 << 20, workers=workers, progress=False)
                key = f"a_workers{workers}"
                results[key] = min(results.get(key, float("inf")), time.perf_counter() - t)
            t = time.perf_counter()
            b_tokens, b_first = seed_style(src, Path(tmp) / "b.jsonl", tok)
            results["b"] = min(results.get("b", float("inf")), time.perf_counter() - t)
        tokens = stats[1]["tokens"]
        same = (Path(tmp) / "a1.jsonl").read_bytes() == (Path(tmp) / "a2.jsonl").read_bytes()
        records = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines()]
        texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in records]
        # HF batch encoding is multi-threaded in Rust; the pipeline module turns that off for its forked workers.
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        t = time.perf_counter()
        c_tokens = sum(len(x) for x in tok(texts, add_special_tokens=False).input_ids)
        results["c"] = time.perf_counter() - t
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        ours = [ids for ids, _ in iter_samples(Path(tmp) / "a1.jsonl")]
        sys_ids = tok("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n").input_ids
        # beyond the injected system prompt, the seed's ids differ wherever a content starts with a newline
        differ = sum(a != (b[len(sys_ids):] if b[: len(sys_ids)] == sys_ids else b) for a, b in zip(ours, b_first))
        assert c_tokens == tokens, (c_tokens, tokens)  # (a) and (c) agree on every token
        rss: dict[str, tuple[float, float]] = {}
        if not args.no_rss:
            big = Path(tmp) / "chatml10.jsonl"
            with open(big, "wb") as fh:
                for _ in range(10):
                    fh.write(src.read_bytes())
            rss = {"1x_workers1": rss_run(src, 1), "10x_workers1": rss_run(big, 1), "10x_workers2": rss_run(big, 2)}
    a1, a2 = results["a_workers1"], results["a_workers2"]
    b, c = results["b"], results["c"]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.n:,} conversations, "
          f"{tokens:,} tokens (template), seed-style {b_tokens:,} tokens; best of {args.repeat}; {stats[1]['engines']}")
    print(f"start-up once per process (encoder layout, probes, a 10-record run): {startup:5.2f} s")
    print(f"(a) qwen-sft pipeline, 1 worker    : {a1:7.2f} s  {tokens / a1:10,.0f} tok/s  {b / a1:5.1f}x vs (b)")
    print(f"(a) qwen-sft pipeline, 2 workers   : {a2:7.2f} s  {tokens / a2:10,.0f} tok/s  {b / a2:5.1f}x vs (b)  "
          f"{a1 / a2:4.2f}x vs 1 worker; output identical: {same}")
    print(f"(b) seed turn-by-turn, 1 process   : {b:7.2f} s  {b_tokens / b:10,.0f} tok/s")
    print(f"(c) HF batch encode (threads, no I/O): {c:7.2f} s  {c_tokens / c:10,.0f} tok/s  (a, 1 worker) is {c / a1:4.2f}x of it")
    print(f"seed-style ids (injected system prompt aside) differ from the template's on {differ} of the first "
          f"{len(b_first)} conversations")
    for k, (own, tree) in rss.items():
        print(f"peak RSS {k:13s}: pipeline process {own:7.1f} MiB, with its workers {tree:7.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
