"""Tokenized training data, memory-mapped, validated before any model is loaded.

    python -c "from qwen_sft.train.data import load_tokenized; print(load_tokenized('processed/sft_train.jsonl', \
vocab_size=151936, max_len=2048).stats)"

Accepted: JSONL lines ``{"input_ids": [...], "label": [...]}`` (-100 = not supervised), ``.parquet`` and
``.arrow`` (Arrow IPC file) with list<int32> columns ``input_ids`` and ``label``. JSONL and Parquet are
converted once into an Arrow IPC file under ``data_cache_dir`` (keyed by path, size and mtime) and every
file is then memory-mapped: the dataset costs page cache, not Python lists. Rows are read through
per-record-batch numpy views of the mapped buffers; nothing concatenates the batches (that would copy the
whole file onto the heap, in every rank).

A file written by the tokenizer has ``<file>.stats.json`` beside it, naming the tokenizer and chat template
that made it (sha256 of each); data made with a template or vocabulary other than the tokenizer training
saves beside the adapter is refused, unless ``allow_template_mismatch``.

Every problem of every row is collected and raised as one ``DataError`` naming file, line and reason.
Over-long rows are dropped and counted (or cut with ``truncate``, or an error with ``strict``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from qwen_sft.atomic import atomic_open

IGNORE = -100
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.list_(pa.int32())), ("line", pa.int64())])
TOKENIZE_FIX = ("the data is not tokenized: run `python convert_to_chatml.py ./raw --tokenize` "
                "(or `qwen-sft tokenize`) and train on its output")
MAX_LISTED = 20  # problems listed per kind; the rest are counted
_CACHE_VERSION = "1"


class DataError(ValueError):
    """All problems found in a data file, in one message."""


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


class _Problems:
    def __init__(self, path: Path) -> None:
        self.path, self.by_kind, self.fix = path, {}, ""

    def add(self, kind: str, where: str, detail: str = "") -> None:
        self.by_kind.setdefault(kind, []).append(f"{where}: {detail}" if detail else where)

    def raise_if_any(self, fix: str = "") -> None:
        if not self.by_kind:
            return
        fix = self.fix or fix
        total = sum(map(len, self.by_kind.values()))
        lines = [f"{self.path}: {total} problem(s) found; no model was loaded"]
        for kind, items in self.by_kind.items():
            lines.append(f"  {kind} ({len(items)}):")
            lines += [f"    {item}" for item in items[:MAX_LISTED]]
            if len(items) > MAX_LISTED:
                lines.append(f"    … and {len(items) - MAX_LISTED} more")
        if fix:
            lines.append(f"  fix: {fix}")
        raise DataError("\n".join(lines))


def _jsonl_to_arrow(path: Path, out: Path, problems: _Problems) -> None:
    ids_buf: list[list[int]] = []
    lab_buf: list[list[int]] = []
    line_buf: list[int] = []
    untokenized = 0

    def flush(writer: pa.ipc.RecordBatchFileWriter) -> None:
        if line_buf:
            writer.write_batch(pa.record_batch([pa.array(ids_buf, pa.list_(pa.int32())),
                                                pa.array(lab_buf, pa.list_(pa.int32())),
                                                pa.array(line_buf, pa.int64())], schema=SCHEMA))
            ids_buf.clear(), lab_buf.clear(), line_buf.clear()

    with atomic_open(out, "wb") as fh, pa.ipc.new_file(fh, SCHEMA) as writer, open(path, "rb") as src:
        for lineno, raw in enumerate(src, 1):
            if not raw.strip():
                continue
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                problems.add("invalid JSON", f"line {lineno}", str(exc))
                continue
            if not isinstance(rec, dict) or "input_ids" not in rec:
                untokenized += 1
                keys = sorted(rec)[:6] if isinstance(rec, dict) else type(rec).__name__
                problems.add("not tokenized (no input_ids)", f"line {lineno}", f"keys {keys}")
                continue
            labels = rec.get("label", rec.get("labels"))
            ids = rec["input_ids"]
            if labels is None:
                problems.add("no label", f"line {lineno}", "expected a 'label' list beside input_ids")
                continue
            if not (isinstance(ids, list) and isinstance(labels, list)
                    and all(type(x) is int for x in ids) and all(type(x) is int for x in labels)):
                problems.add("not lists of integers", f"line {lineno}")
                continue
            if any(abs(x) >= 2**31 for x in ids) or any(abs(x) >= 2**31 for x in labels):
                problems.add("ids beyond the vocabulary", f"line {lineno}", "value does not fit int32")
                continue
            ids_buf.append(ids), lab_buf.append(labels), line_buf.append(lineno)
            if len(line_buf) >= 4096:
                flush(writer)
        flush(writer)
    if untokenized:
        problems.fix = TOKENIZE_FIX


def _table_to_arrow(table_batches, path: Path, out: Path, names: list[str]) -> None:
    """Parquet / non-int32 Arrow → our schema, batch by batch (never the whole table in memory)."""
    label_col = "label" if "label" in names else "labels" if "labels" in names else None
    if "input_ids" not in names or label_col is None:
        raise DataError(f"{path}: columns {names}; expected 'input_ids' and 'label'\n  fix: {TOKENIZE_FIX}")
    row = 0
    with atomic_open(out, "wb") as fh, pa.ipc.new_file(fh, SCHEMA) as writer:
        for batch in table_batches:
            n = batch.num_rows
            writer.write_batch(pa.record_batch([
                batch.column("input_ids").cast(pa.list_(pa.int32())),
                batch.column(label_col).cast(pa.list_(pa.int32())),
                pa.array(np.arange(row + 1, row + n + 1), pa.int64())], schema=SCHEMA))
            row += n


def to_arrow(path: str | os.PathLike, cache_dir: str | os.PathLike, problems: _Problems | None = None) -> Path:
    """The memory-mappable Arrow IPC file for ``path`` (itself when it already has our schema).

    Rows of a JSONL file that cannot become tokenized rows are recorded in ``problems``; the valid rest
    goes to a ``.partial`` file so that row checks still run and every problem is reported at once."""
    path = Path(path)
    problems = problems if problems is not None else _Problems(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".arrow":
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path}: not an Arrow IPC file ({exc})") from exc
        names = reader.schema.names
        if all(c in names and reader.schema.field(c).type == pa.list_(pa.int32()) for c in ("input_ids", "label")):
            return path  # already memory-mappable as is
    st = path.stat()
    key = hashlib.sha256(f"{_CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    out = Path(cache_dir) / f"{path.stem}-{key[:16]}.arrow"
    if out.exists():
        return out
    if path.suffix == ".parquet":
        pf = pq.ParquetFile(path)
        _table_to_arrow(pf.iter_batches(batch_size=4096), path, out, pf.schema_arrow.names)
    elif path.suffix == ".arrow":
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        _table_to_arrow(batches, path, out, reader.schema.names)
    else:
        partial = out.with_suffix(".partial.arrow")
        _jsonl_to_arrow(path, partial, problems)
        if problems.by_kind:
            return partial
        os.replace(partial, out)
    return out


def _supervised_counts(labels: np.ndarray, loff: np.ndarray, rows: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Supervised targets per row within its first ``lens`` tokens. Position 0 is never a prediction
    target (labels shift by one inside the loss), so it does not count."""
    counts = np.zeros(len(rows), np.int64)
    if not len(rows):
        return counts
    base = loff[rows.min()]
    # Cumulative count over just this chunk's tokens: bounded memory, one pass.
    csum = np.concatenate([[0], np.cumsum(labels[base:loff[rows.max() + 1]] != IGNORE)])
    start = loff[rows] - base + 1
    end = loff[rows] - base + lens
    counts = csum[np.maximum(end, start)] - csum[start]
    return counts


class _Columns:
    """Zero-copy numpy views of each record batch of a memory-mapped Arrow IPC file (never concatenated)."""

    def __init__(self, arrow_path: Path) -> None:
        reader = pa.ipc.open_file(pa.memory_map(str(arrow_path)))
        self.ids: list[np.ndarray] = []  # token values of batch b
        self.labels: list[np.ndarray] = []
        self.off: list[np.ndarray] = []  # row offsets into ids[b] (absolute: IPC batches may start past 0)
        self.loff: list[np.ndarray] = []
        self.lines: list[np.ndarray] = []
        has_line = "line" in reader.schema.names
        row = 0
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            ids, labels = batch.column("input_ids"), batch.column("label")
            self.ids.append(ids.values.to_numpy())
            self.labels.append(labels.values.to_numpy())
            self.off.append(ids.offsets.to_numpy())
            self.loff.append(labels.offsets.to_numpy())
            n = batch.num_rows
            self.lines.append(batch.column("line").to_numpy() if has_line else np.arange(row + 1, row + n + 1))
            row += n
        self.first_row = np.zeros(len(self.ids) + 1, np.int64)  # global index of each batch's first row
        np.cumsum([len(o) - 1 for o in self.off], out=self.first_row[1:])
        self.num_rows = int(self.first_row[-1])
        # Per-row lengths are O(rows), not O(tokens): small, kept on the heap for sampling and stats.
        lens = [np.diff(o).astype(np.int64) for o in self.off]
        self.lengths = np.concatenate(lens) if lens else np.zeros(0, np.int64)

    def locate(self, row: int) -> tuple[int, int]:
        b = int(np.searchsorted(self.first_row, row, side="right")) - 1
        return b, row - int(self.first_row[b])


class TokenizedDataset:
    """Rows of a memory-mapped Arrow file; ``kept`` indexes the validated rows, ``limit`` caps their length."""

    def __init__(self, arrow_path: Path, kept: np.ndarray, limit: int, stats: DataStats,
                 columns: _Columns | None = None) -> None:
        self._cols = columns if columns is not None else _Columns(arrow_path)
        self.kept, self.limit, self.stats, self.path = kept, limit, stats, arrow_path

    def __len__(self) -> int:
        return len(self.kept)

    def lengths(self) -> np.ndarray:
        return np.minimum(self._cols.lengths[self.kept], self.limit)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        c = self._cols
        b, r = c.locate(int(self.kept[index]))
        start = int(c.off[b][r])
        end = min(int(c.off[b][r + 1]), start + self.limit)
        lstart = int(c.loff[b][r])
        return {"input_ids": c.ids[b][start:end].tolist(),
                "labels": c.labels[b][lstart:lstart + end - start].tolist()}


def check_tokenizer(path: Path, training: dict | None, allow_mismatch: bool, problems: _Problems) -> dict:
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
                llengths: np.ndarray, lo: int, hi: int, vocab_size: int, label_of, problems: _Problems) -> np.ndarray:
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
            bad_label[nonempty] = np.logical_or.reduceat((flat_lab != IGNORE) & (flat_lab != flat_ids), idx)
        else:
            for r in rows[ok]:
                s, e, ls = off[r], off[r + 1], loff[r]
                lab = labels[ls:ls + e - s]
                bad_label[r - lo] = bool(((lab != IGNORE) & (lab != ids[s:e])).any())
    for r in rows[bad_vocab]:
        s, e = off[r], off[r + 1]
        worst = int(ids[s:e].max()) if ids[s:e].max() >= vocab_size else int(ids[s:e].min())
        problems.add("ids beyond the vocabulary", label_of(r), f"id {worst} not in [0, {vocab_size})")
    for r in rows[bad_label]:
        problems.add("labels other than -100 or the input id", label_of(r))
    return rows[same & nonempty & ~bad_vocab & ~bad_label]


def load_tokenized(path: str | os.PathLike, *, vocab_size: int, max_len: int, truncate: bool = False,
                   strict: bool = False, cache_dir: str | os.PathLike = ".cache/qwen_sft/data",
                   tokenizer: dict | None = None, allow_template_mismatch: bool = False) -> TokenizedDataset:
    """Convert (once), memory-map and validate ``path``; raise one ``DataError`` listing every problem.

    ``tokenizer`` is the fingerprint (``qwen_sft.tokenize.fingerprint``) of the tokenizer training saves;
    data whose stats file names another chat template or vocabulary is a problem unless allowed."""
    problems = _Problems(Path(path))
    stats = DataStats(path=str(path))
    stats.tokenizer = check_tokenizer(Path(path), tokenizer, allow_template_mismatch, problems)
    arrow = to_arrow(path, cache_dir, problems)
    cols = _Columns(arrow)
    n = cols.num_rows
    stats.rows_read = n
    is_jsonl = Path(path).suffix not in (".parquet", ".arrow")
    kept: list[np.ndarray] = []
    limit = max_len if truncate else int(np.iinfo(np.int32).max)
    chunk = 65_536  # rows per vectorised pass: bounded temporary memory however large a batch
    for b in range(len(cols.ids)):
        ids, labels, off, loff, where = cols.ids[b], cols.labels[b], cols.off[b], cols.loff[b], cols.lines[b]
        label_of = (lambda r, w=where: f"line {w[r]}") if is_jsonl else (lambda r, w=where: f"row {w[r]}")
        lengths, llengths = np.diff(off).astype(np.int64), np.diff(loff).astype(np.int64)
        for lo in range(0, len(lengths), chunk):
            hi = min(lo + chunk, len(lengths))
            good = _check_rows(ids, labels, off, loff, lengths, llengths, lo, hi, vocab_size, label_of, problems)
            too_long = good[lengths[good] > max_len]
            if strict:
                for r in too_long:
                    problems.add("longer than model_max_length", label_of(r), f"{lengths[r]} > {max_len=}")
            elif not truncate:
                stats.dropped_too_long += len(too_long)
                good = good[lengths[good] <= max_len]
            else:
                stats.truncated += len(too_long)
            sup = _supervised_counts(labels, loff, good, np.minimum(lengths[good], limit))
            for r in good[sup == 0]:
                why = "within the first model_max_length tokens" if lengths[r] > limit else ""
                problems.add("no supervised token", label_of(r), why)
            stats.supervised_tokens += int(sup.sum())
            kept.append(good + cols.first_row[b])
    if arrow.name.endswith(".partial.arrow"):
        arrow.unlink()
    problems.raise_if_any("fix the rows above (re-run the tokenizer), or drop them")
    kept_idx = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    ds = TokenizedDataset(arrow, kept_idx, int(min(limit, np.iinfo(np.int32).max)), stats, cols)
    lens = ds.lengths()
    stats.rows_kept = len(kept_idx)
    stats.tokens = int(lens.sum())
    if len(lens):
        stats.length = {"min": int(lens.min()), "mean": round(float(lens.mean()), 1),
                        "p50": float(np.percentile(lens, 50)), "p95": float(np.percentile(lens, 95)),
                        "max": int(lens.max())}
    assert stats.rows_kept + stats.dropped_too_long == stats.rows_read  # counts must add up
    return ds
