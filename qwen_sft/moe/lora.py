"""Expert LoRA factors <-> peft's ``target_parameters`` adapter layout, and adapter save/load.

    from qwen_sft.moe import save_adapter, load_expert_adapter
    save_adapter(model, "outputs/run/adapter")          # PeftModel (attention LoRA) or bare model + engine
    load_expert_adapter(model_with_engine, "outputs/run/adapter")

Layout written (peft 0.21 ``ParamWrapper``, ``target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]``; peft wraps ``gate_up_proj`` innermost, hence ``base_layer.``, the nesting rule
being qwen_sft/model/checkpoint.py's ``expert_lora_depth``):

    base_model.model.<layer>.mlp.experts.base_layer.lora_A.weight   [E*r, H]    gate_up A, expert-major rows
    base_model.model.<layer>.mlp.experts.base_layer.lora_B.weight   [2I, r*E]   gate_up B, columns k*E + e
    base_model.model.<layer>.mlp.experts.lora_A.weight              [E*r, I]    down A
    base_model.model.<layer>.mlp.experts.lora_B.weight              [H, r*E]    down B

so a stock transformers model + ``PeftModel.from_pretrained`` (or vLLM) loads the adapter unmerged and
gives the same logits. ``ParamWrapper.get_delta_factors`` is the reference for the reshapes, which live in
qwen_sft/model/checkpoint.py with the key names and the nesting rule (the checkpoint contract; merge and
export use the same ones).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from qwen_sft.atomic import atomic_dir, atomic_open
from qwen_sft.model.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, expert_lora_depth, lora_key
from qwen_sft.model.checkpoint import EXPERT_TARGET_PARAMETERS as TARGET_PARAMETERS
from qwen_sft.model.checkpoint import factor_from_peft as factors_from_peft
from qwen_sft.model.checkpoint import factor_to_peft as factors_to_peft
from qwen_sft.moe.experts import ExpertEngine
from qwen_sft.moe.install import ExpertLoraSpec

log = logging.getLogger(__name__)

# The engine's factor names → (the fused parameter they adapt, peft's factor).
_FACTORS = {
    "lora_gate_up_A": ("gate_up_proj", "lora_A"),
    "lora_gate_up_B": ("gate_up_proj", "lora_B"),
    "lora_down_A": ("down_proj", "lora_A"),
    "lora_down_B": ("down_proj", "lora_B"),
}


def peft_keys(path: str, target_parameters: list[str] | None) -> dict[str, str]:
    """The saved key of each engine factor of the experts module at ``path`` under ``target_parameters``."""
    return {ours: lora_key(path, which, expert_lora_depth(path, param, target_parameters))
            for ours, (param, which) in _FACTORS.items()}


def expert_engines(model: nn.Module) -> dict[str, ExpertEngine]:
    """Engine modules by their path inside the transformers model (PeftModel prefixes stripped)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertEngine):
            found[name.removeprefix(PEFT_PREFIX)] = module
    return found


def expert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Expert LoRA factors in peft's target_parameters layout, keyed as peft's adapter files are."""
    out = {}
    for path, eng in expert_engines(model).items():
        if not eng.has_lora:
            continue
        for ours, key in peft_keys(path, TARGET_PARAMETERS).items():
            out[key] = factors_to_peft(ours, getattr(eng, ours).detach()).cpu()
    return out


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return False
    return isinstance(model, PeftModel)


def _expert_setting(model: nn.Module) -> tuple[tuple[str, int, float], ...]:
    """The one (name, rank, alpha) per fused parameter shared by every engine; raises when absent or mixed."""
    engines = [e for e in expert_engines(model).values() if e.has_lora]
    if not engines:
        raise ValueError("no expert LoRA to save: install_expert_engine(..., lora=ExpertLoraSpec(...)) first")
    settings = {tuple((k, e.lora_rank[k], e.lora_alpha[k]) for k in ("gate_up", "down")) for e in engines}
    if len(settings) != 1:
        raise ValueError(f"expert LoRA layers disagree on (rank, alpha): {sorted(settings)}")
    return next(iter(settings))


def add_expert_factors(model: nn.Module, adapter_dir: str | Path) -> int:
    """Add the expert factors to a peft adapter directory that ``save_pretrained`` wrote (in place, each
    file replaced atomically); returns the number of tensors added. Also what ExpertAdapterCallback runs."""
    from safetensors.torch import load_file, save

    adapter_dir = Path(adapter_dir)
    if not any(e.has_lora for e in expert_engines(model).values()):
        return 0  # attention-only LoRA on the engine: peft's files are the whole adapter
    setting = _expert_setting(model)
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    weights = adapter_dir / ADAPTER_WEIGHTS
    tensors = load_file(str(weights)) if weights.exists() else {}
    # Where the experts' rank/alpha differ from the config's r/alpha, peft reads them from rank_pattern /
    # alpha_pattern keyed by the parameter name (checked: ParamWrapper gets that rank and scale).
    rank_pattern, alpha_pattern = dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {})
    for name, rank, alpha in setting:
        key = f"{name}_proj"
        rank_pattern.pop(key, None)
        alpha_pattern.pop(key, None)
        if rank != int(cfg["r"]):
            rank_pattern[key] = rank
        if alpha != float(cfg["lora_alpha"]):
            alpha_pattern[key] = alpha
    cfg["rank_pattern"], cfg["alpha_pattern"] = rank_pattern, alpha_pattern
    if cfg.get("lora_dropout"):
        # peft's ParamWrapper refuses lora_dropout != 0; dropout is a training-time op, so loading for
        # inference or merging with 0 computes exactly the trained function.
        log.warning("adapter_config: lora_dropout %s -> 0.0 (peft cannot load expert LoRA with dropout)",
                    cfg["lora_dropout"])
        cfg["lora_dropout"] = 0.0
    cfg["target_parameters"] = TARGET_PARAMETERS
    experts = expert_state_dict(model)
    tensors.update(experts)
    with atomic_open(weights, "wb") as fh:
        fh.write(save(tensors, metadata={"format": "pt"}))
    with atomic_open(adapter_dir / ADAPTER_CONFIG) as fh:
        fh.write(json.dumps(cfg, indent=2, sort_keys=True))
    return len(experts)


def save_adapter(model: nn.Module, out_dir: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` holding attention LoRA (when ``model``
    is a PeftModel) and the expert factors, atomically. Returns the directory.

    peft's own ``save_pretrained`` would silently drop the expert factors (it keeps only keys containing
    the adapter name), which is the bug other tools shipped; so always save through this function.
    """
    setting = _expert_setting(model)  # fail before anything is written
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if _is_peft_model(model):
            model.save_pretrained(tmp)
        else:
            from peft import LoraConfig

            _, r, alpha = setting[1]
            cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=[], target_parameters=TARGET_PARAMETERS,
                             base_model_name_or_path=base_model_name_or_path).to_dict()
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, default=list), encoding="utf-8")
        n = add_expert_factors(model, tmp)
        log.info("saved adapter with %d expert factor tensors to %s", n, out_dir)
    return out_dir


def load_expert_adapter(model: nn.Module, adapter_dir: str | Path, *, strict: bool = True) -> int:
    """Copy the expert factors of a peft-layout adapter into the model's engines (adding LoRA where absent).

    Returns the number of layers loaded. ``strict``: every engine must find its four tensors.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    spec = ExpertLoraSpec.from_lora_config(cfg)
    want = {"gate_up": (spec.gate_up_r or spec.r, spec.gate_up_alpha if spec.gate_up_alpha is not None else spec.alpha),
            "down": (spec.r, spec.alpha)}
    loaded, missing = 0, []
    for path, eng in expert_engines(model).items():
        try:
            keys = peft_keys(path, cfg.get("target_parameters"))
        except ValueError as err:  # the config does not wrap both fused parameters of this layer
            if strict:
                raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG}: {err}") from None
            continue
        absent = [k for k in keys.values() if k not in tensors]
        if absent:
            missing += absent
            continue
        if not eng.has_lora:
            eng.add_lora(spec.r, spec.alpha, dtype=tensors[keys["lora_gate_up_A"]].dtype,
                         gate_up_r=spec.gate_up_r, gate_up_alpha=spec.gate_up_alpha)
        have = {k: (eng.lora_rank[k], eng.lora_alpha[k]) for k in want}
        if have != want:
            raise ValueError(f"{path}: engine LoRA (rank, alpha) {have} != adapter's {want}")
        with torch.no_grad():
            for ours, key in keys.items():
                param = getattr(eng, ours)
                value = factors_from_peft(ours, tensors[key], eng.num_experts)
                if value.shape != param.shape:
                    raise ValueError(f"{key}: shape {tuple(value.shape)} != expected {tuple(param.shape)}")
                param.copy_(value)
        loaded += 1
    if strict and missing:
        raise ValueError(f"{adapter_dir}: {len(missing)} expert LoRA tensors missing, e.g. {missing[:2]}")
    return loaded
