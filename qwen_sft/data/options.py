"""Typed options of the convert stage; conflicting or malformed values are rejected here, before any file is read.

Each field's help is the CLI help of ``convert_to_chatml.py`` (built by qwen_sft/cli_options.py); the tokenizer
options of ``--tokenize`` are TokenizeOptions' own (qwen_sft/tokenize/options.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_sft.cli_options import LEGACY_GROUP, option
from qwen_sft.data.parts import ReasoningPolicy

DEFAULT_OUTPUT = "./processed/sft_train.jsonl"

# Targets a --map entry may fill. Repeating user/assistant/system joins the pieces with a blank line.
MAP_TARGETS = ("system", "user", "assistant", "messages", "conversations", "tools")


@dataclass(frozen=True)
class FieldMap:
    """``--map user=Q --map assistant=A``: where each part of a conversation lives in an unknown record.

    Paths are dotted; a numeric segment indexes a list (``instances.0.input``).
    """

    entries: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def parse(cls, specs: list[str]) -> FieldMap:
        entries, problems = [], []
        for spec in specs:
            target, sep, path = spec.partition("=")
            target, path = target.strip(), path.strip()
            if not sep or not path or target not in MAP_TARGETS:
                problems.append(f"--map {spec!r}: expected TARGET=PATH with TARGET one of {', '.join(MAP_TARGETS)}")
                continue
            entries.append((target, tuple(path.split("."))))
        targets = {t for t, _ in entries}
        if not problems and not ({"messages", "conversations"} & targets or {"user", "assistant"} <= targets):
            problems.append("--map needs both user=PATH and assistant=PATH (or messages=PATH / conversations=PATH)")
        if problems:
            raise ValueError("\n".join(problems))
        return cls(tuple(entries))

    def paths(self, target: str) -> list[tuple[str, ...]]:
        return [path for t, path in self.entries if t == target]

    def roots(self) -> frozenset[str]:
        """The record keys the map reads (each path's first step); the other keys are counted as unread."""
        return frozenset(path[0] for _, path in self.entries)


@dataclass
class ConvertOptions:
    """How records become ChatML. Field help is the CLI help of convert_to_chatml.py (qwen_sft/cli_options.py)."""

    system: str | None = option(None, "-s", "--system", legacy=(("-system_prompt", "--system_prompt"),),
                                help="system prompt added only to records without one (no default)")
    field_map: FieldMap | None = option(None, "--map", metavar="TARGET=PATH", parse=FieldMap.parse, help=(
        "field map replacing shape detection: user=, assistant=, system= (repeatable, joined by a blank line), "
        "messages=, conversations=, tools=; dotted paths like instances.0.input"))
    reasoning: ReasoningPolicy = option("drop", "--reasoning", help=(
        "reasoning content parts: drop (Qwen3-Coder never thinks aloud), keep as text, reject"))
    wrap_raw_arguments: str | None = option(None, "--wrap_raw_arguments", metavar="KEY", help=(
        "keep tool-call arguments that are not a JSON object as {KEY: value} instead of rejecting"))
    strict: bool = option(False, "--strict", help="stop at the first bad record (exit code 1)")
    # tqdm's convention: None shows the bar only on a terminal.
    progress: bool | None = option(None, negate=("--no_progress", "--no-progress"),
                                   help="no progress bar even on a terminal")

    def __post_init__(self) -> None:
        problems = []
        if self.reasoning not in ("drop", "keep", "reject"):
            problems.append(f"--reasoning must be drop, keep or reject, found {self.reasoning!r}")
        if self.system is not None and not self.system.strip():
            problems.append("-s/--system is empty; leave it out to add no system prompt")
        if self.wrap_raw_arguments is not None and not self.wrap_raw_arguments.strip():
            problems.append("--wrap_raw_arguments needs a key name, e.g. --wrap_raw_arguments code")
        if problems:
            raise ValueError("\n".join(problems))


@dataclass
class ConvertRun:
    """What one ``convert_to_chatml.py`` run reads and writes (the library's own options: ConvertOptions)."""

    input: str | None = option(None, nargs="?", legacy=(("-input_path", "--input_path"), ("-input_dir", "--input_dir")),
                               help="input file or directory (searched recursively, sorted order)")
    output: str | None = option(None, "-o", "--output", legacy=(("-output_path", "--output_path"),),
                                help=f"output ChatML JSONL (default {DEFAULT_OUTPUT})")
    split: bool = option(False, "--split", help="write <base>_train.jsonl and <base>_eval.jsonl")
    eval_ratio: float = option(0.1, "--eval_ratio", help="eval share with --split")
    seed: int = option(42, "--seed", help="seed of the --split draw")
    tokenize: bool = option(False, "-t", "--tokenize", help=(
        "also tokenize: output holds input_ids/label (-m, --max_len, --trust_remote_code as in qwen-sft tokenize)"))
    output_dir: str | None = option(None, "-output_dir", "--output_dir", group=LEGACY_GROUP,
                                    help="one output per input file in here")
    merge: bool = option(False, "-merge", "--merge", group=LEGACY_GROUP, help="with -output_dir: also merge all")
    merge_output: str | None = option(None, "-merge_output", "--merge_output", group=LEGACY_GROUP,
                                      help="merged file (default -o)")

    def __post_init__(self) -> None:
        problems = []
        if self.split and not 0 < self.eval_ratio < 1:
            problems.append(f"--eval_ratio must be between 0 and 1, found {self.eval_ratio}")
        if self.output_dir is not None and (self.split or self.tokenize):
            problems.append("-output_dir (one output per input) cannot be combined with --split or --tokenize; use -o")
        if (self.merge or self.merge_output) and self.output_dir is None:
            problems.append("-merge/-merge_output need -output_dir (without it every input is merged into -o anyway)")
        if problems:
            raise ValueError("\n".join(problems))
