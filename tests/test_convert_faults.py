"""convert_to_chatml under faults: one bad record costs only itself, outputs stay consistent, errors are one line.

Each test reproduces a defect found by the fault attack of issue 11 (the triggers are named in each test).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qwen_sft.data import convert
from qwen_sft.data.cli import main
from qwen_sft.data.exactjson import loads

USER, ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
GOOD = json.dumps({"messages": [USER, ASSISTANT]})


def with_call(arguments: object) -> str:
    call = {"type": "function", "function": {"name": "f", "arguments": arguments}}
    return json.dumps({"messages": [USER, {"role": "assistant", "content": "", "tool_calls": [call]}]})


def rejects_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def summary_total(out: str) -> tuple[int, int, int]:
    line = next(x for x in out.splitlines() if x.startswith("read "))
    read, written, rejected = (int(w) for w in line.replace("=", " ").replace("+", " ").split() if w.isdigit())
    return read, written, rejected


def test_a_record_that_breaks_reading_or_converting_is_only_its_own_reject(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.csv").write_bytes(b"user,assist\xffant\nq,a\n")  # an invalid byte in the header
    deep = '{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"x"}],"extra":%s}'
    (raw / "b.jsonl").write_text("\n".join([
        '{"messages":[{"role":"user","content":"hi","\\ud800":1},{"role":"assistant","content":"x"}]}',  # key
        '{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"x"}],'
        '"tools":[{"type":"function","function":{"name":"\\ud800"}}]}',  # a lone surrogate in tools
        deep % ("[" * 600 + "]" * 600),  # past orjson's depth for writing, within its depth for reading
        deep % ("[" * 3000 + "]" * 3000),  # past every parser's depth
        GOOD,
    ]) + "\n")
    assert main([str(raw), "-o", str(tmp_path / "out.jsonl"), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert summary_total(out) == (6, 3, 3)
    rejects = rejects_of(tmp_path / "out.jsonl.rejects.jsonl")
    assert [(Path(r["file"]).name, r["line"], r["reason"]) for r in rejects] == [
        ("a.csv", 2, "invalid_utf8"), ("b.jsonl", 2, "unexpected_error"), ("b.jsonl", 4, "invalid_json")]
    assert "header" in rejects[0]["detail"] and rejects[0]["record"] == {"user": "q", "assist\\xffant": "a"}
    written = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(written) == 3 and written[-1] == {"messages": [USER, ASSISTANT]}


def test_an_invalid_utf8_parquet_cell_rejects_its_row_and_no_other(tmp_path, capsys):
    users = [f"q{i}".encode() for i in range(3000)]
    users[1025] = b"bad \xff byte"
    table = pa.table({"instruction": pa.array(users, pa.binary()).view(pa.string()),
                      "output": pa.array([f"a{i}" for i in range(3000)])})
    pq.write_table(table, tmp_path / "d.parquet")
    assert main([str(tmp_path / "d.parquet"), "-o", str(tmp_path / "out.jsonl"), "--no_progress"]) == 0
    assert summary_total(capsys.readouterr().out) == (3000, 2999, 1)
    [reject] = rejects_of(tmp_path / "out.jsonl.rejects.jsonl")
    assert (reject["index"], reject["reason"]) == (1025, "invalid_utf8") and "'instruction'" in reject["detail"]
    written = (tmp_path / "out.jsonl").read_text().splitlines()
    assert json.loads(written[1025])["messages"][0]["content"] == "q1026"


def test_integers_past_64_bits_are_kept_exact_or_rejected_never_floats(tmp_path, capsys):
    assert loads(b'{"n": 123456789012345678901234567890}') == {"n": 123456789012345678901234567890}
    assert loads(b"[18446744073709551615, -9223372036854775808, 1.5]") == [2**64 - 1, -(2**63), 1.5]
    edge = {"a": 2**63 - 1, "b": -(2**63), "c": 2**64 - 1}
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([with_call(edge), with_call({"d": 2**64}), with_call(json.dumps({"e": 10**30})),
                              json.dumps({"messages": [USER, ASSISTANT], "id": 10**40})]) + "\n")
    assert main([str(src), "-o", str(tmp_path / "out.jsonl"), "--no_progress"]) == 0
    assert summary_total(capsys.readouterr().out) == (4, 2, 2)
    written = (tmp_path / "out.jsonl").read_text().splitlines()
    assert json.loads(written[0])["messages"][1]["tool_calls"][0]["function"]["arguments"] == edge
    assert '"c":18446744073709551615' in written[0]  # the exact digits, not 1.8446744073709552e+19
    assert json.loads(written[1]) == {"messages": [USER, ASSISTANT]}  # the big id is in a key that is not read
    assert [(r["line"], r["reason"]) for r in rejects_of(tmp_path / "out.jsonl.rejects.jsonl")] == [
        (2, "integer_out_of_range"), (3, "integer_out_of_range")]


def test_split_publishes_train_and_eval_as_one_unit(tmp_path, monkeypatch, capsys):
    def records(tag: str) -> str:
        return "".join(json.dumps({"input": f"{tag}{i}", "output": "a"}) + "\n" for i in range(20))

    src = tmp_path / "in.jsonl"
    src.write_text(records("old"))
    args = [str(src), "-o", str(tmp_path / "out.jsonl"), "--split", "--no_progress"]
    assert main(args) == 0
    src.write_text(records("new"))
    real_replace, published = os.replace, []

    def killed_after_the_first(src_path, dst_path):  # a kill -9 between the two renames
        name = Path(dst_path).name
        if name in ("out_train.jsonl", "out_eval.jsonl"):
            if published:
                raise KeyboardInterrupt
            published.append(name)
        return real_replace(src_path, dst_path)

    monkeypatch.setattr(os, "replace", killed_after_the_first)
    with contextlib.suppress(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    present = {p.name: p.read_text() for p in (tmp_path / "out_train.jsonl", tmp_path / "out_eval.jsonl")
               if p.exists()}
    assert present, "the first rename happened"
    assert all("old" not in text for text in present.values()), f"a file of the previous run is left: {present}"
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_seed_merge_output_inside_the_input_directory_is_not_read_back(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(GOOD + "\n")
    merged = raw / "merged.jsonl"
    for _ in range(3):
        assert main(["-input_dir", str(raw), "-output_dir", str(tmp_path / "conv"), "-merge",
                     "-merge_output", str(merged), "--no_progress"]) == 0
        assert len(merged.read_text().splitlines()) == 1
    assert f"skipped: {merged} (one of this run's outputs)" in capsys.readouterr().err


def test_disk_full_is_a_one_line_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    real_open = convert.atomic_open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.fh, name)

    @contextlib.contextmanager
    def full_disk(path, mode="w", encoding="utf-8"):
        with real_open(path, mode, encoding) as fh:
            yield Full(fh)

    monkeypatch.setattr(convert, "atomic_open", full_disk)
    src = tmp_path / "in.jsonl"
    src.write_text(GOOD + "\n")
    assert main([str(src), "-o", str(tmp_path / "out.jsonl"), "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("convert_to_chatml:")]
    assert "No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_empty_data_and_a_corrupt_parquet_are_one_line_messages(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main([str(tmp_path / "empty.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "convert_to_chatml: the input holds no records (1 file(s), all empty or blank)" in err
    pq.write_table(pa.table({"input": ["q"], "output": ["a"]}), tmp_path / "ok.parquet")
    (tmp_path / "bad.parquet").write_bytes((tmp_path / "ok.parquet").read_bytes()[:-20])
    assert main([str(tmp_path / "bad.parquet"), "-o", str(tmp_path / "o.jsonl"), "--no_progress"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err and summary_total(out) == (1, 0, 1)
    [reject] = rejects_of(tmp_path / "o.jsonl.rejects.jsonl")
    assert reject["reason"] == "unreadable_file" and reject["detail"].startswith("ArrowInvalid: ")


def test_dangling_and_looping_links_and_unlistable_folders_are_listed_as_skipped(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw"
    (raw / "locked").mkdir(parents=True)
    (raw / "a.jsonl").write_text(GOOD + "\n")
    (raw / "locked" / "b.jsonl").write_text(GOOD + "\n")
    (raw / "dangling.jsonl").symlink_to(raw / "nowhere.jsonl")
    (raw / "loop1.jsonl").symlink_to(raw / "loop2.jsonl")
    (raw / "loop2.jsonl").symlink_to(raw / "loop1.jsonl")
    (raw / "up").symlink_to(raw, target_is_directory=True)
    real_scandir = os.scandir

    def scandir(path="."):  # root ignores chmod 000, so the refusal is simulated
        if Path(path).name == "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert main([str(raw), "-o", str(tmp_path / "out.jsonl"), "--no_progress"]) == 0
    err = capsys.readouterr().err
    for name, why in (("dangling.jsonl", "dangling symlink"), ("loop1.jsonl", "symlink loop"),
                      ("loop2.jsonl", "symlink loop"), ("locked", "folder cannot be listed: Permission denied"),
                      ("up", "symlinked folder, not followed")):
        assert f"skipped: {raw / name} ({why}" in err, name
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1
