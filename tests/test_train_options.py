"""Training options: parsing has no side effects, each recipe has one source (configs/train/*.yaml) that the seed
scripts run with only their positional arguments and environment variables on top.

    python -m pytest -q tests/test_train_options.py
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_sft.train.args import parse_flags, parse_yaml
from qwen_sft.train.validate import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_parsing_initialises_neither_accelerate_nor_a_process_group(monkeypatch):
    """Under torchrun (WORLD_SIZE=2) the old parse joined DeepSpeed's process group and set accelerate's state up."""
    import deepspeed
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    joined = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: joined.append(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = parse_flags(["--output_dir", "o", "--use_cpu", "true", "--deepspeed", str(REPO / "configs/zero2.json"),
                          "--per_device_train_batch_size", "2", "--global_batch_size", "8"])
    assert joined == [] and PartialState._shared_state == {} and not dist.is_initialized()
    assert config.training_values["gradient_accumulation_steps"] == 2  # 8 / (2 processes x 2)
    assert config.origins["gradient_accumulation_steps"] == "global_batch_size 8"


def test_training_arguments_are_built_at_first_use(monkeypatch):
    from accelerate.state import AcceleratorState, PartialState

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    config = parse_flags(["--output_dir", "o", "--use_cpu", "true", "--max_steps", "3"])
    assert PartialState._shared_state == {}
    assert config.training.max_steps == 3 and config.training is config.training  # built once
    assert PartialState._shared_state != {}


def test_config_flag_reads_the_recipe_and_flags_override_it():
    recipe = "configs/train/lora_tiny_cpu.yaml"
    config = parse_flags(["--config", str(REPO / recipe), "--max_steps", "3", "--output_dir", "o"])
    from_yaml = parse_yaml(str(REPO / recipe), ["max_steps=3", "output_dir=o"])
    assert dataclasses.asdict(config.model) == dataclasses.asdict(from_yaml.model)
    assert config.training_values == from_yaml.training_values
    assert config.origins["max_steps"] == "flag" and config.origins["learning_rate"] == f"config {REPO / recipe}"


def test_global_batch_conflicts_are_validation_problems(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError) as err:
        parse_flags(["--global_batch_size", "8", "--per_device_train_batch_size", "2"])
    assert "global_batch_size=8 is not a multiple of 3 processes x per_device_train_batch_size=2 (= 6)" in str(err.value)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=4 was given too: give one"):
        parse_flags(["--global_batch_size", "12", "--per_device_train_batch_size", "2",
                     "--gradient_accumulation_steps", "4"])


def test_global_batch_counts_data_parallel_groups_under_sp(monkeypatch):
    """4 processes in sp_size 2 groups are 2 data-parallel groups of one packed row each: accumulation 8 / 2 = 4."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    flags = ["--output_dir", "o", "--use_cpu", "true", "--deepspeed", str(REPO / "configs/zero2.json"),
             "--sp_size", "2", "--max_tokens_per_batch", "64", "--global_batch_size"]
    config = parse_flags(flags + ["8"])
    assert config.training_values["gradient_accumulation_steps"] == 4
    with pytest.raises(ConfigError) as err:
        parse_flags(flags + ["7"])
    assert "is not a multiple of 2 data-parallel groups (processes / sp_size 2) x per_device_train_batch_size=1" \
        in str(err.value)


def test_long_sequence_conflicts_are_part_of_the_one_validation(tiny_model_dir, tmp_path):
    """They used to be raised later, on their own; validate() now lists them with every other problem."""
    from qwen_sft.train.validate import validate

    config = parse_flags(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(tmp_path / "none.jsonl"),
                          "--use_cpu", "true", "--offload_activations", "true", "--packing", "false",
                          "--max_tokens_per_batch", "64"])
    with pytest.raises(ConfigError) as err:
        validate(config)
    text = str(err.value)
    assert "none.jsonl: no such file" in text and "needs gradient_checkpointing=true" in text
    assert "it needs packing=true" in text


# --- the seed scripts are thin wrappers of their recipe -----------------------------------------------------------

SCRIPTS = {  # script → (recipe, positional arguments, the keys the script may set on top of the recipe)
    "qlora_qwen3_30b.sh": ("qlora_qwen3_30b.yaml", ["d.jsonl", "out", "run1"],
                           {"model_name_or_path", "cache_dir", "data_path", "output_dir", "run_name",
                            "model_max_length", "per_device_train_batch_size", "gradient_accumulation_steps"}),
    "sft_qwencoder_with_lora.sh": ("lora_zero2_qwen3_30b.yaml", ["d.jsonl", "m", "out"],
                                   {"model_name_or_path", "cache_dir", "data_path", "output_dir", "model_max_length",
                                    "global_batch_size", "per_device_train_batch_size", "deepspeed"}),
    "sft_qwencoder.sh": ("full_zero3_qwen3_30b.yaml", ["d.jsonl", "m", "out"],
                         {"model_name_or_path", "cache_dir", "data_path", "output_dir", "model_max_length",
                          "global_batch_size", "per_device_train_batch_size", "deepspeed"}),
}


def _script_argv(tmp_path: Path, script: str, args: list[str], **env: str) -> list[str]:
    """The train.py arguments the script hands torchrun (a stand-in python records them instead of running)."""
    record = tmp_path / "argv.txt"
    stub = tmp_path / "python"
    stub.write_text(f"""#!/bin/bash
if [ "$1" = -m ] && [ "$2" = torch.distributed.run ]; then
    while [ "$1" != train.py ]; do shift; done; shift
    printf '%s\\n' "$@" > {record}; exit 0
fi
[ "$1" = -c ] && exit 1   # no GPU
exec {sys.executable} "$@"
""")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    base = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "MODEL", "BATCH_SIZE", "GRAD_ACCU", "MAX_LEN",
                                                            "GLOBAL_BATCH", "MICRO_BATCH", "DEEPSPEED_CONFIG")}
    full_env = {**base, "PYTHON": str(stub), "HF_HOME": str(tmp_path / "hf"), "GPUS_PER_NODE": "1",
                "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **env}
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args], env=full_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return record.read_text().splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_its_recipe_with_only_the_seed_arguments_on_top(script, tmp_path, monkeypatch):
    recipe, args, script_keys = SCRIPTS[script]
    argv = _script_argv(tmp_path, script, args)
    assert argv[:2] == ["--config", f"configs/train/{recipe}"]
    flags = {a[2:] for a in argv[2:] if a.startswith("--")}
    assert flags - {"use_cpu"} == script_keys  # nothing of the recipe is repeated in the script
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ran = parse_flags(argv)
    positional = {"qlora_qwen3_30b.sh": ["data_path=d.jsonl", "output_dir=out", "run_name=run1"]}.get(
        script, ["data_path=d.jsonl", "model_name_or_path=m", "output_dir=out"])
    expected = parse_yaml(f"configs/train/{recipe}", [*positional, f"cache_dir={tmp_path / 'hf' / 'hub'}",
                                                      "use_cpu=true"])
    for part in ("model", "data", "run"):
        assert getattr(ran, part) == getattr(expected, part), part
    assert ran.training_values == expected.training_values


def test_script_environment_overrides_the_recipe(tmp_path, monkeypatch):
    argv = _script_argv(tmp_path, "sft_qwencoder_with_lora.sh", ["d.jsonl", "m", "out"], GLOBAL_BATCH="8",
                        MICRO_BATCH="2", MAX_LEN="64", DEEPSPEED_CONFIG="configs/default_offload_opt_param.json")
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = parse_flags(argv)
    assert (config.run.global_batch_size, config.data.model_max_length) == (8, 64)
    assert config.training_values["per_device_train_batch_size"] == 2
    assert config.training_values["gradient_accumulation_steps"] == 2
    assert config.training_values["deepspeed"] == "configs/default_offload_opt_param.json"
    qlora = _script_argv(tmp_path, "qlora_qwen3_30b.sh", [], BATCH_SIZE="1", GRAD_ACCU="32", MODEL="x")
    qcfg = parse_flags(qlora)
    assert qcfg.training_values["gradient_accumulation_steps"] == 32 and qcfg.model.model_name_or_path == "x"
    assert qcfg.data.data_path == "./processed/sft_train.jsonl"  # the recipe's, as the seed's default
    assert qcfg.training_values["output_dir"] == "../../checkpoints/qwen3_30b_qlora"
    assert qcfg.training_values["report_to"] == ["wandb", "tensorboard"]


# --- LoRA settings are TrainConfig fields; the seed's configs/lora/adapter_config.json stays the default -----------


def test_lora_fields_default_to_the_seed_adapter_config_and_override_it():
    import json

    from qwen_sft.train.args import ModelArguments, lora_config

    seed = json.loads((REPO / "configs/lora/adapter_config.json").read_text())
    assert lora_config(ModelArguments(peft_config_path=str(REPO / "configs/lora"))) == seed
    config = parse_flags(["--use_peft", "true", "--peft_config_path", str(REPO / "configs/lora"), "--lora_r", "4",
                          "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"])
    assert lora_config(config.model) == {**seed, "r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(ConfigError) as err:
        parse_flags(["--lora_r", "0", "--lora_dropout", "1.5"])
    assert "lora_r must be >= 1, got 0" in str(err.value) and "lora_dropout must be in [0, 1), got 1.5" in str(err.value)


def test_lora_fields_reach_the_model(tiny_model_dir):
    from transformers import AutoConfig

    from qwen_sft.train.args import ModelArguments
    from qwen_sft.train.model import apply_lora, load_model

    args = ModelArguments(model_name_or_path=str(tiny_model_dir), torch_dtype="float32", use_peft=True,
                          peft_config_path=str(REPO / "configs/lora"), lora_r=4, lora_target_modules=["q_proj"])
    model, _ = apply_lora(load_model(args, AutoConfig.from_pretrained(tiny_model_dir)), args, False)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "lora_A" in n}
    assert shapes and all(".q_proj." in n and s[0] == 4 for n, s in shapes.items())


def test_train_options_are_declared_once_and_their_help_is_the_field_help():
    from transformers import TrainingArguments

    from qwen_sft.train.args import DataArguments, ModelArguments, RunArguments, _parser

    names = [f.name for cls in (ModelArguments, DataArguments, RunArguments, TrainingArguments)
             for f in dataclasses.fields(cls) if f.init]
    assert len(names) == len(set(names)) and "config" not in names  # --config is train.py's own
    text = " ".join(_parser().format_help().split())
    for cls in (ModelArguments, DataArguments, RunArguments):
        for f in dataclasses.fields(cls):
            assert " ".join(f.metadata["help"].split()) in text, f.name
