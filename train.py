"""Fine-tune Qwen3-Coder (QLoRA, LoRA or full) on tokenized data — the seed recipe's interface.

    python train.py --model_name_or_path Qwen/Qwen3-Coder-30B-A3B-Instruct \
        --data_path processed/sft_train.jsonl --output_dir checkpoints/qlora --use_qlora true \
        --peft_config_path configs/lora/adapter_config.json --bf16 true

Accepts every transformers ``TrainingArguments`` flag plus the recipe's own (``python train.py --help``).
The same engine with a YAML config: ``qwen-sft train CONFIG.yaml [key=value …]``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from qwen_sft.trace.rehearse import RehearsalError
    from qwen_sft.train.args import parse_flags
    from qwen_sft.train.data import DataError
    from qwen_sft.train.run import run

    argv = sys.argv[1:] if argv is None else argv
    config = parse_flags(argv)  # argparse prints usage and exits 2 on bad flags
    try:
        run(config)
    except (DataError, RehearsalError) as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
