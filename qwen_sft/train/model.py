"""Load Qwen3-MoE for training: dtype, attention, 4-bit quantization, LoRA on the fused experts, frozen router.

    python -c "from qwen_sft.model.load import expert_memory_gib; from transformers import AutoConfig; \
print(expert_memory_gib(AutoConfig.from_pretrained('../shared/spec/qwen3-coder-30b-a3b-instruct')))"

transformers v5 keeps each layer's routed experts in one module ``mlp.experts`` with fused 3-D parameters
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``; the router ``mlp.gate`` is a bare ``weight [E, H]``.
``apply_lora`` is the single place where adapters are attached: the MoE expert engine (qwen_sft/moe) plugs
in there. Loading itself is ``qwen_sft.model.load.load_causal_lm`` (plain arguments); ``load_model`` maps a
run's options onto it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from qwen_sft.model.checkpoint import ADAPTER_CONFIG, EXPERTS, in_experts
from qwen_sft.model.checkpoint import FUSED_EXPERT_PARAMS as EXPERT_PARAMS
from qwen_sft.model.checkpoint import FUSED_OF as EXPERT_NAME_MAP  # seed (v4) expert names → fused v5 param
from qwen_sft.model.load import NOT_QUANTIZED, Quantization, expert_memory_gib, load_causal_lm, mark_moe_leaf_modules  # noqa: F401  (re-exported)
from qwen_sft.train.args import ModelArguments, lora_config

ROUTER_SUFFIX = "mlp.gate"


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[qwen-sft train] {msg}", flush=True)


def linear_attention_layers(config) -> list[int]:
    """Layers whose token mixer is linear attention (qwen3_next's Gated DeltaNet); empty for qwen3_moe."""
    return [i for i, kind in enumerate(getattr(config, "layer_types", None) or []) if kind == "linear_attention"]


def resolve_packing(config, packing: bool) -> bool:
    """Packing off for models with linear-attention layers: their recurrent state and short causal conv run
    straight across the samples of a packed row. transformers' torch fallbacks (causal_conv1d_fn,
    torch_chunk_gated_delta_rule) ignore position_ids and cu_seqlens, so packed != unpacked there
    (tests/test_next_packing.py); right-padding is exact (padded positions are zeroed and come last)."""
    layers = linear_attention_layers(config)
    if packing and layers:
        log(f"packing=False (was True): {getattr(config, 'model_type', '?')} has {len(layers)} linear-attention "
            f"(Gated DeltaNet) layers whose state would flow from one packed sample into the next; batches are "
            f"padded to the longest sample instead")
        return False
    return packing


def attention_implementation(model_args: ModelArguments) -> str:
    if not model_args.use_flash_attention:
        return "sdpa"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        raise RuntimeError("use_flash_attention=True but flash-attn 2 is not installed (or no CUDA GPU): "
                           "`pip install flash-attn --no-build-isolation`, or drop the flag to use sdpa")
    return "flash_attention_2"


def uses_expert_engine(model_args: ModelArguments, config, deepspeed_zero3: bool = False) -> bool:
    """LoRA/QLoRA on an MoE model with ``expert_engine`` (the default): experts go through qwen_sft.moe."""
    if not (model_args.use_peft and model_args.expert_engine and getattr(config, "num_experts", 0)):
        return False
    if deepspeed_zero3:
        raise ValueError("the MoE expert engine does not support DeepSpeed ZeRO-3: use ZeRO-2/DDP, or "
                         "--expert_engine false")
    if model_args.use_qlora and model_args.bnb_4bit_quant_type != "nf4":
        raise ValueError(f"the MoE expert engine stores NF4 only, got bnb_4bit_quant_type="
                         f"{model_args.bnb_4bit_quant_type}: use nf4, or --expert_engine false")
    return True


def expert_lora_spec(model_args: ModelArguments):
    """The engine's expert rank/alpha from the adapter config (gate_up_proj at 2r / 2·alpha, see lora_settings)."""
    from qwen_sft.moe import ExpertLoraSpec

    cfg = lora_config(model_args)
    targets = cfg.get("target_modules")
    if isinstance(targets, list) and not cfg.get("target_parameters") \
            and not any((t.rsplit(".", 1)[-1] in EXPERT_NAME_MAP or t in EXPERT_PARAMS)
                        and "shared_expert" not in t for t in targets):
        # attention-only LoRA (qwen3_next: "shared_expert.gate_proj" etc. name the shared expert's Linears only):
        # the engine holds no expert factors
        return None
    r, alpha, _, rank_pattern, alpha_pattern = lora_settings(cfg)
    return ExpertLoraSpec.from_lora_config({"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern,
                                            "alpha_pattern": alpha_pattern},
                                           dtype=getattr(torch, getattr(model_args, "lora_dtype", "float32")))


def load_model(model_args: ModelArguments, config, deepspeed_zero3: bool = False):
    """The causal LM in ``torch_dtype`` (bf16 unless asked), ``use_cache=False``, 4-bit when ``use_qlora``.
    MoE + LoRA/QLoRA with ``expert_engine``: experts are the engine's (NF4 under QLoRA) with expert LoRA.
    The run's options as plain arguments of ``qwen_sft.model.load.load_causal_lm``, which does the loading."""
    engine = uses_expert_engine(model_args, config, deepspeed_zero3)
    quantize = Quantization(model_args.bnb_4bit_quant_type, model_args.bnb_4bit_use_double_quant,
                            getattr(torch, model_args.bnb_4bit_compute_dtype)) if model_args.use_qlora else None
    return load_causal_lm(model_args.model_name_or_path, config, dtype=getattr(torch, model_args.torch_dtype),
                          attn_implementation=attention_implementation(model_args), quantize=quantize,
                          expert_engine=engine, expert_lora=expert_lora_spec(model_args) if engine else None,
                          zero3=deepspeed_zero3, router_aux_loss_coef=model_args.router_aux_loss_coef,
                          cache_dir=model_args.cache_dir, trust_remote_code=model_args.trust_remote_code, log=log)


def lora_config_file(path: str) -> Path:
    """``peft_config_path`` as ``PeftConfig.from_pretrained`` takes it: a folder holding adapter_config.json,
    or the file itself."""
    p = Path(path)
    file = p / ADAPTER_CONFIG if p.is_dir() else p
    if not file.is_file():
        what = f"holds no {ADAPTER_CONFIG}" if p.is_dir() else "no such file or directory"
        raise FileNotFoundError(f"peft_config_path={path}: {what} (give a folder with {ADAPTER_CONFIG}, "
                                f"e.g. configs/lora, or the file itself)")
    return file


def read_lora_config(path: str) -> dict:
    file = lora_config_file(path)
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object, found {type(cfg).__name__}")
    if not cfg.get("target_modules") and not cfg.get("target_parameters"):
        raise ValueError(f"{file}: neither target_modules nor target_parameters is set; LoRA would train nothing")
    return cfg


def lora_targets(model, names: list[str]) -> tuple[list[str], list[str]]:
    """Split adapter target names into Linear module names and fused expert parameter paths."""
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linear |= {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    fused = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters() if in_experts(n)}
    modules, params = [], []
    for name in names:
        if name in linear:
            modules.append(name)
            if name in EXPERT_NAME_MAP and EXPERT_NAME_MAP[name] in fused:
                params.append(f"{EXPERTS}.{EXPERT_NAME_MAP[name]}")  # qwen3_next: shared expert + routed
        elif name in EXPERT_NAME_MAP and EXPERT_NAME_MAP[name] in fused:
            params.append(f"{EXPERTS}.{EXPERT_NAME_MAP[name]}")
        elif name in fused:
            params.append(f"{EXPERTS}.{name}")
        else:
            modules.append(name)  # peft reports names that match nothing
    return modules, sorted(set(params))


def lora_settings(cfg: dict) -> tuple[int, float, float, dict, dict]:
    """r, lora_alpha, lora_dropout, rank_pattern, alpha_pattern of an adapter config."""
    r, alpha, dropout = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 16)), float(cfg.get("lora_dropout", 0.0))
    rank_pattern, alpha_pattern = dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {})
    if {"gate_proj", "up_proj"} <= set(cfg.get("target_modules") or []):
        # Two rank-r adapters (gate, up) become one on the fused [gate; up] matrix: rank 2r keeps the capacity,
        # alpha 2·alpha keeps the alpha/r scale. This is also how peft 0.21 rewrites such adapter configs.
        rank_pattern.setdefault("gate_up_proj", 2 * r)
        alpha_pattern.setdefault("gate_up_proj", 2 * alpha)
    return r, alpha, dropout, rank_pattern, alpha_pattern


def shared_expert_targets(model, names: list[str]) -> list[str]:
    """qwen3_next: the adapter's gate_proj/up_proj/down_proj also name the shared expert's Linears. The engine
    carries the routed experts' LoRA, so peft gets them as ``shared_expert.<name>`` (a suffix match)."""
    shared = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if ".mlp.shared_expert." in n}
    return [f"shared_expert.{n}" for n in names if n in EXPERT_NAME_MAP and n in shared]


def has_expert_engine(model) -> bool:
    from qwen_sft.moe import ExpertEngine

    return any(isinstance(m, ExpertEngine) for m in model.modules())


def cast_lora_factors(model, lora_dtype: str) -> int:
    """peft's LoRA factors (created fp32: ``autocast_adapter_dtype``) to ``lora_dtype``; returns how many moved.
    The expert engine's factors are created in that dtype already (expert_lora_spec)."""
    dtype = getattr(torch, lora_dtype)
    n = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") and isinstance(module, torch.nn.ModuleDict):
            for layer in module.values():
                if any(p.dtype != dtype for p in layer.parameters()):
                    layer.to(dtype)
                    n += 1
    return n


def apply_lora(model, model_args: ModelArguments, gradient_checkpointing: bool):
    """Attach LoRA: attention Linears via ``target_modules``; fused experts via ``target_parameters``, or,
    when the expert engine is installed (load_model), its own expert factors (peft never touches experts)."""
    from peft import LoraConfig, get_peft_model

    cfg = lora_config(model_args)  # adapter_config.json with the lora_* options on top
    engine = has_expert_engine(model)
    modules, params = lora_targets(model, list(cfg.get("target_modules") or []))
    params = sorted(set(params) | set(cfg.get("target_parameters") or []))
    r, alpha, dropout, rank_pattern, alpha_pattern = lora_settings(cfg)
    if engine:
        from qwen_sft.moe import TARGET_PARAMETERS

        # The engine already carries the expert LoRA; peft gets the attention (and other Linear) targets only.
        modules = [m for m in modules if m not in EXPERT_NAME_MAP and m not in EXPERT_PARAMS]
        modules += shared_expert_targets(model, cfg.get("target_modules") or [])
        params = []
    if model_args.use_qlora or gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad, or the frozen base cuts the graph.
        model.enable_input_require_grads()
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0 if params else dropout, target_modules=modules,
                      target_parameters=params or None, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                      bias=cfg.get("bias", "none"), task_type="CAUSAL_LM",
                      modules_to_save=["gate"] if model_args.train_router else None)
    with warnings.catch_warnings():
        # peft checks rank/alpha patterns against target_modules only and calls the gate_up_proj entry unused;
        # the fused parameter does get rank 2r (tests/test_train_model.py checks the adapter shapes).
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match.*")
        from qwen_sft.moe.peft_targets import peft_targets_as_named

        with peft_targets_as_named(model):  # qwen3_next: keep the shared expert's LoRA (see that module)
            peft_model = get_peft_model(model, lora)
    cast_lora_factors(peft_model, getattr(model_args, "lora_dtype", "float32"))
    if engine:
        from qwen_sft.moe import enable_expert_lora

        n = enable_expert_lora(peft_model)  # get_peft_model froze the engine's factors
        log(f"expert engine: {n:,} expert LoRA parameters trainable (gate_up_proj rank "
            f"{rank_pattern.get('gate_up_proj', r)}, down_proj rank {rank_pattern.get('down_proj', r)})")
        params = list(TARGET_PARAMETERS)
    if params and dropout and not engine:
        n = 0
        for module in peft_model.modules():
            drop = getattr(module, "lora_dropout", None)
            if isinstance(drop, torch.nn.ModuleDict) and "default" in drop and type(module).__name__ != "ParamWrapper":
                drop["default"] = torch.nn.Dropout(dropout)
                n += 1
        log(f"lora_dropout={dropout} applied to the {n} attention LoRA layers only: peft forbids dropout on fused "
            f"expert parameters ({', '.join(params)}), so the expert adapters train without it")
    return peft_model, {"expert_engine": engine, "target_modules": modules, "target_parameters": params, "r": r,
                        "lora_alpha": alpha,
                        "lora_dropout": dropout, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def freeze_router(model, train_router: bool) -> None:
    for name, p in model.named_parameters():
        # With LoRA + train_router peft keeps a frozen original_module beside the trained copy.
        if ".mlp.gate." in name and "lora_" not in name and "original_module" not in name:
            p.requires_grad_(train_router)


def parameter_group(name: str) -> str:
    if ".self_attn." in name or ".linear_attn." in name:  # linear_attn: qwen3_next's Gated DeltaNet
        return "attention"
    if in_experts(name):
        return "experts"
    if ".mlp.gate." in name:
        return "router"
    return "other"


def parameter_groups(model) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per group: attention, experts, router, other."""
    groups = {g: {"trainable": 0, "total": 0} for g in ("attention", "experts", "router", "other")}
    for name, p in model.named_parameters():
        # 4-bit weights are packed two per byte into whatever storage dtype was chosen.
        # ZeRO-3 partitions leave numel() == 0 on each rank; ds_numel is the full size.
        numel = getattr(p, "ds_numel", p.numel())
        if type(p).__name__ == "Params4bit" or name.endswith("_base.packed"):
            n = numel * p.element_size() * 2
        elif in_experts(name) and "_base." in name and not name.endswith("_base.weight"):
            n = 0  # the engine's NF4 scales (absmax, ...): storage, not weights
        else:
            n = numel
        g = groups[parameter_group(name)]
        g["total"] += n
        if p.requires_grad:
            g["trainable"] += n
    return groups


def check_expert_targets(groups: dict[str, dict[str, int]], lora_info: dict | None) -> None:
    """Fail when a config names expert projections and no expert parameter ended up trainable."""
    if lora_info and lora_info["target_parameters"] and groups["experts"]["trainable"] == 0:
        raise RuntimeError(f"the adapter config names expert projections ({lora_info['target_parameters']}) "
                           "but no expert parameter is trainable: the model has no fused mlp.experts parameters "
                           "of those names; check the model type and peft version")


def format_groups(groups: dict[str, dict[str, int]]) -> list[str]:
    total_t = sum(g["trainable"] for g in groups.values())
    total = sum(g["total"] for g in groups.values())
    lines = [f"  {name:<9} trainable {g['trainable']:>14,} of {g['total']:>16,}" for name, g in groups.items()]
    lines.append(f"  {'all':<9} trainable {total_t:>14,} of {total:>16,} ({100 * total_t / max(total, 1):.4f}%)")
    return lines

