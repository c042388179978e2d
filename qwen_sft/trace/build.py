"""The training model at its real size on fake tensors, built by the project's own load path.

    fm = FakeTensorMode(allow_non_fake_inputs=True)
    with fm, ShadowMode(fm) as shadow:
        built = build_model(config, model_args, gradient_checkpointing=True)

What training does (qwen_sft/train/model.py::load_model, then run.py) with nothing read from disk: the
transformers model from its config, attention in NF4 for QLoRA (bitsandbytes' fake kernels give the
packed weight and its quant state: ``Params4bit`` cannot wrap a fake tensor), the expert engine by
``install_expert_engine``, LoRA by ``apply_lora``, the router frozen by ``freeze_router`` and gradient
checkpointing switched on as the Trainer does. On real tensors (``fake=False``, the trust tests) the same
function builds a real model with random weights.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from qwen_sft.train.args import ModelArguments

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class Built:
    model: nn.Module
    engine: bool  # the expert engine is installed
    layers: list[nn.Module]
    final_norm: nn.Module | None
    engine_summary: str = ""


def warm_bitsandbytes() -> None:
    """bitsandbytes builds its 8-bit code table with ``.tolist()`` on first use: do that on real tensors."""
    import bitsandbytes.functional as bnbf

    bnbf.quantize_4bit(torch.randn(64, 64, dtype=torch.bfloat16), blocksize=64, compress_statistics=True,
                       quant_type="nf4")


def _fake_nf4_linear(weight: torch.Tensor, compute_dtype: torch.dtype, double_quant: bool) -> nn.Module:
    """``load._nf4_linear`` for a fake weight: the same Linear4bit, its packed weight from bnb's fake kernel."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    out_f, in_f = weight.shape
    with unset_fake_temporarily():
        lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=compute_dtype,
                                compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8,
                                device="meta")
    packed, state = bnbf.quantize_4bit(weight.to(compute_dtype), blocksize=64, compress_statistics=double_quant,
                                       quant_type="nf4", quant_storage=torch.uint8)
    p = nn.Parameter(packed, requires_grad=False)
    p.quant_state, p.quant_type, p.blocksize, p.compress_statistics = state, "nf4", 64, double_quant
    p.quant_storage, p.bnb_quantized = torch.uint8, True
    lin.weight = p
    lin.quant_state = state
    return lin


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype, double_quant: bool, attention_only: bool) -> None:
    """Linear layers to NF4: q/k/v/o as ``load_moe_model(quantize_attention=True)`` does (the engine), or every
    Linear but the router, embeddings and lm_head as ``BitsAndBytesConfig(load_in_4bit)`` does (no engine)."""
    from qwen_sft.moe.load import _nf4_linear, quantized_linear
    from qwen_sft.train.model import NOT_QUANTIZED

    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        # quantized_linear: q/k/v/o, plus qwen3_next's Gated DeltaNet projections and shared expert
        wanted = quantized_linear(name) if attention_only else leaf not in NOT_QUANTIZED
        if wanted and type(module) is nn.Linear:
            parent_name, _, child = name.rpartition(".")
            w = module.weight.detach()
            lin = _fake_nf4_linear(w, compute_dtype, double_quant) if isinstance(w, FakeTensor) \
                else _nf4_linear(w, compute_dtype, double_quant, w.device)
            setattr(model.get_submodule(parent_name), child, lin)


def quant_state_tensors(model: nn.Module, recurse: bool = True) -> list[torch.Tensor]:
    """The NF4 layers' scales: they live in the quant state, not in any parameter."""
    out = []
    for module in model.modules() if recurse else [model]:
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        out += [t for t in (state.absmax, getattr(state, "code", None)) if isinstance(t, torch.Tensor)]
        nested = getattr(state, "state2", None)
        if nested is not None:
            out += [t for t in (nested.absmax, nested.code) if isinstance(t, torch.Tensor)]
    return out


@contextlib.contextmanager
def fake_swap_tensors():
    """peft moves adapters with ``Module.to``, which swaps tensors; ``swap_tensors`` refuses any tensor with a
    weak reference, and every fake Parameter has one (the fake mode's memo). Skip that check for fake pairs."""
    import torch.utils as tu

    original = tu.swap_tensors

    def swap(t1, t2):
        if isinstance(t1, FakeTensor) and isinstance(t2, FakeTensor):
            t1.__class__, t2.__class__ = t2.__class__, t1.__class__
            t1.__dict__, t2.__dict__ = t2.__dict__, t1.__dict__
            torch._C._swap_tensor_impl(t1, t2)
            return
        return original(t1, t2)

    tu.swap_tensors = swap
    try:
        yield
    finally:
        tu.swap_tensors = original


@contextlib.contextmanager
def without_zero3_init():
    """A ZeRO-3 run's TrainingArguments (built before the dry run's rehearsal) make transformers build models under
    ``deepspeed.zero.Init``, with empty partitioned parameters; the trace builds one rank's whole model and
    computes the partitioning itself, so that switch is off while it builds."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def build_model(config, model_args: ModelArguments, *, gradient_checkpointing: bool, deepspeed_zero3: bool = False,
                layers: int | None = None) -> Built:
    """See the module docstring. ``layers``: keep only the first N decoder layers (the layer-count shortcut)."""
    with without_zero3_init():
        return _build_model(config, model_args, gradient_checkpointing=gradient_checkpointing,
                            deepspeed_zero3=deepspeed_zero3, layers=layers)


def _build_model(config, model_args: ModelArguments, *, gradient_checkpointing: bool, deepspeed_zero3: bool,
                 layers: int | None) -> Built:
    import copy

    from transformers import AutoModelForCausalLM

    from qwen_sft.moe import install_expert_engine
    from qwen_sft.train.model import (
        apply_lora,
        expert_lora_spec,
        freeze_router,
        uses_expert_engine,
    )

    config = copy.deepcopy(config)
    config.use_cache = False
    if model_args.router_aux_loss_coef is not None:
        config.router_aux_loss_coef = model_args.router_aux_loss_coef
    config.output_router_logits = bool(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    if layers is not None:
        from qwen_sft.trace.fit import prefix_config

        prefix_config(config, layers)
    engine = uses_expert_engine(model_args, config, deepspeed_zero3)  # raises for recipes that cannot run
    dtype = getattr(torch, model_args.torch_dtype)
    compute_dtype = getattr(torch, model_args.bnb_4bit_compute_dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    summary = ""
    if model_args.use_qlora:  # without the engine the fused experts stay 16-bit (bitsandbytes skips them)
        quantize_linears(model, compute_dtype, model_args.bnb_4bit_use_double_quant, attention_only=engine)
    if engine:
        report = install_expert_engine(model, quantize_experts=model_args.use_qlora,
                                       double_quant=model_args.bnb_4bit_use_double_quant,
                                       lora=expert_lora_spec(model_args),
                                       compute_dtype=compute_dtype if model_args.use_qlora else dtype)
        summary = report.summary()
    model.router_aux_loss_coef = 0.0
    if model_args.use_peft:
        with fake_swap_tensors():
            model, _ = apply_lora(model, model_args, gradient_checkpointing)
    freeze_router(model, model_args.train_router)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.model
    return Built(model=model, engine=engine, layers=list(decoder.layers), final_norm=getattr(decoder, "norm", None),
                 engine_summary=summary)
