"""bench/next_rehearsal.py's ``layers=N``: one N-layer prefix traced through the same adapter, loss, optimizer
and engine settings as the bench's fitted settings (here: a tiny 4-layer hybrid, where ``layers=4`` is the whole
model and must give the full trace's peak).

    python -m pytest -q -m slow tests/test_next_rehearsal_bench.py
"""

from __future__ import annotations

import json

import pytest

from qwen_sft.model.tiny import TinySpec, tiny_config


@pytest.mark.slow  # two tiny traces, about a minute on the shared 2-core machine
def test_block_option_equals_the_full_trace_of_the_same_layers(tmp_path):
    from bench.next_rehearsal import main

    cfg = tiny_config(TinySpec(model_type="qwen3_next", layers=4, hidden=64, experts=8, active=2,
                               moe_intermediate=32, full_attention_interval=4))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "rows.json"
    assert main([str(tmp_path / "config.json"), "--seq", "64", "--set", "block:layers=4", "--set", "full:layers=all",
                 "--json", str(out)]) == 0
    block, full = json.loads(out.read_text())
    assert block["traced"] == "first 4 layers only" and full["traced"] == "all 4 layers"
    assert block["peak"] == full["peak"] > 0
    assert block["peak_phase"] == full["peak_phase"]
    assert block["trainable"] == full["trainable"] > 0
    assert block["cpu_seconds"] > 0
