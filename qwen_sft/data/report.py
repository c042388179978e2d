"""The end-of-run summary: one row per input file (read, written, rejected by reason) and the totals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qwen_sft.data.convert import FileStats


def _reasons(counter: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items()))


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
    read, written = sum(s.read for s in stats), sum(s.written for s in stats)
    rejected = sum((s.rejected for s in stats), Counter())
    lines.append("-" * len(head))
    lines.append(f"{'total':<{width}}  {read:>8}  {written:>8}  {sum(rejected.values()):>8}  {_reasons(rejected)}")
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
