"""``qwen-sft export-adapter --format vllm``: the per-expert adapter, loaded by stock peft onto a per-expert
reference model (each expert its own ``nn.Linear``s, the layout vLLM serves), gives the logits of the training-time
model (expert engine + attention LoRA) and of the ``qwen-sft merge`` result.

    python -m pytest -q tests/test_export_adapter.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import PerExpertExperts

from qwen_sft.export.vllm_adapter import ExportError, export_vllm_adapter
from qwen_sft.export.vllm_adapter import main as export_main
from qwen_sft.model.tiny import TinySpec, make_tiny_model
from qwen_sft.model.tiny_adapter import random_adapter
from qwen_sft.moe import ExpertLoraSpec

SPEC = TinySpec(layers=2, hidden=64, experts=8, active=2, moe_intermediate=32)
IDS = torch.randint(0, 5000, (2, 12), generator=torch.Generator().manual_seed(0))


def per_expert_model(checkpoint: Path):
    """transformers' Qwen3-MoE with per-expert experts, weights loaded strictly from the per-expert checkpoint."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen3MoeForCausalLM

    config = AutoConfig.from_pretrained(checkpoint)
    model = Qwen3MoeForCausalLM(config)
    for layer in model.model.layers:
        layer.mlp.experts = PerExpertExperts(config)
    state = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(f))
    model.load_state_dict(state, strict=True)  # every key, per expert, no fusing
    # peft >= 0.21 on transformers 5 rewrites per-expert LoRA targets of a "qwen3_moe" model into fused
    # target_parameters (its v4 -> v5 conversion); this model keeps v4's per-expert modules, so it must not.
    model.config.model_type = "qwen3_moe_per_expert"
    return model.float().eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("export") / "base", SPEC, dtype="float32")


def _trained_adapter(base: Path, out: Path, expert: ExpertLoraSpec, attn_r: int, attn_alpha: float):
    """Training-time model (expert engine + peft attention LoRA) with non-zero B; its logits and saved adapter."""
    model, adapter = random_adapter(base, out, expert, attn_r, attn_alpha)
    return _logits(model), adapter


# (expert spec, attention r, attention alpha, exported r, exported alpha, scales folded into B)
CASES = {
    # the seed config's shape: gate_up at 2r / 2·alpha, everything at scale 2 -> r = 2r, alpha = 2·(2r), no folding
    "seed": (ExpertLoraSpec(r=4, alpha=8, gate_up_r=8, gate_up_alpha=16), 4, 8, 8, 16.0, False),
    # scales differ (2, 1, 1.5): lora_alpha = r and each B carries its own scale
    "mixed": (ExpertLoraSpec(r=4, alpha=4, gate_up_r=8, gate_up_alpha=16), 2, 3, 8, 8.0, True),
}


@pytest.mark.slow  # three tiny-model loads + a merge per case, ~25 s on 2 cores
@pytest.mark.parametrize("case", list(CASES))
def test_exported_adapter_on_per_expert_model_equals_training_and_merge(base, tmp_path, case):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qwen_sft.merge.cli import main as merge_main

    spec, attn_r, attn_alpha, want_r, want_alpha, folded = CASES[case]
    ours, adapter = _trained_adapter(base, tmp_path / "adapter", spec, attn_r, attn_alpha)
    out = tmp_path / "vllm"
    assert export_main([str(adapter), str(out), "--format", "vllm"]) == 0

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (want_r, want_alpha, {}, {})
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "q_proj", "up_proj", "v_proj"]
    assert not cfg.get("target_parameters") and not cfg["use_rslora"]
    assert json.loads((out / "qwen_sft_export.json").read_text())["scales_folded_into_B"] is folded
    with safe_open(out / "adapter_model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    H, inter = SPEC.hidden, SPEC.moe_intermediate
    assert len(keys) == SPEC.layers * (SPEC.experts * 3 + 2) * 2
    p = "base_model.model.model.layers.1.mlp.experts.7"
    assert shapes[f"{p}.gate_proj.lora_A.weight"] == (want_r, H) and shapes[f"{p}.gate_proj.lora_B.weight"] == (inter, want_r)
    assert shapes[f"{p}.up_proj.lora_B.weight"] == (inter, want_r)
    assert shapes[f"{p}.down_proj.lora_A.weight"] == (want_r, inter) and shapes[f"{p}.down_proj.lora_B.weight"] == (H, want_r)
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (want_r, H)

    ref_base = per_expert_model(base)
    unchanged = _logits(ref_base)
    served = PeftModel.from_pretrained(ref_base, out).eval()
    n_lora = sum(1 for n, m in served.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))
                 and hasattr(m, "lora_A"))
    assert n_lora == SPEC.layers * SPEC.experts * 3  # peft put LoRA on every expert projection
    assert (ours - unchanged).abs().max() > 1e-2  # the adapter changes the model ...
    torch.testing.assert_close(_logits(served), ours, rtol=1e-4, atol=1e-4)  # ... and the export carries all of it

    # A second consumer: stock transformers 5 (fused experts) + peft, whose v4 -> v5 conversion re-fuses the
    # per-expert pairs (gate and up A stacked: rank 2R).
    stock = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(stock, out).eval()), ours, rtol=1e-4, atol=1e-4)

    merged = tmp_path / "merged"
    assert merge_main(["--base_model_path", str(base), "--adapter_path", str(adapter), "--output_path", str(merged),
                       "--dtype", "float32", "--no_verify"]) == 0
    torch.testing.assert_close(_logits(per_expert_model(merged)), ours, rtol=1e-4, atol=1e-4)


def _fake_adapter(path: Path, r: int = 2, E: int = 4, H: int = 8, inter: int = 4, **cfg_over) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"], "bias": "none",
           "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], **cfg_over}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    m = "base_model.model.model.layers.0"
    t = {f"{m}.self_attn.q_proj.lora_A.weight": torch.randn(r, H, generator=g),
         f"{m}.self_attn.q_proj.lora_B.weight": torch.randn(H, r, generator=g),
         f"{m}.mlp.experts.base_layer.lora_A.weight": torch.randn(E * r, H, generator=g),
         f"{m}.mlp.experts.base_layer.lora_B.weight": torch.randn(2 * inter, r * E, generator=g),
         f"{m}.mlp.experts.lora_A.weight": torch.randn(E * r, inter, generator=g),
         f"{m}.mlp.experts.lora_B.weight": torch.randn(H, r * E, generator=g)}
    save_file(t, path / "adapter_model.safetensors")
    return path


def test_per_expert_factors_reproduce_each_fused_delta(tmp_path):
    """ΔW of every exported (expert, projection) equals the fused ΔW's rows, computed as peft does."""
    from peft.tuners.lora.layer import ParamWrapper  # noqa: F401  (the layout's reference; see qwen_sft/moe/lora.py)
    from safetensors.torch import load_file

    from qwen_sft.merge.plan import expert_factors

    src = _fake_adapter(tmp_path / "a", r=2, E=4, H=8, inter=4)
    report = export_vllm_adapter(src, tmp_path / "out")
    assert (report.rank, report.num_experts, report.lora_alpha, report.scales_folded) == (2, 4, 4.0, False)
    t_in, t_out = load_file(src / "adapter_model.safetensors"), load_file(tmp_path / "out" / "adapter_model.safetensors")
    m = "base_model.model.model.layers.0.mlp.experts"
    A, B = expert_factors(t_in[f"{m}.base_layer.lora_A.weight"], t_in[f"{m}.base_layer.lora_B.weight"], 4)
    for e in range(4):
        fused = B[e] @ A[e]  # [2I, H], gate rows then up rows
        gate = t_out[f"{m}.{e}.gate_proj.lora_B.weight"] @ t_out[f"{m}.{e}.gate_proj.lora_A.weight"]
        up = t_out[f"{m}.{e}.up_proj.lora_B.weight"] @ t_out[f"{m}.{e}.up_proj.lora_A.weight"]
        torch.testing.assert_close(torch.cat([gate, up]), fused)


def test_rank_mismatch_is_refused_and_nothing_written(tmp_path):
    src = _fake_adapter(tmp_path / "a", r=2, E=4, rank_pattern={"gate_up_proj": 3})
    with pytest.raises(ExportError, match=r"gate_up_proj: lora_A \(8, 8\).*rank-3"):
        export_vllm_adapter(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert export_main([str(src), str(tmp_path / "out")]) == 1
