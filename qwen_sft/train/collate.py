"""Batching: padding-free packing (default) or padding to the longest sample.

    python -c "from qwen_sft.train.collate import make_collator; \
print(make_collator(True, 151643)([{'input_ids': [1, 2], 'labels': [-100, 2]}, {'input_ids': [3], 'labels': [3]}]))"

Packing is transformers' ``DataCollatorWithFlattening``: a micro-batch of N samples becomes one row of
their concatenation, ``position_ids`` restart at 0 for every sample (attention and RoPE see each sample
alone; no attention mask is needed), and each sample's first label becomes -100 so that no token predicts
the next sample. Position 0 of a sample is never a prediction target unpacked either, so the packed loss
and gradients equal the unpacked ones (tests/test_train_collate.py). It requires ``use_cache=False``.
"""

from __future__ import annotations

from collections.abc import Callable

from qwen_sft.samples import IGNORE_INDEX as IGNORE


def make_collator(packing: bool, pad_id: int) -> Callable[[list[dict]], dict]:
    from transformers import DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)
    return PaddingCollator(pad_id)


class PaddingCollator:
    """Right-pad ``input_ids`` with the pad id and ``labels`` with -100; ``attention_mask`` marks real tokens."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
