"""One training run, top to bottom: validate config and data → load model → attach LoRA → train → save.

Entry points: ``python train.py --flag value …`` and ``qwen-sft train CONFIG.yaml [key=value …]``
(both build a ``Config`` and call ``run``). Nothing heavy is loaded until config, LoRA config and data
have passed validation.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from qwen_sft.atomic import atomic_open
from qwen_sft.checkpoint import SaveError, invalidate, mark_complete
from qwen_sft.redact import is_secret, redact_line
from qwen_sft.samples.length import TurnMarks
from qwen_sft.train import download
from qwen_sft.train.args import LORA_FIELDS, TrainConfig, describe, lora_config
from qwen_sft.train.data import DataStats, load_tokenized
from qwen_sft.train.model import (
    apply_lora,
    check_expert_targets,
    format_groups,
    freeze_router,
    load_model,
    log,
    parameter_groups,
    resolve_packing,
)
from qwen_sft.train.validate import lora_checkpointing_default, validate


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text(encoding="utf-8")
    except OSError:
        return False


def setup_reporting(training) -> None:
    """Never block on an interactive wandb login: without a key or login, log offline and say so."""
    # `--report_to wandb,tensorboard`: argparse takes one value per flag, transformers wants a list.
    training.report_to = [x.strip() for item in training.report_to for x in item.split(",") if x.strip()]
    if "wandb" not in training.report_to:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        training.report_to = [r for r in training.report_to if r != "wandb"]
        log("wandb is not installed: not reporting to wandb (pip install wandb)")
        return
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        log(f"wandb runs in WANDB_MODE={mode}")
    elif not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
        log("no wandb API key (WANDB_API_KEY) or `wandb login` found: wandb logs offline into ./wandb; "
            "upload later with `wandb sync`" + (" — TensorBoard logs as well" if "tensorboard" in
                                                 training.report_to else ""))


def resolve_resume(training) -> str | None:
    """The checkpoint to resume from, decided before the model loads. ``auto`` takes the newest COMPLETE
    checkpoint-N (qwen_sft/checkpoint.py), saying which ones it skipped and why; an explicit path must be complete."""
    from qwen_sft.checkpoint import checkpoint_problems, checkpoints_newest_first

    want = training.resume_from_checkpoint
    if want in (None, "", "false", "False"):
        return None
    if want == "auto":
        for ckpt in checkpoints_newest_first(training.output_dir):
            problems = checkpoint_problems(ckpt)
            if not problems:
                log(f"resume_from_checkpoint=auto → {ckpt}")
                return str(ckpt)
            log(f"resume_from_checkpoint=auto: skipping incomplete {ckpt}: {'; '.join(problems)}")
        log(f"resume_from_checkpoint=auto → no complete checkpoint in {training.output_dir}, starting fresh")
        return None
    if not Path(want).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={want!r} is not a directory (use a checkpoint-N "
                                f"directory or 'auto')")
    problems = checkpoint_problems(want)
    if problems:
        raise ValueError(f"resume_from_checkpoint={want!r} is incomplete: {'; '.join(problems)}. Resume from an "
                         f"earlier checkpoint-N, or use resume_from_checkpoint=auto to pick the newest complete one")
    return want


def effective_config(config: TrainConfig) -> dict:
    import dataclasses

    from transformers import TrainingArguments

    # Field defaults, not a second TrainingArguments instance: constructing one re-initialises the
    # process's accelerator state and silently takes a torchrun rank out of the process group.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    # to_dict() already masks *_token values; secret-named options are left out altogether, so that reading
    # the file back never sends a placeholder as a token (they come from the environment or a flag again).
    training = {k: v for k, v in config.training.to_dict().items() if defaults.get(k) != v and not k.startswith("_")}
    if config.run.global_batch_size:  # derived from the processes of this run: recomputed when read back
        training.pop("gradient_accumulation_steps", None)
    model = asdict(config.model)
    if config.model.use_peft:  # the LoRA settings as trained (adapter config + lora_* options), for merge to read
        lora = lora_config(config.model)
        model.update({ours: lora.get(key) for ours, key in LORA_FIELDS.items()})
    values = {**model, **asdict(config.data), **asdict(config.run), **training}
    return {k: v for k, v in values.items() if not is_secret(k, v)}


def write_artifacts(out: Path, config: TrainConfig, stats: dict, groups: dict | None, tokenizer) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    invalidate(out)  # whatever adapter lies here is a previous run's until this run's final save marks it
    with atomic_open(out / "train_config.yaml") as fh:
        fh.write("# Effective configuration of this run; `qwen-sft train` reads it back. Secret options "
                 "(token/key/secret/password) are not saved.\n")
        fh.write("".join(f"# {redact_line(line).strip()}\n" for line in describe(config)))
        yaml.safe_dump(effective_config(config), fh, sort_keys=False, allow_unicode=True)
    with atomic_open(out / "data_stats.json") as fh:
        json.dump(stats, fh, indent=2)
    if groups is not None:
        with atomic_open(out / "trainable_params.json") as fh:
            json.dump(groups, fh, indent=2)
    if tokenizer.chat_template:
        with atomic_open(out / "chat_template.jinja") as fh:
            fh.write(tokenizer.chat_template)


def run(config: TrainConfig) -> dict:
    """Train as configured; return the final metrics plus ``model`` (the trained, in-memory model), or
    the plan for ``dry_run``."""
    from transformers import AutoConfig

    from qwen_sft.tokenize.fingerprint import tokenizer_fingerprint
    from qwen_sft.tokenizer import load_tokenizer

    m, d, t, r = config.model, config.data, config.training, config.run
    log("configuration (explicit values and where they came from):")
    for line in describe(config):
        log(redact_line(line))
    # --- validate before loading any weights -------------------------------------------------------
    checked = validate(config)  # every option conflict, the adapter config, model files, data paths: all at once
    if checked.get("warning"):
        log(f"warning: {checked['warning']}")
    if checked["download"] and config.run.dry_run:
        log(f"{checked['download']}: weights not in the cache; a real run downloads them first "
            f"({download.download_command(checked['download'], m.cache_dir)})")
    model_config = AutoConfig.from_pretrained(m.model_name_or_path, cache_dir=m.cache_dir,
                                              trust_remote_code=m.trust_remote_code)
    tokenizer = load_tokenizer(m.model_name_or_path, trust_remote_code=m.trust_remote_code)
    d.packing = resolve_packing(model_config, d.packing)  # off for linear-attention models (qwen3_next)
    # TrainingArguments resolves an unset gradient_checkpointing to False (never None) and Trainer reads the
    # activation_checkpointing* names: decide the LoRA default from whether the user set either name.
    if lora_checkpointing_default(config):
        t.activation_checkpointing = t.gradient_checkpointing = True
        log("gradient_checkpointing=True (default for LoRA/QLoRA)")
    if t.activation_checkpointing:
        # Non-reentrant: works with frozen inputs and with the MoE's data-dependent routing.
        kwargs = {"use_reentrant": False, **(t.activation_checkpointing_kwargs or {})}
        t.activation_checkpointing_kwargs = t.gradient_checkpointing_kwargs = kwargs
    if r.global_batch_size:
        groups = t.world_size // max(1, r.sp_size)
        sp = f" (of {t.world_size} processes, sp_size {r.sp_size})" if r.sp_size > 1 else ""
        log(f"global batch: {groups} processes{sp} x micro batch {t.per_device_train_batch_size} x accu "
            f"{t.gradient_accumulation_steps} = {r.global_batch_size}")
    datasets, stats = {}, {}
    made_by = tokenizer_fingerprint(tokenizer)  # the tokenizer saved beside the adapter; data must match it
    with t.main_process_first(desc="convert and validate data"):
        for split, path in (("train", d.data_path), ("eval", d.eval_data_path)):
            if path:
                ds = load_tokenized(path, vocab_size=model_config.vocab_size, max_len=d.model_max_length,
                                    truncate=d.truncate_source, strict=d.strict, cache_dir=d.data_cache_dir,
                                    tokenizer=made_by, allow_template_mismatch=d.allow_template_mismatch,
                                    marks=TurnMarks.of(tokenizer))
                datasets[split], stats[split] = ds, ds.stats.to_dict()
                log(ds.stats.summary())
    if not len(datasets["train"]):
        raise ValueError(f"{d.data_path}: no training row left after validation ({datasets['train'].stats})")
    budget = (r.max_tokens_per_batch or d.model_max_length) if r.token_budget_batching else None
    if budget is not None:
        from qwen_sft.train.batching import TokenBudgetBatchSampler

        train = datasets["train"]
        packed = TokenBudgetBatchSampler(train.lengths(), budget, supervised_tokens=train.stats.supervised_tokens)
        stats["train"]["batching"] = packed.stats.to_dict()
        log(packed.stats.summary())
        if t.per_device_train_batch_size != 1:
            log(f"per_device_train_batch_size={t.per_device_train_batch_size} does not apply with token-budget "
                f"batching: each micro-batch holds as many samples as fit {budget} tokens")
    resume = resolve_resume(t)
    setup_reporting(t)
    if config.run.dry_run:
        log(f"dry run: config and data valid; would train {m.model_name_or_path} into {t.output_dir}")
        from qwen_sft.trace.rehearse import rehearse  # traces the step on fake tensors (qwen_sft/trace)

        rehearsal = rehearse(config, model_config, datasets["train"]) if config.run.gpu_memory != "off" else {}
        return {"dry_run": True, "train_rows": len(datasets["train"]), "resume": resume, "stats": stats,
                "rehearsal": rehearsal}
    if checked["download"]:
        # Validation and data passed; now the weights (tens of GB for the 30B model), with progress bars.
        log(f"{checked['download']}: weights not in the cache {download.hub_cache(m.cache_dir)}; downloading")
        with t.main_process_first(desc="download the model"):
            download.download_model(checked["download"], m.cache_dir)
    # --- build ---------------------------------------------------------------------------------------
    from transformers import set_seed

    set_seed(t.seed)  # before any weight is created: LoRA init (peft's and the expert engine's) follows the seed
    model = load_model(m, model_config, deepspeed_zero3=_is_zero3(t))
    coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    model.router_aux_loss_coef = 0.0  # added by SFTTrainer, scaled for gradient accumulation
    lora_info = None
    if m.use_peft:
        model, lora_info = apply_lora(model, m, bool(t.activation_checkpointing))
    freeze_router(model, m.train_router)
    if lora_info and lora_info["expert_engine"]:
        from qwen_sft.moe.lora import expert_engines

        for engine_module in expert_engines(model).values():
            engine_module.max_routed_rows = r.expert_tile_rows or None
    groups = parameter_groups(model)
    log("parameters by group:")
    for line in format_groups(groups):
        log(line)
    check_expert_targets(groups, lora_info)
    out = Path(t.output_dir)
    if t.process_index == 0:
        write_artifacts(out, config, {**stats, "lora": lora_info}, groups, tokenizer)
    # --- run -----------------------------------------------------------------------------------------
    from qwen_sft.train.collate import make_collator
    from qwen_sft.train.trainer import ArtifactsCallback, SFTTrainer

    # SFTTrainer's save adds the expert factors (peft's save_pretrained drops them) and marks checkpoints complete.
    collator = make_collator(d.packing, tokenizer.pad_token_id)
    if r.sp_size > 1:  # Ulysses through accelerate's ParallelismConfig + DeepSpeed (qwen_sft/train/sp.py)
        from qwen_sft.train.model import attention_implementation
        from qwen_sft.train.sp import SPCollator, parallelism_config

        t.parallelism_config = parallelism_config(r.sp_size, t.world_size, attention_implementation(m))
        collator = SPCollator(collator, r.sp_size, tokenizer.pad_token_id)
        log(f"sequence parallelism: {r.sp_size} ranks per sequence, {t.world_size // r.sp_size} data-parallel "
            f"group(s), one packed row of <= {budget} tokens per micro-batch (per_device_train_batch_size=1)")
    trainer = SFTTrainer(model=model, args=t, train_dataset=datasets["train"], eval_dataset=datasets.get("eval"),
                         data_collator=collator,
                         processing_class=tokenizer, router_aux_loss_coef=coef, artifacts_dir=out,
                         callbacks=[ArtifactsCallback(out, config.run.loss_curve)],
                         chunked_loss=r.chunked_loss, loss_chunk_tokens=r.loss_chunk_tokens,
                         max_tokens_per_batch=budget, offload_activations=r.offload_activations,
                         optim_foreach=r.optim_foreach, sp_size=r.sp_size)
    result = trainer.train(resume_from_checkpoint=resume)
    # --- save: every file, then the completion marker last (a kill before it leaves an adapter everyone refuses)
    try:
        if trainer.is_world_process_zero():
            invalidate(out)
        trainer.save_model(str(out))
        trainer.save_state()
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(out))
            with atomic_open(out / "train_results.json") as fh:
                json.dump(result.metrics, fh, indent=2)
            mark_complete(out)
    except OSError as err:
        raise SaveError.of(f"the final model to {out}", err, "the checkpoints are unaffected") from err
    log(f"done: {result.global_step} optimizer steps, final train loss {result.training_loss:.4f}; saved to {out}")
    return {**result.metrics, "global_step": result.global_step, "model": trainer.model}


def _is_zero3(training) -> bool:
    ds = training.deepspeed
    if not ds:
        return False
    cfg = ds if isinstance(ds, dict) else json.loads(Path(ds).read_text(encoding="utf-8"))
    return int(cfg.get("zero_optimization", {}).get("stage", 0)) == 3


__all__ = ["run", "DataStats", "SaveError"]
