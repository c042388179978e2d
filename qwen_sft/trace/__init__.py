"""Rehearse a training run without weights or GPU: the real training step traced on fake tensors.

    qwen-sft estimate ../shared/spec/qwen3-coder-30b-a3b-instruct/config.json --mode qlora --seq 2048 --trace
    python train.py ... --dry_run true --gpu_memory 24GB        # DRY_RUN=1 bash scripts/X.sh

``measure`` builds the model from its config exactly as training does (qwen_sft/trace/build.py), runs one
micro-step and optimizer step under torch's MemTracker and FlopCounterMode (step.py, tracker.py, flops.py)
and returns the peak per GPU with its breakdown (report.py). Parts: shadow.py gives the engine's routing
bookkeeping real values; ``layers="fit"`` traces two prefixes of whole repeating blocks (fit.py: 2 and 4 layers
of a uniform model, 4 and 8 of Qwen3-Coder-Next's 3:1 hybrid) and extrapolates linearly (exact:
tests/test_trace.py compares it with a full trace).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qwen_sft.trace.fit import fit_layers, layer_period
from qwen_sft.trace.report import Report, Sharding, build_report, extrapolate, extrapolate_static, render
from qwen_sft.trace.step import StepPlan


@dataclass
class Measured:
    report: Report
    layers: int
    traced_layers: str  # "all 48" or "2 and 4, extrapolated to 48"
    seconds: float
    trainable: int
    engine_summary: str


def largest_linear(config, heads: int, head_dim: int) -> int:
    """Weights of the largest projection a bnb 4-bit matmul dequantizes at once (the allowance's row)."""
    h = config.hidden_size
    # qwen3_next: q_proj also emits the output gate; the Gated DeltaNet's in_proj_qkvz is wider still.
    q_out = heads * head_dim * (2 if getattr(config, "linear_num_value_heads", None) else 1)
    sizes = [h * q_out, h * config.num_key_value_heads * head_dim]
    if getattr(config, "linear_num_value_heads", None):
        sizes.append(h * (2 * config.linear_num_key_heads * config.linear_key_head_dim
                          + 2 * config.linear_num_value_heads * config.linear_value_head_dim))
    return max(sizes)


def measure(config, model_args, plan: StepPlan, *, gradient_checkpointing: bool, optim: str = "adamw_torch",
            training_args=None, sharding: Sharding | None = None, layers: Literal["all", "fit"] = "fit",
            deepspeed_zero3: bool = False) -> Measured:
    from qwen_sft.trace.run import trace

    sharding = sharding or Sharding()
    n = int(config.num_hidden_layers)
    kw = dict(plan=plan, gradient_checkpointing=gradient_checkpointing, optim=optim, training_args=training_args,
              deepspeed_zero3=deepspeed_zero3)
    fit = fit_layers(config) if layers == "fit" else None
    if fit is not None:
        la, lb = fit
        a, b = trace(config, model_args, layers=la, **kw), trace(config, model_args, layers=lb, **kw)
        result = extrapolate(a.result, la, b.result, lb, n)
        static = extrapolate_static(a.static, la, b.static, lb, n)
        trainable = round(b.trainable + (b.trainable - a.trainable) * (n - lb) / (lb - la))
        period = layer_period(config)
        blocks = f" (whole blocks of {period} layers)" if period > 1 else ""
        source, how = "traced*", f"{la} and {lb} of {n} layers traced{blocks}, extrapolated linearly (*)"
        seconds = a.build_seconds + b.build_seconds + result.seconds
        summary = b.engine_summary
    else:
        t = trace(config, model_args, **kw)
        result, static, trainable, source, how = t.result, t.static, t.trainable, "traced", f"all {n} layers"
        if layers == "fit" and layer_period(config) is None:
            how += " (no repeating block of layers for a fit)"
        seconds, summary = t.build_seconds + result.seconds, t.engine_summary
    heads, head_dim = config.num_attention_heads, getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    largest = largest_linear(config, heads, head_dim)
    report = build_report(result, static, sharding, heads=heads, head_dim=head_dim, largest_linear=largest,
                          source=source)
    return Measured(report=report, layers=n, traced_layers=how, seconds=seconds, trainable=trainable,
                    engine_summary=summary)


__all__ = ["Measured", "Sharding", "StepPlan", "measure", "render"]
