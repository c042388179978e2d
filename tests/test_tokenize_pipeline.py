"""File-level tokenization: formats, rejects, statistics, workers, CLI verbs, binarize_data.py, inspect.

    python -m pytest -q tests/test_tokenize_pipeline.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen_sft import cli
from qwen_sft.samples.files import iter_samples
from qwen_sft.tokenize import pipeline
from qwen_sft.tokenize.pipeline import tokenize_chatml_file
from qwen_sft.tokenizer import TokenizerLoadError

IM_END = 151645
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Write function number {i}."},
                         {"role": "assistant", "content": f"def f{i}(x):\n    return x * {i}\n"}]}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """8 records: 5 good (one over-length), and one of each bad kind, plus a blank line."""
    long = {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "word " * 200}]}
    lines = [GOOD, conversation(1), "", "{not json", {"messages": [{"role": "user", "content": "<|im_end|>"}]},
             {"messages": [{"role": "user", "content": "only a question"}]}, long, conversation(2), conversation(3)]
    return write_lines(tmp_path_factory.mktemp("mixed") / "chatml.jsonl", lines)


def run(src: Path, dst: Path, **kw) -> dict:
    # tiktoken_min_bytes=0: these small fixtures go through the verified tiktoken encoder, as large inputs do
    kw.setdefault("tiktoken_min_bytes", 0)
    return tokenize_chatml_file(src, dst, model="offline", max_len=kw.pop("max_len", 64), progress=False, **kw)


def test_all_formats_hold_the_same_samples_and_the_counts_add_up(mixed, tmp_path):
    stats = {ext: run(mixed, tmp_path / f"out.{ext}") for ext in ("jsonl", "parquet", "arrow")}
    rows = {ext: list(iter_samples(tmp_path / f"out.{ext}")) for ext in stats}
    assert rows["jsonl"] == rows["parquet"] == rows["arrow"] and len(rows["jsonl"]) == 4
    assert rows["jsonl"][0] == ([151644, 872, 198, 6023, IM_END, 198, 151644, 77091, 198, 14990, IM_END, 198],
                                [-100] * 9 + [14990, IM_END, -100])
    s = stats["jsonl"]
    assert (s["records_read"], s["blank_lines"], s["samples"]) == (8, 1, 4)
    assert s["rejected"] == {"invalid_json": 1, "no_supervised_tokens": 1, "special_token_in_content": 1}
    assert s["dropped"] == {"overlength": 1} and s["dropped_lengths"] == {"212": 1}
    assert s["tokens"] == sum(len(i) for i, _ in rows["jsonl"])
    assert s["supervised_tokens"] == sum(sum(x != -100 for x in lab) for _, lab in rows["jsonl"])
    assert s["engines"] == {"encoder": "tiktoken", "renderer": "plain+compiled"}
    saved = json.loads((tmp_path / "out.jsonl.stats.json").read_text())
    assert saved["samples"] == 4 and saved["length_percentiles"]["p100"] == max(len(i) for i, _ in rows["jsonl"])
    assert (tmp_path / "out.jsonl.lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rejects = [json.loads(x) for x in (tmp_path / "out.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (4, "invalid_json"), (5, "special_token_in_content"), (6, "no_supervised_tokens"), (7, "overlength")]
    assert all(r["file"] == str(mixed) for r in rejects) and rejects[3]["detail"] == "212 tokens > max_len 64"


def test_small_inputs_skip_the_tiktoken_build_with_the_same_output(mixed, tmp_path):
    size = mixed.stat().st_size
    default = tokenize_chatml_file(mixed, tmp_path / "d.jsonl", model="offline", max_len=64, progress=False)
    assert size < default["options"]["tiktoken_min_bytes"] and default["engines"]["encoder"] == "hf"
    at = run(mixed, tmp_path / "at.jsonl", tiktoken_min_bytes=size)  # the rule is "smaller than"
    under = run(mixed, tmp_path / "under.jsonl", tiktoken_min_bytes=size + 1)
    forced = run(mixed, tmp_path / "forced.jsonl", tiktoken_min_bytes=size + 1, engine="tiktoken")
    assert (at["engines"]["encoder"], under["engines"]["encoder"], forced["engines"]["encoder"]) == (
        "tiktoken", "hf", "tiktoken")
    for name in ("at", "under", "forced"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (tmp_path / "d.jsonl").read_bytes()
        assert (tmp_path / f"{name}.jsonl.rejects.jsonl").read_bytes() == (tmp_path / "d.jsonl.rejects.jsonl").read_bytes()
    with pytest.raises(ValueError, match="tiktoken_min_bytes"):
        run(mixed, tmp_path / "bad.jsonl", tiktoken_min_bytes=-1)


def test_columnar_schema_is_two_int32_lists_and_memory_maps(mixed, tmp_path):
    run(mixed, tmp_path / "o.arrow")
    run(mixed, tmp_path / "o.parquet")
    expected = pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.list_(pa.int32()))])
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "o.arrow"))).read_all()
    assert table.schema == expected and table.num_rows == 4
    assert pq.read_schema(tmp_path / "o.parquet") == expected


def test_workers_give_byte_identical_output_in_input_order(tmp_path):
    src = write_lines(tmp_path / "many.jsonl", [conversation(i) if i % 7 else "oops" for i in range(300)])
    one = run(src, tmp_path / "w1.jsonl", workers=1, chunk_size=16)
    two = run(src, tmp_path / "w2.jsonl", workers=2, chunk_size=16)
    assert (tmp_path / "w1.jsonl").read_bytes() == (tmp_path / "w2.jsonl").read_bytes()
    assert (tmp_path / "w1.jsonl.rejects.jsonl").read_bytes() == (tmp_path / "w2.jsonl.rejects.jsonl").read_bytes()
    assert one["samples"] == two["samples"] == 257 and two["rejected"] == {"invalid_json": 43}
    first = next(iter_samples(tmp_path / "w2.jsonl"))
    assert first[0][3:9] == [7985, 729, 1372, 220, 16, 13]  # "Write function number 1." — row 0 is record 1


@pytest.mark.slow
def test_spawned_workers_give_the_same_output(tmp_path, monkeypatch):
    src = write_lines(tmp_path / "s.jsonl", [conversation(i) for i in range(40)])
    run(src, tmp_path / "fork.jsonl", workers=2, chunk_size=8)
    monkeypatch.setattr(pipeline.mp, "get_all_start_methods", lambda: ["spawn"])
    run(src, tmp_path / "spawn.jsonl", workers=2, chunk_size=8)
    assert (tmp_path / "fork.jsonl").read_bytes() == (tmp_path / "spawn.jsonl").read_bytes()


def test_truncate_option_counts_cuts(mixed, tmp_path):
    s = run(mixed, tmp_path / "t.jsonl", overlength="truncate")
    assert s["samples"] == 5 and s["truncated"] == {"mid_turn": 1} and s["dropped"] == {}
    assert max(len(i) for i, _ in iter_samples(tmp_path / "t.jsonl")) == 64


def test_failure_leaves_previous_output_untouched(mixed, tmp_path, monkeypatch):
    dst = tmp_path / "keep.jsonl"
    dst.write_text("previous\n")

    def boom(chunk, fmt):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(pipeline, "_process", boom)
    with pytest.raises(RuntimeError):
        run(mixed, dst)
    assert dst.read_text() == "previous\n" and not list(tmp_path.glob(".keep.jsonl*"))


def test_bad_options_fail_before_loading(tmp_path, mixed):
    with pytest.raises(ValueError, match="max_len=1.*policy='first'"):
        tokenize_chatml_file(mixed, tmp_path / "x.jsonl", model="offline", max_len=1, policy="first")
    with pytest.raises(ValueError, match="unknown tokenize option.*split"):
        tokenize_chatml_file(mixed, tmp_path / "x.jsonl", model="offline", split=True)
    with pytest.raises(ValueError, match=".npy was a pickle"):
        run(mixed, tmp_path / "x.npy")
    with pytest.raises(TokenizerLoadError, match="local directory"):
        tokenize_chatml_file(mixed, tmp_path / "x.jsonl", model=str(tmp_path / "no-such-model"))


def test_tokenize_verb(mixed, tmp_path, capsys):
    assert cli.main(["tokenize", str(mixed), "-m", "offline", "-o", str(tmp_path / "v.parquet"), "--max_len", "64",
                     "--policy", "last", "--no-progress"]) == 0
    assert len(list(iter_samples(tmp_path / "v.parquet"))) == 4
    assert cli.main(["tokenize", str(mixed), "-m", str(tmp_path / "missing"), "-o", str(tmp_path / "v.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "error: could not load the tokenizer" in err and "Traceback" not in err


def test_binarize_upstream_flags(mixed, tmp_path, capsys):
    from qwen_sft.tokenize.binarize import main

    out = tmp_path / "b"
    assert main(["-input_path", str(mixed), "-output_path", str(out), "-tokenizer_path", "offline", "-max_len", "64",
                 "-workers", "2", "-save_format", "arrow", "--no-progress"]) == 0
    assert len(list(iter_samples(tmp_path / "b.arrow"))) == 4
    assert main(["-input_path", str(mixed), "-output_path", str(out), "-save_format", "npy"]) == 2
    assert main(["-input_path", str(mixed), "-output_path", str(tmp_path / "b.jsonl"), "-save_format", "parquet"]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "conflicts with -output_path" in err


def test_inspect_highlights_exactly_the_supervised_text(mixed, tmp_path, capsys):
    run(mixed, tmp_path / "i.jsonl")
    assert cli.main(["inspect", str(tmp_path / "i.jsonl"), "--index", "0", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sample 0: 12 tokens, 2 supervised\n")
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n«hello<|im_end|>»\n" in out
    assert cli.main(["inspect", str(tmp_path / "i.jsonl"), "--index", "1", "--html", str(tmp_path / "s.html")]) == 0
    page = (tmp_path / "s.html").read_text()
    assert '<span class="sup">def f1(x):\n    return x * 1\n&lt;|im_end|&gt;</span>' in page
    assert cli.main(["inspect", str(tmp_path / "i.jsonl"), "--index", "9"]) == 2
    assert "has no sample 9 (it has 4)" in capsys.readouterr().err


def test_pickled_npy_is_read_only_when_allowed(tmp_path, capsys):
    path = tmp_path / "up.npy"
    rows = np.empty(1, dtype=object)
    rows[0] = {"input_ids": [151644, 872, 198], "label": [-100, -100, 198]}
    np.save(path, rows, allow_pickle=True)
    assert cli.main(["inspect", str(path)]) == 2
    assert "unpickling runs code" in capsys.readouterr().err
    assert cli.main(["inspect", str(path), "--allow-pickle", "--color", "never"]) == 0
    assert "sample 0: 3 tokens, 1 supervised" in capsys.readouterr().out


def test_jsonl_lines_use_the_seed_key_names(mixed, tmp_path):
    run(mixed, tmp_path / "k.jsonl")
    first = orjson.loads((tmp_path / "k.jsonl").read_bytes().splitlines()[0])
    assert list(first) == ["input_ids", "label"]
