"""Load a Qwen3-MoE checkpoint straight into the expert engine, quantizing layer by layer as it is read.

    from qwen_sft.moe.load import load_moe_model
    model, report = load_moe_model("Qwen/Qwen3-Coder-30B-A3B-Instruct-local-dir", device="cuda:0",
                                   compute_dtype=torch.bfloat16, quantize_experts=True, quantize_attention=True,
                                   lora=ExpertLoraSpec(r=8, alpha=16))

``from_pretrained`` would first materialise every expert in 16-bit (54 GiB for 30B-A3B) on the target
device or in CPU RAM. Here the model skeleton is built on the meta device, every non-expert tensor is
read from the safetensors shards (memory-mapped) and placed on ``device``, and each layer's experts —
stored per expert on disk (``mlp.experts.{e}.gate_proj.weight`` ...) or fused — are assembled into one
16-bit ``[E, 2I, H]`` / ``[E, H, I]`` pair on ``device``, quantized to NF4 and released before the next
layer. Peak device memory: the quantized model so far + one layer's 16-bit experts (1.2 GB at 30B-A3B).
Peak CPU memory: page cache of the shard being read; no 16-bit copy of the model is ever held.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from qwen_sft.model.checkpoint import parse_expert_key, resolve_model_dir, weight_map
from qwen_sft.moe.install import EngineReport, ExpertLoraSpec, build_engine

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
# qwen3_next (Qwen3-Coder-Next): the Gated DeltaNet projections and the shared expert are ordinary Linears,
# 4-bit under QLoRA like attention. Its 1-row shared_expert_gate stays 16-bit, like the router (and like
# BitsAndBytesConfig with llm_int8_skip_modules=["gate", ...], which skips names ending in "gate").
LINEAR_ATTENTION_LINEARS = ("in_proj_qkvz", "in_proj_ba", "out_proj")
SHARED_EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")


def quantized_linear(module_name: str) -> bool:
    """Whether ``quantize_attention`` stores this Linear in NF4 (attention, linear attention, shared expert)."""
    parent, _, leaf = module_name.rpartition(".")
    if leaf in ATTENTION_LINEARS or leaf in LINEAR_ATTENTION_LINEARS:
        return True
    return leaf in SHARED_EXPERT_LINEARS and parent.endswith(".shared_expert")


class _Shards:
    """Memory-mapped safetensors handles, opened once each."""

    def __init__(self) -> None:
        self._open: dict[Path, object] = {}

    def get(self, path: Path, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if path not in self._open:
            self._open[path] = safe_open(str(path), "pt")
        return self._open[path].get_tensor(key)


def _nf4_linear(weight: torch.Tensor, compute_dtype: torch.dtype, double_quant: bool, device) -> nn.Module:
    """bitsandbytes Linear4bit holding ``weight`` in NF4 (what BitsAndBytesConfig(load_in_4bit) builds)."""
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=compute_dtype, compress_statistics=double_quant,
                            quant_type="nf4", device="meta")
    lin.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, compress_statistics=double_quant,
                                   quant_type="nf4", blocksize=64).to(device)
    return lin


def _fuse_layer(parts: dict, shards: _Shards, num_experts: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``gate_up [E, 2I, H]`` and ``down [E, H, I]`` of one layer, built on ``device`` expert by expert."""
    if "gate_up_proj" in parts:  # already fused on disk (a transformers v5 save)
        return (shards.get(*parts["gate_up_proj"]).to(device, dtype), shards.get(*parts["down_proj"]).to(device, dtype))
    missing = [f"{e}.{p}" for e in range(num_experts) for p in ("gate_proj", "up_proj", "down_proj")
               if (e, p) not in parts]
    if missing:
        raise ValueError(f"checkpoint lacks experts {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    g0 = shards.get(*parts[(0, "gate_proj")])
    d0 = shards.get(*parts[(0, "down_proj")])
    inter, hidden = g0.shape
    gate_up = torch.empty(num_experts, 2 * inter, hidden, device=device, dtype=dtype)
    down = torch.empty(num_experts, *d0.shape, device=device, dtype=dtype)
    for e in range(num_experts):
        gate_up[e, :inter] = shards.get(*parts[(e, "gate_proj")]).to(device, dtype)
        gate_up[e, inter:] = shards.get(*parts[(e, "up_proj")]).to(device, dtype)
        down[e] = shards.get(*parts[(e, "down_proj")]).to(device, dtype)
    return gate_up, down


def load_moe_model(model_dir: str | Path, *, device: str | torch.device, compute_dtype: torch.dtype = torch.bfloat16,
                   quantize_experts: bool = True, quantize_attention: bool = False, double_quant: bool = True,
                   lora: ExpertLoraSpec | None = None, attn_implementation: str = "sdpa", config=None,
                   blocksize: int = 64, chunk_experts: int = 32,
                   cache_dir: str | None = None) -> tuple[nn.Module, EngineReport]:
    """Build the causal LM on ``device`` with every ``mlp.experts`` already an ExpertEngine. See module doc.

    ``model_dir``: a directory or a Hub id already in the local cache (never downloaded here; see
    qwen_sft/model/checkpoint.py). ``config``: a (possibly edited)
    transformers config to build with, e.g. with ``use_cache=False``; default: the checkpoint's own.
    """
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = resolve_model_dir(model_dir, cache_dir)
    config = config or AutoConfig.from_pretrained(model_dir)
    num_experts = int(getattr(config, "num_experts", 0) or 0)
    if not num_experts:
        raise ValueError(f"{model_dir}: config has no routed experts (num_experts); load it with from_pretrained")
    wmap = weight_map(model_dir)  # validated before any allocation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, attn_implementation=attn_implementation)
    expert_parts: dict[str, dict] = defaultdict(dict)
    shards = _Shards()
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unexpected = []
    # What from_pretrained drops too, e.g. qwen3_next's multi-token-prediction head (``mtp.*``), unused in SFT.
    ignored = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    for key, path in wmap.items():
        if expert := parse_expert_key(key):
            block, e, proj = expert
            expert_parts[block][proj if e is None else (e, proj)] = (path, key)
        elif key in own:
            value = shards.get(path, key)
            module_name, _, leaf = key.rpartition(".")
            if quantize_attention and leaf == "weight" and quantized_linear(module_name):
                parent_name, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent_name), child,
                        _nf4_linear(value, compute_dtype, double_quant, device))
            else:
                dtype = compute_dtype if value.is_floating_point() else None
                set_module_tensor_to_device(model, key, device, value=value, dtype=dtype)
        elif not any(re.search(pattern, key) for pattern in ignored):
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"{model_dir}: {len(unexpected)} checkpoint tensors match nothing in "
                         f"{type(model).__name__}, e.g. {unexpected[:3]}")
    report = EngineReport(quantized=quantize_experts, double_quant=quantize_experts and double_quant)
    for block_name in sorted(expert_parts, key=lambda n: [int(t) if t.isdigit() else t for t in n.split(".")]):
        gate_up, down = _fuse_layer(expert_parts[block_name], shards, num_experts, device, compute_dtype)
        block = model.get_submodule(block_name)
        block.experts = build_engine(gate_up, down, quantize_experts=quantize_experts, double_quant=double_quant,
                                     lora=lora, compute_dtype=compute_dtype, hidden_act=config.hidden_act,
                                     blocksize=blocksize, chunk_experts=chunk_experts, report=report,
                                     path=f"{block_name}.experts")
        del gate_up, down  # this layer's 16-bit experts; the next layer reuses the memory
        if quantize_experts and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    # Non-persistent buffers (rotary inv_freq) are not in checkpoints: rebuild those modules on the device.
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "inv_freq"):
            parent_name, _, child = name.rpartition(".")
            with torch.device(device):  # computed in fp32 at construction, exactly as from_pretrained does
                setattr(model.get_submodule(parent_name), child, type(module)(config))
    if config.tie_word_embeddings:
        model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"{model_dir}: checkpoint lacks {len(still_meta)} tensors, e.g. {still_meta[:3]}")
    model.eval()
    return model, report
