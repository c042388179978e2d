"""Rendered text → its turns: each ``<|im_start|>role\\n…<|im_end|>\\n`` block as byte offsets.

Turns are found in the rendered text, not derived from message contents, because the template rewrites
content (the official one trims assistant content before tool calls and groups consecutive tool messages
into one user turn). ``align.py`` matches them to the messages they render.
"""

from __future__ import annotations

from typing import NamedTuple

from qwen_sft.conversation.errors import RecordError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IM_START_B, IM_END_B = IM_START.encode(), IM_END.encode()


class Turn(NamedTuple):
    """One ``<|im_start|>role\\n…<|im_end|>\\n`` block as byte offsets into the rendered UTF-8 text."""

    role: str
    start: int  # at <|im_start|>
    body: int  # first byte after "<|im_start|>role\n" (the header)
    end: int  # first byte after <|im_end|>


def parse_turns(data: bytes) -> list[Turn]:
    """Split rendered text into turns; raise RecordError if the text is not a clean sequence of turns."""
    turns: list[Turn] = []
    pos = 0
    n = len(data)
    while pos < n:
        if not data.startswith(IM_START_B, pos):
            raise RecordError("template_layout", f"rendered text has stray text at byte {pos}")
        head = pos + len(IM_START_B)
        close = data.find(IM_END_B, head)
        if close < 0:
            raise RecordError("template_layout", "a turn has no <|im_end|>")
        nl = data.find(b"\n", head, close)
        role_end = nl if nl >= 0 else close
        role = data[head:role_end].decode()
        body = role_end + 1 if nl >= 0 else role_end
        end = close + len(IM_END_B)
        turns.append(Turn(role, pos, body, end))
        pos = end + 1 if data.startswith(b"\n", end) else end
    return turns
