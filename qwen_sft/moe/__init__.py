"""MoE expert engine: NF4 experts, per-expert LoRA without a dense delta-W, peft-layout adapters, estimates.

    from qwen_sft.moe import ExpertLoraSpec, install_expert_engine, save_adapter
    qwen-sft estimate ../shared/spec/qwen3-coder-30b-a3b-instruct/config.json --mode qlora

See docs/moe.md for how training calls it.
"""

from qwen_sft.moe.experts import ExpertEngine
from qwen_sft.moe.install import (
    EngineReport,
    ExpertLoraSpec,
    enable_expert_lora,
    install_expert_engine,
    trainable_parameter_groups,
)
from qwen_sft.moe.load import load_moe_model
from qwen_sft.moe.lora import (
    TARGET_PARAMETERS,
    add_expert_factors,
    expert_state_dict,
    load_expert_adapter,
    save_adapter,
)
from qwen_sft.moe.nf4 import DenseExperts, NF4Experts


def __getattr__(name: str):
    # The callback imports transformers' Trainer machinery; load it only when asked for.
    if name == "ExpertAdapterCallback":
        from qwen_sft.moe.callback import ExpertAdapterCallback

        return ExpertAdapterCallback
    raise AttributeError(name)


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
