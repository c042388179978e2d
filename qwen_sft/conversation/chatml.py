"""The ChatML record both stages exchange: ``build_record`` writes it (convert), ``normalize_record`` reads it
(tokenize). ``{"messages": [Message, ...], "tools"?: [Tool, ...]}``, one per line.

    record = build_record(messages, tools, system=None, notes=Counter())     # convert, after a shape reader
    messages, tools = normalize_record(record, special_tokens)               # tokenize, before the template
    validate_conversation(messages, loss_flags(record), grouped="any")       # tokenize: the same rules

Both go through ``validate_conversation`` and ``normalize_tool_call``, so a record gets the same decision and
the same reason from either stage.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from qwen_sft.conversation.errors import RecordError, type_name
from qwen_sft.conversation.tools import maybe_json, normalize_tool_call, tool_list
from qwen_sft.conversation.types import Message
from qwen_sft.conversation.validate import validate_conversation


def build_record(messages: list[Message], tools: list[dict], system: str | None, notes: Counter) -> dict:
    """``{"messages": [...]}`` plus ``"tools"`` when there are any; ``system`` goes only where none is.

    Turns after the last one that trains are dropped and counted (``trailing_turns_dropped``): the loss covers
    assistant turns, so a trailing user or tool message costs tokens and teaches nothing — unless the data asks
    for it to be trained (``loss: true``), in which case the turns up to it are kept.
    """
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
        notes["system_added"] += 1
    keep = validate_conversation(messages)
    if keep < len(messages) - 1:
        notes["trailing_turns_dropped"] += len(messages) - 1 - keep
        messages = messages[: keep + 1]
    record: dict = {"messages": messages}
    if tools:
        record["tools"] = tools
    return record


def normalize_record(record: Any, special_tokens: tuple[str, ...]) -> tuple[list[Message], list[dict] | None]:
    """Read one ChatML record; return (messages, tools) exactly as they are handed to the template.

    Only the keys the template reads are kept (role, content, tool_calls, tool_call_id), so extra keys of the
    source never leak into the prompt; ``loss`` flags are read separately by ``loss_flags``. ``content: null``
    is read as ``""`` (the rules then decide: fine on a tool call or a tool result). The conversation rules are
    ``validate_conversation``'s, checked after this by the caller; here only what the text scan needs.
    """
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"record is {type_name(record)}, expected an object")
    raw = record.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RecordError("no_messages", "record has no non-empty 'messages' list")
    messages: list[Message] = []
    notes: Counter = Counter()  # tokenize never wraps arguments: nothing is counted
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise RecordError("wrong_type", f"message {i} is {type_name(msg)}, expected an object")
        role, content = msg.get("role"), msg.get("content")
        out: dict[str, Any] = {"role": role, "content": "" if content is None else content}
        calls = maybe_json(msg.get("tool_calls"), "tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise RecordError("wrong_type", f"message {i} ({role}): tool_calls is {type_name(calls)}, expected "
                                  "a list")
            try:
                out["tool_calls"] = [normalize_tool_call(c, notes, None) for c in calls]
            except RecordError as err:
                raise RecordError(err.reason, f"message {i} ({role}): {err.detail}") from None
        if role == "tool" and isinstance(msg.get("tool_call_id"), str):
            out["tool_call_id"] = msg["tool_call_id"]
        messages.append(out)  # type: ignore[arg-type]  # role and content are checked by validate_conversation
    tools = tool_list(record.get("tools")) or None
    _check_special_tokens(messages, tools, special_tokens)
    return messages, tools


def _check_special_tokens(messages: list[Message], tools: list[dict] | None, special_tokens: tuple[str, ...]) -> None:
    # A literal "<|im_end|>" in user text would become the control token: it would end the turn early for the
    # model and break the turn layout the labels rely on. Such records are rejected, not escaped, so every
    # written sample still equals the template rendered and tokenized in one pass.
    if not special_tokens:
        return
    texts = [m["content"] for m in messages if isinstance(m["content"], str)]
    if tools or any("tool_calls" in m for m in messages):
        texts.append(json.dumps([[m.get("tool_calls") for m in messages], tools], ensure_ascii=False))
    prefixes = {token[:2] for token in special_tokens}  # "<|" for Qwen: a cheap filter before the exact scan
    for text in texts:
        if any(p in text for p in prefixes):
            for token in special_tokens:
                if token in text:
                    raise RecordError("special_token_in_content", f"the text contains the control token {token!r}")


def loss_flags(record: dict) -> list[bool | None]:
    """The per-message ``loss`` override of each message (None where the policy decides)."""
    return [m.get("loss") for m in record["messages"]]
