"""Load a causal LM for training from plain arguments: the one place that calls ``from_pretrained``, the QLoRA
loader or the expert engine for a training model (``qwen_sft.train.model.load_model`` turns a run's options into
these arguments; benchmarks call it directly).

    import torch
    from transformers import AutoConfig
    from qwen_sft.model.load import Quantization, load_causal_lm
    model = load_causal_lm(".cache/tiny-qwen3-moe", AutoConfig.from_pretrained(".cache/tiny-qwen3-moe"),
                           dtype=torch.float32)

- ``use_cache=False`` always: with a cache, packed rows attend across sample boundaries (shared/spec).
- ``quantize``: 4-bit weights. With ``expert_engine`` the experts and attention are stored in NF4 as the
  checkpoint is read (qwen_sft/moe/load.py), otherwise bitsandbytes quantizes the ``nn.Linear`` layers only and
  the fused experts stay in ``dtype`` (a warning says how much that costs).
- ``expert_engine``: experts go through qwen_sft/moe with ``expert_lora`` factors (None: attention-only LoRA).
- ``zero3``: DeepSpeed ZeRO-3 gathers each MoE block whole (the engine refuses ZeRO-3).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Never quantized: the router (a few KB, and its argmax decides everything), embeddings, lm_head.
NOT_QUANTIZED = ["gate", "lm_head", "embed_tokens"]


@dataclass(frozen=True)
class Quantization:
    """4-bit storage of the weights (bitsandbytes' names)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16


def _rank0_log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[qwen-sft] {msg}", flush=True)


def expert_memory_gib(config, bits: float = 16.0) -> float:
    """Memory of all routed-expert weights at ``bits`` per weight, from the model config alone."""
    moe_layers = [i for i in range(config.num_hidden_layers)
                  if i not in (getattr(config, "mlp_only_layers", None) or [])
                  and (i + 1) % getattr(config, "decoder_sparse_step", 1) == 0]
    per_layer = config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size
    return len(moe_layers) * per_layer * bits / 8 / 2**30


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.2f} MiB"


def _local_device() -> dict | None:
    """Each torchrun rank keeps its own quantized copy on its own GPU (``LOCAL_RANK``)."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return None


def mark_moe_leaf_modules(model) -> list[str]:
    """ZeRO-3: gather a whole MoE block at once. Ranks route tokens to different experts, so per-expert
    parameter fetches would differ between ranks and the all-gathers would hang."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = {type(m) for name, m in model.named_modules() if name.endswith(".mlp") and hasattr(m, "experts")}
    if classes:
        set_z3_leaf_modules(model, list(classes))
    return sorted(c.__name__ for c in classes)


def _from_pretrained(source: str, **kwargs):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def load_causal_lm(source: str, config, *, dtype: torch.dtype = torch.bfloat16, attn_implementation: str = "sdpa",
                   quantize: Quantization | None = None, expert_engine: bool = False, expert_lora=None,
                   zero3: bool = False, router_aux_loss_coef: float | None = None, cache_dir: str | None = None,
                   trust_remote_code: bool = False, log: Callable[[str], None] = _rank0_log):
    """The causal LM of ``source`` (a directory, or a Hub id in the cache) built with ``config``; see the module doc.
    ``expert_lora``: a ``qwen_sft.moe.ExpertLoraSpec`` or None."""
    config.use_cache = False
    if router_aux_loss_coef is not None:
        config.router_aux_loss_coef = router_aux_loss_coef
    config.output_router_logits = bool(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    kwargs: dict = {"config": config, "dtype": dtype, "attn_implementation": attn_implementation,
                    "cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
    if expert_engine:
        from qwen_sft.moe import install_expert_engine, load_moe_model

        if zero3:
            raise ValueError("the MoE expert engine does not support DeepSpeed ZeRO-3: use ZeRO-2/DDP, or "
                             "--expert_engine false")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        if quantize is not None:
            model, report = load_moe_model(
                source, device=device, compute_dtype=quantize.compute_dtype, quantize_experts=True,
                quantize_attention=True, double_quant=quantize.double_quant, lora=expert_lora,
                attn_implementation=attn_implementation, config=config, cache_dir=cache_dir)
        else:
            model = _from_pretrained(source, **kwargs)
            report = install_expert_engine(model, quantize_experts=False, lora=expert_lora, compute_dtype=dtype,
                                           device=device if torch.cuda.is_available() else None)
        log(report.summary())
        return model
    if quantize is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantize.quant_type, bnb_4bit_use_double_quant=quantize.double_quant,
            bnb_4bit_compute_dtype=quantize.compute_dtype, bnb_4bit_quant_storage=dtype,
            llm_int8_skip_modules=NOT_QUANTIZED)
        kwargs["device_map"] = _local_device()
        if getattr(config, "num_experts", 0):
            name = str(dtype).removeprefix("torch.")
            log("!" * 100)
            log(f"WARNING: bitsandbytes quantizes only nn.Linear layers; on transformers v5 the fused MoE experts "
                f"stay in {name}: {_size(expert_memory_gib(config, torch.finfo(dtype).bits))} of expert weights "
                f"instead of ~{_size(expert_memory_gib(config, 4.5))} in NF4 (computed from the model config; "
                f"NF4 ≈ 4.5 bits with its scales). --expert_engine true (the default, qwen_sft/moe) stores them "
                f"in NF4.")
            log("!" * 100)
    model = _from_pretrained(source, **kwargs)
    if zero3:
        names = mark_moe_leaf_modules(model)
        log(f"ZeRO-3: MoE blocks {names} are leaf modules (all their experts are gathered together)")
    return model
