"""Tokenized data for training: memory-mapped, every problem reported at once, counts that add up.

    python -m pytest -q tests/test_train_data.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen_sft.train.data import DataError, load_tokenized, to_arrow

GOOD = [
    {"input_ids": [1, 2, 3, 4], "label": [-100, -100, 3, 4]},
    {"input_ids": [5, 6], "label": [-100, 6]},
    {"input_ids": list(range(10)), "label": [-100] * 5 + list(range(5, 10))},
]


def _jsonl(path: Path, rows: list, extra: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra, encoding="utf-8")
    return path


def test_jsonl_is_converted_once_and_memory_mapped(tmp_path):
    src = _jsonl(tmp_path / "t.jsonl", GOOD)
    ds = load_tokenized(src, vocab_size=100, max_len=8, cache_dir=tmp_path / "cache")
    assert len(ds) == 2 and ds[0] == {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}
    assert ds[1] == {"input_ids": [5, 6], "labels": [-100, 6]}
    st = ds.stats
    assert (st.rows_read, st.rows_kept, st.dropped_too_long, st.truncated) == (3, 2, 1, 0)
    # Position 0 is never a target, so supervised counts labels[1:]: 2 + 1.
    assert (st.tokens, st.supervised_tokens) == (6, 3)
    cached = list((tmp_path / "cache").glob("t-*.arrow"))
    assert len(cached) == 1 and ds.path == cached[0]
    assert to_arrow(src, tmp_path / "cache") == cached[0]  # second call reuses the cache
    # The token buffer is a view of the mapped file, not a copy in Python lists.
    assert all(isinstance(v, np.ndarray) and not v.flags.owndata for v in ds._cols.ids)


def test_truncate_source_cuts_instead_of_dropping(tmp_path):
    src = _jsonl(tmp_path / "t.jsonl", GOOD)
    ds = load_tokenized(src, vocab_size=100, max_len=8, truncate=True, cache_dir=tmp_path)
    assert (ds.stats.rows_kept, ds.stats.truncated, ds.stats.dropped_too_long) == (3, 1, 0)
    assert ds[2] == {"input_ids": list(range(8)), "labels": [-100] * 5 + [5, 6, 7]}
    assert ds.stats.supervised_tokens == 2 + 1 + 3


def test_parquet_and_arrow(tmp_path):
    table = pa.table({"input_ids": pa.array([r["input_ids"] for r in GOOD], pa.list_(pa.int64())),
                      "label": pa.array([r["label"] for r in GOOD], pa.list_(pa.int64()))})
    pq.write_table(table, tmp_path / "t.parquet")
    ds = load_tokenized(tmp_path / "t.parquet", vocab_size=100, max_len=8, cache_dir=tmp_path / "c")
    assert [ds[i] for i in range(len(ds))] == [{"input_ids": r["input_ids"], "labels": r["label"]} for r in GOOD[:2]]
    table = table.cast(pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.list_(pa.int32()))]))
    with pa.ipc.new_file(str(tmp_path / "t.arrow"), table.schema) as writer:
        writer.write_table(table)
    ds = load_tokenized(tmp_path / "t.arrow", vocab_size=100, max_len=8, cache_dir=tmp_path / "c2")
    assert ds.path == tmp_path / "t.arrow" and not (tmp_path / "c2").exists()  # mapped in place, no copy
    assert ds[1] == {"input_ids": [5, 6], "labels": [-100, 6]}


def test_every_problem_in_one_message(tmp_path):
    bad = GOOD + [
        {"input_ids": [1, 2], "label": [1]},                 # line 4: length mismatch
        {"input_ids": [1, 200], "label": [-100, 200]},       # line 5: beyond the vocabulary
        {"input_ids": [1, 2], "label": [-100, -100]},        # line 6: nothing supervised
        {"input_ids": [1, 2], "label": [-100, 7]},           # line 7: label is neither -100 nor the id
        {"messages": [{"role": "user", "content": "hi"}]},   # line 8: not tokenized
    ]
    src = _jsonl(tmp_path / "bad.jsonl", bad, extra="{oops\n")
    with pytest.raises(DataError) as err:
        load_tokenized(src, vocab_size=100, max_len=8, strict=True, cache_dir=tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{src}: 7 problem(s) found; no model was loaded")
    for expected in ("length mismatch (1):\n    line 4: 2 input_ids vs 1 labels",
                     "ids beyond the vocabulary (1):\n    line 5: id 200 not in [0, 100)",
                     "no supervised token (1):\n    line 6",
                     "labels other than -100 or the input id (1):\n    line 7",
                     "not tokenized (no input_ids) (1):\n    line 8: keys ['messages']",
                     "invalid JSON (1):\n    line 9",
                     "longer than model_max_length (1):\n    line 3: 10 > max_len=8",
                     "run `python convert_to_chatml.py ./raw --tokenize`"):
        assert expected in msg, expected
    assert not list(tmp_path.glob("*.arrow")), "a failed conversion must not leave a cache file behind"


def test_untokenized_chatml_says_how_to_fix(tmp_path):
    src = _jsonl(tmp_path / "chatml.jsonl", [{"messages": [{"role": "user", "content": "x"}]}] * 3)
    with pytest.raises(DataError, match=r"(?s)not tokenized \(no input_ids\) \(3\).*--tokenize"):
        load_tokenized(src, vocab_size=100, max_len=8, cache_dir=tmp_path)


def _big_arrow(path: Path, batches: int, rows: int, width: int) -> int:
    """An Arrow IPC file of ``batches`` record batches of ``rows`` × ``width`` tokens; returns its size."""
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.list_(pa.int32()))])
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for b in range(batches):
            ids = (np.arange(rows * width, dtype=np.int32) + b) % 1000
            labels = ids.copy()
            labels[::width] = -100
            writer.write_batch(pa.record_batch([pa.ListArray.from_arrays(offsets, pa.array(ids)),
                                                pa.ListArray.from_arrays(offsets, pa.array(labels))], schema=schema))
            del ids, labels
    return path.stat().st_size


def test_multi_batch_arrow_is_read_through_views_not_copied_onto_the_heap(tmp_path):
    """~320 MB in 8 record batches: loading it allocates (peak and held) nothing near the file's size."""
    size = _big_arrow(tmp_path / "big.arrow", batches=8, rows=5_000, width=1_000)
    assert size > 300e6
    pool = pa.proxy_memory_pool(pa.default_memory_pool())  # its own counters: peak of this load only
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        ds = load_tokenized(tmp_path / "big.arrow", vocab_size=1000, max_len=2048, cache_dir=tmp_path / "c")
        assert ds.path == tmp_path / "big.arrow" and len(ds) == 40_000
        first, last = ds[0], ds[len(ds) - 1]  # rows of the first and the last batch
        held, peak = pool.bytes_allocated(), pool.max_memory()
    finally:
        pa.set_memory_pool(previous)
    assert first["input_ids"][:3] == [0, 1, 2] and first["labels"][:2] == [-100, 1]
    assert last["input_ids"][-1] == (5_000 * 1_000 - 1 + 7) % 1000 and len(last["labels"]) == 1_000
    assert ds.stats.tokens == 40_000_000 and ds.stats.supervised_tokens == 40_000 * 999
    # combine_chunks() (the old way) allocated the whole token buffer, ≈ the file size, here.
    assert held < size / 100 and peak < size / 100, (held, peak, size)


def _tokenized_with_stats(tmp_path: Path, fingerprint: dict) -> Path:
    src = _jsonl(tmp_path / "t.jsonl", GOOD[:2])
    (tmp_path / "t.jsonl.stats.json").write_text(json.dumps({"samples": 2, "tokenizer": fingerprint}))
    return src


FP = {"name_or_path": "offline", "chat_template_sha256": "a" * 64, "vocab_sha256": "b" * 64, "vocab_size": 100}


def test_data_made_with_another_chat_template_is_refused_unless_allowed(tmp_path):
    src = _tokenized_with_stats(tmp_path, {**FP, "name_or_path": "some/other-model", "chat_template_sha256": "c" * 64})
    with pytest.raises(DataError) as err:
        load_tokenized(src, vocab_size=100, max_len=8, cache_dir=tmp_path / "c", tokenizer=FP)
    msg = str(err.value)
    assert "made with another chat template (1):" in msg and "tokenized with 'some/other-model'" in msg
    assert "re-tokenize with `-m offline`, or pass --allow_template_mismatch true" in msg
    ds = load_tokenized(src, vocab_size=100, max_len=8, cache_dir=tmp_path / "c", tokenizer=FP,
                        allow_template_mismatch=True)
    assert len(ds) == 2 and ds.stats.tokenizer["match"] is False
    assert ds.stats.to_dict()["tokenizer"]["data"]["chat_template_sha256"] == "c" * 64


def test_matching_or_unrecorded_tokenizer_is_recorded_in_the_data_statistics(tmp_path):
    src = _tokenized_with_stats(tmp_path, FP)
    ds = load_tokenized(src, vocab_size=100, max_len=8, cache_dir=tmp_path / "c", tokenizer=FP)
    assert ds.stats.tokenizer == {"data": FP, "training": FP, "match": True}
    (tmp_path / "t.jsonl.stats.json").unlink()  # hand-made data: nothing to compare, and the record says so
    ds = load_tokenized(src, vocab_size=100, max_len=8, cache_dir=tmp_path / "c", tokenizer=FP)
    assert ds.stats.tokenizer == {"data": None, "training": FP, "match": None}


def test_vocabulary_mismatch_is_refused(tmp_path):
    src = _tokenized_with_stats(tmp_path, {**FP, "vocab_sha256": "d" * 64})
    with pytest.raises(DataError, match="made with another vocabulary"):
        load_tokenized(src, vocab_size=100, max_len=8, cache_dir=tmp_path / "c", tokenizer=FP)


def test_problems_in_a_later_batch_name_the_global_row(tmp_path):
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.list_(pa.int32()))])
    batches = [[([1, 2], [-100, 2])] * 3, [([1, 2], [-100, 2]), ([1, 200], [-100, 200]), ([3, 4], [-100, -100])]]
    with pa.ipc.new_file(str(tmp_path / "t.arrow"), schema) as writer:
        for rows in batches:
            writer.write_batch(pa.record_batch([pa.array([r[0] for r in rows], pa.list_(pa.int32())),
                                                pa.array([r[1] for r in rows], pa.list_(pa.int32()))], schema=schema))
    with pytest.raises(DataError) as err:
        load_tokenized(tmp_path / "t.arrow", vocab_size=100, max_len=8, cache_dir=tmp_path / "c")
    assert "ids beyond the vocabulary (1):\n    row 5: id 200" in str(err.value)
    assert "no supervised token (1):\n    row 6" in str(err.value)
    ok = tmp_path / "ok.arrow"
    with pa.ipc.new_file(str(ok), schema) as writer:
        for rows in ([([1, 2], [-100, 2])], [([5, 6, 7], [-100, 6, 7])] * 2):
            writer.write_batch(pa.record_batch([pa.array([r[0] for r in rows], pa.list_(pa.int32())),
                                                pa.array([r[1] for r in rows], pa.list_(pa.int32()))], schema=schema))
    ds = load_tokenized(ok, vocab_size=100, max_len=8, cache_dir=tmp_path / "c")
    assert [ds[i]["input_ids"] for i in range(len(ds))] == [[1, 2], [5, 6, 7], [5, 6, 7]]
    assert ds.lengths().tolist() == [2, 3, 3] and ds.stats.supervised_tokens == 1 + 2 + 2
