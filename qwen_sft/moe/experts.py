"""The experts module that replaces ``Qwen3MoeExperts``: NF4 (or frozen 16-bit) base, per-expert LoRA factors.

Installed by ``qwen_sft.moe.install_expert_engine``; same call signature as the stock module,
``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``.

Per expert e with routed rows X (n x H), W1 = gate_up [2I, H], W2 = down [H, I], s = alpha / r:

    h = X W1^T + s (X A1^T) B1^T          gate, up = split(h)        a = silu(gate) * up
    y = a W2^T + s (a A2^T) B2^T          out[token] += routing_weight * y

The low-rank terms go through the r-wide intermediates only, so the dense E x out x in delta-W that
peft's ``ParamWrapper`` builds is never formed. Base weights are dequantized per chunk of experts that
received tokens, used, and dropped; backward dequantizes them again instead of saving them, so only the
routed inputs, the pre-activations h and the r-wide intermediates are kept for backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qwen_sft.moe.nf4 import DenseExperts, NF4Experts

Store = NF4Experts | DenseExperts


def _chunks(experts: list[int], counts: list[int], size: int):
    """Yield (expert ids, their counts, first row) for consecutive groups of at most ``size`` hit experts."""
    row = 0
    for i in range(0, len(experts), size):
        ids, cnt = experts[i:i + size], counts[i:i + size]
        yield ids, cnt, row
        row += sum(cnt)


class _RoutedExpertsFn(torch.autograd.Function):
    """y = expert_e(x) for rows grouped by expert; LoRA factors are inputs so autograd hands us their grads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, engine: ExpertEngine, experts: list[int], counts: list[int],
                a1: torch.Tensor | None, b1: torch.Tensor | None, a2: torch.Tensor | None,
                b2: torch.Tensor | None) -> torch.Tensor:
        dtype, inter, s = x.dtype, engine.intermediate_dim, engine.lora_scaling
        lora = a1 is not None
        y = x.new_empty(x.shape[0], engine.hidden_dim)
        h_all = x.new_empty(x.shape[0], 2 * inter)
        t1_all = x.new_empty(x.shape[0], a1.shape[1]) if lora else None
        t2_all = x.new_empty(x.shape[0], a2.shape[1]) if lora else None
        sc1, sc2 = engine.gate_up_base.scales(), engine.down_base.scales()
        for ids, cnt, row in _chunks(experts, counts, engine.chunk_experts):
            idx = torch.tensor(ids, device=x.device)
            w1 = engine.gate_up_base.dequantize(idx, dtype, sc1)
            w2 = engine.down_base.dequantize(idx, dtype, sc2)
            for j, (e, n) in enumerate(zip(ids, cnt)):
                rows = slice(row, row + n)
                row += n
                xe = x[rows]
                h = xe @ w1[j].T
                if lora:
                    t1 = xe @ a1[e].to(dtype).T
                    h = h + s * (t1 @ b1[e].to(dtype).T)
                    t1_all[rows] = t1
                h_all[rows] = h
                gate, up = h.chunk(2, dim=-1)
                act = F.silu(gate) * up
                ye = act @ w2[j].T
                if lora:
                    t2 = act @ a2[e].to(dtype).T
                    ye = ye + s * (t2 @ b2[e].to(dtype).T)
                    t2_all[rows] = t2
                y[rows] = ye
            del w1, w2  # the dequantized chunk lives only while its tokens are computed
        ctx.engine, ctx.experts, ctx.counts = engine, experts, counts
        ctx.save_for_backward(x, h_all, t1_all, t2_all, a1, b1, a2, b2)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, h_all, t1_all, t2_all, a1, b1, a2, b2 = ctx.saved_tensors
        engine: ExpertEngine = ctx.engine
        dtype, s = x.dtype, engine.lora_scaling
        lora = a1 is not None
        dy = dy.to(dtype)
        dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grads = [torch.zeros_like(p, dtype=torch.float32) if lora else None for p in (a1, b1, a2, b2)]
        sc1, sc2 = engine.gate_up_base.scales(), engine.down_base.scales()
        for ids, cnt, row in _chunks(ctx.experts, ctx.counts, engine.chunk_experts):
            idx = torch.tensor(ids, device=x.device)
            # Recompute the dequantized weights rather than having saved them in forward.
            w1 = engine.gate_up_base.dequantize(idx, dtype, sc1)
            w2 = engine.down_base.dequantize(idx, dtype, sc2)
            for j, (e, n) in enumerate(zip(ids, cnt)):
                rows = slice(row, row + n)
                row += n
                dye, h = dy[rows], h_all[rows]
                gate, up = h.chunk(2, dim=-1)
                sig = torch.sigmoid(gate)
                silu = gate * sig
                act = silu * up
                da = dye @ w2[j]
                if lora:
                    a2e, b2e = a2[e].to(dtype), b2[e].to(dtype)
                    dyb = dye @ b2e
                    da = da + s * (dyb @ a2e)
                    grads[3][e] += s * (dye.T @ t2_all[rows]).float()
                    grads[2][e] += s * (dyb.T @ act).float()
                dgate = da * up * (sig * (1 + gate * (1 - sig)))
                dh = torch.cat([dgate, da * silu], dim=-1)
                if dx is not None:
                    dx[rows] = dh @ w1[j]
                if lora:
                    a1e, b1e = a1[e].to(dtype), b1[e].to(dtype)
                    dhb = dh @ b1e
                    if dx is not None:
                        dx[rows] += s * (dhb @ a1e)
                    grads[1][e] += s * (dh.T @ t1_all[rows]).float()
                    grads[0][e] += s * (dhb.T @ x[rows]).float()
            del w1, w2
        grads = [g.to(p.dtype) if g is not None else None for g, p in zip(grads, (a1, b1, a2, b2))]
        return (dx, None, None, None, *grads)


class ExpertEngine(nn.Module):
    """Drop-in for ``Qwen3MoeExperts`` (``mlp.experts``) with a 4-bit or frozen base and optional LoRA factors.

    LoRA parameters (names contain ``lora_`` so peft's ``get_peft_model`` leaves them trainable):
    ``lora_gate_up_A [E, r, H]``, ``lora_gate_up_B [E, 2I, r]``, ``lora_down_A [E, r, I]``, ``lora_down_B [E, H, r]``.
    """

    def __init__(self, gate_up: Store, down: Store, *, hidden_act: str = "silu", chunk_experts: int = 32) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"the expert engine implements SwiGLU experts (hidden_act='silu'), got {hidden_act=}")
        self.num_experts, two_inter, self.hidden_dim = gate_up.shape
        self.intermediate_dim = two_inter // 2
        if tuple(down.shape) != (self.num_experts, self.hidden_dim, self.intermediate_dim):
            raise ValueError(f"down_proj shape {tuple(down.shape)} does not match gate_up_proj {tuple(gate_up.shape)}")
        self.gate_up_base, self.down_base = gate_up, down
        self.chunk_experts = chunk_experts
        self.lora_rank, self.lora_alpha, self.lora_scaling = 0, 0.0, 0.0

    def add_lora(self, r: int, alpha: float, dtype: torch.dtype, seed: int | None = None) -> None:
        """Per-expert factors initialised like peft (A Kaiming-uniform, B zero), so the model starts unchanged."""
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        device = self.gate_up_base.packed.device if isinstance(self.gate_up_base, NF4Experts) \
            else self.gate_up_base.weight.device
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)

        def kaiming(rows: int, cols: int) -> torch.Tensor:
            # peft: kaiming_uniform_(a=sqrt(5)) on an [r, in] weight -> U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / cols ** 0.5
            return (torch.rand(e, rows, cols, generator=gen) * 2 - 1).mul_(bound).to(device, dtype)

        self.lora_gate_up_A = nn.Parameter(kaiming(r, h))
        self.lora_gate_up_B = nn.Parameter(torch.zeros(e, 2 * i, r, device=device, dtype=dtype))
        self.lora_down_A = nn.Parameter(kaiming(r, i))
        self.lora_down_B = nn.Parameter(torch.zeros(e, h, r, device=device, dtype=dtype))
        self.lora_rank, self.lora_alpha, self.lora_scaling = r, float(alpha), float(alpha) / r

    @property
    def has_lora(self) -> bool:
        return self.lora_rank > 0

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat, minlength=self.num_experts)[: self.num_experts]
        hit = torch.nonzero(counts).flatten()
        experts, hit_counts = hit.tolist(), counts[hit].tolist()
        compute_dtype = self.compute_dtype or hidden_states.dtype
        x = hidden_states.index_select(0, token_of).to(compute_dtype)
        lora = (self.lora_gate_up_A, self.lora_gate_up_B, self.lora_down_A, self.lora_down_B) if self.has_lora \
            else (None, None, None, None)
        y = _RoutedExpertsFn.apply(x, self, experts, hit_counts, *lora)
        y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(hidden_states)
        return out.index_add(0, token_of, y.to(hidden_states.dtype))

    compute_dtype: torch.dtype | None = None

    def storage_bytes(self) -> int:
        return self.gate_up_base.storage_bytes() + self.down_base.storage_bytes()

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, " \
               f"lora_r={self.lora_rank}, lora_alpha={self.lora_alpha}, chunk_experts={self.chunk_experts}"
