"""Which layer counts the trace's layer fit traces: whole repeating blocks of the model's layer pattern.

    la, lb = fit_layers(config)      # (2, 4) for Qwen3-Coder-30B-A3B; (4, 8) for Qwen3-Coder-Next

The fit (``measure(layers="fit")``) traces the first ``la`` and ``lb`` decoder layers and extrapolates
linearly to all of them. That is exact only when each traced prefix holds whole copies of the pattern
the model repeats: a uniform model repeats one layer, Qwen3-Coder-Next repeats a block of four (three
Gated DeltaNet layers, then one gated full-attention layer), so its fit traces one and two blocks, and
the difference between the traces is one block's bytes. A prefix of two layers there would hold only
DeltaNet layers and the fit would scale them to all 48 (tests/test_trace.py compares fit and full trace).
"""

from __future__ import annotations

import math

FIT_LAYERS = (2, 4)  # a uniform model: the two shortest traces that behave like the long one


def layer_kinds(config) -> list[tuple]:
    """What distinguishes one decoder layer from another in the model's config: its attention type
    (``layer_types``, qwen3_next's linear/full attention) and whether its MLP is sparse (transformers' rule
    for ``mlp_only_layers`` / ``decoder_sparse_step``)."""
    n = int(config.num_hidden_layers)
    types = list(getattr(config, "layer_types", None) or ["decoder"] * n)
    if len(types) < n:
        raise ValueError(f"config has {len(types)} layer_types for {n} layers")
    experts = int(getattr(config, "num_experts", 0) or 0)
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    return [(types[i], experts > 0 and i not in dense and (i + 1) % step == 0) for i in range(n)]


def layer_period(config) -> int | None:
    """The shortest block whose repetition is the whole layer list (1 for a uniform model); None if no block
    shorter than the model repeats to it (every layer count must then be traced)."""
    kinds = layer_kinds(config)
    n = len(kinds)
    for p in range(1, n // 2 + 1):
        if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
            return p
    return None


def fit_layers(config) -> tuple[int, int] | None:
    """The two layer counts the fit traces: whole blocks, at least ``FIT_LAYERS`` layers, the second twice the
    first. None when the fit cannot be exact (no repeating block, or the model is not longer than the traces)."""
    n = int(config.num_hidden_layers)
    p = layer_period(config)
    if p is None:
        return None
    la = p * math.ceil(FIT_LAYERS[0] / p)
    lb = max(2 * la, p * math.ceil(FIT_LAYERS[1] / p))
    return (la, lb) if lb < n else None


def prefix_config(config, layers: int) -> None:
    """Keep the first ``layers`` decoder layers of ``config`` (in place), with their layer types."""
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:layers]
