#!/usr/bin/env bash
# LoRA fine-tuning of Qwen3-Coder (configs/lora: r 8 on attention and every expert, experts through the
# expert engine) with DeepSpeed ZeRO-2 (configs/zero2.json), global batch 1024.
#
#   bash scripts/sft_qwencoder_with_lora.sh DATA MODEL OUT [extra train.py flags …]
#   bash scripts/sft_qwencoder_with_lora.sh ./processed/sft_train.jsonl Qwen/Qwen3-Coder-30B-A3B-Instruct ../../checkpoints/lora_model
#
# ZeRO-2, not ZeRO-3: the expert engine needs each MoE layer's whole expert weights on its GPU, so every
# GPU holds the full bf16 base (57 GiB for 30B-A3B; an 80 GB GPU or more); ZeRO-2 shards the LoRA
# gradients and optimizer state. Same environment as scripts/sft_qwencoder.sh (DEEPSPEED_CONFIG=… to override).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
MODE_ARGS=(--use_peft true --peft_config_path configs/lora)
DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG:-configs/zero2.json}"
source "$(dirname "${BASH_SOURCE[0]}")/_sft_common.sh"
