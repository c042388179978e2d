"""Training under faults: complete-or-refused adapters and checkpoints, resume past a broken checkpoint, no
secret on disk, same seed → same adapter. Crafted directories for the fast checks; real tiny runs for the rest.

    python -m pytest -q tests/test_train_faults.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import write_conversations

from qwen_sft.checkpoint import MARKER, check_adapter_complete, checkpoint_problems, mark_complete
from qwen_sft.train.run import resolve_resume

REPO = Path(__file__).resolve().parent.parent
ATTN = "base_model.model.model.layers.0.self_attn.q_proj"
EXPERTS = "base_model.model.model.layers.0.mlp.experts"


def _adapter(d: Path, experts: bool, record: bool = True, complete: bool = True) -> Path:
    """A small adapter directory as a qwen-sft run writes it (engine layout), optionally without the expert half."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                       "target_modules": ["q_proj"]}))
    tensors = {f"{ATTN}.lora_A.weight": torch.ones(2, 8), f"{ATTN}.lora_B.weight": torch.zeros(8, 2)}
    if experts:
        tensors |= {f"{EXPERTS}.base_layer.lora_A.weight": torch.ones(8, 8),
                    f"{EXPERTS}.base_layer.lora_B.weight": torch.ones(8, 8)}
    save_file(tensors, d / "adapter_model.safetensors")
    if record:
        (d / "train_config.yaml").write_text("use_peft: true\n")
        (d / "trainable_params.json").write_text(json.dumps({"experts": {"trainable": 128, "total": 4096}}))
    if complete:
        mark_complete(d)
    return d


def _checkpoint(d: Path, experts: bool = True) -> Path:
    _adapter(d, experts, complete=False)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": int(d.name.split("-")[1])}))
    mark_complete(d)
    return d


def test_complete_adapter_passes_and_each_defect_is_named(tmp_path):
    check_adapter_complete(_adapter(tmp_path / "good", experts=True))
    # The attack's case: attention LoRA saved, the expert factors never added, and it still looks complete.
    with pytest.raises(ValueError, match=r"trained expert LoRA \(.*trainable_params.json \(experts: 128 trainable\)"
                                         r"\) but adapter_model.safetensors holds no expert tensors"):
        check_adapter_complete(_adapter(tmp_path / "no_experts", experts=False))
    with pytest.raises(ValueError, match=f"no completion marker {MARKER}"):
        check_adapter_complete(_adapter(tmp_path / "unmarked", experts=True, complete=False))
    truncated = _adapter(tmp_path / "truncated", experts=True)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is truncated: \d+ bytes on disk, its header "
                                         r"describes \d+.*adapter_model.safetensors is \d+ bytes, qwen_sft_complete"):
        check_adapter_complete(truncated)
    # An adapter from another tool (no run record, no marker) is judged by its files alone.
    check_adapter_complete(_adapter(tmp_path / "foreign", experts=False, record=False, complete=False))


@pytest.mark.parametrize("damage,reason", [
    ("trainer_state", "trainer_state.json is missing"),
    ("truncate", "adapter_model.safetensors is truncated"),
    ("experts", "holds no expert tensors"),
    ("marker", "no completion marker"),
])
def test_auto_resume_skips_an_incomplete_last_checkpoint(tmp_path, capsys, damage, reason):
    good = _checkpoint(tmp_path / "checkpoint-2")
    bad = _checkpoint(tmp_path / "checkpoint-10", experts=damage != "experts")
    if damage == "trainer_state":
        (bad / "trainer_state.json").unlink()
    elif damage == "truncate":
        w = bad / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "marker":
        (bad / MARKER).unlink()
    assert checkpoint_problems(good) == []
    assert resolve_resume(SimpleNamespace(resume_from_checkpoint="auto", output_dir=str(tmp_path))) == str(good)
    out = capsys.readouterr().out
    assert f"skipping incomplete {bad}: " in out and reason in out
    assert f"resume_from_checkpoint=auto → {good}" in out
    with pytest.raises(ValueError, match=f"resume_from_checkpoint='{bad}' is incomplete: .*{reason}"):
        resolve_resume(SimpleNamespace(resume_from_checkpoint=str(bad), output_dir=str(tmp_path)))


# --- real tiny runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, offline_tok) -> Path:
    """16 short conversations, tokenized with assistant-only labels."""
    return write_conversations(tmp_path_factory.mktemp("data") / "train.jsonl", offline_tok, 16)


def _config(path: Path, model_dir: Path, data: Path, **extra: object) -> Path:
    """Expert-engine LoRA (attention + experts) on the tiny model; lora_dropout 0.1 from the shipped config."""
    import yaml

    values = {"model_name_or_path": str(model_dir), "torch_dtype": "float32", "data_path": str(data),
              "data_cache_dir": str(path.parent / "cache"), "model_max_length": 256, "use_cpu": True,
              "use_peft": True, "peft_config_path": str(REPO / "configs/lora/adapter_config.json"),
              "per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_steps": 2, "logging_steps": 1,
              "save_strategy": "no", "report_to": "none", "seed": 7, "gradient_checkpointing": False,
              "loss_curve": False, **extra}
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def _weights(out: Path) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_same_seed_same_adapter(tiny_model_dir, tokenized, tmp_path):
    """Two fresh runs, same config and seed: byte-identical adapters (attention lora_A init included)."""
    from qwen_sft.train.args import parse_yaml
    from qwen_sft.train.run import run

    cfg = _config(tmp_path / "seed.yaml", tiny_model_dir, tokenized, max_steps=1)
    run(parse_yaml(str(cfg), [f"output_dir={tmp_path / 'a'}"]))
    run(parse_yaml(str(cfg), [f"output_dir={tmp_path / 'b'}"]))
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    check_adapter_complete(tmp_path / "a")  # the final adapter of a finished run carries its marker


# Runs `qwen-sft train` until the named checkpoint's peft part is on disk, then kill -9 itself: after peft's
# save_pretrained, before the expert factors (the attack's window). Patched in the child only, no hook in our code.
_KILL_DRIVER = """
import os, signal, sys
from pathlib import Path
import peft
original = peft.PeftModel.save_pretrained
def save_then_die(self, save_directory, *args, **kwargs):
    original(self, save_directory, *args, **kwargs)
    if Path(save_directory).name == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
peft.PeftModel.save_pretrained = save_then_die
from qwen_sft.train.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_kill_during_checkpoint_save_then_merge_refuses_and_resume_matches(tiny_model_dir, tokenized, tmp_path,
                                                                           capsys):
    from qwen_sft.merge.cli import main as merge_main
    from qwen_sft.train.args import parse_yaml
    from qwen_sft.train.run import run

    cfg = _config(tmp_path / "kill.yaml", tiny_model_dir, tokenized, max_steps=2, save_strategy="steps", save_steps=1)
    straight = tmp_path / "straight"
    run(parse_yaml(str(cfg), [f"output_dir={straight}"]))
    crashed = tmp_path / "crashed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _KILL_DRIVER, "checkpoint-2", str(cfg), f"output_dir={crashed}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    broken = crashed / "checkpoint-2"
    assert (broken / "adapter_model.safetensors").is_file()  # peft's half is there and looks like an adapter
    # Merge refuses it, naming what is missing.
    rc = merge_main(["--base_model_path", str(tiny_model_dir), "--adapter_path", str(broken),
                     "--output_path", str(tmp_path / "merged"), "--no_verify"])
    err = capsys.readouterr().err
    assert rc == 1 and "holds no expert tensors" in err and "no completion marker" in err, err
    assert not (tmp_path / "merged").exists()
    # Resume skips it, says so, and ends exactly where the uninterrupted run ended.
    metrics = run(parse_yaml(str(cfg), [f"output_dir={crashed}", "resume_from_checkpoint=auto"]))
    out = capsys.readouterr().out
    assert f"skipping incomplete {broken}" in out and f"→ {crashed / 'checkpoint-1'}" in out
    assert metrics["global_step"] == 2
    assert _weights(crashed) == _weights(straight)
    check_adapter_complete(broken)  # re-saved, complete this time


@pytest.mark.slow
def test_disk_full_at_the_final_save_is_one_line(tiny_model_dir, tokenized, tmp_path, capsys, monkeypatch):
    import errno

    from qwen_sft.train.cli import main
    from qwen_sft.train.trainer import SFTTrainer

    def full(self, output_dir=None, state_dict=None):
        raise OSError(errno.ENOSPC, "No space left on device", f"{output_dir}/adapter_model.safetensors")

    monkeypatch.setattr(SFTTrainer, "_save", full)
    out = tmp_path / "out"
    assert main([str(_config(tmp_path / "full.yaml", tiny_model_dir, tokenized, max_steps=1)), f"output_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert f"qwen-sft train: saving the final model to {out} failed: No space left on device ({out}/adapter_model" \
           f".safetensors); the checkpoints are unaffected\n" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        check_adapter_complete(out)


@pytest.mark.slow
def test_no_secret_in_any_file_or_on_the_console(tiny_model_dir, tokenized, tmp_path):
    """hub_token as a flag, WANDB_API_KEY / HF_TOKEN in the environment: none of the values anywhere, in any byte."""
    secrets = {"flag": "hf_FLAGsecret0123456789", "WANDB_API_KEY": "wandbSECRETkey0123456789",
               "HF_TOKEN": "hf_ENVsecret0123456789"}
    out = tmp_path / "run"
    flags = ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(tokenized), "--output_dir", str(out),
             "--data_cache_dir", str(tmp_path / "cache"), "--torch_dtype", "float32", "--use_cpu", "true",
             "--use_peft", "true", "--peft_config_path", str(REPO / "configs/lora/adapter_config.json"),
             "--max_steps", "1", "--save_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none",
             "--hub_token", secrets["flag"]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_API_KEY": secrets["WANDB_API_KEY"],
           "HF_TOKEN": secrets["HF_TOKEN"], "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *flags], env=env, cwd=tmp_path,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint-1" / "training_args.bin").is_file() and (out / "training_args.bin").is_file()
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".jsonl" and "cache" not in p.parts]
    assert len(written) > 20
    for name, value in secrets.items():
        leaks = [str(p) for p in written if value.encode() in p.read_bytes()]
        assert not leaks, f"{name} written to {leaks}"
        assert value.encode() not in proc.stdout + proc.stderr, f"{name} printed"
    assert "hub_token = <redacted>  (flag)" in (out / "train_config.yaml").read_text()
    # The pickled TrainingArguments still load (weights_only=False: our own file, written by this test's run).
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.output_dir == str(out)


def test_yaml_secret_is_kept_out_of_train_config(tiny_model_dir, tokenized, tmp_path):
    """A token given as a config key and as an override never reaches train_config.yaml (body or comments)."""
    from transformers import AutoTokenizer

    from qwen_sft.train.args import parse_yaml
    from qwen_sft.train.run import write_artifacts

    cfg = _config(tmp_path / "secret.yaml", tiny_model_dir, tokenized, hub_token="hf_CONFIGsecret0123")
    config = parse_yaml(str(cfg), [f"output_dir={tmp_path / 'out'}", "hub_model_id=me/x"])
    write_artifacts(tmp_path / "out", config, {}, None, AutoTokenizer.from_pretrained(tiny_model_dir))
    text = (tmp_path / "out" / "train_config.yaml").read_text()
    assert "hf_CONFIGsecret0123" not in text and "HUB_TOKEN" not in text
    assert f"# hub_token = <redacted>  (config {cfg})" in text and "hub_model_id: me/x" in text
