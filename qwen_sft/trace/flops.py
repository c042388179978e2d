"""FLOP formulas ``torch.utils.flop_counter.FlopCounterMode`` lacks for this model, and a counter using them.

torch 2.13 counts no FLOPs for ``aten._grouped_mm`` (the expert engine's matmuls), ``bitsandbytes::gemm_4bit``
(NF4 attention projections) or the CPU flash-attention kernels, and counts causal attention at twice what a
causal kernel does; without these the count is less than half the step.
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter as fc
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _grouped_mm_flop(a_shape, b_shape, *args, **kwargs) -> int:
    # [M, K] x [G, K, N] (rows grouped by expert) | [K, M] x [M, N] with groups along M (weight grads)
    # | [G, M, K] x [G, K, N] (batched)
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[1]  # [G, M, K] x [K, N]


# FlopCounterMode hands custom formulas the shapes of tensor arguments (it wraps them in shape_wrapper).
def grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return _grouped_mm_flop(a_shape, b_shape)


def gemm_4bit_flop(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
    out_f, in_f = int(shape_b[0]), int(shape_b[1])
    rows = 1
    for d in a_shape[:-1]:
        rows *= d
    return 2 * rows * in_f * out_f


def _causal(is_causal: bool, flops: int) -> int:
    return flops // 2 if is_causal else flops


def cpu_flash_flop(q_shape, k_shape, v_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return _causal(is_causal, fc.sdpa_flop_count(q_shape, k_shape, v_shape))


def cpu_flash_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, out_shape_, logsumexp_shape,
                            dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return _causal(is_causal, fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape))


def custom_mapping() -> dict:
    mapping = {aten._grouped_mm: grouped_mm_flop}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_flash_flop
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = cpu_flash_backward_flop
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        mapping[torch.ops.bitsandbytes.gemm_4bit] = gemm_4bit_flop
    except (ImportError, AttributeError):
        pass
    return mapping


class FlopCounter(TorchDispatchMode):
    """FlopCounterMode's formulas (plus ours) without its module tracker: FlopCounterMode hooks every module's
    outputs for backward, and those hooks keep checkpointing's recomputed activations alive until the end of
    backward (a trace of 12 layers then shows 4x the activations of the same step without the counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = {**fc.flop_registry, **{k: fc.shape_wrapper(v) for k, v in custom_mapping().items()}}
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out

    def get_total_flops(self) -> int:
        return self.total


def flop_counter() -> FlopCounter:
    return FlopCounter()
