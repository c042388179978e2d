"""``qwen-sft inspect``: show a tokenized sample as text with exactly the trained tokens highlighted.

    qwen-sft inspect processed/train.jsonl --index 3
    qwen-sft inspect processed/train.parquet --index 0 --html sample0.html

Supervised spans are green in a terminal (``--color never`` marks them «like this» instead) or
highlighted in the HTML page. Ids are decoded with the offline Qwen3-Coder vocabulary by default —
the same ids as the released tokenizer, and it needs no download.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

from qwen_sft.atomic import atomic_open
from qwen_sft.samples import IGNORE_INDEX
from qwen_sft.samples.files import iter_samples
from qwen_sft.tokenizer import TokenizerLoadError, load_tokenizer

GREEN, RESET = "\033[42;30m", "\033[0m"
OPEN, CLOSE = "«", "»"


def segments(tok, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Runs of consecutive tokens with the same supervised state, decoded together (keeps UTF-8 whole)."""
    out: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tok.decode(ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append((text, labels[start] != IGNORE_INDEX))
            start = i
    return out


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-sft inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="tokenized file: .jsonl, .parquet or .arrow")
    parser.add_argument("--index", "-n", type=int, default=0, help="sample number, from 0 (default 0)")
    parser.add_argument("--html", type=Path, default=None, help="write an HTML page here instead of printing")
    parser.add_argument("-m", "--model", default="offline", help="tokenizer used to decode ids (default offline)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="terminal colours")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read an upstream .npy (a pickle: only for a file you made yourself)")
    args = parser.parse_args(argv)
    if args.index < 0:
        print(f"error: --index {args.index} must be 0 or more", file=sys.stderr)
        return 2
    try:
        sample, count = None, 0
        for row in iter_samples(args.file, allow_pickle=args.allow_pickle):
            if count == args.index:
                sample = row
                break
            count += 1
        if sample is None:
            print(f"error: {args.file} has no sample {args.index} (it has {count})", file=sys.stderr)
            return 2
        tok = load_tokenizer(args.model)
    except (ValueError, OSError, TokenizerLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ids, labels = sample
    bad = sum(1 for i, lab in zip(ids, labels) if lab not in (IGNORE_INDEX, i))
    supervised = sum(1 for lab in labels if lab != IGNORE_INDEX)
    summary = f"sample {args.index}: {len(ids)} tokens, {supervised} supervised"
    if len(ids) != len(labels) or bad:
        summary += f"; WARNING: {bad} labels differ from their input id, lengths {len(ids)}/{len(labels)}"
    segs = segments(tok, ids, labels)
    if args.html:
        with atomic_open(args.html) as fh:
            fh.write(to_html(segs, f"{args.file.name} #{args.index}", summary))
        print(f"{summary}; wrote {args.html}")
        return 0
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(summary)
    print(to_terminal(segs, color))
    return 0


if __name__ == "__main__":
    sys.exit(main())
