"""The expert engine on qwen3_next (Qwen3-Coder-Next): routed experts vs the stock eager experts, the whole
tiny model (Gated DeltaNet + gated attention + shared expert) vs stock, and the QLoRA loader vs bitsandbytes.

    python -m pytest -q tests/test_next_engine.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from qwen_sft.model.tiny import TinySpec, build_tiny_model
from qwen_sft.moe import DenseExperts, ExpertEngine, ExpertLoraSpec, NF4Experts, install_expert_engine, load_moe_model
from qwen_sft.moe.load import quantized_linear

SPEC = TinySpec(model_type="qwen3_next", layers=4, experts=16, active=10, full_attention_interval=2)
E, H, INTER, TOP_K = SPEC.experts, SPEC.hidden, SPEC.moe_intermediate, SPEC.active
IDS = torch.randint(0, 5000, (2, 11), generator=torch.Generator().manual_seed(0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _stock_next_experts(dtype: torch.dtype):
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextExperts

    from qwen_sft.model.tiny import tiny_config

    cfg = tiny_config(SPEC)
    cfg._experts_implementation = "eager"  # the per-expert loop is the reference
    return Qwen3NextExperts(cfg).to(dtype)


def _randomize_lora(eng: ExpertEngine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero (like peft); make the low-rank path matter
        eng.lora_gate_up_B.normal_(0, 0.1, generator=g)
        eng.lora_down_B.normal_(0, 0.1, generator=g)


def _delta_params(eng: ExpertEngine, dtype) -> dict[str, torch.Tensor]:
    """W + s · B @ A for both fused parameters: the dense reference, differentiable in A and B."""
    w1 = eng.gate_up_base.dequantize(None, torch.float32)
    w2 = eng.down_base.dequantize(None, torch.float32)
    s1, s2 = eng.lora_scaling["gate_up"], eng.lora_scaling["down"]
    return {"gate_up_proj": (w1 + s1 * torch.einsum("eor,eri->eoi", eng.lora_gate_up_B, eng.lora_gate_up_A)).to(dtype),
            "down_proj": (w2 + s2 * torch.einsum("eor,eri->eoi", eng.lora_down_B, eng.lora_down_A)).to(dtype)}


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("dtype,quantize,allowed,tol", [
    (torch.float32, True, list(range(E)), 1e-5),
    (torch.float32, False, list(range(12)), 1e-5),  # experts 12-15 get no tokens
    (torch.bfloat16, True, list(range(E)), 3e-2),
])
def test_routed_experts_top10_match_stock(dtype, quantize, allowed, tol, grouped):
    g = torch.Generator().manual_seed(1)
    w1 = (torch.randn(E, 2 * INTER, H, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(E, H, INTER, generator=g) * 0.1).to(dtype)
    stores = ((NF4Experts.quantize(w1), NF4Experts.quantize(w2)) if quantize else (DenseExperts(w1), DenseExperts(w2)))
    eng = ExpertEngine(*stores, chunk_experts=5)
    eng.compute_dtype = dtype
    eng.grouped_mm = None if grouped else False
    eng.add_lora(4, 8.0, dtype=torch.float32, seed=0, gate_up_r=8, gate_up_alpha=16.0)
    _randomize_lora(eng, 2)
    tokens = 29
    x = torch.randn(tokens, H, generator=g).to(dtype)
    # top-10 of the allowed experts per token, distinct, like the router's topk
    scores = torch.rand(tokens, len(allowed), generator=g)
    idx = torch.tensor(allowed)[scores.topk(TOP_K, dim=-1).indices]
    wts = torch.softmax(torch.randn(tokens, TOP_K, generator=g), -1).to(dtype)
    x1, r1 = x.clone().requires_grad_(), wts.clone().requires_grad_()
    x2, r2 = x.clone().requires_grad_(), wts.clone().requires_grad_()

    out = eng(x1, idx, r1)
    ref = functional_call(_stock_next_experts(dtype), _delta_params(eng, dtype), (x2, idx, r2))
    assert out.dtype == ref.dtype == dtype and _rel(out, ref) < tol
    up = torch.randn(out.shape, generator=g).to(dtype)
    lora = [eng.lora_gate_up_A, eng.lora_gate_up_B, eng.lora_down_A, eng.lora_down_B]
    ours = torch.autograd.grad(out, [x1, r1, *lora], up)
    theirs = torch.autograd.grad(ref, [x2, r2, *lora], up)
    for name, a, b in zip(["x", "routing", "A1", "B1", "A2", "B2"], ours, theirs):
        assert _rel(a, b) < 2 * tol, name
    silent = [e for e in range(E) if e not in allowed]
    for grad in ours[2:]:
        assert torch.count_nonzero(grad[silent]).item() == 0


def test_tiny_next_has_both_layer_kinds_and_shared_expert():
    model = build_tiny_model(SPEC)
    kinds = [layer.block_type for layer in model.model.layers]
    assert kinds == ["linear_attention", "full_attention"] * 2
    mlp = model.model.layers[0].mlp
    assert tuple(mlp.experts.gate_up_proj.shape) == (E, 2 * INTER, H) and mlp.gate.top_k == 10
    assert isinstance(mlp.shared_expert.gate_proj, torch.nn.Linear)
    assert tuple(mlp.shared_expert_gate.weight.shape) == (1, H)
    assert model.config.vocab_size == 151_936


def test_whole_model_with_engine_matches_stock_outputs_and_gradients():
    """Engine (frozen 16-bit base + expert LoRA) == stock Qwen3NextForCausalLM on W + s·B@A, logits and every
    gradient: expert LoRA factors, shared expert, its sigmoid gate, Gated DeltaNet, gated attention, router."""
    stock = build_tiny_model(SPEC).float()
    stock.config._experts_implementation = "eager"  # the experts share the model's config object
    ours = copy.deepcopy(stock)
    report = install_expert_engine(ours, quantize_experts=False, lora=ExpertLoraSpec(r=4, alpha=8.0),
                                   compute_dtype=torch.float32)
    assert report.layers == 4 and report.paths[0] == "model.layers.0.mlp.experts"
    engines = [layer.mlp.experts for layer in ours.model.layers]
    for i, eng in enumerate(engines):
        _randomize_lora(eng, 10 + i)
    params = {}
    for i, eng in enumerate(engines):
        for k, v in _delta_params(eng, torch.float32).items():
            params[f"model.layers.{i}.mlp.experts.{k}"] = v
    labels = IDS.clone()
    out = ours(input_ids=IDS, labels=labels, use_cache=False)
    ref = functional_call(stock, params, (), {"input_ids": IDS, "labels": labels, "use_cache": False})
    assert _rel(out.logits, ref.logits) < 1e-5

    lora = [p for eng in engines for p in (eng.lora_gate_up_A, eng.lora_gate_up_B, eng.lora_down_A, eng.lora_down_B)]
    named = ["model.layers.0.mlp.shared_expert.gate_proj.weight", "model.layers.2.mlp.shared_expert.down_proj.weight",
             "model.layers.1.mlp.shared_expert_gate.weight", "model.layers.0.linear_attn.in_proj_qkvz.weight",
             "model.layers.2.linear_attn.out_proj.weight", "model.layers.0.linear_attn.A_log",
             "model.layers.1.self_attn.q_proj.weight", "model.layers.3.mlp.gate.weight"]
    ours_p, stock_p = dict(ours.named_parameters()), dict(stock.named_parameters())
    g_ours = torch.autograd.grad(out.loss, lora + [ours_p[n] for n in named])
    g_ref = torch.autograd.grad(ref.loss, lora + [stock_p[n] for n in named])
    for i, (a, b) in enumerate(zip(g_ours, g_ref)):
        label = f"lora[{i}]" if i < len(lora) else named[i - len(lora)]
        assert torch.count_nonzero(b).item() > 0, label
        assert _rel(a, b) < 1e-4, label
    # the shared expert matters: gating it off changes the logits by far more than the tolerance
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.mlp.shared_expert_gate.weight.fill_(-1e4)  # sigmoid -> 0
        assert _rel(ours(input_ids=IDS, use_cache=False).logits, ref.logits) > 1e-3


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    """Through the CLI: `qwen-sft make-tiny-model DIR --model_type qwen3_next` gives SPEC by default."""
    import json

    from qwen_sft.model.tiny import main

    out = tmp_path_factory.mktemp("next") / "m"
    assert main([str(out), "--model_type", "qwen3_next"]) == 0
    assert json.loads((out / "tiny_spec.json").read_text()) == SPEC.__dict__
    return out


def test_qlora_loader_matches_bitsandbytes_and_quantizes_shared_expert(next_dir):
    """load_moe_model(quantize_attention=True) == from_pretrained(BitsAndBytesConfig) + install, bit for bit:
    attention, Gated DeltaNet projections and the shared expert in NF4; router and shared_expert_gate 16-bit."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qwen_sft.train.model import NOT_QUANTIZED

    ours, report = load_moe_model(next_dir, device="cpu", compute_dtype=torch.float32, quantize_attention=True)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=NOT_QUANTIZED)
    ref = AutoModelForCausalLM.from_pretrained(next_dir, dtype=torch.float32, device_map="cpu",
                                               quantization_config=bnb).eval()
    install_expert_engine(ref, quantize_experts=True, compute_dtype=torch.float32)
    assert report.layers == 4 and report.quantized
    kinds = {n: type(m).__name__ for n, m in ours.named_modules() if type(m).__name__ in ("Linear", "Linear4bit")}
    ref_kinds = {n: type(m).__name__ for n, m in ref.named_modules() if type(m).__name__ in ("Linear", "Linear4bit")}
    assert kinds == ref_kinds
    assert kinds["model.layers.0.linear_attn.in_proj_qkvz"] == "Linear4bit"
    assert kinds["model.layers.0.mlp.shared_expert.up_proj"] == "Linear4bit"
    assert kinds["model.layers.1.self_attn.o_proj"] == "Linear4bit"
    assert kinds["model.layers.0.mlp.shared_expert_gate"] == "Linear" and kinds["lm_head"] == "Linear"
    assert not quantized_linear("model.layers.0.mlp.experts.3.gate_proj")
    # On a CPU with AVX512-BF16, bitsandbytes' eval-mode Linear4bit repacks its weight for a CPU kernel that asserts
    # out_features % 32 == 0, which the tiny Gated DeltaNet's in_proj_ba (8 rows) does not meet: keep both models
    # on the generic 4-bit path, the same kernel for both, so the comparison stays bit for bit.
    for m in (*ours.modules(), *ref.modules()):
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS, use_cache=False).logits, ref(input_ids=IDS, use_cache=False).logits)


def test_loader_skips_the_mtp_head_like_from_pretrained(next_dir, tmp_path):
    """Released Qwen3-Next checkpoints carry a multi-token-prediction head (``mtp.*``) that transformers drops
    on load; load_moe_model drops it too, and still names a truly unknown tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "with_mtp"
    shutil.copytree(next_dir, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    save_file({**tensors, "mtp.fc.weight": torch.zeros(4, 4)}, ckpt / "model.safetensors", metadata={"format": "pt"})
    model, report = load_moe_model(ckpt, device="cpu", compute_dtype=torch.float32, quantize_experts=False)
    assert report.layers == 4 and not any(n.startswith("mtp") for n, _ in model.named_parameters())
    save_file({**tensors, "model.extra.weight": torch.zeros(4, 4)}, ckpt / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 checkpoint tensors match nothing .*model\.extra\.weight"):
        load_moe_model(ckpt, device="cpu", compute_dtype=torch.float32, quantize_experts=False)
