"""Tokenized samples to disk (JSONL, Parquet, Arrow IPC) and back, chosen by the file extension.

    with open_writer(Path("train.arrow")) as w:
        w.write([ids], [labels])
    for ids, labels in iter_samples(Path("train.arrow")): ...

Every format holds exactly ``input_ids`` and ``label`` (-100 = not supervised). The columnar formats
store both as ``list<int32>``; ``.arrow`` is the IPC *file* format, so training can memory-map it with
``pyarrow.ipc.open_file(pyarrow.memory_map(path))``. Writers write a temporary file and rename it
only when closed cleanly. ``.npy`` (upstream's pickled object arrays) is never written and is read
only with ``allow_pickle=True``, because unpickling runs code from the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import orjson
import pyarrow as pa

from qwen_sft.atomic import atomic_open

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.list_(pa.int32()))])
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
ROWS_PER_GROUP = 8192  # Parquet row group / Arrow batch: large enough to compress, small enough to stream


def format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        hint = " (.npy was a pickle; it is not written)" if path.suffix.lower() == ".npy" else ""
        raise ValueError(f"{path}: unknown output extension {path.suffix!r}{hint}; use .jsonl, .parquet or .arrow")
    return fmt


def _list_column(rows: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.concatenate(rows).astype(np.int32, copy=False) if rows else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def jsonl_rows(ids: list[np.ndarray], labels: list[np.ndarray]) -> bytes:
    """``{"input_ids": [...], "label": [...]}`` lines, the seed's training format."""
    opt = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    return b"".join([orjson.dumps({"input_ids": i, "label": lab}, option=opt) for i, lab in zip(ids, labels)])


class SampleWriter:
    """Buffered, atomic writer of (input_ids, label) rows in one of the three formats."""

    def __init__(self, fh: IO[bytes], fmt: str) -> None:
        self.fmt, self.fh, self.rows = fmt, fh, 0
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._writer = None
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(fh, SCHEMA, compression="zstd")
        elif fmt == "arrow":
            self._writer = pa.ipc.new_file(fh, SCHEMA)

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
            batch = pa.RecordBatch.from_arrays([_list_column(self._ids), _list_column(self._labels)], schema=SCHEMA)
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
            yield list(map(int, row["input_ids"])), list(map(int, row["label"]))
        return
    fmt = format_of(path)
    if fmt == "jsonl":
        with open(path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        row = orjson.loads(line)
                        yield row["input_ids"], row["label"]
                    except (orjson.JSONDecodeError, KeyError, TypeError) as err:
                        raise ValueError(f"{path}:{n}: not a tokenized sample ({err})") from None
        return
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=["input_ids", "label"]):
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
        return
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        yield from zip(batch.column("input_ids").to_pylist(), batch.column("label").to_pylist())
