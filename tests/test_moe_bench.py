"""bench/moe_gpu.py runs on CPU with tiny dimensions and writes both variants' figures.

    python -m pytest -q tests/test_moe_bench.py
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "moe_gpu.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("moe_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_runs_tiny_on_cpu(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--device", "cpu", "--seqs", "32", "--steps", "1", "--out", str(out)]) == 0
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
    assert "tokens/s engine/stock" in capsys.readouterr().out
