"""The one length rule for a tokenized sample, used by tokenize (``--overlength``) and training
(``truncate_source`` / ``strict``) alike, so that one ``max_len`` means one thing.

    from qwen_sft.samples.length import TurnMarks, cut_to_length, fits
    marks = TurnMarks.of(tokenizer)
    end, kind = (len(ids), "") if fits(len(ids), 2048) else cut_to_length(ids, labels, 2048, marks)

A sample of at most ``max_len`` tokens is kept whole. A longer one is dropped (the default), an error
(training's ``strict``), or cut: after the last whole turn that fits and still leaves a supervised token
("turn"); only when no such turn boundary exists inside a turn ("mid_turn"), and a cut that would end inside a
``<tool_call>`` is moved back to just before that call, or — when nothing supervised would be left — kept and
counted ("in_tool_call"). A window with no supervised token is ``NothingSupervised``: the sample is dropped.

Turns and tool calls are found by token id (``<|im_start|>`` is a special token, always one token, so its
positions are exactly the turn starts). Without ``TurnMarks`` (data whose tokenizer is unknown) the rule has
no boundaries to use and cuts at ``max_len``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen_sft.samples import IGNORE_INDEX


@dataclass(frozen=True)
class TurnMarks:
    """Token ids the rule cuts by; -1 = not in the vocabulary (never matches)."""

    turn_start: int = -1  # <|im_start|>
    call_open: int = -1  # <tool_call>
    call_close: int = -1  # </tool_call>

    @classmethod
    def of(cls, tok: Any) -> TurnMarks:
        vocab = tok.get_vocab()
        return cls(*(int(vocab.get(t, -1)) for t in ("<|im_start|>", "<tool_call>", "</tool_call>")))


NO_MARKS = TurnMarks()


class NothingSupervised(Exception):
    """No supervised token is left within ``max_len``: the sample cannot be cut, only dropped."""


def fits(length: int, max_len: int) -> bool:
    return length <= max_len


def cut_to_length(ids: np.ndarray, labels: np.ndarray, max_len: int, marks: TurnMarks = NO_MARKS) -> tuple[int, str]:
    """``(end, kind)``: keep ``ids[:end]`` of a sample longer than ``max_len``; kind is "turn", "mid_turn" or
    "in_tool_call" (see the module doc). Raises ``NothingSupervised``."""
    ids, labels = np.asarray(ids), np.asarray(labels)
    supervised = np.cumsum(labels[:max_len + 1] != IGNORE_INDEX)
    boundaries = np.flatnonzero(ids[1:max_len + 1] == marks.turn_start) + 1  # turn starts at or before max_len
    for b in boundaries[::-1]:
        if supervised[b - 1] > 0:
            return int(b), "turn"
    cut, kind = max_len, "mid_turn"
    head = ids[:cut]
    opens = np.flatnonzero(head == marks.call_open)
    if len(opens) and (head == marks.call_close).sum() < len(opens):
        back = int(opens[-1])  # before the unfinished <tool_call> (its "\n" is a separate token before it)
        if back > 0 and supervised[back - 1] > 0:
            cut = back
        else:
            kind = "in_tool_call"
    if supervised[cut - 1] == 0:
        raise NothingSupervised(f"nothing supervised in the first {cut} tokens")
    return cut, kind
