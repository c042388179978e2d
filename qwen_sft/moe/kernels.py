"""The expert engine's kernel seam: the four per-chunk operations behind one small interface.

    from qwen_sft.moe.kernels import check_kernels, register_kernels
    register_kernels("fused", FusedKernels)     # a new implementation: one file, these four methods
    check_kernels(FusedKernels())               # against the torch reference; raises naming the op and the tensor
    QWEN_SFT_EXPERT_KERNELS=fused python train.py ...        # or install_expert_engine(..., kernels="fused")

For one chunk of experts (at most ``chunk_experts`` that received tokens, rows grouped by expert) and one fused
projection W (gate_up ``[E, 2I, H]`` or down ``[E, H, I]``) with LoRA factors A ``[E, r, in]``, B ``[E, out, r]``:

    forward:   out = x W_e^T + s (x A_e^T) B_e^T          lora_mid = x A_e^T   (r wide, kept for backward)
    backward:  dx  = dout W_e + s (dout B_e) A_e
               dA_e = s (dout B_e)^T x        dB_e = s dout^T lora_mid        (fp32, summed over the expert's rows)

Dequantizing W is part of each operation (a fused kernel may read the NF4 bytes directly); the SwiGLU between the
two projections, the routing and the accumulation of the factor gradients stay in the engine
(qwen_sft/moe/experts.py). ``TorchKernels`` is the reference implementation and the oracle ``check_kernels``
compares a candidate with.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch.nn import functional as F

from qwen_sft.moe.nf4 import DenseExperts, NF4Experts

Store = NF4Experts | DenseExperts
ENV = "QWEN_SFT_EXPERT_KERNELS"
DEFAULT = "torch"


@dataclass(frozen=True)
class Projection:
    """One fused projection of a layer: its frozen base and, with LoRA, the layer's whole factor parameters."""

    base: Store
    scales: torch.Tensor | None  # fp32 block scales of the whole layer (NF4), computed once per engine call
    lora_A: torch.Tensor | None = None  # [E, r, in]
    lora_B: torch.Tensor | None = None  # [E, out, r]
    scaling: float = 0.0  # alpha / r

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None


@dataclass
class Chunk:
    """A chunk of experts that received tokens: their ids, their row counts (rows are grouped by expert, in this
    order), the compute dtype and whether torch's grouped GEMM may run these shapes."""

    experts: torch.Tensor  # int64 expert ids [k]
    counts: list[int]
    dtype: torch.dtype
    grouped: bool
    gate_up: Projection
    down: Projection

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def weight(self, p: Projection) -> torch.Tensor:
        """The chunk's base weights ``[k, out, in]`` in the compute dtype (dequantized now, dropped by the caller)."""
        return p.base.dequantize(self.experts, self.dtype, p.scales)

    def factors(self, p: Projection) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's LoRA factors ``A [k, r, in]``, ``B [k, out, r]`` in the compute dtype."""
        return p.lora_A[self.experts].to(self.dtype), p.lora_B[self.experts].to(self.dtype)

    @functools.cached_property
    def ops(self) -> GroupOps:
        return GroupOps(self.counts, self.experts.device, self.grouped)


class Forward(NamedTuple):
    out: torch.Tensor  # [rows, out]
    lora_mid: torch.Tensor | None  # x A^T [rows, r]: what the B gradient needs (None without LoRA)


class Backward(NamedTuple):
    input: torch.Tensor  # gradient of the projection's input rows [rows, in]
    lora_A: torch.Tensor | None  # [k, r, in] fp32, the chunk's experts in ``Chunk.experts`` order
    lora_B: torch.Tensor | None  # [k, out, r] fp32


class ExpertKernels(Protocol):
    """What an implementation provides; ``TorchKernels`` is the reference. Rows arrive grouped by expert."""

    name: str

    def gate_up_forward(self, chunk: Chunk, x: torch.Tensor) -> Forward: ...

    def down_forward(self, chunk: Chunk, act: torch.Tensor) -> Forward: ...

    def down_backward(self, chunk: Chunk, dy: torch.Tensor, act: torch.Tensor,
                      lora_mid: torch.Tensor | None) -> Backward: ...

    def gate_up_backward(self, chunk: Chunk, dh: torch.Tensor, x: torch.Tensor,
                         lora_mid: torch.Tensor | None) -> Backward: ...


class GroupOps:
    """Per-group matmuls over rows grouped by expert: one grouped GEMM each, or a loop over experts."""

    def __init__(self, counts: list[int], device: torch.device, grouped: bool) -> None:
        self.counts, self.grouped = counts, grouped
        self.offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32) if grouped else None
        self._gmm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

    def _loop(self, fn, *tensors: torch.Tensor) -> list[torch.Tensor]:
        out, row = [], 0
        for g, n in enumerate(self.counts):
            out.append(fn(g, slice(row, row + n), *tensors))
            row += n
        return out

    def nt(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x_g @ w_g^T for w [k, out, in] (a linear layer per expert)."""
        if self.grouped:
            return self._gmm(x, w.transpose(-2, -1), offs=self.offs)
        return torch.cat(self._loop(lambda g, r, x, w: x[r] @ w[g].T, x, w))

    def nn(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x_g @ w_g for w [k, K, N] (the input-gradient direction)."""
        if self.grouped:
            return self._gmm(x, w, offs=self.offs)
        return torch.cat(self._loop(lambda g, r, x, w: x[r] @ w[g], x, w))

    def tn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a_g^T @ b_g -> [k, a_cols, b_cols] (weight gradients, summed over each expert's rows)."""
        if self.grouped:
            # Grouping along the reduction dim needs every group to start on a 16-byte boundary (the reason
            # MoE trainers pad expert groups): copy each expert's rows to a 16-row-aligned slot, zeros between.
            counts = torch.tensor(self.counts, device=a.device)
            padded = (counts + 15) // 16 * 16
            starts = torch.cumsum(counts, 0) - counts
            slots = torch.cumsum(padded, 0) - padded
            dest = torch.arange(a.shape[0], device=a.device) + torch.repeat_interleave(slots - starts, counts)
            total = int(padded.sum())
            a_p = a.new_zeros(total, a.shape[1]).index_copy_(0, dest, a)
            b_p = b.new_zeros(total, b.shape[1]).index_copy_(0, dest, b)
            offs = torch.cumsum(padded, 0).to(torch.int32)
            return self._gmm(a_p.T.contiguous(), b_p, offs=offs)
        return torch.stack(self._loop(lambda g, r, a, b: a[r].T @ b[r], a, b))


class TorchKernels:
    """The reference: dequantize the chunk, then grouped GEMMs (or a loop over experts) in the compute dtype."""

    name = "torch"

    def gate_up_forward(self, chunk: Chunk, x: torch.Tensor) -> Forward:
        return self._forward(chunk, chunk.gate_up, x)

    def down_forward(self, chunk: Chunk, act: torch.Tensor) -> Forward:
        return self._forward(chunk, chunk.down, act)

    def down_backward(self, chunk: Chunk, dy: torch.Tensor, act: torch.Tensor,
                      lora_mid: torch.Tensor | None) -> Backward:
        return self._backward(chunk, chunk.down, dy, act, lora_mid)

    def gate_up_backward(self, chunk: Chunk, dh: torch.Tensor, x: torch.Tensor,
                         lora_mid: torch.Tensor | None) -> Backward:
        return self._backward(chunk, chunk.gate_up, dh, x, lora_mid)

    @staticmethod
    def _forward(chunk: Chunk, p: Projection, x: torch.Tensor) -> Forward:
        ops = chunk.ops
        out = ops.nt(x, chunk.weight(p))  # the dequantized weight lives only for this matmul
        if not p.has_lora:
            return Forward(out, None)
        a, b = chunk.factors(p)
        mid = ops.nt(x, a)
        return Forward(out + p.scaling * ops.nt(mid, b), mid)

    @staticmethod
    def _backward(chunk: Chunk, p: Projection, dout: torch.Tensor, x: torch.Tensor,
                  mid: torch.Tensor | None) -> Backward:
        ops, s = chunk.ops, p.scaling
        dx = ops.nn(dout, chunk.weight(p))  # dequantized again rather than saved in forward
        if not p.has_lora:
            return Backward(dx, None, None)
        a, b = chunk.factors(p)
        dob = ops.nn(dout, b)
        dx = dx + s * ops.nn(dob, a)
        return Backward(dx, (s * ops.tn(dob, x)).float(), (s * ops.tn(dout, mid)).float())


_REGISTRY: dict[str, Callable[[], ExpertKernels]] = {"torch": TorchKernels}


def register_kernels(name: str, factory: Callable[[], ExpertKernels]) -> None:
    """Make an implementation selectable by ``name`` (``engine.kernels``, ``$QWEN_SFT_EXPERT_KERNELS``)."""
    _REGISTRY[name] = factory


def registered() -> list[str]:
    return sorted(_REGISTRY)


@functools.cache
def _instance(name: str, factory: Callable[[], ExpertKernels]) -> ExpertKernels:
    return factory()


def resolve_kernels(name: str | None = None) -> ExpertKernels:
    """The implementation named ``name``, else ``$QWEN_SFT_EXPERT_KERNELS``, else the torch reference."""
    where = "engine.kernels" if name else ENV
    name = name or os.environ.get(ENV) or DEFAULT
    if name not in _REGISTRY:
        raise ValueError(f"expert kernels {name!r} ({where}) are not registered; known: {', '.join(registered())} "
                         f"(qwen_sft.moe.kernels.register_kernels adds one)")
    return _instance(name, _REGISTRY[name])


class KernelMismatch(AssertionError):
    pass


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _case(quantize: bool, lora: bool, dtype: torch.dtype, grouped: bool, seed: int,
          experts: int = 6, hidden: int = 64, inter: int = 32, r: int = 8) -> tuple[Chunk, list[torch.Tensor]]:
    """A random chunk of 4 of ``experts`` experts with uneven counts (one expert with a single row)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.1
    stores = [NF4Experts.quantize(w.to(dtype), double_quant=True) if quantize else DenseExperts(w.to(dtype))
              for w in (w1, w2)]
    projections = []
    for store, (out_f, in_f) in zip(stores, ((2 * inter, hidden), (hidden, inter))):
        factors = (torch.randn(experts, r, in_f, generator=g) / in_f ** 0.5,
                   torch.randn(experts, out_f, r, generator=g) * 0.1) if lora else (None, None)
        projections.append(Projection(store, store.scales(), *factors, scaling=2.0 if lora else 0.0))
    counts = [5, 1, 9, 17]
    chunk = Chunk(torch.tensor([4, 0, 5, 2]), counts, dtype, grouped, *projections)
    rows = sum(counts)
    inputs = [torch.randn(rows, n, generator=g).to(dtype) for n in (hidden, inter, hidden, 2 * inter)]
    return chunk, inputs  # x, act, dy, dh


def _outputs(k: ExpertKernels, reference: ExpertKernels, chunk: Chunk,
             inputs: list[torch.Tensor]) -> dict[str, NamedTuple]:
    x, act, dy, dh = inputs
    return {  # the backward ops get the reference's saved r-wide intermediates, as the engine would hand them
        "gate_up_forward": k.gate_up_forward(chunk, x),
        "down_forward": k.down_forward(chunk, act),
        "down_backward": k.down_backward(chunk, dy, act, reference.down_forward(chunk, act).lora_mid),
        "gate_up_backward": k.gate_up_backward(chunk, dh, x, reference.gate_up_forward(chunk, x).lora_mid),
    }


def check_kernels(candidate: ExpertKernels, reference: ExpertKernels | None = None, *,
                  tolerance: dict[torch.dtype, float] | None = None) -> int:
    """Run the four operations of ``candidate`` and of the reference on the same random chunks (NF4 and 16-bit
    bases, with and without LoRA, fp32 and bf16, grouped GEMM and loop) and compare every named output; raises
    ``KernelMismatch`` naming the operation, the output and the case. Returns the number of tensors compared."""
    reference = reference or TorchKernels()
    tolerance = tolerance or {torch.float32: 1e-5, torch.bfloat16: 2e-2}
    grouped_options = (True, False) if hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm") else (False,)
    checked = 0
    cases = itertools.product((torch.float32, torch.bfloat16), (True, False), (True, False), grouped_options)
    for seed, (dtype, quantize, lora, grouped) in enumerate(cases):
        chunk, inputs = _case(quantize, lora, dtype, grouped, seed)
        case = f"dtype={dtype}, nf4={quantize}, lora={lora}, grouped={grouped}"
        want, got = _outputs(reference, reference, chunk, inputs), _outputs(candidate, reference, chunk, inputs)
        for op in want:
            for field in want[op]._fields:
                a, b = getattr(got[op], field), getattr(want[op], field)
                if (a is None) != (b is None):
                    raise KernelMismatch(f"{candidate.name}.{op}: {field} is "
                                         f"{'missing' if a is None else 'unexpected'} ({case})")
                if b is None:
                    continue
                if a.shape != b.shape or a.dtype != b.dtype:
                    raise KernelMismatch(f"{candidate.name}.{op}: {field} is {tuple(a.shape)} {a.dtype}, the "
                                         f"reference's {tuple(b.shape)} {b.dtype} ({case})")
                err = _rel(a, b)
                if not err <= tolerance[dtype]:
                    raise KernelMismatch(f"{candidate.name}.{op}: {field} differs from the {reference.name} "
                                         f"reference: relative error {err:.2e} > {tolerance[dtype]:.0e} ({case})")
                checked += 1
    return checked
