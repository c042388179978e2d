"""bench/moe_gpu.py runs on CPU with tiny dimensions and writes both variants' figures.

    python -m pytest -q -m slow tests/test_moe_bench.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark's smoke test: the slow tier (tests/README.md)
REPO = Path(__file__).resolve().parent.parent


def test_bench_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    # Run exactly as documented (a script from the repo root), which also checks the script's imports.
    proc = subprocess.run([sys.executable, "bench/moe_gpu.py", "--tiny", "--device", "cpu", "--seqs", "32",
                           "--steps", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {f"{v}/L{layers}/seq32" for v in ("engine", "stock") for layers in (1, 2)}
    for run in res["runs"].values():
        assert run["step_s"] > 0 and run["tokens_per_s"] > 0 and run["peak_bytes"] is None  # no CUDA here
        assert math.isfinite(run["first_loss"])
    runs = res["runs"]
    # Same random base, LoRA B = 0 at start: the engine's NF4 experts compute the stock model's function up
    # to 4-bit rounding, so the first losses agree closely (and are not identical: the experts are quantized).
    for layers in (1, 2):
        e, s = runs[f"engine/L{layers}/seq32"]["first_loss"], runs[f"stock/L{layers}/seq32"]["first_loss"]
        assert abs(e - s) < 0.05
    # Trainable counts: engine (q/k/v/o LoRA + per-expert factors) == stock peft with target_parameters.
    assert runs["engine/L2/seq32"]["trainable"] == runs["stock/L2/seq32"]["trainable"]
    assert "speedup_measured" in res["extrapolated"]["32"]
    assert "tokens/s engine/stock" in proc.stdout


def test_bench_experts_only_mode(tmp_path):
    out = tmp_path / "experts.json"
    proc = subprocess.run([sys.executable, "bench/moe_gpu.py", "--tiny", "--device", "cpu", "--experts-only", "8",
                           "--tokens", "32", "--steps", "1", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["experts_only"]
    # Same trainable factors (peft's layout), and NF4 + scales hold the experts in about a quarter of bf16's bytes
    # (0.28 at this toy size, where the per-tensor constants still show; 0.258 at the real width).
    assert res["engine"]["trainable"] == res["stock"]["trainable"] == 8 * 8 * ((64 + 64) + (32 + 64))  # E*r*((H+2I)+(I+H))
    assert 0.25 < res["frozen_bytes_ratio"] < 0.3
    assert res["speedup"] > 0
