"""Tokenized samples to disk (JSONL, Parquet, Arrow IPC) and back, chosen by the file extension.

    from qwen_sft.samples.files import open_writer, iter_samples
    with open_writer(Path("train.arrow")) as w:
        w.write([ids], [labels])
    for ids, labels in iter_samples(Path("train.arrow")): ...

The one writer (tokenize) and the one reader (inspect, tests, the training cache through ``parse_row`` and
``label_column``) of the sample files: ``input_ids`` and ``label`` (qwen_sft/samples/__init__.py). The columnar
formats store both as ``list<int32>``; ``.arrow`` is the IPC *file* format, so training can memory-map it with
``pyarrow.ipc.open_file(pyarrow.memory_map(path))``. Writers write a temporary file and rename it only when
closed cleanly. ``.npy`` (upstream's pickled object arrays) is never written and is read only with
``allow_pickle=True``, because unpickling runs code from the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import orjson

from qwen_sft.atomic import atomic_open
from qwen_sft.samples import INPUT_IDS, LABEL, LABEL_COLUMNS

if TYPE_CHECKING:
    import pyarrow as pa



def _schema() -> pa.Schema:
    """``SCHEMA`` built on first use: pyarrow's import (~50 ms) is paid by the runs that write or read Arrow or
    Parquet, not by every JSONL run (``files.TOKENS`` / ``files.SCHEMA`` from outside reach it through
    ``__getattr__``)."""
    if "SCHEMA" not in globals():
        import pyarrow as pa

        tokens = pa.list_(pa.int32())  # the type of both columns
        globals().update(TOKENS=tokens, SCHEMA=pa.schema([(INPUT_IDS, tokens), (LABEL, tokens)]))
    return globals()["SCHEMA"]


def __getattr__(name: str) -> object:
    if name in ("TOKENS", "SCHEMA"):
        _schema()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
ROWS_PER_GROUP = 8192  # Parquet row group / Arrow batch: large enough to compress, small enough to stream


def format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        hint = " (.npy was a pickle; it is not written)" if path.suffix.lower() == ".npy" else ""
        raise ValueError(f"{path}: unknown output extension {path.suffix!r}{hint}; use .jsonl, .parquet or .arrow")
    return fmt


def label_column(names: list[str]) -> str | None:
    """The label column of a table with these column names (``label``, or its alias ``labels``), None if none."""
    return next((c for c in LABEL_COLUMNS if c in names), None)


def has_schema(schema: pa.Schema) -> bool:
    """Whether an Arrow file already holds our columns with our types (then it is memory-mapped as is)."""
    tokens = _schema().field(INPUT_IDS).type
    return all(c in schema.names and schema.field(c).type == tokens for c in (INPUT_IDS, LABEL))


class RowError(ValueError):
    """A JSONL line that is not a tokenized sample; ``kind`` names the reason (training counts by it)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


def parse_row(line: bytes) -> tuple[list[int], list[int]]:
    """(input_ids, label) of one JSONL line, or ``RowError``. Lengths and values are checked by the reader's
    caller (training validates them against the vocabulary); here only the shape of the record."""
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise RowError("invalid JSON", str(exc)) from None
    if not isinstance(rec, dict) or INPUT_IDS not in rec:
        keys = sorted(rec)[:6] if isinstance(rec, dict) else type(rec).__name__
        raise RowError("not tokenized (no input_ids)", f"keys {keys}")
    ids, labels = rec[INPUT_IDS], next((rec[c] for c in LABEL_COLUMNS if c in rec), None)
    if labels is None:
        raise RowError("no label", f"expected a {LABEL!r} list beside {INPUT_IDS}")
    if not (isinstance(ids, list) and isinstance(labels, list)
            and all(type(x) is int for x in ids) and all(type(x) is int for x in labels)):
        raise RowError("not lists of integers")
    if any(abs(x) >= 2**31 for x in ids) or any(abs(x) >= 2**31 for x in labels):
        raise RowError("ids beyond the vocabulary", "value does not fit int32")
    return ids, labels


def list_column(rows: list[np.ndarray] | list[list[int]]) -> pa.ListArray:
    """One ``list<int32>`` column from per-row token arrays, built from offsets (no per-element Python)."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    import pyarrow as pa

    values = np.concatenate(rows).astype(np.int32, copy=False) if rows else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def jsonl_rows(ids: list[np.ndarray], labels: list[np.ndarray]) -> bytes:
    """``{"input_ids": [...], "label": [...]}`` lines, the seed's training format."""
    opt = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    return b"".join([orjson.dumps({INPUT_IDS: i, LABEL: lab}, option=opt) for i, lab in zip(ids, labels)])


class SampleWriter:
    """Buffered, atomic writer of (input_ids, label) rows in one of the three formats."""

    def __init__(self, fh: IO[bytes], fmt: str) -> None:
        self.fmt, self.fh, self.rows = fmt, fh, 0
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._writer = None
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(fh, _schema(), compression="zstd")
        elif fmt == "arrow":
            import pyarrow as pa

            self._writer = pa.ipc.new_file(fh, _schema())

    def write_serialized(self, blob: bytes, rows: int) -> None:
        """JSONL rows already serialized by ``jsonl_rows`` (in a worker process)."""
        if self.fmt != "jsonl":
            raise ValueError(f"serialized rows are JSONL; this writer writes {self.fmt}")
        self.rows += rows
        self.fh.write(blob)

    def write(self, ids: list[np.ndarray], labels: list[np.ndarray]) -> None:
        if self.fmt == "jsonl":
            self.write_serialized(jsonl_rows(ids, labels), len(ids))
            return
        self.rows += len(ids)
        self._ids += ids
        self._labels += labels
        if len(self._ids) >= ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self._ids:
            import pyarrow as pa

            batch = pa.RecordBatch.from_arrays([list_column(self._ids), list_column(self._labels)], schema=_schema())
            self._writer.write(pa.Table.from_batches([batch]) if self.fmt == "parquet" else batch)
            self._ids, self._labels = [], []

    def close(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()


@contextlib.contextmanager
def open_writer(path: Path) -> Iterator[SampleWriter]:
    fmt = format_of(path)
    with atomic_open(path, "wb") as fh:
        writer = SampleWriter(fh, fmt)
        yield writer
        writer.close()


def iter_samples(path: Path, allow_pickle: bool = False) -> Iterator[tuple[list[int], list[int]]]:
    """(input_ids, label) of every sample in a tokenized file, streaming where the format allows."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if not allow_pickle:
            raise ValueError(f"{path}: .npy files from upstream are pickles and unpickling runs code; "
                             "pass --allow-pickle only for a file you made yourself")
        for row in np.load(path, allow_pickle=True):
            yield list(map(int, row[INPUT_IDS])), list(map(int, row[LABEL]))
        return
    fmt = format_of(path)
    if fmt == "jsonl":
        with open(path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield parse_row(line)
                    except RowError as err:
                        raise ValueError(f"{path}:{n}: not a tokenized sample ({err})") from None
        return
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        columns = [INPUT_IDS, label_column(pf.schema_arrow.names) or LABEL]
        for batch in pf.iter_batches(columns=columns):
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
        return
    import pyarrow as pa

    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    label = label_column(reader.schema.names) or LABEL
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        yield from zip(batch.column(INPUT_IDS).to_pylist(), batch.column(label).to_pylist())
