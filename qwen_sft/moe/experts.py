"""The experts module that replaces ``Qwen3MoeExperts``: NF4 (or frozen 16-bit) base, per-expert LoRA factors.

Installed by ``qwen_sft.moe.install_expert_engine``; same call signature as the stock module,
``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``.

Per expert e with routed rows X (n x H), W1 = gate_up [2I, H], W2 = down [H, I], s = alpha / r:

    h = X W1^T + s (X A1^T) B1^T          gate, up = split(h)        a = silu(gate) * up
    y = a W2^T + s (a A2^T) B2^T          out[token] += routing_weight * y

The low-rank terms go through the r-wide intermediates only, so the dense E x out x in delta-W that
peft's ``ParamWrapper`` builds is never formed. Base weights are dequantized per chunk of experts that
received tokens, used, and dropped; backward dequantizes them again instead of saving them. Routed rows are
gathered and scattered a chunk at a time, so only the pre-activations h and the r-wide intermediates are kept
for backward (``_RoutedExpertsFn``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn import functional as F

from qwen_sft.moe.kernels import Backward, Chunk, Projection, resolve_kernels
from qwen_sft.moe.nf4 import DenseExperts, NF4Experts

Store = NF4Experts | DenseExperts


def grouped_mm_usable(x: torch.Tensor, widths: tuple[int, ...]) -> bool:
    """Whether torch's grouped GEMM can run these shapes: bf16 on CUDA sm80+, bf16/fp32 on CPU, 16-byte rows."""
    if not hasattr(F, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
        return False
    if any(w * x.element_size() % 16 for w in widths):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    if is_fake(x):
        # A fake-tensor trace (qwen_sft/trace) stands for a CUDA run, and grouped GEMM's meta kernel is bf16-only.
        return x.dtype == torch.bfloat16
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)


DEFAULT_MAX_ROUTED_ROWS = 65_536  # 8K tokens at top-8: ~0.5 GiB of bf16 intermediates per tile for 30B-A3B


def token_tiles(num_tokens: int, top_k: int, max_routed_rows: int | None) -> list[tuple[int, int]]:
    """Token ranges whose routed rows (``tokens x top_k``) stay within ``max_routed_rows``; one range when they fit."""
    if not max_routed_rows or num_tokens * top_k <= max_routed_rows:
        return [(0, num_tokens)]
    per_tile = max(max_routed_rows // top_k, 1)
    return [(a, min(a + per_tile, num_tokens)) for a in range(0, num_tokens, per_tile)]


class _RoutedExpertsFn(torch.autograd.Function):
    """out[t] = sum over t's routed rows of w_row * expert_e(hidden[t]), chunk by chunk through the engine's
    kernels (qwen_sft/moe/kernels.py); LoRA factors are inputs so autograd hands us their grads.

    Rows are gathered from ``hidden`` and scattered into ``out`` one chunk at a time, and the routing weight
    scales the down projection's input (``down(w a) = w down(a)``, LoRA included), so neither the routed inputs
    nor the routed outputs ([T*K, H] each) are materialised or saved: backward keeps the pre-activations h and
    the r-wide intermediates, and gathers the rows again from ``hidden`` (held anyway by the caller's graph)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weights: torch.Tensor, engine: ExpertEngine, token_of: torch.Tensor,
                experts: list[int], counts: list[int], a1: torch.Tensor | None, b1: torch.Tensor | None,
                a2: torch.Tensor | None, b2: torch.Tensor | None) -> torch.Tensor:
        kernels = resolve_kernels(engine.kernels)
        grouped = engine.use_grouped_mm(hidden)
        layer = engine.projections(a1, b1, a2, b2)
        out = torch.zeros_like(hidden)
        hs, t1s, t2s = [], [], []
        for chunk, rows in engine.chunks(experts, counts, hidden.dtype, grouped, layer, hidden.device):
            tokens = token_of[rows]
            h, t1 = kernels.gate_up_forward(chunk, hidden.index_select(0, tokens))
            gate, up = h.chunk(2, dim=-1)
            y, t2 = kernels.down_forward(chunk, F.silu(gate) * up * weights[rows].unsqueeze(-1))
            out.index_add_(0, tokens, y)
            hs.append(h)
            if t1 is not None:
                t1s.append(t1)
            if t2 is not None:
                t2s.append(t2)
        ctx.engine, ctx.experts, ctx.counts, ctx.grouped = engine, experts, counts, grouped
        cat = (lambda t: torch.cat(t) if t else None)  # noqa: E731
        ctx.save_for_backward(hidden, weights, token_of, cat(hs), cat(t1s), cat(t2s), a1, b1, a2, b2)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        hidden, weights, token_of, h_all, t1_all, t2_all, a1, b1, a2, b2 = ctx.saved_tensors
        engine: ExpertEngine = ctx.engine
        kernels = resolve_kernels(engine.kernels)
        layer = engine.projections(a1, b1, a2, b2)
        dout = dout.to(hidden.dtype)
        grads = FactorGrads.zeros(a1, b1, a2, b2)
        dhidden = torch.zeros_like(hidden)
        dweights = torch.zeros_like(weights)
        for chunk, rows in engine.chunks(ctx.experts, ctx.counts, hidden.dtype, ctx.grouped, layer, hidden.device):
            tokens = token_of[rows]
            gate, up = h_all[rows].chunk(2, dim=-1)
            sig = torch.sigmoid(gate)
            silu = gate * sig
            act, w = silu * up, weights[rows].unsqueeze(-1)
            down = kernels.down_backward(chunk, dout.index_select(0, tokens), act * w,
                                         t2_all[rows] if t2_all is not None else None)
            dweights[rows] = (down.input * act).sum(-1, dtype=torch.float32).to(weights.dtype)
            da = down.input * w
            dgate = da * up * (sig * (1 + gate * (1 - sig)))
            gate_up = kernels.gate_up_backward(chunk, torch.cat([dgate, da * silu], dim=-1),
                                               hidden.index_select(0, tokens),
                                               t1_all[rows] if t1_all is not None else None)
            dhidden.index_add_(0, tokens, gate_up.input)
            grads.add(chunk.experts, gate_up, down)
        return (dhidden if ctx.needs_input_grad[0] else None, dweights if ctx.needs_input_grad[1] else None,
                None, None, None, None, *grads.as_inputs(a1, b1, a2, b2))


class FactorGrads(NamedTuple):
    """fp32 gradients of the layer's four LoRA factors, summed chunk by chunk (None without LoRA)."""

    gate_up_A: torch.Tensor | None
    gate_up_B: torch.Tensor | None
    down_A: torch.Tensor | None
    down_B: torch.Tensor | None

    @classmethod
    def zeros(cls, *factors: torch.Tensor | None) -> FactorGrads:
        return cls(*(torch.zeros_like(p, dtype=torch.float32) if p is not None else None for p in factors))

    def add(self, experts: torch.Tensor, gate_up: Backward, down: Backward) -> None:
        for total, part in ((self.gate_up_A, gate_up.lora_A), (self.gate_up_B, gate_up.lora_B),
                            (self.down_A, down.lora_A), (self.down_B, down.lora_B)):
            if total is not None:
                total.index_add_(0, experts, part)

    def as_inputs(self, *factors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """In the factors' own dtype, in ``_RoutedExpertsFn.forward``'s argument order (a1, b1, a2, b2)."""
        return [g.to(p.dtype) if g is not None else None for g, p in zip(self, factors)]


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
        # Per fused parameter ("gate_up", "down"): rank, alpha and alpha / rank, as peft's rank/alpha_pattern.
        self.lora_rank: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_scaling: dict[str, float] = {}
        self.grouped_mm: bool | None = None  # None: grouped GEMM when the shapes allow it, else a loop
        self.compute_dtype: torch.dtype | None = None  # dtype of the expert matmuls; None: the input's
        # Routed rows (tokens x top_k) per tile: a longer micro-batch runs in token tiles, each recomputed in
        # backward, so one layer holds one tile's intermediates (and no kernel sees >= 2**31 elements: the
        # 30B-A3B's gate_up intermediate reaches that near 175K tokens untiled). None: never tile.
        self.max_routed_rows: int | None = DEFAULT_MAX_ROUTED_ROWS
        # The per-chunk kernels (qwen_sft/moe/kernels.py) by registered name; None: $QWEN_SFT_EXPERT_KERNELS, else
        # the torch reference.
        self.kernels: str | None = None

    def projections(self, a1: torch.Tensor | None, b1: torch.Tensor | None, a2: torch.Tensor | None,
                    b2: torch.Tensor | None) -> tuple[Projection, Projection]:
        """gate_up and down as the kernels see them: base, the layer's NF4 scales (undone once per call), LoRA."""
        return (Projection(self.gate_up_base, self.gate_up_base.scales(), a1, b1, self.lora_scaling.get("gate_up", 0.0)),
                Projection(self.down_base, self.down_base.scales(), a2, b2, self.lora_scaling.get("down", 0.0)))

    def chunks(self, experts: list[int], counts: list[int], dtype: torch.dtype, grouped: bool,
               layer: tuple[Projection, Projection], device: torch.device) -> Iterator[tuple[Chunk, slice]]:
        """Consecutive groups of at most ``chunk_experts`` hit experts, with the slice of their (grouped) rows."""
        row = 0
        for i in range(0, len(experts), self.chunk_experts):
            ids, cnt = experts[i:i + self.chunk_experts], counts[i:i + self.chunk_experts]
            yield Chunk(torch.tensor(ids, device=device), cnt, dtype, grouped, *layer), slice(row, row + sum(cnt))
            row += sum(cnt)

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.grouped_mm is False:
            return False
        return grouped_mm_usable(x, (self.hidden_dim, 2 * self.intermediate_dim, self.intermediate_dim)
                                 + tuple(self.lora_rank.values()))

    def add_lora(self, r: int, alpha: float, dtype: torch.dtype, seed: int | None = None,
                 gate_up_r: int | None = None, gate_up_alpha: float | None = None) -> None:
        """Per-expert factors initialised like peft (A Kaiming-uniform, B zero), so the model starts unchanged.

        ``r``/``alpha`` apply to down_proj and, unless ``gate_up_r``/``gate_up_alpha`` are given, to gate_up_proj.
        """
        r1, a1 = gate_up_r or r, gate_up_alpha if gate_up_alpha is not None else alpha
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        device = self.gate_up_base.packed.device if isinstance(self.gate_up_base, NF4Experts) \
            else self.gate_up_base.weight.device
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)

        def kaiming(rows: int, cols: int) -> torch.Tensor:
            # peft: kaiming_uniform_(a=sqrt(5)) on an [r, in] weight -> U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / cols ** 0.5
            return (torch.rand(e, rows, cols, generator=gen) * 2 - 1).mul_(bound).to(device, dtype)

        self.lora_gate_up_A = nn.Parameter(kaiming(r1, h))
        self.lora_gate_up_B = nn.Parameter(torch.zeros(e, 2 * i, r1, device=device, dtype=dtype))
        self.lora_down_A = nn.Parameter(kaiming(r, i))
        self.lora_down_B = nn.Parameter(torch.zeros(e, h, r, device=device, dtype=dtype))
        self.lora_rank = {"gate_up": r1, "down": r}
        self.lora_alpha = {"gate_up": float(a1), "down": float(alpha)}
        self.lora_scaling = {k: self.lora_alpha[k] / self.lora_rank[k] for k in self.lora_rank}

    @property
    def has_lora(self) -> bool:
        return bool(self.lora_rank)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        tiles = token_tiles(top_k_index.shape[0], top_k_index.shape[1], self.max_routed_rows)
        if len(tiles) == 1:
            return self._forward_tile(hidden_states, top_k_index, top_k_weights)
        from torch.utils.checkpoint import checkpoint

        # Experts act on each token alone, so the tiles' outputs concatenate to the untiled output.
        run = (lambda *a: checkpoint(self._forward_tile, *a, use_reentrant=False)) if torch.is_grad_enabled() \
            else self._forward_tile
        return torch.cat([run(hidden_states[a:b], top_k_index[a:b], top_k_weights[a:b]) for a, b in tiles])

    def _forward_tile(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat, minlength=self.num_experts)[: self.num_experts]
        hit = torch.nonzero(counts).flatten()
        experts, hit_counts = hit.tolist(), counts[hit].tolist()
        compute_dtype = self.compute_dtype or hidden_states.dtype
        weights = top_k_weights.reshape(-1)[order].to(compute_dtype)  # each routed row's weight, rows by expert
        lora = (self.lora_gate_up_A, self.lora_gate_up_B, self.lora_down_A, self.lora_down_B) if self.has_lora \
            else (None, None, None, None)
        out = _RoutedExpertsFn.apply(hidden_states.to(compute_dtype), weights, self, token_of, experts, hit_counts,
                                     *lora)
        return out.to(hidden_states.dtype)

    def storage_bytes(self) -> int:
        return self.gate_up_base.storage_bytes() + self.down_base.storage_bytes()

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, " \
               f"lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}, chunk_experts={self.chunk_experts}, " \
               f"kernels={resolve_kernels(self.kernels).name}"
