"""The dry run's rehearsal: the run's own configuration traced on its data's longest micro-batch.

    python train.py ... --dry_run true --gpu_memory 24GB      # DRY_RUN=1 bash scripts/qlora_qwen3_30b.sh

Called by qwen_sft/train/run.py after config and data validation. Needs the model's config.json only (no
weights). Prints the traced peak per GPU with its breakdown next to the GPU memory (``--gpu_memory``, else
the visible GPU's) and raises ``RehearsalError`` with the breakdown when it does not fit, or when the recipe
cannot run at all (e.g. LoRA + ZeRO-3 + the expert engine).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qwen_sft.trace import Sharding, StepPlan, measure
from qwen_sft.trace.cli import fits_line, parse_memory, render_measured
from qwen_sft.trace.report import GiB
from qwen_sft.trace.step import chunked_loss, offloaded


class RehearsalError(RuntimeError):
    pass


def _deepspeed(training) -> dict:
    ds = training.deepspeed
    if not ds:
        return {}
    return ds if isinstance(ds, dict) else json.loads(Path(ds).read_text(encoding="utf-8"))


def sharding_of(training) -> Sharding:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    zo = _deepspeed(training).get("zero_optimization", {})
    stage = int(zo.get("stage", 0)) or None
    dev = lambda key: (zo.get(key) or {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
    return Sharding(world=world, zero=stage if stage in (2, 3) else None, offload_optimizer=dev("offload_optimizer"),
                    offload_params=dev("offload_param") and stage == 3)


def longest_micro_batch(lengths, batch: int, max_len: int, truncate: bool) -> list[int]:
    """The ``batch`` longest samples: the heaviest micro-batch a shuffled epoch can draw."""
    lens = sorted((min(int(n), max_len) if truncate else int(n) for n in lengths), reverse=True)
    return lens[:batch]


def gpu_memory_bytes(requested: str | None) -> tuple[int | None, str]:
    if requested:
        return parse_memory(requested), f"--gpu_memory {requested}"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"visible GPU {props.name}"
    return None, "no --gpu_memory and no visible GPU"


def _run_loss(r):
    """The run's loss as the trainer computes it: chunked or the model's own, offloaded with offload_activations."""
    loss = chunked_loss(r.loss_chunk_tokens) if r.chunked_loss else None
    return offloaded(loss) if r.offload_activations else loss


def rehearse(config, model_config, train_dataset) -> dict:
    """Trace the configured step; see the module docstring. Returns the figures for the dry run's result."""
    from qwen_sft.train.model import log

    m, d, t, r = config.model, config.data, config.training, config.run
    if int(os.environ.get("RANK", "0")) != 0:
        return {}  # one rank traces; the others have the same micro-batch shapes
    lens = longest_micro_batch(train_dataset.lengths(), t.per_device_train_batch_size, d.model_max_length,
                               d.truncate_source)
    optim = optim_name = str(getattr(t.optim, "value", t.optim))
    notes = []
    if optim.startswith("paged_"):
        # Paged optimizers keep their state in CUDA managed memory (none on a CPU): trace the same optimizer
        # unpaged; its state is counted in the peak here, though torch.cuda.max_memory_allocated misses it.
        optim = optim[len("paged_"):]
        notes.append(f"{optim_name}: traced as {optim} (same state, in device memory); on a GPU the paged state sits "
                     f"in CUDA managed memory, which max_memory_allocated does not count")
    sharding = sharding_of(t)
    plan = StepPlan(seq=max(lens), batch=len(lens), packing=d.packing, sample_lengths=tuple(lens),
                    accumulating=t.gradient_accumulation_steps > 1,
                    loss_fn=_run_loss(r))
    loss = f"chunked loss, {r.loss_chunk_tokens} tokens a chunk" if r.chunked_loss else "full logits (chunked_loss false)"
    loss += ", offload_activations" if r.offload_activations else ""
    if sharding.zero:
        notes.append("DeepSpeed replaces the Trainer's optimizer by its own (fp32 master weights); the trace "
                     "uses torch's AdamW for the traced rows and DeepSpeed's partitioning for the computed ones")
    log(f"rehearsal: tracing one training step on fake tensors ({len(lens)} samples of up to {max(lens)} tokens, "
        f"the data's longest micro-batch; {sharding.describe()})")
    try:
        measured = measure(model_config, m, plan, gradient_checkpointing=bool(t.gradient_checkpointing),
                           optim=optim, sharding=sharding, deepspeed_zero3=sharding.zero == 3)
    except (ValueError, NotImplementedError) as exc:
        raise RehearsalError(f"rehearsal: this recipe cannot run: {exc}") from exc
    measured.report.notes += notes
    name = (getattr(model_config, "architectures", None) or [model_config.model_type])[0]
    text = render_measured(measured, name, m.model_name_or_path,
                           f"the run's configuration: {'qlora' if m.use_qlora else 'lora' if m.use_peft else 'full'}"
                           f", micro-batch {lens} tokens ({'packed' if d.packing else 'padded'}), optim {optim_name}, {loss}, "
                           f"gradient checkpointing {bool(t.gradient_checkpointing)}, "
                           f"gradient_accumulation_steps {t.gradient_accumulation_steps}", "uniform")
    for line in text.splitlines():
        log(line)
    memory, where = gpu_memory_bytes(r.gpu_memory)
    out = {"peak_gib": measured.report.peak / GiB, "planned_gib": measured.report.planned / GiB,
           "micro_batch": lens}
    if memory is None:
        log(f"rehearsal: {where}: pass --gpu_memory 24GB to check that the run fits")
        return out
    ok, line = fits_line(measured, memory)
    log(f"rehearsal ({where}): {line}")
    if not ok:
        raise RehearsalError(f"rehearsal: the run does not fit: {line}\n{text}\nfix: a smaller micro-batch "
                             f"(per_device_train_batch_size) or model_max_length, gradient checkpointing, or a GPU "
                             f"with more memory")
    return {**out, "fits": True}
