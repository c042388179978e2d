"""``qwen-sft tokenize``: ChatML JSONL → training samples with assistant-only labels.

    qwen-sft tokenize processed/sft_chatml.jsonl -m offline -o processed/train.jsonl
    qwen-sft tokenize chatml.jsonl -m ./Qwen3-Coder-30B-A3B-Instruct -o train.arrow --max_len 4096 --workers 2

Reads and validates the options (TokenizeOptions: its field help is this help), loads the tokenizer, tokenizes,
and writes the output (format by extension: .jsonl, .parquet, .arrow) with ``.rejects.jsonl``, ``.stats.json``
and ``.lengths.png`` beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen_sft.cli_options import build_parser, parse
from qwen_sft.tokenize.options import TokenizeOptions, TokenizePaths
from qwen_sft.tokenizer import TokenizerLoadError


def parser() -> argparse.ArgumentParser:
    return build_parser("qwen-sft tokenize", [TokenizePaths, TokenizeOptions], description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)


def run(src: Path, dst: Path, opts: TokenizeOptions) -> int:
    """Tokenize with readable errors (no traceback) for the problems a user can fix."""
    from qwen_sft.tokenize.pipeline import WorkerDied, tokenize_chatml_file

    try:
        stats = tokenize_chatml_file(src, dst, opts)
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


def report(problems: list[str]) -> int:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    (paths, opts), problems = parse(parser(), argv)
    if problems:
        return report(problems)
    return run(paths.input, paths.output, opts)


if __name__ == "__main__":
    sys.exit(main())
