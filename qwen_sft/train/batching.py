"""Token-budget micro-batches: samples packed by best-fit-decreasing on length into micro-batches of at most
``max_tokens_per_batch`` tokens, so that one long trajectory never lands beside seven short answers.

    python -c "from qwen_sft.train.batching import pack_best_fit; print(pack_best_fit([5, 3, 9, 2, 4], 10))"

- A sample is never split; a sample longer than the budget (but within ``model_max_length``: longer ones were
  already dropped and counted by ``load_tokenized``) is trained alone in its own micro-batch, and counted.
- The bins depend on the lengths only; the seed and the epoch shuffle their order, so a run is deterministic and
  every sample is visited exactly once per epoch on one process.
- Under DDP each rank takes every ``world_size``-th micro-batch of the same shuffled list; when the count does not
  divide, the first micro-batches are repeated to even it out (as ``DistributedSampler`` does) — at most
  ``world_size - 1`` repeated micro-batches per epoch.

``per_device_train_batch_size`` does not apply: the budget decides how many samples a micro-batch holds, and
``gradient_accumulation_steps`` still counts micro-batches.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


def pack_best_fit(lengths: Sequence[int] | np.ndarray, budget: int) -> list[list[int]]:
    """Indices of ``lengths`` in bins of total length <= ``budget`` (best-fit decreasing; ties by index).

    A length above ``budget`` gets a bin of its own."""
    if budget < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1, got {budget}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, then by index
    bins: list[list[int]] = []
    free_keys: list[tuple[int, int]] = []  # (space left, bin id), sorted: the best fit is the first key >= length
    for i in order.tolist():
        n = int(lengths[i])
        if n >= budget:
            bins.append([i])  # full (or over budget): no room left for anything
            continue
        at = bisect.bisect_left(free_keys, (n, -1))
        if at < len(free_keys):
            space, b = free_keys.pop(at)
            bins[b].append(i)
            space -= n
        else:
            b, space = len(bins), budget - n
            bins.append([i])
        if space > 0:
            bisect.insort(free_keys, (space, b))
    return bins


@dataclass
class BatchingStats:
    """What the packing did, for data_stats.json and the log."""

    max_tokens_per_batch: int
    micro_batches: int
    samples: int
    tokens: int
    supervised_tokens: int
    over_budget_alone: int

    @property
    def fill(self) -> float:
        return self.tokens / max(self.micro_batches * self.max_tokens_per_batch, 1)

    def to_dict(self) -> dict:
        return {"max_tokens_per_batch": self.max_tokens_per_batch, "micro_batches": self.micro_batches,
                "samples": self.samples, "tokens": self.tokens, "over_budget_alone": self.over_budget_alone,
                "mean_samples_per_batch": round(self.samples / max(self.micro_batches, 1), 2),
                "supervised_share": round(self.supervised_tokens / max(self.tokens, 1), 4),
                # Budget left unused per micro-batch (with padding-free packing nothing is padded; this is the
                # memory reserved for max_tokens_per_batch that a micro-batch did not use).
                "padding_waste": round(1.0 - self.fill, 4)}

    def summary(self) -> str:
        d = self.to_dict()
        return (f"token-budget batching: {self.samples} samples in {self.micro_batches} micro-batches of <= "
                f"{self.max_tokens_per_batch} tokens ({d['mean_samples_per_batch']} per batch, budget "
                f"{self.fill:.1%} filled, padding waste {d['padding_waste']:.1%}); {self.over_budget_alone} "
                f"longer than the budget trained alone; supervised share {d['supervised_share']:.1%}")


class TokenBudgetBatchSampler:
    """``batch_sampler`` for a ``DataLoader``: this rank's micro-batches of dataset indices for the epoch."""

    def __init__(self, lengths: Sequence[int] | np.ndarray, budget: int, *, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, supervised_tokens: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        lengths = np.asarray(lengths, dtype=np.int64)
        self.bins = pack_best_fit(lengths, budget)
        self.seed, self.num_replicas, self.rank, self.epoch = seed, num_replicas, rank, 0
        self.stats = BatchingStats(max_tokens_per_batch=budget, micro_batches=len(self.bins), samples=len(lengths),
                                   tokens=int(lengths.sum()), supervised_tokens=supervised_tokens,
                                   over_budget_alone=int((lengths > budget).sum()))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.bins) / self.num_replicas)

    def epoch_order(self) -> list[int]:
        """Bin ids for this epoch on all ranks together, evened out to a multiple of ``num_replicas``."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.bins)).tolist()
        short = len(self) * self.num_replicas - len(order)
        return order + (order * (short // max(len(order), 1) + 1))[:short]

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.epoch_order()[self.rank::self.num_replicas]:
            yield list(self.bins[b])
