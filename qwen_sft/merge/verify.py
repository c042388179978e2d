"""Prove a merge: logits of the merged model vs the base model with the adapter applied unmerged by peft.

    from qwen_sft.merge.verify import verify_merge
    result = verify_merge(base_dir, adapter_dir, merged_dir, tokenizer_dir)   # raises MergeError above tolerance

The reference is peft's own forward (``PeftModel.from_pretrained`` on the bf16 base), an implementation
independent of ours, so a wrong expert order, a transposed ΔW or a silently skipped expert shows up as a
logit difference. The two models are loaded one after the other (peak = one model, not two); on a GPU
machine ``device_map="auto"`` spreads each over the GPUs. The merged directory is also reloaded
strictly: any missing, unexpected or mismatched key fails the merge.

Tolerance (bf16-aware): merged weights are rounded to bf16 once, whereas peft adds the LoRA branch at run
time, so the two forwards differ by bf16 rounding, which grows with the logit scale:
``tol = atol + rtol * max|logits|`` (defaults 0.02 and 0.02, about five bf16 roundoffs at the largest
logit). Per token position we take the largest |Δ| over the vocabulary. A tiny rounding difference can
flip one top-k routing decision of an MoE layer, which moves that one position's logits by far more than
rounding (seen on tiny models: 0.04 at one position, 0.005 elsewhere), so we require the 90th percentile
of the positions to be within ``tol`` and every position within ``FLIP_FACTOR * tol``. A wrong merge (an
unmodified base, a swapped gate/up, a transposed ΔW) is off at nearly every position and fails. We also
print the adapter's own effect ``max|(base+adapter) - base|``: when it is not clearly larger than the
merge error, even a no-op merge would pass, and we say so.

The bf16 floor: some models amplify one bf16 rounding of the weights far past ``tol`` (a tiny random
qwen3_next with a large adapter: p90 0.079 against a tolerance of 0.038, and peft's own merge just as far, 0.073).
So peft also merges the adapter into the reference model in memory (``merge_adapter``: the same single bf16
rounding, by peft's code), and how far that moves the logits from the unmerged forward is the floor: the p90
tolerance is ``max(tol, FLOOR_FACTOR * floor)``. The floor counts only while peft's merge is clearly the adapted
model (its p90 distance from the unmerged forward under ``1 / FLOOR_GUARD`` of the adapter's own p90 effect), so a
no-op merge still fails; when peft cannot merge, the floor is ``None`` and ``tol`` stands.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path

from qwen_sft.merge.adapter import MergeError

ATOL, RTOL = 0.02, 0.02
FLIP_FACTOR = 10.0
QUANTILE = 0.9
FLOOR_FACTOR, FLOOR_GUARD = 1.5, 4.0
# A few short chat prompts (code, review, Korean) rendered with the model's own chat template.
PROMPTS: list[list[dict]] = [
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "system", "content": "You are a careful code reviewer."},
     {"role": "user", "content": "What does `git rebase -i HEAD~3` do?"}],
    [{"role": "user", "content": "다음 SQL을 설명해 주세요: SELECT count(*) FROM users WHERE active;"}],
]


@dataclass
class VerifyResult:
    max_abs_diff: float
    p90_abs_diff: float  # 90th percentile over token positions of the per-position max |Δ|
    tolerance: float
    max_abs_logit: float
    adapter_effect: float
    tokens: int
    passed: bool
    distinguishable: bool
    bf16_floor: float | None = None  # p90 of peft's own in-memory merge vs the unmerged forward; None: not measured

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _device_kwargs(device: str) -> dict:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"device_map": "auto"} if device == "cuda" else {"device_map": None}


def _prompt_ids(tokenizer_dir: Path) -> list:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    for messages in PROMPTS:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        out.append(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return out


def _logits(model, prompts: list) -> list:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu()
                for ids in prompts]


def _position_diffs(a: list, b: list):
    """Per token position, the largest |Δlogit| over the vocabulary (all prompts concatenated)."""
    import torch

    return torch.cat([(x - y).abs().amax(dim=-1) for x, y in zip(a, b)])


def verify_merge(base_dir: Path, adapter_dir: Path, merged_dir: Path, tokenizer_dir: Path, device: str = "auto",
                 atol: float = ATOL, rtol: float = RTOL) -> VerifyResult:
    """Compare logits on ``PROMPTS``; raise MergeError when the merged model is off or does not reload strictly."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompts = _prompt_ids(tokenizer_dir)
    kwargs = {"dtype": torch.bfloat16, **_device_kwargs(device)}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    try:
        from qwen_sft.moe.peft_targets import peft_targets_as_named

        with peft_targets_as_named(model):  # qwen3_next: peft would drop the shared expert's LoRA
            model = PeftModel.from_pretrained(model, adapter_dir)
    except (ValueError, RuntimeError, KeyError) as err:  # e.g. lora_dropout != 0 on target_parameters
        raise MergeError(f"peft cannot load {adapter_dir} for the reference forward ({err}); the merged weights "
                         "cannot be checked against it. Fix the adapter config, or pass --no_verify.") from err
    model.eval()
    reference = _logits(model, prompts)
    with model.disable_adapter():
        plain = _logits(model, prompts)
    peft_merged = _peft_merged_logits(model, prompts)
    del model
    gc.collect()

    merged, info = AutoModelForCausalLM.from_pretrained(merged_dir, output_loading_info=True, **kwargs)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise MergeError(f"the merged checkpoint does not reload cleanly: {bad}")
    merged.eval()
    logits = _logits(merged, prompts)
    del merged
    gc.collect()

    diffs = _position_diffs(logits, reference)
    worst, typical = float(diffs.max()), float(diffs.quantile(QUANTILE))
    scale = max(float(x.abs().max()) for x in reference)
    effects = _position_diffs(reference, plain)
    effect = float(effects.max())
    tolerance = atol + rtol * scale
    floor = None
    if peft_merged is not None:
        floor = float(_position_diffs(peft_merged, reference).quantile(QUANTILE))
        if FLOOR_GUARD * floor < float(effects.quantile(QUANTILE)):
            tolerance = max(tolerance, FLOOR_FACTOR * floor)
    passed = typical <= tolerance and worst <= FLIP_FACTOR * tolerance
    return VerifyResult(max_abs_diff=worst, p90_abs_diff=typical, tolerance=tolerance, max_abs_logit=scale,
                        adapter_effect=effect, tokens=len(diffs), passed=passed,
                        distinguishable=effect > 2 * max(typical, tolerance), bf16_floor=floor)


def _peft_merged_logits(model, prompts: list) -> list | None:
    """Logits after peft merges the adapter into the loaded weights itself (the bf16 floor); None if it cannot."""
    try:
        model.merge_adapter()
    except (ValueError, RuntimeError, TypeError, NotImplementedError, AttributeError) as err:
        print(f"verify: peft cannot merge this adapter in memory ({type(err).__name__}); no bf16 floor, the fixed "
              "tolerance stands")
        return None
    return _logits(model, prompts)
