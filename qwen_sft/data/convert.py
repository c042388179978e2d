"""The convert pipeline: files → records → ChatML lines, rejects with their reasons, counts per file.

    from qwen_sft.data.convert import convert_inputs
    stats = convert_inputs([Path("raw/a.jsonl")], Path("processed/sft_train.jsonl"), ConvertOptions())

Every record read is written or rejected (``read == written + rejected`` per file, checked at the end).
Outputs are written through ``atomic_open``: a killed run leaves the previous file or none, never a part.
Output bytes depend only on the input bytes and options: files in sorted order, keys in a fixed order, orjson
(Unicode kept as is, no spaces), so two runs give identical files.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import orjson

from qwen_sft.atomic import atomic_group, atomic_open
from qwen_sft.conversation.chatml import build_record
from qwen_sft.conversation.errors import RecordError
from qwen_sft.data.options import ConvertOptions
from qwen_sft.data.readers import read_records
from qwen_sft.data.shapes import to_messages
from qwen_sft.progress import progress_bar

if TYPE_CHECKING:
    from tqdm import tqdm

PROGRESS_EVERY = 1024  # records between progress-bar updates; tqdm per record would cost more than converting


class StrictError(Exception):
    """--strict: the first bad record, with the same message that the rejects file would hold."""


@dataclass
class FileStats:
    path: Path
    read: int = 0
    written: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    notes: Counter = field(default_factory=Counter)  # dropped reasoning, trailing turns, ... -> count
    unread: Counter = field(default_factory=Counter)  # keys of written records no shape read -> count
    blank_lines: int = 0

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


def reject_line(path: Path, kind: str, pos: int, err: RecordError, raw: object) -> bytes:
    row = {"file": _printable(str(path)), kind: pos, "reason": err.reason, "detail": _printable(err.detail),
           "record": raw}
    try:
        return orjson.dumps(row, option=orjson.OPT_NON_STR_KEYS, default=str) + b"\n"
    except TypeError:  # a lone surrogate, an integer past 64 bits, nesting orjson cannot write
        pass
    try:
        # ensure_ascii writes a lone surrogate as \udXXX; Python's json has no integer or depth limit of its own
        return (json.dumps(row, ensure_ascii=True, default=str) + "\n").encode()
    except (ValueError, TypeError, RecursionError):
        return orjson.dumps({**row, "record": None, "record_unprintable": True}) + b"\n"


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _dump_error(exc: TypeError) -> RecordError:
    """Why orjson could not write a converted record, as a stable reason."""
    text = str(exc)
    if "Integer exceeds" in text:
        return RecordError("integer_out_of_range", f"an integer does not fit in 64 bits ({text})")
    if "ecursion" in text:
        return RecordError("nested_too_deep", text)
    return RecordError("unserializable", text)


def convert_file(
    path: Path, opts: ConvertOptions, sinks: list[IO[bytes]], rejects: IO[bytes] | None, bar: tqdm | None
) -> FileStats:
    """Stream one file's records into every sink; bad ones go to ``rejects`` (or raise StrictError)."""
    stats = FileStats(path)
    counts: dict[str, int] = {}
    kind, items = read_records(path, counts)
    notes, system, dumps = stats.notes, opts.system, orjson.dumps
    pending = 0
    unread: list[str] = []  # unread keys of the records written since the last count; a reject's are cut off
    for pos, value, err, raw in items:
        stats.read += 1
        mark = len(unread)
        if err is None:
            try:
                messages, tools = to_messages(value, notes, opts, unread)
                record = build_record(messages, tools, system, notes)
            except RecordError as bad:
                err = bad
            except Exception as exc:  # noqa: BLE001 - one record's surprise must not end the run: it is a reject
                err = RecordError("unexpected_error", f"{type(exc).__name__}: {exc}")
            else:
                try:
                    line = dumps(record) + b"\n"
                except TypeError as exc:  # orjson: a lone surrogate, an integer past 64 bits, too deep
                    err = _dump_error(exc)
        if err is None:
            for sink in sinks:
                sink.write(line)
            stats.written += 1
        else:
            del unread[mark:]
            if opts.strict:
                raise StrictError(f"{path}:{kind} {pos}: {err.reason}: {err.detail}")
            stats.rejected[err.reason] += 1
            if rejects is not None:
                rejects.write(reject_line(path, kind, pos, err, raw if value is None else value))
        pending += 1
        if pending >= PROGRESS_EVERY:
            if bar is not None:
                bar.update(pending)
            pending = 0
            stats.unread.update(unread)  # counted in C, once per batch of records
            unread.clear()
    if bar is not None:
        bar.update(pending)
    stats.unread.update(unread)
    stats.blank_lines = counts.get("blank_lines", 0)
    if stats.read != stats.written + stats.n_rejected:  # cannot happen by construction; never ship it silently
        raise AssertionError(f"{path}: read {stats.read} != written {stats.written} + rejected {stats.n_rejected}")
    return stats


def _bar(opts: ConvertOptions) -> tqdm:
    disable = None if opts.progress is None else not opts.progress  # None: only on a terminal
    return progress_bar(unit=" rows", unit_scale=True, disable=disable, desc="convert", dynamic_ncols=True,
                        mininterval=0.5)


@contextlib.contextmanager
def background_flush(fh: IO[bytes], every_s: float = 1.0) -> Iterator[None]:
    """fdatasync ``fh`` every second from a thread while records are converted.

    atomic_open fsyncs before its rename; done only there, a large output waits seconds for the disk after the
    last record. Syncing as we go overlaps that wait with conversion (the GIL is released during the call).
    """
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(OSError):
                os.fdatasync(fh.fileno())

    thread = threading.Thread(target=loop, name="convert-flush", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def convert_inputs(
    inputs: list[Path], output: Path, opts: ConvertOptions, rejects: Path | None = None
) -> list[FileStats]:
    """All inputs merged into one ChatML file (and one rejects file), both written atomically."""
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(atomic_open(output, "wb"))
        stack.enter_context(background_flush(out))  # exits first: stopped before atomic_open closes the file
        rej = None if opts.strict or rejects is None else stack.enter_context(atomic_open(rejects, "wb"))
        bar = stack.enter_context(_bar(opts))
        return [convert_file(path, opts, [out], rej, bar) for path in inputs]


def convert_per_file(
    pairs: list[tuple[Path, Path]], opts: ConvertOptions, rejects: Path, merged: Path | None = None
) -> list[FileStats]:
    """The legacy ``-input_dir/-output_dir`` form: one output per input, plus everything in ``merged``."""
    with contextlib.ExitStack() as stack:
        rej = None if opts.strict else stack.enter_context(atomic_open(rejects, "wb"))
        merged_out = stack.enter_context(atomic_open(merged, "wb")) if merged is not None else None
        bar = stack.enter_context(_bar(opts))
        stats = []
        for src, dst in pairs:
            with atomic_open(dst, "wb") as out:
                stats.append(convert_file(src, opts, [out] + ([merged_out] if merged_out else []), rej, bar))
        return stats


def eval_count(n: int, ratio: float) -> int:
    """round(n × ratio), but at least one eval and one train record whenever there are two or more."""
    k = round(n * ratio)
    return min(max(k, 1), n - 1) if n >= 2 else 0


def split_lines(src: Path, n: int, train: Path, evaluation: Path, ratio: float, seed: int) -> tuple[int, int]:
    """Stream ``src`` (n lines) into train/eval, exactly ``eval_count(n, ratio)`` lines to eval, input order kept.

    Selection sampling (Knuth's Algorithm S): line i goes to eval with probability (still needed)/(lines left),
    so every subset of that size is equally likely and nothing per record is held in memory.
    """
    rng, need = random.Random(seed), eval_count(n, ratio)
    n_eval = 0
    # Both files are published as one unit (atomic_group): a kill never leaves a new eval beside an old train.
    with open(src, "rb") as fh, atomic_group([train, evaluation]) as (tr_tmp, ev_tmp), \
            open(tr_tmp, "wb") as tr, open(ev_tmp, "wb") as ev:
        for i, line in enumerate(fh):
            if rng.random() * (n - i) < need - n_eval:
                ev.write(line)
                n_eval += 1
            else:
                tr.write(line)
    return n - n_eval, n_eval


@contextlib.contextmanager
def scratch_file(near: Path) -> Iterator[Path]:
    """A temporary file beside ``near`` (same filesystem, hidden so no directory scan reads it), always removed."""
    near.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{near.name}.", suffix=".tmp", dir=near.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
