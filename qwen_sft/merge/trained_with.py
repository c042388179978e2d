"""How an adapter was trained, read from its run's own ``train_config.yaml`` (qwen_sft/train/run.py writes it).

    from qwen_sft.merge.trained_with import read_trained_with
    trained = read_trained_with(Path("checkpoints/qwen3_30b_qlora"))
    trained.source, trained.use_qlora, trained.lora      # None when the run left no train_config.yaml

A checkpoint-N directory has none of its own: the run's directory above it is looked at next. Only when no
train_config.yaml is found does the merge fall back to guessing from other config files (merge/adapter.py),
and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAIN_CONFIG = "train_config.yaml"
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "peft_config_path", "expert_engine")


class TrainConfigError(ValueError):
    """A train_config.yaml that exists but cannot be read as the run's configuration."""


@dataclass
class TrainedWith:
    source: Path | None  # the train_config.yaml read; None: not found
    model_name_or_path: str | None = None
    use_qlora: bool = False
    bnb_4bit_quant_type: str | None = None
    lora: dict[str, Any] = field(default_factory=dict)

    @property
    def quantized_training(self) -> str | None:
        """The merge's one-line reason for its QLoRA note, or None for a 16-bit base."""
        return f"use_qlora=true in {self.source.name}" if self.source is not None and self.use_qlora else None

    def describe(self) -> str:
        if self.source is None:
            return (f"no {TRAIN_CONFIG} beside the adapter (not written by qwen-sft train?): how it was trained is "
                    f"inferred from adapter_config.json and any other config files there")
        base = f", base {self.model_name_or_path!r}" if self.model_name_or_path else ""
        quant = f"QLoRA ({self.bnb_4bit_quant_type or 'nf4'})" if self.use_qlora else "16-bit base"
        lora = ", ".join(f"{k}={v}" for k, v in self.lora.items() if v is not None)
        return f"training settings from {self.source}: {quant}{base}" + (f"; {lora}" if lora else "")


def find_train_config(*dirs: Path) -> Path | None:
    for d in dirs:
        if (Path(d) / TRAIN_CONFIG).is_file():
            return Path(d) / TRAIN_CONFIG
    return None


def read_trained_with(*dirs: Path) -> TrainedWith:
    """The first ``train_config.yaml`` in ``dirs`` (the adapter's own directory first)."""
    import yaml

    path = find_train_config(*dirs)
    if path is None:
        return TrainedWith(source=None)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise TrainConfigError(f"{path}: cannot read the run's training settings ({str(err).splitlines()[0]}); "
                               f"fix or remove it") from None
    if not isinstance(values, dict):
        raise TrainConfigError(f"{path}: expected option: value pairs, found {type(values).__name__}")
    return TrainedWith(source=path, model_name_or_path=values.get("model_name_or_path"),
                       use_qlora=values.get("use_qlora") is True, bnb_4bit_quant_type=values.get("bnb_4bit_quant_type"),
                       lora={k: values[k] for k in LORA_KEYS if k in values})
