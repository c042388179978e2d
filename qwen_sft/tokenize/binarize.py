"""``binarize_data.py`` / ``qwen-sft binarize``: multiprocess ChatML → tokenized samples (upstream flags kept).

    python binarize_data.py -input_path processed/sft_chatml.jsonl -output_path processed/train.parquet -workers 2
    python binarize_data.py --input_path chatml.jsonl --output_path train.jsonl --tokenizer_path offline --workers 2

Output rows come in input order and are byte-identical for any number of workers. Upstream's
``-save_format npy`` wrote a pickle: it is refused (use parquet or arrow for memory-mapped training).
Options: BinarizePaths and TokenizeOptions (qwen_sft/tokenize/options.py), whose field help is this help.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen_sft.cli_options import build_parser, parse
from qwen_sft.samples.files import FORMATS
from qwen_sft.tokenize.cli import report, run
from qwen_sft.tokenize.options import BinarizePaths, TokenizeOptions


def resolve_output(output: Path, save_format: str | None) -> Path:
    """The output file: the extension decides; ``-save_format`` adds one or must agree with it."""
    if save_format == "npy":
        raise ValueError("-save_format npy wrote a pickle upstream; pickles are not written. "
                         "Use -save_format parquet or arrow (memory-mappable) or jsonl.")
    fmt = FORMATS.get(output.suffix.lower())
    if fmt is None:
        if output.suffix.lower() == ".npy":
            raise ValueError(f"{output}: .npy was a pickle upstream; use .parquet, .arrow or .jsonl")
        return output.with_name(output.name + "." + (save_format or "jsonl"))
    if save_format and save_format != fmt:
        raise ValueError(f"-save_format {save_format} conflicts with -output_path {output} ({fmt}); make them agree")
    return output


def parser() -> argparse.ArgumentParser:
    # Upstream ran two workers unless told otherwise.
    return build_parser("binarize_data.py", [BinarizePaths, TokenizeOptions], description=__doc__.split("\n\n")[0],
                        defaults={"workers": 2})


def main(argv: list[str] | None = None) -> int:
    (paths, opts), problems = parse(parser(), argv)
    if problems:
        return report(problems)
    try:
        output = resolve_output(paths.output_path, paths.save_format)
    except ValueError as err:
        return report([str(err)])
    return run(paths.input_path, output, opts)


if __name__ == "__main__":
    sys.exit(main())
