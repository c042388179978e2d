"""NF4 storage for a stack of expert weight matrices, in bitsandbytes' 4-bit blockwise format.

    from qwen_sft.moe.nf4 import NF4Experts
    store = NF4Experts.quantize(experts.gate_up_proj.data, blocksize=64, double_quant=True)
    w = store.dequantize(torch.tensor([3, 17]), torch.bfloat16)   # [2, out, in], only experts 3 and 17

The packed bytes and scales are exactly what ``bitsandbytes.functional.quantize_4bit`` returns for the
whole ``[E, out, in]`` tensor (so a ``QuantState`` can be rebuilt from them). Because every expert
matrix holds a whole number of blocks, expert ``e`` owns a contiguous row of the packed data and of the
scales, which is what lets us dequantize only the experts that received tokens.
"""

from __future__ import annotations

import torch
from torch import nn


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Frozen Parameters rather than buffers: DDP broadcasts buffers on every forward (15 GB of packed
    # experts each step) but parameters only once, and reduces gradients only for requires_grad ones.
    return nn.Parameter(t, requires_grad=False)


def _fp32_bits(t: torch.Tensor) -> nn.Parameter:
    # fp32 scales are stored as their int32 bit pattern: model.to(torch.bfloat16), .half() and DeepSpeed's
    # bf16 cast convert every floating-point parameter and would silently round the quantization scales.
    return _frozen(t.float().contiguous().view(torch.int32))


def _as_fp32(p: torch.Tensor) -> torch.Tensor:
    return p.view(torch.float32)


class NF4Experts(nn.Module):
    """``E`` matrices of shape ``[out, in]`` stored as NF4 (0.5 byte per weight) plus blockwise scales.

    ``absmax`` holds one fp32 scale per block of ``blocksize`` weights, or with double quantization one
    uint8 code per block plus an fp32 scale per 256 codes (``absmax2``) and a global ``offset``
    (bitsandbytes' ``compress_statistics=True``). fp32 tensors are kept as int32 bit patterns (see
    ``_fp32_bits``); every parameter here is frozen and survives dtype casts of the model unchanged.
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, blocksize: int, double_quant: bool,
                 packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None, nested_code: torch.Tensor | None = None,
                 nested_blocksize: int = 256) -> None:
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.blocksize, self.double_quant, self.nested_blocksize = blocksize, double_quant, nested_blocksize
        self.packed = _frozen(packed)
        self.absmax = _frozen(absmax) if double_quant else _fp32_bits(absmax)  # uint8 codes, or fp32 scales
        if double_quant:
            self.absmax2 = _fp32_bits(absmax2)
            self.offset = _fp32_bits(offset)
            self.nested_code = _fp32_bits(nested_code)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_experts, self.out_features, self.in_features)

    @classmethod
    def quantize(cls, weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True) -> NF4Experts:
        """Quantize a ``[E, out, in]`` tensor on its own device (GPU at load time, CPU in tests)."""
        import bitsandbytes.functional as bnbf

        if weight.dim() != 3:
            raise ValueError(f"expected a 3-D expert tensor [E, out, in], got shape {tuple(weight.shape)}")
        e, out_f, in_f = weight.shape
        per_expert = out_f * in_f
        if per_expert % blocksize:
            raise ValueError(
                f"each expert matrix ({out_f}x{in_f}={per_expert} weights) must hold a whole number of "
                f"{blocksize=} blocks so that experts can be dequantized one by one; pick a blocksize dividing it"
            )
        packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=blocksize,
                                           compress_statistics=double_quant, quant_type="nf4")
        packed = packed.reshape(e, per_expert // 2)
        absmax = state.absmax.reshape(e, per_expert // blocksize)
        if not double_quant:
            return cls(e, out_f, in_f, blocksize, False, packed, absmax.float())
        return cls(e, out_f, in_f, blocksize, True, packed, absmax, state.state2.absmax.float(),
                   # shape [1], not a 0-dim scalar: DeepSpeed broadcasts params as p.view(uint8), which 0-dim refuses
                   state.offset.float().reshape(1), state.state2.code.float(), state.state2.blocksize)

    def scales(self) -> torch.Tensor:
        """fp32 blockwise scales ``[E, blocks_per_expert]`` (undoing the double quantization when on)."""
        if not self.double_quant:
            return _as_fp32(self.absmax)
        import bitsandbytes.functional as bnbf

        # The nested blocks (256 scales each) straddle experts, so undo them for the whole layer: that is
        # E*out*in/64 floats (25 MB for a 30B-A3B gate_up layer), transient, against 4x that per expert weight.
        flat = bnbf.dequantize_blockwise(self.absmax.reshape(-1), absmax=_as_fp32(self.absmax2),
                                         code=_as_fp32(self.nested_code), blocksize=self.nested_blocksize)
        return (flat.float() + _as_fp32(self.offset)).reshape(self.num_experts, -1)

    def dequantize(self, experts: torch.Tensor | None, dtype: torch.dtype,
                   scales: torch.Tensor | None = None) -> torch.Tensor:
        """The 16/32-bit weights ``[k, out, in]`` of the listed experts (all of them when ``None``)."""
        import bitsandbytes.functional as bnbf

        scales = self.scales() if scales is None else scales
        packed = self.packed if experts is None else self.packed.index_select(0, experts)
        absmax = scales if experts is None else scales.index_select(0, experts)
        k = packed.shape[0]
        # Shape (k, out*in), not (k, out, in): bitsandbytes 0.50.2's CPU kernel dequantizes wrongly when the
        # last dimension is not a multiple of the blocksize (e.g. in=32 < 64); whole rows of blocks are exact.
        state = bnbf.QuantState(absmax=absmax.reshape(-1), shape=torch.Size((k, self.out_features * self.in_features)),
                                code=bnbf.get_4bit_type("nf4", device=packed.device), blocksize=self.blocksize,
                                quant_type="nf4", dtype=dtype)
        return bnbf.dequantize_4bit(packed.reshape(-1, 1), state).view(k, self.out_features, self.in_features)

    def storage_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, out={self.out_features}, in={self.in_features}, nf4, " \
               f"blocksize={self.blocksize}, double_quant={self.double_quant}"


class DenseExperts(nn.Module):
    """The same interface over a frozen 16-bit ``[E, out, in]`` tensor (LoRA on a bf16 base)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = _frozen(weight)
        self.num_experts, self.out_features, self.in_features = weight.shape

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.weight.shape)

    def scales(self) -> None:
        return None

    def dequantize(self, experts: torch.Tensor | None, dtype: torch.dtype, scales: None = None) -> torch.Tensor:
        w = self.weight if experts is None else self.weight.index_select(0, experts)
        return w.to(dtype)

    def storage_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()
