"""Per-message and per-part loss controls of the formats users come from → the internal ``loss`` flag.

Each control is honoured or the record is rejected with a reason; none is ignored (docs/convert.md, "Loss controls"):

    loss: true|false              ms-swift, qwen-sft's own ChatML
    train: true|false             Axolotl (messages, ShareGPT turns, content parts)
    weight: 0|1                   Axolotl / FastChat ShareGPT
    loss_weight: 0|1              LLaMA-Factory (v1 messages)
    metadata: {"masked": true}    functionary: the turn is shown, never trained on
    train_detail: [spans]         Axolotl character spans: rejected (the mask works per turn, not per character)

A weight other than 0 or 1 is rejected: a weighted loss would need weights carried through tokenize and the
trainer, and silently rounding 0.5 to "trained" would train what the user half-wanted.
"""

from __future__ import annotations

from typing import Any

from qwen_sft.conversation.errors import RecordError, preview, type_name

# Keys of a message (or content part) that this module reads; the unread-key count leaves them out.
LOSS_KEYS = frozenset(("loss", "train", "weight", "loss_weight", "metadata", "train_detail"))


def _weight(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return value == 1
    raise RecordError("unsupported_loss_weight", f"{key}={preview(value)}: only 0 (not trained) and 1 (trained) are "
                    "supported; a weighted loss is not implemented, so the record is not trained with a guessed weight")


def loss_flag(m: dict) -> bool | None:
    """The explicit loss flag of one message or content part, None when it sets none.

    Two controls that disagree (``train: true`` with ``loss_weight: 0``) are a reject, never a silent pick.
    """
    found: dict[str, bool] = {}
    if m.get("loss") is not None:
        if not isinstance(m["loss"], bool):
            raise RecordError("wrong_type", f"loss is {type_name(m['loss'])}, expected true/false")
        found["loss"] = m["loss"]
    if m.get("train") is not None:
        if not isinstance(m["train"], bool):
            raise RecordError("wrong_type", f"train is {type_name(m['train'])}, expected true/false")
        found["train"] = m["train"]
    for key in ("weight", "loss_weight"):
        if m.get(key) is not None:
            found[key] = _weight(m[key], key)
    meta = m.get("metadata")
    if isinstance(meta, dict) and meta.get("masked") is not None:
        if not isinstance(meta["masked"], bool):
            raise RecordError("wrong_type", f"metadata.masked is {type_name(meta['masked'])}, expected true/false")
        found["metadata.masked"] = not meta["masked"]
    if m.get("train_detail"):
        raise RecordError("train_detail_unsupported", "train_detail (character spans) is not supported: the loss mask "
                        "covers whole turns; split the message into turns or use train: true/false on it")
    if len(set(found.values())) > 1:
        said = ", ".join(f"{k}={'trained' if v else 'not trained'}" for k, v in found.items())
        raise RecordError("conflicting_loss_flags", f"loss controls disagree: {said}")
    return next(iter(found.values()), None)


def combine_part_flags(message_flag: bool | None, part_flags: list[bool | None]) -> bool | None:
    """One flag for a message whose content parts carry their own; parts without one follow the message.

    Parts that disagree would need a mask inside one turn, which the tokenize stage does not have: a reject.
    """
    effective = {message_flag if f is None else f for f in part_flags} or {message_flag}
    if len(effective) > 1:
        said = ", ".join("policy" if f is None else ("trained" if f else "not trained") for f in part_flags)
        raise RecordError("mixed_part_loss", f"content parts disagree on training ({said}); the loss mask covers "
                        "whole turns: split the message or give every part the same train flag")
    return effective.pop()
