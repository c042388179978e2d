"""The expert engine's kernel seam: an implementation registered by name is the one the engine runs, the oracle
accepts an independent correct implementation and names the operation and tensor of a wrong one.

    python -m pytest -q tests/test_moe_kernels.py
"""

from __future__ import annotations

import collections

import pytest
import torch

from qwen_sft.moe import install_expert_engine
from qwen_sft.moe.kernels import (
    ENV,
    Backward,
    Forward,
    KernelMismatch,
    TorchKernels,
    check_kernels,
    register_kernels,
    resolve_kernels,
)
from tests.test_moe_engine import E, H, _engine, _routing


class CountingKernels(TorchKernels):
    """The reference, counting its calls per operation."""

    name = "counting"
    calls: collections.Counter = collections.Counter()

    def gate_up_forward(self, chunk, x):
        self.calls["gate_up_forward"] += 1
        return super().gate_up_forward(chunk, x)

    def down_forward(self, chunk, act):
        self.calls["down_forward"] += 1
        return super().down_forward(chunk, act)

    def down_backward(self, chunk, dy, act, lora_mid):
        self.calls["down_backward"] += 1
        return super().down_backward(chunk, dy, act, lora_mid)

    def gate_up_backward(self, chunk, dh, x, lora_mid):
        self.calls["gate_up_backward"] += 1
        return super().gate_up_backward(chunk, dh, x, lora_mid)


class DeltaWKernels:
    """An independent implementation: per expert, the dense W + s B A in fp32 and autograd's vector-Jacobian
    products for the backward (no hand-written gradient)."""

    name = "delta-w"

    @staticmethod
    def _fn(chunk, p, e):
        w = p.base.dequantize(chunk.experts[e:e + 1], torch.float32, p.scales)[0]
        if not p.has_lora:
            return lambda x: (x.float() @ w.T, None)
        a, b = p.lora_A[chunk.experts[e]].float(), p.lora_B[chunk.experts[e]].float()
        return lambda x, a=a, b=b: (x.float() @ (w + p.scaling * b @ a).T, x.float() @ a.T)

    def _forward(self, chunk, p, x):
        outs, mids, row = [], [], 0
        for e, n in enumerate(chunk.counts):
            out, mid = self._fn(chunk, p, e)(x[row:row + n])
            outs.append(out.to(x.dtype))
            mids.append(None if mid is None else mid.to(x.dtype))
            row += n
        return Forward(torch.cat(outs), None if mids[0] is None else torch.cat(mids))

    def _backward(self, chunk, p, dout, x, mid):
        with torch.enable_grad():  # the engine calls backward ops inside autograd's backward, where grad is off
            return self._vjp(chunk, p, dout, x)

    def _vjp(self, chunk, p, dout, x):
        dxs, das, dbs, row = [], [], [], 0
        for e, n in enumerate(chunk.counts):
            rows = slice(row, row + n)
            row += n
            xe = x[rows].float().requires_grad_()
            if not p.has_lora:
                (dx,) = torch.autograd.grad(self._fn(chunk, p, e)(xe)[0], [xe], dout[rows].float())
                dxs.append(dx.to(x.dtype))
                continue
            a = p.lora_A[chunk.experts[e]].float().requires_grad_()
            b = p.lora_B[chunk.experts[e]].float().requires_grad_()
            out = self._fn(chunk, p, e)(xe, a, b)[0]
            dx, da, db = torch.autograd.grad(out, [xe, a, b], dout[rows].float())
            dxs.append(dx.to(x.dtype))
            das.append(da)
            dbs.append(db)
        if not p.has_lora:
            return Backward(torch.cat(dxs), None, None)
        return Backward(torch.cat(dxs), torch.stack(das), torch.stack(dbs))

    def gate_up_forward(self, chunk, x):
        return self._forward(chunk, chunk.gate_up, x)

    def down_forward(self, chunk, act):
        return self._forward(chunk, chunk.down, act)

    def down_backward(self, chunk, dy, act, lora_mid):
        return self._backward(chunk, chunk.down, dy, act, lora_mid)

    def gate_up_backward(self, chunk, dh, x, lora_mid):
        return self._backward(chunk, chunk.gate_up, dh, x, lora_mid)


class UnscaledBGrad(TorchKernels):
    """A plausible bug: the B gradient of gate_up without the alpha / r scale."""

    name = "unscaled"

    def gate_up_backward(self, chunk, dh, x, lora_mid):
        out = super().gate_up_backward(chunk, dh, x, lora_mid)
        if out.lora_B is None:
            return out
        return out._replace(lora_B=out.lora_B / chunk.gate_up.scaling)


class SkipsLoraMid(TorchKernels):
    """Another: a down forward that forgets to hand back the r-wide intermediate."""

    name = "no-mid"

    def down_forward(self, chunk, act):
        return super().down_forward(chunk, act)._replace(lora_mid=None)


def _step(eng, x, idx, wts):
    x, wts = x.clone().requires_grad_(), wts.clone().requires_grad_()
    out = eng(x, idx, wts)
    params = [x, wts, eng.lora_gate_up_A, eng.lora_gate_up_B, eng.lora_down_A, eng.lora_down_B]
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    return [out, *torch.autograd.grad(out, params, upstream)]


@pytest.mark.parametrize("select", ["attribute", "env"])
def test_registered_kernels_are_what_the_engine_runs(monkeypatch, select):
    register_kernels("counting", CountingKernels)
    CountingKernels.calls.clear()
    eng = _engine(True, torch.float32, lora=True, chunk=3)
    x = torch.randn(29, H, generator=torch.Generator().manual_seed(1))
    idx, wts = _routing(29, 2, list(range(E)), seed=2, dtype=torch.float32)
    reference = _step(eng, x, idx, wts)
    assert sum(CountingKernels.calls.values()) == 0
    if select == "attribute":
        eng.kernels = "counting"
    else:
        monkeypatch.setenv(ENV, "counting")
    assert resolve_kernels(eng.kernels).name == "counting"
    ours = _step(eng, x, idx, wts)
    chunks = -(-int(torch.bincount(idx.flatten(), minlength=E).count_nonzero()) // 3)  # 8 hit experts, 3 a chunk
    assert dict(CountingKernels.calls) == dict.fromkeys(
        ["gate_up_forward", "down_forward", "down_backward", "gate_up_backward"], chunks)
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)  # the same arithmetic through the seam


def test_an_independent_implementation_passes_the_oracle_and_trains_the_same():
    assert check_kernels(TorchKernels()) == check_kernels(DeltaWKernels()) > 0
    register_kernels("delta-w", DeltaWKernels)
    eng = _engine(True, torch.float32, lora=True)
    x = torch.randn(23, H, generator=torch.Generator().manual_seed(4))
    idx, wts = _routing(23, 2, list(range(E)), seed=5, dtype=torch.float32)
    reference = _step(eng, x, idx, wts)
    eng.kernels = "delta-w"
    for a, b in zip(_step(eng, x, idx, wts), reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernels,message", [
    (UnscaledBGrad(), "unscaled.gate_up_backward: lora_B differs from the torch reference"),
    (SkipsLoraMid(), "no-mid.down_forward: lora_mid is missing"),
])
def test_the_oracle_names_a_wrong_kernel(kernels, message):
    with pytest.raises(KernelMismatch, match=message):
        check_kernels(kernels)


def test_unknown_kernels_fail_before_the_model_is_touched(monkeypatch):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         num_experts=4, num_experts_per_tok=2)
    model = Qwen3MoeForCausalLM(cfg)
    with pytest.raises(ValueError, match="expert kernels 'nope' .engine.kernels. are not registered; known: .*torch"):
        install_expert_engine(model, quantize_experts=False, kernels="nope")
    monkeypatch.setenv(ENV, "nope")
    with pytest.raises(ValueError, match=f"'nope' .{ENV}."):
        install_expert_engine(model, quantize_experts=False)
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"  # left as it was
