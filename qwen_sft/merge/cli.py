"""``qwen-sft merge`` / ``merge_adapter.py``: merge a LoRA or QLoRA adapter into a bf16 checkpoint, verified.

    python merge_adapter.py --base_model_path Qwen/Qwen3-Coder-30B-A3B-Instruct \\
        --adapter_path checkpoints/qwen3_30b_qlora --output_path checkpoints/merged_model
    qwen-sft merge --base_model_path BASE --train_adapters_path ADAPTER --output_path OUT --all_checkpoints

Order of work: parse → validate every input (adapter config and weights, base headers, shapes) before
reading a single base weight → stream the merge shard by shard into a temporary directory → copy
config, generation config and tokenizer → verify logits → rename into place. Any failure leaves no
output directory (an existing one is left untouched) and exits non-zero with the reason.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from qwen_sft.cli_options import OptionParser, parse_or_exit
from qwen_sft.merge.adapter import Adapter, MergeError, find_tokenizer_dir, read_adapter
from qwen_sft.merge.options import MergeOptions, merge_parser
from qwen_sft.merge.plan import BaseCheckpoint, plan_merge, read_base
from qwen_sft.merge.trained_with import TrainConfigError, read_trained_with
from qwen_sft.merge.verify import FLIP_FACTOR
from qwen_sft.model.checkpoint import ADAPTER_CONFIG

OWNER_FILE = ".merge_owner_pid"  # inside the temporary directory: lets a later merge remove it after a kill -9


def build_parser(prog: str = "qwen-sft merge") -> OptionParser:
    return merge_parser(prog)


def _checkpoint_key(path: Path) -> tuple[int, str]:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return (int(m.group(1)) if m else sys.maxsize, path.name)


def find_jobs(adapter_root: Path, all_checkpoints: bool) -> list[tuple[Path, str]]:
    """(adapter dir, output sub-directory) pairs: the adapter itself, plus checkpoint-* when asked."""
    jobs = [(adapter_root, ".")] if (adapter_root / ADAPTER_CONFIG).is_file() else []
    if all_checkpoints:
        ckpts = sorted((d for d in adapter_root.glob("checkpoint-*") if d.is_dir()), key=_checkpoint_key)
        jobs += [(d, d.name) for d in ckpts]
        if not jobs:
            raise MergeError(f"--all_checkpoints: {adapter_root} holds neither an adapter nor checkpoint-* directories")
    return jobs or [(adapter_root, ".")]  # read_adapter explains what is missing


def check_paths(out: Path, base: Path, adapter_root: Path) -> None:
    """Refuse an output that would replace or sit inside an input (the rename would destroy it), or a file."""
    if out.exists() and not out.is_dir():
        raise MergeError(f"--output_path {out} is an existing file, not a directory; remove it or choose another path")
    for name, src in (("--base_model_path", base), ("--adapter_path", adapter_root)):
        src = src.resolve()
        if out == src or out in src.parents or src in out.parents:
            raise MergeError(f"--output_path {out} overlaps {name} {src}; choose a separate directory")


def trained_with(adapter: Adapter, adapter_dir: Path, adapter_root: Path, say: bool) -> None:
    """Take how the adapter was trained from the run's own train_config.yaml; only without one does the guess
    from other config files (read_adapter's) stand, and the merge says which it used."""
    trained = read_trained_with(adapter_dir, adapter_root)
    if trained.source is not None:
        adapter.quantized_training = trained.quantized_training
    if say:
        print(trained.describe() if trained.source is not None or adapter.quantized_training is None else
              f"{trained.describe()}: {adapter.quantized_training}")


def _summary(adapter: Adapter, plan: dict) -> str:
    kinds = {"lora": 0, "expert": 0, "replace": 0}
    for delta in plan.values():
        kinds[delta.kind] += 1
    return (f"{adapter.path}: {len(adapter.pairs)} LoRA pairs → {kinds['lora']} linear + {kinds['expert']} "
            f"per-expert tensors, {kinds['replace']} modules_to_save tensors")


def _notes(adapter: Adapter, base: BaseCheckpoint, base_arg: str) -> list[str]:
    notes = list(adapter.notes)
    trained_on = adapter.base_model_name_or_path
    if trained_on and Path(trained_on).name.lower() != Path(base_arg.rstrip("/")).name.lower():
        notes.append(f"the adapter was trained on {trained_on!r}, merging into {base_arg!r} (every shape matches)")
    if adapter.quantized_training:
        notes.append(f"QLoRA adapter ({adapter.quantized_training}): trained against 4/8-bit base weights, merged into "
                     "the 16-bit base, so the merged model differs slightly from the quantized model of training")
    return notes


def remove_stale_temps(out: Path) -> None:
    """Temporary directories of merges into ``out`` that were killed (-9, power loss) hold a full model copy each;
    remove those whose owning process is gone. (Any other exit removes its own: atomic_dir and on_sigterm.)"""
    import os
    import shutil

    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        try:
            pid = int((tmp / OWNER_FILE).read_text(encoding="ascii"))
        except (OSError, ValueError):
            continue  # not ours, or still being created
        try:
            os.kill(pid, 0)
            continue  # that merge is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}, left by an interrupted merge (process {pid})")


def on_sigterm(signum, frame) -> None:
    # SIGTERM (kill, a scheduler's time limit) would end Python without unwinding, leaving the temporary copy.
    raise KeyboardInterrupt


def run(opts: MergeOptions) -> int:
    import os

    from qwen_sft.atomic import atomic_dir
    from qwen_sft.merge.assets import write_assets, write_info
    from qwen_sft.merge.stream import merge_shards

    out = Path(opts.output_path).resolve()
    adapter_root = Path(opts.adapter_path)
    jobs = find_jobs(adapter_root, opts.all_checkpoints)
    # Validate the base and every adapter (against the base) before any weight is read; report all at once.
    work, errors = [], []
    try:
        base = read_base(opts.base_model_path)
        check_paths(out, base.path, adapter_root)
    except MergeError as err:
        base = None
        errors.append(str(err))
    for adapter_dir, sub in jobs:
        try:
            adapter = read_adapter(adapter_dir, fallback_dirs=(adapter_root,) if sub != "." else ())
            trained_with(adapter, adapter_dir, adapter_root, say=True)
            if base is None:
                continue
            plan = plan_merge(adapter, base)
            if adapter.tokenizer_dir is None and find_tokenizer_dir(base.path) is None:
                raise MergeError(f"no tokenizer beside {adapter_dir} or in {base.path}; the merged model needs one")
            print(_summary(adapter, plan))
            for note in _notes(adapter, base, opts.base_model_path):
                print(f"note: {note}")
            work.append((adapter_dir, sub))
            del adapter, plan  # re-read at merge time: with --all_checkpoints, hold one adapter at a time
        except (MergeError, TrainConfigError) as err:
            errors.append(str(err))
    if errors or base is None:
        raise MergeError("\n".join(errors))

    remove_stale_temps(out)
    with atomic_dir(out) as tmp:
        (tmp / OWNER_FILE).write_text(str(os.getpid()), encoding="ascii")
        for adapter_dir, sub in work:
            adapter = read_adapter(adapter_dir, fallback_dirs=(adapter_root,) if sub != "." else ())
            trained_with(adapter, adapter_dir, adapter_root, say=False)
            plan = plan_merge(adapter, base)
            adapter.pairs.clear()  # the plan holds every factor it needs (experts regrouped); free the originals
            target = tmp / sub
            target.mkdir(parents=True, exist_ok=True)
            stats = merge_shards(base, plan, target, dtype=opts.dtype)
            sources = write_assets(base, adapter, target, opts.dtype)
            print(f"wrote {stats.tensors} tensors in {stats.shards} shards ({stats.bytes_written / 2**20:.1f} MiB); "
                  f"tokenizer from {sources['tokenizer']}")
            if stats.unchanged_after_rounding:
                print(f"note: {len(stats.unchanged_after_rounding)} adapted tensors are unchanged after {opts.dtype} "
                      f"rounding (ΔW too small), e.g. {stats.unchanged_after_rounding[0]}")
            info = {"base_model_path": opts.base_model_path, "adapter_path": str(adapter.path), "dtype": opts.dtype,
                    "adapter_sha256": adapter.weights_sha256, "adapted_tensors": stats.adapted,
                    "tensors": stats.tensors, "sources": sources, "verification": None}
            if not opts.no_verify:
                result = _verify(base, adapter, target, opts)
                info["verification"] = {k: (float(f"{v:.3g}") if isinstance(v, float) else v)
                                        for k, v in result.as_dict().items()}
            write_info(target, info)
        (tmp / OWNER_FILE).unlink()
    print(f"merged model written to {out}")
    return 0


def _verify(base: BaseCheckpoint, adapter: Adapter, merged: Path, opts: MergeOptions):
    from qwen_sft.merge.verify import verify_merge

    r = verify_merge(base.path, adapter.path, merged, merged, opts.verify_device, opts.verify_atol, opts.verify_rtol)
    print(f"verify: max |Δlogit| merged vs base+adapter = {r.max_abs_diff:.4g} over {r.tokens} positions, "
          f"p90 {r.p90_abs_diff:.4g} (tolerance {r.tolerance:.4g} for p90, {FLIP_FACTOR * r.tolerance:.4g} for max; "
          f"max |logit| {r.max_abs_logit:.4g}; adapter effect {r.adapter_effect:.4g}; "
          f"bf16 floor {'not measured' if r.bf16_floor is None else f'{r.bf16_floor:.4g}'}: peft's own merge, p90)")
    if not r.passed:
        raise MergeError(f"verification failed for {adapter.path}: max |Δlogit| {r.max_abs_diff:.4g}, p90 "
                         f"{r.p90_abs_diff:.4g}, tolerance {r.tolerance:.4g}. The merged weights do not reproduce "
                         "base + adapter; nothing was written. (--verify_atol/--verify_rtol raise the tolerance.)")
    if not r.distinguishable:
        print("note: the adapter changes the logits by less than twice the tolerance; this check cannot tell "
              "the merged model from the base (an untrained or tiny adapter)")
    return r


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    (opts,) = parse_or_exit(build_parser(), argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        return run(opts)
    except MergeError as err:
        print(f"merge: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, read-only or permission denied: the reason, not a traceback
        print(f"merge: error: cannot write the merged model: {err.strerror or err}"
              f"{f' ({err.filename})' if err.filename else ''}; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("merge: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
