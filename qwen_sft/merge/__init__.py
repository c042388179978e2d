"""Merge a LoRA / QLoRA adapter (attention and MoE experts) into a bf16 checkpoint, shard by shard, and verify it.

    python merge_adapter.py --base_model_path BASE --adapter_path ADAPTER --output_path OUT
    qwen-sft merge --base_model_path BASE --adapter_path ADAPTER --output_path OUT --all_checkpoints

Parts: ``adapter`` reads and validates a peft adapter directory, ``plan`` maps every LoRA pair onto
the per-expert tensors of the base checkpoint (with peft's own ΔW math), ``stream`` rewrites the base
one safetensors shard at a time, ``assets`` copies config / generation config / tokenizer, ``verify``
compares logits of the merged model with base + adapter unmerged, and ``cli`` ties them together.
"""

from qwen_sft.merge.adapter import MergeError

__all__ = ["MergeError"]
