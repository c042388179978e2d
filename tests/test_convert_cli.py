"""convert_to_chatml.py end to end: file formats, rejects, --strict, --split, legacy flags, atomicity, determinism.

    python -m pytest -q tests/test_convert_cli.py
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_sft.data.cli import main

REPO = Path(__file__).resolve().parent.parent
PAIR = {"input": "질문", "output": "답변"}
PAIR_OUT = {"messages": [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "답변"}]}
SEED_RECORDS = [  # the guide's own examples (shared/seed/README.md, "데이터 형식")
    {"input": "질문", "output": "답변"},
    {"instruction": "지시", "response": "응답"},
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]},
]


def jsonl(path: Path, records: list, raw_lines: list[bytes] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records) + b"".join(raw_lines)
    path.write_bytes(body)
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_seed_convert_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "raw" / "a.jsonl", SEED_RECORDS)
    assert main(["./raw"]) == 0
    out = lines(tmp_path / "processed" / "sft_train.jsonl")
    assert out[0] == PAIR_OUT and out[1]["messages"][0] == {"role": "user", "content": "지시"} and len(out) == 3
    assert "read 3 = written 3 + rejected 0" in capsys.readouterr().out
    assert main(["./raw", "-o", "./processed/sft_train.jsonl"]) == 0
    assert lines(tmp_path / "processed" / "sft_train.jsonl") == out
    assert main(["-input_dir", "./raw", "-output_dir", "./raw_converted", "-merge"]) == 0
    assert lines(tmp_path / "raw_converted" / "a.jsonl") == out


def test_every_format_gives_the_same_records(tmp_path):
    raw = tmp_path / "raw"
    jsonl(raw / "a.jsonl", [PAIR])
    (raw / "b.json").write_text(json.dumps([PAIR, PAIR], ensure_ascii=False), encoding="utf-8")
    (raw / "c.json").write_text(json.dumps(PAIR, indent=2, ensure_ascii=False), encoding="utf-8")
    jsonl(raw / "d_lines.json", [PAIR, PAIR])
    with gzip.open(raw / "e.jsonl.gz", "wb") as fh:
        fh.write(json.dumps(PAIR).encode() + b"\n")
    (raw / "sub").mkdir()
    (raw / "sub" / "f.csv").write_text("input,output\n질문,답변\n", encoding="utf-8-sig")
    (raw / "sub" / "g.tsv").write_text("input\toutput\n질문\t답변\n", encoding="utf-8")
    (raw / "h.traj").write_text(json.dumps({"history": PAIR_OUT["messages"]}), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input": ["질문"], "output": ["답변"]}), raw / "i.parquet")
    (raw / "notes.md").write_text("not data")
    assert main([str(raw), "-o", str(tmp_path / "out.jsonl")]) == 0
    assert lines(tmp_path / "out.jsonl") == [PAIR_OUT] * 11


def test_bad_input_is_rejected_with_file_line_reason_and_never_a_traceback(tmp_path, capsys):
    src = jsonl(tmp_path / "raw" / "bad.jsonl", [], [
        b"\xef\xbb\xbf" + json.dumps(PAIR).encode() + b"\r\n",  # 1 BOM + CRLF: fine
        b"{not json}\n",  # 2
        b'{"input": "\xff\xfe", "output": "x"}\n',  # 3 invalid UTF-8
        b"null\n",  # 4
        b"\n",  # blank: not a record
        b'{"input": "q", "output": ""}\n',  # 6 empty answer
        b'{"text": "plain"}\n',  # 7
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}\n',  # 8
        b'{"input": "q", "output": "a", "id": 12345678901234567890123}\n',  # 9 bigint in an unused key: fine
    ])
    out = tmp_path / "out.jsonl"
    assert main([str(src), "-o", str(out)]) == 0
    qa = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert lines(out) == [PAIR_OUT, qa]
    rejects = lines(tmp_path / "out.jsonl.rejects.jsonl")
    assert [(r["file"], r["line"], r["reason"]) for r in rejects] == [
        (str(src), 2, "invalid_json"), (str(src), 3, "invalid_utf8"), (str(src), 4, "not_an_object"),
        (str(src), 6, "empty_assistant"), (str(src), 7, "unknown_shape"), (str(src), 8, "empty_assistant")]
    assert rejects[0]["record"] == "{not json}" and rejects[1]["record"] == '{"input": "\\xff\\xfe", "output": "x"}'
    assert rejects[4]["record"] == {"text": "plain"}
    printed = capsys.readouterr().out
    assert "read 8 = written 2 + rejected 6" in printed and "blank_lines=1" in printed


def test_reading_problems_in_every_format_are_rejects_with_positions(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "arr.json").write_text('[{"input": "q", "output": "a"}, 5, {"x": 1}]')
    (raw / "broken.json").write_bytes(b'{"input": "\xff", ')
    (raw / "c.csv").write_bytes(b'input,output\nq,a\n"\xff",c\nx,y,z\n"multi\nline",a\n')
    body = gzip.compress(b"".join(b'{"input": "q", "output": "a"}\n' for _ in range(20000)))
    (raw / "t.jsonl.gz").write_bytes(body[: len(body) // 2])
    (raw / "nan.jsonl").write_text('{"input": "q", "output": "a", "score": NaN}\n')
    (raw / "not.parquet").write_text("not parquet at all")
    (raw / "trunc.json.gz").write_bytes(gzip.compress(b'[{"input": "q", "output": "a"}]')[:20])
    out = tmp_path / "out.jsonl"
    assert main([str(raw), "-o", str(out)]) == 0
    rejects = lines(Path(f"{out}.rejects.jsonl"))
    got = [(Path(r["file"]).name, r.get("line", r.get("index")), r["reason"]) for r in rejects]
    n_gz = len(lines(out)) - 3  # arr: 1, csv: 2
    assert got == [("arr.json", 1, "not_an_object"), ("arr.json", 2, "unknown_shape"),
                   ("broken.json", 0, "invalid_utf8"), ("c.csv", 3, "invalid_utf8"), ("c.csv", 4, "csv_extra_fields"),
                   ("nan.jsonl", 1, "invalid_json"), ("not.parquet", 0, "unreadable_file"),
                   ("t.jsonl.gz", n_gz + 1, "unreadable_file"), ("trunc.json.gz", 0, "unreadable_file")]
    assert lines(out)[2]["messages"][0]["content"] == "multi\nline" and n_gz > 1000


def test_strict_stops_at_the_first_bad_record(tmp_path, capsys):
    src = jsonl(tmp_path / "a.jsonl", [PAIR, {"input": "q", "output": " "}, {"bad": 1}])
    out = tmp_path / "out.jsonl"
    assert main([str(src), "-o", str(out), "--strict"]) == 1
    assert f"{src}:line 2: empty_assistant: message 1 (assistant) has empty content" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.jsonl.rejects.jsonl").exists()


def test_split_is_seeded_disjoint_and_complete(tmp_path, capsys):
    records = [{"input": f"q{i}", "output": f"a{i}"} for i in range(50)]
    src = jsonl(tmp_path / "a.jsonl", records)
    out = tmp_path / "p" / "sft.jsonl"
    assert main([str(src), "-o", str(out), "--split"]) == 0
    train, evaluation = lines(tmp_path / "p" / "sft_train.jsonl"), lines(tmp_path / "p" / "sft_eval.jsonl")
    assert (len(train), len(evaluation)) == (45, 5) and not out.exists()
    users = [r["messages"][0]["content"] for r in train + evaluation]
    assert sorted(users) == sorted(f"q{i}" for i in range(50))
    assert [int(u[1:]) for u in users[:45]] == sorted(int(u[1:]) for u in users[:45])  # input order kept
    first_eval = (tmp_path / "p" / "sft_eval.jsonl").read_bytes()
    assert main([str(src), "-o", str(out), "--split", "--eval_ratio", "0.1", "--seed", "42"]) == 0
    assert (tmp_path / "p" / "sft_eval.jsonl").read_bytes() == first_eval
    assert main([str(src), "-o", str(out), "--split", "--seed", "7"]) == 0
    assert (tmp_path / "p" / "sft_eval.jsonl").read_bytes() != first_eval
    assert "45 train, 5 eval" in capsys.readouterr().err


def test_legacy_flags_and_conflicts(tmp_path, capsys):
    src = jsonl(tmp_path / "raw" / "a.jsonl", [PAIR])
    jsonl(tmp_path / "raw" / "deep" / "b.json", [PAIR])
    out = tmp_path / "legacy.jsonl"
    assert main(["-input_path", str(src), "-output_path", str(out), "-system_prompt", "S"]) == 0
    assert lines(out) == [{"messages": [{"role": "system", "content": "S"}, *PAIR_OUT["messages"]]}]
    conv, merged = tmp_path / "conv", tmp_path / "all.jsonl"
    args = ["-input_dir", str(tmp_path / "raw"), "-output_dir", str(conv), "-merge", "-merge_output", str(merged)]
    assert main(args) == 0
    assert lines(conv / "a.jsonl") == lines(conv / "deep" / "b.jsonl") == [PAIR_OUT]
    assert lines(merged) == [PAIR_OUT, PAIR_OUT]
    inside = tmp_path / "raw" / "converted"  # a second run must not read the first run's outputs
    for _ in range(2):
        assert main(["-input_dir", str(tmp_path / "raw"), "-output_dir", str(inside)]) == 0
    assert sorted(p.relative_to(inside).as_posix() for p in inside.rglob("*.jsonl")) == ["a.jsonl", "deep/b.jsonl"]
    assert main([str(src), "-input_path", str(out)]) == 2
    assert main(["-input_dir", str(tmp_path), "-output_dir", str(conv), "--split"]) == 2
    err = capsys.readouterr().err
    assert "conflict" in err and "cannot be combined with --split" in err


def test_two_runs_are_byte_identical_and_outputs_are_never_read_back(tmp_path):
    raw = tmp_path / "raw"
    jsonl(raw / "b.jsonl", [PAIR, {"oops": 1}])
    accents = {"messages": [{"role": "user", "content": "é"}, {"role": "assistant", "content": "ü"}]}
    jsonl(raw / "a" / "c.jsonl", [accents])
    out = raw / "out.jsonl"  # inside the input directory on purpose
    assert main([str(raw), "-o", str(out)]) == 0
    first = out.read_bytes(), (raw / "out.jsonl.rejects.jsonl").read_bytes()
    assert main([str(raw), "-o", str(out)]) == 0
    assert (out.read_bytes(), (raw / "out.jsonl.rejects.jsonl").read_bytes()) == first
    assert first[0].decode("utf-8").count("\n") == 2 and "é" in first[0].decode("utf-8")


def test_usage_errors_and_empty_runs(tmp_path, capsys):
    assert main([]) == 2
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path), "--split", "--eval_ratio", "1.5", "--map", "user=Q"]) == 2
    err = capsys.readouterr().err
    assert "--eval_ratio must be between 0 and 1" in err and "--map needs both" in err  # all problems at once
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    src = jsonl(tmp_path / "a.jsonl", [{"nothing": "known"}])
    assert main([str(src), "-o", str(tmp_path / "o.jsonl")]) == 1  # nothing converted is an error
    assert "no record could be converted" in capsys.readouterr().err


def test_a_100mb_line_converts(tmp_path):
    big = "x" * (100 * 1024 * 1024)
    src = tmp_path / "big.jsonl"
    src.write_text(json.dumps({"input": "q", "output": big}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main([str(src), "-o", str(out)]) == 0
    assert out.stat().st_size == src.stat().st_size + len('{"messages":[{"role":"user","content":"q"},'
                                                          '{"role":"assistant","content":""}]}') - len(
        '{"input": "q", "output": ""}')


def _start_and_interrupt(tmp_path: Path, sig: int) -> tuple[Path, Path]:
    src = tmp_path / "big.jsonl"
    with open(src, "w") as fh:
        for i in range(400_000):
            fh.write(f'{{"input": "question {i}", "output": "answer {i}"}}\n')
    out = tmp_path / "out" / "sft.jsonl"
    out.parent.mkdir()
    out.write_text("previous\n")
    proc = subprocess.Popen([sys.executable, str(REPO / "convert_to_chatml.py"), str(src), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".sft.jsonl.") and p.stat().st_size > 0 for p in out.parent.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the conversion ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    return out, src


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_leaves_no_partial_output(tmp_path, sig):
    out, _ = _start_and_interrupt(tmp_path, sig)
    assert out.read_text() == "previous\n"
    assert not (out.parent / "sft.jsonl.rejects.jsonl").exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name != "sft.jsonl"]
    if sig == signal.SIGTERM:  # unwound cleanly: temporary files removed too
        assert leftovers == []
    else:  # SIGKILL cannot be caught: hidden temporaries stay, and directory scans skip hidden files
        assert all(name.startswith(".") for name in leftovers)


def test_qwen_sft_convert_verb(tmp_path):
    from qwen_sft.cli import main as qwen_sft

    src = jsonl(tmp_path / "a.jsonl", [PAIR])
    assert qwen_sft(["convert", str(src), "-o", str(tmp_path / "o.jsonl")]) == 0
    assert lines(tmp_path / "o.jsonl") == [PAIR_OUT]


def test_tokenize_with_split_writes_chatml_and_tokenized_files(tmp_path, capsys):
    pytest.importorskip("qwen_sft.tokenize.pipeline")
    records = [{"input": f"q{i}", "output": f"a{i}"} for i in range(10)]
    src = jsonl(tmp_path / "raw" / "a.jsonl", records)
    out = tmp_path / "processed" / "sft_train.jsonl"
    assert main([str(src), "--tokenize", "-m", "offline", "--max_len", "64", "-o", str(out), "--split"]) == 0
    p = tmp_path / "processed"
    assert len(lines(p / "sft_train_train.chatml.jsonl")) == 9 and len(lines(p / "sft_train_eval.chatml.jsonl")) == 1
    (sample,) = lines(p / "sft_train_eval.jsonl")
    assert set(sample) >= {"input_ids", "label"} and len(sample["input_ids"]) == len(sample["label"])
    assert len(lines(p / "sft_train_train.jsonl")) == 9
    assert main([str(src), "-t", "-m", str(tmp_path / "no-such-tokenizer"), "-o", str(out)]) == 1
    assert "could not load the tokenizer" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from Linux /proc")
def test_memory_stays_bounded_on_a_large_input(tmp_path):
    src = tmp_path / "big.jsonl"
    answer = "답변 " * 300
    with open(src, "w", encoding="utf-8") as fh:
        for i in range(40_000):
            fh.write(json.dumps({"input": f"question {i}", "output": answer}, ensure_ascii=False) + "\n")
    size = src.stat().st_size
    # VmHWM, not getrusage: ru_maxrss survives exec, so it would report the forked pytest process's size.
    code = ("import sys; from qwen_sft.data.cli import main; rc = main(sys.argv[1:]); "
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(src), "-o", str(tmp_path / "o.jsonl"), "--split"],
                          capture_output=True, text=True, check=True)
    max_rss = int(proc.stdout.split()[-1]) * 1024  # kilobytes
    assert size > 60e6 and max_rss < size / 2, (size, max_rss)
    assert (tmp_path / "o_train.jsonl").stat().st_size + (tmp_path / "o_eval.jsonl").stat().st_size > size
