"""Typed options of ``qwen-sft export-gguf`` and ``qwen-sft export-adapter``: each field's help is the CLI help.

    from qwen_sft.export.options import GgufExportOptions
    opts = GgufExportOptions(merged_dir=Path("merged"), out=Path("model.gguf"), qtype="q8_0")

Light on purpose (no torch, gguf or safetensors): the parsers are built from it before anything is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qwen_sft.cli_options import OptionParser, build_parser, option

GgufType = Literal["bf16", "q8_0", "f32"]


@dataclass
class GgufExportOptions:
    merged_dir: Path = option(help="merged model directory (config.json, safetensors, tokenizer)")
    out: Path = option(help="output .gguf file (written atomically)")
    qtype: GgufType = option("bf16", "--type", help=(
        "weight type: bf16 (exact copy of bf16 weights), q8_0 (8-bit, ~half the size) or f32 (twice bf16; "
        "for checking an export against transformers without llama.cpp's bf16 rounding)"))


@dataclass
class AdapterExportOptions:
    adapter_dir: Path = option(help="adapter directory written by training (adapter_config.json + safetensors)")
    out_dir: Path = option(help="output directory (replaced atomically if it exists)")
    format: Literal["vllm"] = option("vllm", "--format", help="target layout")


def gguf_parser() -> OptionParser:
    return build_parser(
        "qwen-sft export-gguf", [GgufExportOptions],
        description="Write a merged qwen3_moe or qwen3_next model (qwen-sft merge output) as one GGUF file for llama.cpp / Ollama, "
                    "tensor by tensor, with its tokenizer and chat template.",
        epilog="example: qwen-sft export-gguf checkpoints/merged_model qwen3-coder-sft.gguf --type q8_0")


def adapter_parser() -> OptionParser:
    return build_parser(
        "qwen-sft export-adapter", [AdapterExportOptions],
        description="Rewrite a training adapter (fused expert LoRA) into one LoRA pair per expert at one rank, "
                    "the layout vLLM's Qwen3MoeForCausalLM loads with --enable-lora.",
        epilog="example: qwen-sft export-adapter checkpoints/qwen3_30b_qlora checkpoints/qwen3_30b_qlora-vllm "
               "--format vllm")
