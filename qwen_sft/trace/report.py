"""The traced peak per GPU, its breakdown next to the formula's rows, the allowance a trace cannot see.

    report = Report.from_traced(traced, shape, plan, sharding)
    print(report.render(formula=estimate(shape, options)))

Rows are labelled by where each number comes from: ``traced`` (measured on the fake-tensor step),
``traced, L-layer fit`` (two traces of fewer layers extrapolated linearly, see ``extrapolate``),
``computed`` (one rank of a multi-GPU recipe: sharding arithmetic on a traced row) and ``allowance``
(what no trace sees: CUDA context, allocator fragmentation, kernels' own workspaces).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from qwen_sft.trace.step import StepResult

GiB = 2**30
LOSS_ROW = "loss/logits (forward + backward at the loss)"
CUDA_CONTEXT_BYTES = int(0.75 * GiB)  # CUDA context + cuBLAS workspace: the estimate's assumption, kept
FRAGMENTATION = 0.05  # reserved minus allocated, as a share of the traced peak: an assumption, stated


@dataclass
class Sharding:
    """One rank of a multi-GPU recipe: DDP (``zero`` None), DeepSpeed ZeRO-2 or ZeRO-3, optional CPU offload."""

    world: int = 1
    zero: int | None = None
    offload_optimizer: bool = False
    offload_params: bool = False

    def describe(self) -> str:
        if self.world == 1 and self.zero is None:
            return "one GPU"
        kind = f"DeepSpeed ZeRO-{self.zero}" if self.zero else "DDP"
        off = [n for n, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_params)) if on]
        return f"{kind} on {self.world} GPUs" + (f", {' and '.join(off)} offloaded to CPU" if off else "")


@dataclass
class Row:
    name: str
    bytes: int
    source: str  # traced | computed | allowance


@dataclass
class Report:
    rows: list[Row]
    peak: int  # the traced (or computed) peak allocated per GPU
    peak_phase: str
    allowance: list[Row]
    flops: int
    tokens: int
    notes: list[str] = field(default_factory=list)
    host_bytes: int = 0

    @property
    def planned(self) -> int:
        return self.peak + sum(r.bytes for r in self.allowance)


def extrapolate(a: StepResult, la: int, b: StepResult, lb: int, layers: int) -> StepResult:
    """Linear in the layer count, row by row, from traces of ``la`` < ``lb`` layers (tests/test_trace.py checks
    it against a full trace). Valid while the peak stays at the same point of the step (the loss, here)."""
    if a.peak_phase != b.peak_phase:
        raise ValueError(f"the {la}- and {lb}-layer traces peak in different phases ({a.peak_phase}, "
                         f"{b.peak_phase}): trace all layers (--layers all)")
    k = (layers - lb) / (lb - la)

    def lin(x: int, y: int) -> int:
        return round(y + (y - x) * k)

    keys = set(a.breakdown) | set(b.breakdown)
    return replace(b, peak_bytes=lin(a.peak_bytes, b.peak_bytes),
                   breakdown={c: lin(a.breakdown.get(c, 0), b.breakdown.get(c, 0)) for c in keys},
                   phase_peaks={p: lin(a.phase_peaks.get(p, 0), v) for p, v in b.phase_peaks.items()},
                   start_bytes=lin(a.start_bytes, b.start_bytes), flops=lin(a.flops, b.flops),
                   host_bytes={d: lin(a.host_bytes.get(d, 0), v) for d, v in b.host_bytes.items()},
                   seconds=a.seconds + b.seconds)


def extrapolate_static(a: dict[str, int], la: int, b: dict[str, int], lb: int, layers: int) -> dict[str, int]:
    k = (layers - lb) / (lb - la)
    return {c: round(b.get(c, 0) + (b.get(c, 0) - a.get(c, 0)) * k) for c in set(a) | set(b)}


def allowance_rows(tokens: int, heads: int, head_dim: int, largest_linear: int) -> list[Row]:
    """What a fake trace cannot see, priced for a CUDA run (assumptions, stated)."""
    return [
        Row("CUDA context + cuBLAS workspace (assumed)", CUDA_CONTEXT_BYTES, "allowance"),
        # flash-attention's backward accumulates dq in fp32 [tokens, heads, head_dim]
        Row("flash-attn backward dq accumulator (fp32)", 4 * tokens * heads * head_dim, "allowance"),
        # bnb gemm_4bit dequantizes the whole NF4 weight to bf16 for more than a few rows
        Row("bnb 4-bit matmul: one dequantized weight (bf16)", 2 * largest_linear, "allowance"),
    ]


def build_report(result: StepResult, static: dict[str, int], sharding: Sharding, *, heads: int, head_dim: int,
                 largest_linear: int, source: str = "traced") -> Report:
    """Breakdown at the peak: parameters by component from ``static``, the rest from the tracker's categories."""
    bd = dict(result.breakdown)
    # The loss's own bytes at the peak: its forward tensors and the gradients backward has made of them so far.
    bd[LOSS_ROW] = bd.pop("loss/logits", 0) + bd.pop("transients (backward, loss)", 0)
    traced_params = bd.pop("parameters (frozen)", 0) + bd.pop("parameters (trainable)", 0)
    rows = [Row(name, b, source) for name, b in sorted(static.items(), key=lambda kv: -kv[1])]
    mismatch = traced_params - sum(static.values())
    if mismatch:
        rows.append(Row("other parameters (quant state, buffers)", mismatch, source))
    rows += [Row(name, b, source) for name, b in bd.items() if b]
    notes = []
    peak = result.peak_bytes
    w, z = sharding.world, sharding.zero
    if w > 1 or z:
        new = []
        for r in rows:
            b, src = r.bytes, r.source
            is_param = r.name.startswith("weights:") or r.name.startswith("LoRA") or r.name.startswith("other param")
            if z == 3 and is_param:
                b, src = (0 if sharding.offload_params else -(-b // w)), "computed"
            if z in (2, 3) and r.name in ("gradients", "optimizer state"):
                b, src = -(-b // w), "computed"
                if r.name == "optimizer state" and sharding.offload_optimizer:
                    b = 0
            new.append(Row(r.name, b, src))
        peak += sum(n.bytes - o.bytes for n, o in zip(new, rows))
        rows = new
        if z is None:
            grads = next((r.bytes for r in rows if r.name == "gradients"), 0)
            rows.append(Row("DDP gradient buckets (a copy of the gradients)", grads, "computed"))
            peak += grads
        notes.append(f"{sharding.describe()}: one rank traced (its micro-batch's activations, logits and "
                     f"transients); {'parameters, ' if z == 3 else ''}gradients and optimizer state are the traced "
                     f"bytes divided by the sharding arithmetic of {'ZeRO-' + str(z) if z else 'DDP'} (computed)"
                     + ("; ZeRO-3 also gathers one layer's parameters at a time (not added)" if z == 3 else ""))
    allowance = allowance_rows(result.tokens, heads, head_dim, largest_linear)
    allowance.append(Row(f"allocator fragmentation ({FRAGMENTATION:.0%} of the peak, assumed)",
                         round(FRAGMENTATION * peak), "allowance"))
    return Report(rows=rows, peak=peak, peak_phase=result.peak_phase, allowance=allowance, flops=result.flops,
                  tokens=result.tokens, notes=notes, host_bytes=sum(result.host_bytes.values()))




def formula_view(report: Report, est, checkpointing: bool) -> dict[str, int | None]:
    """The formula's figure for each traced row (None where the formula has no such row)."""
    f = {name: b for name, _, _, b in est.rows}
    opt = next((b for name, _, _, b in est.rows if name.startswith("optimizer state")), None)
    at_loss = est.activations_inputs + est.logits >= est.activations_ckpt + est.dequant_chunk
    act = (est.activations_inputs if at_loss else est.activations_ckpt) if checkpointing else est.activations_full
    out: dict[str, int | None] = {}
    for r in report.rows:
        if r.name in f:
            out[r.name] = f[r.name]
        elif r.name == "optimizer state":
            out[r.name] = opt
        elif r.name == "activations (layers)":
            out[r.name] = act
        elif r.name == LOSS_ROW:
            out[r.name] = est.logits if at_loss or not checkpointing else None
        elif r.name == "transients (backward, layers)":
            out[r.name] = None if at_loss and checkpointing else est.dequant_chunk
        else:
            out[r.name] = None
    return out


def _g(b: int | None) -> str:
    return f"{b / GiB:9.3f}" if b is not None else f"{'':>9}"


def render(report: Report, header: list[str], formula=None, checkpointing: bool = True) -> str:
    fv = formula_view(report, formula, checkpointing) if formula is not None else {}
    lines = list(header) + ["", f"{'component':<50}{'GiB/GPU':>9}  {'source':<10}{'formula':>9}{'ratio':>7}"]
    for r in report.rows:
        f = fv.get(r.name)
        ratio = f"{r.bytes / f:7.2f}" if f else f"{'':>7}"
        lines.append(f"{r.name:<50}{_g(r.bytes)}  {r.source:<10}{_g(f)}{ratio}")
    formula_peak = formula.peak(checkpointing) if formula is not None else None
    ratio = f"{report.peak / formula_peak:7.2f}" if formula_peak else ""
    lines += [f"{'peak allocated per GPU (at the ' + report.peak_phase + ')':<50}{_g(report.peak)}  "
              f"{report.rows[0].source if report.rows else '':<10}{_g(formula_peak)}{ratio}", "",
              "not seen by a trace, added as an allowance:"]
    lines += [f"  {r.name:<48}{_g(r.bytes)}  {r.source}" for r in report.allowance]
    lines += [f"{'total to plan for per GPU':<50}{_g(report.planned)}  "
              f"({report.planned / 1e9:.1f} GB)"]
    if report.host_bytes:
        lines.append(f"{'host memory at its peak (offloaded)':<50}{_g(report.host_bytes)}")
    if report.flops:
        ff = f"; formula {formula.flops / 1e12:.1f} TFLOP, ratio {report.flops / formula.flops:.2f}" \
            if formula is not None and formula.flops and checkpointing else ""
        lines.append(f"FLOPs (traced): {report.flops / 1e12:.1f} TFLOP per optimizer step, "
                     f"{report.flops / max(report.tokens, 1) / 1e9:.2f} GFLOP per token (forward, recomputation, "
                     f"backward; causal attention counted once){ff}")
    lines += report.notes
    return "\n".join(lines)
