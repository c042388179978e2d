"""Records that are not SFT data, rejected by name before any shape reads them.

A preference pair trained as SFT teaches the rejected answer as if it were good; a KTO row labelled undesirable
would be trained as desirable. Neither has a faithful SFT reading, so both are rejects whose reason names the
format. ``--map`` bypasses this check: mapping ``assistant=chosen`` is an explicit choice to train the chosen side.
"""

from __future__ import annotations

from qwen_sft.conversation.errors import RecordError

_CHOSEN_HINT = ("to train on the chosen answers only, convert with --map user=prompt --map assistant=chosen "
                "(or --map messages=chosen when chosen is a message list)")
NON_SFT_KEYS = frozenset(("chosen", "rejected_response", "kto_tag", "label"))  # a record without any is not checked


def reject_non_sft(rec: dict) -> None:
    """Raise ``preference_data`` / ``kto_data`` for DPO/ORPO pairs and KTO rows; return for anything else."""
    if "chosen" in rec and "rejected" in rec:
        form = "prompt + chosen + rejected" if "prompt" in rec else "chosen + rejected"
        raise RecordError("preference_data", f"a preference pair ({form}, DPO/ORPO data), not SFT data; {_CHOSEN_HINT}")
    if "rejected_response" in rec:
        raise RecordError("preference_data", "a preference pair (ms-swift rejected_response, DPO/ORPO data), not SFT "
                        "data; drop rejected_response to train on the messages as they are")
    if "kto_tag" in rec:
        raise RecordError("kto_data", f"a KTO row (LLaMA-Factory kto_tag={rec['kto_tag']!r}), not SFT data: an "
                        "undesirable answer would be trained as a good one")
    if isinstance(rec.get("label"), bool):
        raise RecordError("kto_data", f"a KTO row (label={rec['label']!r}, TRL/ms-swift unpaired preference), not SFT "
                        "data: an undesirable answer would be trained as a good one")
