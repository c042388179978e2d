"""QLoRA training-step benchmark: the expert engine vs stock transformers v5 + bitsandbytes + peft, same run.

    python bench/moe_gpu.py                                  # GPU: Qwen3-Coder-30B-A3B dims, seq 2048 and 8192
    python bench/moe_gpu.py --tiny --device cpu --seqs 64    # CPU smoke run with tiny dims (what the test runs)

Builds a Qwen3-MoE with the real model's dimensions (hidden 2048, 128 experts / 8 active, moe_intermediate
768, vocab 151,936) but only a few decoder layers, random weights, saved once and loaded twice with
``BitsAndBytesConfig(load_in_4bit, nf4, double quant)`` (attention in NF4 for both variants):

  engine  install_expert_engine(quantize_experts=True, lora r) + peft LoRA on q/k/v/o
  stock   peft LoRA on q/k/v/o + target_parameters on mlp.experts.gate_up_proj / down_proj (bf16 experts)

Each variant runs gradient-checkpointed AdamW steps at every sequence length for two layer counts; the
difference gives the per-layer peak memory and step time, extrapolated to the real 48 layers.
Prints a table with engine/stock ratios and writes the figures as JSON (``--out``).
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
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from qwen_sft.atomic import atomic_open  # noqa: E402
from qwen_sft.model.checkpoint import EXPERT_TARGET_PARAMETERS  # noqa: E402

REAL = dict(vocab_size=151_936, hidden_size=2048, intermediate_size=5472, moe_intermediate_size=768,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8)
TINY = dict(vocab_size=151_936, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)
TARGET_LAYERS = 48


def build_base(out: Path, dims: dict, layers: int, dtype: torch.dtype, device: str) -> None:
    """Random-weight Qwen3-MoE with ``layers`` layers saved to ``out`` (bf16 safetensors)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**dims, num_hidden_layers=layers, norm_topk_prob=True, tie_word_embeddings=False,
                         rope_theta=10_000_000.0, router_aux_loss_coef=0.0, max_position_embeddings=32_768)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.02)  # transformers inits routers at zero: route for real
    model.save_pretrained(out)
    del model
    _free(device)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def load_variant(base: Path, variant: str, layers: int, r: int, device: str, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qwen_sft.moe import ExpertLoraSpec, enable_expert_lora, install_expert_engine

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, dtype=dtype, device_map=device,
                                                 num_hidden_layers=layers)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if variant == "engine":
        install_expert_engine(model, quantize_experts=True, double_quant=True, lora=ExpertLoraSpec(r=r, alpha=2 * r),
                              compute_dtype=dtype)
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=attention))
        enable_expert_lora(model)
    else:
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=attention,
                                                 target_parameters=EXPERT_TARGET_PARAMETERS))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def run_steps(model, seq: int, steps: int, device: str) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, 150_000, (1, seq), generator=g).to(device)
    cuda = device.startswith("cuda")

    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = step()  # warm-up (kernels, allocator, optimizer state)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {"seq": seq, "step_s": dt, "tokens_per_s": seq / dt, "peak_bytes": peak, "first_loss": first_loss,
            "trainable": sum(p.numel() for p in params)}


def extrapolate(lo: dict, hi: dict, l_lo: int, l_hi: int) -> dict:
    """Per-layer slope between two layer counts, extended to TARGET_LAYERS."""
    span = l_hi - l_lo
    step_per_layer = (hi["step_s"] - lo["step_s"]) / span
    step48 = hi["step_s"] + (TARGET_LAYERS - l_hi) * step_per_layer
    # A non-positive slope means timing noise swamped the layers (tiny CPU runs): report no figure, not a wrong one.
    tps = hi["seq"] / step48 if step_per_layer > 0 else None
    out = {"step_s_per_layer": step_per_layer, "step_s_48": step48, "tokens_per_s_48": tps}
    if lo["peak_bytes"] is not None:
        per_layer = (hi["peak_bytes"] - lo["peak_bytes"]) / span
        out |= {"peak_bytes_per_layer": per_layer, "peak_bytes_48": hi["peak_bytes"] + (TARGET_LAYERS - l_hi) * per_layer}
    return out


def experts_only(dims: dict, experts: int, tokens: int, steps: int, r: int, device: str) -> dict:
    """One MoE layer's experts alone, forward + backward: engine (NF4 + factors) vs peft ParamWrapper (bf16 + ΔW)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from qwen_sft.moe import ExpertEngine, NF4Experts

    cfg = Qwen3MoeConfig(**{**dims, "num_experts": experts}, num_hidden_layers=1)
    g = torch.Generator().manual_seed(0)
    h, inter, k = dims["hidden_size"], dims["moe_intermediate_size"], dims["num_experts_per_tok"]
    w1 = (torch.randn(experts, 2 * inter, h, generator=g) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(experts, h, inter, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(tokens, h, generator=g).to(device, torch.bfloat16)
    idx = torch.rand(tokens, experts, generator=g).topk(k, dim=-1).indices.to(device)
    wts = torch.softmax(torch.randn(tokens, k, generator=g), -1).to(device, torch.bfloat16)

    def stock():
        holder = torch.nn.Module()
        holder.mlp = torch.nn.Module()
        holder.mlp.experts = Qwen3MoeExperts(cfg).to(device, torch.bfloat16)
        with torch.no_grad():
            holder.mlp.experts.gate_up_proj.copy_(w1)
            holder.mlp.experts.down_proj.copy_(w2)
        model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                                                  target_parameters=EXPERT_TARGET_PARAMETERS))
        return model.base_model.model.mlp.experts

    def engine():
        eng = ExpertEngine(NF4Experts.quantize(w1.to(device)), NF4Experts.quantize(w2.to(device)))
        eng.compute_dtype = torch.bfloat16
        eng.add_lora(r, 2 * r, dtype=torch.float32)
        return eng

    out = {}
    for name, build in (("engine", engine), ("stock", stock)):
        module = build()
        cuda = device.startswith("cuda")
        times = []
        for i in range(steps + 1):  # the first call warms up
            xi = x.detach().requires_grad_()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            module(xi, idx, wts).float().pow(2).mean().backward()
            if cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        stored = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
        out[name] = {"step_s_min": min(times), "trainable": trainable, "frozen_bytes": stored,
                     "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}
        print(f"experts-only {name:6} E={experts} tokens={tokens} top-{k}: fwd+bwd min {min(times):.3f} s, "
              f"frozen expert bytes {stored / 1e6:.1f} MB, trainable {trainable:,}, "
              f"peak {_gb(out[name]['peak_bytes'])} GB", flush=True)
        del module
        _free(device)
    out["speedup"] = out["stock"]["step_s_min"] / out["engine"]["step_s_min"]
    out["frozen_bytes_ratio"] = out["engine"]["frozen_bytes"] / out["stock"]["frozen_bytes"]
    print(f"experts-only: engine/stock speed {out['speedup']:.2f}x, expert storage {out['frozen_bytes_ratio']:.3f}x")
    return out


def _gb(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 1e9:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny dimensions (CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, nargs=2, default=[1, 2], metavar=("L1", "L2"))
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="default 2048 8192 (tiny: 64)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=["engine", "stock"], choices=["engine", "stock"])
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--experts-only", type=int, default=0, metavar="E",
                   help="instead: time one layer's experts alone (E experts, --tokens tokens), engine vs peft")
    p.add_argument("--tokens", type=int, default=512, help="tokens for --experts-only")
    a = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # loading L1 layers of an L2-layer checkpoint lists every skipped tensor
    l_lo, l_hi = a.layers
    if not 0 < l_lo < l_hi:
        p.error(f"--layers needs 0 < L1 < L2, got {a.layers}")
    seqs = a.seqs or ([64] if a.tiny else [2048, 8192])
    dims, dtype = (TINY if a.tiny else REAL), torch.bfloat16
    card = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    if a.experts_only:
        res = {"device": card, "experts_only": experts_only(dims, a.experts_only, a.tokens, a.steps, a.lora_r,
                                                             a.device)}
        if a.out:
            with atomic_open(a.out) as fh:
                json.dump(res, fh, indent=2)
        return 0
    results: dict = {"device": card, "dims": dims, "layers": a.layers, "lora_r": a.lora_r, "steps": a.steps,
                     "runs": {}}
    with tempfile.TemporaryDirectory(prefix="moe_bench_") as tmp:
        base = Path(tmp) / "base"
        build_base(base, dims, l_hi, dtype, a.device)
        for variant in a.variants:
            for layers in (l_lo, l_hi):
                model = load_variant(base, variant, layers, a.lora_r, a.device, dtype)
                for seq in seqs:
                    r = run_steps(model, seq, a.steps, a.device)
                    results["runs"][f"{variant}/L{layers}/seq{seq}"] = r
                    print(f"{variant:6} layers={layers} seq={seq:5}  step {r['step_s']:.3f} s  "
                          f"{r['tokens_per_s']:9.1f} tok/s  peak {_gb(r['peak_bytes'])} GB  loss {r['first_loss']:.3f}",
                          flush=True)
                del model
                _free(a.device)
    print(f"\n{card}; extrapolated from layers {l_lo}->{l_hi} to {TARGET_LAYERS} layers (QLoRA, r={a.lora_r}, batch 1)")
    print(f"{'variant':8}{'seq':>6}{'GB/layer':>10}{'peak GB @48':>13}{'tok/s @48':>11}")
    results["extrapolated"] = {}
    for seq in seqs:
        row = {}
        for variant in a.variants:
            runs = results["runs"]
            ex = extrapolate(runs[f"{variant}/L{l_lo}/seq{seq}"], runs[f"{variant}/L{l_hi}/seq{seq}"], l_lo, l_hi)
            row[variant] = ex
            tps = "n/a" if ex["tokens_per_s_48"] is None else f"{ex['tokens_per_s_48']:.1f}"
            print(f"{variant:8}{seq:>6}{_gb(ex.get('peak_bytes_per_layer')):>10}{_gb(ex.get('peak_bytes_48')):>13}"
                  f"{tps:>11}")
        if {"engine", "stock"} <= row.keys():
            # Same-layer-count ratio (measured, no extrapolation) and the extrapolated one when both exist.
            hi_runs = [results["runs"][f"{v}/L{l_hi}/seq{seq}"]["tokens_per_s"] for v in ("engine", "stock")]
            row["speedup_measured"] = hi_runs[0] / hi_runs[1]
            e48, s48 = row["engine"]["tokens_per_s_48"], row["stock"]["tokens_per_s_48"]
            row["speedup"] = e48 / s48 if e48 and s48 else None
            speed = f"{row['speedup_measured']:.2f}x at {l_hi} layers" + \
                ("" if row["speedup"] is None else f", {row['speedup']:.2f}x extrapolated to {TARGET_LAYERS}")
            mem = ""
            if "peak_bytes_48" in row["engine"]:
                row["memory_ratio"] = row["engine"]["peak_bytes_48"] / row["stock"]["peak_bytes_48"]
                mem = f", peak memory engine/stock {row['memory_ratio']:.2f}x"
            print(f"  seq {seq}: tokens/s engine/stock {speed}{mem}")
        results["extrapolated"][str(seq)] = row
    if a.out:
        with atomic_open(a.out) as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
