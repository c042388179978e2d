"""Build and trace in one call: the fake-tensor trace of a training configuration, or the same on real tensors.

    from qwen_sft.trace.run import trace
    result = trace(config, model_args, optim="adamw_torch", plan=StepPlan(seq=2048), gradient_checkpointing=True)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from qwen_sft.model.checkpoint import in_experts
from qwen_sft.trace.build import Built, build_model, warm_bitsandbytes
from qwen_sft.trace.shadow import ShadowMode
from qwen_sft.trace.step import StepPlan, StepResult, run_step
from qwen_sft.train.args import ModelArguments


@dataclass
class Traced:
    result: StepResult
    static: dict[str, int]  # bytes of parameters per component (weights by component, LoRA)
    trainable: int
    engine_summary: str
    layers: int
    build_seconds: float


def component(name: str) -> str:
    if "lora_" in name:
        return "LoRA parameters"
    if "embed_tokens" in name:
        return "weights: embeddings"
    if "lm_head" in name:
        return "weights: lm_head"
    if ".self_attn." in name and ("_proj" in name):
        return "weights: attention (q/k/v/o)"
    if ".linear_attn." in name and "_proj" in name:  # qwen3_next's Gated DeltaNet projections
        return "weights: Gated DeltaNet (in_proj_qkvz/ba, out_proj)"
    if in_experts(name):
        return "weights: routed experts"
    if ".mlp.shared_expert." in name:  # qwen3_next (shared_expert_gate, 1 row, stays with the routers)
        return "weights: shared expert"
    if ".mlp." in name and ".gate." not in name and not name.endswith("mlp.gate.weight"):
        return "weights: dense MLP"
    return "weights: norms + routers"


def static_bytes(model: torch.nn.Module) -> tuple[dict[str, int], int]:
    """Parameter bytes per component (allocator-rounded, as the tracker counts them) and the trainable count."""
    from qwen_sft.trace.build import quant_state_tensors
    from qwen_sft.trace.tracker import ALLOC_ROUND

    def rounded(t: torch.Tensor) -> int:
        return -(-t.untyped_storage().nbytes() // ALLOC_ROUND) * ALLOC_ROUND

    out: dict[str, int] = {}
    seen: set[int] = set()
    trainable = 0
    for name, p in list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers()):
        key = id(p.untyped_storage())
        if key in seen:
            continue
        seen.add(key)
        c = component(name)
        out[c] = out.get(c, 0) + rounded(p)
        if getattr(p, "requires_grad", False):
            trainable += p.numel()
    for name, module in model.named_modules():  # NF4 scales: held by the quant state, counted with their weight
        for t in quant_state_tensors(module, recurse=False):
            if id(t.untyped_storage()) not in seen:
                seen.add(id(t.untyped_storage()))
                c = component(f"{name}.weight")
                out[c] = out.get(c, 0) + rounded(t)
    return out, trainable


def make_optimizer(model: torch.nn.Module, optim: str, learning_rate: float = 1e-4, training_args=None):
    """The optimizer the Trainer would build for ``optim`` (``Trainer.get_optimizer_cls_and_kwargs``)."""
    from transformers import Trainer, TrainingArguments

    if training_args is None:
        training_args = TrainingArguments(output_dir="/nonexistent-trace", optim=optim, learning_rate=learning_rate,
                                          use_cpu=True, report_to="none")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    return cls(params, **kwargs)


def trace(config, model_args: ModelArguments, *, plan: StepPlan, gradient_checkpointing: bool,
          optim: str = "adamw_torch", training_args=None, fake: bool = True, layers: int | None = None,
          deepspeed_zero3: bool = False) -> Traced:
    """Build the training model (fake or real) and trace one step. See qwen_sft/trace/__init__.py."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    warm_bitsandbytes()
    t0 = time.perf_counter()
    if fake:
        fm = FakeTensorMode(allow_non_fake_inputs=True)
        shadow = ShadowMode(fm)
        modes = contextlib.ExitStack()
        modes.enter_context(fm)
        modes.enter_context(shadow)
        lift = fm.from_tensor
    else:
        shadow, modes, lift = None, contextlib.ExitStack(), None
    with modes:
        built: Built = build_model(config, model_args, gradient_checkpointing=gradient_checkpointing,
                                   deepspeed_zero3=deepspeed_zero3, layers=layers)
        static, trainable = static_bytes(built.model)
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        # bitsandbytes' 8-bit optimizers build their quantization maps with .tolist() in __init__: real tensors.
        with unset_fake_temporarily():
            optimizer = make_optimizer(built.model, optim, training_args=training_args)
        build_seconds = time.perf_counter() - t0
        if lift is not None:
            real_lift = lift

            def lift(t, _f=real_lift):  # inputs are integers: keep their values for the mask logic
                fake_t = _f(t)
                shadow.set(fake_t, t)
                return fake_t
        result = run_step(built, plan, optimizer, shadow=shadow, lift=lift)
    return Traced(result=result, static=static, trainable=trainable, engine_summary=built.engine_summary,
                  layers=len(built.layers), build_seconds=build_seconds)
