"""Export of qwen3_next (Qwen3-Coder-Next): GGUF is refused before anything is written, with the reason naming
what is missing (the qwen3next tensor mapping), not the qwen3moe checks that do not apply to it.

    python -m pytest -q tests/test_next_export.py
"""

from __future__ import annotations

import pytest
import torch
from helpers import PerExpertExperts

pytest.importorskip("gguf")

from qwen_sft.export.gguf_export import GGUFExportError, export_gguf  # noqa: E402
from qwen_sft.export.gguf_export import main as gguf_main  # noqa: E402
from qwen_sft.model.tiny import TinySpec, make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    spec = TinySpec(model_type="qwen3_next", layers=4, experts=16, active=10)
    return make_tiny_model(tmp_path_factory.mktemp("next-gguf") / "merged", spec, dtype="bfloat16")


def test_gguf_refuses_qwen3_next_naming_what_is_missing(next_dir, tmp_path, capsys):
    import gguf

    out = tmp_path / "next.gguf"
    with pytest.raises(GGUFExportError) as err:
        export_gguf(next_dir, out, progress=False)
    msg = str(err.value)
    assert "model_type='qwen3_next' (Qwen3-Coder-Next) is not exported" in msg
    for missing in ("Gated DeltaNet", "ssm_*", "shared expert", "ffn_*_shexp", "llama.cpp's logits"):
        assert missing in msg, missing
    # what the installed gguf knows is stated, not assumed
    knows = any(a.name == "QWEN3NEXT" for a in gguf.MODEL_ARCH)
    assert ("do define a qwen3next architecture" in msg) == knows
    assert "qwen2moe" not in msg and "mlp_only_layers" not in msg  # the qwen3moe-only checks do not apply
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file
    assert gguf_main([str(next_dir), str(out)]) == 1
    assert "Gated DeltaNet" in capsys.readouterr().err


def _per_expert_model(checkpoint):
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen3NextForCausalLM

    config = AutoConfig.from_pretrained(checkpoint)
    model = Qwen3NextForCausalLM(config)
    for layer in model.model.layers:
        layer.mlp.experts = PerExpertExperts(config)
    model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=True)  # per expert, no fusing
    model.config.model_type = "qwen3_next_per_expert"  # keep peft's v4 -> v5 expert rename away (see test_export_adapter)
    return model.float().eval()


@pytest.mark.slow  # tiny-model loads and a per-expert forward, ~30 s on a shared CPU
def test_vllm_adapter_of_qwen3_next_carries_every_delta(tmp_path):
    """export-adapter --format vllm on a qwen3_next adapter (expert engine + peft LoRA on attention, Gated DeltaNet,
    shared expert and its gate): stock peft on the per-expert model gives the training-time logits."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_sft.export.vllm_adapter import export_vllm_adapter
    from qwen_sft.moe import ExpertLoraSpec, enable_expert_lora, install_expert_engine, save_adapter
    from qwen_sft.moe.peft_targets import peft_targets_as_named

    spec = TinySpec(model_type="qwen3_next", layers=4, experts=16, active=10)
    base = make_tiny_model(tmp_path / "base", spec, dtype="float32")
    ids = torch.randint(0, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    install_expert_engine(model, quantize_experts=False, lora=ExpertLoraSpec(r=8, alpha=16, gate_up_r=16, gate_up_alpha=32),
                          compute_dtype=torch.float32)
    targets = ["q_proj", "v_proj", "in_proj_qkvz", "out_proj", "shared_expert.gate_proj", "shared_expert.down_proj",
               "shared_expert_gate"]
    with peft_targets_as_named(model):
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    enable_expert_lora(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: non-zero B everywhere
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or name.endswith("_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()  # the ranks a training run gives (qwen_sft/train/model.py::lora_settings): r 8, fused gate_up 16
    with torch.no_grad():
        ours = model(input_ids=ids, use_cache=False).logits
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    out = tmp_path / "vllm"
    report = export_vllm_adapter(adapter, out)
    assert report.expert_layers == spec.layers and report.num_experts == spec.experts and report.rank == 16
    ref = _per_expert_model(base)
    with torch.no_grad():
        unchanged = ref(input_ids=ids, use_cache=False).logits
    with peft_targets_as_named(ref):
        served = PeftModel.from_pretrained(ref, out).eval()
    with torch.no_grad():
        got = served(input_ids=ids, use_cache=False).logits
    assert (ours - unchanged).abs().max() > 1e-2
    torch.testing.assert_close(got, ours, rtol=1e-4, atol=1e-4)
