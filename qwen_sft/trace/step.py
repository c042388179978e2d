"""One optimizer step of the training step (forward, backward, optimizer) under the tracker and FLOP counter.

    result = run_step(built, StepPlan(seq=2048), make_optimizer, shadow=shadow)   # inside build's fake mode

The batch has the collator's layout (packing: one row of ``batch`` samples with restarting position_ids;
padding: ``batch`` rows). Before the measured step the optimizer has stepped once, so its state exists, and
with ``accumulating`` the gradients of an earlier micro-batch exist too: the measured micro-step is the
worst one of a gradient-accumulation window. Routing is not learned in a trace: a hook on every router
replaces its top-k indices by a seeded choice (``uniform``: K distinct experts per token, uniformly;
``skewed``: every token to the same K experts, the most concentrated load a batch can put on one chunk
of the engine), the same in the forward and in checkpointing's recomputation.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _disable_current_modes

from qwen_sft.samples import IGNORE_INDEX
from qwen_sft.trace.build import Built, quant_state_tensors
from qwen_sft.trace.flops import flop_counter
from qwen_sft.trace.shadow import ShadowMode
from qwen_sft.trace.tracker import PeakTracker, RegionHooks

Routing = Literal["uniform", "skewed"]


@dataclass
class StepPlan:
    seq: int = 2048
    batch: int = 1
    packing: bool = True
    accumulating: bool = True  # gradients of an earlier micro-batch are live (gradient_accumulation_steps > 1)
    routing: Routing = "uniform"
    count_flops: bool = True
    seed: int = 0
    sample_lengths: tuple[int, ...] | None = None  # the micro-batch's samples (default: ``batch`` of ``seq``)
    # The loss of the step: None is transformers' (``model(**batch).loss``, full fp32 logits); a lever plugs in
    # here as ``fn(model, batch) -> loss`` and is measured by the same trace. ``chunked_loss(n)`` is the run's
    # default loss (``chunked_loss=True``, ``loss_chunk_tokens=n``: qwen_sft/train/loss.py).
    loss_fn: object = None

    def __post_init__(self) -> None:
        if self.routing not in ("uniform", "skewed"):
            raise ValueError(f"routing must be uniform or skewed, got {self.routing!r}")
        if self.seq < 2 or self.batch < 1:
            raise ValueError(f"seq must be >= 2 and batch >= 1, got seq={self.seq} batch={self.batch}")


def chunked_loss(chunk_tokens: int):
    """The loss ``SFTTrainer._chunked_compute_loss`` computes, from the same functions (qwen_sft/train/loss.py):
    the decoder's hidden states, then the lm_head and cross-entropy ``chunk_tokens`` supervised tokens at a time."""
    from qwen_sft.train.loss import causal_lm, chunked_lm_loss, forward_hidden

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        causal = causal_lm(model)
        inputs = dict(batch)
        labels = inputs.pop("labels")
        hidden, _ = forward_hidden(model, causal, inputs)
        return chunked_lm_loss(hidden, causal.lm_head, labels, position_ids=inputs.get("position_ids"),
                               chunk_tokens=chunk_tokens)

    loss_fn.chunk_tokens = chunk_tokens
    return loss_fn


@contextlib.contextmanager
def offload_to_host():
    """``torch.autograd.graph.save_on_cpu`` (``offload_activations``) for a trace: saved tensors leave the traced
    device for "meta" (the tracker counts them as host bytes) and come back as a fresh tensor in backward."""
    def pack(t):
        return t.device, t.to("meta")

    def unpack(packed):
        device, t = packed
        return torch.empty_like(t, device=device)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def offloaded(loss_fn=None):
    """The step's loss (``None``: transformers') with the forward under :func:`offload_to_host`, as
    ``SFTTrainer.compute_loss`` runs it with ``offload_activations`` on."""
    def fn(model: nn.Module, batch: dict) -> torch.Tensor:
        with offload_to_host():
            return model(**batch).loss if loss_fn is None else loss_fn(model, batch)

    fn.chunk_tokens = getattr(loss_fn, "chunk_tokens", None)
    return fn


@dataclass
class StepResult:
    peak_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    phase_peaks: dict[str, int]
    start_bytes: int
    flops: int
    tokens: int
    seconds: float
    host_bytes: dict[str, int] = field(default_factory=dict)  # per other device (the host), the most held at once
    phase_breakdowns: dict[str, dict[str, int]] = field(default_factory=dict)


def routing_indices(tokens: int, experts: int, top_k: int, routing: Routing, seed: int) -> torch.Tensor:
    if routing == "skewed":
        return torch.arange(top_k).expand(tokens, top_k).contiguous()
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(tokens, experts, generator=gen).topk(top_k, dim=-1).indices


def _routers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


@contextlib.contextmanager
def seeded_routing(model: nn.Module, routing: Routing, seed: int, shadow: ShadowMode | None):
    """Replace each router's top-k indices; seeded per router so that recomputation routes the same way."""
    handles = []
    for i, router in enumerate(_routers(model)):
        def hook(module, args, out, layer_seed=seed * 1000 + i):
            logits, scores, indices = out
            with _disable_current_modes():
                real = routing_indices(indices.shape[0], module.num_experts, module.top_k, routing, layer_seed)
            new = torch.empty_like(indices)
            if isinstance(new, FakeTensor):
                shadow.set(new, real)
            else:
                with torch.no_grad():
                    new.copy_(real)
            return logits, scores, new
        handles.append(router.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def real_run_masks(shadow: ShadowMode | None):
    """transformers treats every fake tensor as "being traced" and then keeps an [S, S] causal mask a real run
    drops; tensors whose values the shadow mode holds (position ids) are not being traced."""
    import transformers.masking_utils as mu

    original = mu.is_tracing

    def is_tracing(tensor=None) -> bool:
        if shadow is not None and isinstance(tensor, FakeTensor) and shadow.knows(tensor):
            return original(None)
        return original(tensor)

    mu.is_tracing = is_tracing
    try:
        yield
    finally:
        mu.is_tracing = original


def make_batch(plan: StepPlan, vocab: int) -> dict[str, torch.Tensor]:
    """What the collator hands the model for the plan's samples (every token supervised)."""
    gen = torch.Generator().manual_seed(plan.seed)
    lens = list(plan.sample_lengths or [plan.seq] * plan.batch)
    samples = [torch.randint(0, vocab, (n,), generator=gen) for n in lens]
    if plan.packing:
        ids = torch.cat(samples)[None]
        labels = ids.clone()
        starts = torch.tensor([0] + lens[:-1]).cumsum(0)
        labels[0, starts] = IGNORE_INDEX  # the collator's separator: no sample predicts the next one's first token
        pos = torch.cat([torch.arange(n) for n in lens])[None]
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    width = max(lens)
    ids = torch.full((len(lens), width), 151643 % vocab)
    labels = torch.full((len(lens), width), IGNORE_INDEX)
    mask = torch.zeros((len(lens), width), dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, :len(s)], labels[row, :len(s)], mask[row, :len(s)] = s, s, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def prime_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, accumulating: bool) -> None:
    """One step on zero gradients so the optimizer state exists; keep gradients when accumulating."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=not accumulating)
    if accumulating:
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)


def run_step(built: Built, plan: StepPlan, optimizer: torch.optim.Optimizer, *, shadow: ShadowMode | None = None,
             lift=None) -> StepResult:
    """Trace one micro-step + optimizer step. ``lift`` turns the real batch into the trace's tensors."""
    model = built.model
    vocab = model.get_input_embeddings().num_embeddings
    with _disable_current_modes():
        batch = make_batch(plan, vocab)
    if lift is not None:
        batch = {k: lift(v) for k, v in batch.items()}
    prime_optimizer(model, optimizer, plan.accumulating)
    regions = RegionHooks(built.layers, built.final_norm)
    tracker = PeakTracker(regions=regions)
    tracker.track_external(model, optimizer, *batch.values())
    tracker.label(quant_state_tensors(model), "parameters (frozen)")
    counter = flop_counter() if plan.count_flops else contextlib.nullcontext()
    start = time.perf_counter()
    try:
        with seeded_routing(model, plan.routing, plan.seed, shadow), real_run_masks(shadow), counter, tracker:
            tracker.phase = "forward"
            loss = model(**batch).loss if plan.loss_fn is None else plan.loss_fn(model, batch)
            tracker.phase = "backward"
            loss.backward()
            del loss
            tracker.phase = "optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        regions.remove()
    seconds = time.perf_counter() - start
    flops = counter.get_total_flops() if plan.count_flops else 0
    return StepResult(peak_bytes=tracker.peak_bytes, breakdown=tracker.peak_breakdown, peak_phase=tracker.peak_phase,
                      phase_peaks=dict(tracker.phase_peaks), start_bytes=tracker.start_bytes, flops=flops,
                      tokens=int(batch["input_ids"].numel()), seconds=seconds, host_bytes=dict(tracker.other_peaks),
                      phase_breakdowns=tracker.phase_breakdowns)
