"""Training's side of the download policy, which qwen_sft/model/checkpoint.py defines: the validation pass
locates the model (``locate_model``) before any data is read, and the run downloads missing weights after the
data passed, raising a ``ConfigError`` like every other problem that stops a run before it starts.

    from qwen_sft.train.download import locate_model
    locate_model("Qwen/Qwen3-Coder-30B-A3B-Instruct", ".cache/huggingface/hub")
"""

from __future__ import annotations

from pathlib import Path

from qwen_sft.model.checkpoint import (
    ModelFiles,
    ModelNotFound,
    cached_snapshot,
    download_command,
    download_snapshot,
    hub_cache,
    hub_offline,
    is_hub_id,
    locate_model,
    missing_weights,
)

__all__ = ["ModelFiles", "cached_snapshot", "download_command", "download_model", "hub_cache", "hub_offline",
           "is_hub_id", "locate_model", "missing_weights"]


def download_model(repo_id: str, cache_dir: str | None) -> Path:
    """The whole repository into the cache (``download_snapshot``); its one-line error as a ``ConfigError``."""
    from qwen_sft.train.validate import ConfigError

    try:
        return download_snapshot(repo_id, cache_dir)
    except ModelNotFound as exc:
        raise ConfigError([str(exc)]) from exc.__cause__
