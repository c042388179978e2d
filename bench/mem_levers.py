"""Issue 14's memory levers, each traced on fake tensors at the real size (qwen_sft.trace): one line per setting.

    PYTHONPATH=$PWD python bench/mem_levers.py ../shared/spec/qwen3-coder-30b-a3b-instruct/config.json \\
        --seq 2048 --set "recipe:chunked_loss=1,optim=adamw_bnb_8bit,lora_dtype=bfloat16" --set "hf:chunked_loss=0"

A setting is ``name:key=value,...`` over: ``chunked_loss`` (0/1, qwen_sft/train/loss.py), ``optim`` (a Trainer
optim name: adamw_torch, adamw_bnb_8bit, paged_adamw_8bit), ``foreach`` (0/1/none: torch AdamW's multi-tensor
update), ``lora_dtype`` (float32/bfloat16), ``offload`` (0/1: activations saved outside the checkpointed layers
go to the host, as --offload_activations does), ``chunk_experts`` (the engine's dequantize chunk), ``expert_lora``
(0/1), ``tile_rows`` (the engine's routed rows per token tile, ``expert_tile_rows``; 0: never tile), ``loss_chunk`` (tokens per lm_head chunk of the chunked loss), ``checkpointing`` (0/1), ``layers`` (fit/all). The trace counts a paged optimizer's state (CUDA managed
memory, invisible to ``torch.cuda.max_memory_allocated``) as optimizer state: same bytes, on the card.
The model, engine, LoRA, loss and optimizer are the training code's own (qwen_sft.train, qwen_sft.moe).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import tempfile
import time
from pathlib import Path

from torch.nn import functional as F

GiB = 2**30
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULTS = {"chunked_loss": "1", "optim": "adamw_torch", "foreach": "none", "lora_dtype": "float32", "offload": "0",
            "chunk_experts": "32", "expert_lora": "1", "checkpointing": "1", "layers": "fit", "r": "8",
            "loss_chunk": "1024", "adapter": "fused", "tile_rows": "65536"}


def parse_setting(text: str, defaults: dict[str, str] = DEFAULTS) -> tuple[str, dict[str, str]]:
    """``NAME:key=value,…`` → (NAME, ``defaults`` with those keys replaced); an unknown key ends the run."""
    name, _, body = text.partition(":")
    opts = dict(defaults)
    for kv in filter(None, body.split(",")):
        k, _, v = kv.partition("=")
        if k not in defaults:
            raise SystemExit(f"setting {name!r}: unknown key {k!r} (known: {', '.join(defaults)})")
        opts[k] = v
    return name, opts


def loss_fn(chunked: bool, offload: bool, chunk_tokens: int = 1024):
    from qwen_sft.trace.step import offload_to_host
    from qwen_sft.train.loss import causal_lm, chunked_lm_loss, forward_hidden

    def fn(model, batch):
        with offload_to_host() if offload else contextlib.nullcontext():
            if not chunked:
                return model(**batch).loss
            inputs = dict(batch)
            labels = inputs.pop("labels")
            causal = causal_lm(model)
            hidden, _ = forward_hidden(model, causal, inputs)
            # The lm_head as a plain function (same op): the tracker's module hooks allow one call per module.
            head = functools.partial(F.linear, weight=causal.lm_head.weight)
            return chunked_lm_loss(hidden, head, labels, position_ids=inputs.get("position_ids"),
                                   chunk_tokens=chunk_tokens)
    return fn


@contextlib.contextmanager
def patched_trace(foreach: bool | None, chunk_experts: int, tile_rows: int = 65_536):
    """The trace's optimizer is the trainer's (qwen_sft.train.optim, with foreach); the engine's chunk and routed-row
    tile set (``expert_tile_rows``, as qwen_sft/train/run.py sets it; 0: never tile)."""
    import qwen_sft.trace.run as trun
    from qwen_sft.moe.experts import ExpertEngine
    from qwen_sft.train.optim import make_optimizer

    orig_opt, orig_build = trun.make_optimizer, trun.build_model

    def opt(model, optim, learning_rate=1e-4, training_args=None):
        from transformers import TrainingArguments

        args = training_args or TrainingArguments(output_dir="/nonexistent-trace", optim=optim,
                                                  learning_rate=learning_rate, use_cpu=True, report_to="none")
        if "bnb" in optim or "8bit" in optim:
            # bitsandbytes builds its 8-bit code tables with data-dependent ops in __init__: on real tensors.
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                return make_optimizer(model, args, foreach=foreach)
        return make_optimizer(model, args, foreach=foreach)

    def build(*a, **kw):
        built = orig_build(*a, **kw)
        for m in built.model.modules():
            if isinstance(m, ExpertEngine):
                m.chunk_experts = chunk_experts
                m.max_routed_rows = tile_rows or None
        return built

    trun.make_optimizer, trun.build_model = opt, build
    try:
        yield
    finally:
        trun.make_optimizer, trun.build_model = orig_opt, orig_build


@contextlib.contextmanager
def largest_at_peak(n: int, found: list):
    """The trace's tracker, also keeping the ``n`` largest live device tensors (op, shape, dtype, category, module)
    each time the peak has grown by 32 MiB: what holds the peak. Appends each tracker to ``found``."""
    import qwen_sft.trace.step as tstep
    from qwen_sft.trace.tracker import PeakTracker

    class Labelled(PeakTracker):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self._op, self._labels, self._shot_at, self.largest = "", {}, 0, None
            found.append(self)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self._op = str(func)
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _new_info(self, st, t, reftype):
            winfo = super()._new_info(st, t, reftype)
            where = [p for p in self._mod_tracker.parents if p != "Global"]
            self._labels[id(winfo)] = (self._op, tuple(t.shape), str(t.dtype).removeprefix("torch."),
                                       max(where, key=len) if where else "")
            return winfo

        def _update_peak_stats(self, peak_state) -> None:
            before = self.peak_bytes
            super()._update_peak_stats(peak_state)
            if self.peak_bytes > before and self.peak_bytes - self._shot_at >= 32 * 2**20:
                self._shot_at = self.peak_bytes
                live = [(w.mem_consumed, w.category, self._labels.get(id(w), ("?", (), "", "")))
                        for w, _ in self._WINFO.values() if w.device == self.device]
                self.largest = (self.peak_bytes, self.phase, sorted(live, key=lambda r: -r[0])[:n])

    original = tstep.PeakTracker
    tstep.PeakTracker = Labelled
    try:
        yield
    finally:
        tstep.PeakTracker = original


def print_largest(tracker) -> None:
    peak, phase, rows = tracker.largest
    print(f"    largest live tensors near the {phase} peak of this trace ({peak / GiB:.2f} GiB, "
          f"{tracker.regions and 'traced layers only'}):")
    for nbytes, category, (op, shape, dtype, where) in rows:
        print(f"      {nbytes / 2**20:9.1f} MiB  {category:<32} {op:<40} {str(list(shape)):<18} {dtype:<9} {where}")


def run_setting(config, opts: dict[str, str], seq: int, tmp: Path, largest: int = 0):
    from qwen_sft.model.checkpoint import ADAPTER_CONFIG
    from qwen_sft.trace import StepPlan, measure
    from qwen_sft.train.args import ModelArguments

    r = int(opts["r"])
    targets = ATTENTION + (["gate_up_proj", "down_proj"] if opts["expert_lora"] == "1" else [])
    if opts["adapter"] == "seed":  # the shipped configs/lora: gate_proj + up_proj at r each -> fused gate_up at 2r
        targets = ATTENTION + (["gate_proj", "up_proj", "down_proj"] if opts["expert_lora"] == "1" else [])
    adapter = tmp / ADAPTER_CONFIG
    adapter.write_text(json.dumps({"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": targets}))
    model_args = ModelArguments(model_name_or_path="trace", use_qlora=True, peft_config_path=str(adapter),
                                lora_dtype=opts["lora_dtype"])
    plan = StepPlan(seq=seq, loss_fn=loss_fn(opts["chunked_loss"] == "1", opts["offload"] == "1",
                                          int(opts["loss_chunk"])))
    foreach = None if opts["foreach"] == "none" else opts["foreach"] == "1"
    t0 = time.perf_counter()
    trackers: list = []
    with patched_trace(foreach, int(opts["chunk_experts"]), int(opts["tile_rows"])), \
            largest_at_peak(largest, trackers) if largest else contextlib.nullcontext():
        m = measure(config, model_args, plan, gradient_checkpointing=opts["checkpointing"] == "1",
                    optim=opts["optim"], layers=opts["layers"])
    if trackers and trackers[-1].largest:
        print_largest(trackers[-1])
    return m, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="config.json of the model (the real 30B-A3B's, or a tiny one)")
    p.add_argument("--seq", type=int, action="append", help="tokens of the micro-batch (repeatable; default 2048)")
    p.add_argument("--set", dest="settings", action="append", default=[], help="name:key=value,... (repeatable)")
    p.add_argument("--json", help="also write the reports here")
    p.add_argument("--largest", type=int, default=0,
                   help="also print the N largest live tensors at the peak of the (last) traced model")
    a = p.parse_args(argv)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(Path(a.config).parent))
    rows = []
    for seq in a.seq or [2048]:
        for text in a.settings or ["default:"]:
            name, opts = parse_setting(text)
            with tempfile.TemporaryDirectory() as tmp:
                m, secs = run_setting(config, opts, seq, Path(tmp), a.largest)
            rep = m.report
            breakdown = {row.name: row.bytes for row in rep.rows}
            rows.append({"name": name, "seq": seq, "opts": opts, "peak": rep.peak, "planned": rep.planned,
                         "peak_phase": rep.peak_phase, "host": rep.host_bytes, "breakdown": breakdown,
                         "traced": m.traced_layers, "seconds": round(secs, 1)})
            print(f"{name:<24} seq {seq:>6}: peak {rep.peak / GiB:6.2f} GiB at the {rep.peak_phase:<10} "
                  f"planned {rep.planned / GiB:6.2f}  host {rep.host_bytes / GiB:5.2f}  ({secs:.0f} s, "
                  f"{m.traced_layers})", flush=True)
            for k, v in breakdown.items():
                print(f"    {k:<48}{v / GiB:8.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
