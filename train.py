"""Fine-tune Qwen3-Coder (QLoRA, LoRA or full) on tokenized data — the seed recipe's interface.

    python train.py --model_name_or_path Qwen/Qwen3-Coder-30B-A3B-Instruct \
        --data_path processed/sft_train.jsonl --output_dir checkpoints/qlora --use_qlora true \
        --peft_config_path configs/lora --bf16 true

    python train.py --config configs/train/lora_zero2_qwen3_30b.yaml --data_path d.jsonl --output_dir out

Accepts every transformers ``TrainingArguments`` flag plus the recipe's own (``python train.py --help``);
``--config RECIPE.yaml`` reads a recipe of configs/train/ first, the flags override it (what the seed scripts do).
The same engine with a YAML config: ``qwen-sft train CONFIG.yaml [key=value …]``. Configuration problems
(types, conflicts, missing files or weights) are listed together and exit with code 2, data problems with 1.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        from qwen_sft.train.args import _parser

        _parser().print_help()
        print("\n  --config RECIPE.yaml   a recipe (configs/train/*.yaml) read first; the flags override it")
        return 0
    from qwen_sft.train.args import parse_flags
    from qwen_sft.train.cli import run_and_report

    return run_and_report("train.py", lambda: parse_flags(argv))

if __name__ == "__main__":
    sys.exit(main())
