"""Map every LoRA pair of an adapter onto the tensors of the base checkpoint, validated before any weight is read.

    from qwen_sft.merge.plan import read_base, plan_merge
    plan = plan_merge(adapter, read_base("Qwen3-Coder-30B-A3B-Instruct"))   # {base key: Delta}

The base is read from safetensors headers only. Its experts are stored per expert on disk
(``mlp.experts.E.gate_proj.weight [I, H]``, ``up_proj [I, H]``, ``down_proj [H, I]``) while peft's
``target_parameters`` LoRA adapts the fused parameters transformers builds at load time
(``gate_up_proj [E, 2I, H]`` = per expert gate rows then up rows, ``down_proj [E, H, I]``). ``Delta``
reproduces peft's ``ParamWrapper.get_delta_weight`` for one expert, so the merge never fuses anything.
Resolving the base, its weight map, the expert key names, which fused parameter a nested pair adapts
(``expert_lora_param``; the factors' shapes only cross-check it) and peft's factor layout are the checkpoint
contract's (qwen_sft/model/checkpoint.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qwen_sft.merge.adapter import Adapter, MergeError
from qwen_sft.model.checkpoint import (
    EXPERT_PROJS,
    FUSED_EXPERT_MODEL_TYPES,
    FUSED_EXPERT_PARAMS,
    INDEX_FILE,
    SINGLE_FILE,
    ModelNotFound,
    count_experts,
    expert_key,
    expert_lora_param,
    gate_up_rows,
    peft_to_per_expert,
    read_index,
    resolve_model_dir,
)


@dataclass
class BaseCheckpoint:
    path: Path
    config: dict
    shards: dict[str, list[str]]  # shard file -> its tensor names, in file order of the index / header
    info: dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, safetensors dtype)
    sharded: bool  # True when the base came with model.safetensors.index.json

    @property
    def total_bytes(self) -> int:
        sizes = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
        return sum(math.prod(shape) * sizes.get(dtype, 4) for shape, dtype in self.info.values())


@dataclass
class Delta:
    """What to add to (or put in place of) one base tensor. ΔW is computed in fp32 on demand."""

    kind: Literal["lora", "expert", "replace"]
    source: str  # the adapter module it comes from, for messages
    A: Any = None
    B: Any = None
    scaling: float = 1.0
    expert: int = 0
    num_experts: int = 1
    rows: slice | None = None  # rows of the fused output this tensor takes (gate or up half); None = all

    def compute(self):
        if self.kind == "replace":
            return self.A.float()
        if self.kind == "lora":
            return (self.B.float() @ self.A.float()) * self.scaling
        # A and B were regrouped per expert once by expert_factors(): ΔW[e] = scaling · B[e] @ A[e].
        B = self.B[self.expert] if self.rows is None else self.B[self.expert, self.rows]
        return (B @ self.A[self.expert]) * self.scaling


def expert_factors(A, B, num_experts: int) -> tuple[Any, Any]:
    """peft ParamWrapper factors regrouped per expert in fp32: A [E, r, in], B [E, out, r] (the layout is
    qwen_sft/model/checkpoint.py's ``peft_to_per_expert``)."""
    return peft_to_per_expert(A.float(), B.float(), num_experts)


def resolve_base_path(name_or_path: str) -> Path:
    """A local directory as is; a Hub id through the local cache, downloaded when missing and allowed (the
    checkpoint contract's one policy)."""
    try:
        return resolve_model_dir(name_or_path, download=True, where=f"--base_model_path {name_or_path}")
    except ModelNotFound as err:
        raise MergeError(str(err)) from err


def read_base(path: str | Path) -> BaseCheckpoint:
    """config.json + safetensors headers of the base; refuses pickles, quantized bases and broken shards."""
    from safetensors import SafetensorError, safe_open

    path = resolve_base_path(str(path))
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise MergeError(f"{cfg_path} is missing: --base_model_path must be a model directory")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise MergeError(f"{path} is a quantized checkpoint ({method}); merge into the original 16-bit base model")
    try:
        weight_map = read_index(path)
    except ValueError as err:
        raise MergeError(f"{path}: {err}") from None
    if weight_map is not None:
        shard_names = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
        weight_map, shard_names = {}, [SINGLE_FILE]
    elif any(path.glob("*.bin")):
        raise MergeError(f"{path} has only pickled *.bin weights; convert the base to safetensors first")
    else:
        raise MergeError(f"{path} holds no {SINGLE_FILE} or {INDEX_FILE}")
    shards: dict[str, list[str]] = {}
    info: dict[str, tuple[tuple[int, ...], str]] = {}
    problems = []
    for name in shard_names:
        if not (path / name).is_file():
            problems.append(f"{path / name} is listed in the index but missing")
            continue
        try:
            with safe_open(path / name, framework="pt") as f:
                keys = list(f.keys())
                for key in keys:
                    sl = f.get_slice(key)
                    info[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as err:
            problems.append(f"{path / name} cannot be read ({err})")
            continue
        shards[name] = keys
    missing = sorted(k for k, s in weight_map.items() if k not in info and s in shards)
    if missing:
        problems.append(f"{len(missing)} tensors of the index are not in their shard, e.g. {missing[0]}")
    if problems:
        raise MergeError("base checkpoint:\n  - " + "\n  - ".join(problems))
    return BaseCheckpoint(path, config, shards, info, sharded=bool(weight_map))


def _scaling(cfg: dict, current_key: str, rank: int) -> tuple[float, list[str]]:
    """alpha / r for this target exactly as peft resolves it (rank_pattern / alpha_pattern, rsLoRA)."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), current_key), cfg["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), current_key), cfg["lora_alpha"])
    problems = [] if r == rank else [f"{current_key}: adapter_config says r={r} but the saved factors have rank {rank}"]
    return (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r), problems


def _plan_experts(adapter: Adapter, base: BaseCheckpoint, pair, plan: dict[str, Delta]) -> list[str]:
    module, A, B = pair.module, pair.A, pair.B
    if base.config.get("model_type") not in FUSED_EXPERT_MODEL_TYPES:
        return [f"{module}: fused expert LoRA is only understood for {sorted(FUSED_EXPERT_MODEL_TYPES)}, "
                f"the base is {base.config.get('model_type')!r}"]
    E = count_experts(module, base.info)
    # transformers 5 writes num_local_experts, the released config num_experts; either must agree with the files.
    declared = base.config.get("num_experts", base.config.get("num_local_experts", E))
    if declared != E or any(expert_key(module, e, p) not in base.info for e in range(E) for p in EXPERT_PROJS):
        return [f"{module}: the base checkpoint does not hold all {declared} experts' gate/up/down weights here"]
    inter, H = base.info[expert_key(module, 0, "gate_proj")][0]
    if A.shape[0] % E:
        return [f"{module}: lora_A has {A.shape[0]} rows, not a multiple of num_experts={E} (wrong base?)"]
    try:  # which fused parameter this pair adapts is decided by peft's nesting, the shapes only cross-check it
        param = expert_lora_param(module, pair.depth, adapter.config.get("target_parameters"))
    except ValueError as err:
        return [f"{err} (corrupted adapter_config.json?)"]
    fits = {"gate_up_proj": (H, 2 * inter), "down_proj": (inter, H)}  # (in, out) of the base experts
    fit = [p for p, in_out in fits.items() if in_out == (A.shape[1], B.shape[0])]
    if not fit:
        return [f"{module}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} fit neither gate_up_proj "
                f"(in {H}, out {2 * inter}) nor down_proj (in {inter}, out {H}) of the base experts (wrong base?)"]
    if param not in fit:
        return [f"{module}: the pair under {pair.depth} base_layer wrapper(s) adapts {param} by peft's nesting of "
                f"target_parameters, but lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} are shaped for {fit[0]} "
                "(an adapter not written by peft or qwen-sft?)"]
    parts = gate_up_rows(inter) if param == "gate_up_proj" else [("down_proj", None)]
    scaling, problems = _scaling(adapter.config, f"{module}.{param}", A.shape[0] // E)
    A, B = expert_factors(A, B, E)  # once per pair, not once per expert tensor
    for e in range(E):
        for proj, rows in parts:
            key = expert_key(module, e, proj)
            if key in plan:
                problems.append(f"{key}: adapted twice ({plan[key].source} and {module})")
            plan[key] = Delta("expert", f"{module}.{param}", A, B, scaling, e, E, rows)
    return problems


def plan_merge(adapter: Adapter, base: BaseCheckpoint) -> dict[str, Delta]:
    """{base tensor name: Delta} covering every LoRA pair and modules_to_save tensor; all problems in one error."""
    problems: list[str] = []
    plan: dict[str, Delta] = {}
    for pair in adapter.pairs:
        key = f"{pair.module}.weight"
        if key in base.info:
            out_in = base.info[key][0]
            if pair.depth or len(out_in) != 2 or out_in != (pair.B.shape[0], pair.A.shape[1]):
                problems.append(f"{pair.module}: ΔW would be {(pair.B.shape[0], pair.A.shape[1])} but the base "
                                f"weight is {out_in} (wrong base?)")
                continue
            scaling, bad = _scaling(adapter.config, pair.module, pair.A.shape[0])
            problems += bad
            if key in plan:
                problems.append(f"{key}: adapted twice")
            plan[key] = Delta("lora", pair.module, pair.A, pair.B, scaling)
        elif expert_key(pair.module, 0, "gate_proj") in base.info:
            problems += _plan_experts(adapter, base, pair, plan)
        elif any(f"{pair.module}.{p}" in base.info for p in FUSED_EXPERT_PARAMS):
            problems.append(f"{pair.module}: the base stores its experts fused; re-save it with transformers >= 5 "
                            "save_pretrained (per-expert keys) and merge again")
        else:
            problems.append(f"{pair.module}: targeted by the adapter but not in the base checkpoint (wrong base?)")
    for key, tensor in adapter.replacements.items():
        if key not in base.info:
            problems.append(f"{key} (modules_to_save): not in the base checkpoint (wrong base?)")
        elif base.info[key][0] != tuple(tensor.shape):
            problems.append(f"{key} (modules_to_save): shape {tuple(tensor.shape)} but the base has "
                            f"{base.info[key][0]} (resized vocabulary or wrong base?)")
        else:
            plan[key] = Delta("replace", key, A=tensor)
    expected = (adapter.config.get("auto_mapping") or {}).get("base_model_class")
    if expected and expected not in (base.config.get("architectures") or []):
        problems.append(f"the adapter was trained on a {expected}, the base is {base.config.get('architectures')}")
    if problems:
        shown = problems[:20] + ([f"… and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise MergeError(f"adapter {adapter.path} does not fit base {base.path}:\n  - " + "\n  - ".join(shown))
    return plan
