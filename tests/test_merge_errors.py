"""Bad inputs and wrong merges: a clear message, exit code 1, no traceback, and no output directory.

    python -m pytest -q tests/test_merge_errors.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_sft.merge.cli import main
from qwen_sft.model.tiny import TinySpec, make_tiny_model

SPEC = TinySpec(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=24, experts=8, active=2, moe_intermediate=24)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("merge_err") / "base", SPEC)


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory) -> Path:
    """Attention + fused expert LoRA with random non-zero lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    out = tmp_path_factory.mktemp("merge_err") / "adapter"
    model.save_pretrained(out)
    return out


def copy_adapter(adapter_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(adapter_dir, tmp_path / "adapter"))


def fails(capsys, base: Path, adapter: Path, out: Path, *extra: str) -> str:
    """Run the merge, expect exit 1 with a one-shot message and no output; return the message."""
    rc = main(["--base_model_path", str(base), "--adapter_path", str(adapter), "--output_path", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 1
    assert "merge: error: " in err and "Traceback" not in err  # (the progress bar shares stderr)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dir left behind
    return err


def test_wrong_base_shapes(tiny_model_dir, adapter_dir, tmp_path, capsys):
    """The default tiny model has head_dim 16 and moe_intermediate 32: every target is reported at once."""
    err = fails(capsys, tiny_model_dir, adapter_dir, tmp_path / "out")
    assert "does not fit base" in err and "(wrong base?)" in err
    assert "model.layers.0.self_attn.q_proj: ΔW would be (96, 64) but the base weight is (64, 64)" in err
    assert "model.layers.1.mlp.experts: lora_A (32, 24) / lora_B (64, 32) fit neither gate_up_proj" in err


def test_wrong_architecture(base_dir, adapter_dir, tmp_path, capsys):
    adapter = copy_adapter(adapter_dir, tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["auto_mapping"] = {"base_model_class": "MixtralForCausalLM", "parent_library": "transformers"}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    err = fails(capsys, base_dir, adapter, tmp_path / "out")
    assert "the adapter was trained on a MixtralForCausalLM, the base is ['Qwen3MoeForCausalLM']" in err


@pytest.mark.parametrize("damage,message", [
    ("no_weights", "adapter_model.safetensors is missing: the adapter directory is incomplete"),
    ("no_config", "adapter_config.json is missing"),
    ("truncated", "cannot be read"),
    ("pickle_only", "has only adapter_model.bin, a pickle"),
    ("bad_json", "is not valid JSON"),
    ("missing_factor", "lora_B is missing from adapter_model.safetensors"),
    ("rank_mismatch", "adapter_config says r=8 but the saved factors have rank 4"),
])
def test_damaged_adapter(base_dir, adapter_dir, tmp_path, capsys, damage, message):
    from safetensors.torch import load_file, save_file

    adapter = copy_adapter(adapter_dir, tmp_path)
    weights, config = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    if damage == "no_weights":
        weights.unlink()
    elif damage == "no_config":
        config.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "pickle_only":
        weights.rename(adapter / "adapter_model.bin")
    elif damage == "bad_json":
        config.write_text(config.read_text()[:-5])
    elif damage == "missing_factor":
        sd = load_file(weights)
        del sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
        save_file(sd, weights)
    elif damage == "rank_mismatch":
        cfg = json.loads(config.read_text())
        config.write_text(json.dumps({**cfg, "r": 8}))
    assert message in fails(capsys, base_dir, adapter, tmp_path / "out")


def test_corrupted_base_shard(base_dir, adapter_dir, tmp_path, capsys):
    base = Path(shutil.copytree(base_dir, tmp_path / "base"))
    shard = base / "model.safetensors"
    shard.write_bytes(b"\x00" * 64)
    assert "model.safetensors cannot be read" in fails(capsys, base, adapter_dir, tmp_path / "out")


def test_existing_output_is_untouched_on_failure(base_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous merge")
    rc = main(["--base_model_path", str(base_dir), "--adapter_path", str(tmp_path / "nope"), "--output_path", str(out)])
    assert rc == 1 and "does not exist" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_output_inside_an_input_is_refused(base_dir, adapter_dir, tmp_path, capsys):
    rc = main(["--base_model_path", str(base_dir), "--adapter_path", str(adapter_dir),
               "--output_path", str(adapter_dir / "merged")])
    assert rc == 1 and "overlaps --adapter_path" in capsys.readouterr().err
    assert not (adapter_dir / "merged").exists()


@pytest.mark.parametrize("bug", ["no_op", "swapped_gate_up", "wrong_expert"])
def test_verification_catches_a_wrong_merge(base_dir, adapter_dir, tmp_path, capsys, monkeypatch, bug):
    """The bugs other tools shipped: an unmodified base, gate/up swapped, experts mixed up. None may pass."""
    from qwen_sft.merge import plan

    real = plan.Delta.compute

    def broken(self):
        if self.kind != "expert":
            return real(self)
        if bug == "no_op":
            return real(self) * 0
        if bug == "swapped_gate_up" and self.rows is not None:
            half = self.B.shape[1] // 2  # B is regrouped [E, out, r]
            other = slice(half, None) if self.rows.start == 0 else slice(0, half)
            return real(plan.Delta(**{**self.__dict__, "rows": other}))
        return real(plan.Delta(**{**self.__dict__, "expert": (self.expert + 1) % self.num_experts}))

    monkeypatch.setattr(plan.Delta, "compute", broken)
    err = fails(capsys, base_dir, adapter_dir, tmp_path / "out")
    assert "verification failed" in err and "nothing was written" in err


def test_entry_point_script(tmp_path):
    """merge_adapter.py is the seed's command; an error exits 1 with one line and no traceback."""
    proc = subprocess.run([sys.executable, str(REPO / "merge_adapter.py"), "--base_model_path", str(tmp_path / "b"),
                           "--train_adapters_path", str(tmp_path / "a"), "--output_path", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-2:] == [
        f"merge: error: --base_model_path {tmp_path / 'b'}: no such model directory (and not a Hub id owner/name)",
        f"adapter directory {tmp_path / 'a'} does not exist"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_qwen_sft_merge_verb_is_the_same_command(capsys):
    from qwen_sft.cli import main as qwen_sft

    with pytest.raises(SystemExit) as exc:
        qwen_sft(["merge", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--adapter_path ADAPTER_PATH, --train_adapters_path ADAPTER_PATH" in text and "--all_checkpoints" in text


def test_hub_id_not_in_cache_is_a_clear_error(adapter_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = fails(capsys, Path("no-such-org/no-such-model"), adapter_dir, tmp_path / "out")
    assert ("--base_model_path no-such-org/no-such-model: not downloaded in the cache " in err
            and "HF_HUB_OFFLINE=1 forbids downloading; download it first: hf download no-such-org/no-such-model" in err)


def test_trained_on_another_path_is_a_note_not_an_error(base_dir, adapter_dir, tmp_path, capsys):
    """A downloaded copy of the same model under another name is fine when every shape fits."""
    base = Path(shutil.copytree(base_dir, tmp_path / "my-local-copy"))
    rc = main(["--base_model_path", str(base), "--adapter_path", str(adapter_dir), "--output_path",
               str(tmp_path / "out"), "--no_verify"])
    assert rc == 0
    assert f"note: the adapter was trained on {str(base_dir)!r}, merging into {str(base)!r} (every shape matches)" \
        in capsys.readouterr().out


def test_float16_overflow_is_refused(base_dir, tmp_path, capsys):
    """ΔW beyond float16's range: bf16 keeps it, fp16 would write inf, so the fp16 merge stops."""
    from safetensors.torch import save_file

    adapter = tmp_path / "huge"
    adapter.mkdir()
    key = "base_model.model.model.layers.0.self_attn.o_proj"
    save_file({f"{key}.lora_A.weight": torch.full((1, 96), 300.0), f"{key}.lora_B.weight": torch.full((64, 1), 300.0)},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                                             "target_modules": ["o_proj"]}))
    err = fails(capsys, base_dir, adapter, tmp_path / "out", "--dtype", "float16", "--no_verify")
    assert "model.layers.0.self_attn.o_proj.weight: the merged weight overflows float16" in err


def test_adapter_peft_cannot_load_fails_verification_cleanly(base_dir, adapter_dir, tmp_path, capsys):
    """peft refuses lora_dropout on target_parameters; the merge itself would work, the check cannot run."""
    adapter = copy_adapter(adapter_dir, tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "lora_dropout": 0.1}))
    err = fails(capsys, base_dir, adapter, tmp_path / "out")
    assert "peft cannot load" in err and "--no_verify" in err


def test_non_finite_merged_weight_is_refused_without_verify(base_dir, tmp_path, capsys):
    """Finite factors whose product overflows float32: --no_verify skips the logits, never the finiteness check."""
    from safetensors.torch import save_file

    adapter = tmp_path / "inf"
    adapter.mkdir()
    key = "base_model.model.model.layers.0.self_attn.o_proj"
    save_file({f"{key}.lora_A.weight": torch.full((1, 96), 1e20), f"{key}.lora_B.weight": torch.full((64, 1), 1e20)},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                                             "target_modules": ["o_proj"]}))
    err = fails(capsys, base_dir, adapter, tmp_path / "out", "--no_verify")
    assert "model.layers.0.self_attn.o_proj.weight: the merged weight holds NaN or inf" in err


def test_expert_run_adapter_without_expert_tensors_is_refused(base_dir, adapter_dir, tmp_path, capsys):
    """The kill-during-save adapter: attention LoRA on disk, expert factors never added, the run's record says
    experts were trained. Merging it would publish a model without the expert fine-tune; it is refused."""
    from safetensors.torch import load_file, save_file

    adapter = copy_adapter(adapter_dir, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".mlp.experts." not in k}, adapter / "adapter_model.safetensors")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "target_parameters": None}))
    (adapter / "trainable_params.json").write_text(json.dumps({"experts": {"trainable": 1536, "total": 50000}}))
    err = fails(capsys, base_dir, adapter, tmp_path / "out", "--no_verify")
    assert "adapter_model.safetensors holds no expert tensors" in err and "experts: 1,536 trainable" in err


def test_output_path_that_is_a_file_is_refused(base_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"precious")
    rc = main(["--base_model_path", str(base_dir), "--adapter_path", str(adapter_dir), "--output_path", str(out),
               "--no_verify"])
    assert rc == 1 and f"--output_path {out} is an existing file" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


def test_disk_full_is_one_line_and_leaves_no_temporary_copy(base_dir, adapter_dir, tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    err = fails(capsys, base_dir, adapter_dir, tmp_path / "out", "--no_verify")
    assert "merge: error: cannot write the merged model: No space left on device (" in err
    line = next(x for x in err.splitlines() if "merge: error" in x)  # (the progress bar shares stderr)
    assert err.count("merge: error") == 1 and line.endswith("model.safetensors); nothing was written")


def test_leftover_of_a_killed_merge_is_removed(base_dir, adapter_dir, tmp_path, capsys):
    """kill -9 leaves .OUT.*.tmp (a full model copy); the next merge into OUT removes it once its process is gone."""
    from qwen_sft.merge.cli import OWNER_FILE

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / ".out.abc123.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    (leftover / OWNER_FILE).write_text(str(dead.pid))
    alive = tmp_path / ".out.def456.tmp"  # a merge still running (this process) is left alone
    alive.mkdir()
    (alive / OWNER_FILE).write_text(str(os.getpid()))
    rc = main(["--base_model_path", str(base_dir), "--adapter_path", str(adapter_dir), "--output_path",
               str(tmp_path / "out"), "--no_verify"])
    assert rc == 0 and not leftover.exists() and alive.exists()
    assert f"removed {leftover}, left by an interrupted merge (process {dead.pid})" in capsys.readouterr().out
    assert not (tmp_path / "out" / OWNER_FILE).exists()


_SIGTERM_DRIVER = """
import os, signal, sys
import qwen_sft.merge.stream as stream
def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
stream.merge_shards = terminated
from qwen_sft.merge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_mid_merge_removes_the_temporary_copy(base_dir, adapter_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_DRIVER, "--base_model_path", str(base_dir),
                           "--adapter_path", str(adapter_dir), "--output_path", str(out), "--no_verify"],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 130 and "merge: interrupted; no output written" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
