"""``qwen-sft estimate … --trace`` and the dry run's rehearsal: options in, printed report out.

    qwen-sft estimate ../shared/spec/qwen3-coder-30b-a3b-instruct/config.json --mode qlora --seq 2048 --trace
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from qwen_sft.model.checkpoint import ADAPTER_CONFIG
from qwen_sft.trace import Measured, Sharding, StepPlan, measure, render
from qwen_sft.trace.report import GiB

OPTIM = {"adamw": "adamw_torch", "adamw8bit": "adamw_bnb_8bit"}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_memory(text: str) -> int:
    """``24GB`` (10^9), ``80GiB`` (2^30), ``24G`` (GiB, as nvidia-smi reports) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|G|MiB|MB|M)?\s*", text or "")
    if not m:
        raise ValueError(f"gpu memory {text!r}: expected a size like 24GB, 80GiB or 24G")
    unit = {"GiB": 2**30, "G": 2**30, None: 2**30, "GB": 10**9, "MiB": 2**20, "M": 2**20, "MB": 10**6}[m[2]]
    return int(float(m[1]) * unit)


def routing_note(routing: str) -> str:
    if routing == "uniform":
        return ("routing assumed: uniform (each token to K distinct experts drawn uniformly; --routing skewed: every "
                "token to the same K experts, the engine's worst case for one chunk). The saved activations do not "
                "depend on routing (T x K routed rows either way); the engine's per-chunk transients do.")
    return ("routing assumed: skewed (every token to the same K experts): all T x K routed rows in one chunk of "
            "the engine, its largest transient; uniform routing spreads them over every chunk.")


def fits_line(measured: Measured, gpu_memory: int) -> tuple[bool, str]:
    planned = measured.report.planned
    ok = planned <= gpu_memory
    verdict = "fits" if ok else "DOES NOT FIT"
    return ok, (f"{verdict}: {planned / GiB:.2f} GiB planned (traced peak {measured.report.peak / GiB:.2f} GiB + "
                f"allowance) vs {gpu_memory / GiB:.2f} GiB of GPU memory")


def trace_estimate(cfg_path: Path, shape, opts, formula, *, routing: str, layers: str, checkpointing: bool,
                   accumulating: bool, gpu_memory: str | None, loss_fn=None, loss_line: str = "") -> int:
    from transformers import AutoConfig

    from qwen_sft.train.args import ModelArguments

    config = AutoConfig.from_pretrained(str(cfg_path.parent))
    memory = parse_memory(gpu_memory) if gpu_memory else None
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / ADAPTER_CONFIG
        # The fused expert names carry rank r as given (the seed's gate_proj + up_proj pair would mean rank 2r).
        targets = ATTENTION + (["gate_up_proj", "down_proj"] if opts.expert_lora else [])
        adapter.write_text(json.dumps({"r": opts.lora_r, "lora_alpha": 2 * opts.lora_r, "lora_dropout": 0.0,
                                       "target_modules": targets}), encoding="utf-8")
        model_args = ModelArguments(model_name_or_path=str(cfg_path.parent), use_peft=opts.mode != "full",
                                    use_qlora=opts.mode == "qlora", peft_config_path=str(adapter),
                                    bnb_4bit_use_double_quant=opts.double_quant,
                                    expert_engine=opts.expert_lora or opts.mode != "full")
        sharding = Sharding(world=opts.gpus, zero=opts.zero, offload_optimizer=opts.offload,
                            offload_params=opts.offload and opts.zero == 3)
        plan = StepPlan(seq=opts.seq, batch=opts.batch, accumulating=accumulating, routing=routing, loss_fn=loss_fn)
        measured = measure(config, model_args, plan, gradient_checkpointing=checkpointing,
                           optim=OPTIM[opts.optim], sharding=sharding, layers=layers,
                           deepspeed_zero3=opts.zero == 3)
    print(render_measured(measured, shape.name, str(cfg_path), opts_line(opts, checkpointing, accumulating) + loss_line,
                          routing, formula, checkpointing))
    if memory is not None:
        ok, line = fits_line(measured, memory)
        print(line)
        return 0 if ok else 1
    return 0


def opts_line(opts, checkpointing: bool, accumulating: bool) -> str:
    return (f"mode {opts.mode}, seq {opts.seq}, batch {opts.batch}, lora r {opts.lora_r}, optim {opts.optim}, "
            f"gpus {opts.gpus}, zero {opts.zero or 'none'}, gradient checkpointing {'on' if checkpointing else 'off'}, "
            f"{'a micro-step accumulating into earlier gradients' if accumulating else 'the first micro-step'}")


def render_measured(measured: Measured, name: str, source: str, options: str, routing: str, formula=None,
                    checkpointing: bool = True) -> str:
    header = [f"traced: {name} from {source} on fake tensors (nothing allocated; {measured.traced_layers}; "
              f"{measured.seconds:.0f} s)",
              options,
              f"trainable parameters: {measured.trainable:,}" + (f"; {measured.engine_summary}"
                                                                 if measured.engine_summary else ""),
              routing_note(routing)]
    return render(measured.report, header, formula=formula, checkpointing=checkpointing)
