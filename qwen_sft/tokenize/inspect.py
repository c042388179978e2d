"""``qwen-sft inspect``: show a tokenized sample as text with exactly the trained tokens highlighted.

    qwen-sft inspect processed/train.jsonl --index 3
    qwen-sft inspect processed/train.parquet --index 0 --html sample0.html

Supervised spans are green in a terminal (``--color never`` marks them «like this» instead) or
highlighted in the HTML page. Ids are decoded with the offline Qwen3-Coder vocabulary by default —
the same ids as the released tokenizer, and it needs no download.
"""

from __future__ import annotations

import html
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qwen_sft.atomic import atomic_open
from qwen_sft.cli_options import OptionParser, build_parser, option, parse
from qwen_sft.light_tokenizer import LightTokenizer
from qwen_sft.samples import IGNORE_INDEX
from qwen_sft.samples.files import iter_samples
from qwen_sft.tokenizer import TokenizerLoadError, load_data_tokenizer

GREEN, RESET = "\033[42;30m", "\033[0m"
OPEN, CLOSE = "«", "»"


def segments(tok, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Runs of consecutive tokens with the same supervised state, decoded together (keeps UTF-8 whole)."""
    out: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = _decode(tok, ids[start:i])
            out.append((text, labels[start] != IGNORE_INDEX))
            start = i
    return out


def _decode(tok, ids: list[int]) -> str:
    """The text of ``ids`` as transformers decodes it without clean-up: the LightTokenizer of the data path has no
    clean-up step, a transformers tokenizer (load_data_tokenizer's fallback) is told to skip its own."""
    if isinstance(tok, LightTokenizer):
        return tok.decode(ids, skip_special_tokens=False)
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def to_terminal(segs: list[tuple[str, bool]], color: bool) -> str:
    if color:
        # Colour each line separately so the highlight does not bleed across newlines in every terminal.
        return "".join("\n".join(f"{GREEN}{p}{RESET}" if p else "" for p in t.split("\n")) if s else t for t, s in segs)
    return "".join(f"{OPEN}{t}{CLOSE}" if s else t for t, s in segs)


def to_html(segs: list[tuple[str, bool]], title: str, summary: str) -> str:
    body = "".join(f'<span class="sup">{html.escape(t)}</span>' if s else html.escape(t) for t, s in segs)
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title><style>"
        "body{font-family:sans-serif;margin:2em} pre{white-space:pre-wrap;font-size:13px;background:#fafafa;"
        "padding:1em;border:1px solid #ddd} .sup{background:#b7f5c0;outline:1px solid #5cb85c}</style></head>"
        f"<body><h3>{html.escape(title)}</h3><p>{html.escape(summary)} — highlighted text is trained on.</p>"
        f"<pre>{body}</pre></body></html>\n"
    )


@dataclass
class InspectOptions:
    """``qwen-sft inspect FILE``: each field's help is the CLI help."""

    file: Path = option(help="tokenized file: .jsonl, .parquet or .arrow")
    index: int = option(0, "--index", "-n", help="sample number, from 0 (default 0)")
    html: Path | None = option(None, "--html", help="write an HTML page here instead of printing")
    model: str = option("offline", "-m", "--model", help="tokenizer used to decode ids (default offline)")
    color: Literal["auto", "always", "never"] = option("auto", "--color", help="terminal colours", show_default=False)
    allow_pickle: bool = option(False, "--allow-pickle", help=(
        "read an upstream .npy (a pickle: only for a file you made yourself)"))

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"--index {self.index} must be 0 or more")


def inspect_parser() -> OptionParser:
    return build_parser("qwen-sft inspect", [InspectOptions], description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    (opts,), problems = parse(inspect_parser(), argv)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        sample, count = None, 0
        for row in iter_samples(opts.file, allow_pickle=opts.allow_pickle):
            if count == opts.index:
                sample = row
                break
            count += 1
        if sample is None:
            print(f"error: {opts.file} has no sample {opts.index} (it has {count})", file=sys.stderr)
            return 2
        tok = load_data_tokenizer(opts.model)
    except (ValueError, OSError, TokenizerLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ids, labels = sample
    bad = sum(1 for i, lab in zip(ids, labels) if lab not in (IGNORE_INDEX, i))
    supervised = sum(1 for lab in labels if lab != IGNORE_INDEX)
    summary = f"sample {opts.index}: {len(ids)} tokens, {supervised} supervised"
    if len(ids) != len(labels) or bad:
        summary += f"; WARNING: {bad} labels differ from their input id, lengths {len(ids)}/{len(labels)}"
    segs = segments(tok, ids, labels)
    if opts.html:
        with atomic_open(opts.html) as fh:
            fh.write(to_html(segs, f"{opts.file.name} #{opts.index}", summary))
        print(f"{summary}; wrote {opts.html}")
        return 0
    color = opts.color == "always" or (opts.color == "auto" and sys.stdout.isatty())
    print(summary)
    print(to_terminal(segs, color))
    return 0


if __name__ == "__main__":
    sys.exit(main())
