"""Where the base model's files are, and the download policy: weights missing → download them, or, offline,
stop at once with the command that downloads them.

    from qwen_sft.train.download import locate_model
    locate_model("Qwen/Qwen3-Coder-30B-A3B-Instruct", ".cache/huggingface/hub")

A Hub id resolves to its snapshot in the local Hugging Face cache. A snapshot holding only ``config.json``
and the tokenizer (what reading the config and tokenizer leaves behind) is *not* a model: the validation
pass says so before any data is read, instead of the loader failing late.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache(cache_dir: str | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def download_command(repo_id: str, cache_dir: str | None) -> str:
    return f"hf download {shlex.quote(repo_id)} --cache-dir {shlex.quote(os.path.abspath(hub_cache(cache_dir)))}"


def missing_weights(model_dir: Path) -> str | None:
    """Why ``model_dir`` is not a loadable safetensors checkpoint, or None when it is."""
    if not (model_dir / "config.json").is_file():
        return "no config.json"
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            return f"unreadable model.safetensors.index.json ({exc})"
        absent = [s for s in shards if not (model_dir / s).is_file()]
        return f"{len(absent)} of {len(shards)} weight shards missing, e.g. {absent[0]}" if absent else None
    if (model_dir / "model.safetensors").is_file():
        return None
    return "config.json but no weights (no model.safetensors or model.safetensors.index.json)"


@dataclass
class ModelFiles:
    """``directory``: where config.json is (None when not local). ``problem``: why the run cannot start.
    ``download``: a Hub id whose weights must be downloaded before the model loads (online only).
    ``weights_only``: the problem is only that the weights are absent (config.json is there): a dry run,
    which never loads weights, rehearses anyway and reports it as a warning."""

    directory: Path | None
    problem: str | None = None
    download: str | None = None
    weights_only: bool = False


def cached_snapshot(repo_id: str, cache_dir: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    return Path(found).parent if isinstance(found, str) else None


def locate_model(name: str, cache_dir: str | None) -> ModelFiles:
    path = Path(name).expanduser()
    if path.is_dir():
        why = missing_weights(path)
        return ModelFiles(path, f"model_name_or_path={name}: {why}: not a complete model directory" if why else None,
                          weights_only=why is not None and (path / "config.json").is_file())
    if not is_hub_id(name):
        return ModelFiles(None, f"model_name_or_path={name}: no such model directory (and not a Hub id owner/name)")
    snapshot = cached_snapshot(name, cache_dir)
    why = missing_weights(snapshot) if snapshot else "not downloaded"
    if why is None:
        return ModelFiles(snapshot)
    if hub_offline():
        return ModelFiles(snapshot, f"model_name_or_path={name}: {why} in the cache {hub_cache(cache_dir)}, and "
                                    f"HF_HUB_OFFLINE=1 forbids downloading; download it first: "
                                    f"{download_command(name, cache_dir)}", weights_only=snapshot is not None)
    return ModelFiles(snapshot, download=name)


def download_model(repo_id: str, cache_dir: str | None) -> Path:
    """The whole repository into the cache, with huggingface_hub's progress bars; a one-line error with the
    command to run by hand when the Hub cannot be reached."""
    from huggingface_hub import snapshot_download

    from qwen_sft.train.validate import ConfigError

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - connection, auth and disk errors all end the same way
        raise ConfigError([f"could not download {repo_id} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                      f"download it by hand: {download_command(repo_id, cache_dir)}"]) from exc
