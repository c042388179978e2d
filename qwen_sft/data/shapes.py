"""One small function per record shape → (messages, tools), and the key-based detection that picks one.

Detection precedence (first match wins; ``--map`` replaces detection altogether):

    1. messages                          OpenAI / ChatML (content may be a list of typed parts)
    2. conversations                     ShareGPT (from/value)
    3. instruction + instances           Self-Instruct (KULLM): the single instance's input/output
    4. instruction + output              Alpaca (input, system, history optional)
    5. instruction + response            Alpaca with the answer under ``response``
    6. history (a list of messages)      agent trajectories (SWE-agent ``.traj``)
    7. input/output, question/answer, prompt/completion, prompt/response, query/response

Only the keys a shape names are read: nothing else of the input reaches a message.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from qwen_sft.data.messages import (
    ROLES,
    BadRecord,
    calls_from_value,
    content_from_parts,
    maybe_json,
    normalize_tools,
    preview,
    type_name,
)
from qwen_sft.data.options import ConvertOptions, FieldMap

Converted = tuple[list[dict], list[dict]]  # (messages, tools)
PAIRS = (("input", "output"), ("question", "answer"), ("prompt", "completion"), ("prompt", "response"),
         ("query", "response"))
PLAIN_ROLES = ("system", "user", "assistant")  # a {role, content} message of these needs no more work
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "observation": "tool", "tool": "tool", "function_call": "function_call"}


def _text(rec: dict, key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"{key!r} is {type_name(value)}, expected a string")
    return value


def from_messages(rec: dict, key: str, notes: Counter, opts: ConvertOptions) -> Converted:
    """OpenAI chat: roles system/user/assistant/tool, ``tool_calls``, ``content`` null, a string or typed parts."""
    raw = maybe_json(rec[key], key)
    if not isinstance(raw, list):
        raise BadRecord("wrong_type", f"{key!r} is {type_name(raw)}, expected a list of messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRecord("wrong_type", f"message {i} is {type_name(m)}, expected an object")
        role, content = m.get("role"), m.get("content")
        if len(m) == 2 and isinstance(content, str) and role in PLAIN_ROLES:
            messages.append({"role": role, "content": content})  # the common case, nothing else to read
        else:
            messages.append(_message(i, m, role, content, notes, opts))
    return messages, normalize_tools(rec.get("tools"), notes)


def _message(i: int, m: dict, role: Any, content: Any, notes: Counter, opts: ConvertOptions) -> dict:
    if role not in ROLES:
        raise BadRecord("unknown_role", f"message {i} has role {preview(role)}; known roles: {', '.join(ROLES)}")
    calls: list[dict] = []
    try:
        if isinstance(content, list):
            content, calls = content_from_parts(content, role, notes, opts.reasoning, opts.wrap_raw_arguments)
        elif content is None:
            content = ""  # content: null is how OpenAI writes a pure tool call; validation rejects it elsewhere
        elif not isinstance(content, str):
            raise BadRecord("wrong_type", f"content is {type_name(content)}")
        raw_calls = maybe_json(m.get("tool_calls"), "tool_calls")
        if raw_calls:
            if not isinstance(raw_calls, list):
                raise BadRecord("wrong_type", f"tool_calls is {type_name(raw_calls)}, expected a list")
            calls += calls_from_value(raw_calls, notes, opts.wrap_raw_arguments)
        if m.get("function_call"):  # the pre-tools OpenAI field
            calls += calls_from_value(m["function_call"], notes, opts.wrap_raw_arguments)
    except BadRecord as err:
        raise BadRecord(err.reason, f"message {i} ({role}): {err.detail}") from None
    msg: dict[str, Any] = {"role": role, "content": content}
    if calls:
        msg["tool_calls"] = calls
    if role == "tool":
        call_id, ids = m.get("tool_call_id"), m.get("tool_call_ids")
        if not isinstance(call_id, str) and isinstance(ids, list) and len(ids) == 1:
            call_id = ids[0]  # SWE-agent writes a one-element list
        if isinstance(call_id, str) and call_id:
            msg["tool_call_id"] = call_id
    if m.get("loss") is not None:
        if not isinstance(m["loss"], bool):
            raise BadRecord("wrong_type", f"message {i}: loss is {type_name(m['loss'])}, expected true/false")
        msg["loss"] = m["loss"]
    return msg


def from_sharegpt(rec: dict, key: str, notes: Counter, opts: ConvertOptions) -> Converted:
    """ShareGPT ``conversations`` of ``{from, value}``; ``function_call`` turns become assistant tool calls."""
    turns = maybe_json(rec[key], key)
    if not isinstance(turns, list):
        raise BadRecord("wrong_type", f"{key!r} is {type_name(turns)}, expected a list of turns")
    messages: list[dict] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord("wrong_type", f"turn {i} is {type_name(turn)}, expected an object")
        source, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        role = SHAREGPT_ROLES.get(source) if isinstance(source, str) else None
        if role is None:
            raise BadRecord("unknown_role", f"turn {i} has from={preview(source)}; known: {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(value, str):
            raise BadRecord("wrong_type", f"turn {i} ({source}): value is {type_name(value)}, expected a string")
        if role == "function_call":
            try:
                calls = calls_from_value(value, notes, opts.wrap_raw_arguments)
            except BadRecord as err:
                raise BadRecord(err.reason, f"turn {i} (function_call): {err.detail}") from None
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": role, "content": value})
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRecord("wrong_type", f"'system' is {type_name(system)}, expected a string")
    if system and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})  # a system turn inside the conversation wins
    return messages, normalize_tools(rec.get("tools"), notes)


def from_alpaca(rec: dict, answer_key: str, notes: Counter, opts: ConvertOptions) -> Converted:
    """Alpaca: instruction (+ a blank line + input when it is not empty) → answer; ``history`` turns go first."""
    user = _text(rec, "instruction")
    extra = rec.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRecord("wrong_type", f"'input' is {type_name(extra)}, expected a string")
    if extra and not extra.isspace():
        user = f"{user}\n\n{extra}"
    messages: list[dict] = []
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRecord("wrong_type", f"'system' is {type_name(system)}, expected a string")
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    history = maybe_json(rec.get("history"), "history") or []
    if not isinstance(history, list):
        raise BadRecord("wrong_type", f"'history' is {type_name(history)}, expected [[user, assistant], ...]")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRecord("wrong_type", f"history[{i}] is not a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec, answer_key)}]
    return messages, []


def from_self_instruct(rec: dict, notes: Counter, opts: ConvertOptions) -> Converted:
    """Self-Instruct (KULLM): ``instruction`` + ``instances[{input, output}]``; exactly one instance per record."""
    instances = rec.get("instances")
    if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
        count = len(instances) if isinstance(instances, list) else type_name(instances)
        raise BadRecord("instances_not_one", f"'instances' holds {count} entries; expected exactly one "
                        "(use --map user=instruction --map user=instances.N.input --map assistant=instances.N.output)")
    inst = instances[0]
    return from_alpaca({"instruction": rec.get("instruction"), "input": inst.get("input"),
                        "output": inst.get("output")}, "output", notes, opts)


def from_pair(rec: dict, user_key: str, assistant_key: str) -> Converted:
    return [{"role": "user", "content": _text(rec, user_key)},
            {"role": "assistant", "content": _text(rec, assistant_key)}], []


def resolve(rec: Any, path: tuple[str, ...]) -> Any:
    """Follow a dotted path through objects and lists; a missing step is a reject that names the path."""
    node = rec
    for step in path:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            raise BadRecord("map_field_missing", f"--map path {'.'.join(path)!r} not found (stopped at {step!r})")
    return node


def from_field_map(rec: dict, fmap: FieldMap, notes: Counter, opts: ConvertOptions) -> Converted:
    """``--map``: a nested messages/conversations list, or system/user/assistant texts (repeats: blank-line joined)."""
    for target, convert in (("messages", from_messages), ("conversations", from_sharegpt)):
        if fmap.paths(target):
            inner = {target: resolve(rec, fmap.paths(target)[0])}
            if fmap.paths("tools"):
                inner["tools"] = resolve(rec, fmap.paths("tools")[0])
            return convert(inner, target, notes, opts)
    texts = {}
    for target in ("system", "user", "assistant"):
        pieces = []
        for path in fmap.paths(target):
            value = resolve(rec, path)
            if not isinstance(value, str):
                where = f"--map {target}={'.'.join(path)}"
                raise BadRecord("wrong_type", f"{where} is {type_name(value)}, expected a string")
            if value and not value.isspace():  # an empty piece adds nothing, like Alpaca's empty input
                pieces.append(value)
        texts[target] = "\n\n".join(pieces)
    messages = [{"role": "system", "content": texts["system"]}] if texts["system"] else []
    messages += [{"role": "user", "content": texts["user"]}, {"role": "assistant", "content": texts["assistant"]}]
    tools = normalize_tools(resolve(rec, fmap.paths("tools")[0]), notes) if fmap.paths("tools") else []
    return messages, tools


def to_messages(rec: dict, notes: Counter, opts: ConvertOptions) -> Converted:
    """Convert one record by its shape, detected from its keys in the documented precedence."""
    if opts.field_map is not None:
        return from_field_map(rec, opts.field_map, notes, opts)
    if "messages" in rec:
        return from_messages(rec, "messages", notes, opts)
    if "conversations" in rec:
        return from_sharegpt(rec, "conversations", notes, opts)
    if "instruction" in rec:
        if "instances" in rec and "output" not in rec:
            return from_self_instruct(rec, notes, opts)
        for answer in ("output", "response"):
            if answer in rec:
                return from_alpaca(rec, answer, notes, opts)
    if isinstance(rec.get("history"), list):
        return from_messages(rec, "history", notes, opts)
    for user_key, assistant_key in PAIRS:
        if user_key in rec and assistant_key in rec:
            return from_pair(rec, user_key, assistant_key)
    keys = ", ".join(sorted(map(str, rec))[:12]) or "none"
    raise BadRecord("unknown_shape", f"no known shape for keys [{keys}]; pass --map user=PATH --map assistant=PATH")
