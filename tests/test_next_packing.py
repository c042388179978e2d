"""Packing and qwen3_next: Gated DeltaNet layers carry state across a packed row on transformers' torch
fallback, so training pads instead (resolve_packing); right-padding is exact.

    python -m pytest -q tests/test_next_packing.py
"""

from __future__ import annotations

import pytest
import torch

from qwen_sft.model.tiny import TinySpec, build_tiny_model
from qwen_sft.train.collate import make_collator
from qwen_sft.train.model import linear_attention_layers, resolve_packing

SPEC = TinySpec(model_type="qwen3_next", layers=4, experts=16, active=10, full_attention_interval=2)
A = [151644, 872, 198, 14990, 1879, 151645, 198, 151644, 77091, 198, 9707, 151645]
B = [151644, 872, 198, 1350, 3838, 220, 17, 151645]


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(SPEC).float().eval()


def _alone(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def test_packed_row_leaks_state_into_the_next_sample(model):
    """Why packing is off: with position_ids restarting, attention layers see each sample alone, but the
    linear-attention layers do not — sample B's logits in the packed row differ from B alone."""
    batch = make_collator(True, 151643)([{"input_ids": A, "labels": A}, {"input_ids": B, "labels": B}])
    assert batch["position_ids"].tolist() == [list(range(len(A))) + list(range(len(B)))]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(packed[: len(A)], _alone(model, A))  # the first sample is unaffected
    leak = (packed[len(A):] - _alone(model, B)).abs().max().item()
    assert leak > 1e-3, f"packed == unpacked on the fallback ({leak=}); packing could be re-enabled for qwen3_next"


def test_padded_batch_equals_each_sample_alone(model):
    """What training does instead: right-padding with attention_mask (pad states are zeroed and come last)."""
    batch = make_collator(False, 151643)([{"input_ids": A, "labels": A}, {"input_ids": B, "labels": B}])
    assert batch["attention_mask"][1].tolist() == [1] * len(B) + [0] * (len(A) - len(B))
    with torch.no_grad():
        padded = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, use_cache=False).logits
    torch.testing.assert_close(padded[0], _alone(model, A), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded[1, : len(B)], _alone(model, B), rtol=1e-4, atol=1e-5)


def test_resolve_packing_turns_it_off_for_linear_attention_only(model, capsys):
    from qwen_sft.model.tiny import tiny_config

    assert linear_attention_layers(model.config) == [0, 2]
    assert resolve_packing(model.config, True) is False
    assert "packing=False (was True): qwen3_next has 2 linear-attention" in capsys.readouterr().out
    assert resolve_packing(model.config, False) is False
    moe = tiny_config(TinySpec())
    assert linear_attention_layers(moe) == [] and resolve_packing(moe, True) is True
    assert capsys.readouterr().out == ""
