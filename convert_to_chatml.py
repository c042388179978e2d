"""Convert raw SFT data into validated ChatML JSONL (and optionally tokenize it).

    python convert_to_chatml.py ./raw --tokenize
    python convert_to_chatml.py ./raw -o ./processed/sft_train.jsonl -s "You are a helpful coding assistant."

All options: `python convert_to_chatml.py --help` and docs/convert.md. The work lives in qwen_sft/data/.
"""

import sys

from qwen_sft.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
