"""Tiny qwen3_next, the two recipes the expert engine is not in: full fine-tuning, and LoRA on peft's own path
(``expert_engine: false``: routed experts through peft's ``target_parameters``, attention, Gated DeltaNet and
the shared expert through ``target_modules``). Each trains a few steps on CPU and is checked on its artifacts.

    python -m pytest -q -m slow tests/test_next_train.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen_sft.model.tiny import TinySpec, make_tiny_model
from qwen_sft.train.args import parse_yaml
from qwen_sft.train.run import run

pytestmark = pytest.mark.slow  # each test trains a model for ~1 min on a shared CPU
REPO = Path(__file__).resolve().parent.parent
SPEC = TinySpec(model_type="qwen3_next", layers=4, experts=16, active=10, full_attention_interval=2)
IM_END = 151645
STEPS = 3


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("next") / "base", SPEC, dtype="float32")


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, offline_tok) -> Path:
    import random

    rng = random.Random(1)
    words = "def return value list for loop python code function class import print sort key".split()
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(12):
            prompt = offline_tok.encode(f"<|im_start|>user\n{' '.join(rng.choices(words, k=6))}<|im_end|>\n"
                                        "<|im_start|>assistant\n")
            answer = offline_tok.encode(" ".join(rng.choices(words, k=rng.randint(3, 12)))) + [IM_END]
            fh.write(json.dumps({"input_ids": prompt + answer, "label": [-100] * len(prompt) + answer}) + "\n")
    return path


def _train(kind: str, base: Path, data: Path, out: Path, *extra: str) -> dict:
    return run(parse_yaml(str(REPO / f"configs/train/{kind}_tiny_cpu.yaml"), [
        f"model_name_or_path={base}", f"data_path={data}", f"output_dir={out}", f"max_steps={STEPS}",
        f"save_steps={STEPS}", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
        "learning_rate=1e-2", "warmup_steps=0", f"data_cache_dir={out.parent / 'cache'}", "report_to=none",
        *extra]))


def _losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def _state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_full_finetune_trains_every_part_but_the_router(base_dir, tokenized, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    metrics = _train("full", base_dir, tokenized, out)
    printed = capsys.readouterr().out
    assert metrics["global_step"] == STEPS
    assert "packing=False (was True): qwen3_next" in printed
    losses = _losses(out)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    base, tuned = _state(base_dir), _state(out)
    assert tuned.keys() == base.keys()  # the Hub's per-expert layout, no MTP or renamed keys
    for key in ("model.layers.0.linear_attn.in_proj_qkvz.weight", "model.layers.0.linear_attn.A_log",
                "model.layers.0.linear_attn.conv1d.weight", "model.layers.1.self_attn.q_proj.weight",
                "model.layers.2.mlp.shared_expert.down_proj.weight", "model.layers.2.mlp.shared_expert_gate.weight",
                "model.layers.3.mlp.experts.5.gate_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(tuned[key], base[key]), f"{key} did not train"
    for layer in range(SPEC.layers):  # freeze_router: the routers keep their weights
        key = f"model.layers.{layer}.mlp.gate.weight"
        assert torch.equal(tuned[key], base[key]), key
    groups = json.loads((out / "trainable_params.json").read_text())
    assert groups["router"]["trainable"] == 0 and groups["experts"]["trainable"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[151644, 872, 198, 14990, 151645, 198, 151644, 77091, 198]])
    model = metrics["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lora_without_the_engine_trains_shared_and_routed_experts(base_dir, tokenized, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    metrics = _train("lora", base_dir, tokenized, out, "expert_engine=false",
                     f"peft_config_path={REPO}/configs/lora/qwen3_next_adapter_config.json")
    printed = capsys.readouterr().out
    assert metrics["global_step"] == STEPS and "expert engine:" not in printed
    model = metrics["model"]
    mlp = model.base_model.model.model.layers[0].mlp
    assert type(mlp.experts).__name__ == "ParamWrapper"  # peft's own expert LoRA, not the engine
    assert hasattr(mlp.shared_expert.gate_proj, "lora_A")  # the shared expert kept its LoRA (peft_targets.py)
    saved = _state(out)
    for part in ("layers.0.linear_attn.in_proj_qkvz.lora_A", "layers.1.self_attn.o_proj.lora_B",
                 "layers.2.mlp.shared_expert.up_proj.lora_A", "layers.3.mlp.experts.lora_A"):
        assert any(part in k for k in saved), f"{part} not in the adapter: {sorted(saved)[:8]}"
    routed = [k for k in saved if "layers.3.mlp.experts" in k and "lora_A" in k]
    assert len(routed) == 2, routed  # gate_up_proj and down_proj
    b_norms = [v.abs().sum() for k, v in saved.items() if "lora_B" in k]
    assert b_norms and all(n > 0 for n in b_norms)  # every B left zero-init: every adapted layer trained
    groups = json.loads((out / "trainable_params.json").read_text())
    assert groups["experts"]["trainable"] > 0 and groups["router"]["trainable"] == 0
    # The saved adapter reloads onto the base with the trained model's logits.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    from qwen_sft.moe.peft_targets import peft_targets_as_named

    with peft_targets_as_named(base):
        reloaded = PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor([[151644, 872, 198, 14990, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
