"""The ``qwen-sft`` command: one verb per pipeline stage.

    qwen-sft convert ./raw -o processed/sft_train.jsonl
    qwen-sft tokenize processed/sft_train.jsonl -m Qwen/Qwen3-Coder-30B-A3B-Instruct -o processed/train.jsonl
    qwen-sft train configs/train/qlora_tiny.yaml
    qwen-sft merge --base_model_path BASE --adapter_path ADAPTER --output_path OUT
    qwen-sft export-adapter ADAPTER OUT --format vllm
    qwen-sft export-gguf MERGED OUT.gguf --type bf16
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module with main(argv) -> int, one-line summary). Imported lazily so `--help` is instant.
VERBS: dict[str, tuple[str, str]] = {
    "convert": ("qwen_sft.data.cli", "convert raw SFT data of any common shape into validated ChatML JSONL"),
    "tokenize": ("qwen_sft.tokenize.cli", "tokenize ChatML with the model's chat template and assistant-only labels"),
    "binarize": ("qwen_sft.tokenize.binarize", "multiprocess tokenization of ChatML JSONL (binarize_data.py)"),
    "inspect": ("qwen_sft.tokenize.inspect", "show a tokenized sample with its supervised spans highlighted"),
    "train": ("qwen_sft.train.cli", "fine-tune (QLoRA, LoRA or full) from a YAML config"),
    "estimate": ("qwen_sft.moe.estimate", "estimate GPU memory for QLoRA/LoRA/full fine-tuning of a model"),
    "merge": ("qwen_sft.merge.cli", "merge a LoRA/QLoRA adapter into a bf16 checkpoint and verify it"),
    "export-adapter": ("qwen_sft.export.vllm_adapter", "rewrite an adapter into vLLM's per-expert LoRA layout"),
    "export-gguf": ("qwen_sft.export.gguf_export", "write a merged qwen3_moe model as GGUF (llama.cpp, Ollama)"),
    "make-tiny-model": ("qwen_sft.model.tiny", "write a tiny Qwen3-MoE model with Qwen3-Coder's architecture"),
}


def _usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: qwen-sft VERB [options]   (qwen-sft VERB --help for each verb)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {summary}" for verb, (_, summary) in VERBS.items()]
    lines += ["", "example: qwen-sft convert ./raw --tokenize -m offline"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from qwen_sft import __version__

        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"qwen-sft: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
