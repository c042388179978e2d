"""The fake-tensor trace (qwen_sft/trace): equal to the same tracker on real tensors, the layer fit equal to a
full trace, the formula estimate within stated tolerances of the trace on the real config.

    python -m pytest -q tests/test_trace.py            # fast tier
    python -m pytest -q tests/test_trace.py -m slow    # mid-size real-vs-fake, real config, 48-layer fit check
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixture_data import SPEC, need_fixture

from qwen_sft.model.tiny import TinySpec, tiny_config
from qwen_sft.trace import Sharding, StepPlan, measure
from qwen_sft.trace.run import trace
from qwen_sft.train.args import ModelArguments

REPO = Path(__file__).resolve().parent.parent
REAL_DIR = SPEC  # the released config.json, checked in
ADAPTER = str(REPO / "configs/lora/adapter_config.json")
GiB = 2**30


def model_args(qlora: bool = True, **kw) -> ModelArguments:
    return ModelArguments(model_name_or_path="unused", use_peft=True, use_qlora=qlora, peft_config_path=ADAPTER, **kw)


def test_shadow_mode_answers_data_dependent_ops():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from qwen_sft.trace.shadow import ShadowMode

    fm = FakeTensorMode(allow_non_fake_inputs=True)
    with fm, ShadowMode(fm) as shadow:
        idx = torch.tensor([[3, 1], [3, 0]])
        counts = torch.bincount(idx.reshape(-1), minlength=5)
        hit = torch.nonzero(counts).flatten()
        assert isinstance(counts, FakeTensor) and counts.tolist() == [1, 1, 0, 2, 0]
        assert hit.tolist() == [0, 1, 3] and counts[hit].tolist() == [1, 1, 2]
        assert torch.repeat_interleave(hit, counts[hit]).tolist() == [0, 1, 3, 3]
        assert int(((counts + 15) // 16 * 16).sum()) == 48
        x = torch.randn(4, 8)  # floats never get a value
        assert isinstance(x, FakeTensor) and not shadow.knows(x) and not shadow.knows(x.argmax(-1))


def _tiny(layers: int = 2):
    return tiny_config(TinySpec(layers=layers, hidden=64, experts=8, active=2, moe_intermediate=32))


@pytest.mark.parametrize("qlora", [True, False], ids=["qlora", "lora"])
def test_fake_trace_equals_real_tensors_tiny(qlora):
    """Same build, same step, same tracker: on fake tensors and on real ones the peak and every category agree."""
    plan = StepPlan(seq=96, batch=2)
    fake = trace(_tiny(), model_args(qlora), plan=plan, gradient_checkpointing=True, fake=True)
    real = trace(_tiny(), model_args(qlora), plan=plan, gradient_checkpointing=True, fake=False)
    assert real.result.peak_bytes > 100 * 2**20  # two vocabulary-sized weights and the logits: not a no-op
    assert fake.result.peak_bytes == pytest.approx(real.result.peak_bytes, rel=0.01)
    for cat, b in real.result.breakdown.items():
        assert fake.result.breakdown[cat] == pytest.approx(b, rel=0.02, abs=64 * 1024), cat
    assert fake.result.flops == real.result.flops > 0
    assert fake.static == real.static and fake.trainable == real.trainable > 0


def test_trace_counts_what_the_step_holds():
    """Breakdown rows that follow from the configuration alone: parameters, gradients, AdamW state, logits."""
    plan = StepPlan(seq=128, batch=1, accumulating=True)
    t = trace(_tiny(), model_args(True), plan=plan, gradient_checkpointing=True)
    bd, r = t.result.breakdown, t.result
    lora_bytes = t.static["LoRA parameters"]
    assert t.trainable * 4 <= lora_bytes < t.trainable * 4 + 512 * 64  # fp32, allocator-rounded
    assert bd["gradients"] == lora_bytes  # accumulating: every LoRA gradient is live
    assert 2 * lora_bytes <= bd["optimizer state"] <= 2 * lora_bytes + 512 * 64  # AdamW m and v (+ step scalars)
    assert r.peak_phase == "backward"
    logit_bytes = 128 * 151_936
    assert bd["loss/logits"] + bd["transients (backward, loss)"] == pytest.approx(12 * logit_bytes, rel=0.01)
    first = trace(_tiny(), model_args(True), plan=StepPlan(seq=128, accumulating=False), gradient_checkpointing=True)
    assert first.result.peak_bytes < r.peak_bytes  # no gradients of an earlier micro-batch


def test_chunked_loss_traces_as_it_runs():
    """The run's default loss (qwen_sft/train/loss.py) plugged into the step: fake equals real, and the loss holds
    one chunk of logits (fp32 model: logits, softmax and their gradient, 12 bytes a logit) instead of all of them."""
    from qwen_sft.trace.step import chunked_loss

    plan = StepPlan(seq=128, batch=1, loss_fn=chunked_loss(32))
    fake = trace(_tiny(), model_args(True), plan=plan, gradient_checkpointing=True, fake=True)
    real = trace(_tiny(), model_args(True), plan=plan, gradient_checkpointing=True, fake=False)
    assert fake.result.peak_bytes == real.result.peak_bytes
    assert fake.result.breakdown == real.result.breakdown
    full = trace(_tiny(), model_args(True), plan=StepPlan(seq=128, batch=1), gradient_checkpointing=True)
    loss = lambda r: r.breakdown["loss/logits"] + r.breakdown["transients (backward, loss)"]  # noqa: E731
    assert loss(full.result) == pytest.approx(12 * 128 * 151_936, rel=0.01)
    assert loss(fake.result) == pytest.approx(12 * 32 * 151_936, rel=0.05)
    assert fake.result.peak_bytes < full.result.peak_bytes


def test_layer_fit_equals_full_trace():
    """Two short traces extrapolated linearly give a longer model's trace, row for row."""
    from qwen_sft.trace.report import extrapolate, extrapolate_static

    plan = StepPlan(seq=64)
    a, b, full = (trace(_tiny(n), model_args(True), plan=plan, gradient_checkpointing=True) for n in (2, 4, 9))
    fit = extrapolate(a.result, 2, b.result, 4, 9)
    assert fit.peak_bytes == full.result.peak_bytes
    assert fit.flops == pytest.approx(full.result.flops, rel=1e-3)  # the 16-row padding per expert follows routing
    for cat, v in full.result.breakdown.items():
        assert abs(fit.breakdown[cat] - v) <= 1024, cat
    assert extrapolate_static(a.static, 2, b.static, 4, 9) == full.static


def test_offloaded_layer_inputs_are_counted_on_the_host_at_their_peak():
    """With checkpoint offload the saved layer inputs leave the GPU: the host's bytes are its peak during the step
    (every layer's input held at once before backward; zero again once backward is done), not what is left at the
    end, and the layer fit extrapolates them like any row."""
    from qwen_sft.trace.report import extrapolate
    from qwen_sft.trace.step import chunked_loss, offloaded

    plan = StepPlan(seq=64, loss_fn=offloaded(chunked_loss(32)))
    a, b, full = (trace(_tiny(n), model_args(True), plan=plan, gradient_checkpointing=True) for n in (2, 4, 9))
    host = full.result.host_bytes
    assert sum(host.values()) >= 9 * 64 * 64 * 4  # at least 9 fp32 layer inputs [64 tokens, hidden 64]
    assert extrapolate(a.result, 2, b.result, 4, 9).host_bytes == host
    kept = trace(_tiny(9), model_args(True), plan=StepPlan(seq=64, loss_fn=chunked_loss(32)), gradient_checkpointing=True)
    assert sum(kept.result.host_bytes.values()) == 0
    assert kept.result.breakdown["activations (layers)"] > full.result.breakdown["activations (layers)"]


NEXT_ADAPTER = str(REPO / "configs/lora/qwen3_next_adapter_config.json")


def _tiny_next(layers: int):
    return tiny_config(TinySpec(model_type="qwen3_next", layers=layers, hidden=64, experts=8, active=2,
                                moe_intermediate=32, full_attention_interval=4))


def test_layer_fit_counts_whole_blocks():
    """The fit traces whole repeats of the layer pattern: 2 and 4 layers of a uniform model, 4 and 8 of the
    3:1 DeltaNet/attention hybrid (a 2-layer prefix of it has no full-attention layer at all)."""
    from qwen_sft.trace.fit import fit_layers, layer_period

    assert layer_period(_tiny(9)) == 1 and fit_layers(_tiny(9)) == (2, 4) and fit_layers(_tiny(4)) is None
    nxt = _tiny_next(16)
    assert nxt.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert layer_period(nxt) == 4 and fit_layers(nxt) == (4, 8)
    real = json.loads((REPO / "configs/models/qwen3-coder-next.json").read_text())
    from transformers import Qwen3NextConfig

    real = Qwen3NextConfig(**{k: v for k, v in real.items() if not k.startswith("_")})
    assert layer_period(real) == 4 and fit_layers(real) == (4, 8)
    odd = _tiny_next(16)
    odd.layer_types[13] = "full_attention"  # breaks the pattern: no block repeats to the whole model
    assert layer_period(odd) is None and fit_layers(odd) is None
    sparse = _tiny(8)
    sparse.mlp_only_layers = [0]  # a dense first layer: not periodic either
    assert layer_period(sparse) is None


@pytest.mark.slow  # ~3 min on a shared 2-core machine: 28 layers traced
def test_layer_fit_equals_full_trace_hybrid():
    """Qwen3-Coder-Next's layout (three Gated DeltaNet layers, then gated attention, shared expert): the fit of
    4 and 8 layers equals the trace of all 16, row for row, with LoRA on attention, DeltaNet, shared and
    routed experts."""
    args = ModelArguments(model_name_or_path="unused", use_peft=True, use_qlora=True, peft_config_path=NEXT_ADAPTER)
    plan = StepPlan(seq=64)
    fit = measure(_tiny_next(16), args, plan, gradient_checkpointing=True, layers="fit")
    full = measure(_tiny_next(16), args, plan, gradient_checkpointing=True, layers="all")
    assert fit.traced_layers.startswith("4 and 8 of 16 layers traced (whole blocks of 4 layers)")
    assert full.traced_layers == "all 16 layers"
    assert fit.report.peak == full.report.peak
    assert fit.trainable == full.trainable > 0
    rows = {r.name: r.bytes for r in full.report.rows}
    assert rows["weights: Gated DeltaNet (in_proj_qkvz/ba, out_proj)"] > 0 and rows["weights: shared expert"] > 0
    for r in fit.report.rows:
        assert abs(r.bytes - rows[r.name]) <= 1024, r.name
    assert fit.report.flops == pytest.approx(full.report.flops, rel=1e-3)  # 16-row padding follows routing


def test_zero3_with_the_engine_fails_in_the_trace():
    with pytest.raises(ValueError, match="does not support DeepSpeed ZeRO-3"):
        trace(_tiny(), model_args(False), plan=StepPlan(seq=32), gradient_checkpointing=True, deepspeed_zero3=True)


def test_sharding_is_computed_on_traced_rows():
    one = measure(_tiny(), model_args(False), StepPlan(seq=64), gradient_checkpointing=True, layers="all")
    z2 = measure(_tiny(), model_args(False), StepPlan(seq=64), gradient_checkpointing=True, layers="all",
                 sharding=Sharding(world=4, zero=2))
    rows1 = {r.name: r for r in one.report.rows}
    rows2 = {r.name: r for r in z2.report.rows}
    assert rows2["gradients"].bytes == -(-rows1["gradients"].bytes // 4) and rows2["gradients"].source == "computed"
    assert rows2["optimizer state"].bytes == -(-rows1["optimizer state"].bytes // 4)
    assert rows2["weights: embeddings"].bytes == rows1["weights: embeddings"].bytes
    assert one.report.peak - z2.report.peak == sum(rows1[k].bytes - rows2[k].bytes
                                                   for k in ("gradients", "optimizer state"))


def test_estimate_trace_cli_and_gpu_memory(tmp_path, capsys):
    from qwen_sft.moe.estimate import main

    (tmp_path / "config.json").write_text(json.dumps(_tiny(2).to_dict()))
    assert main([str(tmp_path), "--mode", "qlora", "--seq", "64", "--trace", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    for text in ("on fake tensors (nothing allocated", "weights: routed experts", "LoRA parameters", "gradients",
                 "optimizer state", "activations (layers)", "loss/logits", "peak allocated per GPU",
                 "CUDA context", "allocator fragmentation", "FLOPs (traced)", "routing assumed: uniform", "fits:"):
        assert text in out, text
    assert main([str(tmp_path), "--seq", "64", "--trace", "--gpu-memory", "0.01GiB"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def _real_config():
    need_fixture(REAL_DIR / "config.json")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(REAL_DIR))


@pytest.mark.heavy
def test_fake_trace_equals_real_tensors_midsize():
    """4 layers at the real dimensions (hidden 2048, 32 heads, expert width 768, the real vocabulary), 16 experts."""
    cfg = _real_config()
    cfg.num_hidden_layers, cfg.num_experts = 4, 16
    plan = StepPlan(seq=64)
    fake = trace(cfg, model_args(True), plan=plan, gradient_checkpointing=True, fake=True)
    real = trace(cfg, model_args(True), plan=plan, gradient_checkpointing=True, fake=False)
    assert fake.result.peak_bytes == pytest.approx(real.result.peak_bytes, rel=0.01)
    for cat, b in real.result.breakdown.items():
        assert fake.result.breakdown[cat] == pytest.approx(b, rel=0.02, abs=256 * 1024), cat


@pytest.mark.heavy
def test_formula_matches_trace_on_real_config(tmp_path):
    """Every formula row against the trace at the real size (QLoRA, r 8 on attention + experts, seq 2048)."""
    from qwen_sft.moe.estimate import ModelShape, Options, estimate
    from qwen_sft.trace.cli import ATTENTION
    from qwen_sft.trace.report import LOSS_ROW, formula_view

    cfg = _real_config()
    adapter = Path(tmp_path) / "adapter_config.json"
    adapter.write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ATTENTION + ["gate_up_proj",
                                                                                             "down_proj"]}))
    args = ModelArguments(model_name_or_path="unused", use_qlora=True, peft_config_path=str(adapter))
    m = measure(cfg, args, StepPlan(seq=2048), gradient_checkpointing=True)
    est = estimate(ModelShape.from_config(json.loads((REAL_DIR / "config.json").read_text())), Options(seq=2048))
    fv = formula_view(m.report, est, checkpointing=True)
    rows = {r.name: r.bytes for r in m.report.rows}
    tolerance = {"weights: routed experts": 0.001, "weights: attention (q/k/v/o)": 0.01, "weights: embeddings": 0.001,
                 "weights: lm_head": 0.001, "LoRA parameters": 0.001, "gradients": 0.001, "optimizer state": 0.001,
                 "activations (layers)": 0.05, LOSS_ROW: 0.01}
    for name, tol in tolerance.items():
        assert rows[name] == pytest.approx(fv[name], rel=tol), name
    assert m.report.peak == pytest.approx(est.peak(True), rel=0.01)
    assert m.report.flops == pytest.approx(est.flops, rel=0.03)
    assert 24.0 * GiB < m.report.peak < 24.5 * GiB  # today's recipe does not fit a 24 GB card (issue 14)
