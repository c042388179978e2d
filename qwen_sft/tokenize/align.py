"""Turns ↔ messages: which messages each rendered turn holds (the template groups tool results)."""

from __future__ import annotations

from qwen_sft.conversation.errors import RecordError
from qwen_sft.conversation.types import Message
from qwen_sft.tokenize.turns import Turn


def align_turns(turns: list[Turn], messages: list[Message]) -> list[list[int]]:
    """For each turn, the indices of the messages it renders ([] for a system block the template adds).

    Consecutive tool messages share one user turn, as the template groups them.
    """
    groups: list[tuple[str, list[int]]] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool" and groups and groups[-1][0] == "tool":
            groups[-1][1].append(i)
        else:
            groups.append((m["role"], [i]))
    owners: list[list[int]] = []
    if turns and turns[0].role == "system" and messages[0]["role"] != "system":
        owners.append([])  # the template's own system block (tools listing)
    if len(turns) - len(owners) != len(groups):
        raise RecordError("template_layout", f"the template rendered {len(turns)} turns for {len(groups)} message groups")
    for turn, (role, idx) in zip(turns[len(owners) :], groups):
        if turn.role != ("user" if role == "tool" else role):
            raise RecordError("template_layout", f"turn role {turn.role!r} where message role {role!r} was expected")
        owners.append(idx)
    return owners
