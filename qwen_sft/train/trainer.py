"""The transformers ``Trainer`` with what SFT on an MoE needs on top: throughput, peak memory, router aux
loss on its own, a loss-curve PNG, and the run's config / data statistics / chat template in every checkpoint.

Saves are complete or marked incomplete: every checkpoint-N gets the expert factors, the run's artifacts and,
last, the completion marker (qwen_sft/checkpoint.py) before older checkpoints are rotated away; no save writes
a secret (``hub_token``) into ``training_args.bin``.

Used by ``qwen_sft.train.run``; see docs/train.md.

Loss: chunked cross-entropy by default (qwen_sft/train/loss.py: the lm_head runs a chunk of supervised tokens at
a time, the full logits never exist); ``chunked_loss=False`` asks the model for its own loss and full logits.
Micro-batches: by token budget when ``max_tokens_per_batch`` is given (qwen_sft/train/batching.py), else by
sample count. Normalisation either way: the model receives ``num_items_in_batch`` (supervised targets over the whole
gradient-accumulation window, summed over ranks) and divides the summed token losses by it, so every
supervised token weighs the same however the tokens fall into micro-batches (tests/test_train_loss.py).
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from qwen_sft.atomic import atomic_open
from qwen_sft.checkpoint import SaveError, invalidate, mark_complete
from qwen_sft.redact import secrets_hidden
from qwen_sft.samples import IGNORE_INDEX
from qwen_sft.train.loss import DEFAULT_CHUNK_TOKENS, causal_lm, chunked_lm_loss, forward_hidden

ARTIFACTS = ("train_config.yaml", "data_stats.json", "trainable_params.json", "chat_template.jinja")


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class SFTTrainer(Trainer):
    def __init__(self, *args, router_aux_loss_coef: float = 0.0, artifacts_dir: Path | None = None,
                 chunked_loss: bool = True, loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 max_tokens_per_batch: int | None = None, offload_activations: bool = False,
                 optim_foreach: bool | None = None, sp_size: int = 1, **kwargs) -> None:
        self.sp_size = sp_size
        if sp_size > 1:  # before accelerate wraps the attention in Ulysses (qwen_sft/train/sp.py)
            from qwen_sft.train.sp import install_packed_sdpa

            install_packed_sdpa()
        super().__init__(*args, **kwargs)
        if sp_size > 1:
            self.loss_is_scaled_for_ga = True  # normalised over the window's supervised targets (sp.lm_loss)
            self.accelerator.deepspeed_ulysses_dl_adapter = self._sp_dataloader  # Trainer wraps the loader here
        self.optim_foreach = optim_foreach
        self.router_aux_loss_coef = router_aux_loss_coef
        self.artifacts_dir = artifacts_dir
        self.chunked_loss, self.loss_chunk_tokens = chunked_loss, loss_chunk_tokens
        self.max_tokens_per_batch, self.offload_activations = max_tokens_per_batch, offload_activations
        self.batching_stats: dict | None = None
        self._tokens = self._supervised = 0
        self._aux_sum, self._aux_n = 0.0, 0
        self._last_log = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from qwen_sft.train.sp import REAL

        inputs = dict(inputs)
        real = inputs.pop(REAL, None)  # sequence parallelism: which tokens are not padding to a multiple of sp
        sp_slice = self.sp_size > 1 and "shift_labels" in inputs  # this rank's slice, labels already shifted
        if model.training:
            mask = inputs.get("attention_mask") if real is None else real
            self._tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            supervised = inputs["shift_labels"] if sp_slice else inputs["labels"][..., 1:]
            self._supervised += int((supervised != IGNORE_INDEX).sum())
        # Offload: what autograd saves outside the checkpointed layers (with checkpointing on: each layer's input,
        # layers x tokens x hidden) goes to host memory, pinned when there is a GPU, and comes back in backward.
        # PyTorch's save_on_cpu rather than transformers' offload=True, which insists on pinned memory (no CPU run).
        offload = self.offload_activations and model.training and torch.is_grad_enabled()
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if offload \
                else contextlib.nullcontext():
            if sp_slice:
                loss, outputs = self._sp_compute_loss(model, inputs, real, num_items_in_batch)
            elif self.chunked_loss and "labels" in inputs:
                loss, outputs = self._chunked_compute_loss(model, inputs, num_items_in_batch)
            else:
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                     num_items_in_batch=num_items_in_batch)
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        if aux is not None and self.router_aux_loss_coef > 0:
            # The model's own `loss += coef * aux` is disabled (coef 0 on the model) because the LM loss arrives
            # already divided by the accumulation window; a per-micro-batch aux term must be divided here too.
            scale = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * aux.to(loss.device) / scale
            self._aux_sum += float(aux.detach())
            self._aux_n += 1
        return (loss, outputs) if return_outputs else loss

    def _chunked_compute_loss(self, model, inputs, num_items_in_batch):
        """What ``Trainer.compute_loss`` does for a causal LM, with the loss of qwen_sft.train.loss."""
        causal = causal_lm(self.accelerator.unwrap_model(model))
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        hidden, outputs = forward_hidden(model, causal, inputs)
        loss = chunked_lm_loss(hidden, causal.lm_head, labels, position_ids=inputs.get("position_ids"),
                               num_items_in_batch=num_items_in_batch, chunk_tokens=self.loss_chunk_tokens)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs \
                and num_items_in_batch is not None:
            # Same as Trainer: num_items_in_batch is summed over ranks, DDP averages the gradients.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                           else self.args.n_gpu)
        return loss, outputs

    def _sp_compute_loss(self, model, inputs, real, num_items_in_batch):
        """Sequence parallelism: the chunked loss of this rank's slice and the router aux loss of the whole
        micro-batch, both reduced over the SP group (qwen_sft/train/sp.py)."""
        from qwen_sft.train import sp

        causal = causal_lm(self.accelerator.unwrap_model(model))
        group = sp.sp_group()
        loss, outputs = sp.lm_loss(model, causal, inputs, num_items_in_batch, self.loss_chunk_tokens, group,
                                   data_parallel=self.args.world_size // self.sp_size)
        if getattr(outputs, "router_logits", None) and self.router_aux_loss_coef > 0:
            cfg = causal.config
            outputs["aux_loss"] = sp.aux_loss(outputs.router_logits, cfg.num_experts, cfg.num_experts_per_tok, real,
                                              group)
        return loss, outputs

    def _sp_dataloader(self, loader, model):
        from qwen_sft.train.sp import sp_dataloader

        return sp_dataloader(loader, getattr(self.data_collator, "pad_id", 0), model.device)

    def _get_num_items_in_batch(self, batch_samples, device):
        """Under sequence parallelism: the window's supervised targets, each rank counting its own slices."""
        if self.sp_size == 1 or not batch_samples or "shift_labels" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        from qwen_sft.train.sp import count_targets

        return self.accelerator.reduce(count_targets(batch_samples, device), reduction="sum")

    def create_optimizer(self, model=None):
        """Trainer's optimizer (decay groups, bitsandbytes' embedding override), with ``optim_foreach`` applied."""
        if self.optimizer is None and self.optim_foreach is not None and self.optimizer_cls_and_kwargs is None:
            from qwen_sft.train.optim import optimizer_cls_and_kwargs

            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(self.args, self.model if model is None
                                                                     else model, foreach=self.optim_foreach)
        return super().create_optimizer(model)

    def get_train_dataloader(self):
        if self.max_tokens_per_batch is None:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        from qwen_sft.train.batching import TokenBudgetBatchSampler

        ds = self.train_dataset
        lengths = ds.lengths() if hasattr(ds, "lengths") else [len(s["input_ids"]) for s in ds]
        supervised = getattr(getattr(ds, "stats", None), "supervised_tokens", 0)
        sampler = TokenBudgetBatchSampler(lengths, self.max_tokens_per_batch, seed=self.args.seed,
                                          num_replicas=self.args.world_size, rank=self.args.process_index,
                                          supervised_tokens=supervised)
        self.batching_stats = sampler.stats.to_dict()
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
                            persistent_workers=self.args.dataloader_persistent_workers and
                            self.args.dataloader_num_workers > 0)
        loader = self.accelerator.prepare(loader)
        # The sampler is already rank-aware; accelerate's BatchSamplerShard would shard it a second time.
        wrapper = getattr(loader, "batch_sampler", None)
        if wrapper is not None and getattr(wrapper, "batch_sampler", None) is sampler:
            wrapper.num_processes, wrapper.process_index = 1, 0
        return loader

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """peft's save, then the expert factors (peft drops them); training_args.bin pickled without secrets."""
        from qwen_sft.moe.lora import add_expert_factors, expert_engines

        with secrets_hidden(self.args):  # restored before any push, which needs the token
            super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if self.args.should_save and expert_engines(model):
            add_expert_factors(model, output_dir if output_dir is not None else self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        ckpt = Path(run_dir) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            invalidate(ckpt)  # a re-save of the same step is incomplete until it is marked again
        # Rotate only once the new checkpoint is complete: a kill mid-save must leave the previous one.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save and self.artifacts_dir is not None:
                for name in ARTIFACTS:
                    src = self.artifacts_dir / name
                    if src.exists():
                        shutil.copy(src, ckpt / name)
        except OSError as err:  # disk full mid-save: the earlier checkpoints are complete and kept
            raise SaveError.of(str(ckpt), err, "earlier complete checkpoints are kept; free space and rerun "
                               "with resume_from_checkpoint=auto") from err
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's optimizer shard is on disk before the marker
        if self.args.should_save:
            mark_complete(ckpt)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from qwen_sft.moe.lora import expert_engines

        model = model if model is not None else self.model
        if not expert_engines(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # Expert engine: peft's load_adapter would re-target the experts; load both halves ourselves.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from qwen_sft.model.checkpoint import ADAPTER_WEIGHTS, in_experts
        from qwen_sft.moe import load_expert_adapter

        state = load_file(str(Path(resume_from_checkpoint) / ADAPTER_WEIGHTS))
        result = set_peft_model_state_dict(model, {k: v for k, v in state.items() if not in_experts(k)})
        unexpected = list(result.unexpected_keys)
        if unexpected:
            raise ValueError(f"{resume_from_checkpoint}: adapter tensors match nothing in the model: {unexpected[:3]}")
        load_expert_adapter(model, resume_from_checkpoint)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            counts = torch.tensor([self._tokens, self._supervised], dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            now = time.perf_counter()
            elapsed = max(now - self._last_log, 1e-9)
            logs["tokens_per_s"] = round(float(counts[0]) / elapsed, 1)
            logs["supervised_tokens_per_s"] = round(float(counts[1]) / elapsed, 1)
            logs["supervised_share"] = round(float(counts[1]) / max(float(counts[0]), 1.0), 4)
            logs["peak_mem_gib"] = round(peak_memory_gib(), 3)
            if self._aux_n:
                logs["aux_loss"] = round(self._aux_sum / self._aux_n, 6)
            self._tokens = self._supervised = 0
            self._aux_sum, self._aux_n = 0.0, 0
            self._last_log = now
        super().log(logs, start_time)


def plot_loss_curve(log_history: list[dict], out: Path) -> Path | None:
    """loss (and eval_loss) against the optimizer step, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per supervised token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(out, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
    return out


class ArtifactsCallback(TrainerCallback):
    """Draw the loss curve at the end (SFTTrainer copies the artifacts into each checkpoint, before its marker)."""

    def __init__(self, artifacts_dir: Path, loss_curve: bool) -> None:
        self.artifacts_dir, self.loss_curve = artifacts_dir, loss_curve

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.loss_curve:
            plot_loss_curve(state.log_history, Path(args.output_dir) / "loss_curve.png")
            with atomic_open(Path(args.output_dir) / "log_history.json") as fh:
                json.dump(state.log_history, fh, indent=1)
