"""Cross-stage: an adapter trained through the expert engine merges with ``qwen-sft merge`` into a checkpoint
whose logits equal the engine model's — the expert factors really reach the merged weights.

    python -m pytest -q tests/test_moe_merge.py      # slow tier
"""

from __future__ import annotations

import pytest
import torch

from qwen_sft.model.tiny import TinySpec, make_tiny_model
from qwen_sft.model.tiny_adapter import random_adapter

IDS = torch.randint(0, 5000, (1, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow  # two model writes and a merge with its own verification: ~30 s on 2 cores
def test_engine_adapter_merges_into_the_same_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from qwen_sft.merge.cli import main as merge_main

    base = make_tiny_model(tmp_path / "base", TinySpec(layers=2), dtype="float32")
    model, adapter = random_adapter(base, tmp_path / "adapter")  # stand-in for training: non-zero B everywhere
    with torch.no_grad():
        ours = model(input_ids=IDS, use_cache=False).logits

    out = tmp_path / "merged"
    assert merge_main(["--base_model_path", str(base), "--adapter_path", str(adapter), "--output_path", str(out),
                       "--dtype", "float32", "--verify_device", "cpu"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = merged(input_ids=IDS, use_cache=False).logits
        unchanged = base_model(input_ids=IDS, use_cache=False).logits
    assert (ours - unchanged).abs().max() > 1e-2  # the adapter matters ...
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)  # ... and the merge carries all of it
