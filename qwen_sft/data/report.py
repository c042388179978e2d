"""The end-of-run summary: one row per input file (read, written, rejected by reason) and the totals.

Under each row: notes (dropped reasoning, trailing turns, ...) and the keys of its written records that no shape
read (``unread keys: images=3, messages[].reasoning_content=12``), so nothing is left out without a trace.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qwen_sft.data.convert import FileStats


def _reasons(counter: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items()))


def _unread(counter: Counter) -> str:
    """Most frequent first: the keys a user most likely meant to train on lead the line.

    Keys are data: a lone surrogate is escaped and a long key shortened, so the summary always prints.
    """
    def name(key: str) -> str:
        key = key if len(key) <= 80 else key[:80] + "…"
        return key.encode("utf-8", "backslashreplace").decode("utf-8")

    return ", ".join(f"{name(k)}={v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def summary_lines(stats: list[FileStats]) -> list[str]:
    """Rows of the table printed after each run; the totals row restates ``read = written + rejected``."""
    width = max([len(str(s.path)) for s in stats] + [5])
    head = f"{'file':<{width}}  {'read':>8}  {'written':>8}  {'rejected':>8}  reasons"
    lines = [head, "-" * len(head)]
    for s in stats:
        lines.append(f"{str(s.path):<{width}}  {s.read:>8}  {s.written:>8}  {s.n_rejected:>8}  {_reasons(s.rejected)}")
        notes = s.notes + (Counter(blank_lines=s.blank_lines) if s.blank_lines else Counter())
        if notes:
            lines.append(f"{'':<{width}}  notes: {_reasons(notes)}")
        if s.unread:
            lines.append(f"{'':<{width}}  unread keys: {_unread(s.unread)}")
    read, written = sum(s.read for s in stats), sum(s.written for s in stats)
    rejected = sum((s.rejected for s in stats), Counter())
    lines.append("-" * len(head))
    lines.append(f"{'total':<{width}}  {read:>8}  {written:>8}  {sum(rejected.values()):>8}  {_reasons(rejected)}")
    unread = sum((s.unread for s in stats), Counter())
    if unread and len(stats) > 1:
        lines.append(f"unread keys (all files): {_unread(unread)}")
    lines.append(f"read {read} = written {written} + rejected {sum(rejected.values())}")
    return lines


def print_summary(stats: list[FileStats], outputs: list[Path], rejects: Path | None) -> int:
    """Print the table and where everything went; returns the number of records written."""
    for line in summary_lines(stats):
        print(line)
    for path in outputs:
        print(f"wrote {path}")
    if rejects is not None:
        print(f"rejects: {rejects}")
    return sum(s.written for s in stats)
