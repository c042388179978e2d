"""Token-budget micro-batches: best-fit-decreasing bins, every sample once per epoch, deterministic, sharded
under DDP; the Trainer's dataloader uses them; the long-sequence options' conflicts are reported together.

    python -m pytest -q tests/test_batching.py
"""

from __future__ import annotations

import numpy as np
import pytest

from qwen_sft.train.batching import TokenBudgetBatchSampler, pack_best_fit
from qwen_sft.train.collate import make_collator


def test_best_fit_decreasing_exact_bins():
    # 9 → new bin (1 left); 5 → new bin (5 left); 4 → the bin with 5 left (best fit, 1 left);
    # 3 → new bin (7 left); 2 → the only bin it fits (7 left).
    assert pack_best_fit([5, 3, 9, 2, 4], 10) == [[2], [0, 4], [1, 3]]
    # Best fit, not first fit: 6 goes to the bin with 6 left, not to the first one with 8 left.
    assert pack_best_fit([2, 4, 6], 10) == [[2, 1], [0]]  # 6 → 4 left; 4 → fits exactly; 2 → new bin


def test_every_sample_once_within_budget_and_over_budget_alone():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 500)
    lengths[[3, 77]] = [400, 257]
    bins = pack_best_fit(lengths, 256)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    for b in bins:
        assert len(b) == 1 or lengths[b].sum() <= 256
    alone = [b for b in bins if lengths[b].sum() > 256]
    assert all(len(b) == 1 for b in alone) and sorted(b[0] for b in alone) == sorted(np.flatnonzero(lengths > 256))
    # Near-optimal: no more bins than the total over the budget plus the over-budget samples, with slack.
    assert len(bins) <= int(np.ceil(lengths[lengths <= 256].sum() / 256 * 1.05)) + len(alone) + 1


def test_sampler_deterministic_per_seed_and_epoch_and_visits_each_sample_once():
    lengths = np.random.default_rng(1).integers(10, 120, 200)
    a, b = TokenBudgetBatchSampler(lengths, 128, seed=7), TokenBudgetBatchSampler(lengths, 128, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(map(sorted, a)) == sorted(map(sorted, first))  # same bins, new order
    assert list(TokenBudgetBatchSampler(lengths, 128, seed=8)) != first
    assert sorted(i for batch in first for i in batch) == list(range(200)) and len(first) == len(a)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_ranks_share_the_epoch(world):
    lengths = np.random.default_rng(2).integers(10, 120, 101)
    ranks = [TokenBudgetBatchSampler(lengths, 128, seed=3, num_replicas=world, rank=r) for r in range(world)]
    per_rank = [list(s) for s in ranks]
    assert len({len(p) for p in per_rank}) == 1 and all(len(p) == len(ranks[0]) for p in per_rank)  # same steps
    seen = [i for p in per_rank for batch in p for i in batch]
    assert set(seen) == set(range(101))
    n_bins = len(ranks[0].bins)
    assert sum(map(len, per_rank)) - n_bins == (-n_bins) % world  # only the evening-out batches repeat


def test_stats_report_supervised_share_and_padding_waste():
    s = TokenBudgetBatchSampler([60, 50, 40, 30], 100, supervised_tokens=45)
    assert s.bins == [[0, 2], [1, 3]]  # 40 fits the 40 left beside 60 exactly; 30 joins 50
    d = s.stats.to_dict()
    assert d["micro_batches"] == 2 and d["tokens"] == 180 and d["padding_waste"] == pytest.approx(0.1)
    assert d["supervised_share"] == pytest.approx(0.25) and d["over_budget_alone"] == 0


def test_trainer_dataloader_packs_by_token_budget(tmp_path):
    from transformers import TrainingArguments

    from qwen_sft.model.tiny import TinySpec, build_tiny_model
    from qwen_sft.train.trainer import SFTTrainer

    lengths = [30, 5, 22, 17, 8, 40, 11]
    data = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                             remove_unused_columns=False, per_device_train_batch_size=4, seed=5)
    trainer = SFTTrainer(model=build_tiny_model(TinySpec(layers=1)), args=args, train_dataset=data,
                         data_collator=make_collator(True, 0), max_tokens_per_batch=40)
    batches = list(trainer.get_train_dataloader())
    sizes = sorted(int(b["input_ids"].shape[1]) for b in batches)
    assert sum(sizes) == sum(lengths) and all(n <= 40 for n in sizes)
    assert len(batches) == len(pack_best_fit(lengths, 40)) == 4  # 40 | 30+8 | 22+17 | 11+5
    starts = sum(int((b["position_ids"] == 0).sum()) for b in batches)
    assert starts == len(lengths)  # each sample once, packed whole
    assert trainer.batching_stats["micro_batches"] == 4


def test_long_sequence_conflicts_reported_together():
    from qwen_sft.train.args import parse_flags

    config = parse_flags(["--output_dir", "/tmp/x", "--packing", "false", "--max_tokens_per_batch", "4096",
                          "--offload_activations", "true", "--sp_size", "2", "--loss_chunk_tokens", "0"])
    assert config.run.token_budget_batching  # implied by max_tokens_per_batch
    from qwen_sft.train.args import long_sequence_conflicts

    problems = long_sequence_conflicts(config.data, config.run, config.training)
    assert len(problems) == 4
    assert any("packing=true" in p for p in problems) and any("gradient_checkpointing=true" in p for p in problems)
    assert any(p.startswith("sp_size=2") for p in problems) and any("loss_chunk_tokens" in p for p in problems)
    ok = parse_flags(["--output_dir", "/tmp/x", "--max_tokens_per_batch", "4096", "--gradient_checkpointing", "true",
                      "--offload_activations", "true"])
    assert long_sequence_conflicts(ok.data, ok.run, ok.training) == []
