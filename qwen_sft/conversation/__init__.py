"""The conversation contract: what convert writes, what tokenize reads, and the rules both check.

    from qwen_sft.conversation import RecordError, validate_conversation, normalize_tool_call

One home for each piece, used by both stages (``qwen_sft.data`` and ``qwen_sft.tokenize`` define none of their
own; ``tests/test_conversation_contract.py`` guards that):

    types.py      the message type (``Message``, ``ToolCall``, ``Tool``) and the roles (``ROLES``)
    errors.py     ``RecordError`` and ``REASONS``, the one set of reject reason names (with ``RENAMED``)
    validate.py   ``validate_conversation()``: the rules every conversation meets
    tools.py      the tool-call normaliser (``normalize_tool_call``, ``calls_from_value``) and tool lists
    chatml.py     the ChatML record: ``build_record`` (convert writes it), ``normalize_record`` (tokenize reads it)
"""

from qwen_sft.conversation.chatml import build_record, loss_flags, normalize_record
from qwen_sft.conversation.errors import REASONS, RENAMED, RecordError, preview, type_name
from qwen_sft.conversation.tools import calls_from_value, maybe_json, normalize_tool_call, normalize_tools, tool_list
from qwen_sft.conversation.types import ROLES, Message, Role, Tool, ToolCall
from qwen_sft.conversation.validate import validate_conversation

__all__ = [
    "REASONS", "RENAMED", "ROLES", "Message", "RecordError", "Role", "Tool", "ToolCall", "build_record",
    "calls_from_value", "loss_flags", "maybe_json", "normalize_record", "normalize_tool_call", "normalize_tools",
    "preview", "tool_list", "type_name", "validate_conversation",
]
