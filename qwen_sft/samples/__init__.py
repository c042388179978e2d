"""The token-sample contract: what tokenize writes and training reads, defined here and nowhere else.

    from qwen_sft.samples import IGNORE_INDEX, INPUT_IDS, LABEL
    from qwen_sft.samples.files import open_writer, iter_samples      # one writer, one reader
    from qwen_sft.samples.length import cut_to_length                 # the one length rule
    from qwen_sft.samples.dataset import TokenizedDataset, to_arrow   # the memory-mapped dataset

A sample is two equally long int32 sequences: ``input_ids`` and ``label`` (``IGNORE_INDEX`` = -100 where a
token is not supervised, else the input id itself). On disk (``files.py``): JSONL lines
``{"input_ids": [...], "label": [...]}``, or Parquet / Arrow IPC with ``list<int32>`` columns of those names
(``labels`` is read as an alias). In a training batch the key is ``labels`` (what transformers' models and
collators take): ``BATCH_LABELS``. Over-long samples follow one rule (``length.py``), applied by tokenize
(``--overlength truncate``) and by training (``truncate_source``) alike.

This module holds only names, so that the loss and the collator can import them without pyarrow.
"""

from __future__ import annotations

IGNORE_INDEX = -100  # label of a token that is not trained on (PyTorch's cross_entropy default ignore_index)
INPUT_IDS = "input_ids"
LABEL = "label"  # the column / JSON key on disk (the seed's format)
BATCH_LABELS = "labels"  # the key of a training example and batch (transformers' name)
LABEL_COLUMNS = (LABEL, BATCH_LABELS)  # accepted on read, in this order of preference

__all__ = ["BATCH_LABELS", "IGNORE_INDEX", "INPUT_IDS", "LABEL", "LABEL_COLUMNS"]
