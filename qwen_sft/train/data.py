"""Tokenized training data, validated before any model is loaded.

    python -c "from qwen_sft.train.data import load_tokenized; print(load_tokenized('processed/sft_train.jsonl', \
vocab_size=151936, max_len=2048).stats)"

The sample format, the memory-mapped dataset and the length rule are the sample contract's
(qwen_sft/samples/: ``files.py``, ``dataset.py``, ``length.py``); this module checks a file against the model
and the tokenizer that training uses, and applies the length rule.

A file written by the tokenizer has ``<file>.stats.json`` beside it, naming the tokenizer and chat template
that made it (sha256 of each); data made with a template or vocabulary other than the tokenizer training
saves beside the adapter is refused, unless ``allow_template_mismatch``.

Every problem of every row is collected and raised as one ``DataError`` naming file, line and reason.
Over-long rows are dropped and counted (or cut by the length rule with ``truncate``, or an error with ``strict``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson

from qwen_sft.samples import IGNORE_INDEX
from qwen_sft.samples.dataset import Columns, DataError, Problems, TokenizedDataset, to_arrow
from qwen_sft.samples.length import NO_MARKS, NothingSupervised, TurnMarks, cut_to_length, fits

__all__ = ["DataError", "DataStats", "TokenizedDataset", "check_tokenizer", "load_tokenized", "to_arrow"]


@dataclass
class DataStats:
    path: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    length: dict[str, float] = field(default_factory=dict)
    # {"data": fingerprint from <file>.stats.json or None, "training": the saved tokenizer's, "match": bool|None}
    tokenizer: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.path}: {self.rows_read} rows read = {self.rows_kept} kept + {self.dropped_too_long} dropped "
                f"(longer than model_max_length); {self.truncated} truncated; {self.tokens} tokens, "
                f"{self.supervised_tokens} supervised ({self.supervised_tokens / max(self.tokens, 1):.1%})")

    def to_dict(self) -> dict:
        return asdict(self)


def _supervised_counts(labels: np.ndarray, loff: np.ndarray, rows: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Supervised targets per row within its first ``lens`` tokens. Position 0 is never a prediction
    target (labels shift by one inside the loss), so it does not count."""
    counts = np.zeros(len(rows), np.int64)
    if not len(rows):
        return counts
    base = loff[rows.min()]
    # Cumulative count over just this chunk's tokens: bounded memory, one pass.
    csum = np.concatenate([[0], np.cumsum(labels[base:loff[rows.max() + 1]] != IGNORE_INDEX)])
    start = loff[rows] - base + 1
    end = loff[rows] - base + lens
    counts = csum[np.maximum(end, start)] - csum[start]
    return counts


def check_tokenizer(path: Path, training: dict | None, allow_mismatch: bool, problems: Problems) -> dict:
    """Compare the tokenizer recorded in ``<path>.stats.json`` with the one training saves beside the adapter."""
    record: dict = {"data": None, "training": training, "match": None}
    stats_file = path.with_name(path.name + ".stats.json")
    try:
        made_by = orjson.loads(stats_file.read_bytes()).get("tokenizer")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        made_by = None
    if not isinstance(made_by, dict) or training is None:
        return record  # hand-made data or an older tokenize run: nothing to compare (data_stats.json says so)
    record["data"] = made_by
    differ = [k for k in ("chat_template_sha256", "vocab_sha256") if made_by.get(k) != training.get(k)]
    record["match"] = not differ
    if differ and not allow_mismatch:
        what = " and ".join("chat template" if k.startswith("chat") else "vocabulary" for k in differ)
        problems.add(f"made with another {what}", str(stats_file),
                     f"tokenized with {made_by.get('name_or_path')!r} (template sha256 "
                     f"{str(made_by.get('chat_template_sha256'))[:12]}…), but training saves {training['name_or_path']!r} "
                     f"(template sha256 {str(training.get('chat_template_sha256'))[:12]}…) beside the adapter; "
                     f"re-tokenize with `-m {training['name_or_path']}`, or pass --allow_template_mismatch true")
    return record


def _check_rows(ids: np.ndarray, labels: np.ndarray, off: np.ndarray, loff: np.ndarray, lengths: np.ndarray,
                llengths: np.ndarray, lo: int, hi: int, vocab_size: int, label_of, problems: Problems) -> np.ndarray:
    """Rows ``lo:hi`` of one batch: record every broken row in ``problems``; return the well-formed ones."""
    rows = np.arange(lo, hi)
    same = lengths[lo:hi] == llengths[lo:hi]
    for r in rows[~same]:
        problems.add("length mismatch", label_of(r), f"{lengths[r]} input_ids vs {llengths[r]} labels")
    for r in rows[lengths[lo:hi] == 0]:
        problems.add("empty sample", label_of(r))
    a, b = off[lo], off[hi]
    flat_ids, flat_lab = ids[a:b], labels[loff[lo]:loff[hi]]
    seg = off[lo:hi] - a
    nonempty = lengths[lo:hi] > 0
    # Per-row reductions over the flat tokens (reduceat needs non-empty segments).
    bad_vocab = np.zeros(hi - lo, bool)
    bad_label = np.zeros(hi - lo, bool)
    if flat_ids.size:
        ok = same & nonempty
        idx = seg[nonempty]
        bad_vocab[nonempty] = np.logical_or.reduceat((flat_ids < 0) | (flat_ids >= vocab_size), idx)
        if ok.all():
            bad_label[nonempty] = np.logical_or.reduceat((flat_lab != IGNORE_INDEX) & (flat_lab != flat_ids), idx)
        else:
            for r in rows[ok]:
                s, e, ls = off[r], off[r + 1], loff[r]
                lab = labels[ls:ls + e - s]
                bad_label[r - lo] = bool(((lab != IGNORE_INDEX) & (lab != ids[s:e])).any())
    for r in rows[bad_vocab]:
        s, e = off[r], off[r + 1]
        worst = int(ids[s:e].max()) if ids[s:e].max() >= vocab_size else int(ids[s:e].min())
        problems.add("ids beyond the vocabulary", label_of(r), f"id {worst} not in [0, {vocab_size})")
    for r in rows[bad_label]:
        problems.add("labels other than -100 or the input id", label_of(r))
    return rows[same & nonempty & ~bad_vocab & ~bad_label]


def load_tokenized(path: str | os.PathLike, *, vocab_size: int, max_len: int, truncate: bool = False,
                   strict: bool = False, cache_dir: str | os.PathLike = ".cache/qwen_sft/data",
                   tokenizer: dict | None = None, allow_template_mismatch: bool = False,
                   marks: TurnMarks = NO_MARKS) -> TokenizedDataset:
    """Convert (once), memory-map and validate ``path``; raise one ``DataError`` listing every problem.

    ``tokenizer`` is the fingerprint (``qwen_sft.tokenize.fingerprint``) of the tokenizer training saves;
    data whose stats file names another chat template or vocabulary is a problem unless allowed. ``marks``
    (``TurnMarks.of(tokenizer)``) lets ``truncate`` cut at turn boundaries, as tokenize does."""
    problems = Problems(Path(path))
    stats = DataStats(path=str(path))
    stats.tokenizer = check_tokenizer(Path(path), tokenizer, allow_template_mismatch, problems)
    arrow = to_arrow(path, cache_dir, problems)
    cols = Columns(arrow)
    n = cols.num_rows
    stats.rows_read = n
    is_jsonl = Path(path).suffix not in (".parquet", ".arrow")
    kept: list[np.ndarray] = []
    kept_ends: list[np.ndarray] = []
    chunk = 65_536  # rows per vectorised pass: bounded temporary memory however large a batch
    for b in range(len(cols.ids)):
        ids, labels, off, loff, where = cols.ids[b], cols.labels[b], cols.off[b], cols.loff[b], cols.lines[b]
        label_of = (lambda r, w=where: f"line {w[r]}") if is_jsonl else (lambda r, w=where: f"row {w[r]}")
        lengths, llengths = np.diff(off).astype(np.int64), np.diff(loff).astype(np.int64)
        for lo in range(0, len(lengths), chunk):
            hi = min(lo + chunk, len(lengths))
            good = _check_rows(ids, labels, off, loff, lengths, llengths, lo, hi, vocab_size, label_of, problems)
            too_long = ~fits(lengths[good], max_len)
            if strict:
                for r in good[too_long]:
                    problems.add("longer than model_max_length", label_of(r), f"{lengths[r]} > {max_len=}")
            elif not truncate:
                stats.dropped_too_long += int(too_long.sum())
                good = good[~too_long]
            ends = lengths[good].copy()
            if truncate:
                stats.truncated += int(too_long.sum())
                for i in np.flatnonzero(too_long):
                    s, ls, r = int(off[good[i]]), int(loff[good[i]]), good[i]
                    try:
                        ends[i], _ = cut_to_length(ids[s:s + lengths[r]], labels[ls:ls + lengths[r]], max_len, marks)
                    except NothingSupervised:
                        ends[i] = max_len  # counted as "no supervised token" just below
            sup = _supervised_counts(labels, loff, good, ends)
            for r, end in zip(good[sup == 0], ends[sup == 0]):
                why = "within the first model_max_length tokens" if lengths[r] > end else ""
                problems.add("no supervised token", label_of(r), why)
            stats.supervised_tokens += int(sup.sum())
            kept.append(good + cols.first_row[b])
            kept_ends.append(ends)
    if arrow.name.endswith(".partial.arrow"):
        arrow.unlink()
    problems.raise_if_any("fix the rows above (re-run the tokenizer), or drop them")
    kept_idx = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    ds = TokenizedDataset(arrow, kept_idx, np.concatenate(kept_ends) if kept_ends else np.zeros(0, np.int64),
                          stats, cols)
    lens = ds.lengths()
    stats.rows_kept = len(kept_idx)
    stats.tokens = int(lens.sum())
    if len(lens):
        stats.length = {"min": int(lens.min()), "mean": round(float(lens.mean()), 1),
                        "p50": float(np.percentile(lens, 50)), "p95": float(np.percentile(lens, 95)),
                        "max": int(lens.max())}
    assert stats.rows_kept + stats.dropped_too_long == stats.rows_read  # counts must add up
    return ds
