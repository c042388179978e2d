"""Start-up of the data path: `convert_to_chatml.py --tokenize` and `binarize_data.py` on a 5-record file.

    python bench/startup.py                              # this checkout, best of 3
    python bench/startup.py --baseline /work/main        # and another checkout, interleaved, with the ratio

Each command runs as a fresh process (`-m offline`) with PYTHONPATH set to the checkout, after one untimed
warm-up run per checkout that builds what a user's first run builds once (the offline tokenizer cache, the
compiled chat template, the ``__pycache__`` files: PYTHONDONTWRITEBYTECODE is removed from the children's
environment, since a development shell may set it and then every run compiles the project's modules again);
printed: best and median wall seconds, median CPU seconds (user + system of the child), the load average before
and after, and whether torch / transformers were imported (``-X importtime``). Wall time on a shared machine
follows its load; CPU seconds move much less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commands(repo: Path, tmp: Path, label: str) -> dict[str, list[str]]:
    out = tmp / label  # each checkout writes its own outputs
    return {
        "convert --tokenize": [sys.executable, str(repo / "convert_to_chatml.py"), str(tmp / "raw"), "--tokenize",
                               "-m", "offline", "-o", str(out / "sft.jsonl"), "--no_progress"],
        "binarize": [sys.executable, str(repo / "binarize_data.py"), "-input_path", str(out / "sft.chatml.jsonl"),
                     "-output_path", str(out / "bin.jsonl"), "-tokenizer_path", "offline", "--no-progress"],
    }


def child_env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": str(repo)}


def run_once(cmd: list[str], repo: Path) -> tuple[float, float]:
    env = child_env(repo)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heavy_imports(cmd: list[str], repo: Path) -> list[str]:
    env = child_env(repo)
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, capture_output=True, text=True, check=True)
    names = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return sorted(n for n in names if n in ("torch", "transformers", "matplotlib"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to measure the same way")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "realdata" /
                        "kullm__user_oriented_instructions_eval.jsonl", help="the first 5 lines are the input")
    args = parser.parse_args()
    repos = {"this": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "raw").mkdir()
        lines = args.data.read_text(encoding="utf-8").splitlines()[:5] if args.data.exists() else [
            json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(5)]
        (tmp / "raw" / "five.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for label, repo in repos.items():  # warm-up, untimed: caches and bytecode, as after a user's first run
            for cmd in commands(repo, tmp, label).values():
                run_once(cmd, repo)
        print(f"load average before: {os.getloadavg()}")
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.repeat):  # interleaved, so both checkouts see the same load
            for label, repo in repos.items():
                for what, cmd in commands(repo, tmp, label).items():  # binarize reads the ChatML convert wrote
                    results.setdefault((label, what), []).append(run_once(cmd, repo))
        print(f"load average after: {os.getloadavg()}")
        print(f"{'checkout':10s} {'command':20s} {'best s':>7s} {'median s':>8s} {'cpu s':>6s}  heavy imports")
        for (label, what), runs in results.items():
            walls, cpus = [w for w, _ in runs], [c for _, c in runs]
            cmd = commands(repos[label], tmp, label)[what]
            print(f"{label:10s} {what:20s} {min(walls):7.2f} {statistics.median(walls):8.2f} "
                  f"{statistics.median(cpus):6.2f}  {', '.join(heavy_imports(cmd, repos[label])) or 'none'}")
        if args.baseline:
            for what in commands(REPO, tmp, "this"):
                ratio = min(w for w, _ in results[("baseline", what)]) / min(w for w, _ in results[("this", what)])
                print(f"{what}: {ratio:.1f}x faster (best wall time, baseline / this)")


if __name__ == "__main__":
    main()
