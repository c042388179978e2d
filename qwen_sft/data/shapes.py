"""One small function per record shape → (messages, tools), and the key-based detection that picks one.

Records that are not SFT data (preference pairs, KTO rows) are rejected first, naming their format. Then
detection precedence (first match wins; ``--map`` replaces detection and the non-SFT check altogether):

    1. messages                          OpenAI / ChatML / ms-swift (content may be a list of typed parts)
    2. conversations                     ShareGPT (from/value)
    3. instruction + instances           Self-Instruct (KULLM): the single instance's input/output
    4. instruction + output              Alpaca (input, system, history optional)
    5. instruction + response            Alpaca with the answer under ``response``
    6. input/output, question/answer, prompt/completion, prompt/response, query/response
                                         one pair; ``system`` and ms-swift's ``history`` [[q, r], ...] optional
    7. history (a list of messages)      agent trajectories (SWE-agent ``.traj``)

Only the keys a shape names are read: nothing else of the input reaches a message. The keys left unread are
counted per record key and per message key (``unread``), so the summary shows what was left out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from qwen_sft.conversation.errors import RecordError, preview, type_name
from qwen_sft.conversation.tools import calls_from_value, maybe_json, normalize_tools
from qwen_sft.conversation.types import ROLES
from qwen_sft.data.loss_controls import LOSS_KEYS, combine_part_flags, loss_flag
from qwen_sft.data.non_sft import NON_SFT_KEYS, reject_non_sft
from qwen_sft.data.options import ConvertOptions, FieldMap
from qwen_sft.data.parts import content_from_parts

Converted = tuple[list[dict], list[dict]]  # (messages, tools)
PAIRS = (("input", "output"), ("question", "answer"), ("prompt", "completion"), ("prompt", "response"),
         ("query", "response"))
PLAIN_ROLES = ("system", "user", "assistant")  # a {role, content} message of these needs no more work
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "observation": "tool", "tool": "tool", "function_call": "function_call"}
SWIFT_ROLES = ("tool_call", "tool_response")  # ms-swift agent messages: an assistant call, a tool result
# Keys each part of a record is read for; everything else is counted as unread.
MESSAGE_KEYS = frozenset(("role", "content", "tool_calls", "function_call", "tool_call_id", "tool_call_ids")) | LOSS_KEYS
TURN_KEYS = frozenset(("from", "value", "role", "content")) | LOSS_KEYS
PART_KEYS = frozenset(("type", "text", "value", "tool_call")) | LOSS_KEYS
READ_MESSAGES, READ_SHAREGPT = frozenset(("messages", "tools")), frozenset(("conversations", "system", "tools"))
READ_SELF_INSTRUCT, READ_INSTANCE = frozenset(("instruction", "instances")), frozenset(("input", "output"))
READ_ALPACA = {a: frozenset(("instruction", "input", a, "system", "history")) for a in ("output", "response")}
READ_HISTORY = frozenset(("history", "tools"))
READ_PAIR = {pair: frozenset((*pair, "system", "history")) for pair in PAIRS}


def count_unread(obj: dict, read: frozenset[str], prefix: str, unread: list[str] | None) -> None:
    """Append each key of ``obj`` that no shape reads, as ``prefix + key`` (``messages[].name``); None: not asked."""
    if unread is None or (read.issuperset(obj) and "metadata" not in obj):  # the common case, checked in C
        return
    unread.extend([prefix + key for key in obj if key not in read])
    if "metadata" in read and "metadata" in obj:  # only metadata.masked is read (a loss control)
        meta = obj["metadata"]
        if isinstance(meta, dict):
            unread.extend([f"{prefix}metadata.{key}" for key in meta if key != "masked"])
        else:
            unread.append(f"{prefix}metadata")


def _text(rec: dict, key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"{key!r} is {type_name(value)}, expected a string")
    return value


def _objects(rec: dict, key: str, item: str) -> Iterator[tuple[int, dict]]:
    """``(i, object)`` of the list ``rec[key]`` (or the JSON text of one), each checked to be an object as it is
    reached; the errors name the ``item`` kind (``message``, ``turn``)."""
    raw = maybe_json(rec[key], key)
    if not isinstance(raw, list):
        raise RecordError("wrong_type", f"{key!r} is {type_name(raw)}, expected a list of {item}s")
    for i, obj in enumerate(raw):
        if not isinstance(obj, dict):
            raise RecordError("wrong_type", f"{item} {i} is {type_name(obj)}, expected an object")
        yield i, obj


def from_messages(rec: dict, key: str, notes: Counter, opts: ConvertOptions, unread: list[str] | None = None) -> Converted:
    """OpenAI chat: roles system/user/assistant/tool, ``tool_calls``, ``content`` null, a string or typed parts.

    ms-swift's agent roles are read too: a ``tool_call`` message (its content a JSON call) joins the assistant
    message before it, or becomes one; ``tool_response`` is a tool message.
    """
    messages: list[dict] = []
    prefix = f"{key}[]."
    for i, m in _objects(rec, key, "message"):
        role, content = m.get("role"), m.get("content")
        if len(m) == 2 and isinstance(content, str) and role in PLAIN_ROLES:
            messages.append({"role": role, "content": content})  # the common case, nothing else to read
            continue
        count_unread(m, MESSAGE_KEYS, prefix, unread)
        if role == "tool_call":
            _swift_tool_call(i, m, messages, notes, opts)
        else:
            messages.append(_message(i, m, "tool" if role == "tool_response" else role, content, notes, opts, unread,
                                     prefix))
    return messages, normalize_tools(rec.get("tools"), notes)


def _swift_tool_call(i: int, m: dict, messages: list[dict], notes: Counter, opts: ConvertOptions) -> None:
    try:
        calls = calls_from_value(m.get("content"), notes, opts.wrap_raw_arguments)
        flag = loss_flag(m)
    except RecordError as err:
        raise RecordError(err.reason, f"message {i} (tool_call): {err.detail}") from None
    prev = messages[-1] if messages else None
    if prev is not None and prev["role"] == "assistant":
        # ms-swift renders an assistant text and the calls after it as one turn: one message here too
        if prev.get("loss") != flag:
            raise RecordError("mixed_loss_in_turn", f"message {i} (tool_call) and the assistant message before it "
                            "form one turn but disagree on training")
        prev.setdefault("tool_calls", []).extend(calls)
        return
    msg: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": calls}
    if flag is not None:
        msg["loss"] = flag
    messages.append(msg)


def _message(
    i: int, m: dict, role: Any, content: Any, notes: Counter, opts: ConvertOptions, unread: list[str] | None, prefix: str
) -> dict:
    if role not in ROLES:
        known = ", ".join(ROLES + SWIFT_ROLES)
        raise RecordError("unknown_role", f"message {i} has role {preview(role)}; known roles: {known}")
    calls: list[dict] = []
    try:
        flag = None if LOSS_KEYS.isdisjoint(m) else loss_flag(m)
        if isinstance(content, list):
            parts = [p for p in content if isinstance(p, dict)]
            for part in parts:
                count_unread(part, PART_KEYS, f"{prefix}content[].", unread)
            flag = combine_part_flags(flag, [None if LOSS_KEYS.isdisjoint(p) else loss_flag(p) for p in parts])
            content, calls = content_from_parts(content, role, notes, opts.reasoning, opts.wrap_raw_arguments)
        elif content is None:
            content = ""  # content: null is how OpenAI writes a pure tool call; validation rejects it elsewhere
        elif not isinstance(content, str):
            raise RecordError("wrong_type", f"content is {type_name(content)}")
        raw_calls = maybe_json(m.get("tool_calls"), "tool_calls")
        if raw_calls:
            if not isinstance(raw_calls, list):
                raise RecordError("wrong_type", f"tool_calls is {type_name(raw_calls)}, expected a list")
            calls += calls_from_value(raw_calls, notes, opts.wrap_raw_arguments)
        if m.get("function_call"):  # the pre-tools OpenAI field
            calls += calls_from_value(m["function_call"], notes, opts.wrap_raw_arguments)
    except RecordError as err:
        raise RecordError(err.reason, f"message {i} ({role}): {err.detail}") from None
    msg: dict[str, Any] = {"role": role, "content": content}
    if calls:
        msg["tool_calls"] = calls
    if role == "tool":
        call_id, ids = m.get("tool_call_id"), m.get("tool_call_ids")
        if not isinstance(call_id, str) and isinstance(ids, list) and len(ids) == 1:
            call_id = ids[0]  # SWE-agent writes a one-element list
        if isinstance(call_id, str) and call_id:
            msg["tool_call_id"] = call_id
    if flag is not None:
        msg["loss"] = flag
    return msg


def from_sharegpt(
    rec: dict, key: str, notes: Counter, opts: ConvertOptions, unread: list[str] | None = None
) -> Converted:
    """ShareGPT ``conversations`` of ``{from, value}``; ``function_call`` turns become assistant tool calls."""
    messages: list[dict] = []
    prefix = f"{key}[]."
    for i, turn in _objects(rec, key, "turn"):
        flag = None
        if len(turn) > 2:  # from/value alone: nothing else to read
            count_unread(turn, TURN_KEYS, prefix, unread)
            if not LOSS_KEYS.isdisjoint(turn):
                try:
                    flag = loss_flag(turn)
                except RecordError as err:
                    raise RecordError(err.reason, f"turn {i}: {err.detail}") from None
        source, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        role = SHAREGPT_ROLES.get(source) if isinstance(source, str) else None
        if role is None:
            raise RecordError("unknown_role", f"turn {i} has from={preview(source)}; known: {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(value, str):
            raise RecordError("wrong_type", f"turn {i} ({source}): value is {type_name(value)}, expected a string")
        if role == "function_call":
            try:
                calls = calls_from_value(value, notes, opts.wrap_raw_arguments)
            except RecordError as err:
                raise RecordError(err.reason, f"turn {i} (function_call): {err.detail}") from None
            msg = {"role": "assistant", "content": "", "tool_calls": calls}
        else:
            msg = {"role": role, "content": value}
        if flag is not None:
            msg["loss"] = flag
        messages.append(msg)
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError("wrong_type", f"'system' is {type_name(system)}, expected a string")
    if system and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})  # a system turn inside the conversation wins
    return messages, normalize_tools(rec.get("tools"), notes)


def _system_and_history(rec: dict) -> list[dict]:
    """The optional ``system`` text and ``history`` [[user, assistant], ...] of Alpaca and ms-swift query/response."""
    messages: list[dict] = []
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError("wrong_type", f"'system' is {type_name(system)}, expected a string")
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    history = maybe_json(rec.get("history"), "history") or []
    if not isinstance(history, list):
        raise RecordError("wrong_type", f"'history' is {type_name(history)}, expected [[user, assistant], ...]")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError("wrong_type", f"history[{i}] is not a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def from_alpaca(rec: dict, answer_key: str, notes: Counter, opts: ConvertOptions) -> Converted:
    """Alpaca: instruction (+ a blank line + input when it is not empty) → answer; ``history`` turns go first."""
    user = _text(rec, "instruction")
    extra = rec.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RecordError("wrong_type", f"'input' is {type_name(extra)}, expected a string")
    if extra and not extra.isspace():
        user = f"{user}\n\n{extra}"
    messages = _system_and_history(rec) if "system" in rec or "history" in rec else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec, answer_key)}]
    return messages, []


def from_self_instruct(rec: dict, notes: Counter, opts: ConvertOptions) -> Converted:
    """Self-Instruct (KULLM): ``instruction`` + ``instances[{input, output}]``; exactly one instance per record."""
    instances = rec.get("instances")
    if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
        count = len(instances) if isinstance(instances, list) else type_name(instances)
        raise RecordError("instances_not_one", f"'instances' holds {count} entries; expected exactly one "
                        "(use --map user=instruction --map user=instances.N.input --map assistant=instances.N.output)")
    inst = instances[0]
    return from_alpaca({"instruction": rec.get("instruction"), "input": inst.get("input"),
                        "output": inst.get("output")}, "output", notes, opts)


def from_pair(rec: dict, user_key: str, assistant_key: str) -> Converted:
    """One user/assistant pair, after the optional ``system`` and ``history`` (ms-swift's query/response form)."""
    messages = _system_and_history(rec) if "system" in rec or "history" in rec else []
    messages += [{"role": "user", "content": _text(rec, user_key)},
                 {"role": "assistant", "content": _text(rec, assistant_key)}]
    return messages, []


def resolve(rec: Any, path: tuple[str, ...]) -> Any:
    """Follow a dotted path through objects and lists; a missing step is a reject that names the path."""
    node = rec
    for step in path:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            raise RecordError("map_field_missing", f"--map path {'.'.join(path)!r} not found (stopped at {step!r})")
    return node


def from_field_map(
    rec: dict, fmap: FieldMap, notes: Counter, opts: ConvertOptions, unread: list[str] | None = None
) -> Converted:
    """``--map``: a nested messages/conversations list, or system/user/assistant texts (repeats: blank-line joined)."""
    for target, convert in (("messages", from_messages), ("conversations", from_sharegpt)):
        if fmap.paths(target):
            inner = {target: resolve(rec, fmap.paths(target)[0])}
            if fmap.paths("tools"):
                inner["tools"] = resolve(rec, fmap.paths("tools")[0])
            return convert(inner, target, notes, opts, unread)
    texts = {}
    for target in ("system", "user", "assistant"):
        pieces = []
        for path in fmap.paths(target):
            value = resolve(rec, path)
            if not isinstance(value, str):
                where = f"--map {target}={'.'.join(path)}"
                raise RecordError("wrong_type", f"{where} is {type_name(value)}, expected a string")
            if value and not value.isspace():  # an empty piece adds nothing, like Alpaca's empty input
                pieces.append(value)
        texts[target] = "\n\n".join(pieces)
    messages = [{"role": "system", "content": texts["system"]}] if texts["system"] else []
    messages += [{"role": "user", "content": texts["user"]}, {"role": "assistant", "content": texts["assistant"]}]
    tools = normalize_tools(resolve(rec, fmap.paths("tools")[0]), notes) if fmap.paths("tools") else []
    return messages, tools


def to_messages(rec: dict, notes: Counter, opts: ConvertOptions, unread: list[str] | None = None) -> Converted:
    """Convert one record by its shape, detected from its keys in the documented precedence.

    ``unread`` receives the record keys (``images``) and message keys (``messages[].name``) the shape did not read,
    one entry per occurrence.
    """
    if opts.field_map is not None:
        count_unread(rec, opts.field_map.roots(), "", unread)
        return from_field_map(rec, opts.field_map, notes, opts, unread)
    if not NON_SFT_KEYS.isdisjoint(rec):
        reject_non_sft(rec)
    if "messages" in rec:
        count_unread(rec, READ_MESSAGES, "", unread)
        return from_messages(rec, "messages", notes, opts, unread)
    if "conversations" in rec:
        count_unread(rec, READ_SHAREGPT, "", unread)
        return from_sharegpt(rec, "conversations", notes, opts, unread)
    if "instruction" in rec:
        if "instances" in rec and "output" not in rec:
            count_unread(rec, READ_SELF_INSTRUCT, "", unread)
            instances = rec["instances"]
            if isinstance(instances, list) and instances and isinstance(instances[0], dict):
                count_unread(instances[0], READ_INSTANCE, "instances[].", unread)
            return from_self_instruct(rec, notes, opts)
        for answer in ("output", "response"):
            if answer in rec:
                count_unread(rec, READ_ALPACA[answer], "", unread)
                return from_alpaca(rec, answer, notes, opts)
    for user_key, assistant_key in PAIRS:
        if user_key in rec and assistant_key in rec:
            count_unread(rec, READ_PAIR[user_key, assistant_key], "", unread)
            return from_pair(rec, user_key, assistant_key)
    if isinstance(rec.get("history"), list):
        count_unread(rec, READ_HISTORY, "", unread)
        return from_messages(rec, "history", notes, opts, unread)
    keys = ", ".join(sorted(map(str, rec))[:12]) or "none"
    raise RecordError("unknown_shape", f"no known shape for keys [{keys}]; pass --map user=PATH --map assistant=PATH")
