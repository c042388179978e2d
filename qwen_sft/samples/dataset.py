"""The memory-mapped training dataset over a tokenized file (the training side of the sample contract).

    from qwen_sft.samples.dataset import TokenizedDataset, to_arrow
    arrow = to_arrow("processed/sft_train.jsonl", ".cache/qwen_sft/data")   # once; then memory-mapped

JSONL and Parquet are converted once into an Arrow IPC file under ``cache_dir`` (keyed by path, size and
mtime); an ``.arrow`` file with our schema is mapped in place. Rows are read through per-record-batch numpy
views of the mapped buffers; nothing concatenates the batches (that would copy the whole file onto the heap,
in every rank). Validation, statistics and the length rule are applied by ``qwen_sft.train.data.load_tokenized``;
a dataset holds the rows it kept and the length each is cut to.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qwen_sft.atomic import atomic_open
from qwen_sft.samples import BATCH_LABELS, INPUT_IDS, LABEL
from qwen_sft.samples.files import TOKENS, RowError, has_schema, label_column, parse_row

CACHE_SCHEMA = pa.schema([(INPUT_IDS, TOKENS), (LABEL, TOKENS), ("line", pa.int64())])  # + source line/row
TOKENIZE_FIX = ("the data is not tokenized: run `python convert_to_chatml.py ./raw --tokenize` "
                "(or `qwen-sft tokenize`) and train on its output")
MAX_LISTED = 20  # problems listed per kind; the rest are counted
_CACHE_VERSION = "1"


class DataError(ValueError):
    """All problems found in a data file, in one message."""


class Problems:
    """Every problem of a data file, by kind, raised together as one ``DataError``."""

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


def _jsonl_to_arrow(path: Path, out: Path, problems: Problems) -> None:
    ids_buf: list[list[int]] = []
    lab_buf: list[list[int]] = []
    line_buf: list[int] = []
    untokenized = 0

    def flush(writer: pa.ipc.RecordBatchFileWriter) -> None:
        if line_buf:
            writer.write_batch(pa.record_batch([pa.array(ids_buf, TOKENS), pa.array(lab_buf, TOKENS),
                                                pa.array(line_buf, pa.int64())], schema=CACHE_SCHEMA))
            ids_buf.clear(), lab_buf.clear(), line_buf.clear()

    with atomic_open(out, "wb") as fh, pa.ipc.new_file(fh, CACHE_SCHEMA) as writer, open(path, "rb") as src:
        for lineno, raw in enumerate(src, 1):
            if not raw.strip():
                continue
            try:
                ids, labels = parse_row(raw)
            except RowError as err:
                untokenized += err.kind == "not tokenized (no input_ids)"
                problems.add(err.kind, f"line {lineno}", err.detail)
                continue
            ids_buf.append(ids), lab_buf.append(labels), line_buf.append(lineno)
            if len(line_buf) >= 4096:
                flush(writer)
        flush(writer)
    if untokenized:
        problems.fix = TOKENIZE_FIX


def _table_to_arrow(table_batches, path: Path, out: Path, names: list[str]) -> None:
    """Parquet / non-int32 Arrow → our schema, batch by batch (never the whole table in memory)."""
    label_col = label_column(names)
    if INPUT_IDS not in names or label_col is None:
        raise DataError(f"{path}: columns {names}; expected {INPUT_IDS!r} and {LABEL!r}\n  fix: {TOKENIZE_FIX}")
    row = 0
    with atomic_open(out, "wb") as fh, pa.ipc.new_file(fh, CACHE_SCHEMA) as writer:
        for batch in table_batches:
            n = batch.num_rows
            writer.write_batch(pa.record_batch([
                batch.column(INPUT_IDS).cast(TOKENS), batch.column(label_col).cast(TOKENS),
                pa.array(np.arange(row + 1, row + n + 1), pa.int64())], schema=CACHE_SCHEMA))
            row += n


def to_arrow(path: str | os.PathLike, cache_dir: str | os.PathLike, problems: Problems | None = None) -> Path:
    """The memory-mappable Arrow IPC file for ``path`` (itself when it already has our schema).

    Rows of a JSONL file that cannot become tokenized rows are recorded in ``problems``; the valid rest
    goes to a ``.partial`` file so that row checks still run and every problem is reported at once."""
    path = Path(path)
    problems = problems if problems is not None else Problems(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".arrow":
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path}: not an Arrow IPC file ({exc})") from exc
        if has_schema(reader.schema):
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


class Columns:
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
            ids, labels = batch.column(INPUT_IDS), batch.column(LABEL)
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
    """Rows of a memory-mapped Arrow file: ``kept`` indexes the validated rows, ``ends`` is the length each
    is cut to (its own length unless the length rule cut it). Items are training examples
    ``{"input_ids": [...], "labels": [...]}``."""

    def __init__(self, arrow_path: Path, kept: np.ndarray, ends: np.ndarray, stats: Any,
                 columns: Columns | None = None) -> None:
        self._cols = columns if columns is not None else Columns(arrow_path)
        self.kept, self.ends, self.stats, self.path = kept, ends, stats, arrow_path

    def __len__(self) -> int:
        return len(self.kept)

    def lengths(self) -> np.ndarray:
        return self.ends

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        c = self._cols
        b, r = c.locate(int(self.kept[index]))
        start, n = int(c.off[b][r]), int(self.ends[index])
        lstart = int(c.loff[b][r])
        return {INPUT_IDS: c.ids[b][start:start + n].tolist(), BATCH_LABELS: c.labels[b][lstart:lstart + n].tolist()}
