"""Chunked causal-LM cross-entropy: the lm_head is applied a chunk of supervised tokens at a time, so the full
``tokens x vocab`` logits (32,768 x 151,936 in fp32 = 19.9 GB for one 32K trajectory) never exist.

    from qwen_sft.train.loss import chunked_lm_loss
    loss = chunked_lm_loss(hidden [B, T, H], model.lm_head, labels [B, T], position_ids=..., num_items_in_batch=n)

Same value and gradients as transformers' ``ForCausalLMLoss`` (tests/test_chunked_loss.py):

- targets are the labels shifted by one inside each row, ``-100`` ignored; with packed rows a target at a sample
  start (``position_ids == 0``) is never predicted from the previous sample, even when the collator did not mask it;
- only supervised positions reach the lm_head at all (agent trajectories supervise a minority of their tokens);
- the matmul runs in the lm_head's dtype (bf16), each chunk's logits are upcast to fp32 for the log-sum-exp only,
  and each chunk sits under ``torch.utils.checkpoint``: backward recomputes its logits instead of saving them, so
  the loss holds one chunk of logits at a time in forward and in backward;
- the summed token losses are divided by ``num_items_in_batch`` (supervised targets over the whole accumulation
  window) when given, else by this batch's supervised targets.

Peak extra memory is about ``chunk_tokens x vocab x 10`` bytes (bf16 logits + fp32 logits + fp32 softmax
gradient): 1.5 GiB at 1,024 tokens for Qwen3-Coder's vocabulary, however long the sequence.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from qwen_sft.samples import IGNORE_INDEX as IGNORE

DEFAULT_CHUNK_TOKENS = 1024


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``targets[b, t] = labels[b, t + 1]`` (-100 past the row's end and wherever the next token starts a sample)."""
    targets = torch.full_like(labels, IGNORE)
    targets[..., :-1] = labels[..., 1:]
    if position_ids is not None:
        pos = position_ids.to(labels.device).expand_as(labels)
        targets[..., :-1] = targets[..., :-1].masked_fill(pos[..., 1:] == 0, IGNORE)
    return targets


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)  # the head's own dtype: bf16 on the GPU
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, *,
                    position_ids: torch.Tensor | None = None,
                    num_items_in_batch: torch.Tensor | int | None = None,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Summed token cross-entropy over ``hidden [..., T, H]`` / (``num_items_in_batch`` or the supervised count)."""
    targets = shifted_targets(labels.to(hidden.device), position_ids)
    total, supervised = chunked_target_loss(hidden, lm_head, targets, chunk_tokens=chunk_tokens), targets != IGNORE
    if num_items_in_batch is None:
        return total / max(int(supervised.sum()), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def chunked_target_loss(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, *,
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Summed cross-entropy of ``hidden [..., T, H]`` against already shifted ``targets [..., T]`` (-100 ignored),
    a chunk of supervised positions at a time; what ``chunked_lm_loss`` divides, and what sequence parallelism
    sums over the ranks (qwen_sft/train/sp.py: the labels are shifted on the whole row before it is sharded)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    targets = targets.to(hidden.device).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    where = torch.nonzero(targets != IGNORE).squeeze(1)
    picked, picked_targets = flat.index_select(0, where), targets.index_select(0, where)
    total = flat.new_zeros((), dtype=torch.float32)
    fn = functools.partial(_chunk_loss_sum, lm_head)
    recompute = torch.is_grad_enabled()
    for start in range(0, picked.shape[0], chunk_tokens):
        h, t = picked[start:start + chunk_tokens], picked_targets[start:start + chunk_tokens]
        total = total + (checkpoint(fn, h, t, use_reentrant=False) if recompute else fn(h, t))
    return total


def causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside a peft wrapper (or the model itself): the module that owns ``lm_head``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "lm_head") and hasattr(inner, "model")):
        raise TypeError(f"chunked loss needs a causal LM with .model and .lm_head, got {type(inner).__name__}: "
                        f"set chunked_loss=false")
    return inner


def forward_hidden(model: nn.Module, causal: nn.Module, inputs: dict) -> tuple[torch.Tensor, object]:
    """Run ``model`` (the DDP / DeepSpeed / peft wrapper itself, so that their hooks and gradient sync still run)
    with the lm_head applied to no position at all; return the decoder's final hidden states, caught by a forward
    hook on ``causal.model``, and the outputs (``aux_loss`` included). ``inputs`` must not hold ``labels``."""
    caught: list[torch.Tensor] = []

    def hook(module, args, output) -> None:
        caught.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    none = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
    handle = causal.model.register_forward_hook(hook)
    try:
        outputs = model(**inputs, logits_to_keep=none)
    finally:
        handle.remove()
    if len(caught) != 1:
        raise RuntimeError(f"expected one decoder forward, caught {len(caught)}")
    return caught[0], outputs
