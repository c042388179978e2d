"""The benchmark's inputs and baseline are what it says they are (no timing is asserted).

    python -m pytest -q -m slow tests/test_tokenize_bench.py
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qwen_sft.samples.files import iter_samples
from qwen_sft.tokenize.pipeline import tokenize_chatml_file

pytestmark = pytest.mark.slow  # a benchmark's smoke test: the slow tier (tests/README.md)
BENCH = Path(__file__).resolve().parent.parent / "bench" / "tokenize_speed.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_tokenize", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_style_baseline_differs_exactly_where_a_boundary_merges(tmp_path, offline_tok):
    bench = load_bench()
    src = tmp_path / "conv.jsonl"
    bench.generate(src, 200)
    records = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines()]
    stats = tokenize_chatml_file(src, tmp_path / "a.jsonl", model="offline", max_len=1 << 20, progress=False)
    assert stats["samples"] == 200 and stats["rejected"] == {} and stats["engines"]["renderer"] == "plain+compiled"
    _, seed_ids = bench.seed_style(src, tmp_path / "b.jsonl", offline_tok)
    ours = [ids for ids, _ in iter_samples(tmp_path / "a.jsonl")]
    system = offline_tok("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n").input_ids
    for record, a, b in zip(records, ours, seed_ids, strict=True):
        injected = record["messages"][0]["role"] != "system"
        assert (b[: len(system)] == system) == injected  # the seed adds a system prompt the model never sees
        merges = any(m["content"].startswith("\n") for m in record["messages"])
        assert (a != (b[len(system):] if injected else b)) == merges
    assert 10 < sum(any(m["content"].startswith("\n") for m in r["messages"]) for r in records) < 150
