"""Opt-in check (``make check-gguf``): llama.cpp itself loads our GGUF export and agrees with transformers.

    python scripts/check_gguf.py prepare .cache/check-gguf              # project venv: torch, transformers
    .cache/venv-gguf/bin/python scripts/check_gguf.py consume .cache/check-gguf   # llama-cpp-python venv

``prepare`` does this for two tiny models, qwen3_moe (Qwen3-Coder-30B-A3B's layout) and qwen3_next
(Qwen3-Coder-Next's: Gated DeltaNet + gated attention, 16 experts top-10 + a sigmoid-gated shared expert): it builds
the model, trains-in-place a random adapter (qwen3_moe: q/v + every expert; qwen3_next: every attention and
Gated DeltaNet projection, every routed expert, the shared expert and its 1-row gate), merges it with
``qwen-sft merge`` (bf16, the per-expert Hub layout), exports the merged model with ``qwen-sft export-gguf`` as f32,
bf16 and q8_0, and records transformers' reference on the merged model (fp32 compute from the bf16 weights): the
chat-rendered prompt text and ids, 8 greedy tokens, and the logits at every position of prompt + greedy. The
qwen3_next base first gets random RMSNorm weights (transformers initialises them to zero, where ``1 + w`` and ``w``
would read alike) and random ``dt_bias``, so every transform of the qwen3next mapping changes the logits if wrong.

``consume`` runs in a separate venv holding only numpy and llama-cpp-python (a CPU build of llama.cpp): it checks
that llama.cpp's tokenizer turns the prompt text into the same ids, that its own greedy decoding gives the same
tokens, and compares its logits position by position. Pass criteria (printed with the measurements):

- f32: the same token ids, the same 8 greedy tokens, the same top-1 at every position, and
  max |Δlogit| <= F32_REL · max |logit| (f32 weights and KV cache: only summation order differs);
- bf16: the same token ids, the same 8 greedy tokens, the same top-1 at every position, and
  max |Δlogit| <= BF16_REL · max |logit| (llama.cpp computes bf16 weights with bf16-rounded activations);
- q8_0: the same token ids, top-1 equal at >= Q8_TOP1 of positions, and max |Δlogit| <= Q8_REL · max |logit|
  (8-bit weights with a per-32 scale are not expected to give identical logits).

qwen3_next keeps the f32 criteria (the exactness check of its mapping). Its bf16 and q8_0 are judged against
transformers' own bf16 run of the same merged weights (``tf_bf16`` in reference.json, recorded by ``prepare``):
on this tiny random model (16 experts, top-10, near-flat logits) bf16 rounding alone moves transformers' logits by
25-46 % of max |logit| with 79-82 % top-1, so a fixed bound would measure the model's conditioning, not the export:

- bf16: the same token ids, max |Δlogit| <= NEXT_BF16_VS_TF · transformers-bf16's and top-1 agreement >=
  transformers-bf16's (greedy equality is reported, not required: transformers' own bf16 greedy differs too);
- q8_0: the same token ids, max |Δlogit| <= NEXT_Q8_VS_TF · transformers-bf16's and top-1 >= NEXT_Q8_TOP1
  (8-bit weights and 8-bit activations in llama.cpp's dot products; a runs-and-agrees check, not an exact one).
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
# qwen3_next, relative to transformers' bf16 run (measured: llama.cpp bf16 0.31-0.90x its max |Δ| with higher top-1;
# q8_0 1.5-3.3x with 48-62 % top-1).
NEXT_BF16_VS_TF = 1.5
NEXT_Q8_VS_TF = 4.0
NEXT_Q8_TOP1 = 0.40
PROMPTS = [
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "system", "content": "You are a careful code reviewer."},
     {"role": "user", "content": "What does `git rebase -i HEAD~3` do?"}],
    [{"role": "user", "content": "다음 SQL을 설명해 주세요: SELECT count(*) FROM users WHERE active;"}],
]
NEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj",
                "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj", "shared_expert_gate"]
MODELS = ("qwen3_moe", "qwen3_next")
QTYPES = ("f32", "bf16", "q8_0")


def _perturb_next_base(base: Path) -> None:
    """Random (seeded) norm weights and dt_bias in the tiny qwen3_next checkpoint, rewritten in place."""
    import torch
    from safetensors.torch import load_file, save_file

    path = base / "model.safetensors"
    sd = load_file(path)
    g = torch.Generator().manual_seed(7)
    for key, t in sd.items():
        if key.endswith(("norm.weight", ".dt_bias")):
            sd[key] = (t.float() + 0.3 * torch.randn(t.shape, generator=g)).to(t.dtype)
    save_file(sd, path, metadata={"format": "pt"})


def prepare(work: Path) -> None:
    for model_type in MODELS:
        _prepare_one(work / model_type, model_type)


def _prepare_one(work: Path, model_type: str) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_sft.export.gguf_export import main as gguf_main
    from qwen_sft.merge.cli import main as merge_main
    from qwen_sft.model.tiny import NEXT_DEFAULTS, TinySpec, make_tiny_model
    from qwen_sft.model.tiny_adapter import random_adapter

    work.mkdir(parents=True, exist_ok=True)
    nxt = model_type == "qwen3_next"
    spec = TinySpec(model_type=model_type, **NEXT_DEFAULTS) if nxt else TinySpec(layers=2)
    base = make_tiny_model(work / "base", spec, dtype="bfloat16")
    if nxt:
        _perturb_next_base(base)
    model, adapter = random_adapter(base, work / "adapter", targets=NEXT_TARGETS if nxt else None)  # non-zero B
    del model
    merged = work / "merged"
    assert merge_main(["--base_model_path", str(base), "--adapter_path", str(adapter), "--output_path", str(merged),
                       "--no_verify"]) == 0  # reference: transformers below
    for qtype in QTYPES:
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
        cases.append({"text": text, "ids": ids, "greedy": seq[len(ids):], "seq": seq})
    # How far bf16 compute alone moves this model: transformers in bf16 on the same weights and sequences.
    del ref_model
    bf16_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).eval()
    for i, case in enumerate(cases):
        with torch.no_grad():
            low = bf16_model(input_ids=torch.tensor([case.pop("seq")]), use_cache=False).logits[0].float().numpy()
        full = np.load(work / f"ref-{i}.npy")
        case["tf_bf16"] = {"max_abs_diff": float(np.abs(low - full).max()),
                           "top1_agree": float((low.argmax(-1) == full.argmax(-1)).mean())}
    (work / "reference.json").write_text(json.dumps({"cases": cases}, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"prepared {work}: merged {model_type} model, 3 GGUF files, reference for {len(cases)} prompts")


def consume(work: Path) -> int:
    failures, report = [], {}
    for model_type in MODELS:
        report[model_type] = _consume_one(work / model_type, model_type, failures)
    print(json.dumps(report, indent=1))
    return verdict("check-gguf", failures, "llama.cpp loads all three exports of qwen3_moe and qwen3_next; f32 "
                                           "matches transformers' logits, bf16 token for token")


def _consume_one(work: Path, model_type: str, failures: list[str]) -> dict:
    import numpy as np
    from llama_cpp import Llama

    ref = json.loads((work / "reference.json").read_text(encoding="utf-8"))["cases"]
    report = {}
    for qtype in QTYPES:
        where = f"{model_type} {qtype}"
        t0 = time.time()
        # f32: the KV cache in f32 too (llama.cpp keeps it in f16 by default), so only summation order differs.
        kv = {"type_k": 0, "type_v": 0} if qtype == "f32" else {}  # 0 = GGML_TYPE_F32
        llm = Llama(model_path=str(work / f"merged-{qtype}.gguf"), n_ctx=512, logits_all=True, n_threads=2,
                    verbose=False, seed=0, **kv)
        rows = []
        for i, case in enumerate(ref):
            ids = llm.tokenize(case["text"].encode("utf-8"), add_bos=False, special=True)
            if ids != case["ids"]:
                failures.append(f"{where} prompt {i}: llama.cpp tokenizes to {ids[:12]}… != transformers {case['ids'][:12]}…")
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
            tf = case["tf_bf16"]
            rows[-1]["tf_bf16"] = {k: round(v, 5) for k, v in tf.items()}
            if model_type == "qwen3_next" and qtype != "f32":
                limit, floor = ((NEXT_BF16_VS_TF * tf["max_abs_diff"], tf["top1_agree"]) if qtype == "bf16"
                                else (NEXT_Q8_VS_TF * tf["max_abs_diff"], NEXT_Q8_TOP1))
                if top1 < floor or diff > limit:
                    failures.append(f"{where} prompt {i}: top-1 agreement {top1:.3f} (limit {floor:.3f}), max |Δ| "
                                    f"{diff:.4g} (limit {limit:.4g}, transformers-bf16 {tf['max_abs_diff']:.4g})")
            elif qtype in ("f32", "bf16"):
                rel = F32_REL if qtype == "f32" else BF16_REL
                if greedy != case["greedy"]:
                    failures.append(f"{where} prompt {i}: greedy {greedy} != transformers {case['greedy']}")
                if top1 < 1.0 or diff > rel * scale:
                    failures.append(f"{where} prompt {i}: top-1 agreement {top1:.3f}, max |Δ| {diff:.4g} "
                                    f"(limit {rel * scale:.4g})")
            elif top1 < Q8_TOP1 or diff > Q8_REL * scale:
                failures.append(f"{where} prompt {i}: top-1 agreement {top1:.3f} (limit {Q8_TOP1}), max |Δ| {diff:.4g} "
                                f"(limit {Q8_REL * scale:.4g})")
        report[qtype] = {"rows": rows, "seconds": round(time.time() - t0, 1)}
        del llm
    return report


if __name__ == "__main__":
    main(prepare, consume)
