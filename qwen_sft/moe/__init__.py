"""MoE expert engine: NF4 experts, per-expert LoRA without a dense delta-W, peft-layout adapters, estimates.

    from qwen_sft.moe import ExpertLoraSpec, install_expert_engine, save_adapter
    qwen-sft estimate ../shared/spec/qwen3-coder-30b-a3b-instruct/config.json --mode qlora

See docs/moe.md for how training calls it.
"""

# Loaded on first use (PEP 562): ``qwen-sft estimate`` imports qwen_sft.moe.estimate, which needs no torch, and
# the package's own imports would otherwise load torch (seconds) before its options are even parsed.
_HOMES = {
    "ExpertEngine": "experts",
    "EngineReport": "install", "ExpertLoraSpec": "install", "enable_expert_lora": "install",
    "install_expert_engine": "install", "trainable_parameter_groups": "install",
    "load_moe_model": "load",
    "TARGET_PARAMETERS": "lora", "add_expert_factors": "lora", "expert_state_dict": "lora",
    "load_expert_adapter": "lora", "save_adapter": "lora",
    "DenseExperts": "nf4", "NF4Experts": "nf4",
    "ExpertAdapterCallback": "callback",  # imports transformers' Trainer machinery
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "TARGET_PARAMETERS",
    "DenseExperts",
    "ExpertAdapterCallback",
    "EngineReport",
    "ExpertEngine",
    "ExpertLoraSpec",
    "NF4Experts",
    "add_expert_factors",
    "enable_expert_lora",
    "expert_state_dict",
    "install_expert_engine",
    "load_moe_model",
    "load_expert_adapter",
    "save_adapter",
    "trainable_parameter_groups",
]
