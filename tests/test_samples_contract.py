"""The token-sample contract (qwen_sft/samples/): tokenize and training apply one length rule.

    python -m pytest -q tests/test_samples_contract.py
"""

from __future__ import annotations

import json

import numpy as np

from qwen_sft.samples.files import iter_samples, open_writer
from qwen_sft.samples.length import TurnMarks
from qwen_sft.tokenize.sample import SampleTokenizer
from qwen_sft.train.data import load_tokenized


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


RECORDS = [  # cut after a whole turn; cut inside the only assistant turn
    {"messages": [_msg("user", "Q1"), _msg("assistant", "A one"), _msg("user", "Q2 " * 30), _msg("assistant", "A two")]},
    {"messages": [_msg("user", "go"), _msg("assistant", "word " * 40)]},
]


def test_training_truncates_exactly_as_tokenize(offline_tok, tmp_path):
    """One ``max_len``, one rule: rows written whole and cut by training's ``truncate_source`` equal the rows
    tokenize's ``--overlength truncate`` writes (training used to cut every row at max_len, mid-turn)."""
    max_len = 30
    full = SampleTokenizer(offline_tok, max_len=10_000)
    cut = SampleTokenizer(offline_tok, max_len=max_len, overlength="truncate")
    whole, expected = [full.tokenize(r) for r in RECORDS], [cut.tokenize(r) for r in RECORDS]
    assert [s.cut for s in expected] == ["turn", "mid_turn"] and len(expected[0].input_ids) < max_len
    src = tmp_path / "full.arrow"
    with open_writer(src) as w:
        w.write([s.input_ids for s in whole], [s.label for s in whole])
    assert [len(i) for i, _ in iter_samples(src)] == [len(s.input_ids) for s in whole]
    ds = load_tokenized(src, vocab_size=len(offline_tok), max_len=max_len, truncate=True, cache_dir=tmp_path / "c",
                        marks=TurnMarks.of(offline_tok))
    assert ds.stats.truncated == 2 and ds.lengths().tolist() == [len(s.input_ids) for s in expected]
    for row, want in zip((ds[i] for i in range(len(ds))), expected):
        assert row == {"input_ids": want.input_ids.tolist(), "labels": want.label.tolist()}


def test_the_reader_takes_the_labels_alias_like_training(tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"input_ids": [1, 2], "labels": [-100, 2]}) + "\n")
    assert list(iter_samples(src)) == [([1, 2], [-100, 2])]
    ds = load_tokenized(src, vocab_size=10, max_len=8, cache_dir=tmp_path / "c")
    assert ds[0] == {"input_ids": [1, 2], "labels": [-100, 2]} and isinstance(ds.lengths(), np.ndarray)
