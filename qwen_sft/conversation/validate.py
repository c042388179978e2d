"""``validate_conversation``: the rules every conversation meets, checked the same way by convert and tokenize.

    keep = validate_conversation(messages)          # raises RecordError(reason, detail naming the message)

Rules (each broken rule is a reject reason, ``errors.REASONS``):
    no messages .................................. no_messages
    non-string content / a loss flag not a bool .. wrong_type
    a role other than system/user/assistant/tool . unknown_role
    a system message anywhere but first .......... system_not_first
    empty user text .............................. empty_content   (an empty system message is kept)
    empty assistant text without tool calls ...... empty_assistant   (never trained on)
    tool calls on a non-assistant message ........ tool_calls_on_non_assistant
    a tool result with no assistant call before .. tool_without_call   (a tool result may be empty)
    no assistant turn with text or tool calls .... no_supervised_tokens
    every assistant turn has loss false .......... no_supervised_tokens   (and no other turn has loss true)
    grouped tool results with different loss ..... mixed_loss_in_turn  (the template renders them as one turn)

The last rule depends on who reads the flags. Convert (``grouped="agree"``) rejects grouped tool results whose
flags differ, a flag and no flag included: its sources flag messages one by one, and picking one for the group
would train what the data did not ask for. Tokenize reads the project's own ChatML (``grouped="any"``), where a
flag on one grouped tool message is documented to supervise the grouped turn (docs/tokenize.md).
"""

from __future__ import annotations

from typing import Literal

from qwen_sft.conversation.errors import RecordError, type_name
from qwen_sft.conversation.types import ROLES, Message

GroupedFlags = Literal["agree", "any"]


def validate_conversation(
    messages: list[Message], flags: list[bool | None] | None = None, *, grouped: GroupedFlags = "agree"
) -> int:
    """Check the rules above; return the index of the last message worth keeping.

    ``flags`` are the messages' ``loss`` values (taken from the messages when None). The messages after the
    returned index are neither assistant turns nor flagged ``loss: true``: they would cost tokens and teach
    nothing, and convert drops them (``trailing_turns_dropped``).
    """
    if not messages:
        raise RecordError("no_messages", "the conversation is empty")
    if flags is None:
        flags = [m.get("loss") for m in messages]
    last_assistant = -1
    after_call = False  # the previous message was an assistant tool call or a tool result
    for i, m in enumerate(messages):
        role, content, calls = m.get("role"), m.get("content"), m.get("tool_calls")
        if not isinstance(content, str):
            raise RecordError("wrong_type", f"message {i} ({role}): content is {type_name(content)}")
        if flags[i] is not None and not isinstance(flags[i], bool):
            raise RecordError("wrong_type", f"message {i} ({role}): loss is {type_name(flags[i])}, expected true/false")
        if role == "assistant":
            if not calls and (not content or content.isspace()):
                raise RecordError("empty_assistant", f"message {i} (assistant) has empty content")
            last_assistant, after_call = i, bool(calls)
            continue
        if role not in ROLES:
            raise RecordError("unknown_role", f"message {i} has role {role!r}; known roles: {', '.join(ROLES)}")
        if calls:
            raise RecordError("tool_calls_on_non_assistant", f"message {i} ({role}) has tool_calls")
        if role == "tool":
            # Tool output may be legitimately empty (a command that printed nothing); nothing else may.
            if not after_call:
                raise RecordError("tool_without_call", f"message {i} is a tool result with no tool call before it")
            continue
        if role == "system" and i != 0:
            raise RecordError("system_not_first", f"message {i} is a system message; only the first may be")
        # An empty system message is a common placeholder; the template renders it (an empty system turn).
        if role != "system" and (not content or content.isspace()):
            raise RecordError("empty_content", f"message {i} ({role}) has empty content")
        after_call = False
    if last_assistant < 0:
        raise RecordError("no_supervised_tokens", "no assistant message with text or tool calls: nothing to train on")
    if all(f is None for f in flags):
        return last_assistant
    _check_loss_flags(messages, flags, grouped)
    return max(last_assistant, max((i for i, f in enumerate(flags) if f is True), default=-1))


def _check_loss_flags(messages: list[Message], flags: list[bool | None], grouped: GroupedFlags) -> None:
    if True not in flags and all(f is False for m, f in zip(messages, flags) if m["role"] == "assistant"):
        raise RecordError("no_supervised_tokens", "every assistant message has loss false: nothing would be trained")
    if grouped == "any":
        return
    for i in range(1, len(messages)):
        if messages[i]["role"] == messages[i - 1]["role"] == "tool" and flags[i] != flags[i - 1]:
            raise RecordError("mixed_loss_in_turn", f"tool messages {i - 1} and {i} render as one turn but disagree "
                              "on training")
