"""Typed options of ``qwen-sft merge`` / ``merge_adapter.py``: each field's help is the CLI help.

    from qwen_sft.merge.options import MergeOptions
    opts = MergeOptions(base_model_path="BASE", adapter_path="ADAPTER", output_path="OUT")   # bad values raise

Light on purpose (no torch, no safetensors): the parser is built from it before anything is read.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Literal

from qwen_sft.cli_options import build_parser, option
from qwen_sft.merge.verify import ATOL, RTOL

Dtype = Literal["bfloat16", "float16", "float32"]  # (qwen_sft.merge.stream.DTYPES is this)


@dataclass
class MergeOptions:
    """What to merge, where to, and how the merged logits are checked."""

    base_model_path: str = option(MISSING, "--base_model_path",
                                  help="base model directory (or Hub id, read from the cache)")
    adapter_path: str = option(MISSING, "--adapter_path", "--train_adapters_path", help=(
        "adapter directory written by training (adapter_config.json + adapter_model.safetensors)"))
    output_path: str = option(MISSING, "--output_path", help=(
        "merged model directory (an existing directory is replaced atomically; a file is refused)"))
    all_checkpoints: bool = option(False, "--all_checkpoints", help=(
        "also merge every checkpoint-* under the adapter directory into OUT/checkpoint-*"))
    dtype: Dtype = option("bfloat16", "--dtype", help=(
        "dtype of the merged weights (default bfloat16; float32 doubles the size)"))
    no_verify: bool = option(False, "--no_verify", help="skip the logits check (on by default)")
    verify_device: Literal["auto", "cpu", "cuda"] = option("auto", "--verify_device", help=(
        "where the check runs; auto = all GPUs when present (device_map=auto), else CPU"))
    verify_atol: float = option(ATOL, "--verify_atol", help="absolute logit tolerance")
    verify_rtol: float = option(RTOL, "--verify_rtol", help="tolerance relative to the largest |logit|")

    def __post_init__(self) -> None:
        problems = []
        for name in ("verify_atol", "verify_rtol"):
            value = getattr(self, name)
            if not value >= 0:  # (NaN too)
                problems.append(f"--{name} must be 0 or more, found {value}")
        if problems:
            raise ValueError("; ".join(problems))


def merge_parser(prog: str = "qwen-sft merge"):
    return build_parser(
        prog, [MergeOptions],
        description="Merge a LoRA/QLoRA adapter (attention and MoE experts) into a 16-bit checkpoint, "
                    "shard by shard, and verify the merged logits against base + adapter.",
        epilog="example: python merge_adapter.py --base_model_path Qwen/Qwen3-Coder-30B-A3B-Instruct "
               "--adapter_path checkpoints/qwen3_30b_qlora --output_path checkpoints/merged_model")
