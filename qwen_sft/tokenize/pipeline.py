"""ChatML JSONL → tokenized file + rejects + statistics, in one process or several.

    from qwen_sft.tokenize.pipeline import tokenize_chatml_file
    stats = tokenize_chatml_file(Path("sft.jsonl"), Path("train.jsonl"), model="offline", max_len=2048, workers=2)

Workers get chunks of raw lines and return finished rows; at most ``4 × workers`` chunks are in
flight and results are taken in submission order, so memory stays flat in the input size and the
output is byte-identical to the single-process run. A worker hands its rows over in a file of a private
temporary folder and sends only the file's name through the pool's pipe (see ``_process_to_file``).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from qwen_sft.atomic import atomic_group
from qwen_sft.conversation.errors import RecordError
from qwen_sft.data.exactjson import loads as exact_loads
from qwen_sft.samples import IGNORE_INDEX
from qwen_sft.samples.files import SampleWriter, format_of, jsonl_rows
from qwen_sft.tokenize import stats as stats_mod
from qwen_sft.tokenize.fingerprint import tokenizer_fingerprint
from qwen_sft.tokenize.options import TokenizeOptions
from qwen_sft.tokenize.sample import Overlong, SampleTokenizer
from qwen_sft.tokenizer import load_data_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers must not inherit a Rust thread pool
BOM = b"\xef\xbb\xbf"


class WorkerDied(RuntimeError):
    """A worker process ended without returning its chunk (killed by a signal, the OOM killer)."""


_WORKER: SampleTokenizer | None = None  # set in the parent before forking, or built by _init in spawn mode


def _init(opts: TokenizeOptions, paths: tuple[bool, bool, bool]) -> None:
    """Spawned workers rebuild the tokenizer and take the parent's verified choice of fast paths."""
    global _WORKER
    if _WORKER is None:
        plain, fast, tiktoken_ok = paths
        _WORKER = _make_sample_tokenizer(opts, opts.engine if tiktoken_ok else "hf")
        _WORKER.renderer.plain, _WORKER.renderer.fast = plain, fast


def _make_sample_tokenizer(opts: TokenizeOptions, engine: str | None = None) -> SampleTokenizer:
    """The options' tokenizer, with ``engine`` (default ``opts.engine``) for its encoder."""
    tok = load_data_tokenizer(opts.model, trust_remote_code=opts.trust_remote_code)
    return SampleTokenizer(tok, max_len=opts.max_len, policy=opts.policy, overlength=opts.overlength,
                           engine=engine or opts.engine)


def _engine(opts: TokenizeOptions, src: Path) -> str:
    """The encoder to build: ``auto`` on an input under ``tiktoken_min_bytes`` is ``hf`` (same ids, see options)."""
    if opts.engine == "auto" and src.stat().st_size < opts.tiktoken_min_bytes:
        return "hf"
    return opts.engine


def _process(chunk: list[tuple[int, bytes]], fmt: str) -> tuple[list, list, list, bytes, list]:
    """One chunk → (kept [(length, supervised, cut)], ids, labels, jsonl bytes, bad [(kind, line, reason, detail)]).

    For JSONL the worker serializes the rows itself, so the parent only writes bytes.
    """
    st = _WORKER
    kept: list[tuple[int, int, str]] = []
    ids: list = []
    labels: list = []
    bad: list[tuple[str, int, str, Any]] = []
    for line_no, raw in chunk:
        try:
            sample = st.tokenize(exact_loads(raw))
        except orjson.JSONDecodeError as err:
            bad.append(("reject", line_no, "invalid_json", str(err)))
        except RecordError as err:
            bad.append(("reject", line_no, err.reason, err.detail))
        except Overlong as err:
            bad.append(("drop" if err.exact else "drop_unmeasured", line_no, err.reason, err.length))
        except Exception as err:  # noqa: BLE001 - one record's surprise (RecursionError, ...) is its reject only
            bad.append(("reject", line_no, "unexpected_error", f"{type(err).__name__}: {err}"))
        else:
            kept.append((len(sample.input_ids), int(np.count_nonzero(sample.label != IGNORE_INDEX)), sample.cut))
            ids.append(sample.input_ids)
            labels.append(sample.label)
    blob = b""
    if fmt == "jsonl":
        blob, ids, labels = jsonl_rows(ids, labels), [], []
    return kept, ids, labels, blob, bad


def _process_to_file(chunk: list[tuple[int, bytes]], fmt: str, path: str) -> str:
    """``_process`` in a worker, its result written to ``path``; returns ``path`` (a message of a few bytes).

    Why not return the rows: a worker killed (the OOM killer) halfway through sending a result larger than a pipe
    write leaves the pool's reader thread waiting forever for the rest of the message, while the other worker holds
    the pipe open, so the run hangs at 0 % CPU instead of failing. A message under PIPE_BUF is written whole or not
    at all. The file is ours, in a 0700 folder, and holds no pickle: numpy arrays (``allow_pickle=False``).
    """
    kept, ids, labels, blob, bad = _process(chunk, fmt)
    meta = orjson.dumps({"kept": kept, "bad": bad})
    lengths = np.array([len(i) for i in ids], dtype=np.int64)
    with open(path, "wb") as fh:
        np.savez(fh, meta=np.frombuffer(meta, np.uint8), blob=np.frombuffer(blob, np.uint8), lengths=lengths,
                 ids=_flat(ids), labels=_flat(labels))
    return path


def _flat(rows: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(rows).astype(np.int32, copy=False) if rows else np.zeros(0, np.int32)


def _read_result(path: str) -> tuple[list, list, list, bytes, list]:
    with np.load(path, allow_pickle=False) as z:
        meta = orjson.loads(z["meta"].tobytes())
        blob, lengths, ids, labels = z["blob"].tobytes(), z["lengths"], z["ids"], z["labels"]
    os.unlink(path)
    cuts = np.cumsum(lengths)[:-1] if len(lengths) else []
    ids_rows = list(np.split(ids, cuts)) if len(lengths) else []
    label_rows = list(np.split(labels, cuts)) if len(lengths) else []
    return [tuple(k) for k in meta["kept"]], ids_rows, label_rows, blob, [tuple(b) for b in meta["bad"]]


def _chunks(src: Path, size: int, stats: stats_mod.RunStats) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    with open(src, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if line_no == 1 and raw.startswith(BOM):  # as convert reads it: a UTF-8 BOM is not part of the record
                raw = raw[len(BOM):]
            if not raw.strip():
                stats.blank_lines += 1
                continue
            stats.records_read += 1
            chunk.append((line_no, raw))
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _results(chunks: Iterator[list], opts: TokenizeOptions, fmt: str) -> Iterator[tuple]:
    head = list(itertools.islice(chunks, 2)) if opts.workers > 1 else []
    if opts.workers == 1 or len(head) < 2:  # one chunk: starting worker processes would only add their start-up
        yield from (_process(chunk, fmt) for chunk in itertools.chain(head, chunks))
        return
    chunks = itertools.chain(head, chunks)
    # fork shares the loaded tokenizer for free; spawn (macOS, Windows) rebuilds it in each worker
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    st = _WORKER
    paths = (st.renderer.plain, st.renderer.fast, st.encoder.name == "tiktoken")
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker killed from outside (the OOM killer) breaks the
    # executor and every pending result raises, where Pool replaces the worker and waits forever for its task.
    pool = ProcessPoolExecutor(opts.workers, mp_context=ctx, initializer=_init, initargs=(opts, paths))
    handoff = tempfile.mkdtemp(prefix="qwen-sft-tokenize-")  # 0700; rows travel in files (_process_to_file)
    try:
        pending: deque = deque()
        for n, chunk in enumerate(chunks):
            pending.append(pool.submit(_process_to_file, chunk, fmt, os.path.join(handoff, f"{n}.npz")))
            if len(pending) >= 4 * opts.workers:
                yield _read_result(pending.popleft().result())
        while pending:
            yield _read_result(pending.popleft().result())
    except BrokenProcessPool:
        raise WorkerDied(
            f"a tokenize worker process died (killed from outside: often the out-of-memory killer, see `dmesg`); "
            f"nothing was written. Rerun with fewer --workers (now {opts.workers}) or on a machine with more memory"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(handoff, ignore_errors=True)


def _first_records(src: Path, n: int) -> list[Any]:
    records = []
    with open(src, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if len(records) >= n:
                break
            if line_no == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if len(raw) > 1 << 20:  # a verification probe, not worth rendering a huge record for
                continue
            try:
                records.append(exact_loads(raw))
            except orjson.JSONDecodeError:
                continue
    return records


def tokenize_chatml_file(src: Path, dst: Path, options: TokenizeOptions | None = None, **fields: Any) -> dict:
    """Tokenize ``src`` (ChatML JSONL) into ``dst`` (.jsonl/.parquet/.arrow); return the statistics dict.

    ``options`` is a ``TokenizeOptions`` (what the CLIs pass); Python callers may give its fields as keywords
    instead (``model="offline", max_len=4096``), checked by the same dataclass: an unknown name is an error.

    Raises TokenizerLoadError when the tokenizer cannot be loaded and ValueError for bad options or paths.
    Writes ``dst``, ``<dst>.rejects.jsonl``, ``<dst>.lengths.png``, ``<dst>.run.json`` and ``<dst>.stats.json``,
    published together: old ones are removed first and stats.json comes last, so its presence means the set is
    one run's. A worker that dies raises WorkerDied.
    """
    global _WORKER
    src, dst = Path(src), Path(dst)
    opts = _options(options, fields)
    fmt = format_of(dst)  # an unknown extension fails before anything is loaded
    if not src.is_file():
        raise ValueError(f"{src}: input file not found")
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: the output would overwrite the input")
    t0 = time.perf_counter()
    _WORKER = _make_sample_tokenizer(opts, _engine(opts, src))
    _WORKER.verify(_first_records(src, opts.verify_records))
    # Recorded so a reader of stats.json knows which path produced the ids (both are verified identical).
    engines = {"encoder": _WORKER.encoder.name, "renderer": _WORKER.renderer.name}
    # Which tokenizer and template made the data (sha256 of each): training refuses data made with another.
    fingerprint = {**tokenizer_fingerprint(_WORKER.tok), "name_or_path": opts.model}
    context = {"input": src.name, "options": asdict(opts), "engines": engines, "tokenizer": fingerprint}
    stats = stats_mod.RunStats()
    side = stats_mod.side_paths(dst)
    bar = _progress_bar(src, opts.progress)
    seconds = 0.0
    try:
        # All five files are published together (atomic_group): never the data of one run beside another's stats.
        with atomic_group([dst, side["rejects"], side["plot"], side["run"], side["stats"]]) as tmp:
            with open(tmp[0], "wb") as out, open(tmp[1], "wb") as rejects:
                writer = SampleWriter(out, fmt)
                for kept, ids, labels, blob, bad in _results(_chunks(src, opts.chunk_size, stats), opts, fmt):
                    for length, supervised, cut in kept:
                        stats.add_sample(length, supervised, cut)
                    for kind, line_no, reason, detail in bad:
                        if kind == "reject":
                            stats.rejected[reason] += 1
                        else:
                            exact = kind == "drop"
                            stats.add_drop(reason, detail, exact)
                            detail = f"{'' if exact else 'at least '}{detail} tokens > max_len {opts.max_len}"
                        rejects.write(orjson.dumps({"file": str(src), "line": line_no, "reason": reason,
                                                    "detail": detail}, option=orjson.OPT_APPEND_NEWLINE))
                    if blob:
                        writer.write_serialized(blob, len(kept))
                    else:
                        writer.write(ids, labels)
                    bar.update(len(kept) + len(bad))
                writer.close()
            stats.check()
            seconds = time.perf_counter() - t0
            # stats.json holds only what the data and options decide (byte-identical for identical runs);
            # where the files were and how long it took go to run.json.
            stats_mod.save(stats, dst, opts.max_len, json_path=tmp[4], png_path=tmp[2], **context)
            run = {"input": str(src.resolve()), "output": str(dst.resolve()), "seconds": round(seconds, 3)}
            tmp[3].write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    finally:
        bar.close()
        _WORKER = None
    print(stats.summary(), file=sys.stderr)
    where = {"input": str(src), "output": str(dst), "seconds": round(seconds, 3)}
    return stats.to_dict(max_len=opts.max_len, **{**context, **where})


def _options(options: TokenizeOptions | None, fields: dict[str, Any]) -> TokenizeOptions:
    if options is not None and fields:
        raise ValueError(f"give TokenizeOptions or its fields as keywords, not both ({', '.join(fields)})")
    unknown = sorted(set(fields) - set(TokenizeOptions.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown tokenize option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(TokenizeOptions.__dataclass_fields__)}")
    return options if options is not None else TokenizeOptions(**fields)


def _progress_bar(src: Path, enabled: bool):
    from qwen_sft.progress import progress_bar

    # disable=None: progress_bar's own rule, a bar only on a terminal
    return progress_bar(desc=f"tokenize {src.name}", unit=" rec", disable=None if enabled else True,
                        file=sys.stderr, mininterval=1.0)

