"""Rewrite a training adapter into the per-expert LoRA layout that vLLM's Qwen3-MoE loads.

    from qwen_sft.export.vllm_adapter import export_vllm_adapter
    report = export_vllm_adapter("checkpoints/run/adapter", "checkpoints/run/adapter-vllm")

Training saves expert LoRA in peft's fused ``target_parameters`` layout (one factor pair per layer for
``mlp.experts.gate_up_proj [E, 2I, H]`` and one for ``mlp.experts.down_proj [E, H, I]``, see
qwen_sft/moe/lora.py); which pair is which, the key names and the per-expert reshape are the checkpoint
contract's (qwen_sft/model/checkpoint.py: ``expert_lora_param``, ``lora_key``, ``peft_to_per_expert``). vLLM's ``Qwen3MoeForCausalLM`` expects, on its default path, one ``nn.Linear``-style
pair per expert and projection, in ``[out, in]`` convention::

    base_model.model.model.layers.N.mlp.experts.E.gate_proj.lora_A.weight   [R, H]
    base_model.model.model.layers.N.mlp.experts.E.gate_proj.lora_B.weight   [I, R]
    … up_proj (same shapes), down_proj lora_A [R, I], lora_B [H, R]

**Rank.** The fused gate/up factor has rank r_gu (2r when the config names gate_proj and up_proj at r):
its ΔW restricted to the gate rows is ``B[:I] @ A`` with A shared by gate and up, so it has rank up to
r_gu, and an exact per-projection export at rank r does not exist in general. Older vLLM releases read
one ``r`` (no ``rank_pattern``) for both ``--max-lora-rank`` and the scale ``lora_alpha / r`` (0.33 honours
``rank_pattern``, but ``--max-lora-rank`` must cover the largest rank anyway), so every module is
exported at one rank R = the largest rank of the adapter (r_gu): smaller factors (down, attention) are
padded with zero rows of A and zero columns of B, which leaves ΔW = B·A unchanged. Each module's own
scale (alpha / r, rsLoRA, alpha_pattern) is kept: when all scales agree, ``lora_alpha = scale · R``;
otherwise ``lora_alpha = R`` and each B is multiplied by its scale. The exported adapter therefore
computes exactly the trained ΔW on every expert, in any consumer that applies ``lora_alpha / r · B·A``.

Streams: the input is memory-mapped and read one factor tensor (one layer's fused factor) at a time; the
output safetensors file is written tensor by tensor (qwen_sft/export/safetensors_stream.py); the
directory appears atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_sft.merge.adapter import MergeError, read_adapter_config
from qwen_sft.merge.plan import _scaling
from qwen_sft.model.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXPERT_PROJS,
    expert_lora_param,
    expert_lora_params,
    expert_module,
    gate_up_rows,
    lora_key,
    peft_to_per_expert,
    split_lora_key,
)
from qwen_sft.model.checkpoint import FUSED_EXPERT_PARAMS as FUSED_PARAMS

if TYPE_CHECKING:  # torch loads only when an export runs, not for --help
    import torch

# Config keys copied as they are; everything about ranks and targets is rewritten.
KEEP_CONFIG = ("base_model_name_or_path", "revision", "task_type", "inference_mode", "bias", "fan_in_fan_out",
               "init_lora_weights", "modules_to_save")


class ExportError(MergeError):
    """Input that cannot be exported faithfully; the message names the file and the reason."""


@dataclass
class _Pair:
    module: str  # e.g. model.layers.3.self_attn.q_proj or model.layers.3.mlp.experts (fused)
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    depth: int = 0  # how many base_layer. wrappers peft put around it
    param: str | None = None  # gate_up_proj / down_proj for fused expert pairs
    rank: int = 0
    scaling: float = 1.0


@dataclass
class ExportReport:
    out_dir: Path
    rank: int
    lora_alpha: float
    scales_folded: bool
    linear_pairs: int = 0
    expert_layers: int = 0
    num_experts: int = 0
    tensors: int = 0
    padded_modules: list[str] = field(default_factory=list)
    target_modules: list[str] = field(default_factory=list)


def _group_keys(path: Path, header: dict[str, tuple[tuple[int, ...], str]]) -> list[_Pair]:
    """LoRA pairs by module (``base_layer.`` wrappers counted); modules_to_save and odd keys are problems."""
    found: dict[tuple[str, int], dict[str, str]] = {}
    problems = []
    for key in sorted(header):
        parts = split_lora_key(key)
        if parts is None or parts[3] != "weight":
            problems.append(f"{key}: not a LoRA factor (modules_to_save / embedding LoRA cannot be served as a "
                            "vLLM adapter; merge the adapter instead)")
            continue
        module, depth, which, _ = parts
        found.setdefault((module, depth), {})[which] = key
    pairs = []
    for (module, depth), ab in sorted(found.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            problems.append(f"{module}: {({'lora_A', 'lora_B'} - set(ab)).pop()} is missing from {ADAPTER_WEIGHTS}")
            continue
        a_shape, b_shape = header[ab["lora_A"]][0], header[ab["lora_B"]][0]
        if len(a_shape) != 2 or len(b_shape) != 2:
            problems.append(f"{module}: lora_A {a_shape} / lora_B {b_shape} are not 2-D")
            continue
        pairs.append(_Pair(module, ab["lora_A"], ab["lora_B"], a_shape, b_shape, depth=depth))
    if problems:
        raise ExportError(f"adapter {path}:\n  - " + "\n  - ".join(problems[:20]))
    return pairs


def _resolve(path: Path, cfg: dict, pairs: list[_Pair]) -> tuple[list[_Pair], dict[str, tuple[_Pair, _Pair]], int]:
    """Split pairs into plain linear ones and fused expert layers; resolve ranks / scales; find num_experts."""
    targets = cfg.get("target_parameters")
    linear, fused_by_module = [], {}
    problems = []
    for p in pairs:
        depth = p.depth
        if expert_lora_params(p.module, targets):  # a fused experts module: its nesting names the parameter
            try:
                p.param = expert_lora_param(p.module, depth, targets)
            except ValueError as err:
                problems.append(str(err))
                continue
            fused_by_module.setdefault(p.module, {})[p.param] = p
        else:
            if depth:
                problems.append(f"{p.module}: nested LoRA (base_layer) on a plain module is not understood")
                continue
            p.rank = p.a_shape[0]
            if p.b_shape[1] != p.rank:
                problems.append(f"{p.module}: lora_A {p.a_shape} and lora_B {p.b_shape} do not form a LoRA pair")
                continue
            p.scaling, bad = _scaling(cfg, p.module, p.rank)
            problems += bad
            linear.append(p)
    from peft.utils.other import get_pattern_key

    rank_pattern = cfg.get("rank_pattern") or {}
    fused: dict[str, tuple[_Pair, _Pair]] = {}
    experts: set[int] = set()
    for module, by_param in fused_by_module.items():
        if set(by_param) != set(FUSED_PARAMS):
            problems.append(f"{module}: has LoRA for {sorted(by_param)} only; both {FUSED_PARAMS} are needed")
            continue
        gu, dn = by_param["gate_up_proj"], by_param["down_proj"]
        for p in (gu, dn):
            # the config's rank for this parameter (rank_pattern) gives E = rows of A / rank
            p.rank = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), f"{module}.{p.param}"), cfg["r"]))
            if p.a_shape[0] % p.rank or p.b_shape[1] != p.a_shape[0]:
                problems.append(f"{module}.{p.param}: lora_A {p.a_shape} / lora_B {p.b_shape} do not hold "
                                f"rank-{p.rank} factors for a whole number of experts (adapter_config.json r / "
                                "rank_pattern disagree with the weights)")
                continue
            experts.add(p.a_shape[0] // p.rank)
            p.scaling, bad = _scaling(cfg, f"{module}.{p.param}", p.rank)
            problems += bad
        hidden, two_inter = gu.a_shape[1], gu.b_shape[0]
        if two_inter % 2 or dn.a_shape[1] != two_inter // 2 or dn.b_shape[0] != hidden:
            problems.append(f"{module}: gate_up (A {gu.a_shape}, B {gu.b_shape}) and down (A {dn.a_shape}, "
                            f"B {dn.b_shape}) do not describe experts of one hidden / intermediate size")
            continue
        fused[module] = (gu, dn)
    if len(experts) > 1:
        problems.append(f"expert LoRA factors imply different expert counts {sorted(experts)}")
    if problems:
        raise ExportError(f"adapter {path}:\n  - " + "\n  - ".join(problems[:20]))
    return linear, fused, (experts.pop() if experts else 0)


def _plan(cfg: dict, linear: list[_Pair], fused: dict[str, tuple[_Pair, _Pair]]) -> tuple[int, float, bool]:
    """(R, lora_alpha, fold scales into B?) for the exported config."""
    ranks = [p.rank for p in linear] + [p.rank for pair in fused.values() for p in pair]
    scales = {p.scaling for p in linear} | {p.scaling for pair in fused.values() for p in pair}
    R = max(ranks)
    if len(scales) == 1:
        return R, float(next(iter(scales))) * R, False
    return R, float(R), True


def _pad(A: torch.Tensor, B: torch.Tensor, R: int, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in] -> [R, in] with zero rows, B [out, r] -> [out, R] with zero columns (B·A unchanged)."""
    import torch

    r = A.shape[0]
    if scale is not None:
        B = (B.float() * scale).to(B.dtype)
    if r == R:
        return A.contiguous(), B.contiguous()
    A2 = torch.zeros(R, A.shape[1], dtype=A.dtype)
    B2 = torch.zeros(B.shape[0], R, dtype=B.dtype)
    A2[:r], B2[:, :r] = A, B
    return A2, B2


def export_vllm_adapter(adapter_dir: str | Path, out_dir: str | Path) -> ExportReport:
    """Write the per-expert, uniform-rank adapter for vLLM into ``out_dir`` (atomically); returns what was written."""
    import torch
    from safetensors import SafetensorError, safe_open

    from qwen_sft.atomic import atomic_dir
    from qwen_sft.export.safetensors_stream import StreamingSafetensors

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.resolve() == adapter_dir.resolve() or adapter_dir.resolve() in out_dir.resolve().parents:
        raise ExportError(f"output {out_dir} must not be the adapter directory or inside it")
    cfg = read_adapter_config(adapter_dir)
    if cfg.get("use_dora"):
        raise ExportError(f"{adapter_dir}: DoRA adapters cannot be exported")
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ExportError(f"{weights} is missing (only safetensors adapters are read; never a pickled .bin)")
    try:
        with safe_open(weights, framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{weights} cannot be read ({err}); the file is corrupted or truncated") from err
    pairs = _group_keys(adapter_dir, header)
    if not pairs:
        raise ExportError(f"{weights} holds no LoRA factors")
    linear, fused, E = _resolve(adapter_dir, cfg, pairs)
    R, alpha, fold = _plan(cfg, linear, fused)

    # Output layout, in write order: every linear pair, then per layer, per expert gate / up / down.
    dtype_of = {k: dtype for k, (_, dtype) in header.items()}
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    layout = []
    report = ExportReport(out_dir=out_dir, rank=R, lora_alpha=alpha, scales_folded=fold, num_experts=E)
    for p in linear:
        a_dt, b_dt = torch_dtype[dtype_of[p.a_key]], torch_dtype[dtype_of[p.b_key]]
        layout += [(lora_key(p.module, "lora_A"), a_dt, (R, p.a_shape[1])),
                   (lora_key(p.module, "lora_B"), b_dt, (p.b_shape[0], R))]
        if p.rank != R:
            report.padded_modules.append(p.module)
    for module, (gu, dn) in fused.items():
        H, inter = gu.a_shape[1], gu.b_shape[0] // 2
        a_gu, b_gu = torch_dtype[dtype_of[gu.a_key]], torch_dtype[dtype_of[gu.b_key]]
        a_dn, b_dn = torch_dtype[dtype_of[dn.a_key]], torch_dtype[dtype_of[dn.b_key]]
        for e in range(E):
            for proj in ("gate_proj", "up_proj"):
                layout += [(lora_key(expert_module(module, e, proj), "lora_A"), a_gu, (R, H)),
                           (lora_key(expert_module(module, e, proj), "lora_B"), b_gu, (inter, R))]
            layout += [(lora_key(expert_module(module, e, "down_proj"), "lora_A"), a_dn, (R, inter)),
                       (lora_key(expert_module(module, e, "down_proj"), "lora_B"), b_dn, (H, R))]
        if dn.rank != R:
            report.padded_modules.append(f"{module}.*.down_proj")
    report.linear_pairs, report.expert_layers, report.tensors = len(linear), len(fused), len(layout)
    names = {p.module.rsplit(".", 1)[-1] for p in linear} | (set(EXPERT_PROJS) if fused else set())
    report.target_modules = sorted(names)

    out_cfg = {k: cfg[k] for k in KEEP_CONFIG if k in cfg}
    out_cfg.update({
        "peft_type": "LORA", "r": R, "lora_alpha": alpha, "use_rslora": False, "use_dora": False,
        "lora_dropout": 0.0, "target_modules": report.target_modules, "rank_pattern": {}, "alpha_pattern": {},
        "target_parameters": None, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    })
    out_cfg.setdefault("task_type", "CAUSAL_LM")
    out_cfg.setdefault("bias", "none")
    provenance = {"source_adapter": str(adapter_dir), "rank": R, "lora_alpha": alpha, "scales_folded_into_B": fold,
                  "num_experts": E, "expert_layers": len(fused), "linear_pairs": len(linear),
                  "padded_to_rank": report.padded_modules}

    scale = (lambda p: p.scaling) if fold else (lambda p: None)
    with atomic_dir(out_dir) as tmp, safe_open(weights, framework="pt") as f, \
            StreamingSafetensors(tmp / ADAPTER_WEIGHTS, layout) as out:
        for p in linear:
            A, B = _pad(f.get_tensor(p.a_key), f.get_tensor(p.b_key), R, scale(p))
            out.write(lora_key(p.module, "lora_A"), A)
            out.write(lora_key(p.module, "lora_B"), B)
        for module, (gu, dn) in fused.items():
            inter = gu.b_shape[0] // 2
            # peft's layout regrouped per expert (qwen_sft/model/checkpoint.py): A [E, r, in], B [E, out, r].
            gu_A, gu_B = peft_to_per_expert(f.get_tensor(gu.a_key), f.get_tensor(gu.b_key), E)
            dn_A, dn_B = peft_to_per_expert(f.get_tensor(dn.a_key), f.get_tensor(dn.b_key), E)
            for e in range(E):
                for proj, rows in gate_up_rows(inter):
                    A, B = _pad(gu_A[e], gu_B[e][rows], R, scale(gu))
                    out.write(lora_key(expert_module(module, e, proj), "lora_A"), A)
                    out.write(lora_key(expert_module(module, e, proj), "lora_B"), B)
                A, B = _pad(dn_A[e], dn_B[e], R, scale(dn))
                out.write(lora_key(expert_module(module, e, "down_proj"), "lora_A"), A)
                out.write(lora_key(expert_module(module, e, "down_proj"), "lora_B"), B)
            del gu_A, gu_B, dn_A, dn_B
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(out_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "qwen_sft_export.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n",
                                                   encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    import sys

    from qwen_sft.cli_options import parse_or_exit
    from qwen_sft.export.options import adapter_parser

    (a,) = parse_or_exit(adapter_parser(), argv)
    try:
        r = export_vllm_adapter(a.adapter_dir, a.out_dir)
    except MergeError as err:
        print(f"export-adapter: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {r.tensors} tensors to {r.out_dir}: {r.linear_pairs} linear pairs, {r.expert_layers} expert "
          f"layers x {r.num_experts} experts x 3 projections; r={r.rank} lora_alpha={r.lora_alpha:g} "
          f"target_modules={r.target_modules}")
    if r.padded_modules:
        print(f"note: {len(r.padded_modules)} modules zero-padded to rank {r.rank} (one rank for vLLM; ΔW unchanged), "
              f"e.g. {r.padded_modules[0]}")
    if r.scales_folded:
        print("note: modules had different alpha/r; each scale was folded into its lora_B (lora_alpha = r)")
    print(f"serve: vllm serve BASE_MODEL --enable-lora --max-lora-rank {r.rank} --lora-modules NAME={r.out_dir}")
    return 0
