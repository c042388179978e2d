#!/usr/bin/env bash
# LoRA fine-tuning of Qwen3-Coder (configs/lora/adapter_config.json: r 8 on attention and the fused experts)
# with DeepSpeed ZeRO-3 (CPU offload), global batch 1024.
#
#   bash scripts/sft_qwencoder_with_lora.sh DATA MODEL OUT [extra train.py flags …]
#   bash scripts/sft_qwencoder_with_lora.sh ./processed/sft_train.jsonl Qwen/Qwen3-Coder-30B-A3B-Instruct ../../checkpoints/lora_model
#
# Same environment as scripts/sft_qwencoder.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
MODE_ARGS=(--use_peft true --peft_config_path configs/lora/adapter_config.json)
source "$(dirname "${BASH_SOURCE[0]}")/_sft_common.sh"
