"""The project's one internal currency for conversations (STYLE.md §2): what every input shape becomes.

A ChatML record, as convert writes it and tokenize reads it, is ``{"messages": [Message, ...], "tools"?: [Tool]}``.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")


class Function(TypedDict):
    name: str
    arguments: dict[str, Any]  # always a mapping: the template renders each key as a <parameter=...>


class ToolCall(TypedDict):
    type: Literal["function"]
    function: Function


class _Turn(TypedDict):
    role: Role
    content: str  # never null: null is read as "" (then empty_content / empty_assistant decide)


class Message(_Turn, total=False):
    tool_calls: list[ToolCall]  # assistant messages only
    tool_call_id: str  # tool messages only
    loss: bool  # overrides the loss policy for the turn that renders this message


class Tool(TypedDict):
    type: Literal["function"]
    function: dict[str, Any]  # name, description, parameters (with properties), return?
