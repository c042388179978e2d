"""Full, LoRA and QLoRA fine-tuning of the tiny Qwen3-MoE on tokenized realdata, asserting on artifacts.

    python -m pytest -q tests/test_train_e2e.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qwen_sft.train.args import parse_yaml
from qwen_sft.train.run import run

REPO = Path(__file__).resolve().parent.parent
STEPS = 3
ARTIFACTS = {"train_config.yaml", "data_stats.json", "trainable_params.json", "chat_template.jinja"}


@pytest.fixture(scope="session")
def realdata_tokenized(realdata_dir, tmp_path_factory) -> Path:
    """KULLM Self-Instruct rows → ChatML (qwen_sft.data) → tokenized JSONL (qwen_sft.tokenize), offline tokenizer."""
    convert = pytest.importorskip("qwen_sft.data.cli")
    pipeline = pytest.importorskip("qwen_sft.tokenize.pipeline")
    work = tmp_path_factory.mktemp("realdata")
    chatml = work / "chatml.jsonl"
    assert convert.main([str(realdata_dir / "kullm__user_oriented_instructions_eval.jsonl"), "-o", str(chatml)]) == 0
    tokenized = work / "train.jsonl"
    pipeline.tokenize_chatml_file(chatml, tokenized, model="offline", max_len=256, progress=False)
    return tokenized


def _train(kind: str, model_dir: Path, data: Path, out: Path, *extra: str) -> tuple[dict, object]:
    config = parse_yaml(str(REPO / f"configs/train/{kind}_tiny_cpu.yaml"), [
        f"model_name_or_path={model_dir}", f"data_path={data}", f"output_dir={out}", f"max_steps={STEPS}",
        "per_device_train_batch_size=2", "gradient_accumulation_steps=2", f"save_steps={STEPS}",
        f"data_cache_dir={out.parent / 'cache'}", "report_to=none", f"peft_config_path={REPO}/configs/lora/adapter_config.json",
        *extra])
    metrics = run(config)
    return metrics, config


def _check_tree(out: Path, adapter: bool) -> None:
    weights = {"adapter_config.json", "adapter_model.safetensors"} if adapter else {"config.json", "model.safetensors"}
    names = {p.name for p in out.iterdir()}
    assert weights | ARTIFACTS | {"loss_curve.png", "log_history.json", "tokenizer_config.json"} <= names, names
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = out / f"checkpoint-{STEPS}"
    assert weights | ARTIFACTS | {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {
        p.name for p in ckpt.iterdir()}
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))
    for h in steps:
        assert h["tokens_per_s"] > 0 and 0 < h["supervised_share"] <= 1 and h["peak_mem_gib"] > 0
    stats = json.loads((out / "data_stats.json").read_text())["train"]
    assert stats["rows_kept"] + stats["dropped_too_long"] == stats["rows_read"] > 0
    assert "{%" in (out / "chat_template.jinja").read_text()
    reloaded = parse_yaml(str(out / "train_config.yaml"), [])  # the saved effective config reads back
    assert reloaded.training.max_steps == STEPS


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_lora_trains_experts_and_reloads_with_same_logits(tiny_model_dir, realdata_tokenized, tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    metrics, _ = _train("lora", tiny_model_dir, realdata_tokenized, out, "router_aux_loss_coef=0.01")
    assert metrics["global_step"] == STEPS
    _check_tree(out, adapter=True)
    history = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert all(h["aux_loss"] > 0 for h in history)  # router load-balancing loss logged on its own
    groups = json.loads((out / "trainable_params.json").read_text())
    assert groups["experts"]["trainable"] > 0 and groups["attention"]["trainable"] > 0
    assert groups["router"]["trainable"] == 0 and groups["other"]["trainable"] == 0
    printed = capsys.readouterr().out
    assert "experts   trainable" in printed and "expert engine: 2 layers" in printed and "16-bit frozen" in printed
    assert "stay in float32" not in printed
    experts = metrics["model"].base_model.model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "ExpertEngine" and type(experts.gate_up_base).__name__ == "DenseExperts"
    assert json.loads((out / "adapter_config.json").read_text())["target_parameters"] == [
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert any("experts" in k for k in lora_b) and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at 0
    # Fused gate/up gets rank 2r = 16 over 8 experts; down_proj rank 8.
    shapes = {k.split("layers.0.")[-1]: tuple(v.shape) for k, v in adapter.items() if "layers.0.mlp" in k}
    assert shapes["mlp.experts.base_layer.lora_A.weight"] == (16 * 8, 64)
    assert shapes["mlp.experts.lora_A.weight"] == (8 * 8, 32)
    ids = torch.tensor([[151644, 872, 198, 14990, 151645, 198, 151644, 77091, 198]])
    trained = _logits(metrics["model"], ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_logits(reloaded, ids), trained, rtol=1e-4, atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert not torch.allclose(_logits(plain, ids), trained, atol=1e-4), "the adapter changed nothing"


def test_full_finetune_changes_weights_but_not_the_router(tiny_model_dir, realdata_tokenized, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "full"
    metrics, _ = _train("full", tiny_model_dir, realdata_tokenized, out, "learning_rate=1e-3")
    assert metrics["global_step"] == STEPS
    _check_tree(out, adapter=False)
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()  # saved in the on-disk per-expert layout, like the original
    changed = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    assert any(".self_attn.q_proj." in k for k in changed)
    assert any(".mlp.experts." in k for k in changed)
    assert not any(k.endswith("mlp.gate.weight") for k in changed), "the router must stay frozen"
    groups = json.loads((out / "trainable_params.json").read_text())
    assert groups["router"]["trainable"] == 0 and groups["experts"]["trainable"] == groups["experts"]["total"]


def _stock_with_engine_base(model_dir: Path, model) -> object:
    """A stock fp32 model holding ``model``'s (a freshly loaded engine model) dequantized NF4 weights."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for ours, theirs in zip(model.model.layers, stock.model.layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w = getattr(ours.self_attn, name).weight
                getattr(theirs.self_attn, name).weight.copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state))
            eng = ours.mlp.experts
            theirs.mlp.experts.gate_up_proj.copy_(eng.gate_up_base.dequantize(None, torch.float32))
            theirs.mlp.experts.down_proj.copy_(eng.down_base.dequantize(None, torch.float32))
    return stock


def test_qlora_uses_expert_engine_and_reloads(tiny_model_dir, realdata_tokenized, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from qwen_sft.train.model import load_model

    out = tmp_path / "qlora"
    metrics, config = _train("qlora", tiny_model_dir, realdata_tokenized, out)
    assert metrics["global_step"] == STEPS
    _check_tree(out, adapter=True)
    printed = capsys.readouterr().out
    assert "stay in float32" not in printed and "expert engine: 2 layers" in printed and "NF4" in printed
    model = metrics["model"]
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.quant_state.quant_type == "nf4"
    assert type(model.base_model.model.lm_head).__name__ == "Linear"  # never quantized
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "ExpertEngine" and type(experts.gate_up_base).__name__ == "NF4Experts"
    weights = experts.gate_up_base.packed.numel() * 2 + experts.down_base.packed.numel() * 2
    assert 0.5 <= experts.storage_bytes() / weights < 0.6  # NF4 + double-quant scales
    groups = json.loads((out / "trainable_params.json").read_text())
    assert groups["experts"]["trainable"] > 0 and groups["router"]["trainable"] == 0
    assert groups["experts"]["total"] - groups["experts"]["trainable"] == 2 * 8 * 3 * 64 * 32  # weights, not bytes
    # The saved adapter (attention LoRA + expert factors) on a stock model with the same (dequantized) base.
    ids = torch.tensor([[151644, 872, 198, 14990, 151645, 198, 151644, 77091, 198]])
    trained = _logits(model, ids)
    stock = _stock_with_engine_base(tiny_model_dir, load_model(config.model, _model_config(tiny_model_dir)))
    untrained = _logits(stock, ids)
    # bitsandbytes' 4-bit CPU matmul vs the dequantized fp32 weights: ~4e-3 apart before any training.
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(stock, out), ids), trained, rtol=0, atol=2e-2)
    assert (untrained - trained).abs().max() > 0.1, "the adapter changed nothing"


@pytest.mark.slow  # two QLoRA runs
def test_qlora_resume_through_run_restores_attention_and_expert_factors(tiny_model_dir, realdata_tokenized,
                                                                          tmp_path):
    """STEPS + 1 steps straight == checkpoint-STEPS + `resume_from_checkpoint=auto` for one step, through the
    public run: the step after the resume sees every trained factor, attention and expert, as it was saved."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train("qlora", tiny_model_dir, realdata_tokenized, straight, f"max_steps={STEPS + 1}")
    resumed.mkdir()
    shutil.copytree(straight / f"checkpoint-{STEPS}", resumed / f"checkpoint-{STEPS}")
    metrics, _ = _train("qlora", tiny_model_dir, realdata_tokenized, resumed, f"max_steps={STEPS + 1}",
                        "resume_from_checkpoint=auto")
    assert metrics["global_step"] == STEPS + 1
    losses = [[h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
              for out in (straight, resumed)]
    assert len(losses[0]) == len(losses[1]) == STEPS + 1
    assert losses[1][STEPS] == pytest.approx(losses[0][STEPS], rel=1e-5)
    start = load_file(straight / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    want, got = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert want.keys() == got.keys() == start.keys() and any(".mlp.experts." in k for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(start[k], want[k]) for k in want), "the step after the resume changed nothing"


def _model_config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def test_qlora_without_expert_engine_warns_about_experts(tiny_model_dir, realdata_tokenized, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora_stock"
    metrics, _ = _train("qlora", tiny_model_dir, realdata_tokenized, out, "expert_engine=false")
    assert metrics["global_step"] == STEPS
    printed = capsys.readouterr().out
    assert printed.count("fused MoE experts stay in float32") == 1 and "expert engine:" not in printed
    model = metrics["model"]
    assert type(model.base_model.model.model.layers[0].mlp.experts).__name__ != "ExpertEngine"
    groups = json.loads((out / "trainable_params.json").read_text())
    assert groups["experts"]["trainable"] > 0 and groups["router"]["trainable"] == 0
