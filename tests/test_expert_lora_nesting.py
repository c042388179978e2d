"""One rule for which fused expert parameter a nested peft LoRA pair adapts, and every reader follows it.

    python -m pytest -q tests/test_expert_lora_nesting.py

peft saves the LoRA of ``target_parameters=[…gate_up_proj, …down_proj]`` as two pairs on the same module,
``mlp.experts.base_layer.lora_*`` and ``mlp.experts.lora_*``; which is which is qwen_sft/model/checkpoint.py's
``expert_lora_param``. Here peft itself writes adapters with the targets listed in both orders (and only one of
them), and the merge plan, the vLLM export and the expert engine's loader must each give back exactly peft's own
``ParamWrapper.get_delta_weight`` for every expert: one of them reading the nesting differently fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen_sft.model.checkpoint import EXPERT_TARGET_PARAMETERS, EXPERTS, FUSED_EXPERT_PARAMS, expert_lora_param
from qwen_sft.model.tiny import TinySpec, make_tiny_model

# hidden 64, moe_intermediate 24: gate_up's (in, out) = (64, 48) and down's = (24, 64) cannot be mistaken
SPEC = TinySpec(layers=1, hidden=64, heads=4, kv_heads=2, head_dim=16, experts=4, active=2, moe_intermediate=24)
MODULE = f"model.layers.0.{EXPERTS}"
ORDERS = {
    "declared": EXPERT_TARGET_PARAMETERS,
    "reversed": EXPERT_TARGET_PARAMETERS[::-1],  # what sorted() gives: train/model.py's peft path writes this
    "bare-names": list(FUSED_EXPERT_PARAMS[::-1]),
    "down-only": [f"{EXPERTS}.down_proj"],
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("nesting") / "base", SPEC, dtype="float32")


def _peft_adapter(base: Path, out: Path, targets: list[str]) -> dict[str, torch.Tensor]:
    """peft's own adapter for ``targets`` (random non-zero B) saved to ``out``; {param: peft's ΔW [E, out, in]},
    read off the ParamWrapper chain (so the truth is where peft put each parameter, not our rule)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    wrapper, chain = model.base_model.model.model.layers[0].mlp.experts, []
    while type(wrapper).__name__ == "ParamWrapper":
        chain.append((wrapper.parameter_name, wrapper.get_delta_weight("default").detach()))
        wrapper = wrapper.base_layer
    assert [expert_lora_param(MODULE, depth, targets) for depth in range(len(chain))] == [p for p, _ in chain]
    return dict(chain)


def _merge_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from qwen_sft.merge.adapter import read_adapter
    from qwen_sft.merge.plan import plan_merge, read_base

    plan = plan_merge(read_adapter(adapter), read_base(base))
    out = {}
    for param, projs in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
        if f"{MODULE}.0.{projs[0]}.weight" in plan:
            out[param] = torch.stack([torch.cat([plan[f"{MODULE}.{e}.{p}.weight"].compute() for p in projs])
                                      for e in range(SPEC.experts)])
    return out


def _vllm_deltas(adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from qwen_sft.export.vllm_adapter import export_vllm_adapter

    report = export_vllm_adapter(adapter, out)
    t, scale = load_file(out / "adapter_model.safetensors"), report.lora_alpha / report.rank

    def delta(e: int, proj: str) -> torch.Tensor:
        key = f"base_model.model.{MODULE}.{e}.{proj}"
        return t[f"{key}.lora_B.weight"] @ t[f"{key}.lora_A.weight"] * scale

    return {"gate_up_proj": torch.stack([torch.cat([delta(e, "gate_proj"), delta(e, "up_proj")])
                                         for e in range(SPEC.experts)]),
            "down_proj": torch.stack([delta(e, "down_proj") for e in range(SPEC.experts)])}


def _engine_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from qwen_sft.moe import install_expert_engine, load_expert_adapter
    from qwen_sft.moe.lora import expert_engines

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    install_expert_engine(model, quantize_experts=False, compute_dtype=torch.float32)
    assert load_expert_adapter(model, adapter) == SPEC.layers
    eng = expert_engines(model)[MODULE]
    return {f"{name}_proj": eng.lora_scaling[name] * getattr(eng, f"lora_{name}_B") @ getattr(eng, f"lora_{name}_A")
            for name in ("gate_up", "down")}


def test_the_declared_order_is_transformers_own():
    """peft nests in the experts module's declaration order; FUSED_EXPERT_PARAMS must be that order."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextExperts

    from qwen_sft.model.tiny import tiny_config

    for cls, model_type in ((Qwen3MoeExperts, "qwen3_moe"), (Qwen3NextExperts, "qwen3_next")):
        config = tiny_config(TinySpec(model_type=model_type))
        declared = [n for n, _ in cls(config).named_parameters(recurse=False) if n in FUSED_EXPERT_PARAMS]
        assert tuple(declared) == FUSED_EXPERT_PARAMS, cls.__name__


@pytest.mark.parametrize("order", list(ORDERS))
def test_merge_export_and_loader_read_peft_nesting_alike(base, tmp_path, order):
    targets = ORDERS[order]
    truth = _peft_adapter(base, tmp_path / "adapter", targets)
    assert set(truth) == {t.rsplit(".", 1)[-1] for t in targets}
    readers = {"merge": _merge_deltas(base, tmp_path / "adapter")}
    if len(truth) == 2:  # the vLLM export and the expert engine need LoRA on both fused parameters
        readers["vllm export"] = _vllm_deltas(tmp_path / "adapter", tmp_path / "vllm")
        readers["engine loader"] = _engine_deltas(base, tmp_path / "adapter")
    for reader, deltas in readers.items():
        assert set(deltas) == set(truth), reader
        for param, want in truth.items():
            assert want.abs().max() > 0.1
            torch.testing.assert_close(deltas[param], want, rtol=1e-5, atol=1e-6, msg=f"{reader}: {param}")


def test_a_pair_shaped_against_its_nesting_is_refused(base, tmp_path):
    """Shapes cross-check the nesting and never decide: swapped pairs are named, not silently re-assigned."""
    from safetensors.torch import load_file, save_file

    from qwen_sft.export.vllm_adapter import ExportError, export_vllm_adapter
    from qwen_sft.merge.adapter import MergeError, read_adapter
    from qwen_sft.merge.plan import plan_merge, read_base

    adapter = tmp_path / "adapter"
    _peft_adapter(base, adapter, EXPERT_TARGET_PARAMETERS)
    t = load_file(adapter / "adapter_model.safetensors")
    inner, outer = f"base_model.model.{MODULE}.base_layer.lora_", f"base_model.model.{MODULE}.lora_"
    for which in ("A", "B"):
        t[f"{inner}{which}.weight"], t[f"{outer}{which}.weight"] = t[f"{outer}{which}.weight"], t[f"{inner}{which}.weight"]
    save_file(t, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"adapts gate_up_proj by peft's nesting .* shaped for down_proj"):
        plan_merge(read_adapter(adapter), read_base(base))
    with pytest.raises(ExportError, match="do not describe experts of one hidden / intermediate size"):
        export_vllm_adapter(adapter, tmp_path / "vllm")
