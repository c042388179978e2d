"""qwen-sft: supervised fine-tuning for Qwen3-Coder (data → tokenize → train → merge)."""

__version__ = "0.1.0"
