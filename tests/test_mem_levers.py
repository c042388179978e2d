"""Issue 14's memory levers on the tiny model: 8-bit AdamW tracks 32-bit AdamW, bf16 LoRA factors still train,
``optim_foreach`` reaches the optimizer, and the expert engine matches its reference with bf16 factors.

    python -m pytest -x -q tests/test_mem_levers.py
"""

from __future__ import annotations

import json

import pytest
import torch

from qwen_sft.model.tiny import TinySpec, tiny_config
from qwen_sft.trace.build import build_model
from qwen_sft.train.args import ModelArguments
from qwen_sft.train.optim import make_optimizer, optimizer_cls_and_kwargs

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def _model(tmp_path, lora_dtype: str = "float32", seed: int = 0):
    adapter = tmp_path / "adapter_config.json"
    adapter.write_text(json.dumps({"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS}))
    args = ModelArguments(model_name_or_path="tiny", use_qlora=True, peft_config_path=str(adapter),
                          lora_dtype=lora_dtype)
    torch.manual_seed(seed)
    config = tiny_config(TinySpec(hidden=64, experts=8, moe_intermediate=64))
    built = build_model(config, args, gradient_checkpointing=True)
    with torch.no_grad():  # routers start at zero: random ones route tokens unevenly, as a trained model does
        g = torch.Generator().manual_seed(seed)
        for name, p in built.model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return built.model


def _batch(seed: int = 1, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (1, n), generator=g)  # a small slice of the vocabulary: learnable in a few steps
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(n)[None]}


def _args(optim: str, lr: float = 2e-3):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir="/nonexistent", optim=optim, learning_rate=lr, use_cpu=True, report_to="none",
                             weight_decay=0.0)


def _train(model, optimizer, steps: int) -> list[float]:
    batch, losses = _batch(), []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_adamw_8bit_tracks_32bit_adamw(tmp_path):
    runs = {}
    for optim in ("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit"):
        model = _model(tmp_path)
        before = _trainable(model)
        opt = make_optimizer(model, _args(optim))
        losses = _train(model, opt, 6)
        after = _trainable(model)
        runs[optim] = (losses, {n: after[n] - before[n] for n in before}, opt)
    ref_losses, ref_delta, _ = runs["adamw_torch"]
    assert ref_losses[-1] < ref_losses[0] - 0.05  # the reference learns
    for optim in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        losses, delta, opt = runs[optim]
        # 8-bit state really is in use for the large expert factors (bnb keeps tensors < 4096 elements in 32 bit).
        kinds = {s["state1"].dtype for s in opt.state.values()}
        assert torch.uint8 in kinds, optim
        assert losses[-1] < losses[0] - 0.05, optim
        assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 0.02 * ref_losses[0], (optim, losses, ref_losses)
        num = sum((delta[n] - ref_delta[n]).norm() ** 2 for n in delta) ** 0.5
        den = sum(ref_delta[n].norm() ** 2 for n in delta) ** 0.5
        assert num / den < 0.15, (optim, float(num / den))


def test_bf16_lora_factors_train_like_fp32(tmp_path):
    fp32, bf16 = _model(tmp_path, "float32"), _model(tmp_path, "bfloat16")
    dtypes = {n: p.dtype for n, p in bf16.named_parameters() if p.requires_grad}
    assert any(".experts.lora_" in n for n in dtypes) and any("q_proj.lora_A" in n for n in dtypes)
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes
    assert {p.dtype for p in fp32.parameters() if p.requires_grad} == {torch.float32}
    n32 = sum(p.numel() for p in fp32.parameters() if p.requires_grad)
    assert n32 == sum(p.numel() for p in bf16.parameters() if p.requires_grad)
    l32 = _train(fp32, make_optimizer(fp32, _args("adamw_bnb_8bit")), 8)
    l16 = _train(bf16, make_optimizer(bf16, _args("adamw_bnb_8bit")), 8)
    grads_ok = [p.grad is None for p in bf16.parameters() if p.requires_grad]
    assert all(grads_ok)
    assert l32[-1] < l32[0] - 0.1
    assert l16[-1] < l16[0] - 0.1
    # bf16 factors lose at most a tenth of what fp32 gains in these steps.
    assert (l16[0] - l16[-1]) > 0.9 * (l32[0] - l32[-1]), (l16, l32)


def test_bf16_lora_gradients_are_bf16_and_half_the_bytes(tmp_path):
    fp32, bf16 = _model(tmp_path, "float32"), _model(tmp_path, "bfloat16")
    for m in (fp32, bf16):
        m(**_batch()).loss.backward()
    g32 = sum(p.grad.nbytes for p in fp32.parameters() if p.requires_grad)
    g16 = sum(p.grad.nbytes for p in bf16.parameters() if p.requires_grad)
    assert {p.grad.dtype for p in bf16.parameters() if p.requires_grad} == {torch.bfloat16}
    assert g16 * 2 == g32


@pytest.mark.parametrize("foreach", [False, True, None])
def test_optim_foreach_reaches_torch_adamw_only(tmp_path, foreach):
    model = torch.nn.Linear(4, 4)
    cls, kw = optimizer_cls_and_kwargs(_args("adamw_torch"), model, foreach=foreach)
    assert cls is torch.optim.AdamW
    assert kw.get("foreach") is foreach
    assert make_optimizer(model, _args("adamw_torch"), foreach=foreach).defaults["foreach"] is foreach
    _, kw8 = optimizer_cls_and_kwargs(_args("adamw_bnb_8bit"), model, foreach=foreach)
    assert "foreach" not in kw8


def test_trainer_create_optimizer_applies_optim_foreach(tmp_path):
    from qwen_sft.train.trainer import SFTTrainer

    model = _model(tmp_path)
    args = _args("adamw_torch")
    trainer = SFTTrainer(model=model, args=args, optim_foreach=False)
    opt = trainer.create_optimizer()
    assert opt.defaults["foreach"] is False
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)
    default = SFTTrainer(model=_model(tmp_path), args=args).create_optimizer()
    assert default.defaults["foreach"] is None


@pytest.mark.parametrize("quantize", [True, False])
def test_engine_matches_reference_with_bf16_factors_and_any_chunk(quantize):
    from test_moe_engine import _engine, _reference, _rel, _routing

    x = torch.randn(29, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    idx, wts = _routing(29, 2, list(range(8)), seed=2, dtype=torch.bfloat16)
    outs = []
    for chunk in (1, 3, 8):
        eng = _engine(quantize, torch.bfloat16, lora=True, chunk=chunk)
        with torch.no_grad():
            for name in ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B"):
                setattr(eng, name, torch.nn.Parameter(getattr(eng, name).to(torch.bfloat16)))
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = eng(x1, idx, wts), _reference(eng, x2, idx, wts, torch.bfloat16)
        assert _rel(out, ref) < 3e-2
        lora = [eng.lora_gate_up_A, eng.lora_gate_up_B, eng.lora_down_A, eng.lora_down_B]
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        ours, theirs = torch.autograd.grad(out, [x1, *lora], up), torch.autograd.grad(ref, [x2, *lora], up)
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype == torch.bfloat16
            assert _rel(a, b) < 6e-2
        outs.append(out)
    assert all(_rel(o, outs[0]) < 1e-2 for o in outs[1:])


def test_attention_only_lora_gives_the_engine_no_expert_factors(tmp_path):
    from qwen_sft.moe import add_expert_factors
    from qwen_sft.moe.lora import expert_engines

    adapter = tmp_path / "adapter_config.json"
    adapter.write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj"]}))
    args = ModelArguments(model_name_or_path="tiny", use_qlora=True, peft_config_path=str(adapter))
    built = build_model(tiny_config(TinySpec()), args, gradient_checkpointing=False)
    names = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert built.engine and expert_engines(built.model)
    assert names and all("lora_" in n and ".experts." not in n for n in names), names
    assert not any("o_proj" in n for n in names)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter_config.json").write_text("{}")
    assert add_expert_factors(built.model, tmp_path / "out") == 0
