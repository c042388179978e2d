"""The checkpoint contract (qwen_sft/model/checkpoint.py) and the plain-argument loader (qwen_sft/model/load.py).

    python -m pytest -q tests/test_model_checkpoint.py
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qwen_sft.model.checkpoint import (
    INDEX_FILE,
    ModelNotFound,
    expert_key,
    factor_from_peft,
    factor_to_peft,
    missing_weights,
    parse_expert_key,
    peft_to_per_expert,
    resolve_model_dir,
    weight_map,
)

MODEL_ID = "Qwen/Qwen3-Coder-30B-A3B-Instruct"


def test_expert_keys_round_trip():
    key = expert_key("model.layers.3.mlp.experts", 17, "up_proj")
    assert key == "model.layers.3.mlp.experts.17.up_proj.weight"
    assert parse_expert_key(key) == ("model.layers.3.mlp", 17, "up_proj")
    assert parse_expert_key("model.layers.3.mlp.experts.gate_up_proj") == ("model.layers.3.mlp", None, "gate_up_proj")
    assert parse_expert_key("model.layers.3.mlp.shared_expert.up_proj.weight") is None
    assert parse_expert_key("model.layers.3.mlp.gate.weight") is None


def test_peft_expert_layout_is_pefts_own_delta():
    """ΔW[e] from the per-expert factors equals peft's ParamWrapper delta of the saved 2-D factors, and the
    conversion back gives the saved tensors bit for bit."""
    E, r, n_in, n_out = 3, 2, 5, 4
    A = torch.randn(E * r, n_in)
    B = torch.randn(n_out, r * E)
    A3, B3 = peft_to_per_expert(A, B, E)
    # peft's ParamWrapper.get_delta_weight (in/out swapped for Qwen3-MoE experts): B as [out, r, E], A as [E, r, in]
    want = torch.einsum("ore,eri->eoi", B.reshape(n_out, r, E), A.reshape(E, r, n_in))
    assert torch.allclose(torch.stack([B3[e] @ A3[e] for e in range(E)]), want, atol=1e-6)
    assert torch.equal(factor_to_peft("A", A3), A) and torch.equal(factor_to_peft("B", B3), B)
    assert torch.equal(factor_from_peft("lora_down_B", B, E), B3)


def test_weight_map_and_missing_weights(tiny_model_dir, tmp_path):
    single = weight_map(tiny_model_dir)
    assert single and set(single.values()) == {tiny_model_dir / "model.safetensors"}
    assert missing_weights(tiny_model_dir) is None
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(tiny_model_dir / "config.json", half / "config.json")
    assert missing_weights(half) == "config.json but no weights (no model.safetensors or model.safetensors.index.json)"
    (half / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    assert missing_weights(half) == "1 of 1 weight shards missing, e.g. model-00001-of-00002.safetensors"
    assert weight_map(half) == {"a": half / "model-00001-of-00002.safetensors"}
    (half / INDEX_FILE).write_text("{}")
    assert missing_weights(half) == "unreadable model.safetensors.index.json ('weight_map')"


def test_one_download_policy(tiny_model_dir, tmp_path, monkeypatch):
    assert resolve_model_dir(tiny_model_dir) == tiny_model_dir
    with pytest.raises(ModelNotFound, match=r"^--x /nope: no such model directory \(and not a Hub id owner/name\)$"):
        resolve_model_dir("/nope", where="--x /nope")
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as err:
        resolve_model_dir(MODEL_ID, str(hub), download=True)
    assert str(err.value) == (f"{MODEL_ID}: not downloaded in the cache {hub}, and HF_HUB_OFFLINE=1 forbids "
                              f"downloading; download it first: hf download {MODEL_ID} --cache-dir {hub}")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ModelNotFound, match=rf"^{MODEL_ID}: not downloaded in the cache {hub}; download it first"):
        resolve_model_dir(MODEL_ID, str(hub))  # loading never downloads
    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download",
                        lambda repo_id, cache_dir=None, **kw: calls.append((repo_id, cache_dir, kw)) or str(tiny_model_dir))
    assert resolve_model_dir(MODEL_ID, str(hub), download=True) == tiny_model_dir
    assert calls == [(MODEL_ID, str(hub), {})]


def test_plain_argument_loader_is_what_training_loads(tiny_model_dir):
    from transformers import AutoConfig

    from qwen_sft.model.load import load_causal_lm
    from qwen_sft.train.args import ModelArguments
    from qwen_sft.train.model import load_model

    plain = load_causal_lm(str(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir), dtype=torch.float32)
    train = load_model(ModelArguments(model_name_or_path=str(tiny_model_dir), torch_dtype="float32"),
                       AutoConfig.from_pretrained(tiny_model_dir))
    assert plain.config.use_cache is False and plain.dtype == torch.float32
    a, b = plain.state_dict(), train.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_keys_round_trip():
    from qwen_sft.model.checkpoint import lora_key, split_lora_key

    key = lora_key("model.layers.0.mlp.experts", "lora_B", depth=1)
    assert key == "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"
    assert split_lora_key(key) == ("model.layers.0.mlp.experts", 1, "lora_B", "weight")
    assert split_lora_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.bias") == \
        ("model.layers.0.self_attn.q_proj", 0, "lora_A", "bias")
    assert split_lora_key("base_model.model.lm_head.weight") is None
    assert split_lora_key("model.layers.0.self_attn.q_proj.lora_A.weight") is None  # not a peft key
