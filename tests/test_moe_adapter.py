"""Whole-model tests: peft-layout adapters load on a stock model with the same logits; QLoRA storage;
packed rows; gradient checkpointing; trainable groups.

    python -m pytest -q tests/test_moe_adapter.py
"""

from __future__ import annotations

import json

import pytest
import torch

from qwen_sft.model.tiny import TinySpec, build_tiny_model
from qwen_sft.moe import (
    ExpertLoraSpec,
    enable_expert_lora,
    expert_state_dict,
    install_expert_engine,
    load_expert_adapter,
    save_adapter,
    trainable_parameter_groups,
)
from qwen_sft.moe.lora import expert_engines

SPEC = TinySpec(layers=2, hidden=64, experts=8, active=2, moe_intermediate=32)
IDS = torch.randint(0, 5000, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / "base"
    build_tiny_model(SPEC).save_pretrained(path)  # fp32 on disk
    return path


def _load_stock(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def _randomize_lora_B(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ("lora_" in name and name.endswith("_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _logits(model, ids=IDS, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kw).logits


@pytest.mark.parametrize("quantize,with_attention", [(False, False), (True, True)])
def test_adapter_loads_on_stock_peft_with_same_logits(base_dir, tmp_path, quantize, with_attention):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = _load_stock(base_dir)
    report = install_expert_engine(model, quantize_experts=quantize, lora=ExpertLoraSpec(r=4, alpha=8),
                                   compute_dtype=torch.float32)
    assert report.layers == SPEC.layers
    if with_attention:  # documented order: engine first, then peft for attention
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.05))
    _randomize_lora_B(model)
    model.eval()
    ours = _logits(model)
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert cfg["lora_dropout"] == 0.0 and cfg["r"] == 4
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight" in keys
    assert len([k for k in keys if ".experts." in k]) == 4 * SPEC.layers
    assert len([k for k in keys if "self_attn" in k]) == (4 * SPEC.layers if with_attention else 0)

    stock = _load_stock(base_dir)
    if quantize:  # the reference base is the dequantized NF4 weights
        engines = expert_engines(model)
        with torch.no_grad():
            for i, layer in enumerate(stock.model.layers):
                eng = engines[f"model.layers.{i}.mlp.experts"]
                layer.mlp.experts.gate_up_proj.copy_(eng.gate_up_base.dequantize(None, torch.float32))
                layer.mlp.experts.down_proj.copy_(eng.down_base.dequantize(None, torch.float32))
    base_logits = _logits(stock)
    peft_model = PeftModel.from_pretrained(stock, out).eval()
    theirs = _logits(peft_model)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter changes the model ...
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # ... exactly as peft's dense path does

    # And our loader puts the same factors back into a fresh engine.
    fresh = _load_stock(base_dir)
    install_expert_engine(fresh, quantize_experts=quantize, lora=None, compute_dtype=torch.float32)
    assert load_expert_adapter(fresh, out) == SPEC.layers
    ref_sd = expert_state_dict(model)
    for k, v in expert_state_dict(fresh).items():
        assert torch.equal(v, ref_sd[k]), k


def test_expert_ranks_differing_from_attention_go_to_rank_pattern(base_dir, tmp_path):
    """Seed configs name gate_proj + up_proj at rank r: the fused gate_up gets 2r, 2*alpha (peft's rewrite)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = _load_stock(base_dir)
    spec = ExpertLoraSpec.from_lora_config({"r": 4, "lora_alpha": 8, "rank_pattern": {"gate_up_proj": 8},
                                            "alpha_pattern": {"gate_up_proj": 16}})
    assert (spec.r, spec.alpha, spec.gate_up_r, spec.gate_up_alpha) == (4, 8.0, 8, 16.0)
    install_expert_engine(model, quantize_experts=False, lora=spec, compute_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"]))
    _randomize_lora_B(model)
    model.eval()
    out = save_adapter(model, tmp_path / "a")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"gate_up_proj": 8, "down_proj": 4}
    assert cfg["alpha_pattern"] == {"gate_up_proj": 16.0, "down_proj": 8.0}
    theirs = _logits(PeftModel.from_pretrained(_load_stock(base_dir), out).eval())
    torch.testing.assert_close(_logits(model), theirs, rtol=1e-4, atol=1e-4)
    fresh = _load_stock(base_dir)
    install_expert_engine(fresh, quantize_experts=False, lora=None, compute_dtype=torch.float32)
    load_expert_adapter(fresh, out)
    eng = next(iter(expert_engines(fresh).values()))
    assert eng.lora_rank == {"gate_up": 8, "down": 4} and eng.lora_scaling == {"gate_up": 2.0, "down": 2.0}


def test_qlora_storage_trainable_groups_and_one_step(base_dir):
    from peft import LoraConfig, get_peft_model

    model = _load_stock(base_dir).to(torch.bfloat16)
    report = install_expert_engine(model, quantize_experts=True, double_quant=True,
                                   lora=ExpertLoraSpec(r=4, alpha=8), compute_dtype=torch.bfloat16)
    n = SPEC.layers * SPEC.experts * 3 * SPEC.moe_intermediate * SPEC.hidden
    assert report.expert_weights == n
    # 0.5 byte/weight + uint8 scale per 64 weights + fp32 per 256 scales + code/offset constants.
    per_param = [(SPEC.experts * 2 * 32 * 64), (SPEC.experts * 64 * 32)]
    expected = SPEC.layers * sum(w // 2 + w // 64 + -(-(w // 64) // 256) * 4 + 4 + 256 * 4 for w in per_param)
    assert report.storage_bytes == expected
    assert 0.5 < report.bytes_per_weight < 0.56  # 0.5577 here: 4 bits + scales + 1028 bytes of constants per tensor
    packed_bytes = sum(p.numel() for n_, p in model.named_parameters() if n_.endswith(".packed"))
    assert packed_bytes * 2 == n  # exactly 4 bits per expert weight
    assert not any("gate_up_proj" in n_ or "down_proj" in n_ for n_, _ in model.named_parameters())

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainable_parameter_groups(model)["expert_lora"] == 0  # get_peft_model froze them ...
    assert enable_expert_lora(model) == report.lora_params  # ... and this is the documented fix
    groups = trainable_parameter_groups(model)
    assert groups["expert_lora"] == report.lora_params == SPEC.layers * SPEC.experts * 4 * (64 + 64 + 64 + 32)
    assert groups["attention_lora"] > 0 and groups["other"] == 0

    before = {n_: p.detach().clone() for n_, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(input_ids=IDS, labels=IDS, use_cache=False).loss
    loss.backward()
    opt.step()
    changed = {n_ for n_, p in model.named_parameters() if not torch.equal(p, before[n_])}
    assert any(".experts.lora_gate_up_A" in c for c in changed) and any(".experts.lora_down_B" in c for c in changed)
    assert not any(c.endswith((".packed", ".absmax")) for c in changed)


def test_packed_rows_match_separate_samples(base_dir):
    model = _load_stock(base_dir)
    install_expert_engine(model, quantize_experts=True, lora=ExpertLoraSpec(r=4, alpha=8), compute_dtype=torch.float32)
    _randomize_lora_B(model)
    a, b = IDS[0, :6], IDS[1, :5]
    packed = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(6), torch.arange(5)])[None]
    got = _logits(model, packed, position_ids=pos)[0]
    torch.testing.assert_close(got[:6], _logits(model, a[None])[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[6:], _logits(model, b[None])[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_grads(base_dir, reentrant):
    grads = []
    for gc in (False, True):
        model = _load_stock(base_dir)
        install_expert_engine(model, quantize_experts=True, lora=ExpertLoraSpec(r=4, alpha=8),
                              compute_dtype=torch.float32)
        _randomize_lora_B(model)
        model.train()
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if ".experts.lora_" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * SPEC.layers
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-6)
