#!/usr/bin/env bash
# QLoRA fine-tuning of Qwen3-Coder-30B-A3B-Instruct (NF4 base, LoRA r 8 on attention and experts): runs the recipe
# configs/train/qlora_qwen3_30b.yaml, its one source, with the arguments and environment below on top.
#
#   bash scripts/qlora_qwen3_30b.sh [DATA] [OUT] [RUN_NAME] [extra train.py flags …]
#   bash scripts/qlora_qwen3_30b.sh ./processed/sft_train.jsonl ../../checkpoints/my_model my_experiment
#   WANDB_PROJECT=my-project BATCH_SIZE=1 GRAD_ACCU=32 bash scripts/qlora_qwen3_30b.sh
#
# Environment: MODEL, WANDB_PROJECT, BATCH_SIZE (per GPU), GRAD_ACCU, MAX_LEN (defaults: the recipe's), plus the
# torchrun variables GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT and DRY_RUN=1 (see scripts/_env.sh).
# Re-running with the same OUT resumes from its last checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
RECIPE=configs/train/qlora_qwen3_30b.yaml
recipe_defaults DATA=data_path OUT=output_dir MODEL=model_name_or_path BATCH_SIZE=per_device_train_batch_size \
    GRAD_ACCU=gradient_accumulation_steps MAX_LEN=model_max_length

DATA="${1:-$DATA}"
OUT="${2:-$OUT}"
RUN_NAME="${3:-qwen3_30b_qlora_$(date +%Y%m%d_%H%M%S)}"
shift $(( $# < 3 ? $# : 3 ))
export WANDB_PROJECT="${WANDB_PROJECT:-qwen3-coder-sft}"
wandb_mode

echo "QLoRA ($RECIPE): model=$MODEL data=$DATA out=$OUT run=$RUN_NAME world=$WORLD_SIZE batch=$BATCH_SIZE x accu=$GRAD_ACCU"
exec "${TORCHRUN[@]}" train.py --config "$RECIPE" \
    --model_name_or_path "$MODEL" \
    --cache_dir "$HF_HOME/hub" \
    --data_path "$DATA" \
    --output_dir "$OUT" \
    --run_name "$RUN_NAME" \
    --model_max_length "$MAX_LEN" \
    --per_device_train_batch_size "$BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCU" \
    "${DRY_RUN_ARGS[@]}" "$@"
