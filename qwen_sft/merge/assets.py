"""Everything beside the weights: config.json, generation_config.json, the tokenizer + chat template, provenance.

    from qwen_sft.merge.assets import write_assets
    write_assets(base, adapter, out_dir, dtype="bfloat16")

The tokenizer comes from the adapter directory when training saved one there (it carries the chat
template the model was trained with), else from the base; files are copied byte for byte so the
template cannot drift. Nothing written here depends on time or machine, so two runs give equal files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qwen_sft.merge.adapter import Adapter
from qwen_sft.merge.plan import BaseCheckpoint

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
INFO_FILE = "qwen_sft_merge.json"


def write_config(base: BaseCheckpoint, out_dir: Path, dtype: str) -> None:
    """The base config with its dtype set to what the shards now hold (no other change)."""
    config = dict(base.config)
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for k in keys:
        config[k] = dtype
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_generation_config(base: BaseCheckpoint, out_dir: Path) -> str:
    """Copy the base's generation_config.json; derive one from config.json when the base has none."""
    src = base.path / "generation_config.json"
    if src.is_file():
        shutil.copyfile(src, out_dir / "generation_config.json")
        return str(src)
    from transformers import GenerationConfig, PretrainedConfig

    GenerationConfig.from_model_config(PretrainedConfig.from_dict(base.config)).save_pretrained(out_dir)
    return "derived from config.json"


def copy_tokenizer(src: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out_dir / name)
            copied.append(name)
    return copied


def write_assets(base: BaseCheckpoint, adapter: Adapter, out_dir: Path, dtype: str) -> dict:
    """Write config, generation config and tokenizer; return where each came from (logged and recorded)."""
    write_config(base, out_dir, dtype)
    sources = {"config": str(base.path / "config.json"), "generation_config": write_generation_config(base, out_dir)}
    tok_src = adapter.tokenizer_dir or base.path
    copied = copy_tokenizer(tok_src, out_dir)
    sources["tokenizer"] = f"{tok_src} ({'saved beside the adapter' if adapter.tokenizer_dir else 'base model'})"
    sources["tokenizer_files"] = copied
    return sources


def write_info(out_dir: Path, info: dict) -> None:
    """Provenance of the merge (inputs, adapter hash, counts, verification); no timestamps, for determinism."""
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
