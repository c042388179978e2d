"""Slow CPU tests of training: resume equivalence, DDP and DeepSpeed ZeRO-3 under torchrun (gloo), and the
three shell scripts in dry-run mode. Run by `make test`; skipped by `make test-fast`.

    python -m pytest -q -m slow tests/test_train_slow.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port as _free_port
from helpers import run_group as _run
from helpers import write_conversations

from qwen_sft.train.args import parse_yaml
from qwen_sft.train.run import run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, offline_tok) -> Path:
    """64 short two-turn conversations, tokenized with assistant-only labels."""
    return write_conversations(tmp_path_factory.mktemp("data") / "train.jsonl", offline_tok, 64, two_turn=True)


def _yaml(path: Path, model_dir: Path, data: Path, **extra: object) -> Path:
    import yaml

    values = {"model_name_or_path": str(model_dir), "torch_dtype": "float32", "data_path": str(data),
              "data_cache_dir": str(path.parent / "cache"), "model_max_length": 512, "use_cpu": True,
              "per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_steps": 3, "logging_steps": 1,
              "save_strategy": "no", "report_to": "none", "seed": 42, **extra}
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def _losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def test_resume_continues_exactly(tiny_model_dir, tokenized, tmp_path):
    """6 steps straight == the first 3 of them (checkpoint-3) + resume for 3: same losses and adapter weights.
    LoRA with dropout and a shuffled sampler, so RNG state and data order must both come back."""
    from safetensors.torch import load_file

    cfg = _yaml(tmp_path / "resume.yaml", tiny_model_dir, tokenized, use_peft=True, max_steps=6,
                peft_config_path=str(REPO / "configs/lora/adapter_config.json"), save_strategy="steps", save_steps=3)
    straight = tmp_path / "straight"
    run(parse_yaml(str(cfg), [f"output_dir={straight}"]))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    metrics = run(parse_yaml(str(cfg), [f"output_dir={resumed}", "resume_from_checkpoint=auto"]))
    assert metrics["global_step"] == 6
    a, b = _losses(straight), _losses(resumed)
    # The resumed history holds steps 1-3 (from checkpoint-3's trainer_state) and the 3 steps it trained.
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-6, abs=1e-7)
    wa, wb = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7, msg=k)
    start = load_file(straight / "checkpoint-3" / "adapter_model.safetensors")
    assert any(not torch.equal(start[k], wa[k]) for k in wa), "the last 3 steps changed nothing"


def _torchrun(cfg: Path, out: Path, *overrides: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           "-m", "qwen_sft.cli", "train", str(cfg), f"output_dir={out}", *overrides]
    code, text = _run(cmd, env, REPO, timeout=420)
    assert code == 0, text[-6000:]
    return text


@pytest.fixture(scope="module")
def single_process_curve(tiny_model_dir, tokenized, tmp_path_factory) -> tuple[Path, list[float]]:
    """One process, micro-batch 4: the reference for two processes × micro-batch 2 (same global batch)."""
    work = tmp_path_factory.mktemp("dist")
    cfg = _yaml(work / "dist.yaml", tiny_model_dir, tokenized, train_sampling_strategy="sequential")
    out = work / "single"
    run(parse_yaml(str(cfg), [f"output_dir={out}", "per_device_train_batch_size=4"]))
    return cfg, _losses(out)


def test_ddp_two_processes_match_one(single_process_curve, tmp_path):
    cfg, reference = single_process_curve
    _torchrun(cfg, tmp_path / "ddp")
    assert _losses(tmp_path / "ddp") == pytest.approx(reference, rel=2e-5)


def test_zero3_two_processes_match_one(single_process_curve, tmp_path):
    pytest.importorskip("deepspeed")
    shipped = json.loads((REPO / "configs/default_offload_opt_param.json").read_text())
    zero = shipped["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "scheduler" not in shipped and zero["offload_optimizer"]["device"] == "cpu"
    # Same file minus CPU offload and DeepSpeed's CPU Adam (a C++ build of minutes on a CI box).
    del shipped["optimizer"], zero["offload_optimizer"], zero["offload_param"]
    ds_cfg = tmp_path / "zero3.json"
    ds_cfg.write_text(json.dumps(shipped))
    cfg, reference = single_process_curve
    printed = _torchrun(cfg, tmp_path / "z3", f"deepspeed={ds_cfg}")
    assert "ZeRO-3: MoE blocks ['Qwen3MoeSparseMoeBlock'] are leaf modules" in printed
    assert _losses(tmp_path / "z3") == pytest.approx(reference, rel=2e-5)
    assert (tmp_path / "z3" / "model.safetensors").exists()  # 16-bit weights gathered on save


@pytest.mark.parametrize("script", ["qlora_qwen3_30b.sh", "sft_qwencoder.sh", "sft_qwencoder_with_lora.sh"])
def test_scripts_parse_their_flags(script, tiny_model_dir, tokenized, tmp_path):
    """DRY_RUN=1 goes through torchrun, train.py's parser, config and data validation, and stops before the model."""
    if script != "qlora_qwen3_30b.sh":
        pytest.importorskip("deepspeed")
    env = {**os.environ, "DRY_RUN": "1", "GPUS_PER_NODE": "1", "MASTER_PORT": _free_port(), "MODEL": str(tiny_model_dir),
           "QWEN_SFT_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"), "PYTHON": sys.executable}
    out = tmp_path / "out"
    args = [str(tokenized), str(out), "run1"] if script.startswith("qlora") else [str(tokenized), str(tiny_model_dir),
                                                                                 str(out)]
    code, text = _run(["bash", str(REPO / "scripts" / script), *args, "--use_cpu", "true",
                       "--data_cache_dir", str(tmp_path / "cache")], env, tmp_path, timeout=300)
    assert code == 0, text[-4000:]
    assert "dry run: config and data valid" in text
    if script.startswith("qlora"):
        for expected in ("gradient_accumulation_steps = 16", "optim = 'paged_adamw_8bit'", "learning_rate = 0.0001",
                         "model_max_length = 2048", "save_total_limit = 3", "wandb: "):
            assert expected in text, expected
    else:
        ds = "zero2.json" if "lora" in script else "default_offload_opt_param.json"  # the engine needs ZeRO-2
        for expected in ("1 processes x micro batch 4 x accu 256 = 1024", "learning_rate = 5e-05",
                         "model_max_length = 1280", f"deepspeed = 'configs/{ds}'"):
            assert expected in text, expected
