"""`make demo` end to end with a reduced step count: every stage runs as the user's command and leaves
its artifacts. Whether the merged model reproduces the trained answer is reported by the demo (and
recorded in demo_result.json) but not asserted here: a 2-step run does not memorise; the full run
(25 steps, `make demo`) does — measured: merged model answers 'def' as trained, 139 s on 2 busy cores.

    python -m pytest -q -m slow tests/test_demo.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_demo_artifacts(tmp_path: Path) -> None:
    out = tmp_path / "demo_out"
    env = {**os.environ, "QWEN_SFT_DEMO_STEPS": "2"}
    proc = subprocess.run([sys.executable, "-m", "qwen_sft.demo", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # Each stage's command is printed before it runs.
    for cmd in ("make-tiny-model", "convert_to_chatml.py examples/raw --tokenize", "train.py", "merge_adapter.py"):
        assert cmd in proc.stdout, cmd

    stats = json.loads((out / "processed" / "sft_train.jsonl.stats.json").read_text())
    assert stats
    assert (out / "processed" / "sft_train.jsonl.lengths.png").stat().st_size > 0
    assert (out / "qlora-adapter" / "loss_curve.png").stat().st_size > 0
    assert (out / "qlora-adapter" / "adapter_config.json").exists()
    assert (out / "qlora-adapter" / "adapter_model.safetensors").exists()
    assert (out / "merged-model" / "config.json").exists()
    assert list((out / "merged-model").glob("*.safetensors"))
    result = json.loads((out / "demo_result.json").read_text())
    assert result["steps"] == 2 and result["trained_answer"] == "def"
    assert isinstance(result["merged_answer"], str)


def test_demo_stage_failure_exits_nonzero(monkeypatch, capsys) -> None:
    """A failing stage raises with the stage's name and command; main turns it into exit 1 and a message."""
    from qwen_sft import demo

    with pytest.raises(demo.StageError, match=r"stage 'x' failed \(exit 3\)"):
        demo._run("x", [sys.executable, "-c", "import sys; sys.exit(3)"])

    def boom(out, steps):
        raise demo.StageError("stage '3/5 QLoRA training' failed (exit 1)")

    monkeypatch.setattr(demo, "run_demo", boom)
    assert demo.main(["--steps", "1"]) == 1
    assert "demo failed: stage '3/5 QLoRA training' failed" in capsys.readouterr().err
