"""Read and validate a peft LoRA adapter directory without touching the base model.

    from qwen_sft.merge.adapter import read_adapter
    adapter = read_adapter("checkpoints/qwen3_30b_qlora")

Understands every layout our training can write: ``target_modules`` LoRA on ``nn.Linear`` (attention),
peft's ``target_parameters`` LoRA on the fused expert parameters (``mlp.experts.gate_up_proj`` /
``mlp.experts.down_proj``, saved as nested wrappers ``mlp.experts.base_layer.lora_A`` …, which is which being
qwen_sft/model/checkpoint.py's ``expert_lora_param``), the old
per-expert layout (``mlp.experts.7.gate_proj.lora_A``) and ``modules_to_save`` full tensors. Anything
else (DoRA, LoRA bias, embedding LoRA, pickled ``adapter_model.bin``) is refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_sft.model.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, split_lora_key

# Files a training run saves beside the adapter that describe how it was trained (read for the QLoRA note).
EFFECTIVE_CONFIG_GLOBS = ("*.yaml", "*.yml", "*.json")
NOT_EFFECTIVE_CONFIG = {ADAPTER_CONFIG, "tokenizer_config.json", "tokenizer.json", "vocab.json", "special_tokens_map.json",
                        "added_tokens.json", "chat_template.json", "trainer_state.json", "config.json",
                        "generation_config.json"}


class MergeError(Exception):
    """A problem with the inputs or the result; the message says what was found and what to do."""


@dataclass
class LoraPair:
    """One LoRA factor pair as saved: ``module`` without ``base_layer`` parts, ``depth`` = how many were stripped."""

    module: str
    depth: int
    A: Any  # torch.Tensor, annotated loosely so that reading the config needs no torch import
    B: Any


@dataclass
class Adapter:
    path: Path
    config: dict
    pairs: list[LoraPair]
    replacements: dict[str, Any]  # modules_to_save: base key -> full tensor
    weights_sha256: str
    tokenizer_dir: Path | None = None
    quantized_training: str | None = None  # e.g. "load_in_4bit=True in train_config.yaml"
    notes: list[str] = field(default_factory=list)

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def _fail(path: Path, problems: list[str]) -> None:
    if problems:
        shown = problems[:20] + ([f"… and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise MergeError(f"adapter {path}:\n  - " + "\n  - ".join(shown))


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json, checked for the LoRA features a merge can reproduce exactly."""
    cfg_path = path / ADAPTER_CONFIG
    if not path.is_dir():
        raise MergeError(f"adapter directory {path} does not exist")
    if not cfg_path.is_file():
        hint = ""
        if any(path.glob("checkpoint-*/" + ADAPTER_CONFIG)):
            hint = " It holds checkpoint-* adapters: pass --all_checkpoints, or point --adapter_path at one of them."
        raise MergeError(f"{cfg_path} is missing: {path} is not a peft adapter directory.{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MergeError(f"{cfg_path} is not valid JSON ({err}); the adapter directory is corrupted") from err
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type={cfg.get('peft_type')!r}; only LoRA adapters can be merged")
    if cfg.get("use_dora"):
        problems.append("use_dora=true: DoRA merging is not supported here")
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        problems.append(f"lora_bias={cfg.get('lora_bias')!r} bias={cfg.get('bias')!r}: bias training is not supported")
    if cfg.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=true is for GPT-2 Conv1D layers, which Qwen3 does not have")
    if cfg.get("trainable_token_indices"):
        problems.append("trainable_token_indices is not supported; train with modules_to_save instead")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg.get(key) <= 0:
            problems.append(f"{key}={cfg.get(key)!r} must be a positive number")
    _fail(path, problems)
    return cfg


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_adapter_tensors(path: Path) -> dict[str, Any]:
    """All tensors of adapter_model.safetensors; never falls back to a pickled .bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise MergeError(
                f"{path} has only adapter_model.bin, a pickle; it is not loaded because unpickling can run code. "
                "Re-save the adapter with safetensors (peft's save_pretrained does by default)."
            )
        raise MergeError(f"{weights} is missing: the adapter directory is incomplete (was training interrupted?)")
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise MergeError(f"{weights} cannot be read ({err}); the file is corrupted or truncated") from err


def split_pairs(path: Path, tensors: dict[str, Any], cfg: dict) -> tuple[list[LoraPair], dict[str, Any]]:
    """Group saved tensors into LoRA pairs and modules_to_save replacements; every key is accounted for."""
    factors: dict[tuple[str, int], dict[str, Any]] = {}
    replacements: dict[str, Any] = {}
    problems = []
    to_save = cfg.get("modules_to_save") or []
    for key in sorted(tensors):
        if not key.startswith(PEFT_PREFIX):
            problems.append(f"{key}: not a peft key (expected the prefix {PEFT_PREFIX!r})")
            continue
        name = key[len(PEFT_PREFIX):]
        parts = split_lora_key(key)
        if parts is None:
            if any(t in name for t in ("lora_embedding", "lora_magnitude", "lora_")):
                problems.append(f"{key}: unsupported LoRA tensor (embedding LoRA / DoRA cannot be merged here)")
            elif any(name == f"{m}.weight" or name.endswith(f".{m}.weight") for m in to_save):
                if tensors[key].is_floating_point() and not tensors[key].isfinite().all():
                    problems.append(f"{key}: the modules_to_save tensor contains NaN or inf")
                    continue
                replacements[name] = tensors[key]
            else:
                problems.append(f"{key}: neither a LoRA factor nor a modules_to_save tensor ({to_save=})")
            continue
        head, depth, which, tail = parts
        if tail != "weight":
            problems.append(f"{key}: only LoRA weights are supported (found {tail!r})")
            continue
        factors.setdefault((head, depth), {})[which] = tensors[key]
    pairs = []
    for (module, depth), ab in sorted(factors.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(ab)).pop()
            problems.append(f"{module}: {missing} is missing from {ADAPTER_WEIGHTS}")
            continue
        A, B = ab["lora_A"], ab["lora_B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            problems.append(f"{module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not form a LoRA pair")
            continue
        if not (A.isfinite().all() and B.isfinite().all()):
            problems.append(f"{module}: lora_A / lora_B contain NaN or inf; the adapter diverged or is corrupted")
            continue
        pairs.append(LoraPair(module, depth, A, B))
    if not pairs and not replacements and not problems:
        problems.append(f"{ADAPTER_WEIGHTS} holds no LoRA weights")
    _fail(path, problems)
    return pairs, replacements


def find_tokenizer_dir(*candidates: Path) -> Path | None:
    """The first directory holding a tokenizer (the one saved beside the adapter in training wins)."""
    for d in candidates:
        if (d / "tokenizer_config.json").is_file():
            return d
    return None


def _quantization_hint(obj: Any, where: str) -> str | None:
    """A description of 4/8-bit training if this (nested) effective config says so."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            k = str(key).lower()
            # use_qlora: qwen-sft train's train_config.yaml; quantize_experts: the MoE expert engine (NF4 experts);
            # load_in_4bit/8bit: a BitsAndBytesConfig dump. bnb_4bit_quant_type alone is a default, not a signal.
            if k in ("use_qlora", "load_in_4bit", "load_in_8bit", "quantize_experts") and value is True:
                return f"{key}=true in {where}"
            if k in ("method", "finetuning_type", "mode", "training_mode", "peft_method") and str(value).lower() == "qlora":
                return f"{key}={value} in {where}"
            found = _quantization_hint(value, where)
            if found:
                return found
    elif isinstance(obj, list):
        for item in obj:
            found = _quantization_hint(item, where)
            if found:
                return found
    return None


def detect_quantized_training(*dirs: Path) -> str | None:
    """Look through the effective configs saved beside the adapter for a 4/8-bit base (QLoRA)."""
    import yaml

    for d in dirs:
        for pattern in EFFECTIVE_CONFIG_GLOBS:
            for f in sorted(d.glob(pattern)):
                if f.name in NOT_EFFECTIVE_CONFIG or f.stat().st_size > 4 << 20:
                    continue
                try:
                    text = f.read_text(encoding="utf-8")
                    data = json.loads(text) if f.suffix == ".json" else yaml.safe_load(text)
                except (ValueError, yaml.YAMLError, UnicodeDecodeError):
                    continue
                hint = _quantization_hint(data, f.name)
                if hint:
                    return hint
    return None


def read_adapter(path: str | Path, fallback_dirs: tuple[Path, ...] = ()) -> Adapter:
    """Read, group and validate one adapter directory. ``fallback_dirs``: where else to look for the tokenizer."""
    path = Path(path)
    cfg = read_adapter_config(path)
    tensors = load_adapter_tensors(path)
    from qwen_sft.checkpoint import adapter_problems

    # An interrupted save (no completion marker, expert factors never added) must not merge as if complete.
    _fail(path, adapter_problems(path))
    pairs, replacements = split_pairs(path, tensors, cfg)
    adapter = Adapter(path=path, config=cfg, pairs=pairs, replacements=replacements,
                      weights_sha256=_sha256(path / ADAPTER_WEIGHTS))
    adapter.tokenizer_dir = find_tokenizer_dir(path, *fallback_dirs)
    adapter.quantized_training = detect_quantized_training(path, *fallback_dirs)
    if pairs and all(not bool(p.B.any()) for p in pairs) and not replacements:
        adapter.notes.append("every lora_B is zero (an untrained adapter): the merged model will equal the base")
    return adapter
