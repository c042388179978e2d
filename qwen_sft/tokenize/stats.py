"""Counts of a tokenization run that add up, saved as ``<output>.stats.json`` + ``<output>.lengths.png``.

    records_read == samples_written + rejected + dropped     (blank lines are not records)

Lengths are kept as a count per distinct length, so memory stays flat in the number of samples and
the percentiles are exact.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_sft.atomic import atomic_open

PERCENTILES = (50, 90, 95, 99, 100)


def _percentiles(counts: Counter) -> dict[str, int]:
    total = sum(counts.values())
    if not total:
        return {}
    out, seen, keys = {}, 0, sorted(counts)
    targets = [(p, max(1, -(-p * total // 100))) for p in PERCENTILES]  # nearest-rank percentile
    it = iter(targets)
    p, rank = next(it)
    for length in keys:
        seen += counts[length]
        while seen >= rank:
            out[f"p{p}"] = length
            nxt = next(it, None)
            if nxt is None:
                return out
            p, rank = nxt
    return out


@dataclass
class RunStats:
    records_read: int = 0
    blank_lines: int = 0
    samples_written: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    rejected: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    lengths: Counter = field(default_factory=Counter)
    dropped_lengths: Counter = field(default_factory=Counter)
    dropped_unmeasured: int = 0  # dropped as over max_len from their byte length alone (see sample.py)

    def add_sample(self, length: int, supervised: int, cut: str) -> None:
        self.samples_written += 1
        self.tokens += length
        self.supervised_tokens += supervised
        self.lengths[length] += 1
        if cut:
            self.truncated[cut] += 1

    def add_drop(self, reason: str, length: int, exact: bool = True) -> None:
        """``exact=False``: ``length`` is only a lower bound (measured from bytes, never tokenized)."""
        self.dropped[reason] += 1
        if exact:
            self.dropped_lengths[length] += 1
        else:
            self.dropped_unmeasured += 1

    def check(self) -> None:
        total = self.samples_written + sum(self.rejected.values()) + sum(self.dropped.values())
        if total != self.records_read:
            raise RuntimeError(f"counts do not add up: {self.records_read=} but {total=} written+rejected+dropped")

    def to_dict(self, /, **context: Any) -> dict[str, Any]:
        return {
            **context,
            "records_read": self.records_read,
            "blank_lines": self.blank_lines,
            "samples": self.samples_written,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
            "supervised_fraction": round(self.supervised_tokens / self.tokens, 4) if self.tokens else 0.0,
            "length_percentiles": _percentiles(self.lengths),
            "rejected": dict(sorted(self.rejected.items())),
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_length_percentiles": _percentiles(self.dropped_lengths),
            "dropped_lengths": {str(k): v for k, v in sorted(self.dropped_lengths.items())},
            "dropped_unmeasured": self.dropped_unmeasured,
            "truncated": dict(sorted(self.truncated.items())),
        }

    def summary(self) -> str:
        pct = _percentiles(self.lengths)
        lines = [
            f"records {self.records_read:,}: written {self.samples_written:,}, rejected {sum(self.rejected.values()):,},"
            f" dropped {sum(self.dropped.values()):,} (blank lines skipped: {self.blank_lines:,})",
            f"tokens {self.tokens:,}, supervised {self.supervised_tokens:,}; length " + ", ".join(f"{k}={v}" for k, v in pct.items()),
        ]
        for name, counter in (("rejected", self.rejected), ("dropped", self.dropped), ("truncated", self.truncated)):
            if counter:
                lines.append(f"{name}: " + ", ".join(f"{k}={v:,}" for k, v in sorted(counter.items())))
        return "\n".join(lines)


def side_paths(output: Path) -> dict[str, Path]:
    """The files written beside a tokenized ``output``; ``stats`` is written last and means the set is complete."""
    return {kind: output.with_name(f"{output.name}.{suffix}") for kind, suffix in
            (("rejects", "rejects.jsonl"), ("plot", "lengths.png"), ("run", "run.json"), ("stats", "stats.json"))}


def save(stats: RunStats, output: Path, max_len: int, /, json_path: Path | None = None, png_path: Path | None = None,
         **context: Any) -> tuple[Path, Path]:
    """Write ``<output>.stats.json`` and the length histogram ``<output>.lengths.png`` (or to the paths given).

    Only what the data and the options decide goes into stats.json, so two identical runs write identical
    bytes; timings and where the files were go into ``<output>.run.json`` (pipeline.py).
    """
    direct = json_path is not None
    json_path = json_path or side_paths(output)["stats"]
    png_path = png_path or side_paths(output)["plot"]
    with (open(json_path, "w", encoding="utf-8") if direct else atomic_open(json_path)) as fh:
        json.dump(stats.to_dict(max_len=max_len, **context), fh, indent=2)
        fh.write("\n")
    from qwen_sft.tokenize.lengths_plot import draw_lengths

    title = f"{output.name}: {stats.samples_written:,} samples, {stats.tokens:,} tokens"
    png = draw_lengths(stats.lengths, stats.dropped_lengths, max_len, title)
    with (open(png_path, "wb") if direct else atomic_open(png_path, "wb")) as fh:
        fh.write(png)
    return json_path, png_path
