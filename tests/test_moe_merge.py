"""Cross-stage: an adapter trained through the expert engine merges with ``qwen-sft merge`` into a checkpoint
whose logits equal the engine model's — the expert factors really reach the merged weights.

    python -m pytest -q tests/test_moe_merge.py      # slow tier
"""

from __future__ import annotations

import pytest
import torch

from qwen_sft.model.tiny import TinySpec, make_tiny_model
from qwen_sft.moe import ExpertLoraSpec, enable_expert_lora, install_expert_engine, save_adapter

IDS = torch.randint(0, 5000, (1, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow  # two model writes and a merge with its own verification: ~30 s on 2 cores
def test_engine_adapter_merges_into_the_same_model(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_sft.merge.cli import main as merge_main

    base = make_tiny_model(tmp_path / "base", TinySpec(layers=2), dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    install_expert_engine(model, quantize_experts=False, lora=ExpertLoraSpec(r=4, alpha=8, gate_up_r=8,
                                                                              gate_up_alpha=16),
                          compute_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    enable_expert_lora(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: non-zero B everywhere
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or name.endswith("_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=IDS, use_cache=False).logits
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))

    out = tmp_path / "merged"
    assert merge_main(["--base_model_path", str(base), "--adapter_path", str(adapter), "--output_path", str(out),
                       "--dtype", "float32", "--verify_device", "cpu"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = merged(input_ids=IDS, use_cache=False).logits
        unchanged = base_model(input_ids=IDS, use_cache=False).logits
    assert (ours - unchanged).abs().max() > 1e-2  # the adapter matters ...
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)  # ... and the merge carries all of it
