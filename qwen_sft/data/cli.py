"""Convert raw SFT data of any common shape into validated ChatML JSONL (optionally tokenized).

    python convert_to_chatml.py ./raw                                  # → processed/sft_train.jsonl
    python convert_to_chatml.py ./raw -o out.jsonl -s "You are a helpful coding assistant."
    python convert_to_chatml.py ./raw --split --eval_ratio 0.1 --seed 42   # → out_train.jsonl, out_eval.jsonl
    python convert_to_chatml.py data.jsonl --map user=Q --map assistant=A
    python convert_to_chatml.py ./raw --tokenize -m offline --max_len 2048
    python convert_to_chatml.py -input_dir ./raw -output_dir ./raw_converted -merge   # legacy forms
    qwen-sft convert ./raw                                             # the same, as a verb

Reads parse → validate → build → run → save; the work lives in qwen_sft/data/. See docs/convert.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from qwen_sft.data.convert import StrictError, convert_inputs, convert_per_file, scratch_file, split_lines
from qwen_sft.data.options import DEFAULT_OUTPUT, ConvertOptions, ConvertRun
from qwen_sft.data.readers import file_format, find_inputs
from qwen_sft.data.report import print_summary
from qwen_sft.tokenize.options import TokenizeOptions

# The tokenizer options that --tokenize takes (TokenizeOptions' fields and flags; the rest keep their defaults).
TOKENIZE_FIELDS = ("model", "max_len", "trust_remote_code")


def build_parser() -> argparse.ArgumentParser:
    from qwen_sft.cli_options import build_parser as build

    return build("convert_to_chatml.py", [ConvertRun, ConvertOptions, (TokenizeOptions, TOKENIZE_FIELDS)],
                 description="Convert raw SFT data (JSONL, JSON, Parquet, CSV/TSV, .gz) to ChatML.")


@dataclass(frozen=True)
class OutputPaths:
    """Every file a run may write, derived from -o (see docs/convert.md, "Output")."""

    output: Path
    train: Path
    evaluation: Path
    tokenize: bool
    rejects: Path
    out_dir: Path | None

    @classmethod
    def of(cls, output: Path, out_dir: Path | None, tokenize: bool) -> OutputPaths:
        base = output.parent / (output.stem if output.suffix else output.name)
        chatml_output = cls.chatml_of(output)
        # Named after the ChatML file, so it never meets the tokenizer's own <output>.rejects.jsonl.
        rejects = Path(f"{chatml_output if tokenize else output}.rejects.jsonl")
        if out_dir is not None:
            rejects = out_dir.resolve().parent / f"{out_dir.resolve().name}.rejects.jsonl"
        return cls(output, Path(f"{base}_train.jsonl"), Path(f"{base}_eval.jsonl"), tokenize, rejects, out_dir)

    @staticmethod
    def chatml_of(path: Path) -> Path:
        return path.parent / f"{path.stem}.chatml.jsonl"

    @property
    def chatml(self) -> Path:
        """Where the ChatML goes without --split: the output itself, or <stem>.chatml.jsonl with --tokenize."""
        return self.chatml_of(self.output) if self.tokenize else self.output

    @property
    def split_chatml(self) -> tuple[Path, Path]:
        pair = (self.train, self.evaluation)
        return tuple(self.chatml_of(p) for p in pair) if self.tokenize else pair

    def tokenize_pairs(self, split: bool) -> list[tuple[Path, Path]]:
        finals = [self.train, self.evaluation] if split else [self.output]
        return [(self.chatml_of(p), p) for p in finals]

    def own(self) -> set[Path]:
        """Resolved paths this run writes (the tokenizer's side files too), never to be read as input."""
        finals = [self.output, self.train, self.evaluation]
        chatmls = [self.chatml_of(p) for p in finals]
        side = [Path(f"{p}{suffix}") for p in finals + chatmls for suffix in (".rejects.jsonl", ".stats.json", ".run.json")]
        return {p.resolve() for p in [self.rejects, *finals, *chatmls, *side]}


def per_file_outputs(root: Path, inputs: list[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """raw/a/b.json.gz → out_dir/a/b.jsonl; two inputs landing on one output is an error naming both."""
    pairs, seen = [], {}
    for src in inputs:
        rel = src.relative_to(root) if root.is_dir() else Path(src.name)
        name = rel.name
        for _ in range(2 if name.lower().endswith(".gz") else 1):
            name = name.rsplit(".", 1)[0]
        dst = out_dir / rel.parent / f"{name}.jsonl"
        if dst in seen:
            raise ValueError(f"{seen[dst]} and {src} would both be written to {dst}; rename one")
        seen[dst] = src
        pairs.append((src, dst))
    return pairs


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; SIGTERM unwinds like Ctrl-C so temporary files are removed, not left half-written."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        return _run(argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run(argv: list[str] | None) -> int:
    from qwen_sft.cli_options import parse

    # ---- parse: every spelling of every option (a conflict between two is a problem), and the dataclasses' checks
    (run, opts, tok), problems = parse(build_parser(), argv)
    source = run.input if run else None
    # ---- validate everything else before reading data or loading a tokenizer
    if run is None:
        pass
    elif source is None:
        problems.append("no input: give a file or directory, e.g. `python convert_to_chatml.py ./raw`")
    elif not Path(source).exists():
        problems.append(f"input {source!r} does not exist")
    elif Path(source).is_file() and file_format(Path(source)) is None:
        problems.append(f"{source!r}: unsupported file type (.jsonl .json .traj .parquet .csv .tsv, or their .gz)")
    if tok is not None and tok.max_len < 16:
        problems.append(f"--max_len must be at least 16, found {tok.max_len}")
    if problems:
        print("convert_to_chatml: " + "\n  ".join(["cannot start:", *problems]), file=sys.stderr)
        return 2
    output = Path(run.output or DEFAULT_OUTPUT)
    out_dir = Path(run.output_dir) if run.output_dir else None
    system = opts.system
    root = Path(source)
    paths = OutputPaths.of(output, out_dir, run.tokenize)
    tokenize = None
    if run.tokenize:  # fail early: the tokenizer must load before any record is converted
        from qwen_sft.tokenizer import TokenizerLoadError, load_data_tokenizer

        try:
            from qwen_sft.tokenize.pipeline import tokenize_chatml_file

            load_data_tokenizer(tok.model, trust_remote_code=tok.trust_remote_code)
        except (TokenizerLoadError, ImportError, ValueError) as err:
            print(f"convert_to_chatml: --tokenize: {err}", file=sys.stderr)
            return 1
        tokenize = tokenize_chatml_file
    merged = Path(run.merge_output or output) if run.merge or run.merge_output else None
    # The merged file may sit inside the input directory (the seed's -merge_output): it is an output, not input.
    own = paths.own() | ({merged.resolve()} if merged is not None else set())
    inputs, skipped = find_inputs(root, own)
    if out_dir is not None:  # a previous run's per-file outputs inside the input directory are not input
        mine = [p for p in inputs if p.resolve().is_relative_to(out_dir.resolve())]
        inputs = [p for p in inputs if p not in mine]
        skipped += [(p, "one of this run's outputs (under -output_dir)") for p in mine]
    for path, why in skipped:
        print(f"skipped: {path} ({why})", file=sys.stderr)
    if not inputs:
        print(f"convert_to_chatml: no data files under {root} (.jsonl, .json, .traj, .parquet, .csv, .tsv, .gz)",
              file=sys.stderr)
        return 1
    print(f"{len(inputs)} input file(s) from {root}; system prompt: "
          f"{'-s/--system (only where none)' if system else 'none added'}; shapes: "
          f"{' '.join(f'--map {t}=' + '.'.join(p) for t, p in opts.field_map.entries) if opts.field_map else 'detected per record'}",
          file=sys.stderr)
    # ---- run
    written: list[Path] = []
    try:
        if out_dir is not None:
            pairs = per_file_outputs(root, inputs, out_dir)
            stats = convert_per_file(pairs, opts, paths.rejects, merged)
            written = [dst for _, dst in pairs] + ([merged] if merged else [])
        elif run.split:
            with scratch_file(output) as tmp:
                stats = convert_inputs(inputs, tmp, opts, paths.rejects)
                dst_train, dst_eval = paths.split_chatml
                n_written = sum(s.written for s in stats)
                n_train, n_eval = split_lines(tmp, n_written, dst_train, dst_eval, run.eval_ratio, run.seed)
            print(f"split (seed {run.seed}, eval_ratio {run.eval_ratio}): {n_train} train, {n_eval} eval",
                  file=sys.stderr)
            written = [dst_train, dst_eval]
        else:
            stats = convert_inputs(inputs, paths.chatml, opts, paths.rejects)
            written = [paths.chatml]
    except StrictError as err:
        print(f"convert_to_chatml: --strict: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"convert_to_chatml: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, read-only or vanished output folder: one line, and nothing half-written
        print(f"convert_to_chatml: cannot write the output: {_os_error(err)}; nothing was written, "
              "earlier outputs are untouched", file=sys.stderr)
        return 1
    total_written = print_summary(stats, written, None if opts.strict else paths.rejects)
    if total_written == 0:
        if sum(s.read for s in stats) == 0:
            print(f"convert_to_chatml: the input holds no records ({len(inputs)} file(s), all empty or blank)",
                  file=sys.stderr)
        else:
            print("convert_to_chatml: no record could be converted; the rejects file says why", file=sys.stderr)
        return 1
    # ---- save the tokenized form
    if tokenize is not None:
        from qwen_sft.tokenize.pipeline import WorkerDied
        from qwen_sft.tokenize.stats import side_paths

        pairs = paths.tokenize_pairs(run.split)
        # The tokenized files of an earlier run are stale now: removed first, so a kill between the train and
        # the eval file leaves a missing file, never a new train beside an old eval.
        for _, dst in pairs:
            for stale in [dst, *side_paths(dst).values()]:
                stale.unlink(missing_ok=True)
        for src, dst in pairs:
            try:
                result = tokenize(src, dst, tok)
            except (ValueError, TokenizerLoadError, WorkerDied) as err:
                print(f"convert_to_chatml: --tokenize {src}: {err}", file=sys.stderr)
                return 1
            except OSError as err:
                print(f"convert_to_chatml: --tokenize {src}: cannot write: {_os_error(err)}", file=sys.stderr)
                return 1
            print(f"tokenized {src} → {dst}: {result.get('samples')} samples, {result.get('tokens')} tokens")
    return 0


def _os_error(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror or err}{where}"


if __name__ == "__main__":
    sys.exit(main())
