#!/usr/bin/env bash
# LoRA fine-tuning of Qwen3-Coder (configs/lora: r 8 on attention and every expert, experts through the expert
# engine) with DeepSpeed ZeRO-2 (configs/zero2.json), global batch 1024: runs the recipe
# configs/train/lora_zero2_qwen3_30b.yaml, its one source, with the arguments and environment below on top.
#
#   bash scripts/sft_qwencoder_with_lora.sh DATA MODEL OUT [extra train.py flags …]
#   bash scripts/sft_qwencoder_with_lora.sh ./processed/sft_train.jsonl Qwen/Qwen3-Coder-30B-A3B-Instruct ../../checkpoints/lora_model
#
# ZeRO-2, not ZeRO-3: see the recipe. Same environment as scripts/sft_qwencoder.sh (DEEPSPEED_CONFIG=… to override).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
RECIPE=configs/train/lora_zero2_qwen3_30b.yaml
source "$(dirname "${BASH_SOURCE[0]}")/_sft_common.sh"
