"""Per-GPU memory under sequence parallelism, traced: one rank of an ``sp``-rank Ulysses group on fake tensors.

    PYTHONPATH=$PWD python bench/sp_rehearsal.py ../shared/spec/qwen3-coder-30b-a3b-instruct/config.json \\
        --seq 262144 --sp 8 --set "recipe:optim=paged_adamw_8bit,lora_dtype=bfloat16,adapter=seed"

What is traced is the training code's own SP path for rank 0 of the group, not a formula: torch's fake process
group (``FakeStore``, backend "fake", world ``sp``) stands in for the other ranks, DeepSpeed's
``UlyssesSPAttentionHF`` is registered on it exactly as accelerate does, and the step runs
``qwen_sft.train.sp.lm_loss`` (chunked loss of the rank's slice, sums reduced over the group) on the rank's
``seq / sp`` tokens. DeepSpeed's all-to-alls have fake kernels, so every exchanged tensor has its real shape
(``[sp, seq/sp, heads/sp, head_dim]`` per q/k/v, the KV heads repeated when ``sp`` exceeds them) and is counted;
attention itself runs over the whole ``seq`` for ``heads/sp`` heads. The model, expert engine, QLoRA, optimizer
and the memory levers are bench/mem_levers.py's (same ``--set`` keys). The sequence is one sample (no packing),
so the core attention is transformers' sdpa, which ``qwen_sft.train.sp.packed_sdpa`` calls once per sample.
ZeRO-2's sharding of the LoRA gradients and optimizer state over the ``sp`` ranks is not applied: those lines
are one rank's whole copy (an upper bound; a few hundred MiB for LoRA).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
import types
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Run as a script (bench/ first on sys.path): the repository root, for an uninstalled checkout.
sys.path.insert(0, str(_HERE.parent))

from torch.nn import functional as F  # noqa: E402

from qwen_sft.model.checkpoint import ADAPTER_CONFIG  # noqa: E402


def _load_mem_levers():
    """bench/ is not a package: mem_levers.py by its path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mem_levers", _HERE / "mem_levers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mem_levers = _load_mem_levers()

GiB = 2**30


def fake_group(world: int, config) -> object:
    """torch's fake process group of ``world`` ranks (this process is rank 0) and DeepSpeed's Ulysses attention on it."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    deepspeed.init_distributed(dist_backend="fake")
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=types.SimpleNamespace(config=config), core_attn_implementation="sdpa",
        sequence_parallel_size=world, micro_batch_size=1, seq_length_is_variable=True)
    return mpu.get_sequence_parallel_group()


@contextlib.contextmanager
def counted_exchanges(seen: list):
    """Record the shape of every Ulysses all-to-all input: the evidence that the traced step ran the SP path."""
    from deepspeed.runtime.sequence_parallel import ulysses_sp

    orig = ulysses_sp._dim_zero_all_to_all

    def counted(group, tensor):
        seen.append(tuple(tensor.shape))
        return orig(group, tensor)

    ulysses_sp._dim_zero_all_to_all = counted
    try:
        yield
    finally:
        ulysses_sp._dim_zero_all_to_all = orig


def sp_loss_fn(group, offload: bool, chunk_tokens: int):
    """What ``SFTTrainer._sp_compute_loss`` runs on rank 0's slice (its labels shifted, as the SP adapter does)."""
    from qwen_sft.train.loss import causal_lm, shifted_targets
    from qwen_sft.train.sp import lm_loss

    def fn(model, batch):
        with mem_levers.offload_to_host() if offload else contextlib.nullcontext():
            causal = causal_lm(model)
            # The lm_head as a plain function (same op): the tracker's module hooks allow one call per module.
            head = types.SimpleNamespace(model=causal.model,
                                         lm_head=functools.partial(F.linear, weight=causal.lm_head.weight))
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                      "shift_labels": shifted_targets(batch["labels"], batch["position_ids"])}
            loss, _ = lm_loss(model, head, inputs, None, chunk_tokens, group, data_parallel=1)
            return loss
    return fn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="config.json of the model")
    p.add_argument("--seq", type=int, default=262_144, help="tokens of the whole sequence (all ranks together)")
    p.add_argument("--sp", type=int, default=8, help="sequence-parallel ranks")
    p.add_argument("--set", dest="setting", default="recipe:", help="name:key=value,... as bench/mem_levers.py")
    p.add_argument("--json", help="also write the report here")
    a = p.parse_args(argv)
    from transformers import AutoConfig

    from qwen_sft.trace import StepPlan, measure
    from qwen_sft.train.args import ModelArguments
    from qwen_sft.train.sp import model_problems

    config = AutoConfig.from_pretrained(str(Path(a.config).parent))
    problems = model_problems(a.sp, config, world_size=a.sp)
    if problems or a.seq % a.sp:
        raise SystemExit("; ".join(problems) or f"--seq {a.seq} must be a multiple of --sp {a.sp}")
    name, opts = mem_levers.parse_setting(a.setting)
    group = fake_group(a.sp, config)
    local = a.seq // a.sp
    r = int(opts["r"])
    targets = mem_levers.ATTENTION + (["gate_up_proj", "down_proj"] if opts["expert_lora"] == "1" else [])
    if opts["adapter"] == "seed":
        targets = mem_levers.ATTENTION + (["gate_proj", "up_proj", "down_proj"] if opts["expert_lora"] == "1" else [])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / ADAPTER_CONFIG
        adapter.write_text(json.dumps({"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": targets}))
        model_args = ModelArguments(model_name_or_path="trace", use_qlora=True, peft_config_path=str(adapter),
                                    lora_dtype=opts["lora_dtype"])
        plan = StepPlan(seq=local, loss_fn=sp_loss_fn(group, opts["offload"] == "1", int(opts["loss_chunk"])))
        foreach = None if opts["foreach"] == "none" else opts["foreach"] == "1"
        seen: list = []
        with mem_levers.patched_trace(foreach, int(opts["chunk_experts"])), counted_exchanges(seen):
            m = measure(config, model_args, plan, gradient_checkpointing=opts["checkpointing"] == "1",
                        optim=opts["optim"], layers=opts["layers"])
    secs = time.perf_counter() - t0
    rep = m.report
    row = {"name": name, "seq": a.seq, "sp": a.sp, "tokens_per_rank": local, "opts": opts, "peak": rep.peak,
           "planned": rep.planned, "peak_phase": rep.peak_phase, "host": rep.host_bytes,
           "breakdown": {x.name: x.bytes for x in rep.rows}, "traced": m.traced_layers, "seconds": round(secs, 1),
           "all_to_all_shapes": sorted({str(x) for x in seen}), "all_to_alls": len(seen)}
    print(f"{name}: seq {a.seq} over sp {a.sp} ({local} tokens per rank): peak {rep.peak / GiB:.2f} GiB per GPU at "
          f"the {rep.peak_phase}, planned {rep.planned / GiB:.2f}, host {rep.host_bytes / GiB:.2f} ({secs:.0f} s, "
          f"{m.traced_layers})", flush=True)
    print("\n".join(f"  {k:<48} {v / GiB:8.3f} GiB" for k, v in row["breakdown"].items()))
    print(f"  Ulysses all-to-alls traced: {len(seen)} (forward and checkpoint recompute; the backward exchanges are the op's own), inputs "
          f"{', '.join(row['all_to_all_shapes'])}")
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
