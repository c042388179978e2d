"""The checkpoint contract: where a model's files are, which tensors they hold, how experts are named on disk,
and how peft lays out expert LoRA. Training, the QLoRA loader, merge and export all read it from here.

    from qwen_sft.model.checkpoint import resolve_model_dir, weight_map, parse_expert_key, peft_to_per_expert
    model_dir = resolve_model_dir("Qwen/Qwen3-Coder-30B-A3B-Instruct", download=True)
    shards = weight_map(model_dir)                       # {tensor name: shard file}

- **Resolving** (one download policy): a local directory is used as it is; a Hub id (``owner/name``) resolves to
  its snapshot in the local Hugging Face cache. A snapshot without weights (what reading only the config and
  tokenizer leaves behind) is not a model. Missing weights are downloaded when the caller allows it and
  ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` does not forbid it; otherwise ``ModelNotFound`` says why and
  gives the command that downloads them (``hf download … --cache-dir …``).
- **The weight map**: ``model.safetensors.index.json``'s ``weight_map`` or the single ``model.safetensors``;
  only safetensors checkpoints are read (pickles run code).
- **Expert keys**: the Hub layout keeps one tensor per expert and projection
  (``….mlp.experts.{e}.{gate_proj|up_proj|down_proj}.weight``); transformers v5 fuses them at load time into
  ``gate_up_proj [E, 2I, H]`` (per expert: the gate rows, then the up rows) and ``down_proj [E, H, I]``.
- **peft adapter files and keys**: ``adapter_config.json`` + ``adapter_model.safetensors``, keys
  ``base_model.model.<module>[.base_layer…].lora_{A,B}.weight`` (``lora_key``, ``split_lora_key``).
- **Which fused parameter a nested expert pair adapts** (``expert_lora_depth`` / ``expert_lora_param``, the one
  rule that training's save and load, merge and the vLLM export use): peft wraps the ``target_parameters`` of
  ``mlp.experts`` one ``ParamWrapper`` around the other in the order the experts module declares its
  parameters (``gate_up_proj``, then ``down_proj``), the first wrapped innermost, so with both targeted
  ``gate_up_proj``'s pair is saved under ``experts.base_layer.lora_*`` and ``down_proj``'s under
  ``experts.lora_*``. The order of the list in adapter_config.json does not matter (peft 0.21
  ``BaseTuner._inject_parameters``; tests/test_expert_lora_nesting.py saves both orders with peft).
- **peft's expert LoRA layout** (``target_parameters``, ``ParamWrapper``): ``lora_A [E·r, in]`` expert-major rows
  and ``lora_B [out, r·E]`` with column ``k·E + e``; per expert that is ``A [E, r, in]`` and ``B [E, out, r]``,
  ΔW[e] = scaling · B[e] @ A[e]. The two views interleave experts differently (that is peft's
  ``get_delta_weight``, not a typo).

Not to be confused with ``qwen_sft/checkpoint.py``: training's own ``checkpoint-N`` directories (completeness
marker, resume).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEFT_PREFIX = "base_model.model."  # every key of a saved peft adapter starts with it
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a peft adapter directory
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")  # per expert on disk
EXPERTS = "mlp.experts"  # each decoder layer's routed experts module (qwen3_moe, qwen3_next)
# The fused parameters of transformers v5's experts module, in the order the module declares them: peft's
# nesting of expert LoRA follows this order (see expert_lora_params), so it is pinned against transformers' own
# experts classes by tests/test_expert_lora_nesting.py.
FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
EXPERT_TARGET_PARAMETERS = [f"{EXPERTS}.{p}" for p in FUSED_EXPERT_PARAMS]  # peft target_parameters for both
# Seed adapter names of the per-expert Linear layers (transformers v4) → the fused v5 parameter.
FUSED_OF = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
# Model types whose fused experts are [E, out, in] with gate_up = cat(gate, up) per expert (peft swaps in/out).
FUSED_EXPERT_MODEL_TYPES = {"qwen3_moe", "qwen2_moe", "qwen3_next"}
_TRUE = {"1", "true", "yes", "on"}
_PER_EXPERT = re.compile(r"^(?P<block>.+\.mlp)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<block>.+\.mlp)\.experts\.(?P<proj>gate_up_proj|down_proj)$")


# --- resolving a model id or directory ------------------------------------------------------------------


class ModelNotFound(FileNotFoundError):
    """The model's files are not here and will not be fetched; the message says why and what to run."""


def is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache(cache_dir: str | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def download_command(repo_id: str, cache_dir: str | None) -> str:
    return f"hf download {shlex.quote(repo_id)} --cache-dir {shlex.quote(os.path.abspath(hub_cache(cache_dir)))}"


def cached_snapshot(repo_id: str, cache_dir: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    return Path(found).parent if isinstance(found, str) else None


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


def locate_model(name: str, cache_dir: str | None, *, where: str | None = None,
                 may_download: bool = True) -> ModelFiles:
    """Where ``name``'s files are, or the one-line problem (prefixed by ``where``, default
    ``model_name_or_path=NAME``). Reads nothing but the file system and the local cache."""
    where = where or f"model_name_or_path={name}"
    path = Path(name).expanduser()
    if path.is_dir():
        why = missing_weights(path)
        return ModelFiles(path, f"{where}: {why}: not a complete model directory" if why else None,
                          weights_only=why is not None and (path / "config.json").is_file())
    if not is_hub_id(name):
        return ModelFiles(None, f"{where}: no such model directory (and not a Hub id owner/name)")
    snapshot = cached_snapshot(name, cache_dir)
    why = missing_weights(snapshot) if snapshot else "not downloaded"
    if why is None:
        return ModelFiles(snapshot)
    if hub_offline() or not may_download:
        reason = ", and HF_HUB_OFFLINE=1 forbids downloading" if may_download else ""
        return ModelFiles(snapshot, f"{where}: {why} in the cache {hub_cache(cache_dir)}{reason}; download it "
                                    f"first: {download_command(name, cache_dir)}", weights_only=snapshot is not None)
    return ModelFiles(snapshot, download=name)


def download_snapshot(repo_id: str, cache_dir: str | None) -> Path:
    """The whole repository into the cache, with huggingface_hub's progress bars; ``ModelNotFound`` with the
    command to run by hand when the Hub cannot be reached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - connection, auth and disk errors all end the same way
        raise ModelNotFound(f"could not download {repo_id} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                            f"download it by hand: {download_command(repo_id, cache_dir)}") from exc


def download_files(repo_id: str, patterns: list[str], cache_dir: str | None = None) -> Path:
    """Only the files matching ``patterns`` (a tokenizer's, say) from the cache or the Hub, as huggingface_hub
    fetches them (its cache, ``HF_HUB_OFFLINE``, ``HF_TOKEN``); its own error when they cannot be had."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns, cache_dir=cache_dir))


def resolve_model_dir(name_or_path: str | Path, cache_dir: str | None = None, *, download: bool = False,
                      where: str | None = None) -> Path:
    """The directory holding ``name_or_path``'s config and weights (see the module doc for the policy).
    ``download=False``: never fetch (the validation pass or the README's download step fills the cache)."""
    name = str(name_or_path)
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()  # what it holds is the loader's to check (it names the file it lacks)
    found = locate_model(name, cache_dir, where=where or name, may_download=download)
    if found.problem:
        raise ModelNotFound(found.problem)
    if found.download:
        return download_snapshot(found.download, cache_dir)
    return found.directory


# --- the weight map ---------------------------------------------------------------------------------------


def read_index(model_dir: Path) -> dict[str, str] | None:
    """``{tensor: shard file name}`` from ``model.safetensors.index.json``; None when there is no index.
    Raises ``ValueError`` naming the file when it is unreadable."""
    index = Path(model_dir) / INDEX_FILE
    if not index.is_file():
        return None
    try:
        wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(wm, dict):
            raise TypeError(f"weight_map is a {type(wm).__name__}")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable {INDEX_FILE} ({exc})") from None
    return wm


def shard_files(model_dir: Path) -> list[str]:
    """The safetensors files of a checkpoint, sorted ([] when it has none)."""
    wm = read_index(model_dir)
    if wm is not None:
        return sorted(set(wm.values()))
    return [SINGLE_FILE] if (Path(model_dir) / SINGLE_FILE).is_file() else []


def missing_weights(model_dir: Path) -> str | None:
    """Why ``model_dir`` is not a loadable safetensors checkpoint, or None when it is."""
    if not (model_dir / "config.json").is_file():
        return "no config.json"
    try:
        shards = shard_files(model_dir)
    except ValueError as exc:
        return str(exc)
    if not shards:
        return f"config.json but no weights (no {SINGLE_FILE} or {INDEX_FILE})"
    absent = [s for s in shards if not (model_dir / s).is_file()]
    return f"{len(absent)} of {len(shards)} weight shards missing, e.g. {absent[0]}" if absent else None


def weight_map(model_dir: Path) -> dict[str, Path]:
    """``{tensor name: shard path}`` of a safetensors checkpoint (a single file is read for its keys)."""
    wm = read_index(model_dir)
    if wm is not None:
        return {k: model_dir / v for k, v in wm.items()}
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints load")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` as transformers writes it (keys sorted)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


# --- expert keys --------------------------------------------------------------------------------------------


def expert_module(experts: str, e: int, proj: str) -> str:
    """The module path of expert ``e``'s ``proj`` under ``experts`` (``model.layers.N.mlp.experts``)."""
    return f"{experts}.{e}.{proj}"


def expert_key(experts: str, e: int, proj: str) -> str:
    """The Hub tensor name of expert ``e``'s ``proj`` weight."""
    return f"{expert_module(experts, e, proj)}.weight"


def parse_expert_key(key: str) -> tuple[str, int | None, str] | None:
    """``(block, expert, proj)`` of a routed-expert tensor (``block`` = ``….mlp``; ``expert`` None for a fused
    ``gate_up_proj`` / ``down_proj``), or None for any other tensor."""
    if m := _PER_EXPERT.match(key):
        return m["block"], int(m["e"]), m["proj"]
    if m := _FUSED.match(key):
        return m["block"], None, m["proj"]
    return None


def gate_up_rows(inter: int) -> list[tuple[str, slice]]:
    """The rows of the fused ``gate_up_proj`` each per-expert projection takes: gate first, then up."""
    return [("gate_proj", slice(0, inter)), ("up_proj", slice(inter, 2 * inter))]


def count_experts(experts: str, keys) -> int:
    """How many consecutive experts ``experts.0 …`` have a ``gate_proj`` among ``keys``."""
    n = 0
    while expert_key(experts, n, "gate_proj") in keys:
        n += 1
    return n


# --- peft adapter keys -----------------------------------------------------------------------------------------


def lora_key(module: str, which: str, depth: int = 0) -> str:
    """The saved key of ``module``'s ``lora_A`` / ``lora_B`` under ``depth`` ``base_layer`` wrappers."""
    return f"{PEFT_PREFIX}{module}{'.base_layer' * depth}.{which}.weight"


def split_lora_key(key: str) -> tuple[str, int, str, str] | None:
    """``(module, depth, "lora_A" | "lora_B", tail)`` of a saved LoRA factor key (inverse of :func:`lora_key`,
    ``tail`` is ``weight`` for a factor), or None when ``key`` is not one (no prefix, modules_to_save, …).
    ``depth`` counts the ``base_layer`` wrappers peft nests around a parameter listed in ``target_parameters``."""
    if not key.startswith(PEFT_PREFIX):
        return None
    name = key[len(PEFT_PREFIX):]
    for which in ("lora_A", "lora_B"):
        head, sep, tail = name.partition(f".{which}.")
        if sep:
            break
    else:
        return None
    depth = 0
    while head.endswith(".base_layer"):
        head, depth = head[: -len(".base_layer")], depth + 1
    return head, depth, which, tail


# --- which fused expert parameter a nested LoRA pair adapts ---------------------------------------------------


def in_experts(name: str) -> bool:
    """Whether a module, parameter, tensor or target name lies inside a layer's routed experts
    (``….mlp.experts.…``; not qwen3_next's ``mlp.shared_expert``)."""
    return f".{EXPERTS}." in f".{name}."


def is_experts_module(module: str) -> bool:
    """Whether ``module`` is a layer's routed experts module (``….mlp.experts``, holding the fused parameters)."""
    return module == EXPERTS or module.endswith(f".{EXPERTS}")


def expert_lora_params(module: str, target_parameters: list[str] | None) -> tuple[str, ...]:
    """The fused parameters of the experts module ``module`` (``model.layers.N.mlp.experts``) that peft wraps for
    ``target_parameters``, innermost wrapper first.

    peft 0.21 (``BaseTuner._inject_parameters``) walks each module's own parameters in their declared order and
    wraps every one that a target names (``f"{module}.{param}"`` equal to it or ending in ``"." + target``)
    around what is already there; the set of targets decides which are wrapped, never the order of the list.
    (Modules under ``torch.nn.utils.parametrize`` are wrapped in sorted order instead; experts never are.)"""
    if not is_experts_module(module):
        return ()  # a bare target ("down_proj") names no parameter of any other module
    targets = list(target_parameters or [])
    return tuple(p for p in FUSED_EXPERT_PARAMS
                 if any(f"{module}.{p}" == t or f"{module}.{p}".endswith(f".{t}") for t in targets))


def expert_lora_depth(module: str, param: str, target_parameters: list[str] | None) -> int:
    """How many ``base_layer`` wrappers lie outside ``param``'s LoRA: its factors are saved as
    ``lora_key(module, "lora_A" | "lora_B", depth)``. ``ValueError`` when ``target_parameters`` does not wrap it."""
    wrapped = expert_lora_params(module, target_parameters)
    if param not in wrapped:
        raise ValueError(f"{module}.{param} is not among the parameters target_parameters={target_parameters} wraps")
    return len(wrapped) - 1 - wrapped.index(param)


def expert_lora_param(module: str, depth: int, target_parameters: list[str] | None) -> str:
    """The fused parameter whose LoRA pair is saved under ``depth`` ``base_layer`` wrappers of ``module``
    (inverse of :func:`expert_lora_depth`); ``ValueError`` naming the targets when no parameter is there."""
    wrapped = expert_lora_params(module, target_parameters)
    if not 0 <= depth < len(wrapped):
        raise ValueError(f"{module}: a LoRA pair under {depth} base_layer wrapper(s), but target_parameters="
                         f"{target_parameters} wraps {list(wrapped) or 'nothing'} there (peft nests them in the "
                         f"order {list(FUSED_EXPERT_PARAMS)}, the first innermost)")
    return wrapped[len(wrapped) - 1 - depth]


# --- peft's expert LoRA layout --------------------------------------------------------------------------------


def factor_from_peft(which: str, t: Any, num_experts: int) -> Any:
    """One peft factor → per expert: ``lora_A [E·r, in]`` → ``[E, r, in]``, ``lora_B [out, r·E]`` → ``[E, out, r]``.
    ``which`` ends in ``A`` or ``B`` (``"A"``, ``"lora_gate_up_B"``, …). dtype kept."""
    if which.endswith("A"):
        return t.reshape(num_experts, -1, t.shape[-1])
    return t.reshape(t.shape[0], -1, num_experts).permute(2, 0, 1).contiguous()


def factor_to_peft(which: str, t: Any) -> Any:
    """Inverse of :func:`factor_from_peft`: ``A [E, r, in]`` → ``[E·r, in]``, ``B [E, out, r]`` → ``[out, r·E]``."""
    if which.endswith("A"):
        return t.reshape(-1, t.shape[-1]).contiguous()
    e, out, r = t.shape
    return t.permute(1, 2, 0).reshape(out, r * e).contiguous()


def peft_to_per_expert(A: Any, B: Any, num_experts: int) -> tuple[Any, Any]:
    """Both factors of one fused pair per expert: ``A [E, r, in]``, ``B [E, out, r]`` (ΔW[e] = s · B[e] @ A[e])."""
    return factor_from_peft("A", A, num_experts).contiguous(), factor_from_peft("B", B, num_experts)
