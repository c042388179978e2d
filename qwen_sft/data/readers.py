"""Find input files and stream their records, each with its position (line, array index or CSV line).

Formats: ``.jsonl``; ``.json`` / ``.traj`` (an array, one object, or JSON Lines under that name); ``.parquet``;
``.csv`` / ``.tsv``; and ``.gz`` of every text format. A record that cannot be read (invalid JSON, invalid UTF-8,
not an object) is yielded as a ``RecordError`` so the caller counts and rejects it; a file that breaks mid-way
(truncated gzip) yields one ``unreadable_file`` reject at the position where it broke.

Memory: JSONL, CSV and Parquet stream (one line, row or 1024-row batch at a time). A ``.json`` file is read
whole, since a JSON array cannot be parsed piecewise with orjson; use JSON Lines for data larger than RAM.
"""

from __future__ import annotations

import csv
import errno
import gzip
import io
import os
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from qwen_sft.conversation.errors import RecordError, type_name
from qwen_sft.data.exactjson import loads as exact_loads
from qwen_sft.data.exactjson import needs_exact

FORMATS = {".jsonl": "jsonl", ".json": "json", ".traj": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
BOM = b"\xef\xbb\xbf"
# (position, record or None, error or None, the raw record for the rejects file when it did not parse)
Item = tuple[int, Any, RecordError | None, Any]


def file_format(path: Path) -> str | None:
    """``x.jsonl.gz`` → ``jsonl``; ``None`` for files this stage does not read (README.md, images, ...)."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        fmt = FORMATS.get(suffixes[0]) if len(suffixes) == 2 else None
        return None if fmt == "parquet" else fmt
    return FORMATS.get(suffixes[-1]) if suffixes else None


def find_inputs(root: Path, exclude: set[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(inputs, skipped with the reason): a file, or every data file under a directory in sorted relative order.

    Hidden files and folders (``.git``, our own ``.x.tmp`` files) and the run's own outputs are never read.
    Dangling and looping symlinks, symlinked folders (not followed), special files (a FIFO would block the read)
    and folders that cannot be listed are skipped with their reason, so the user sees what was not read.
    """
    if root.is_file():
        return ([root], []) if root.resolve() not in exclude else ([], [(root, "one of this run's outputs")])
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []

    def unlistable(err: OSError) -> None:
        skipped.append((Path(err.filename), f"folder cannot be listed: {err.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        base = Path(dirpath)
        for name in list(dirnames):
            if name.startswith("."):
                dirnames.remove(name)
            elif (base / name).is_symlink():  # os.walk does not follow it; say so instead of staying silent
                skipped.append((base / name, "symlinked folder, not followed; give it as the input to read it"))
        for name in filenames:
            if name.startswith("."):
                continue
            path = base / name
            reason = _not_readable(path)
            if reason is None and file_format(path) is None:
                reason = "not a data file (.jsonl .json .traj .parquet .csv .tsv, or their .gz)"
            if reason is None and path.resolve() in exclude:
                reason = "one of this run's outputs"
            if reason is None:
                found.append(path)
            else:
                skipped.append((path, reason))

    def order(p: Path) -> str:
        return p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix()

    return sorted(found, key=order), sorted(skipped, key=lambda item: order(item[0]))


def _not_readable(path: Path) -> str | None:
    """Why ``path`` cannot be read as a data file (dangling or looping link, not a regular file), or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "dangling symlink" if path.is_symlink() else "vanished while listing"
    except OSError as err:
        return "symlink loop" if err.errno == errno.ELOOP else f"cannot stat: {err.strerror}"
    return None if stat.S_ISREG(mode) else "not a regular file"


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _raw(line: bytes) -> str:
    # Invalid UTF-8 is kept visible as \\xNN escapes, so the rejects file loses no byte of the record.
    return line.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace")


def parse_line(line: bytes) -> tuple[Any, RecordError | None]:
    """One JSON value, exactly (exactjson: integers past 64 bits stay integers), or the reason it is not one."""
    try:
        return exact_loads(line), None
    except orjson.JSONDecodeError as err:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as uerr:
            return None, RecordError("invalid_utf8", f"byte {uerr.start}: {uerr.reason}")
        return None, RecordError("invalid_json", str(err))


def _as_item(pos: int, value: Any, err: RecordError | None, raw: bytes) -> Item:
    if err is not None:
        return pos, None, err, _raw(raw)
    if not isinstance(value, dict):
        return pos, value, RecordError("not_an_object", f"a record must be a JSON object, found {type_name(value)}"), None
    return pos, value, None, None


def read_jsonl(lines: Iterator[bytes], counts: dict[str, int]) -> Iterator[Item]:
    loads, decode_error = orjson.loads, orjson.JSONDecodeError  # the hot loop: one lookup, not one per line
    for lineno, line in enumerate(lines, 1):
        if lineno == 1 and line.startswith(BOM):
            line = line[3:]
        if not line or line.isspace():
            counts["blank_lines"] = counts.get("blank_lines", 0) + 1
            continue
        try:
            if needs_exact(line):  # orjson would turn an integer past 64 bits into a float
                raise decode_error("long digit run", "", 0)
            value = loads(line)
        except decode_error:
            value, err = parse_line(line)
            yield _as_item(lineno, value, err, line)
            continue
        yield (lineno, value, None, None) if type(value) is dict else _as_item(lineno, value, None, line)


def read_json(data: bytes, counts: dict[str, int]) -> tuple[str, Iterator[Item]]:
    """A whole .json file: an array (positions are indexes), one object, or JSON Lines (positions are lines)."""
    data = data[3:] if data.startswith(BOM) else data
    value, err = parse_line(data)
    if err is None:
        if isinstance(value, list):
            return "index", (_as_item(i, v, None, b"") for i, v in enumerate(value))
        return "index", iter([_as_item(0, value, None, b"")])
    first = data.lstrip().split(b"\n", 1)[0]
    if parse_line(first)[1] is None:  # the first line is a whole value: JSON Lines under a .json name
        return "line", read_jsonl(iter(data.splitlines(keepends=True)), counts)
    return "index", iter([(0, None, err, _raw(data[:4096]))])


def read_csv(path: Path, delimiter: str) -> Iterator[Item]:
    # surrogateescape keeps a bad byte from ending the whole file; the row holding it is rejected below.
    with _open(path) as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")
        yield from _csv_rows(csv.DictReader(text, delimiter=delimiter))


def _csv_rows(reader: csv.DictReader) -> Iterator[Item]:
    start = 2  # line 1 is the header
    for row in reader:
        pos, start = start, reader.line_num + 1
        if None in row:
            yield pos, row, RecordError("csv_extra_fields", f"{len(row[None])} more fields than the header"), None
            continue
        try:
            for v in (*row, *row.values()):  # the header's names too: a bad byte there spoils every row
                if v is not None and not v.isascii():
                    v.encode("utf-8")
        except UnicodeEncodeError as uerr:
            raw = {_visible(k): _visible(v) for k, v in row.items()}
            where = "the header" if v in row else "a cell"
            yield pos, None, RecordError("invalid_utf8", f"{where}, character {uerr.start}: {uerr.reason}"), raw
            continue
        yield pos, row, None, None


def _visible(v: str | None) -> str | None:
    """A surrogate-escaped bad byte back as a visible \\xNN escape (so the rejects file can hold it)."""
    return v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if v else v


def read_parquet(path: Path) -> Iterator[Item]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        try:
            rows = batch.to_pylist()
        except ValueError:  # an invalid UTF-8 cell (UnicodeDecodeError): find its row, keep the others
            yield from _parquet_rows_one_by_one(batch, index)
        else:
            for row in rows:
                yield index, row, None, None
                index += 1
            continue
        index += batch.num_rows


def _parquet_rows_one_by_one(batch: Any, first: int) -> Iterator[Item]:
    names = batch.schema.names
    for i in range(batch.num_rows):
        row, bad = {}, []
        for name, column in zip(names, batch.columns):
            try:
                row[name] = column[i].as_py()
            except ValueError as err:
                bad.append(f"column {name!r}: {type(err).__name__}: {err}")
                row[name] = None
        if bad:
            yield first + i, None, RecordError("invalid_utf8", "; ".join(bad)), {k: v for k, v in row.items()
                                                                                if v is not None}
        else:
            yield first + i, row, None, None


def read_records(path: Path, counts: dict[str, int]) -> tuple[str, Iterator[Item]]:
    """(position kind, items) for one file. ``counts`` collects blank lines, which are not records."""
    fmt = file_format(path)
    if fmt == "parquet":
        return "index", _guard(read_parquet(path), 0)
    if fmt in ("csv", "tsv"):
        csv.field_size_limit(2**31 - 1)  # a 100 MB cell is data, not an attack on us
        return "line", _guard(read_csv(path, "," if fmt == "csv" else "\t"), 2)
    if fmt == "json":
        try:
            with _open(path) as fh:
                data = fh.read()
        except (OSError, EOFError, zlib.error) as err:
            return "index", iter([(0, None, RecordError("unreadable_file", f"{type(err).__name__}: {err}"), None)])
        kind, items = read_json(data, counts)
        return kind, items
    return "line", _guard(_read_jsonl_file(path, counts), 1)


def _read_jsonl_file(path: Path, counts: dict[str, int]) -> Iterator[Item]:
    with _open(path) as fh:
        yield from read_jsonl(fh, counts)


def _guard(items: Iterator[Item], first: int) -> Iterator[Item]:
    """Turn a file that breaks mid-way (truncated gzip, corrupt parquet) into one reject at the break."""
    nxt = first  # the position the next item would have had
    try:
        for item in items:
            nxt = item[0] + 1
            yield item
    except Exception as err:  # noqa: BLE001 - whatever a reader raises, the file is unreadable from here on
        yield nxt, None, RecordError("unreadable_file", f"{type(err).__name__}: {err}"), None
