"""Multiprocess tokenization of ChatML JSONL (the upstream preprocessor's command, made template-exact).

    python binarize_data.py -input_path processed/sft_chatml.jsonl -output_path processed/train.parquet -workers 2

See docs/tokenize.md; the work lives in qwen_sft/tokenize/.
"""

import sys

from qwen_sft.tokenize.binarize import main

if __name__ == "__main__":
    sys.exit(main())
