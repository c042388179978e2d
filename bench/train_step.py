"""Packing vs padding: share of supervised tokens per batch and training tokens/s, in one run, on CPU.

    python bench/train_step.py                           # realdata length mix, tiny Qwen3-MoE, 8 samples/batch
    python bench/train_step.py --batch 4 --steps 6 --max_len 1024

The data is realdata (KULLM Self-Instruct + glaive tool calls) converted and tokenized by this project
with the offline tokenizer; the model is the tiny Qwen3-MoE (fp32 on CPU). Both collators see the same
batches in the same order; each step is forward + backward + AdamW update. Padding is the baseline: the
ratio line divides packing by padding.
"""

from __future__ import annotations

import argparse
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
REALDATA = REPO.parent / "shared" / "realdata"
FILES = ["kullm__user_oriented_instructions_eval.jsonl", "llamafactory__glaive_toolcall_en_demo.json"]


def tokenized_realdata(work: Path, max_len: int) -> Path:
    import shutil

    from qwen_sft.data.cli import main as convert
    from qwen_sft.tokenize.pipeline import tokenize_chatml_file

    raw = work / "raw"
    raw.mkdir()
    for name in FILES:
        shutil.copy(REALDATA / name, raw / name)
    assert convert([str(raw), "-o", str(work / "chatml.jsonl")]) == 0
    tokenize_chatml_file(work / "chatml.jsonl", work / "train.jsonl", model="offline", max_len=max_len, progress=False)
    return work / "train.jsonl"


def measure(model, batches: list[dict], supervised: list[int]) -> dict[str, float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = positions = sup = 0
    seconds = 0.0
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss = model(**batch, num_items_in_batch=supervised[i]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            continue  # warm-up step: allocator and kernel selection
        seconds += time.perf_counter() - t0
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        positions += batch["input_ids"].numel()
        sup += supervised[i]
    return {"tokens_per_s": tokens / seconds, "supervised_share": sup / positions, "positions": positions,
            "tokens": tokens, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8, help="samples per micro-batch")
    p.add_argument("--steps", type=int, default=6, help="timed steps per collator (+1 warm-up)")
    p.add_argument("--max_len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    from transformers import AutoConfig

    from qwen_sft.model.load import load_causal_lm
    from qwen_sft.model.tiny import make_tiny_model
    from qwen_sft.samples import IGNORE_INDEX
    from qwen_sft.train.collate import make_collator
    from qwen_sft.train.data import load_tokenized

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = tokenized_realdata(work, a.max_len)
        model_dir = make_tiny_model(work / "tiny")
        ds = load_tokenized(data, vocab_size=151_936, max_len=a.max_len, cache_dir=work / "cache")
        order = list(range(len(ds)))
        random.Random(a.seed).shuffle(order)
        samples = [[ds[i] for i in order[s * a.batch:(s + 1) * a.batch]] for s in range(a.steps + 1)]
        supervised = [sum(sum(1 for x in f["labels"][1:] if x != IGNORE_INDEX) for f in b) for b in samples]
        results = {}
        for name, packing in (("padding", False), ("packing", True)):
            model = load_causal_lm(str(model_dir), AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
            model.train()
            collate = make_collator(packing, 151643)
            results[name] = measure(model, [collate(b) for b in samples], supervised)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; tiny Qwen3-MoE fp32; {a.batch} samples/batch, {a.steps} timed steps")
    print(f"data: {ds.stats.summary()}")
    for name, r in results.items():
        print(f"{name:8s} tokens/s {r['tokens_per_s']:9.1f}  supervised share of batch positions "
              f"{r['supervised_share']:.3f}  ({r['tokens']} tokens in {r['positions']} positions, {r['seconds']:.2f} s)")
    pk, pd = results["packing"], results["padding"]
    print(f"ratio packing/padding: tokens/s x{pk['tokens_per_s'] / pd['tokens_per_s']:.2f}, "
          f"supervised share x{pk['supervised_share'] / pd['supervised_share']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
