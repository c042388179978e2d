"""Opt-in check (``make check-gguf``): llama.cpp itself loads our GGUF export and agrees with transformers.

    python scripts/check_gguf.py prepare .cache/check-gguf              # project venv: torch, transformers
    .cache/venv-gguf/bin/python scripts/check_gguf.py consume .cache/check-gguf   # llama-cpp-python venv

``prepare`` builds the tiny qwen3_moe model, trains-in-place a random adapter (attention + every expert, through
the expert engine), merges it with ``qwen-sft merge`` (bf16), exports the merged model with ``qwen-sft export-gguf``
as f32, bf16 and q8_0, and records transformers' reference on the merged model (fp32 compute from the bf16 weights):
the chat-rendered prompt text and ids, 8 greedy tokens, and the logits at every position of prompt + greedy.

``consume`` runs in a separate venv holding only numpy and llama-cpp-python (a CPU build of llama.cpp): it checks
that llama.cpp's tokenizer turns the prompt text into the same ids, that its own greedy decoding gives the same
tokens, and compares its logits position by position. Pass criteria (printed with the measurements):

- f32: the same token ids, the same 8 greedy tokens, the same top-1 at every position, and
  max |Δlogit| <= F32_REL · max |logit| (f32 weights and KV cache: only summation order differs);
- bf16: the same token ids, the same 8 greedy tokens, the same top-1 at every position, and
  max |Δlogit| <= BF16_REL · max |logit| (llama.cpp computes bf16 weights with bf16-rounded activations);
- q8_0: the same token ids, top-1 equal at >= Q8_TOP1 of positions, and max |Δlogit| <= Q8_REL · max |logit|
  (8-bit weights with a per-32 scale are not expected to give identical logits).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _check import main, verdict  # scripts/_check.py: standard library only, importable in both venvs

GREEDY = 8
F32_REL = 0.001
# f32 is the exactness check (llama.cpp with an f32 KV cache on identical weights: measured max |Δ| < 1e-5).
# bf16 and q8_0 go through llama.cpp's reduced-precision CPU kernels (activations rounded to bf16 / quantized to
# 8 bits in its dot products, f16 KV cache); on the tiny random model, whose logits are nearly flat (max |logit|
# ~0.8), that measured 2.1-5.0 % (bf16) and up to 62 % with 86-91 % top-1 (q8_0) of max |logit|.
BF16_REL = 0.06
Q8_REL = 0.75
Q8_TOP1 = 0.80
PROMPTS = [
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "system", "content": "You are a careful code reviewer."},
     {"role": "user", "content": "What does `git rebase -i HEAD~3` do?"}],
    [{"role": "user", "content": "다음 SQL을 설명해 주세요: SELECT count(*) FROM users WHERE active;"}],
]


def prepare(work: Path) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_sft.export.gguf_export import main as gguf_main
    from qwen_sft.merge.cli import main as merge_main
    from qwen_sft.model.tiny import TinySpec, make_tiny_model
    from qwen_sft.model.tiny_adapter import random_adapter

    work.mkdir(parents=True, exist_ok=True)
    base = make_tiny_model(work / "base", TinySpec(layers=2), dtype="bfloat16")
    model, adapter = random_adapter(base, work / "adapter")  # attention + every expert, non-zero B
    del model
    merged = work / "merged"
    assert merge_main(["--base_model_path", str(base), "--adapter_path", str(adapter), "--output_path", str(merged),
                       "--no_verify"]) == 0  # reference: transformers below
    for qtype in ("f32", "bf16", "q8_0"):
        assert gguf_main([str(merged), str(work / f"merged-{qtype}.gguf"), "--type", qtype]) == 0

    tok = AutoTokenizer.from_pretrained(merged)
    ref_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    cases = []
    for i, messages in enumerate(PROMPTS):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        seq = list(ids)
        with torch.no_grad():
            for _ in range(GREEDY):
                logits = ref_model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                seq.append(int(logits.argmax()))
            full = ref_model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].numpy()
        np.save(work / f"ref-{i}.npy", full)
        cases.append({"text": text, "ids": ids, "greedy": seq[len(ids):]})
    (work / "reference.json").write_text(json.dumps({"cases": cases}, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"prepared {work}: merged model, 3 GGUF files, reference for {len(cases)} prompts")


def consume(work: Path) -> int:
    import numpy as np
    from llama_cpp import Llama

    ref = json.loads((work / "reference.json").read_text(encoding="utf-8"))["cases"]
    failures, report = [], {}
    for qtype in ("f32", "bf16", "q8_0"):
        t0 = time.time()
        # f32: the KV cache in f32 too (llama.cpp keeps it in f16 by default), so only summation order differs.
        kv = {"type_k": 0, "type_v": 0} if qtype == "f32" else {}  # 0 = GGML_TYPE_F32
        llm = Llama(model_path=str(work / f"merged-{qtype}.gguf"), n_ctx=512, logits_all=True, n_threads=2,
                    verbose=False, seed=0, **kv)
        rows = []
        for i, case in enumerate(ref):
            ids = llm.tokenize(case["text"].encode("utf-8"), add_bos=False, special=True)
            if ids != case["ids"]:
                failures.append(f"{qtype} prompt {i}: llama.cpp tokenizes to {ids[:12]}… != transformers {case['ids'][:12]}…")
            llm.reset()
            llm.eval(case["ids"])
            greedy = []
            for _ in range(len(case["greedy"])):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                greedy.append(nxt)
                llm.eval([nxt])
            full_ids = case["ids"] + case["greedy"]
            llm.reset()
            llm.eval(full_ids)
            ours = np.asarray(llm.scores[: len(full_ids)], dtype=np.float32)
            theirs = np.load(work / f"ref-{i}.npy")
            diff = float(np.abs(ours - theirs).max())
            scale = float(np.abs(theirs).max())
            top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
            rows.append({"prompt": i, "positions": len(full_ids), "max_abs_diff": round(diff, 5),
                         "max_abs_logit": round(scale, 3), "rel": round(diff / scale, 5), "top1_agree": top1,
                         "greedy_equal": greedy == case["greedy"]})
            if qtype in ("f32", "bf16"):
                rel = F32_REL if qtype == "f32" else BF16_REL
                if greedy != case["greedy"]:
                    failures.append(f"{qtype} prompt {i}: greedy {greedy} != transformers {case['greedy']}")
                if top1 < 1.0 or diff > rel * scale:
                    failures.append(f"{qtype} prompt {i}: top-1 agreement {top1:.3f}, max |Δ| {diff:.4g} "
                                    f"(limit {rel * scale:.4g})")
            elif top1 < Q8_TOP1 or diff > Q8_REL * scale:
                failures.append(f"q8_0 prompt {i}: top-1 agreement {top1:.3f} (limit {Q8_TOP1}), max |Δ| {diff:.4g} "
                                f"(limit {Q8_REL * scale:.4g})")
        report[qtype] = {"rows": rows, "seconds": round(time.time() - t0, 1)}
        del llm
    print(json.dumps(report, indent=1))
    return verdict("check-gguf", failures, "llama.cpp loads all three exports; f32 matches transformers' logits, "
                                           "bf16 token for token")


if __name__ == "__main__":
    main(prepare, consume)
