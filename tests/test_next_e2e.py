"""Tiny qwen3_next QLoRA, end to end: train (expert engine, NF4) → checkpoint → resume → merge → verify.

    python -m pytest -q -m slow tests/test_next_e2e.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import write_conversations

from qwen_sft.model.tiny import TinySpec, make_tiny_model
from qwen_sft.train.args import parse_yaml
from qwen_sft.train.run import run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SPEC = TinySpec(model_type="qwen3_next", layers=4, experts=16, active=10, full_attention_interval=2)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("next") / "base", SPEC, dtype="float32")


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, offline_tok) -> Path:
    return write_conversations(tmp_path_factory.mktemp("data") / "train.jsonl", offline_tok, 8)


def _config(base: Path, data: Path, out: Path, *extra: str):
    return parse_yaml(str(REPO / "configs/train/qlora_tiny_cpu.yaml"), [
        f"model_name_or_path={base}", f"data_path={data}", f"output_dir={out}", "max_steps=2", "save_steps=1",
        "per_device_train_batch_size=2", "gradient_accumulation_steps=1", "learning_rate=1e-2", "warmup_steps=0",
        f"data_cache_dir={out.parent / 'cache'}", "report_to=none", "save_total_limit=3",
        f"peft_config_path={REPO}/configs/lora/qwen3_next_adapter_config.json", *extra])


def _losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def test_qlora_trains_resumes_merges_and_verifies(base_dir, tokenized, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qwen_sft.merge.cli import main as merge_main

    straight = tmp_path / "straight"
    metrics = run(_config(base_dir, tokenized, straight))
    printed = capsys.readouterr().out
    assert metrics["global_step"] == 2
    assert "expert engine: 4 layers" in printed and "NF4" in printed
    assert "packing=False (was True): qwen3_next" in printed
    assert "packing: false" in (straight / "train_config.yaml").read_text()
    model = metrics["model"].base_model.model
    layer0 = model.model.layers[0]
    assert type(layer0.linear_attn.in_proj_qkvz.base_layer).__name__ == "Linear4bit"
    assert type(layer0.mlp.shared_expert.gate_proj.base_layer).__name__ == "Linear4bit"
    assert type(layer0.mlp.experts.gate_up_base).__name__ == "NF4Experts"
    saved = load_file(straight / "adapter_model.safetensors")
    # attention, Gated DeltaNet, shared expert and its 1-row gate (peft) and every routed expert (engine) have factors
    for part in ("layers.1.self_attn.q_proj.lora_A", "layers.0.linear_attn.in_proj_qkvz.lora_A",
                 "layers.0.linear_attn.out_proj.lora_B", "layers.2.mlp.shared_expert.down_proj.lora_B",
                 "layers.1.mlp.shared_expert_gate.lora_B", "layers.3.mlp.experts.lora_A"):
        assert any(part in k for k in saved), part
    expert_a = next(v for k, v in saved.items() if "layers.0.mlp.experts.lora_A" in k)
    assert expert_a.shape[0] == SPEC.experts * 8  # peft's target_parameters layout: E * r rows
    groups = json.loads((straight / "trainable_params.json").read_text())
    assert groups["experts"]["trainable"] > 0 and groups["router"]["trainable"] == 0
    assert groups["attention"]["trainable"] > 0

    # Resume from checkpoint-1: step 2 and the final adapter equal the straight run's.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    run(_config(base_dir, tokenized, resumed, "resume_from_checkpoint=auto"))
    a, b = _losses(straight), _losses(resumed)
    assert len(a) == len(b) == 2 and a[1] == pytest.approx(b[1], rel=1e-5)
    wa, wb = saved, load_file(resumed / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)

    # Merge into the per-expert Hub layout and verify against peft's own unmerged forward (the 1-row
    # shared_expert_gate LoRA included: B [1, r] merges like any Linear's).
    merged = tmp_path / "merged"
    assert merge_main(["--base_model_path", str(base_dir), "--adapter_path", str(straight), "--output_path",
                       str(merged), "--dtype", "float32", "--verify_device", "cpu"]) == 0
    base_sd = load_file(base_dir / "model.safetensors")
    merged_sd = {}
    for f in sorted(merged.glob("*.safetensors")):
        merged_sd |= load_file(f)
    assert merged_sd.keys() == base_sd.keys()  # same per-expert names as the Hub checkpoint
    for key in ("model.layers.0.mlp.experts.7.up_proj.weight", "model.layers.0.mlp.shared_expert.gate_proj.weight",
                "model.layers.0.linear_attn.in_proj_qkvz.weight", "model.layers.1.self_attn.q_proj.weight",
                "model.layers.0.mlp.shared_expert_gate.weight"):
        assert not torch.equal(merged_sd[key], base_sd[key]), key
    assert torch.equal(merged_sd["model.layers.0.mlp.gate.weight"], base_sd["model.layers.0.mlp.gate.weight"])
    ids = torch.tensor([[151644, 872, 198, 14990, 151645, 198, 151644, 77091, 198]])
    reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-2
