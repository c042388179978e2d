#!/usr/bin/env bash
# Full fine-tuning of Qwen3-Coder with DeepSpeed ZeRO-3 (CPU offload), global batch 1024: runs the recipe
# configs/train/full_zero3_qwen3_30b.yaml, its one source, with the arguments and environment below on top.
#
#   bash scripts/sft_qwencoder.sh DATA MODEL OUT [extra train.py flags …]
#   bash scripts/sft_qwencoder.sh ./processed/sft_train.jsonl Qwen/Qwen3-Coder-30B-A3B-Instruct ../../checkpoints/full_model
#
# Global batch 1024 = GPUS_PER_NODE x NNODES x MICRO_BATCH (4) x gradient accumulation. Environment (defaults: the
# recipe's): GLOBAL_BATCH, MICRO_BATCH, MAX_LEN, DEEPSPEED_CONFIG, the torchrun variables and DRY_RUN=1 (_env.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
RECIPE=configs/train/full_zero3_qwen3_30b.yaml
source "$(dirname "${BASH_SOURCE[0]}")/_sft_common.sh"
