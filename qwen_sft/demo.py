"""``make demo``: the whole pipeline on a tiny Qwen3-MoE and the example data, in a few minutes.

    python -m qwen_sft.demo [--out demo_out] [--steps N]

Runs, as subprocesses and printing each command first (the same commands a user runs):

1. ``qwen-sft make-tiny-model OUT/base-model``
2. ``python convert_to_chatml.py examples/raw --tokenize -m OUT/base-model -o OUT/processed/sft_train.jsonl``
3. ``python train.py --use_qlora true …`` into ``OUT/qlora-adapter`` (``--use_cpu true`` without a GPU)
4. ``python merge_adapter.py … --output_path OUT/merged-model`` (verification on)

then loads the merged model with transformers, greedy-generates the answer to one example prompt and
prints it beside the trained answer, and lists every artifact. A failing stage stops the demo with its
message and a non-zero exit. ``QWEN_SFT_DEMO_STEPS`` (or ``--steps``) sets the training steps.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qwen_sft.cli_options import OptionParser, build_parser, option, parse

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STEPS = 25
# The prompt whose trained answer the merged model should reproduce (examples/raw/alpaca_code.json).
PROMPT = "Name the Python keyword that defines a function."

# Small dims so a CPU step is quick; the vocabulary is the real one (151,936 rows).
TINY_ARGS = ["--layers", "2", "--hidden", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
             "--experts", "8", "--active", "2", "--moe-intermediate", "64"]

LORA_CONFIG = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "bias": "none",
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class StageError(RuntimeError):
    pass


def _run(stage: str, cmd: list[str]) -> None:
    print(f"\n=== {stage}\n$ {shlex.join(cmd)}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise StageError(f"stage '{stage}' failed (exit {proc.returncode}): {shlex.join(cmd)}")
    print(f"--- {stage}: ok in {time.monotonic() - start:.1f}s", flush=True)


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, no GPU
        return False


def _trained_answer(chatml: Path, prompt: str) -> str:
    for line in chatml.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        messages = json.loads(line)["messages"]
        if messages and messages[0].get("role") == "user" and messages[0].get("content") == prompt:
            return str(messages[1]["content"])
    raise StageError(f"the demo prompt {prompt!r} is not in {chatml}")


def _generate(model_dir: Path, prompt: str, max_new_tokens: int = 32) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_demo(out: Path, steps: int) -> dict:
    out = out if out.is_absolute() else (Path.cwd() / out)
    out.mkdir(parents=True, exist_ok=True)
    base, processed = out / "base-model", out / "processed" / "sft_train.jsonl"
    adapter, merged = out / "qlora-adapter", out / "merged-model"
    lora_cfg = out / "lora_config.json"
    lora_cfg.write_text(json.dumps(LORA_CONFIG, indent=2) + "\n", encoding="utf-8")
    py = sys.executable
    qwen_sft = str(Path(py).parent / "qwen-sft")
    tiny_cmd = [qwen_sft] if Path(qwen_sft).exists() else [py, "-m", "qwen_sft.cli"]
    gpu = _has_gpu()

    _run("1/5 tiny base model", tiny_cmd + ["make-tiny-model", str(base), *TINY_ARGS])
    _run("2/5 convert + tokenize", [py, "convert_to_chatml.py", "examples/raw", "--tokenize", "-m", str(base),
                                    "-o", str(processed)])
    train = [py, "train.py", "--model_name_or_path", str(base), "--use_qlora", "true",
             "--peft_config_path", str(lora_cfg), "--data_path", str(processed),
             "--data_cache_dir", str(out / ".cache"), "--model_max_length", "512",
             "--output_dir", str(adapter), "--per_device_train_batch_size", "8",
             "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",
             "--max_steps", str(steps), "--save_strategy", "no", "--gradient_checkpointing", "false", "--report_to", "none", "--seed", "42"]
    if not gpu:  # transformers refuses bf16 on CPU: fp32 weights and fp32 4-bit compute
        train += ["--use_cpu", "true", "--torch_dtype", "float32", "--bnb_4bit_compute_dtype", "float32"]
    _run("3/5 QLoRA training", train)
    _run("4/5 merge + verify", [py, "merge_adapter.py", "--base_model_path", str(base), "--adapter_path", str(adapter),
                                "--output_path", str(merged)])

    print("\n=== 5/5 greedy answer of the merged model", flush=True)
    trained = _trained_answer(processed.with_name(processed.stem + ".chatml.jsonl"), PROMPT)
    answer = _generate(merged, PROMPT)
    match = answer == trained.strip()
    print(f"prompt:         {PROMPT}\ntrained answer: {trained!r}\nmerged model:   {answer!r}")
    print("MATCH: the merged model reproduces the trained answer" if match else
          f"NO MATCH after {steps} steps (more steps: --steps N or QWEN_SFT_DEMO_STEPS)")

    stats = processed.with_name(processed.name + ".stats.json")
    artifacts = [
        (stats, "data statistics: records, tokens, supervised tokens, length percentiles, drops"),
        (processed.with_name(processed.name + ".lengths.png"), "histogram of tokenized sample lengths"),
        (adapter / "loss_curve.png", "training loss per optimizer step"),
        (adapter, "the QLoRA adapter (adapter_config.json + adapter_model.safetensors, data_stats.json)"),
        (merged, "the merged bf16 model, loadable by transformers/vLLM without peft"),
    ]
    print("\n=== artifacts")
    missing = [p for p, _ in artifacts if not p.exists()]
    for path, what in artifacts:
        print(f"  {path.relative_to(out.parent) if path.is_relative_to(out.parent) else path}\n      {what}")
    if missing:
        raise StageError("missing artifacts: " + ", ".join(map(str, missing)))
    result = {"prompt": PROMPT, "trained_answer": trained, "merged_answer": answer, "match": match, "steps": steps}
    (out / "demo_result.json").write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return result


@dataclass
class DemoOptions:
    out: Path = option(Path("demo_out"), "--out", help="output directory (default demo_out)")
    steps: int | None = option(None, "--steps", help=f"training steps (default $QWEN_SFT_DEMO_STEPS or {DEFAULT_STEPS})")

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")


def demo_parser() -> OptionParser:
    return build_parser("python -m qwen_sft.demo", [DemoOptions], description=__doc__.split("\n\n")[0])


def steps_from_environment() -> int:
    """What ``--steps`` defaults to: ``$QWEN_SFT_DEMO_STEPS``, else DEFAULT_STEPS."""
    text = os.environ.get("QWEN_SFT_DEMO_STEPS")
    if text is None:
        return DEFAULT_STEPS
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"QWEN_SFT_DEMO_STEPS={text!r} must be a whole number of steps, at least 1")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser()
    (opts,), problems = parse(parser, argv)
    steps = opts.steps if opts is not None else None
    if steps is None:
        try:
            steps = steps_from_environment()
        except ValueError as err:
            problems.append(str(err))
    if problems:
        parser.error("\n  ".join(problems))
    start = time.monotonic()
    try:
        run_demo(opts.out, steps)
    except StageError as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1
    print(f"\ndemo done in {time.monotonic() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
