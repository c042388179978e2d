"""The one validation pass of a training configuration: every problem, all at once, before data or weights.

    from qwen_sft.train.validate import ConfigError, find_problems
    find_problems({"learning_rate": "fast", "strict": True, "truncate_source": True})
    # ['learning_rate: expected a number, got fast (str)',
    #  'strict=True (fail on over-long samples) contradicts truncate_source=True (cut them): choose one', ...]

``coerce`` checks raw values (YAML, ``key=value``, ``--flag value``) against the dataclass field types;
``find_problems`` adds value ranges, cross-option conflicts and, with ``io=True``, what only files can tell:
the adapter config, the DeepSpeed config, the data paths, the model's config and weights (never loaded),
and LoRA ``target_modules`` against the module names of the model built on the ``meta`` device.
``python train.py`` and ``qwen-sft train`` both end in ``ConfigError`` (exit code 2) with the same lines.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path

from qwen_sft.model.checkpoint import in_experts

_TRUE, _FALSE = {"true", "yes", "y", "t", "1"}, {"false", "no", "n", "f", "0"}
_INT = re.compile(r"[+-]?\d+")


class ConfigError(ValueError):
    """Every problem of a configuration, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(dict.fromkeys(problems))
        super().__init__(self.problems)

    def __str__(self) -> str:
        n = len(self.problems)
        return f"{n} problem{'s' * (n != 1)} in the configuration (nothing was loaded):\n" + "\n".join(
            f"  - {p}" for p in self.problems)


# --- field types ---------------------------------------------------------------------------------------


@functools.cache
def field_specs() -> dict[str, tuple[object, object]]:
    """``name → (type, default)`` for every option of train.py: the recipe's dataclasses + TrainingArguments."""
    import dataclasses

    from transformers import TrainingArguments

    from qwen_sft.train.args import DataArguments, ModelArguments, RunArguments

    specs: dict[str, tuple[object, object]] = {}
    for cls in (ModelArguments, DataArguments, RunArguments, TrainingArguments):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                specs[f.name] = (hints[f.name], None if default is dataclasses.MISSING else default)
    return specs


def is_bool_field(name: str) -> bool:
    tp = field_specs()[name][0]
    return tp is bool or (_is_union(tp) and bool in typing.get_args(tp) and str not in typing.get_args(tp))


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


class _Bad(Exception):
    pass


def _show(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _one(tp, value: object) -> object:
    """``value`` as ``tp`` or ``_Bad``. Strings (flags, quoted YAML) are parsed strictly, never by truthiness."""
    if isinstance(value, list) and not (typing.get_origin(tp) is list or tp is list):
        raise _Bad(f"takes one value, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Bad(f"expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value)
        raise _Bad(f"expected an integer, got {_show(value)}")
    if tp is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise _Bad(f"expected a number, got {_show(value)}") from None
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise _Bad(f"expected a finite number, got {_show(value)}")
        return float(number)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise _Bad(f"expected a string, got {_show(value)}")
    if typing.get_origin(tp) is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Bad(f"expected one of {list(typing.get_args(tp))}, got {_show(value)}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [e.value for e in tp]
        if getattr(value, "value", value) in choices:
            return getattr(value, "value", value)
        raise _Bad(f"expected one of {choices}, got {_show(value)}")
    if typing.get_origin(tp) is list or tp is list:
        (item,) = typing.get_args(tp) or (object,)
        return [_one(item, v) for v in (value if isinstance(value, list | tuple) else [value])]
    if typing.get_origin(tp) is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _Bad(f"expected a mapping, got {_show(value)}")
    return value  # a type the parser does not read from text (e.g. ParallelismConfig): passed through


def _arm_order(tp) -> int:
    if tp is str:
        return 9
    return 0 if (isinstance(tp, type) and issubclass(tp, enum.Enum)) or tp is bool else 1


def coerce_one(tp, value: object) -> object:
    if not _is_union(tp):
        return _one(tp, value)
    arms = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp) and (value is None or value == "None"):
        return None
    enums = [a for a in arms if isinstance(a, type) and issubclass(a, enum.Enum)]
    if enums:  # `SchedulerType | str`: the str arm only means "the enum's value as text", as train.py's flags do
        return _one(enums[0], value)
    first = None
    for arm in sorted(arms, key=_arm_order):
        if typing.get_origin(arm) is typing.Literal and value not in typing.get_args(arm):
            continue
        try:
            return _one(arm, value)
        except _Bad as exc:
            first = first or exc
    raise first or _Bad(f"unexpected {_show(value)}")


def coerce(values: Mapping[str, object]) -> tuple[dict[str, object], list[str]]:
    """Typed values and one problem per option that is unknown or not of its field's type."""
    specs, typed, problems = field_specs(), {}, []
    unknown = sorted(set(values) - set(specs))
    if unknown:
        problems.append(f"unknown option(s) {unknown}; see `python train.py --help` for the list")
    for key, value in values.items():
        if key in specs:
            try:
                typed[key] = coerce_one(specs[key][0], value)
            except _Bad as exc:
                problems.append(f"{key}: {exc}")
    return typed, problems


def with_defaults(values: Mapping[str, object]) -> dict[str, object]:
    from qwen_sft.train.args import TRAINING_DEFAULTS

    return {**{k: d for k, (_, d) in field_specs().items()}, **TRAINING_DEFAULTS, **values}


# --- checks on typed values ----------------------------------------------------------------------------


def _range_problems(v: Mapping[str, object]) -> list[str]:
    out = [f"learning_rate={v['learning_rate']}: must be > 0"] if v["learning_rate"] <= 0 else []
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if v[key] < 1:
            out.append(f"{key}={v[key]}: must be >= 1")
    for key in ("weight_decay", "warmup_steps", "max_grad_norm", "num_train_epochs"):
        if v[key] < 0:
            out.append(f"{key}={v[key]}: must be >= 0")
    if v["max_steps"] <= 0 and v["num_train_epochs"] <= 0:
        out.append(f"num_train_epochs={v['num_train_epochs']} and max_steps={v['max_steps']}: nothing to train")
    if v["model_max_length"] < 2:
        out.append(f"model_max_length must be >= 2, got {v['model_max_length']}")
    if v["lora_r"] is not None and v["lora_r"] < 1:
        out.append(f"lora_r must be >= 1, got {v['lora_r']}")
    if v["lora_alpha"] is not None and v["lora_alpha"] <= 0:
        out.append(f"lora_alpha must be > 0, got {v['lora_alpha']}")
    if v["lora_dropout"] is not None and not 0 <= v["lora_dropout"] < 1:
        out.append(f"lora_dropout must be in [0, 1), got {v['lora_dropout']}")
    if v["router_aux_loss_coef"] is not None and v["router_aux_loss_coef"] < 0:
        out.append(f"router_aux_loss_coef must be >= 0, got {v['router_aux_loss_coef']}")
    return out


def _conflicts(v: Mapping[str, object]) -> list[str]:
    out = []
    if v["strict"] and v["truncate_source"]:
        out.append("strict=True (fail on over-long samples) contradicts truncate_source=True (cut them): choose one")
    if v["use_qlora"] and v["torch_dtype"] == "float32" and v["bnb_4bit_compute_dtype"] != "float32":
        out.append(f"use_qlora with torch_dtype=float32 but bnb_4bit_compute_dtype={v['bnb_4bit_compute_dtype']}: "
                   f"choose one precision for the non-quantized layers")
    if v["bf16"] and v["fp16"]:
        out.append("bf16=True and fp16=True: choose one mixed precision")
    return out


def _global_batch_problems(given: Mapping[str, object], v: Mapping[str, object]) -> list[str]:
    """global_batch_size = processes x per_device_train_batch_size x gradient_accumulation_steps, exactly."""
    from qwen_sft.train.args import data_parallel_size, samples_per_step

    if not v.get("global_batch_size"):
        return []
    if "gradient_accumulation_steps" in given:
        return [f"global_batch_size={v['global_batch_size']} sets gradient_accumulation_steps; "
                f"gradient_accumulation_steps={v['gradient_accumulation_steps']} was given too: give one"]
    per_step = samples_per_step(v)
    if v["global_batch_size"] % per_step:
        dp, sp = data_parallel_size(v), int(v.get("sp_size", 1) or 1)
        groups = f"{dp} processes" if sp == 1 else f"{dp} data-parallel groups (processes / sp_size {sp})"
        return [f"global_batch_size={v['global_batch_size']} is not a multiple of {groups} x "
                f"per_device_train_batch_size={per_step // dp} (= {per_step}): change GLOBAL_BATCH or MICRO_BATCH"]
    return []


def _deepspeed_stage(v: Mapping[str, object], problems: list[str]) -> int | None:
    ds = v["deepspeed"]
    if not ds:
        return None
    if isinstance(ds, str):
        try:
            ds = json.loads(Path(ds).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"deepspeed={v['deepspeed']}: cannot read the DeepSpeed config ({exc})")
            return None
    try:
        return int(ds.get("zero_optimization", {}).get("stage", 0))
    except (AttributeError, TypeError, ValueError):
        problems.append(f"deepspeed={v['deepspeed']}: zero_optimization.stage is not an integer")
        return None


def _data_problems(v: Mapping[str, object]) -> list[str]:
    return [f"{key}={v[key]}: no such file" for key in ("data_path", "eval_data_path")
            if v[key] and not Path(v[key]).exists()]


@functools.cache
def _meta_names(source: str, cache_dir: str | None, trust_remote_code: bool) -> tuple[frozenset[str], frozenset[str]]:
    """Module and parameter names of the model built from its config on the meta device: no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return frozenset(n for n, _ in model.named_modules() if n), frozenset(n for n, _ in model.named_parameters())


def target_problems(lora: dict, modules: frozenset[str], params: frozenset[str], where: str) -> list[str]:
    """LoRA target names that match no module (peft: the name or a dotted suffix) and no fused expert parameter."""
    from qwen_sft.train.model import EXPERT_NAME_MAP

    targets = lora.get("target_modules") or []
    if isinstance(targets, str):  # peft: a string is a regex matched against whole module names
        if not any(re.fullmatch(targets, m) for m in modules):
            return [f"{where}: target_modules regex {targets!r} matches no module of the model"]
        return []
    fused = {p.rsplit(".", 1)[-1] for p in params if in_experts(p)}
    unmatched = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)
                 and not (t in EXPERT_NAME_MAP and EXPERT_NAME_MAP[t] in fused) and t not in fused]
    unmatched += [t for t in lora.get("target_parameters") or [] if not any(p.endswith(t) for p in params)]
    if unmatched:
        leaves = sorted({m.rsplit(".", 1)[-1] for m in modules if not m.rsplit(".", 1)[-1].isdigit()})
        return [f"{where}: LoRA targets {unmatched} match nothing in the model (its modules: {', '.join(leaves)})"]
    return []


def _model_problems(v: Mapping[str, object], problems: list[str]) -> dict:
    """Model config, weights present, engine constraints and LoRA targets. Returns what later steps need."""
    from transformers import AutoConfig

    from qwen_sft.train.args import lora_config
    from qwen_sft.train.download import download_command, is_hub_id, locate_model

    found = locate_model(v["model_name_or_path"], v["cache_dir"])
    warning = None
    if found.problem and found.weights_only and v.get("dry_run"):  # a dry run never loads them: rehearse anyway
        warning = f"{found.problem} (dry run: rehearsing without the weights; the real run will stop or download)"
        found.problem = None
    if found.problem:
        problems.append(found.problem)
    source = str(found.directory) if found.directory else v["model_name_or_path"]
    lora = None
    if v["use_peft"] or v["use_qlora"]:
        try:
            lora = lora_config(v)
        except (OSError, ValueError) as exc:
            problems.append(str(exc))
    stage = _deepspeed_stage(v, problems)
    if found.problem and not found.directory:
        return {"download": found.download, "warning": warning}
    try:
        config = AutoConfig.from_pretrained(source, cache_dir=v["cache_dir"], trust_remote_code=v["trust_remote_code"])
    except (OSError, ValueError) as exc:
        hint = ""
        if is_hub_id(v["model_name_or_path"]):  # e.g. no network: say how to fetch it by hand
            hint = f"; download it first: {download_command(v['model_name_or_path'], v['cache_dir'])}"
        problems.append(f"model_name_or_path={v['model_name_or_path']}: cannot read its config "
                        f"({str(exc).splitlines()[0][:200]}){hint}")
        return {"download": found.download, "warning": warning}
    from qwen_sft.train.sp import model_problems as sp_problems  # heads, KV heads, layer kinds, WORLD_SIZE

    problems.extend(sp_problems(int(v["sp_size"]), config))
    engine = bool((v["use_peft"] or v["use_qlora"]) and v["expert_engine"] and getattr(config, "num_experts", 0))
    if engine and stage == 3:
        problems.append(f"expert_engine=True (the default for LoRA/QLoRA on an MoE model) does not run under "
                        f"DeepSpeed ZeRO-3 (deepspeed={v['deepspeed']}): use --deepspeed configs/zero2.json, or "
                        f"--expert_engine false (stock peft, experts in 16-bit)")
    if engine and v["use_qlora"] and v["bnb_4bit_quant_type"] != "nf4":
        problems.append(f"expert_engine=True stores the experts in NF4 only, got bnb_4bit_quant_type="
                        f"{v['bnb_4bit_quant_type']}: use nf4, or --expert_engine false")
    if lora is not None:
        try:
            modules, params = _meta_names(source, v["cache_dir"], bool(v["trust_remote_code"]))
        except Exception as exc:  # noqa: BLE001 - any failure to build the skeleton is reported, not raised
            problems.append(f"model_name_or_path={v['model_name_or_path']}: cannot build the model from its config "
                            f"to check the LoRA targets ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        else:
            problems.extend(target_problems(lora, modules, params, f"peft_config_path={v['peft_config_path']}"))
    return {"download": found.download, "engine": engine, "deepspeed_stage": stage, "warning": warning}


def find_problems(values: Mapping[str, object], io: bool = True) -> list[str]:
    """Every problem of ``values`` (raw or typed; options not given take their defaults). ``io=False``: only
    what the values themselves say (types, ranges, conflicts), reading no file."""
    typed, problems = coerce(values)
    v = with_defaults(typed)  # an option whose type check failed is listed above and checked at its default
    problems += _range_problems(v) + _conflicts(v) + _global_batch_problems(typed, v)
    if io:
        problems += _data_problems(v)
        _model_problems(v, problems)
    return problems


def lora_checkpointing_default(config) -> bool:
    """LoRA/QLoRA turn gradient checkpointing on unless either of its names was set (run.py applies it)."""
    return bool(config.model.use_peft) and not {"gradient_checkpointing", "activation_checkpointing"} & set(
        config.origins)


def _run_problems(config) -> list[str]:
    """The long-sequence options against the rest, with the checkpointing the run will have."""
    import types as _types

    from qwen_sft.train.args import long_sequence_conflicts

    t = config.training_values  # the values, not TrainingArguments: validating sets no device up
    checkpointing = bool(t.get("activation_checkpointing") or t.get("gradient_checkpointing"))
    effective = _types.SimpleNamespace(activation_checkpointing=checkpointing or lora_checkpointing_default(config),
                                       deepspeed=t.get("deepspeed"))
    return long_sequence_conflicts(config.data, config.run, effective)


def validate(config) -> dict:
    """Raise ``ConfigError`` listing every problem of a built ``Config``; return what the run needs later
    (``download``: a Hub id whose weights must be fetched first; ``engine``; ``deepspeed_stage``)."""
    import dataclasses

    # TrainingArguments' values are already parsed (enums, lists); the recipe's dataclasses may have been
    # built directly in Python, so their values are type-checked again.
    training = {f.name: getattr(config.training, f.name) for f in dataclasses.fields(config.training)
                if f.init and hasattr(config.training, f.name)}
    recipe = {**dataclasses.asdict(config.model), **dataclasses.asdict(config.data), **dataclasses.asdict(config.run)}
    typed, problems = coerce(recipe)
    v = {**with_defaults({}), **training, **typed}
    problems += _range_problems(v) + _conflicts(v) + _data_problems(v) + _run_problems(config)
    info = _model_problems(v, problems)
    if problems:
        raise ConfigError(problems)
    return info
