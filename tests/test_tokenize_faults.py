"""Tokenize/binarize under faults: a dying worker stops the run, huge records are measured first, the output set
is one run's, stats.json is reproducible, and convert and tokenize decide alike (issue 11's fault attack)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from qwen_sft.data.cli import main as convert_main
from qwen_sft.tokenize import pipeline
from qwen_sft.tokenize.pipeline import WorkerDied, tokenize_chatml_file
from qwen_sft.tokenize.sample import Overlong, SampleTokenizer

REPO = Path(__file__).resolve().parent.parent
U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


def call(arguments: object, content: object = "") -> dict:
    fn = {"name": "f", "arguments": arguments}
    return {"role": "assistant", "content": content, "tool_calls": [{"type": "function", "function": fn}]}


def write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def run(src: Path, dst: Path, **kw) -> dict:
    return tokenize_chatml_file(src, dst, model="offline", max_len=kw.pop("max_len", 64), progress=False, **kw)


def rejects(dst: Path) -> list[tuple[int, str]]:
    rows = [json.loads(x) for x in dst.with_name(dst.name + ".rejects.jsonl").read_text().splitlines()]
    return [(r["line"], r["reason"]) for r in rows]


@contextlib.contextmanager
def hang_guard(seconds: int):
    """Fail (not hang) a test whose code under test would wait forever."""
    def expired(signum, frame):
        raise TimeoutError(f"still waiting after {seconds} s: the run hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_record_that_breaks_tokenizing_is_only_its_own_reject(tmp_path):
    deep = '{"a":' + "[" * 990 + "]" * 990 + "}"  # within orjson's reading depth, past Python's recursion limit
    src = write(tmp_path / "in.jsonl", [{"messages": [U, call(deep)]}, {"messages": [U, call({"n": 10**30})]},
                                        {"messages": [U, A]}])
    s = run(src, tmp_path / "out.jsonl", max_len=256)
    assert (s["records_read"], s["samples"]) == (3, 2) and rejects(tmp_path / "out.jsonl") == [
        (1, "nested_too_deep")]
    # the integer past 64 bits is rendered with its exact digits (orjson alone would make it 1e+30)
    from qwen_sft.tokenizer import load_tokenizer

    tok = load_tokenizer("offline")
    ids = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])["input_ids"]
    assert str(10**30) in tok.decode(ids)


def _die(chunk, fmt):  # a worker killed by the OOM killer, at its first chunk
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_that_dies_stops_the_run_with_a_clear_error(tmp_path, monkeypatch):
    src = write(tmp_path / "in.jsonl", [{"messages": [U, A]}] * 8)
    (tmp_path / "out.jsonl").write_text("previous\n")
    monkeypatch.setattr(pipeline, "_process", _die)
    with hang_guard(120), pytest.raises(WorkerDied, match="worker process died"):
        run(src, tmp_path / "out.jsonl", workers=2, chunk_size=1)
    assert (tmp_path / "out.jsonl").read_text() == "previous\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_worker_sends_only_a_file_name_through_the_pool_pipe(tmp_path, offline_tok):
    """A pipe message under PIPE_BUF is written whole or not at all: a worker killed mid-send cannot hang the run."""
    import pickle

    long = {"messages": [U, {"role": "assistant", "content": "def f(x):\n    return x * 2\n" * 40}]}
    chunk = [(n, orjson.dumps(long)) for n in range(1, 257)] + [(257, b"{bad")]
    pipeline._WORKER = pipeline._make_sample_tokenizer(pipeline.TokenizeOptions(model="offline", max_len=4096))
    try:
        for fmt in ("jsonl", "parquet"):
            path = str(tmp_path / f"{fmt}.npz")
            message = pickle.dumps(pipeline._process_to_file(chunk, fmt, path))
            assert len(message) < 512, len(message)
            got, want = pipeline._read_result(path), pipeline._process(chunk, fmt)
            assert got[0] == want[0] and got[3] == want[3] and got[4] == want[4]
            assert [r.tolist() for r in got[1]] == [r.tolist() for r in want[1]]
            assert [r.tolist() for r in got[2]] == [r.tolist() for r in want[2]] and len(got[1]) == len(want[1])
            assert not os.path.exists(path)
    finally:
        pipeline._WORKER = None


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through Linux /proc")
def test_kill_9_of_a_binarize_worker_ends_the_run_within_seconds(tmp_path):
    """The attack's reproduction: SIGKILL one worker of a running binarize_data.py from outside."""
    long = {"messages": [U, {"role": "assistant", "content": "def f(x):\n    return x * 2\n" * 40}]}
    src = write(tmp_path / "in.jsonl", [long] * 20000)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "binarize_data.py"), "-input_path", str(src),
                             "-output_path", str(tmp_path / "out.jsonl"), "-tokenizer_path", "offline",
                             "--max_len", "4096", "-workers", "2", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers: list[int] = []
        for _ in range(600):  # until both workers run (the tokenizer loads first)
            workers = _children(proc.pid)
            if len(workers) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert len(workers) >= 2, "the workers never started"
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # before the fix: waits forever at 0 % CPU
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2 and "worker process died" in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_huge_record_is_dropped_from_its_byte_length_without_tokenizing(offline_tok, monkeypatch):
    st = SampleTokenizer(offline_tok, max_len=64)

    def never(text):
        raise AssertionError(f"tokenized {len(text)} characters only to drop them")

    huge = {"messages": [U, {"role": "assistant", "content": "x" * 2_000_000}]}
    monkeypatch.setattr(st.encoder, "encode", never)
    with pytest.raises(Overlong) as err:
        st.tokenize(huge)
    assert not err.value.exact and err.value.length == -(-len(st.render(huge)[0].encode()) // st.max_token_bytes)
    assert err.value.length > 64
    monkeypatch.undo()
    # Exact where the bound is not certain: a record over max_len but under max_len x the longest token is
    # tokenized and dropped with its exact length; truncation still tokenizes everything.
    medium = {"messages": [U, {"role": "assistant", "content": "word " * 200}]}
    with pytest.raises(Overlong) as err:
        st.tokenize(medium)
    text = offline_tok.apply_chat_template(medium["messages"], tokenize=False)
    assert err.value.exact and err.value.length == len(offline_tok(text, add_special_tokens=False).input_ids)
    cut = SampleTokenizer(offline_tok, max_len=64, overlength="truncate").tokenize(huge)
    assert len(cut.input_ids) == 64 and cut.full_length > 64 * st.max_token_bytes


def test_huge_record_counts_in_the_run_stats(tmp_path):
    huge = {"messages": [U, {"role": "assistant", "content": "y" * 1_000_000}]}
    s = run(write(tmp_path / "in.jsonl", [huge, {"messages": [U, A]}]), tmp_path / "out.jsonl")
    assert (s["samples"], s["dropped"], s["dropped_unmeasured"], s["dropped_lengths"]) == (1, {"overlength": 1}, 1,
                                                                                         {})
    detail = json.loads((tmp_path / "out.jsonl.rejects.jsonl").read_text())["detail"]
    assert detail.startswith("at least ") and detail.endswith(" tokens > max_len 64")


def test_the_output_set_is_one_runs_and_stats_json_is_reproducible(tmp_path, monkeypatch):
    src = write(tmp_path / "in.jsonl", [{"messages": [U, A]}, "{bad"])
    out = tmp_path / "out.jsonl"
    names = ["out.jsonl", "out.jsonl.rejects.jsonl", "out.jsonl.lengths.png", "out.jsonl.run.json",
             "out.jsonl.stats.json"]
    run(src, out)
    first = {n: (tmp_path / n).read_bytes() for n in names}
    run(src, out)
    second = {n: (tmp_path / n).read_bytes() for n in names}
    assert second["out.jsonl.stats.json"] == first["out.jsonl.stats.json"]
    assert second["out.jsonl.lengths.png"] == first["out.jsonl.lengths.png"]
    stats = json.loads(first["out.jsonl.stats.json"])
    assert "seconds" not in stats and "output" not in stats and stats["input"] == "in.jsonl"
    assert set(json.loads(first["out.jsonl.run.json"])) == {"input", "output", "seconds"}
    # A third run on other data, killed while publishing (before its stats.json): no file of the old run stays.
    write(src, [{"messages": [U, {"role": "assistant", "content": "a longer answer than before"}]}] * 2)
    real_replace = os.replace

    def killed_before_stats(a, b):
        if Path(b).name == "out.jsonl.stats.json":
            raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", killed_before_stats)
    with contextlib.suppress(KeyboardInterrupt):
        run(src, out)
    monkeypatch.undo()
    assert not (tmp_path / "out.jsonl.stats.json").exists()
    left = {n: (tmp_path / n).read_bytes() for n in names if (tmp_path / n).exists()}
    # run.json holds the same two paths and a timing rounded to ms, which two runs can share: not comparable
    stale = [n for n in left if left[n] == first[n] and n != "out.jsonl.run.json"]
    assert left and not stale, f"files of the previous run left beside the new ones: {stale}"


def test_convert_and_tokenize_decide_alike_on_bom_nan_and_null_content(tmp_path, capsys):
    tool_result = {"role": "tool", "content": None}
    records = [
        {"messages": [U, A]},  # line 1, after a BOM: accepted by both
        {"messages": [U, call('{"x": NaN}')]},  # NaN is not JSON: rejected by both
        {"messages": [{"role": "user", "content": None}, A]},  # empty_content in both
        {"messages": [U, {"role": "assistant", "content": None}]},  # empty_assistant in both
        {"messages": [U, call({"x": 1}, content=None), tool_result, A]},  # null is fine for a call and a result
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in records).encode())
    assert convert_main([str(src), "-o", str(tmp_path / "conv.jsonl"), "--no_progress"]) == 0
    conv = [json.loads(x) for x in (tmp_path / "conv.jsonl.rejects.jsonl").read_text().splitlines()]
    conv = [(r["line"], r["reason"]) for r in conv]
    run(src, tmp_path / "tok.jsonl", max_len=512)
    tok = rejects(tmp_path / "tok.jsonl")
    assert [line for line, _ in conv] == [line for line, _ in tok] == [2, 3, 4]
    assert conv[1:] == tok[1:] == [(3, "empty_content"), (4, "empty_assistant")]


def test_disk_full_and_empty_data_are_one_line_errors(tmp_path, monkeypatch, capsys):
    from qwen_sft.samples import files as writers
    from qwen_sft.tokenize.cli import main as tokenize_main

    (tmp_path / "empty.jsonl").write_text("\n")
    assert tokenize_main([str(tmp_path / "empty.jsonl"), "-m", "offline", "-o", str(tmp_path / "e.jsonl"),
                          "--no-progress"]) == 1
    assert "error: no sample was written: the input holds no records" in capsys.readouterr().err

    def full(self, blob, rows):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(writers.SampleWriter, "write_serialized", full)
    src = write(tmp_path / "in.jsonl", [{"messages": [U, A]}])
    assert tokenize_main([str(src), "-m", "offline", "-o", str(tmp_path / "out.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: [Errno 28] No space left on device" in err
    assert not list(tmp_path.glob("out.jsonl*")) and not list(tmp_path.glob(".*.tmp"))
