"""``binarize_data.py`` / ``qwen-sft binarize``: multiprocess ChatML → tokenized samples (upstream flags kept).

    python binarize_data.py -input_path processed/sft_chatml.jsonl -output_path processed/train.parquet -workers 2
    python binarize_data.py --input_path chatml.jsonl --output_path train.jsonl --tokenizer_path offline --workers 2

Output rows come in input order and are byte-identical for any number of workers. Upstream's
``-save_format npy`` wrote a pickle: it is refused (use parquet or arrow for memory-mapped training).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen_sft.samples.files import FORMATS
from qwen_sft.tokenize.cli import add_tokenize_options, run

SAVE_FORMATS = ("jsonl", "parquet", "arrow", "npy")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="binarize_data.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("-input_path", "--input_path", "-i", dest="input_path", type=Path, required=True,
                        help="ChatML JSONL ({\"messages\": [...], \"tools\"?: [...]} per line)")
    parser.add_argument("-output_path", "--output_path", "-o", dest="output_path", type=Path, required=True,
                        help="output file (.jsonl, .parquet or .arrow; without an extension -save_format adds one)")
    parser.add_argument("-save_format", "--save_format", dest="save_format", choices=SAVE_FORMATS, default=None,
                        help="jsonl, parquet or arrow (npy is refused: it was a pickle)")
    add_tokenize_options(parser)
    parser.set_defaults(workers=2)
    args = parser.parse_args(argv)
    try:
        output = resolve_output(args.output_path, args.save_format)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run(args.input_path, output, args)


if __name__ == "__main__":
    sys.exit(main())
