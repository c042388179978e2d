"""Typed training configuration: the seed recipe's flags plus all of transformers' ``TrainingArguments``.

Each field's ``help`` is the CLI help (``python train.py --help``); a flat YAML file with the same keys
is the serialized form (``qwen-sft train configs/train/qlora_tiny.yaml``). Flags, YAML values and
``key=value`` overrides go through the same strict type check (``use_qlora: 'false'`` is False, ``fast`` is not
a learning rate) and the same conflict checks (qwen_sft/train/validate.py) before any dataclass is built, so
both entry points report the same problems, all at once, as one ``ConfigError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

# Defaults the recipe changes on top of transformers' TrainingArguments, and why:
TRAINING_DEFAULTS: dict[str, object] = {
    # Our collators emit exactly the model inputs (position_ids included); column removal keyed on a
    # PeftModel's **kwargs signature would drop position_ids and silently un-pack the batch.
    "remove_unused_columns": False,
    # PeftModel hides the labels argument from Trainer's signature inspection.
    "label_names": ["labels"],
    "logging_steps": 1,
    "report_to": "none",
}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="Qwen/Qwen3-Coder-30B-A3B-Instruct",
        metadata={"help": "Hugging Face model id or local directory (e.g. one written by `qwen-sft make-tiny-model`)."},
    )
    torch_dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16", metadata={"help": "Dtype the weights are loaded in. fp32 only when asked: 2x the memory."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    peft_config_path: str = field(
        default="configs/lora",
        metadata={"help": "Folder holding a peft adapter_config.json (as PeftConfig.from_pretrained reads it), or "
                          "the file itself: r, lora_alpha, lora_dropout and target_modules. Expert names "
                          "(gate_proj/up_proj/down_proj) are mapped onto the fused expert parameters."},
    )
    # --- LoRA: peft_config_path is read first (the seed's configs/lora/adapter_config.json), these fields override it
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (default: r of peft_config_path). Fused "
                                                                "gate_up_proj experts get 2r (docs/moe.md)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: lora_alpha of "
                                                                      "peft_config_path)."})
    lora_dropout: float | None = field(default=None, metadata={"help": "LoRA dropout (default: lora_dropout of "
                                                                        "peft_config_path)."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "LoRA target module names (default: target_modules of peft_config_path); "
                                        "gate_proj/up_proj/down_proj reach the fused experts."}
    )
    use_qlora: bool = field(
        default=False, metadata={"help": "Load the base model in 4-bit (bitsandbytes) and train LoRA on it. "
                                         "Implies --use_peft."}
    )
    expert_engine: bool = field(
        default=True, metadata={"help": "MoE models with --use_peft/--use_qlora: NF4 experts + expert LoRA through "
                                        "qwen_sft.moe (docs/moe.md); false = stock transformers + peft "
                                        "target_parameters (experts stay 16-bit under QLoRA)."}
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16", metadata={"help": "Dtype 4-bit matmuls compute in."}
    )
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "Quantize the quantization constants."})
    use_flash_attention: bool = field(
        default=False, metadata={"help": "flash_attention_2 (must be installed); otherwise sdpa."}
    )
    train_router: bool = field(
        default=False, metadata={"help": "Also train the MoE router (mlp.gate). Frozen by default: a drifting "
                                         "router re-assigns tokens the experts were never tuned for."}
    )
    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "Router load-balancing loss weight (default: the model config's, 0.0 for "
                                        "Qwen3-Coder). When > 0 router logits are produced and aux_loss is logged."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Hugging Face cache for downloaded models (the scripts use ./.cache)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the hub. Off by default."})

    # --- memory (issue 14: bench/RESULTS.md "Memory levers") --------------------------------------------------
    lora_dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata={"help": "Dtype of the LoRA factors (attention and expert engine), hence of their "
                                             "gradients and of the optimizer's master copy. bfloat16 halves them "
                                             "(the 8-bit optimizers still compute each update in fp32)."}
    )

    def __post_init__(self) -> None:
        _reject_conflicts(self)
        if self.use_qlora:
            self.use_peft = True


@dataclass
class DataArguments:
    data_path: str = field(
        default="processed/sft_train.jsonl",
        metadata={"help": "Tokenized training data: JSONL {input_ids, label}, .parquet or .arrow (Arrow IPC file)."},
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "Tokenized evaluation data, same formats."})
    model_max_length: int = field(
        default=2048, metadata={"help": "Longest sample in tokens. Longer ones are dropped and counted "
                                        "(--strict: error; --truncate_source: cut to this length)."}
    )
    truncate_source: bool = field(
        default=False, metadata={"help": "Cut over-long samples to model_max_length instead of dropping them."}
    )
    strict: bool = field(default=False, metadata={"help": "Fail on over-long samples instead of dropping them."})
    packing: bool = field(
        default=True, metadata={"help": "Padding-free packing: the micro-batch's samples are concatenated into one "
                                        "row with position_ids restarting per sample. false: pad to the longest."}
    )
    data_cache_dir: str = field(
        default=".cache/qwen_sft/data",
        metadata={"help": "Where JSONL/Parquet data is converted once into memory-mappable Arrow files."},
    )
    allow_template_mismatch: bool = field(
        default=False, metadata={"help": "Train on data tokenized with another chat template or vocabulary than the "
                                         "tokenizer saved beside the adapter (refused by default)."}
    )

    def __post_init__(self) -> None:
        _reject_conflicts(self)


LORA_FIELDS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
               "lora_target_modules": "target_modules"}  # our field → adapter_config.json key


def lora_config(model_args: object) -> dict:
    """The LoRA settings a run trains with: ``peft_config_path``'s adapter_config.json with the ``lora_*`` fields
    on top (ModelArguments, or a dict of option values). Raises OSError/ValueError for a missing or bad file."""
    from qwen_sft.train.model import read_lora_config

    get = model_args.get if isinstance(model_args, dict) else lambda k: getattr(model_args, k)
    cfg = dict(read_lora_config(get("peft_config_path")))
    for ours, key in LORA_FIELDS.items():
        if get(ours) is not None:
            cfg[key] = list(get(ours)) if ours == "lora_target_modules" else get(ours)
    return cfg


def _reject_conflicts(args: object) -> None:
    """Built directly in Python: the same checks as the validation pass, on this dataclass's own options, and
    the values parsed the same strict way (``use_qlora="false"`` becomes False, not a truthy string)."""
    import dataclasses

    from qwen_sft.train.validate import ConfigError, coerce, find_problems

    values = dataclasses.asdict(args)
    problems = find_problems(values, io=False)
    if problems:
        raise ConfigError(problems)
    for key, value in coerce(values)[0].items():
        setattr(args, key, value)


@dataclass
class RunArguments:
    dry_run: bool = field(
        default=False, metadata={"help": "Parse and validate config and data, print the plan, load no model."}
    )
    global_batch_size: int | None = field(
        default=None, metadata={"help": "Samples per optimizer step over all processes (the LoRA/full scripts' "
                                        "GLOBAL_BATCH): gradient_accumulation_steps becomes global_batch_size / "
                                        "(processes x per_device_train_batch_size), which must divide evenly. "
                                        "Not together with gradient_accumulation_steps."}
    )
    loss_curve: bool = field(default=True, metadata={"help": "Write loss_curve.png into output_dir at the end."})

    # --- long sequences (docs/train.md "Long trajectories"; checked by long_sequence_conflicts) -----------------
    chunked_loss: bool = field(
        default=True, metadata={"help": "Cross-entropy a chunk of supervised tokens at a time from the final hidden "
                                        "states: the full tokens x vocab logits never exist. false: the model's own "
                                        "loss over full logits."}
    )
    loss_chunk_tokens: int = field(
        default=1024, metadata={"help": "Tokens per lm_head chunk of the chunked loss (~12 bytes x vocab each, traced)."}
    )
    token_budget_batching: bool = field(
        default=False, metadata={"help": "Micro-batches by token budget (best-fit-decreasing on length, never "
                                         "splitting a sample) instead of per_device_train_batch_size samples. "
                                         "Implied by --max_tokens_per_batch."}
    )
    max_tokens_per_batch: int | None = field(
        default=None, metadata={"help": "Token budget of one packed micro-batch (default model_max_length). A "
                                        "sample longer than the budget is trained alone."}
    )
    offload_activations: bool = field(
        default=False, metadata={"help": "Keep the activations saved at gradient-checkpoint boundaries in host "
                                         "memory (transformers' checkpoint offload); needs gradient checkpointing."}
    )
    expert_tile_rows: int = field(
        default=65_536, metadata={"help": "Expert engine: routed rows (tokens x top-k) per tile; a longer micro-batch "
                                          "runs its experts tile by tile, each recomputed in backward. 0: never tile."}
    )
    sp_size: int = field(
        default=1, metadata={"help": "Sequence-parallel degree: ranks that share one sequence (DeepSpeed Ulysses, "
                                     "needs --deepspeed; must divide the attention heads and the process count)."}
    )

    # --- memory (issue 14: bench/RESULTS.md "Memory levers") --------------------------------------------------
    optim_foreach: bool | None = field(
        default=None, metadata={"help": "torch Adam/AdamW: false updates one parameter at a time (no multi-tensor "
                                        "transient in the optimizer step); true forces the foreach update; default "
                                        "torch's choice (foreach on CUDA). No effect on bitsandbytes optimizers."}
    )

    # --- rehearsal (qwen_sft/trace): used by --dry_run only ----------------------------------------------
    gpu_memory: str | None = field(
        default=None, metadata={"help": "--dry_run traces one training step on fake tensors and fails unless it fits "
                                        "this much GPU memory (24GB, 80GiB; default: the visible GPU's; 'off': no "
                                        "trace)."}
    )

    def __post_init__(self) -> None:
        if self.max_tokens_per_batch is not None:
            self.token_budget_batching = True


@dataclass
class TrainConfig:
    """Everything a run needs, plus where each explicitly set value came from (flag, config file, override).

    ``training`` (transformers' ``TrainingArguments``) is built on first use, not while parsing: its
    ``__post_init__`` sets the process's devices up (accelerate's PartialState, under torchrun the process
    group), which reading a configuration must not do (a dry run, a test, a tool that only inspects it)."""

    model: ModelArguments
    data: DataArguments
    run: RunArguments
    training_values: dict[str, object]  # typed TrainingArguments values (validate.coerce), recipe defaults included
    origins: dict[str, str]
    _training: object = field(default=None, repr=False)

    @property
    def training(self):
        if self._training is None:
            self._training = training_arguments(self.training_values)
        return self._training


Config = TrainConfig  # the name before TrainConfig


def long_sequence_conflicts(data: DataArguments, run: RunArguments, training: object) -> list[str]:
    """Every contradiction among the long-sequence options and the rest, one line each (empty: none).
    ``training`` is the TrainingArguments after the recipe's defaults (checkpointing on for LoRA)."""
    problems = []
    if run.loss_chunk_tokens < 1:
        problems.append(f"loss_chunk_tokens must be >= 1, got {run.loss_chunk_tokens}")
    if run.max_tokens_per_batch is not None and run.max_tokens_per_batch < 1:
        problems.append(f"max_tokens_per_batch must be >= 1, got {run.max_tokens_per_batch}")
    if run.token_budget_batching and not data.packing:
        problems.append("token_budget_batching / max_tokens_per_batch packs samples into one row: it needs "
                        "packing=true (packing=false pads to the longest sample)")
    if run.offload_activations and not getattr(training, "activation_checkpointing", False):
        problems.append("offload_activations=true offloads what gradient checkpointing saves: it needs "
                        "gradient_checkpointing=true")
    if run.expert_tile_rows < 0:
        problems.append(f"expert_tile_rows must be >= 0 (0: never tile), got {run.expert_tile_rows}")
    from qwen_sft.train.sp import option_problems

    problems += option_problems(run.sp_size, deepspeed=getattr(training, "deepspeed", None), packing=data.packing,
                                chunked_loss=run.chunked_loss, token_budget=run.token_budget_batching)
    return problems


def _init_deepspeed_cpu(deepspeed: object) -> None:
    """DeepSpeed without CUDA (CPU tests, gloo): its communication layer must join the torchrun group before
    transformers sets devices up, or every rank's engine believes it is alone (world_size 1)."""
    import os

    import torch

    if deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import deepspeed as ds

        ds.init_distributed(dist_backend="gloo")


def _parser():
    from transformers import HfArgumentParser, TrainingArguments

    return HfArgumentParser((ModelArguments, DataArguments, RunArguments, TrainingArguments))


def world_size() -> int:
    """Processes of this run as torchrun announces them (1 without torchrun); read, never initialised."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def data_parallel_size(values) -> int:
    """Processes that see different batches: all of them, over the ``sp_size`` ranks that share one sequence."""
    return max(1, world_size() // max(1, int(values.get("sp_size", 1) or 1)))


def samples_per_step(values) -> int:
    """Rows per optimizer micro-step over all data-parallel groups (under SP one packed row per group)."""
    micro = 1 if int(values.get("sp_size", 1) or 1) > 1 else int(values["per_device_train_batch_size"])
    return data_parallel_size(values) * micro


def accumulation_steps(values: dict[str, object]) -> int:
    """global_batch_size / (data-parallel groups x per_device_train_batch_size); validate checks that it divides."""
    from qwen_sft.train.validate import with_defaults

    return int(values["global_batch_size"]) // samples_per_step(with_defaults(values))


def training_arguments(values: dict[str, object]):
    """transformers' TrainingArguments from typed values. Sets devices up (see TrainConfig): called at first use."""
    from transformers import TrainingArguments

    from qwen_sft.train.validate import ConfigError

    _init_deepspeed_cpu(values.get("deepspeed"))
    try:
        return TrainingArguments(**values)
    except ValueError as exc:  # TrainingArguments' own checks (e.g. bf16 without a GPU)
        raise ConfigError([str(exc).strip().splitlines()[0]]) from None


def _finish(values: dict[str, object], origins: dict[str, str], problems: list[str] | None = None) -> TrainConfig:
    """Type-check and cross-check ``values`` (all problems in one ``ConfigError``), then build the dataclasses.
    Nothing else happens: no device, no process group, no file read beyond the configuration itself."""
    import dataclasses

    from qwen_sft.train.validate import ConfigError, coerce, find_problems

    for key, value in TRAINING_DEFAULTS.items():
        if key not in values:
            values[key] = value
            origins.setdefault(key, "recipe default")
    values.setdefault("output_dir", "output")
    problems = list(problems or []) + find_problems(values, io=False)
    if problems:
        # Say everything at once: what the files would add (adapter config, model, data paths) as well.
        raise ConfigError(problems + find_problems(values, io=True))
    typed, _ = coerce(values)
    if typed.get("sp_size", 1) > 1:  # Ulysses shards one packed row per micro-batch (its batch size is fixed)
        typed["per_device_train_batch_size"] = 1
        origins["per_device_train_batch_size"] = "sp_size > 1: one packed row per micro-batch"
    if typed.get("global_batch_size"):
        typed["gradient_accumulation_steps"] = accumulation_steps(typed)
        origins["gradient_accumulation_steps"] = f"global_batch_size {typed['global_batch_size']}"
    ours = []
    for cls in (ModelArguments, DataArguments, RunArguments):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        ours.append(cls(**{k: v for k, v in typed.items() if k in names}))
        typed = {k: v for k, v in typed.items() if k not in names}
    return TrainConfig(*ours, training_values=typed, origins=origins)


def flag_values(argv: list[str]) -> tuple[dict[str, object], list[str]]:
    """``--key value``, ``--key=value``, ``--key v1 v2`` (lists), ``--flag`` / ``--no_flag`` (booleans) as raw
    strings, the last of a repeated key winning, as argparse does. Types are checked by ``validate.coerce``."""
    from qwen_sft.train.validate import field_specs, is_bool_field

    items: list[tuple[str, list[str]]] = []
    problems = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            key, eq, value = token[2:].partition("=")
            items.append((key.replace("-", "_"), [value] if eq else []))
        elif items:
            items[-1][1].append(token)
        else:
            problems.append(f"unexpected argument {token!r}: options are --name value")
    values: dict[str, object] = {}
    specs = field_specs()
    for key, vals in items:
        if not vals and key in specs and is_bool_field(key):
            values[key] = "true"
        elif not vals and key.startswith("no_") and key[3:] in specs and is_bool_field(key[3:]):
            values[key[3:]] = "false"
        elif not vals:
            problems.append(f"--{key} needs a value")
            values.pop(key, None)
        else:
            values[key] = vals[0] if len(vals) == 1 else vals
    return values, problems


def parse_flags(argv: list[str]) -> TrainConfig:
    """``python train.py [--config RECIPE.yaml] --model_name_or_path … --output_dir …`` (the seed recipe's
    interface). ``--config``: a recipe of configs/train/ whose values the flags override."""
    values, problems = flag_values(argv)
    recipe = values.pop("config", None)
    origins = {k: "flag" for k in values}
    if recipe is not None:
        if not isinstance(recipe, str):
            problems.append(f"--config takes one YAML file, got {recipe!r}")
        else:
            loaded = read_yaml(recipe)
            origins = {**{k: f"config {recipe}" for k in loaded}, **origins}
            values = {**loaded, **values}
    return _finish(values, origins, problems)


_YAML11_FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+")


def _number(value: object) -> object:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; a learning rate written that way must still be a float."""
    return float(value) if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value) else value


def parse_override(item: str) -> tuple[str, object]:
    """``key=value`` with the value read as YAML, so ``3``, ``1e-4``, ``true`` and ``[a, b]`` keep their types."""
    import yaml

    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (example: learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    return key.strip().lstrip("-").replace("-", "_"), _number(yaml.safe_load(raw)) if raw else ""


def read_yaml(path: str) -> dict[str, object]:
    """A flat ``option: value`` YAML file (configs/train/, a run's train_config.yaml)."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        loaded = yaml.safe_load(fh) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, found {type(loaded).__name__}")
    return {k: _number(v) for k, v in loaded.items()}


def parse_yaml(path: str, overrides: list[str]) -> TrainConfig:
    """``qwen-sft train CONFIG.yaml [key=value …]``: flat YAML whose keys are the flags of ``train.py``."""
    values = read_yaml(path)
    origins = {k: f"config {path}" for k in values}
    for item in overrides:
        key, value = parse_override(item)
        values[key] = value
        origins[key] = "override"
    return _finish(values, origins)


def describe(config: TrainConfig) -> list[str]:
    """One line per explicitly set value, naming where it came from."""
    lines = []
    for key, origin in sorted(config.origins.items()):
        for obj in (config.model, config.data, config.run, config.training):
            if hasattr(obj, key):
                value = getattr(obj, key)
                lines.append(f"  {key} = {getattr(value, 'value', value)!r}  ({origin})")  # enums by value
                break
    return lines
