"""Validate a converted conversation once, whatever shape it came from, and build the output record.

Rules (each broken rule is a reject reason counted in the summary):
    unknown role / non-string content ............ wrong_type, unknown_role
    a system message anywhere but first .......... system_not_first
    empty user text .............................. empty_content   (an empty system message is kept)
    empty assistant text without tool calls ...... empty_assistant   (never trained on)
    tool calls on a non-assistant message ........ tool_calls_on_non_assistant
    a tool result with no assistant call before .. tool_without_call
    no assistant turn with text or tool calls .... no_assistant_turn
    every assistant turn has loss false .......... nothing_supervised   (and no other turn has loss true)
    grouped tool results with different loss ..... mixed_loss_in_turn  (the template renders them as one turn)
Turns after the last assistant turn are dropped (counted as trailing_turns_dropped): the loss covers only
assistant turns, so a trailing user or tool message would cost tokens and teach nothing — unless the data
asks for it to be trained (``loss: true``), in which case the turns up to it are kept.
"""

from __future__ import annotations

from collections import Counter

from qwen_sft.data.messages import ROLES, BadRecord, type_name


def validate(messages: list[dict], notes: Counter) -> list[dict]:
    """Check the rules above; returns the messages with trailing non-assistant turns removed."""
    if not messages:
        raise BadRecord("no_messages", "the conversation is empty")
    last_assistant = -1
    after_call = False  # the previous message was an assistant tool call or a tool result
    flagged = False  # some message carries a loss flag
    for i, m in enumerate(messages):
        role, content, calls = m.get("role"), m.get("content"), m.get("tool_calls")
        if "loss" in m:
            flagged = True
        if not isinstance(content, str):
            raise BadRecord("wrong_type", f"message {i} ({role}): content is {type_name(content)}")
        if role == "assistant":
            if not calls and (not content or content.isspace()):
                raise BadRecord("empty_assistant", f"message {i} (assistant) has empty content")
            last_assistant, after_call = i, bool(calls)
            continue
        if role not in ROLES:
            raise BadRecord("unknown_role", f"message {i} has role {role!r}")
        if calls:
            raise BadRecord("tool_calls_on_non_assistant", f"message {i} ({role}) has tool_calls")
        if role == "tool":
            # Tool output may be legitimately empty (a command that printed nothing); nothing else may.
            if not after_call:
                raise BadRecord("tool_without_call", f"message {i} is a tool result with no tool call before it")
            continue
        if role == "system" and i != 0:
            raise BadRecord("system_not_first", f"message {i} is a system message; only the first may be")
        # An empty system message is a common placeholder; the template renders it (an empty system turn).
        if role != "system" and (not content or content.isspace()):
            raise BadRecord("empty_content", f"message {i} ({role}) has empty content")
        after_call = False
    if last_assistant < 0:
        raise BadRecord("no_assistant_turn", "no assistant message with text or tool calls")
    keep = last_assistant
    if flagged:
        _check_loss_flags(messages)
        keep = max(keep, max((i for i, m in enumerate(messages) if m.get("loss") is True), default=-1))
    if keep < len(messages) - 1:
        notes["trailing_turns_dropped"] += len(messages) - 1 - keep
        messages = messages[: keep + 1]
    return messages


def _check_loss_flags(messages: list[dict]) -> None:
    flags = [m.get("loss") for m in messages]
    if True not in flags and all(f is False for m, f in zip(messages, flags) if m["role"] == "assistant"):
        raise BadRecord("nothing_supervised", "every assistant message has loss false: nothing would be trained")
    for i in range(1, len(messages)):
        if messages[i]["role"] == messages[i - 1]["role"] == "tool" and flags[i] != flags[i - 1]:
            raise BadRecord("mixed_loss_in_turn", f"tool messages {i - 1} and {i} render as one turn but disagree "
                            "on training")


def build_record(messages: list[dict], tools: list[dict], system: str | None, notes: Counter) -> dict:
    """``{"messages": [...]}`` plus ``"tools"`` when there are any; ``system`` goes only where none is."""
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
        notes["system_added"] += 1
    record: dict = {"messages": validate(messages, notes)}
    if tools:
        record["tools"] = tools
    return record
