"""One GPU check of the trace and the expert engine: real QLoRA steps at the real size, no download.

    python bench/gpu_check.py                      # one H100/H200: Qwen3-Coder-30B-A3B dims, 48 layers, seq 2048, 8192
    python bench/gpu_check.py --tiny --device cpu  # the same code at tiny size on the CPU (tests/test_gpu_check.py)

Builds the training model with the trace's own builder (qwen_sft/trace/build.py::build_model, the project's load
path on random weights: attention in NF4, nothing read from disk) twice, each in turn:

  engine  the expert engine (routed experts in NF4 + per-expert LoRA) + peft LoRA on attention: what training runs
  stock   transformers' fused experts on its grouped-GEMM path (bf16, bitsandbytes skips them) + peft LoRA with
          ``target_parameters`` on the experts: a normally loaded model with stock peft

For each sequence length it runs a warm-up step and ``--steps`` timed QLoRA steps (gradient checkpointing, AdamW,
the run's chunked loss, routing from the same seeded hook as the trace) and prints the measured peak
(``torch.cuda.max_memory_allocated``) next to the fake-tensor trace of the same step, and tokens/s of both
variants. Then one layer's engine output and input gradient against transformers' own experts run on the
engine's dequantized weights plus its LoRA delta (the reference). Figures go to ``--out`` as JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Run as a script (bench/ first on sys.path): the repository root, for an uninstalled checkout.
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from qwen_sft.atomic import atomic_open  # noqa: E402

REPO = _HERE.parent
REAL = dict(vocab_size=151_936, hidden_size=2048, intermediate_size=5472, moe_intermediate_size=768,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
            num_hidden_layers=48)
TINY = dict(vocab_size=151_936, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            num_hidden_layers=2)
GiB = 2**30


def model_config(dims: dict):
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(**dims, norm_topk_prob=True, tie_word_embeddings=False, rope_theta=10_000_000.0,
                         router_aux_loss_coef=0.0, max_position_embeddings=262_144)
    cfg._experts_implementation = "grouped_mm"  # stock: the grouped-GEMM path of a normally loaded model
    return cfg


def model_args(engine: bool, dtype: str):
    from qwen_sft.train.args import ModelArguments

    return ModelArguments(model_name_or_path="unused", use_peft=True, use_qlora=True, expert_engine=engine,
                          peft_config_path=str(REPO / "configs/lora"), torch_dtype=dtype, bnb_4bit_compute_dtype=dtype)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def build(cfg, engine: bool, dtype: str, device: str):
    from qwen_sft.trace.build import build_model

    torch.manual_seed(0)
    with torch.device(device):
        built = build_model(cfg, model_args(engine, dtype), gradient_checkpointing=True)
    with torch.no_grad():  # transformers inits routers at zero: route like a trained model would, by the hook
        for name, p in built.model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.02)
    return built


def run_steps(built, seq: int, steps: int, device: str, chunk_tokens: int) -> dict:
    from qwen_sft.trace import StepPlan
    from qwen_sft.trace.run import make_optimizer
    from qwen_sft.trace.step import chunked_loss, make_batch, seeded_routing

    model = built.model
    plan = StepPlan(seq=seq, accumulating=False)
    batch = {k: v.to(device) for k, v in make_batch(plan, model.get_input_embeddings().num_embeddings).items()}
    loss_fn = chunked_loss(chunk_tokens)
    opt = make_optimizer(model, "adamw_torch")
    cuda = device.startswith("cuda")

    def step() -> float:
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    with seeded_routing(model, plan.routing, plan.seed, None):
        first = step()  # warm-up: kernels, allocator, optimizer state
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        losses = [step() for _ in range(steps)]
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {"seq": seq, "step_s": dt, "tokens_per_s": seq / dt, "peak_bytes": peak, "losses": [first, *losses]}


def traced_peak(cfg, seq: int, chunk_tokens: int) -> dict:
    """The fake-tensor trace of the same step (engine, no gradients live at the start: zero_grad(set_to_none))."""
    from qwen_sft.trace import StepPlan, measure
    from qwen_sft.trace.step import chunked_loss

    plan = StepPlan(seq=seq, accumulating=False, loss_fn=chunked_loss(chunk_tokens))
    t0 = time.perf_counter()
    m = measure(cfg, model_args(True, "bfloat16"), plan, gradient_checkpointing=True)
    return {"seq": seq, "peak_bytes": m.report.peak, "planned_bytes": m.report.planned, "trace_s":
            time.perf_counter() - t0}


def engine_vs_reference(built, cfg, tokens: int, device: str) -> dict:
    """Layer 0's engine (NF4 experts + LoRA) against transformers' experts on the engine's own weights."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from qwen_sft.moe.experts import ExpertEngine

    eng = next(m for m in built.model.modules() if isinstance(m, ExpertEngine))
    g = torch.Generator(device="cpu").manual_seed(1)
    dtype = eng.lora_gate_up_A.dtype
    with torch.no_grad():  # LoRA B starts at zero; make the delta count
        for b in (eng.lora_gate_up_B, eng.lora_down_B):
            b.copy_((torch.randn(b.shape, generator=g) * 0.02).to(b))

    def dense(base, a, b, scaling) -> torch.Tensor:
        w = base.dequantize(None, torch.float32)
        return w + scaling * torch.bmm(b.float(), a.float())

    ref = Qwen3MoeExperts(cfg).to(device)
    with torch.no_grad():
        ref.gate_up_proj.copy_(dense(eng.gate_up_base, eng.lora_gate_up_A, eng.lora_gate_up_B,
                                     eng.lora_scaling["gate_up"]))
        ref.down_proj.copy_(dense(eng.down_base, eng.lora_down_A, eng.lora_down_B, eng.lora_scaling["down"]))
    k = cfg.num_experts_per_tok
    x = torch.randn(tokens, cfg.hidden_size, generator=g).to(device, dtype)
    idx = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:k] for _ in range(tokens)]).to(device)
    w = torch.softmax(torch.randn(tokens, k, generator=g), -1).to(device, dtype)
    grad_out = torch.randn(tokens, cfg.hidden_size, generator=g).to(device)
    outs = {}
    for name, mod, dt in (("engine", eng, dtype), ("reference", ref, torch.float32)):
        xi = x.to(dt).detach().requires_grad_(True)
        y = mod(xi, idx, w.to(dt))
        y.backward(grad_out.to(dt))
        outs[name] = (y.detach().float(), xi.grad.float())
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    (ye, ge), (yr, gr) = outs["engine"], outs["reference"]
    return {"tokens": tokens, "dtype": str(dtype), "output_rel_err": rel(ye, yr), "input_grad_rel_err": rel(ge, gr)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny dims, 2 layers (the CPU test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="default: 2048 8192 (tiny: 64)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--loss-chunk-tokens", type=int, default=1024)
    p.add_argument("--variants", nargs="+", default=["engine", "stock"], choices=["engine", "stock"])
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --tiny --device cpu for the CPU run)", file=sys.stderr)
        return 2
    dims = TINY if a.tiny else REAL
    seqs = a.seqs or ([64] if a.tiny else [2048, 8192])
    cfg = model_config(dims)
    dtype = "float32" if a.device == "cpu" else "bfloat16"
    card = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    print(f"gpu_check on {card}: {dims['num_hidden_layers']} layers, hidden {dims['hidden_size']}, "
          f"{dims['num_experts']} experts / {dims['num_experts_per_tok']} active, {dtype}, seqs {seqs}")
    out: dict = {"card": card, "dims": dims, "dtype": dtype, "runs": {}, "trace": {}}
    for seq in seqs:
        out["trace"][seq] = traced_peak(cfg, seq, a.loss_chunk_tokens)
    for variant in a.variants:
        t0 = time.perf_counter()
        built = build(cfg, variant == "engine", dtype, a.device)
        print(f"{variant}: built in {time.perf_counter() - t0:.0f} s ({built.engine_summary or 'stock experts'})")
        out["runs"][variant] = {}
        for seq in seqs:
            out["runs"][variant][seq] = run_steps(built, seq, a.steps, a.device, a.loss_chunk_tokens)
            _free(a.device)
        if variant == "engine":
            out["engine_vs_reference"] = engine_vs_reference(built, cfg, 256 if a.tiny else 4096, a.device)
        del built
        _free(a.device)
    print(f"{'seq':>6} {'variant':>8} {'tokens/s':>10} {'peak GiB':>9} {'traced GiB':>10} {'measured/traced':>15}")
    for seq in seqs:
        tr = out["trace"][seq]["peak_bytes"]
        for variant, runs in out["runs"].items():
            r = runs[seq]
            peak = r["peak_bytes"]
            ratio = f"{peak / tr:.3f}" if peak is not None and variant == "engine" else "-"
            print(f"{seq:>6} {variant:>8} {r['tokens_per_s']:>10.1f} "
                  f"{peak / GiB if peak is not None else float('nan'):>9.3f} "
                  f"{tr / GiB if variant == 'engine' else float('nan'):>10.3f} {ratio:>15}")
        if {"engine", "stock"} <= set(out["runs"]):
            speed = out["runs"]["engine"][seq]["tokens_per_s"] / out["runs"]["stock"][seq]["tokens_per_s"]
            print(f"{seq:>6} engine/stock tokens/s: {speed:.2f}x")
    if "engine_vs_reference" in out:
        e = out["engine_vs_reference"]
        print(f"engine vs transformers experts on the same weights ({e['tokens']} tokens, {e['dtype']}): output "
              f"rel. error {e['output_rel_err']:.2e}, input gradient rel. error {e['input_grad_rel_err']:.2e}")
    if a.out:
        with atomic_open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
