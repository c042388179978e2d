"""The one record error of convert and tokenize, and the one set of reason names it carries.

    from qwen_sft.conversation import RecordError
    raise RecordError("unknown_role", f"message {i} has role {preview(role)}")

A reason is a stable key: it is counted in both stages' summaries and written into users' rejects files, so the
same problem has the same name whichever stage finds it, and the counts of the two stages can be added.
``REASONS`` lists every name with what it means; ``tests/test_conversation_contract.py`` checks that every
``RecordError`` raised in the package uses a listed name and that docs/convert.md or docs/tokenize.md names it.
"""

from __future__ import annotations

from typing import Any

REASONS: dict[str, str] = {
    # reading a file (convert; tokenize reads JSON Lines only)
    "invalid_json": "the line is not JSON",
    "invalid_utf8": "the bytes are not UTF-8",
    "not_an_object": "a record that is not a JSON object (null, a number, a list)",
    "csv_extra_fields": "a CSV row with more fields than its header",
    "unreadable_file": "a truncated .gz or a corrupt Parquet file: the break is one reject",
    # the record's shape (convert)
    "unknown_shape": "no known record shape for its keys (use --map)",
    "instances_not_one": "Self-Instruct instances holding more or fewer than one entry",
    "map_field_missing": "a --map path that the record does not have",
    "preference_data": "a DPO/ORPO preference pair, not SFT data",
    "kto_data": "a KTO row, not SFT data",
    "invalid_json_field": "a field stored as a JSON string that is not JSON (messages, tools, a tool call)",
    "wrong_type": "a value of the wrong type: content, a message, a loss flag, tools, a field a shape reads",
    "bad_content_part": "a typed content part that is not an object, or a text part without text",
    "unsupported_content_part": "a typed content part of a type that has no text form (an image)",
    "reasoning_part": "a reasoning content part under --reasoning reject",
    # loss controls (convert)
    "unsupported_loss_weight": "a loss weight other than 0 or 1",
    "conflicting_loss_flags": "two loss controls on one message that disagree",
    "train_detail_unsupported": "Axolotl's character-span train_detail",
    "mixed_part_loss": "content parts of one message that disagree on training",
    # the conversation (both stages: validate_conversation)
    "no_messages": "no messages, or an empty list",
    "unknown_role": "a role other than system, user, assistant, tool",
    "system_not_first": "a system message anywhere but first",
    "empty_content": "an empty (or null) user message",
    "empty_assistant": "an empty (or null) assistant message without tool calls",
    "tool_calls_on_non_assistant": "tool calls on a message that is not the assistant's",
    "tool_without_call": "a tool result with no assistant tool call before it",
    "mixed_loss_in_turn": "messages rendered as one turn (grouped tool results) that disagree on training",
    "no_supervised_tokens": "nothing to train on: no assistant turn, every one loss false, or the policy's choice",
    # tools and tool calls (both stages: tools.py)
    "bad_tool": "a tool that is not an object, has no function name, or a bad description/parameters",
    "bad_tool_call": "a tool call that is not an object or has no function name",
    "arguments_not_object": "tool-call arguments that are not a JSON object (nor a JSON string holding one)",
    "nested_too_deep": "JSON nested deeper than can be written or parsed",
    # writing (convert)
    "integer_out_of_range": "an integer past 64 bits, which orjson (tokenize, training) cannot read",
    "unserializable": "a value orjson cannot write (a lone surrogate)",
    # rendering and tokenizing (tokenize)
    "special_token_in_content": "a literal special token (<|im_end|>) in a text",
    "template_error": "the chat template failed on the conversation",
    "template_layout": "the rendered text is not a clean sequence of turns matching the messages",
    "tokenizer_bytes": "the tokens do not cover the rendered text's bytes",
    # anything else that broke on one record (both stages)
    "unexpected_error": "an exception while reading one record: the record's reject, never the end of the run",
}

# Names used before the contract had one home; a rejects file written then may hold them.
RENAMED: dict[str, str] = {
    "bad_role": "unknown_role",  # tokenize
    "bad_content": "wrong_type",  # tokenize
    "bad_message": "wrong_type",  # tokenize
    "bad_loss_flag": "wrong_type",  # tokenize
    "bad_tool_arguments": "arguments_not_object",  # tokenize (nesting too deep to parse: nested_too_deep)
    "bad_tools": "invalid_json_field / wrong_type / bad_tool",  # tokenize
    "no_assistant_turn": "no_supervised_tokens",  # convert
    "nothing_supervised": "no_supervised_tokens",  # convert
}


class RecordError(ValueError):
    """A record that cannot become a training conversation. ``reason`` is one of ``REASONS``."""

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
