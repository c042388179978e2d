"""Sequence parallelism: DeepSpeed Ulysses (Arctic Long Sequence Training) through accelerate, composed with the
chunked loss, the token-budget sampler, the expert engine and ZeRO.

    torchrun --nproc_per_node 8 train.py --use_peft true --deepspeed configs/zero2.json --sp_size 8 \
        --model_max_length 262144 --max_tokens_per_batch 262144 ...

What upstream does (accelerate 1.15 ``ParallelismConfig(sp_backend="deepspeed")``, DeepSpeed 0.19.8
``ulysses_sp``, transformers' Trainer): ``UlyssesSPAttentionHF`` replaces the model's attention function; each
rank holds ``1/sp`` of the sequence, an all-to-all before attention gives every rank the whole sequence for
``heads/sp`` of the heads and one after it gives the shard back. ``UlyssesSPDataLoaderAdapter`` gathers the
micro-batches of the ``sp`` ranks of a group, shifts the labels on the whole row (``shift_labels``) and hands
each rank its slice of one micro-batch after the other, so the ranks of a group always work on the same
micro-batch; DeepSpeed sums gradients over the group and averages them over the data-parallel groups.
With 4 KV heads and sp 8 DeepSpeed repeats each KV head twice before the all-to-all (one KV head per rank).

What this module adds, because upstream does not do it for us:

- the loss: the chunked loss on the rank's slice of ``shift_labels``, its sum counted once per group
  (``group_sum``) and divided by the supervised targets of the whole accumulation window over all ranks,
  not the Trainer's mean of per-micro-batch means (``deepspeed_sp_compute_loss``);
- the router aux loss over the whole micro-batch: its per-expert counts and probability sums are summed over
  the group before the product (the loss is not a sum over tokens, a mean of shard losses would differ);
- packed rows under sdpa: Ulysses drops the attention mask and sdpa falls back to one causal mask over the
  row, so packed samples would attend to each other; ``packed_sdpa`` runs sdpa per sample instead
  (flash-attention's varlen path reads the samples from ``position_ids`` itself);
- rows padded to a multiple of ``sp`` (the adapter requires it), the padding masked out of loss and aux loss;
- the adapter's ``set_epoch`` (it has none) and, on gloo, the group's rows padded to one length.
"""

from __future__ import annotations

import os

import torch

from qwen_sft.samples import IGNORE_INDEX as IGNORE

REAL = "sp_real_tokens"  # collator key: 1 for a sample's token, 0 for padding added to divide by sp


# --- validation ------------------------------------------------------------------------------------------------


def option_problems(sp_size: int, *, deepspeed: object, packing: bool, chunked_loss: bool,
                    token_budget: bool) -> list[str]:
    """What the options alone say about ``sp_size`` (one line, so that a config lists its SP needs together)."""
    if sp_size == 1:
        return []
    if sp_size < 1:
        return [f"sp_size must be >= 1, got {sp_size}"]
    needs = []
    if not deepspeed:
        needs.append("DeepSpeed (Ulysses runs inside its engine): add --deepspeed configs/zero2.json")
    if not packing:
        needs.append("packing=true (the sequence is sharded by position_ids, which padded batches do not carry)")
    if not token_budget:
        needs.append("max_tokens_per_batch (or token_budget_batching=true): a micro-batch is one packed row, which "
                     "Ulysses shards (its batch size is fixed at one row)")
    if not chunked_loss:
        needs.append("chunked_loss=true (the loss whose sums and counts are reduced over the SP group)")
    return [f"sp_size={sp_size} needs " + "; ".join(needs)] if needs else []


def model_problems(sp_size: int, config, world_size: int | None = None) -> list[str]:
    """Heads, KV heads, layer kinds and the process count against ``sp_size`` (the model's config.json)."""
    if sp_size <= 1:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    out = []
    if heads % sp_size:
        out.append(f"sp_size={sp_size} must divide the {heads} attention heads (Ulysses gives each rank "
                   f"heads/sp_size of them): use one of {[d for d in range(2, heads + 1) if heads % d == 0]}")
    if kv % sp_size and sp_size % kv:
        out.append(f"sp_size={sp_size} and the {kv} KV heads: one must divide the other (DeepSpeed splits the KV "
                   f"heads, or repeats each sp_size/{kv} times when sp_size > {kv})")
    recurrent = sorted({t for t in getattr(text, "layer_types", None) or [] if "linear_attention" in t})
    if recurrent:
        out.append(f"sp_size={sp_size}: {text.model_type} has {recurrent} layers, whose recurrent state runs along "
                   f"the sequence outside attention: sharding restarts it on every rank (wrong gradients, "
                   f"accelerate refuses it too). Train it with sp_size=1")
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world % sp_size:
        out.append(f"sp_size={sp_size} must divide the number of processes (WORLD_SIZE={world}): launch with "
                   f"torchrun --nproc_per_node a multiple of {sp_size}")
    return out


# --- setup -----------------------------------------------------------------------------------------------------


def parallelism_config(sp_size: int, world_size: int, attn_implementation: str):
    """accelerate's ``ParallelismConfig`` for Ulysses: ``sp_size`` ranks per group, ``world/sp`` data-parallel."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True,
                                              sp_attn_implementation=attn_implementation)
    return ParallelismConfig(dp_replicate_size=world_size // sp_size, sp_size=sp_size, sp_backend="deepspeed",
                             sp_handler=handler)


class SPCollator:
    """The packing collator, its rows right-padded to a multiple of ``sp_size`` (the adapter shards them evenly).

    Padding tokens are ``pad_id`` with label -100 and position ids 0, 1, … (a sample of their own, so no real
    token attends to them); ``sp_real_tokens`` marks them for the aux loss and the token counts."""

    def __init__(self, inner, sp_size: int, pad_id: int) -> None:
        self.inner, self.sp_size, self.pad_id = inner, sp_size, pad_id

    def __call__(self, features: list[dict]) -> dict:
        batch = dict(self.inner(features))
        if "position_ids" not in batch:
            raise ValueError("sequence parallelism needs position_ids in every batch (packing=true)")
        n = batch["input_ids"].shape[1]
        batch[REAL] = torch.ones_like(batch["input_ids"])
        return pad_batch(batch, n + (-n % self.sp_size), self.pad_id)


def pad_batch(batch: dict, length: int, pad_id: int) -> dict:
    """Right-pad every ``[rows, n]`` tensor of ``batch`` to ``length``: ``pad_id`` tokens, -100 labels, position ids
    0, 1, … (a sample of their own, so no real token attends to them), ``sp_real_tokens`` 0."""
    rows, n = batch["input_ids"].shape
    pad = length - n
    if pad <= 0:
        return batch
    fill = {"input_ids": pad_id, "labels": IGNORE, "shift_labels": IGNORE}
    out = dict(batch)
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == n:
            if key == "position_ids":
                tail = torch.arange(pad, dtype=value.dtype).expand(rows, pad)
            else:
                tail = torch.full((rows, pad), fill.get(key, 0), dtype=value.dtype)
            out[key] = torch.cat([value, tail.to(value.device)], dim=1)
    return out


class GroupPadded:
    """Iterate ``loader`` with each batch right-padded to the longest of the SP group's batches of this step.

    DeepSpeed's adapter all-gathers the group's batches at their own lengths; NCCL accepts that, gloo (CPU)
    requires equal sizes ("ProcessGroupGloo::allgather: invalid tensor size")."""

    def __init__(self, loader, group, pad_id: int) -> None:
        self.loader, self.group, self.pad_id = loader, group, pad_id

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            n = torch.tensor([batch["input_ids"].shape[1]], dtype=torch.int64)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX, group=self.group)
            yield pad_batch(batch, int(n), self.pad_id)


def sp_dataloader(loader, pad_id: int, device):
    """DeepSpeed's ``UlyssesSPDataLoaderAdapter`` over ``loader`` (what accelerate builds), with ``set_epoch``
    (the adapter has none, so every epoch would repeat the first one's order) and, on gloo, equal lengths."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter
    from deepspeed.utils import groups

    group = groups._get_sequence_parallel_group()

    class Adapter(UlyssesSPDataLoaderAdapter):
        def set_epoch(self, epoch: int) -> None:
            # As Trainer does for a plain loader: accelerate's shard does not forward to a wrapped batch sampler.
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            inner = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)
            if hasattr(inner, "set_epoch"):
                inner.set_epoch(epoch)

    gloo = torch.distributed.get_backend(group) == "gloo"
    return Adapter(GroupPadded(loader, group, pad_id) if gloo else loader, sp_rank=groups._get_sequence_parallel_rank(),
                   sp_group=group, sp_world_size=groups._get_sequence_parallel_world_size(), device=device)


def install_packed_sdpa() -> None:
    """Make transformers' "sdpa" attention run once per packed sample when it gets no mask (under Ulysses),
    before DeepSpeed wraps it. Without a mask and with one sample per row it is transformers' sdpa unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if getattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "_qwen_sft_packed", False):
        return

    def packed_sdpa(module, query, key, value, attention_mask, *args, position_ids=None, **kwargs):
        if attention_mask is not None or position_ids is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, *args,
                                          position_ids=position_ids, **kwargs)
        outs, weights = [], None
        for row in range(query.shape[0]):
            pos = position_ids[min(row, position_ids.shape[0] - 1)]
            starts = [0] + (torch.nonzero(pos[1:] != pos[:-1] + 1).squeeze(1) + 1).tolist() + [pos.shape[0]]
            pieces = []
            for a, b in zip(starts[:-1], starts[1:]):
                out, weights = sdpa_attention_forward(module, query[row:row + 1, :, a:b], key[row:row + 1, :, a:b],
                                                      value[row:row + 1, :, a:b], None, *args,
                                                      position_ids=pos[None, a:b], **kwargs)
                pieces.append(out)  # [1, len, heads, head_dim]
            outs.append(torch.cat(pieces, dim=1))
        return torch.cat(outs, dim=0), weights

    packed_sdpa._qwen_sft_packed = True
    ALL_ATTENTION_FUNCTIONS["sdpa"] = packed_sdpa


def sp_group():
    """This rank's sequence-parallel process group (DeepSpeed's, created when accelerate prepares the engine)."""
    from deepspeed.utils import groups

    return groups._get_sequence_parallel_group()


# --- loss ------------------------------------------------------------------------------------------------------


def group_sum(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``x`` over ``group`` as the value; the gradient reaches this rank's ``x`` only (once).

    DeepSpeed sums gradients over the SP group, so each rank must differentiate its own share of a term and
    never the other ranks' (a differentiable all-reduce would count every share ``sp`` times)."""
    total = x.detach().clone()
    torch.distributed.all_reduce(total, group=group)
    return x + (total - x.detach())


def count_targets(batches: list[dict], device) -> torch.Tensor:
    """Supervised targets of this rank's slices of the accumulation window (sum over all ranks: the window's)."""
    return sum((b["shift_labels"] != IGNORE).sum() for b in batches).to(device)


def aux_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, real: torch.Tensor | None,
             group) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` (qwen3_moe) over the whole micro-batch of the SP group: per-expert
    top-k counts, probability sums and token counts are summed over the group before they are multiplied."""
    device = router_logits[0].device
    mask = real.reshape(-1).to(device=device, dtype=torch.float32) if real is not None else None
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for layer in router_logits:
        weights = torch.softmax(layer.to(device).float(), dim=-1)
        selected = torch.topk(weights, top_k, dim=-1).indices
        w = mask if mask is not None else torch.ones(weights.shape[0], device=device)
        counts = counts.scatter_add(0, selected.reshape(-1), w.repeat_interleave(top_k))
        probs = probs + (weights * w.unsqueeze(-1)).sum(dim=0)
        rows = rows + w.sum()
    counts, rows = group_sum(counts, group), group_sum(rows, group)
    probs = group_sum(probs, group)
    return (counts / rows * (probs / rows)).sum() * num_experts


def lm_loss(model, causal, inputs: dict, num_items_in_batch, chunk_tokens: int, group,
            data_parallel: int) -> tuple[torch.Tensor, object]:
    """This rank's share of the loss of the group's micro-batch, scaled so that DeepSpeed's gradient (sum over
    the group, mean over ``data_parallel`` groups) is the gradient of summed token losses / window targets.

    The value is the group's whole ``sum / targets x data_parallel``: the Trainer's mean over ranks logs the loss."""
    from qwen_sft.train.loss import chunked_target_loss, forward_hidden

    inputs = dict(inputs)
    targets = inputs.pop("shift_labels")
    inputs.pop("labels", None)
    hidden, outputs = forward_hidden(model, causal, inputs)
    total = chunked_target_loss(hidden, causal.lm_head, targets, chunk_tokens=chunk_tokens)
    # A slice without a supervised target (a prompt-only shard) still joins backward: its all-to-alls must run.
    total = total + hidden.sum() * 0.0
    if num_items_in_batch is None:
        num_items_in_batch = group_sum((targets != IGNORE).sum().float(), group)
    denom = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    return group_sum(total, group) / denom * data_parallel, outputs

