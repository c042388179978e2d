"""Typed content parts (OpenAI, LLaMA-Factory) → one text and the tool calls they hold.

The result is the internal currency's ``content`` string (``qwen_sft.conversation.types.Message``).
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

from qwen_sft.conversation.errors import RecordError, preview, type_name
from qwen_sft.conversation.tools import calls_from_value

ReasoningPolicy = Literal["drop", "keep", "reject"]


def content_from_parts(
    parts: list, role: str, notes: Counter, reasoning: ReasoningPolicy, wrap_key: str | None
) -> tuple[str, list[dict]]:
    """Typed content parts (OpenAI ``text``, LLaMA-Factory ``text``/``reasoning``/``tool_call``) → text + calls.

    Text parts are concatenated as they are. Reasoning is dropped by default (Qwen3-Coder never emits
    ``<think>``), kept as a leading paragraph with ``keep``, or makes the record a reject with ``reject``.
    """
    pieces: list[str] = []
    calls: list[dict] = []
    last_is_reasoning = False
    for j, part in enumerate(parts):
        last_is_reasoning = False
        if isinstance(part, str):
            pieces.append(part)
            continue
        if not isinstance(part, dict):
            raise RecordError("bad_content_part", f"part {j} is {type_name(part)}")
        kind = part.get("type", "text")
        value = part.get("text", part.get("value"))
        if kind in ("text", "input_text", "output_text"):
            if not isinstance(value, str):
                raise RecordError("bad_content_part", f"text part {j} has {type_name(value)} text")
            pieces.append(value)
        elif kind in ("reasoning", "thinking"):
            if reasoning == "reject":
                raise RecordError("reasoning_part", f"part {j} is reasoning (--reasoning reject)")
            if reasoning == "drop":
                notes["reasoning_dropped"] += 1
            elif isinstance(value, str) and value.strip():
                notes["reasoning_kept"] += 1
                pieces.append(value.strip() + "\n\n")
                last_is_reasoning = True
        elif kind in ("tool_call", "function_call"):
            if role != "assistant":
                raise RecordError("tool_calls_on_non_assistant", f"tool_call part {j} in a {role} message")
            calls += calls_from_value(part.get("value", part.get("tool_call")), notes, wrap_key)
        else:
            raise RecordError("unsupported_content_part", f"part {j} has type {preview(kind)}")
    if last_is_reasoning:
        pieces[-1] = pieces[-1][:-2]  # kept reasoning with nothing after it: no dangling separator
    return "".join(pieces), calls
