"""Tools and tool calls → the internal currency; the one tool-call normaliser of convert and tokenize.

    calls = calls_from_value('{"name": "run", "arguments": "{\\"cmd\\": \\"ls\\"}"}', Counter(), None)
    # [{"type": "function", "function": {"name": "run", "arguments": {"cmd": "ls"}}}]

A call is ``{"type": "function", "function": {"name", "arguments": dict}}`` whatever it came as (OpenAI's
JSON-string arguments, a flat ``{"name", "arguments"}``, the pre-tools ``function_call``): the template renders
each argument as a ``<parameter=KEY>``, so arguments must be a mapping. Tokenize reads ChatML tool calls with the
same function and so takes the same decision (and reason) on the same call as convert.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson

from qwen_sft.conversation.errors import RecordError, preview, type_name
from qwen_sft.conversation.types import Tool, ToolCall
from qwen_sft.data.exactjson import loads as exact_loads

# A string holding JSON nested this deep cannot be: orjson writes at most 255 levels (see _check_depth).
_DEEP = 255


def maybe_json(value: Any, what: str) -> Any:
    """Lists and objects stored as a JSON string (glaive's ``tools``, CSV cells) are parsed; other values pass."""
    if not isinstance(value, str):
        return value
    try:
        return exact_loads(value)
    except orjson.JSONDecodeError as err:
        detail = f"{what} is a string that is not JSON ({err}): {preview(value)}"
        raise RecordError("invalid_json_field", detail) from None


def tool_list(value: Any) -> list[dict]:
    """A ``tools`` value (or its JSON string; blank or ``"[]"`` is none) → a list of objects, unchanged."""
    value = None if isinstance(value, str) and not value.strip() else maybe_json(value, "tools")
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise RecordError("wrong_type", f"tools must be a list, found {type_name(value)}")
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise RecordError("bad_tool", f"tools[{i}] is {type_name(tool)}, expected an object")
    return value


def normalize_tools(value: Any, notes: Counter) -> list[Tool]:
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


_TOOLS_CACHE: dict[str | bytes, tuple[list[Tool], int]] = {}


def _normalize_tools(value: Any, notes: Counter) -> list[Tool]:
    tools: list[Tool] = []
    for i, tool in enumerate(tool_list(value)):
        if tool.get("type", "function") != "function":
            # The Qwen3-Coder template lists only functions; a built-in tool has no name or schema to render.
            notes["non_function_tool_dropped"] += 1
            continue
        fn = tool["function"] if "function" in tool else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError("bad_tool", f"tools[{i}] has no function name")
        description = fn.get("description")
        description = "" if description is None else description
        params = maybe_json(fn.get("parameters"), f"tools[{i}].parameters")
        params = {"type": "object", "properties": {}} if params is None else params
        if not isinstance(description, str) or not isinstance(params, dict):
            detail = f"tools[{i}] ({fn['name']}): description must be a string, parameters an object"
            raise RecordError("bad_tool", detail)
        if "properties" not in params:
            # The official template iterates parameters.properties unconditionally.
            params = {**params, "properties": {}}
        kept = {"name": fn["name"], "description": description, "parameters": params}
        if fn.get("return") is not None:
            kept["return"] = fn["return"]  # the official template lists it (an object as JSON, else as text)
        tools.append({"type": "function", "function": kept})
    return tools


def normalize_tool_call(call: Any, notes: Counter, wrap_key: str | None) -> ToolCall:
    """One OpenAI-shaped (or flat ``{"name", "arguments"}``) call → ``{"type", "function": {name, arguments}}``.

    ``arguments`` may be an object or a JSON string holding one (null or blank: no arguments). Anything else
    (functionary's raw Python for ``code_interpreter``) is rejected, or wrapped as ``{wrap_key: value}`` when
    ``--wrap_raw_arguments`` is set (convert only; tokenize passes None).
    """
    if not isinstance(call, dict):
        raise RecordError("bad_tool_call", f"tool call is {type_name(call)}, expected an object")
    fn = call["function"] if "function" in call else call
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise RecordError("bad_tool_call", f"tool call without a function name: {preview(call)}")
    args = fn.get("arguments")
    parsed: Any = args
    if args is None:
        parsed = {}
    elif isinstance(args, str):
        try:
            parsed = exact_loads(args) if args.strip() else {}
        except orjson.JSONDecodeError:
            parsed = None  # not JSON at all: handled with the other non-objects below
        if isinstance(parsed, dict) and len(args) > 2 * _DEEP:
            _check_depth(parsed, fn["name"])
    if not isinstance(parsed, dict):
        if wrap_key is None:
            raise RecordError("arguments_not_object", f"tool call {fn['name']!r}: arguments are not a JSON object: "
                              f"{preview(args)} (pass --wrap_raw_arguments KEY to keep them as {{KEY: value}})")
        notes["arguments_wrapped"] += 1
        parsed = {wrap_key: args}
    return {"type": "function", "function": {"name": fn["name"], "arguments": parsed}}


def _check_depth(parsed: dict, name: str) -> None:
    # orjson reads 1,024 levels but writes 255: such arguments parse, then cannot be written (convert) or
    # recurse past Python's limit in the template (tokenize). One reason for both, found here.
    try:
        orjson.dumps(parsed)
    except orjson.JSONEncodeError as err:
        if "ecursion" in str(err):  # not an integer past 64 bits: convert's writer names that one
            raise RecordError("nested_too_deep", f"tool call {name!r}: arguments: {err}") from None


def calls_from_value(value: Any, notes: Counter, wrap_key: str | None) -> list[ToolCall]:
    """A tool-call payload (object, list for parallel calls, or their JSON string) → normalized calls, in order."""
    value = maybe_json(value, "tool call")
    calls = value if isinstance(value, list) else [value]
    return [normalize_tool_call(c, notes, wrap_key) for c in calls]
