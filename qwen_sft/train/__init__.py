"""Supervised fine-tuning of Qwen3-MoE models: ``python train.py …`` or ``qwen-sft train CONFIG.yaml``.

Modules: args (typed options), data (memory-mapped, validated tokenized data), collate (packing/padding),
model (loading, quantization, LoRA, parameter groups), trainer (Trainer with throughput, aux loss, artifacts),
run (the pipeline), cli (the ``train`` verb). See docs/train.md.
"""
