"""Is this adapter / checkpoint complete, and if not, why not. One answer for train (resume), merge and export.

    from qwen_sft.checkpoint import check_adapter_complete, checkpoint_problems
    check_adapter_complete("outputs/run/checkpoint-200")     # raises ValueError naming what is missing
    checkpoint_problems("outputs/run/checkpoint-200")        # [] when resume can use it

A save is several files written one after the other (peft's adapter, then the expert factors, optimizer, RNG
and trainer state), so a kill in between leaves a directory that looks finished. Training therefore writes
``qwen_sft_complete.json`` LAST (``mark_complete``), listing every file with its size, and removes it first when
it starts to rewrite a directory (``invalidate``). A directory that a qwen-sft run wrote (it holds the run's
``train_config.yaml`` and ``trainable_params.json``) without that marker is incomplete everywhere. Independently
of the marker, an adapter whose run trained expert LoRA (``trainable_params.json``, ``data_stats.json`` or
``adapter_config.json`` say so) must hold expert tensors: that one missing half is the whole expert fine-tune.

Only headers are read (safetensors header, JSON files): cheap on a 30B run's checkpoints, and nothing is
unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from qwen_sft.atomic import atomic_open
from qwen_sft.model.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INDEX_FILE, SINGLE_FILE, in_experts, shard_files

MARKER = "qwen_sft_complete.json"
TRAINER_STATE = "trainer_state.json"
# Written by write_artifacts at the start of every qwen-sft run: their presence means "a qwen-sft run wrote this".
RUN_RECORD = ("train_config.yaml", "trainable_params.json")
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


class SaveError(OSError):
    """A save failed (disk full, permissions): reported as one line, not a traceback."""

    @classmethod
    def of(cls, what: str, err: OSError, kept: str) -> SaveError:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return cls(f"saving {what} failed: {err.strerror or err}{where}; {kept}")


def invalidate(directory: str | os.PathLike) -> None:
    """Remove the completion marker before a directory is (re)written."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(directory) / MARKER)


def mark_complete(directory: str | os.PathLike) -> Path:
    """Write the completion marker last: every top-level file with its size, so a later partial rewrite shows."""
    directory = Path(directory)
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir())
             if p.is_file() and p.name != MARKER and not p.name.startswith(".")}
    with atomic_open(directory / MARKER) as fh:
        json.dump({"files": files}, fh, indent=1, sort_keys=True)
    return directory / MARKER


def safetensors_keys(path: Path) -> tuple[list[str], str | None]:
    """Tensor names of a safetensors file from its header, and what is wrong with the file (None when sound)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                return [], f"{path.name} is truncated or not a safetensors file ({size} bytes)"
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        return [], f"{path.name} is missing"
    except (OSError, ValueError) as err:
        return [], f"{path.name} cannot be read ({err})"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return [], f"{path.name} has a malformed header"
    if 8 + n + end != size:
        return [], f"{path.name} is truncated: {size} bytes on disk, its header describes {8 + n + end}"
    return list(tensors), None


def _json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _record_dirs(directory: Path) -> list[Path]:
    """Where the run's records are: the directory itself, and the run's output_dir for a checkpoint-N."""
    return [directory, directory.parent] if CHECKPOINT_RE.fullmatch(directory.name) else [directory]


def expert_training_record(directory: str | os.PathLike) -> str | None:
    """Which record says this run trained expert LoRA (None when none does)."""
    directory = Path(directory)
    cfg = _json(directory / ADAPTER_CONFIG)
    targets = cfg.get("target_parameters") if isinstance(cfg, dict) else None
    if targets and any("experts" in str(t) for t in targets):
        return f"{ADAPTER_CONFIG} target_parameters={targets}"
    for d in _record_dirs(directory):
        groups = _json(d / "trainable_params.json")
        if isinstance(groups, dict) and int((groups.get("experts") or {}).get("trainable") or 0) > 0:
            return f"{d / 'trainable_params.json'} (experts: {groups['experts']['trainable']:,} trainable)"
        stats = _json(d / "data_stats.json")
        lora = stats.get("lora") if isinstance(stats, dict) else None
        if isinstance(lora, dict) and lora.get("target_parameters"):
            return f"{d / 'data_stats.json'} (lora target_parameters={lora['target_parameters']})"
    return None


def _marker_problems(directory: Path, required: bool = False) -> list[str]:
    marker = directory / MARKER
    if not marker.is_file():
        # A checkpoint gets the run's records copied in only at the end of its save: look in output_dir too.
        if required or any(all((d / name).is_file() for name in RUN_RECORD) for d in _record_dirs(directory)):
            return [f"no completion marker {MARKER}: the save did not finish (killed or out of disk?)"]
        return []
    recorded = _json(marker)
    files = recorded.get("files") if isinstance(recorded, dict) else None
    problems = []
    for name, size in (files or {}).items():  # an empty marker (`touch`) vouches without sizes
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is listed in {MARKER} but missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} is {path.stat().st_size} bytes, {MARKER} recorded {size} (partly rewritten?)")
    return problems


def adapter_problems(directory: str | os.PathLike, marker_required: bool = False) -> list[str]:
    """Everything that makes ``directory`` an incomplete peft adapter ([] when complete). The marker is required
    where a qwen-sft run's records lie beside the adapter (or ``marker_required``); adapters from other tools
    are judged by their files alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    problems = []
    if not isinstance(_json(directory / ADAPTER_CONFIG), dict):
        problems.append(f"{ADAPTER_CONFIG} is missing or not valid JSON")
    keys, bad = safetensors_keys(directory / ADAPTER_WEIGHTS)
    if bad:
        problems.append(bad)
    problems += _marker_problems(directory, marker_required)
    if not bad:
        record = expert_training_record(directory)
        if record and not any(in_experts(k) and "lora_" in k for k in keys):
            problems.append(f"the run trained expert LoRA ({record}) but {ADAPTER_WEIGHTS} holds no expert tensors "
                            f"(*.mlp.experts.*lora_A/lora_B): the save stopped before the expert factors were added, "
                            f"so this adapter would lose the whole expert fine-tune")
    return problems


def check_adapter_complete(adapter_dir: str | os.PathLike) -> None:
    """Raise ValueError naming every reason ``adapter_dir`` is not a complete adapter; return when it is."""
    problems = adapter_problems(adapter_dir)
    if problems:
        raise ValueError(f"adapter {adapter_dir} is incomplete: " + "; ".join(problems))


def checkpoint_problems(directory: str | os.PathLike) -> list[str]:
    """Everything that keeps a Trainer checkpoint-N from being resumed ([] when it can be)."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    state = _json(directory / TRAINER_STATE)
    problems = [] if isinstance(state, dict) else [f"{TRAINER_STATE} is missing or not valid JSON"]
    if (directory / ADAPTER_CONFIG).exists() or (directory / ADAPTER_WEIGHTS).exists():
        return problems + adapter_problems(directory, marker_required=True)
    problems += _marker_problems(directory, required=True)
    try:
        shards = shard_files(directory)
    except ValueError:  # an unreadable index: what the single file (if any) holds is all there is
        shards = [SINGLE_FILE] if (directory / SINGLE_FILE).is_file() else []
    if not shards:
        problems.append(f"no {ADAPTER_WEIGHTS}, {SINGLE_FILE} or {INDEX_FILE}")
    for shard in shards:
        _, bad = safetensors_keys(directory / shard)
        if bad:
            problems.append(bad)
    return problems


def checkpoints_newest_first(output_dir: str | os.PathLike) -> list[Path]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if p.is_dir() and (m := CHECKPOINT_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]
