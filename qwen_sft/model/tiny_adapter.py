"""A trained-looking adapter for a tiny model: attention LoRA (peft) and per-expert factors (the expert engine),
every B factor non-zero. A stand-in for training where only the adapter's layout and numbers matter: the merge
and export tests and the opt-in consumer checks (scripts/check_gguf.py, scripts/check_vllm.py).

    from qwen_sft.model.tiny_adapter import random_adapter
    model, adapter_dir = random_adapter(tiny_model_dir, out_dir)
"""

from __future__ import annotations

from pathlib import Path

from qwen_sft.moe import ExpertLoraSpec

DEFAULT_EXPERT_LORA = ExpertLoraSpec(r=4, alpha=8, gate_up_r=8, gate_up_alpha=16)


def random_adapter(base: Path, out: Path, expert: ExpertLoraSpec = DEFAULT_EXPERT_LORA, attn_r: int = 4,
                   attn_alpha: float = 8, seed: int = 1, targets: list[str] | None = None):
    """(the fp32 model in eval mode with the adapter applied, the adapter saved to ``out``).

    B ~ 0.2 · N(0, 1) from ``seed`` (peft starts B at zero, which would make every ΔW zero); A as initialised.
    ``targets``: peft's ``target_modules`` (default ``q_proj``, ``v_proj``); qwen3_next's shared-expert paths
    (``shared_expert.gate_proj``) are kept as written (qwen_sft/moe/peft_targets.py).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_sft.moe import enable_expert_lora, install_expert_engine, save_adapter
    from qwen_sft.moe.peft_targets import peft_targets_as_named

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    install_expert_engine(model, quantize_experts=False, lora=expert, compute_dtype=torch.float32)
    with peft_targets_as_named(model):
        model = get_peft_model(model, LoraConfig(r=attn_r, lora_alpha=attn_alpha,
                                                 target_modules=targets or ["q_proj", "v_proj"]))
    enable_expert_lora(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or name.endswith("_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()
    return model, save_adapter(model, out, base_model_name_or_path=str(base))
