"""Configuration of training: every shipped config loads, the seed's flags parse, conflicts are rejected,
problems surface before a model is loaded.

    python -m pytest -q tests/test_train_config.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixture_data import SPEC_CONFIG, need_fixture

from qwen_sft.train.args import DataArguments, ModelArguments, parse_flags, parse_yaml

REPO = Path(__file__).resolve().parent.parent
TRAIN_CONFIGS = sorted((REPO / "configs" / "train").rglob("*.yaml"))


def test_found_the_shipped_configs():
    assert len(TRAIN_CONFIGS) >= 4


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    import torch
    import yaml

    # GPU configs ask for bf16, which transformers refuses on a CPU-only box unless use_cpu is set.
    cpu = ["use_cpu=true"] if yaml.safe_load(path.read_text()).get("bf16") and not torch.cuda.is_available() else []
    config = parse_yaml(str(path), cpu)
    assert config.data.data_path and config.training.output_dir
    assert config.training.remove_unused_columns is False and config.training.label_names == ["labels"]
    if config.model.use_peft:
        from qwen_sft.train.model import lora_config_file

        assert lora_config_file(str(REPO / config.model.peft_config_path)).is_file()


def test_deepspeed_configs():
    z3 = json.loads((REPO / "configs/default_offload_opt_param.json").read_text())
    assert z3["zero_optimization"]["stage"] == 3 and "scheduler" not in z3
    assert z3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    z2 = json.loads((REPO / "configs/zero2.json").read_text())
    assert z2["zero_optimization"]["stage"] == 2 and "scheduler" not in z2


def test_seed_adapter_config_is_kept():
    cfg = json.loads((REPO / "configs/lora/adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (8, 32, 0.1)
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_seed_flags_parse():
    config = parse_flags([
        "--model_name_or_path", "m", "--data_path", "d.jsonl", "--eval_data_path", "e.jsonl",
        "--model_max_length", "1280", "--use_peft", "true", "--peft_config_path", "p.json", "--use_qlora", "true",
        "--bnb_4bit_quant_type", "nf4", "--bnb_4bit_compute_dtype", "bfloat16", "--use_flash_attention", "false",
        "--truncate_source", "false", "--cache_dir", ".cache/hf", "--output_dir", "out",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8", "--learning_rate", "5e-5",
        "--lr_scheduler_type", "cosine", "--eval_strategy", "no", "--save_steps", "100", "--report_to", "tensorboard",
    ])
    m, d, t = config.model, config.data, config.training
    assert (m.model_name_or_path, m.use_qlora, m.use_peft, m.cache_dir) == ("m", True, True, ".cache/hf")
    assert (d.data_path, d.eval_data_path, d.model_max_length) == ("d.jsonl", "e.jsonl", 1280)
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.learning_rate) == (4, 8, 5e-5)
    assert config.origins["learning_rate"] == "flag" and config.origins["remove_unused_columns"] == "recipe default"
    assert t.report_to == ["tensorboard"] and m.torch_dtype == "bfloat16"


def test_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\nmax_steps: 3\n", encoding="utf-8")
    config = parse_yaml(str(path), ["max_steps=5", "packing=false", "report_to=[tensorboard]"])
    assert config.training.learning_rate == 1e-4  # YAML 1.1 reads "1e-4" as a string; still a float here
    assert config.training.max_steps == 5 and config.origins["max_steps"] == "override"
    assert config.data.packing is False and config.origins["learning_rate"] == f"config {path}"
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['lerning_rate'\]"):
        parse_yaml(str(path), ["lerning_rate=1"])
    with pytest.raises(ValueError, match="is not key=value"):
        parse_yaml(str(path), ["max_steps"])


def test_conflicts_name_both_options():
    with pytest.raises(ValueError, match="strict=True.*truncate_source=True"):
        DataArguments(strict=True, truncate_source=True)
    with pytest.raises(ValueError, match="use_qlora with torch_dtype=float32 but bnb_4bit_compute_dtype=bfloat16"):
        ModelArguments(use_qlora=True, torch_dtype="float32")
    assert ModelArguments(use_qlora=True).use_peft is True


def test_expert_memory_from_the_model_config():
    need_fixture(SPEC_CONFIG)
    from transformers import AutoConfig

    from qwen_sft.train.model import expert_memory_gib

    config = AutoConfig.from_pretrained(SPEC_CONFIG.parent)
    # 48 layers x 128 experts x 3 x 2048 x 768 weights x 2 bytes = 54.0 GiB (spec: experts are 28.99 B params).
    assert expert_memory_gib(config) == pytest.approx(48 * 128 * 3 * 2048 * 768 * 2 / 2**30)
    assert round(expert_memory_gib(config), 1) == 54.0


def test_no_expert_parameters_is_an_error():
    from qwen_sft.train.model import check_expert_targets

    groups = {g: {"trainable": 0, "total": 10} for g in ("attention", "experts", "router", "other")}
    with pytest.raises(RuntimeError, match="names expert projections"):
        check_expert_targets(groups, {"target_parameters": ["mlp.experts.down_proj"]})
    check_expert_targets(groups, {"target_parameters": []})  # attention-only adapters are fine


def test_wandb_without_login_goes_offline(monkeypatch, tmp_path, capsys):
    from qwen_sft.train.run import setup_reporting

    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    training = parse_yaml(str(TRAIN_CONFIGS[0]), ["report_to=wandb,tensorboard"]).training
    setup_reporting(training)
    import os

    assert training.report_to == ["wandb", "tensorboard"] and os.environ["WANDB_MODE"] == "offline"
    assert "no wandb API key" in capsys.readouterr().out
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    monkeypatch.delenv("WANDB_MODE")
    setup_reporting(training)
    assert "WANDB_MODE" not in os.environ and "secret-key-123" not in capsys.readouterr().out


def test_untokenized_data_fails_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    from qwen_sft.train.cli import main

    data = tmp_path / "chatml.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    code = main([str(REPO / "configs/train/lora_tiny_cpu.yaml"), f"model_name_or_path={tiny_model_dir}",
                 f"data_path={data}", f"output_dir={tmp_path / 'out'}", f"data_cache_dir={tmp_path}",
                 f"peft_config_path={REPO / 'configs/lora/adapter_config.json'}"])
    captured = capsys.readouterr()
    assert code == 1
    assert "not tokenized (no input_ids) (1):\n    line 1: keys ['messages']" in captured.err
    assert "convert_to_chatml.py ./raw --tokenize" in captured.err
    assert "parameters by group" not in captured.out and not (tmp_path / "out").exists()


def test_flash_attention_only_when_installed():
    from transformers.utils import is_flash_attn_2_available

    from qwen_sft.train.model import attention_implementation

    assert attention_implementation(ModelArguments()) == "sdpa"
    if is_flash_attn_2_available():
        assert attention_implementation(ModelArguments(use_flash_attention=True)) == "flash_attention_2"
    else:
        with pytest.raises(RuntimeError, match="flash-attn 2 is not installed"):
            attention_implementation(ModelArguments(use_flash_attention=True))


def test_train_router_with_lora(tiny_model_dir):
    import torch
    from transformers import AutoConfig

    from qwen_sft.train.model import apply_lora, freeze_router, load_model, parameter_groups

    args = ModelArguments(model_name_or_path=str(tiny_model_dir), torch_dtype="float32", use_peft=True,
                          train_router=True, peft_config_path=str(REPO / "configs/lora/adapter_config.json"))
    model, _ = apply_lora(load_model(args, AutoConfig.from_pretrained(tiny_model_dir)), args, False)
    freeze_router(model, True)
    groups = parameter_groups(model)
    assert groups["router"]["trainable"] == 2 * 8 * 64  # 2 layers x [8 experts, hidden 64], counted once
    ids = torch.tensor([[151644, 872, 198, 14990]])
    model(input_ids=ids, labels=ids).loss.backward()
    gate = model.base_model.model.model.layers[0].mlp.gate
    assert gate.modules_to_save["default"].weight.grad is not None
