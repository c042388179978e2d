"""Expert engine in token tiles: same outputs and gradients as untiled, one tile's intermediates saved at a time,
and a tile plan that keeps every expert intermediate under 2**31 elements at the 30B-A3B's size.

    python -m pytest -q tests/test_moe_tiles.py
"""

from __future__ import annotations

import json

import pytest
import torch
from fixture_data import SPEC_CONFIG, need_fixture

from qwen_sft.moe.experts import DEFAULT_MAX_ROUTED_ROWS, token_tiles
from tests.test_moe_engine import INTER, _engine, _rel, _routing


def _run(eng, x, idx, wts, max_rows):
    eng.max_routed_rows = max_rows
    x, wts = x.clone().requires_grad_(), wts.clone().requires_grad_()
    largest = [0]

    def pack(t):
        largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = eng(x, idx, wts)
    lora = [eng.lora_gate_up_A, eng.lora_gate_up_B, eng.lora_down_A, eng.lora_down_B]
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    return out, torch.autograd.grad(out, [x, wts, *lora], upstream), largest[0]


@pytest.mark.parametrize("grouped", [True, False])
def test_tiled_equals_untiled_and_saves_one_tile(grouped):
    eng = _engine(True, torch.float32, lora=True, grouped=grouped)
    tokens, top_k = 37, 2
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1))
    idx, wts = _routing(tokens, top_k, list(range(8)), seed=2, dtype=torch.float32)
    ref, ref_grads, ref_saved = _run(eng, x, idx, wts, None)
    out, grads, saved = _run(eng, x, idx, wts, 10)  # 5 tokens (10 routed rows) per tile: 8 tiles
    assert len(token_tiles(tokens, top_k, 10)) == 8
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for name, a, b in zip(["x", "routing", "A1", "B1", "A2", "B2"], grads, ref_grads):
        assert _rel(a, b) < 1e-5, name  # summed over rows in another order: rounding only
    assert ref_saved >= tokens * top_k * 2 * INTER  # untiled: the whole layer's gate_up pre-activations
    assert saved < tokens * top_k * 2 * INTER / 4  # tiled: each tile recomputes its own in backward


def test_tile_plan_keeps_expert_intermediates_under_int32_at_175k_tokens():
    hidden, inter, top_k = 2048, 768, 8  # Qwen3-Coder-30B-A3B
    cfg = json.loads(need_fixture(SPEC_CONFIG).read_text())  # the released config.json agrees
    assert (cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]) == (hidden, inter, top_k)
    limit = 2**31
    overflow_at = -(-limit // (top_k * 2 * inter))  # tokens whose gate_up intermediate has 2**31 elements
    assert overflow_at == 174_763  # "near 175K routed tokens"
    for tokens in (overflow_at, 262_144, 1_048_576):
        assert token_tiles(tokens, top_k, None) == [(0, tokens)]  # untiled: one intermediate of >= 2**31 elements
        assert tokens * top_k * 2 * inter >= limit
        tiles = token_tiles(tokens, top_k, DEFAULT_MAX_ROUTED_ROWS)
        assert tiles[0][0] == 0 and tiles[-1][1] == tokens
        assert all(a1 == b0 for (_, a1), (b0, _) in zip(tiles, tiles[1:]))  # contiguous, no token twice
        for a, b in tiles:
            rows = (b - a) * top_k
            assert rows <= DEFAULT_MAX_ROUTED_ROWS
            # The largest per-tile tensors: routed inputs [rows, H], gate_up [rows, 2I], and the int32 group offsets.
            assert rows * max(hidden, 2 * inter) < limit and rows < torch.iinfo(torch.int32).max
    # The tile's index tensors at full size, on the meta device: shapes and dtypes without the memory.
    rows = DEFAULT_MAX_ROUTED_ROWS
    flat = torch.empty(rows, dtype=torch.long, device="meta")
    order = torch.argsort(flat, stable=True)
    assert order.dtype == torch.int64 and (order // top_k).shape == (rows,)
    h = torch.empty(rows, 2 * inter, dtype=torch.bfloat16, device="meta")
    assert h.numel() < limit
