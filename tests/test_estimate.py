"""``qwen-sft estimate``: parameter counts from the real config, and bytes checked against a tiny model.

    python -m pytest -q tests/test_estimate.py
"""

from __future__ import annotations

import json

import pytest
import torch
from fixture_data import SPEC_CONFIG, need_fixture

from qwen_sft.model.tiny import TinySpec, build_tiny_model, tiny_config
from qwen_sft.moe import ExpertLoraSpec, install_expert_engine
from qwen_sft.moe.estimate import ModelShape, Options, estimate, lora_params, main, nf4_bytes, parameter_groups

REAL_CONFIG = SPEC_CONFIG  # the released config.json, checked in
SPEC = TinySpec(layers=2, hidden=64, experts=8, active=2, moe_intermediate=32)


@pytest.fixture(scope="module")
def real_shape() -> ModelShape:
    return ModelShape.from_config(json.loads(need_fixture(REAL_CONFIG).read_text()))


def test_real_config_parameter_counts(real_shape):
    est = estimate(real_shape, Options(mode="qlora"))
    assert est.params_total == 30_532_122_624  # 30.53 B, the published total
    assert est.params_experts == 28_991_029_248  # 28.99 B routed experts
    assert round(est.params_active / 1e9, 2) == 3.35
    assert sum(r[1] for r in est.rows if r[0].startswith("weights:")) == est.params_total
    experts = dict((r[0], r[3]) for r in est.rows)["weights: routed experts"]
    assert experts == 48 * (nf4_bytes(128 * 1536 * 2048) + nf4_bytes(128 * 2048 * 768))
    assert est.dequant_chunk == 2 * 32 * 3 * 768 * 2048  # 302 MB: 32 experts' bf16 weights at a time
    lora = dict((r[0], r[1]) for r in est.rows)["LoRA parameters"]
    assert lora == 48 * 8 * ((2048 + 4096) * 2 + 2 * (2048 + 512)) + 48 * 128 * 8 * (2048 + 1536 + 768 + 2048)


def test_cli_prints_breakdown_and_seed_table(capsys):
    need_fixture(REAL_CONFIG)
    assert main([str(REAL_CONFIG), "--mode", "qlora", "--seq", "2048"]) == 0
    out = capsys.readouterr().out
    assert "30,532,122,624 total (30.53 B)" in out and "28,991,029,248 (28.99 B, 95.0 %)" in out
    for line in ("weights: routed experts", "LoRA parameters", "gradients", "optimizer state",
                 "activations, gradient checkpointing", "activations, no checkpointing", "logits at the loss",
                 "total per GPU with gradient checkpointing", "30B-A3B  ~18GB | ~35GB | ~220GB"):
        assert line in out, line


def test_zero_sharding_and_offload(real_shape):
    one = estimate(real_shape, Options(mode="full"))
    z3 = estimate(real_shape, Options(mode="full", gpus=8, zero=3))
    z3o = estimate(real_shape, Options(mode="full", gpus=8, zero=3, offload=True))
    rows = lambda e: {r[0]: r[3] for r in e.rows}  # noqa: E731
    assert rows(z3)["gradients"] == -(-rows(one)["gradients"] // 8)
    assert rows(z3)["weights: routed experts"] == -(-rows(one)["weights: routed experts"] // 8)
    assert rows(z3o)["optimizer state (AdamW, fp32 master)"] == 0 and rows(z3o)["weights: routed experts"] == 0
    assert z3o.total(True) < z3.total(True) < one.total(True)


@pytest.mark.parametrize("argv,msg", [
    (["--offload"], "--offload needs --zero"),
    (["--seq", "0"], "--seq must be positive"),
])
def test_cli_rejects_bad_options(tmp_path, capsys, argv, msg):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(SPEC).to_dict()))
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_missing_config_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope")])
    assert "no config.json there" in capsys.readouterr().err


def _measured_groups(model) -> dict[str, int]:
    """Measured bytes per estimate component of a (possibly engine-converted) model."""
    out = dict.fromkeys(("embeddings", "lm_head", "attention (q/k/v/o)", "norms + routers", "routed experts"), 0)
    for name, p in model.named_parameters():
        b = p.numel() * p.element_size()
        if "embed_tokens" in name:
            out["embeddings"] += b
        elif name.startswith("lm_head"):
            out["lm_head"] += b
        elif any(f"self_attn.{k}_proj" in name for k in "qkvo"):
            out["attention (q/k/v/o)"] += b
        elif ".experts." in name and ".lora_" not in name:
            out["routed experts"] += b
        elif ".lora_" not in name:
            out["norms + routers"] += b
    return out


def test_estimate_matches_measured_tiny_model_bytes():
    shape = ModelShape.from_config(tiny_config(SPEC).to_dict())
    model = build_tiny_model(SPEC).to(torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == sum(sum(v) for v in parameter_groups(shape).values())
    lora_rows = {r[0].removeprefix("weights: "): r[3] for r in estimate(shape, Options(mode="lora")).rows}
    for name, measured in _measured_groups(model).items():
        assert lora_rows[name] == measured, name

    report = install_expert_engine(model, quantize_experts=True, double_quant=True,
                                   lora=ExpertLoraSpec(r=4, alpha=8), compute_dtype=torch.bfloat16)
    qrows = {r[0].removeprefix("weights: "): r[3] for r in estimate(shape, Options(mode="qlora", lora_r=4)).rows}
    measured = _measured_groups(model)
    assert qrows["routed experts"] == measured["routed experts"] == report.storage_bytes
    assert qrows["embeddings"] == measured["embeddings"]
    # LoRA count: the engine's expert factors + peft's q/k/v/o adapters at the same rank.
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                      "o_proj"]))
    attention = sum(p.numel() for n, p in peft_model.named_parameters() if "self_attn" in n and "lora_" in n)
    assert lora_params(shape, 4) == attention + report.lora_params


def test_dense_model_config_counts_match_published_size():
    """The seed table's 7B row: Qwen2.5-Coder-7B's config (dense, q/k/v biases) gives its 7.62 B parameters."""
    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 3584,
           "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "tie_word_embeddings": False}
    shape = ModelShape.from_config(cfg)
    est = estimate(shape, Options(mode="lora"))
    assert est.params_total == 7_615_616_512 and est.params_experts == 0
    from transformers import Qwen2Config, Qwen2ForCausalLM

    small = {**cfg, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in small.items() if k not in ("model_type", "architectures")}))
    assert sum(p.numel() for p in model.parameters()) == estimate(ModelShape.from_config(small), Options()).params_total
