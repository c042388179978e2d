"""Merge takes how the adapter was trained from the run's own train_config.yaml, says so, and falls back to the
other config files (with a message) only when there is none.

    python -m pytest -q tests/test_merge_trained_with.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qwen_sft.merge.adapter import detect_quantized_training
from qwen_sft.merge.cli import trained_with
from qwen_sft.merge.trained_with import TrainConfigError, read_trained_with


def _merge_view(adapter_dir, root, capsys):
    adapter = SimpleNamespace(quantized_training=detect_quantized_training(adapter_dir, root))  # read_adapter's guess
    trained_with(adapter, adapter_dir, root, say=True)
    return adapter.quantized_training, capsys.readouterr().out.strip()


def test_the_runs_train_config_wins_over_other_config_files(tmp_path, capsys):
    # Another tool's file says 4-bit; the run's own effective config says it trained a 16-bit LoRA.
    (tmp_path / "hparams.yaml").write_text("quantization:\n  load_in_4bit: true\n")
    assert detect_quantized_training(tmp_path) == "load_in_4bit=true in hparams.yaml"
    (tmp_path / "train_config.yaml").write_text("model_name_or_path: Qwen/Qwen3-Coder-30B-A3B-Instruct\n"
                                                "use_peft: true\nuse_qlora: false\nlora_r: 8\nlora_alpha: 32\n")
    quantized, said = _merge_view(tmp_path, tmp_path, capsys)
    assert quantized is None
    assert said == (f"training settings from {tmp_path / 'train_config.yaml'}: 16-bit base, base "
                    "'Qwen/Qwen3-Coder-30B-A3B-Instruct'; lora_r=8, lora_alpha=32")


def test_qlora_from_train_config_and_checkpoints_read_the_runs(tmp_path, capsys):
    (tmp_path / "train_config.yaml").write_text("use_qlora: true\nbnb_4bit_quant_type: nf4\n")
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    quantized, said = _merge_view(ckpt, tmp_path, capsys)
    assert quantized == "use_qlora=true in train_config.yaml"  # the wording of the merge's QLoRA note
    assert said == f"training settings from {tmp_path / 'train_config.yaml'}: QLoRA (nf4)"


def test_without_train_config_the_fallback_says_so(tmp_path, capsys):
    assert read_trained_with(tmp_path).source is None
    quantized, said = _merge_view(tmp_path, tmp_path, capsys)
    assert quantized is None and said.startswith("no train_config.yaml beside the adapter (not written by qwen-sft "
                                                 "train?): how it was trained is inferred from adapter_config.json")
    (tmp_path / "run.json").write_text('{"mode": "qlora"}')
    quantized, said = _merge_view(tmp_path, tmp_path, capsys)
    assert quantized == "mode=qlora in run.json" and said.endswith(": mode=qlora in run.json")


def test_unreadable_train_config_is_an_error_naming_it(tmp_path):
    (tmp_path / "train_config.yaml").write_text("use_qlora: [unclosed\n")
    with pytest.raises(TrainConfigError, match="train_config.yaml: cannot read the run's training settings"):
        read_trained_with(tmp_path)
