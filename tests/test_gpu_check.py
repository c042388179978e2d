"""bench/gpu_check.py at tiny size on the CPU: both variants train, the trace runs, the engine equals the reference.

    python -m pytest -q tests/test_gpu_check.py -m slow
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu_check.json"
    assert module.main(["--tiny", "--device", "cpu", "--steps", "2", "--seqs", "48", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["runs"]) == {"engine", "stock"}
    for variant, runs in figures["runs"].items():
        losses = runs["48"]["losses"]
        assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses), variant
        assert runs["48"]["tokens_per_s"] > 0
    assert figures["trace"]["48"]["peak_bytes"] > 100 * 2**20  # vocabulary-sized weights: a real trace
    e = figures["engine_vs_reference"]
    assert e["output_rel_err"] < 1e-5 and e["input_grad_rel_err"] < 1e-5  # fp32 on the CPU
    text = capsys.readouterr().out
    assert "engine/stock tokens/s" in text and "engine vs transformers experts on the same weights" in text
