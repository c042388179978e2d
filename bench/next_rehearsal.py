"""Qwen3-Coder-Next (80B-A3B) QLoRA rehearsal at the real size: the training step traced on fake tensors.

    PYTHONPATH=$PWD python -m bench.next_rehearsal configs/models/qwen3-coder-next.json --seq 2048 --seq 32768 \\
        --set "all:" --set "attn+shared:routed=0" --set "routed-r2:routed_r=2"

Every setting runs the 30B recipe's levers (configs/train/qlora_qwen3_30b.yaml: chunked loss of 256 tokens,
8-bit AdamW traced as ``adamw_bnb_8bit`` = the paged optimizer's bytes, bf16 LoRA factors, gradient
checkpointing, batch 1) on the training code's own model build (NF4 routed experts via the expert engine; NF4
attention, Gated DeltaNet projections and shared expert). The trace's layer fit traces whole 4-layer blocks
(qwen_sft/trace/fit.py). A setting is ``name:key=value,...`` over:

- ``r``: LoRA rank of attention q/k/v/o, the Gated DeltaNet's in_proj_qkvz/in_proj_ba/out_proj, the shared
  expert's gate/up/down_proj and its 1-row sigmoid gate ``shared_expert_gate`` (default 8);
- ``routed`` (0/1): LoRA on every routed expert; ``routed_r``: their rank (default ``r``). As in the shipped
  adapters, gate_proj + up_proj at rank r become the fused gate_up_proj at rank 2r, down_proj at r;
- ``shared_gate`` (0/1): LoRA on ``shared_expert_gate`` (default 1);
- ``offload`` (0/1), ``loss_chunk``, ``optim``, ``lora_dtype``, ``layers`` (fit/all): as bench/mem_levers.py;
  ``layers=N`` traces the first N decoder layers only and prints that prefix's step peak, not extrapolated, with
  the trace's CPU seconds: a 32K step is costly to trace (the Gated DeltaNet's torch fallback loops over 64-token
  chunks), and one 4-layer block at 32K tells what the 4 + 8 layer fit will cost.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from qwen_sft.model.checkpoint import ADAPTER_CONFIG

GiB = 2**30
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
DELTANET = ["in_proj_qkvz", "in_proj_ba", "out_proj"]
EXPERT = ["gate_proj", "up_proj", "down_proj"]  # the shared expert's Linears and, with the engine, routed experts
DEFAULTS = {"r": "8", "routed": "1", "routed_r": "", "shared_gate": "1", "offload": "0", "loss_chunk": "256",
            "optim": "adamw_bnb_8bit", "lora_dtype": "bfloat16", "layers": "fit", "chunk_experts": "32"}


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    from bench.mem_levers import parse_setting as parse

    return parse(text, DEFAULTS)


def adapter_config(opts: dict[str, str]) -> dict:
    """The peft adapter config of a setting (what a user would put in configs/lora/)."""
    r = int(opts["r"])
    targets = ATTENTION + DELTANET + EXPERT + (["shared_expert_gate"] if opts["shared_gate"] == "1" else [])
    cfg = {"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": targets}
    if opts["routed"] != "1":
        # No routed-expert LoRA: the shared expert's Linears are named by their full suffix, so neither peft's
        # rename nor the engine reads them as routed-expert targets (qwen_sft/train/model.py::expert_lora_spec).
        cfg["target_modules"] = ATTENTION + DELTANET + [f"shared_expert.{n}" for n in EXPERT] + (
            ["shared_expert_gate"] if opts["shared_gate"] == "1" else [])
    elif opts["routed_r"]:
        er = int(opts["routed_r"])
        # peft takes the first matching pattern key: the shared expert's down_proj keeps rank r; the engine reads
        # the bare gate_up_proj/down_proj keys (qwen_sft/moe/install.py::ExpertLoraSpec.from_lora_config).
        cfg["rank_pattern"] = {"shared_expert.down_proj": r, "gate_up_proj": 2 * er, "down_proj": er}
        cfg["alpha_pattern"] = {"shared_expert.down_proj": 2 * r, "gate_up_proj": 4 * er, "down_proj": 2 * er}
    return cfg


def run_setting(config, opts: dict[str, str], seq: int, tmp: Path):
    from bench.mem_levers import loss_fn, patched_trace
    from qwen_sft.trace import StepPlan, measure
    from qwen_sft.train.args import ModelArguments

    adapter = tmp / ADAPTER_CONFIG
    adapter.write_text(json.dumps(adapter_config(opts)))
    model_args = ModelArguments(model_name_or_path="trace", use_qlora=True, peft_config_path=str(adapter),
                                lora_dtype=opts["lora_dtype"])
    plan = StepPlan(seq=seq, loss_fn=loss_fn(True, opts["offload"] == "1", int(opts["loss_chunk"])))
    t0 = time.perf_counter()
    with patched_trace(None, int(opts["chunk_experts"])):
        m = measure(config, model_args, plan, gradient_checkpointing=True, optim=opts["optim"],
                    layers=opts["layers"])
    return m, time.perf_counter() - t0


def run_block(config, opts: dict[str, str], seq: int, tmp: Path) -> dict:
    """``layers=N``: one trace of the first N layers (the fit's first half, when N is a block), no extrapolation."""
    from bench.mem_levers import loss_fn, patched_trace
    from qwen_sft.trace import StepPlan
    from qwen_sft.trace.run import trace
    from qwen_sft.train.args import ModelArguments

    adapter = tmp / ADAPTER_CONFIG
    adapter.write_text(json.dumps(adapter_config(opts)))
    model_args = ModelArguments(model_name_or_path="trace", use_qlora=True, peft_config_path=str(adapter),
                                lora_dtype=opts["lora_dtype"])
    plan = StepPlan(seq=seq, loss_fn=loss_fn(True, opts["offload"] == "1", int(opts["loss_chunk"])))
    t0, c0 = time.perf_counter(), time.process_time()
    with patched_trace(None, int(opts["chunk_experts"])):
        t = trace(config, model_args, plan=plan, gradient_checkpointing=True, optim=opts["optim"],
                  layers=int(opts["layers"]))
    r = t.result
    return {"peak": r.peak_bytes, "peak_phase": r.peak_phase, "breakdown": r.breakdown, "phase_peaks": r.phase_peaks,
            "static": t.static, "trainable": t.trainable, "traced": f"first {t.layers} layers only",
            "build_seconds": round(t.build_seconds, 1), "step_seconds": round(r.seconds, 1),
            "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="config.json of the model (configs/models/qwen3-coder-next.json, or a tiny one)")
    p.add_argument("--seq", type=int, action="append", help="tokens of the micro-batch (repeatable; default 2048)")
    p.add_argument("--set", dest="settings", action="append", default=[], help="name:key=value,... (repeatable)")
    p.add_argument("--json", help="also write the reports here")
    a = p.parse_args(argv)
    from transformers import AutoConfig

    path = Path(a.config)
    if path.name != "config.json":  # AutoConfig reads a folder's config.json: hand it the file under that name
        tmpdir = tempfile.TemporaryDirectory()
        (Path(tmpdir.name) / "config.json").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
        path = Path(tmpdir.name) / "config.json"
    config = AutoConfig.from_pretrained(str(path.parent))
    rows = []
    for seq in a.seq or [2048]:
        for text in a.settings or ["all:"]:
            name, opts = parse_setting(text)
            if opts["layers"].isdigit():
                with tempfile.TemporaryDirectory() as tmp:
                    row = {"name": name, "seq": seq, "opts": opts, **run_block(config, opts, seq, Path(tmp))}
                rows.append(row)
                print(f"{name:<16} seq {seq:>6}: {row['traced']}: peak {row['peak'] / GiB:6.2f} GiB at the "
                      f"{row['peak_phase']}  ({row['seconds']:.0f} s wall, {row['cpu_seconds']:.0f} s CPU)", flush=True)
                for k, v in row["breakdown"].items():
                    print(f"    {k:<52}{v / GiB:8.3f}")
                if a.json:
                    Path(a.json).write_text(json.dumps(rows, indent=1))
                continue
            with tempfile.TemporaryDirectory() as tmp:
                m, secs = run_setting(config, opts, seq, Path(tmp))
            rep = m.report
            breakdown = {row.name: row.bytes for row in rep.rows}
            rows.append({"name": name, "seq": seq, "opts": opts, "adapter": adapter_config(opts), "peak": rep.peak,
                         "planned": rep.planned, "peak_phase": rep.peak_phase, "host": rep.host_bytes,
                         "breakdown": breakdown, "trainable": m.trainable, "traced": m.traced_layers,
                         "engine": m.engine_summary, "seconds": round(secs, 1)})
            print(f"{name:<16} seq {seq:>6}: peak {rep.peak / GiB:6.2f} GiB at the {rep.peak_phase:<10} "
                  f"planned {rep.planned / GiB:6.2f}  host {rep.host_bytes / GiB:5.2f}  trainable {m.trainable:,} "
                  f"({secs:.0f} s, {m.traced_layers})", flush=True)
            for k, v in breakdown.items():
                print(f"    {k:<52}{v / GiB:8.3f}")
            for row in rep.allowance:
                print(f"    allowance: {row.name:<41}{row.bytes / GiB:8.3f}")
            if a.json:  # after every setting: a long run killed half-way keeps what it measured
                Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
