"""The LoRA recipe exactly as shipped: scripts/sft_qwencoder_with_lora.sh (LoRA + expert engine + its DeepSpeed
config) trains the tiny Qwen3-MoE under torchrun with two processes on CPU (gloo).

    python -m pytest -q -m slow tests/test_train_recipes_slow.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import free_port as _free_port
from helpers import run_group as _run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_lora_script_trains_under_torchrun_with_its_deepspeed_config(tiny_model_dir, tmp_path):
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    data = tmp_path / "train.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for i in range(16):
            ids = [151644, 872, 198, *range(1000 + i, 1010 + i), 151645]
            fh.write(json.dumps({"input_ids": ids, "label": [-100] * 3 + ids[3:]}) + "\n")
    out = tmp_path / "out"
    env = {**os.environ, "GPUS_PER_NODE": "2", "GLOBAL_BATCH": "8", "MICRO_BATCH": "2", "MASTER_PORT": _free_port(),
           "PYTHON": sys.executable, "HF_HOME": str(tmp_path / "hf"), "QWEN_SFT_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    env.pop("DRY_RUN", None)
    # The script's own flags, DeepSpeed config included; only what a CPU and a 2-step test need is added.
    code, text = _run(["bash", str(REPO / "scripts/sft_qwencoder_with_lora.sh"), str(data), str(tiny_model_dir),
                       str(out), "--max_steps", "2", "--bf16", "false", "--torch_dtype", "float32", "--warmup_steps",
                       "0", "--learning_rate", "1e-2", "--save_strategy", "no", "--report_to", "none",
                       "--model_max_length", "64", "--data_cache_dir", str(tmp_path / "cache")],
                      env, tmp_path, timeout=600)
    assert code == 0, text[-6000:]
    assert "2 processes x micro batch 2 x accu 2 = 8" in text
    assert "deepspeed = 'configs/zero2.json'  (flag)" in text and "peft_config_path = 'configs/lora'" in text
    assert "expert engine: 2 layers" in text
    losses = [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert len(losses) == 2
    adapter = load_file(out / "adapter_model.safetensors")
    expert_b = [k for k in adapter if ".mlp.experts." in k and "lora_B" in k]
    attention_b = [k for k in adapter if ".self_attn." in k and "lora_B" in k]
    assert expert_b and attention_b
    # lora_B starts at zero: a non-zero B in every layer means both halves of the adapter trained and were saved.
    assert all(adapter[k].abs().sum() > 0 for k in expert_b + attention_b)
