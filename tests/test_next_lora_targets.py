"""qwen3_next adapter targets: naming the shared expert's Linears by path (``shared_expert.gate_proj``) gives
attention + shared-expert LoRA without routed-expert LoRA (the 48 GB recipe of bench/next_rehearsal.py), and the
bare names keep meaning shared + routed experts.

    python -m pytest -q tests/test_next_lora_targets.py
"""

from __future__ import annotations

import json

import torch

from qwen_sft.train.args import ModelArguments
from qwen_sft.train.model import expert_lora_spec

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj"]


def _args(tmp_path, targets: list[str]) -> ModelArguments:
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": targets}))
    return ModelArguments(model_name_or_path="unused", use_peft=True, peft_config_path=str(path))


def test_shared_expert_paths_are_not_routed_expert_targets(tmp_path):
    shared = [f"shared_expert.{n}" for n in ("gate_proj", "up_proj", "down_proj")] + ["shared_expert_gate"]
    assert expert_lora_spec(_args(tmp_path, ATTN + shared)) is None
    spec = expert_lora_spec(_args(tmp_path, ATTN + ["gate_proj", "up_proj", "down_proj"]))
    assert spec is not None and spec.r == 8 and spec.gate_up_r == 16


def test_attention_and_shared_expert_lora_leave_the_engine_without_factors(tmp_path):
    """The tiny model through the training code's own build: shared expert and its gate get peft LoRA, the
    routed experts none, so only attention, DeltaNet and shared-expert parameters train."""
    from qwen_sft.model.tiny import TinySpec, build_tiny_model
    from qwen_sft.moe import install_expert_engine
    from qwen_sft.train.model import apply_lora

    args = _args(tmp_path, ATTN + [f"shared_expert.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
                 + ["shared_expert_gate"])
    model = build_tiny_model(TinySpec(model_type="qwen3_next", layers=4, experts=16, active=10))
    report = install_expert_engine(model, quantize_experts=False, lora=expert_lora_spec(args),
                                   compute_dtype=torch.float32)
    assert report.lora_params == 0
    peft_model, info = apply_lora(model, args, gradient_checkpointing=False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert not any(".mlp.experts." in n for n in trainable)
    for part in ("layers.0.mlp.shared_expert.gate_proj.lora_A", "layers.0.mlp.shared_expert_gate.lora_B",
                 "layers.1.self_attn.q_proj.lora_A", "layers.0.linear_attn.in_proj_qkvz.lora_A"):
        assert any(part in n for n in trainable), part
    # LoRA on the 1-row gate is a real LoRA: B [1, r], and it changes the output once B moves
    gate = peft_model.base_model.model.model.layers[0].mlp.shared_expert_gate
    assert tuple(gate.lora_B["default"].weight.shape) == (1, 8)
    ids = torch.tensor([[151644, 872, 198, 14990, 151645]])
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
        gate.lora_B["default"].weight.fill_(0.5)
        assert not torch.allclose(peft_model(input_ids=ids).logits, before)
