"""qwen3_next in `qwen-sft estimate` and the shipped real-size config (configs/models/).

    python -m pytest -q tests/test_next_estimate.py
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from qwen_sft.model.tiny import TinySpec, build_tiny_model, tiny_config
from qwen_sft.moe import ExpertLoraSpec, install_expert_engine
from qwen_sft.moe.estimate import ModelShape, Options, estimate, lora_params, parameter_groups

REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = sorted((REPO / "configs" / "models").rglob("*.json"))
SPEC = TinySpec(model_type="qwen3_next", layers=4, experts=16, active=10, full_attention_interval=2)
NEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj",
                "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]


def test_found_the_shipped_model_configs():
    assert len(MODEL_CONFIGS) > 0


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.name)
def test_model_config_loads_in_transformers_with_its_source(path):
    from transformers import AutoConfig

    raw = json.loads(path.read_text())
    assert raw["_source"]
    cfg = AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_")})
    assert type(cfg).__name__ == "Qwen3NextConfig"
    # ../shared/spec/README.md "Qwen3-Coder-Next": 48 layers = 12 x (3 Gated DeltaNet + 1 gated attention)
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == list(range(3, 48, 4))
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (512, 10, 512)
    assert (cfg.shared_expert_intermediate_size, cfg.hidden_size, cfg.vocab_size) == (512, 2048, 151_936)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (16, 2, 256)
    assert (cfg.linear_num_value_heads, cfg.linear_num_key_heads, cfg.linear_key_head_dim) == (32, 16, 128)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25
    shape = ModelShape.from_config(raw)
    groups = parameter_groups(shape)
    # routed experts 48 x 512 x 3 x 2048 x 512 (spec: ~77.3 B); ~80 B in all ("80B-A3B")
    assert sum(groups["routed experts"]) == 48 * 512 * 3 * 2048 * 512
    assert 79e9 < sum(sum(v) for v in groups.values()) < 81e9


def test_estimate_counts_equal_the_tiny_next_model():
    shape = ModelShape.from_config(tiny_config(SPEC).to_dict())
    assert (shape.linear_layers, shape.attention_layers, shape.shared_intermediate) == (2, 2, SPEC.shared_intermediate)
    model = build_tiny_model(SPEC)
    groups = parameter_groups(shape)
    assert sum(p.numel() for p in model.parameters()) == sum(sum(v) for v in groups.values())
    linear = sum(p.numel() for n, p in model.named_parameters() if ".linear_attn.in_proj" in n or
                 ".linear_attn.out_proj" in n)
    assert sum(groups["linear attention (Gated DeltaNet)"]) == linear
    assert sum(groups["shared expert"]) == sum(p.numel() for n, p in model.named_parameters()
                                               if ".shared_expert." in n)
    # LoRA count: the engine's expert factors + peft on attention, Gated DeltaNet and the shared expert.
    from peft import LoraConfig, get_peft_model

    from qwen_sft.moe.peft_targets import peft_targets_as_named

    report = install_expert_engine(model, quantize_experts=False, lora=ExpertLoraSpec(r=4, alpha=8),
                                   compute_dtype=torch.float32)
    with peft_targets_as_named(model):
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=NEXT_TARGETS))
    adapters = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n and ".experts." not in n)
    assert any(".shared_expert.gate_proj.lora_A" in n for n, _ in peft_model.named_parameters())
    assert lora_params(shape, 4) == adapters + report.lora_params
    rows = {r[0]: r[2] for r in estimate(shape, Options(mode="qlora", lora_r=4)).rows}
    assert rows["weights: shared expert"] == rows["weights: linear attention (Gated DeltaNet)"] == "nf4"


def test_peft_alone_would_drop_the_shared_expert_lora():
    """Why peft_targets_as_named exists: peft 0.21's v4->v5 MoE rename turns shared_expert.gate_proj into the
    fused routed-expert parameter on qwen3_next, so the shared expert gets no adapter."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(SPEC)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft says the fused rank pattern matched nothing
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "shared_expert.gate_proj",
                                                                         "shared_expert.up_proj"]))
    names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert not any(".shared_expert." in n for n in names)
