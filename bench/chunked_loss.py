"""Chunked cross-entropy vs the full-logits loss on CPU: forward + backward time and peak memory, same run, ratios.

    python bench/chunked_loss.py                       # tokens 4096, hidden 256, Qwen3-Coder vocab, 3 repeats
    python bench/chunked_loss.py --tokens 8192 --supervised 0.25

Each variant runs in its own fresh process (peak RSS is per process: ru_maxrss) on the same inputs; the driver
prints the ratios against the full loss measured in the same run. Hidden states are random, the lm_head is a
random [vocab, hidden] Linear in fp32 (CPU), ``supervised`` is the share of targets that are not -100.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _variant(args) -> dict:
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from qwen_sft.samples import IGNORE_INDEX
    from qwen_sft.train.loss import chunked_lm_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(1, args.tokens, args.hidden, requires_grad=True)
    labels = torch.randint(0, args.vocab, (1, args.tokens))
    labels[torch.rand(1, args.tokens) >= args.supervised] = IGNORE_INDEX
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats):
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        t0 = time.perf_counter()
        if args.variant == "full":
            loss = ForCausalLMLoss(head(hidden).float(), labels, args.vocab)
        else:
            loss = chunked_lm_loss(hidden, head, labels, chunk_tokens=args.chunk)
        loss.backward()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.variant, "loss": float(loss), "seconds": min(times),
            "peak_rss_mib": peak / 1024, "loss_extra_mib": (peak - base_rss) / 1024}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--supervised", type=float, default=1.0, help="share of supervised targets")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(_variant(args)))
        return
    rows = {}
    for variant in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "variant"]
        rows[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    full, chunked = rows["full"], rows["chunked"]
    print(f"tokens {args.tokens}, hidden {args.hidden}, vocab {args.vocab}, supervised {args.supervised:.0%}, "
          f"chunk {args.chunk} (CPU, fp32, best of {args.repeats})")
    for r in (full, chunked):
        print(f"  {r['variant']:8s} loss {r['loss']:.6f}  fwd+bwd {r['seconds']:.3f} s  peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB (loss adds {r['loss_extra_mib']:.0f} MiB)")
    print(f"  chunked / full: time x{chunked['seconds'] / full['seconds']:.2f}, loss memory "
          f"x{chunked['loss_extra_mib'] / max(full['loss_extra_mib'], 1):.3f}, |loss diff| "
          f"{abs(chunked['loss'] - full['loss']):.2e}")


if __name__ == "__main__":
    main()
