"""Pieces shared by every record shape: the reject error, tool lists, tool calls and typed content parts.

Everything here produces the project's one internal currency (STYLE.md §2):
``{"role", "content": str, "tool_calls"?: [{"type": "function", "function": {"name", "arguments": dict}}],
"tool_call_id"?: str, "loss"?: bool}`` and tools as ``{"type": "function", "function": {"name", "description",
"parameters"}}``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import orjson

from qwen_sft.data.exactjson import loads as exact_loads

ROLES = ("system", "user", "assistant", "tool")
ReasoningPolicy = Literal["drop", "keep", "reject"]


class BadRecord(ValueError):
    """A record that cannot become a valid conversation. ``reason`` is a stable key counted in the summary."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def preview(value: Any, limit: int = 80) -> str:
    """A short repr for error messages; a 100 MB field must not end up in a one-line error."""
    text = value if isinstance(value, str) else repr(value)
    return repr(text[:limit] + "…") if len(text) > limit else repr(text)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def maybe_json(value: Any, what: str) -> Any:
    """Lists and objects stored as a JSON string (glaive's ``tools``, CSV cells) are parsed; other values pass."""
    if not isinstance(value, str):
        return value
    try:
        return exact_loads(value)
    except orjson.JSONDecodeError as err:
        detail = f"{what} is a string that is not JSON ({err}): {preview(value)}"
        raise BadRecord("invalid_json_field", detail) from None


def normalize_tools(value: Any, notes: Counter) -> list[dict]:
    """A tool list (or its JSON string) → function tools. Non-function tools (``code_interpreter``) are dropped.

    Datasets repeat one tool list on every record, so results are memoized by the list's JSON text; the
    returned list is shared between records and must not be mutated.
    """
    if not value:
        return []
    text = value if isinstance(value, str) else orjson.dumps(value)
    hit = _TOOLS_CACHE.get(text)
    if hit is None:
        if len(_TOOLS_CACHE) >= 4096:
            _TOOLS_CACHE.clear()
        drops: Counter = Counter()
        hit = _TOOLS_CACHE[text] = (_normalize_tools(value, drops), drops["non_function_tool_dropped"])
    if hit[1]:
        notes["non_function_tool_dropped"] += hit[1]
    return hit[0]


_TOOLS_CACHE: dict[str | bytes, tuple[list[dict], int]] = {}


def _normalize_tools(value: Any, notes: Counter) -> list[dict]:
    value = None if isinstance(value, str) and not value.strip() else maybe_json(value, "tools")
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise BadRecord("wrong_type", f"tools must be a list, found {type_name(value)}")
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise BadRecord("bad_tool", f"tools[{i}] is {type_name(tool)}, expected an object")
        if tool.get("type", "function") != "function":
            # The Qwen3-Coder template lists only functions; a built-in tool has no name or schema to render.
            notes["non_function_tool_dropped"] += 1
            continue
        fn = tool["function"] if "function" in tool else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRecord("bad_tool", f"tools[{i}] has no function name")
        description = fn.get("description")
        description = "" if description is None else description
        params = maybe_json(fn.get("parameters"), f"tools[{i}].parameters")
        params = {"type": "object", "properties": {}} if params is None else params
        if not isinstance(description, str) or not isinstance(params, dict):
            detail = f"tools[{i}] ({fn['name']}): description must be a string, parameters an object"
            raise BadRecord("bad_tool", detail)
        if "properties" not in params:
            # The official template iterates parameters.properties unconditionally.
            params = {**params, "properties": {}}
        kept = {"name": fn["name"], "description": description, "parameters": params}
        if fn.get("return") is not None:
            kept["return"] = fn["return"]  # the official template lists it (an object as JSON, else as text)
        tools.append({"type": "function", "function": kept})
    return tools


def normalize_tool_call(call: Any, notes: Counter, wrap_key: str | None) -> dict:
    """One OpenAI-shaped (or flat ``{"name", "arguments"}``) call → ``{"type", "function": {name, arguments}}``.

    ``arguments`` may be an object or a JSON string holding one. Anything else (functionary's raw Python for
    ``code_interpreter``) is rejected, or wrapped as ``{wrap_key: value}`` when ``--wrap_raw_arguments`` is set.
    """
    if not isinstance(call, dict):
        raise BadRecord("bad_tool_call", f"tool call is {type_name(call)}, expected an object")
    fn = call["function"] if "function" in call else call
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise BadRecord("bad_tool_call", f"tool call without a function name: {preview(call)}")
    args = fn.get("arguments")
    parsed: Any = args
    if args is None:
        parsed = {}
    elif isinstance(args, str):
        try:
            parsed = exact_loads(args) if args.strip() else {}
        except orjson.JSONDecodeError:
            parsed = None  # not JSON at all: handled with the other non-objects below
    if not isinstance(parsed, dict):
        if wrap_key is None:
            raise BadRecord("arguments_not_object", f"tool call {fn['name']!r}: arguments are not a JSON object: "
                            f"{preview(args)} (pass --wrap_raw_arguments KEY to keep them as {{KEY: value}})")
        notes["arguments_wrapped"] += 1
        parsed = {wrap_key: args}
    return {"type": "function", "function": {"name": fn["name"], "arguments": parsed}}


def calls_from_value(value: Any, notes: Counter, wrap_key: str | None) -> list[dict]:
    """A tool-call payload (object, list for parallel calls, or their JSON string) → normalized calls, in order."""
    value = maybe_json(value, "tool call")
    calls = value if isinstance(value, list) else [value]
    return [normalize_tool_call(c, notes, wrap_key) for c in calls]


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
            raise BadRecord("bad_content_part", f"part {j} is {type_name(part)}")
        kind = part.get("type", "text")
        value = part.get("text", part.get("value"))
        if kind in ("text", "input_text", "output_text"):
            if not isinstance(value, str):
                raise BadRecord("bad_content_part", f"text part {j} has {type_name(value)} text")
            pieces.append(value)
        elif kind in ("reasoning", "thinking"):
            if reasoning == "reject":
                raise BadRecord("reasoning_part", f"part {j} is reasoning (--reasoning reject)")
            if reasoning == "drop":
                notes["reasoning_dropped"] += 1
            elif isinstance(value, str) and value.strip():
                notes["reasoning_kept"] += 1
                pieces.append(value.strip() + "\n\n")
                last_is_reasoning = True
        elif kind in ("tool_call", "function_call"):
            if role != "assistant":
                raise BadRecord("tool_calls_on_non_assistant", f"tool_call part {j} in a {role} message")
            calls += calls_from_value(part.get("value", part.get("tool_call")), notes, wrap_key)
        else:
            raise BadRecord("unsupported_content_part", f"part {j} has type {preview(kind)}")
    if last_is_reasoning:
        pieces[-1] = pieces[-1][:-2]  # kept reasoning with nothing after it: no dangling separator
    return "".join(pieces), calls
