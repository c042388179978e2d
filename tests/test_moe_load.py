"""load_moe_model: checkpoint -> expert engine layer by layer, identical to from_pretrained + install.

    python -m pytest -q tests/test_moe_load.py
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from qwen_sft.model.tiny import TinySpec, make_tiny_model
from qwen_sft.moe import install_expert_engine, load_moe_model
from qwen_sft.moe import load as load_mod

IDS = torch.randint(0, 5000, (1, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 3 layers, per-expert tensors on disk (the released checkpoints' layout), bf16
    return make_tiny_model(tmp_path_factory.mktemp("load") / "m", TinySpec(layers=3))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def test_same_model_as_from_pretrained_then_install(model_dir):
    from transformers import AutoModelForCausalLM

    ours, report = load_moe_model(model_dir, device="cpu", compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ref_report = install_expert_engine(ref, quantize_experts=True, compute_dtype=torch.float32)
    assert report.layers == 3 and report.storage_bytes == ref_report.storage_bytes
    assert torch.equal(_logits(ours), _logits(ref))
    ref_sd = ref.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k


def test_nf4_attention_matches_bitsandbytes_config(model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ours, _ = load_moe_model(model_dir, device="cpu", compute_dtype=torch.float32, quantize_attention=True)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["gate", "lm_head",
                                                                                          "embed_tokens"])
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu",
                                               quantization_config=bnb).eval()
    install_expert_engine(ref, quantize_experts=True, compute_dtype=torch.float32)
    assert type(ours.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert torch.equal(_logits(ours), _logits(ref))


def test_at_most_one_layer_of_16bit_experts_alive(model_dir, monkeypatch):
    alive: list[weakref.ref] = []
    real = load_mod._fuse_layer

    def tracking(*args, **kwargs):
        gc.collect()
        assert all(r() is None for r in alive), "a previous layer's 16-bit experts are still referenced"
        out = real(*args, **kwargs)
        alive.extend(weakref.ref(t) for t in out)
        return out

    monkeypatch.setattr(load_mod, "_fuse_layer", tracking)
    load_moe_model(model_dir, device="cpu", compute_dtype=torch.bfloat16)
    assert len(alive) == 6  # 3 layers x (gate_up, down), each freed before the next layer was read


def test_missing_expert_is_named(model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks experts \['5.up_proj'\]"):
        load_moe_model(broken, device="cpu")


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_moe_model(tmp_path / "nope", device="cpu")
