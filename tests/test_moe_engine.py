"""Expert engine vs the reference computation: dequantized weights + dense delta-W through the eager loop.

    python -m pytest -q tests/test_moe_engine.py
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from qwen_sft.moe import DenseExperts, ExpertEngine, NF4Experts

E, H, INTER, R = 8, 64, 32, 8


def _stock_experts(dtype: torch.dtype):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=INTER, num_experts=E, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"  # the per-expert loop is the reference
    return Qwen3MoeExperts(cfg).to(dtype)


def _engine(quantize: bool, dtype: torch.dtype, lora: bool, chunk: int = 3, seed: int = 0,
            grouped: bool = True) -> ExpertEngine:
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(E, 2 * INTER, H, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(E, H, INTER, generator=g) * 0.1).to(dtype)
    if quantize:
        stores = NF4Experts.quantize(w1, double_quant=True), NF4Experts.quantize(w2, double_quant=False)
    else:
        stores = DenseExperts(w1), DenseExperts(w2)
    eng = ExpertEngine(*stores, chunk_experts=chunk)  # chunk 3 < 8 experts: exercises several dequant chunks
    eng.compute_dtype = dtype
    eng.grouped_mm = None if grouped else False  # None: torch's grouped GEMM (usable here), False: per-expert loop
    if lora:
        eng.add_lora(R, 8.0, dtype=torch.float32, seed=seed, gate_up_r=2 * R, gate_up_alpha=32.0)
        with torch.no_grad():  # B starts at zero (like peft); make the low-rank path matter
            eng.lora_gate_up_B.normal_(0, 0.1, generator=g)
            eng.lora_down_B.normal_(0, 0.1, generator=g)
    return eng


def _reference(eng: ExpertEngine, x, idx, wts, dtype):
    """Stock eager experts on W + s * B @ A (dense delta-W), differentiable in x, weights, A and B."""
    stock = _stock_experts(dtype)
    w1 = eng.gate_up_base.dequantize(None, torch.float32)
    w2 = eng.down_base.dequantize(None, torch.float32)
    params = {"gate_up_proj": w1, "down_proj": w2}
    if eng.has_lora:
        s1, s2 = eng.lora_scaling["gate_up"], eng.lora_scaling["down"]
        params["gate_up_proj"] = w1 + s1 * torch.einsum("eor,eri->eoi", eng.lora_gate_up_B, eng.lora_gate_up_A)
        params["down_proj"] = w2 + s2 * torch.einsum("eor,eri->eoi", eng.lora_down_B, eng.lora_down_A)
    params = {k: v.to(dtype) for k, v in params.items()}
    return functional_call(stock, params, (x, idx, wts))


def _routing(tokens: int, top_k: int, allowed: list[int], seed: int, dtype):
    """Random top-k routing restricted to ``allowed`` experts (others get no tokens), uneven counts."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(len(allowed), generator=g) ** 3 + 0.01  # skewed: uneven token counts per expert
    idx = torch.stack([torch.tensor(allowed)[torch.multinomial(weights, top_k, generator=g)] for _ in range(tokens)])
    wts = torch.softmax(torch.randn(tokens, top_k, generator=g), -1).to(dtype)
    return idx, wts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


CASES = [
    # (dtype, quantize, top_k, allowed experts, tolerance)
    (torch.float32, True, 2, list(range(E)), 1e-5),
    (torch.float32, True, 1, [0, 3, 4, 7], 1e-5),  # top-1; experts 1, 2, 5, 6 get no tokens
    (torch.float32, False, 8, list(range(E)), 1e-5),  # top-8: every token in every expert
    (torch.bfloat16, True, 8, list(range(E)), 3e-2),
    (torch.bfloat16, True, 1, [2, 5], 3e-2),
    (torch.bfloat16, False, 2, [1, 2, 3, 6], 3e-2),
]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("dtype,quantize,top_k,allowed,tol", CASES)
def test_forward_and_gradients_match_reference(dtype, quantize, top_k, allowed, tol, grouped):
    eng = _engine(quantize, dtype, lora=True, grouped=grouped)
    tokens = 37  # odd, so the per-expert counts are uneven
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert eng.use_grouped_mm(x) is grouped
    idx, wts = _routing(tokens, top_k, allowed, seed=2, dtype=dtype)
    counts = torch.bincount(idx.flatten(), minlength=E)
    assert (counts == 0).sum().item() == E - len(allowed)
    x1, w1 = x.clone().requires_grad_(), wts.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), wts.clone().requires_grad_()

    out = eng(x1, idx, w1)
    ref = _reference(eng, x2, idx, w2, dtype)
    assert out.dtype == ref.dtype == dtype
    assert _rel(out, ref) < tol

    upstream = torch.randn_like(out.float(), generator=torch.Generator().manual_seed(3)).to(dtype)
    lora = [eng.lora_gate_up_A, eng.lora_gate_up_B, eng.lora_down_A, eng.lora_down_B]
    g_ours = torch.autograd.grad(out, [x1, w1, *lora], upstream)
    g_ref = torch.autograd.grad(ref, [x2, w2, *lora], upstream)
    for name, a, b in zip(["x", "routing", "A1", "B1", "A2", "B2"], g_ours, g_ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel(a, b) < tol * (1 if dtype == torch.float32 else 2), name
    # Experts that received no tokens get exactly zero LoRA gradient.
    silent = (counts == 0).nonzero().flatten()
    for g in g_ours[2:]:
        assert torch.count_nonzero(g[silent]).item() == 0


def test_no_lora_frozen_base_only_input_grad():
    eng = _engine(True, torch.float32, lora=False)
    x = torch.randn(10, H, requires_grad=True)
    idx, wts = _routing(10, 2, list(range(E)), seed=4, dtype=torch.float32)
    out = eng(x, idx, wts)
    ref_x = x.detach().clone().requires_grad_()
    ref = _reference(eng, ref_x, idx, wts, torch.float32)
    assert _rel(out, ref) < 1e-5
    (gx,) = torch.autograd.grad(out.sum(), [x])
    (gr,) = torch.autograd.grad(ref.sum(), [ref_x])
    assert _rel(gx, gr) < 1e-5
    assert [n for n, p in eng.named_parameters() if p.requires_grad] == []


def test_chunk_size_does_not_change_results():
    x = torch.randn(20, H, generator=torch.Generator().manual_seed(5))
    idx, wts = _routing(20, 2, list(range(E)), seed=6, dtype=torch.float32)
    outs = [_engine(True, torch.float32, lora=True, chunk=c, grouped=False)(x, idx, wts) for c in (1, 3, 8)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    grouped = [_engine(True, torch.float32, lora=True, chunk=c)(x, idx, wts) for c in (1, 8)]
    torch.testing.assert_close(grouped[0], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped[1], outs[0], rtol=1e-5, atol=1e-6)


def test_nf4_storage_bytes_and_error():
    w = torch.randn(E, 2 * INTER, H, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    n = w.numel()
    plain = NF4Experts.quantize(w, blocksize=64, double_quant=False)
    dq = NF4Experts.quantize(w, blocksize=64, double_quant=True)
    # 4 bits per weight + one fp32 scale per 64 weights; double quant: one uint8 per 64 + fp32 per 256 scales.
    assert plain.storage_bytes() == n // 2 + (n // 64) * 4
    assert dq.storage_bytes() == n // 2 + n // 64 + (n // 64 // 256) * 4 + 4 + 256 * 4
    assert plain.packed.dtype == torch.uint8 and tuple(plain.packed.shape) == (E, 2 * INTER * H // 2)
    # Identical to bitsandbytes' own round trip on the whole tensor, and per-expert dequant matches it.
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w.float(), blocksize=64, quant_type="nf4")
    full = bnbf.dequantize_4bit(packed, bnbf.QuantState(
        absmax=state.absmax, shape=torch.Size((E, 2 * INTER * H)), code=state.code, blocksize=64,
        quant_type="nf4", dtype=torch.float32)).view_as(w)
    assert torch.equal(plain.dequantize(None, torch.float32), full)
    assert torch.equal(plain.dequantize(torch.tensor([5, 2]), torch.float32), full[[5, 2]])
    rel = _rel(dq.dequantize(None, torch.float32), w)
    assert 0.05 < rel < 0.12  # NF4's known error on Gaussian weights (~0.09); not a silent copy, not garbage


def test_quantize_rejects_partial_blocks():
    with pytest.raises(ValueError, match="whole number of"):
        NF4Experts.quantize(torch.randn(2, 3, 10), blocksize=64)


def test_dtype_cast_of_the_model_keeps_nf4_scales_exact():
    """model.to(bfloat16) / DeepSpeed's bf16 cast must not round the fp32 quantization scales."""
    for double_quant in (False, True):
        store = NF4Experts.quantize(torch.randn(E, H, INTER, generator=torch.Generator().manual_seed(8)),
                                    double_quant=double_quant)
        before = store.dequantize(None, torch.float32)
        store.to(torch.bfloat16).half()
        assert all(not p.is_floating_point() for p in store.parameters())
        assert torch.equal(store.dequantize(None, torch.float32), before)


def test_backward_keeps_no_routed_rows():
    """The engine saves h [T*K, 2I], the r-wide intermediates and the routing bookkeeping; the routed inputs and
    outputs ([T*K, H] each) are gathered and scattered a chunk at a time and never saved (their bytes at 32K
    tokens: 4 GiB a layer)."""
    eng = _engine(True, torch.float32, lora=True)
    tokens, top_k = 37, 8
    x = torch.randn(tokens, H, requires_grad=True)
    idx, wts = _routing(tokens, top_k, list(range(E)), seed=2, dtype=torch.float32)
    wts.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = eng(x, idx, wts)
    known = {t.untyped_storage().data_ptr() for t in [x, wts, *eng.parameters()]}
    new = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
           if t.untyped_storage().data_ptr() not in known}
    rows = tokens * top_k
    # h (2I), gate_up's rank-2R and down's rank-R intermediates, one weight a row (fp32); token_of and order (int64)
    assert sum(new.values()) <= rows * 4 * (2 * INTER + 2 * R + R + 1) + rows * 8 * 2
    # and backward still gives the reference's gradients (test_forward_and_gradients_match_reference covers more)
    ref_x = x.detach().clone().requires_grad_()
    ref_w = wts.detach().clone().requires_grad_()
    ref = _reference(eng, ref_x, idx, ref_w, torch.float32)
    for a, b in zip(torch.autograd.grad(out.sum(), [x, wts]), torch.autograd.grad(ref.sum(), [ref_x, ref_w])):
        assert _rel(a, b) < 1e-5
