"""Merge a LoRA/QLoRA adapter into a bf16 checkpoint, shard by shard, and verify it (same as ``qwen-sft merge``).

    python merge_adapter.py --base_model_path Qwen/Qwen3-Coder-30B-A3B-Instruct \
        --adapter_path ../../checkpoints/qwen3_30b_qlora --output_path ../../checkpoints/merged_model

See docs/merge.md for every option; the work lives in qwen_sft/merge/.
"""

import sys

from qwen_sft.merge.cli import main

if __name__ == "__main__":
    sys.exit(main())
