"""The READMEs cannot drift from the code: every shell command they show is run here on CPU.

The real model id ``Qwen/Qwen3-Coder-30B-A3B-Instruct`` resolves, offline, to a tiny Qwen3-MoE placed in a
Hugging Face cache under that name, so the commands run exactly as printed. Commands that cannot run here
(package installs, a browser UI, the full test suite itself) are listed in SKIP with the reason; a command
that is neither run nor listed fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port as _free_port

REPO = Path(__file__).resolve().parent.parent
READMES = [REPO / "README.md", REPO / "README.ko.md"]
MODEL_ID = "Qwen/Qwen3-Coder-30B-A3B-Instruct"

SKIP = {
    "make demo": "has its own test (tests/test_demo.py)",
    "make test": "this is the test suite itself",
    "make install": "CI runs it before the tests",
    "source .venv/bin/activate": "the test already runs inside the venv",
    "pip install -r requirements.txt": "installs packages",
    'pip install "bitsandbytes>=0.45"': "installs packages",
    "tensorboard --logdir ../../checkpoints/qwen3_30b_qlora": "serves a web UI until stopped",
    "rm -rf ~/.cache/huggingface": "would delete the user's global cache",
}
# Scripts are run with DRY_RUN=1: config, flags and data are validated, no model is trained.
DRY = re.compile(r"^(\S+=\S+ )*bash scripts/")


def commands(path: Path) -> list[str]:
    """Shell commands of the ```bash blocks: comments dropped, backslash continuations joined."""
    text = path.read_text(encoding="utf-8")
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip() if not line.strip().startswith("#") else ""
            if line:
                out.append(re.sub(r"\s+", " ", line))
    return out


def test_readmes_start_with_the_two_commands():
    for path in READMES:
        first = commands(path)[:2]
        assert first == ["make demo", "make test"], f"{path.name} must open with make demo / make test, found {first}"


def test_both_readmes_show_the_same_commands():
    en, ko = (commands(p) for p in READMES)
    assert en == ko, f"README.md and README.ko.md differ: {set(en) ^ set(ko)}"


def _fake_hub(hf_home: Path, model_dir: Path) -> None:
    repo = hf_home / "hub" / ("models--" + MODEL_ID.replace("/", "--"))
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    shutil.copytree(model_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, tiny_model_dir):
    # ../../checkpoints and ../shared in the commands must land inside tmp_path.
    work = tmp_path / "a" / "b" / "qwen-sft"
    top_level = {".venv", ".git", ".cache", "processed", "raw", "raw_converted", "checkpoints", "demo_out"}

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n in {"__pycache__", ".pytest_cache", ".ruff_cache"} or n.endswith(".egg-info")}
        return skipped | (top_level & set(names) if Path(directory) == REPO else set())

    shutil.copytree(REPO, work, ignore=ignore)
    shared = REPO.parent / "shared"
    if shared.exists():
        (work.parent / "shared").symlink_to(shared)
    hf_home = work / ".cache" / "huggingface"
    _fake_hub(hf_home, tiny_model_dir)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "QWEN_SFT_CACHE": str(REPO / ".cache" / "qwen_sft"), "GPUS_PER_NODE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(work)}
    env.pop("CI", None)
    seen = []
    for cmd in dict.fromkeys(c for p in READMES for c in commands(p)):
        if cmd in SKIP:
            continue
        if "merge_adapter.py" in cmd and not (work.parent.parent / "checkpoints" / "qwen3_30b_qlora").exists():
            _train_tiny_adapter(work, env)
        run_env = {**env, "DRY_RUN": "1", "MASTER_PORT": str(_free_port())} if DRY.match(cmd) else env
        proc = subprocess.run(["bash", "-c", f"set -e; {cmd}"], cwd=work, env=run_env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"README command failed ({proc.returncode}): {cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        seen.append(cmd)
    assert len(seen) >= 20, f"only {len(seen)} README commands ran"
    assert (work / "processed" / "sft_train.jsonl").exists()
    assert (work.parent.parent / "checkpoints" / "merged_model" / "config.json").exists()


def _train_tiny_adapter(work: Path, env: dict) -> None:
    """The merge command needs an adapter at ../../checkpoints/qwen3_30b_qlora: train one for 2 steps."""
    out = work.parent.parent / "checkpoints" / "qwen3_30b_qlora"
    cmd = [sys.executable, "-m", "qwen_sft.cli", "train", "configs/train/qlora_tiny_cpu.yaml",
           f"model_name_or_path={MODEL_ID}", "data_path=processed/sft_train.jsonl", "max_steps=2",
           f"output_dir={out}", "report_to=none"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
