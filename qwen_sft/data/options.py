"""Typed options of the convert stage; conflicting or malformed values are rejected here, before any file is read."""

from __future__ import annotations

from dataclasses import dataclass

from qwen_sft.data.parts import ReasoningPolicy

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
    """How records become ChatML. Field help doubles as the CLI help (see qwen_sft/data/cli.py)."""

    system: str | None = None  # -s: system prompt for records that have none; never a silent default
    field_map: FieldMap | None = None  # --map: overrides shape detection for every record
    reasoning: ReasoningPolicy = "drop"  # --reasoning: what happens to reasoning/thinking content parts
    wrap_raw_arguments: str | None = None  # --wrap_raw_arguments KEY: keep non-object arguments as {KEY: value}
    strict: bool = False  # --strict: stop at the first bad record with exit code 1
    progress: bool | None = None  # tqdm's convention: None shows the bar only on a terminal

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
