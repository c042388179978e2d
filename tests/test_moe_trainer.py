"""HF Trainer + expert engine: every checkpoint-N adapter carries the expert factors (ExpertAdapterCallback).

    python -m pytest -q tests/test_moe_trainer.py
"""

from __future__ import annotations

import torch

from qwen_sft.model.tiny import TinySpec, build_tiny_model
from qwen_sft.moe import ExpertAdapterCallback, ExpertLoraSpec, enable_expert_lora, install_expert_engine


def test_trainer_checkpoints_hold_expert_factors(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    base_dir = tmp_path / "base"
    build_tiny_model(TinySpec(layers=2)).save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    install_expert_engine(model, quantize_experts=True, lora=ExpertLoraSpec(r=4, alpha=8), compute_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    enable_expert_lora(model)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 5000, (12,), generator=g) for _ in range(4)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2, per_device_train_batch_size=2,
                             learning_rate=5e-2, report_to=[], use_cpu=True, logging_steps=1, save_only_model=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ExpertAdapterCallback()])
    trainer.train()

    ckpt = tmp_path / "run" / "checkpoint-2"
    keys = set(load_file(str(ckpt / "adapter_model.safetensors")))
    assert len([k for k in keys if ".mlp.experts." in k]) == 4 * 2 and len([k for k in keys if "self_attn" in k]) == 8
    model.eval()
    ids = rows[0][None]
    with torch.no_grad():
        ours = model(input_ids=ids, use_cache=False).logits
        stock = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            for i, layer in enumerate(stock.model.layers):  # the reference base: the dequantized NF4 experts
                eng = model.base_model.model.model.layers[i].mlp.experts
                layer.mlp.experts.gate_up_proj.copy_(eng.gate_up_base.dequantize(None, torch.float32))
                layer.mlp.experts.down_proj.copy_(eng.down_base.dequantize(None, torch.float32))
        untrained = stock(input_ids=ids, use_cache=False).logits
        theirs = PeftModel.from_pretrained(stock, ckpt).eval()(input_ids=ids, use_cache=False).logits
    assert (ours - untrained).abs().max() > 1e-3  # two steps at lr 5e-2 moved the model ...
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)  # ... and the checkpoint holds all of it
