#!/usr/bin/env bash
# QLoRA fine-tuning of Qwen3-Coder-30B-A3B-Instruct (NF4 base, LoRA r 8 on attention and experts).
#
#   bash scripts/qlora_qwen3_30b.sh [DATA] [OUT] [RUN_NAME] [extra train.py flags …]
#   bash scripts/qlora_qwen3_30b.sh ./processed/sft_train.jsonl ../../checkpoints/my_model my_experiment
#   WANDB_PROJECT=my-project BATCH_SIZE=1 GRAD_ACCU=32 bash scripts/qlora_qwen3_30b.sh
#
# Environment: MODEL, WANDB_PROJECT, BATCH_SIZE (per GPU), GRAD_ACCU, MAX_LEN, plus the torchrun
# variables GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT and DRY_RUN=1 (see scripts/_env.sh).
# Re-running with the same OUT resumes from its last checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

DATA="${1:-./processed/sft_train.jsonl}"
OUT="${2:-../../checkpoints/qwen3_30b_qlora}"
RUN_NAME="${3:-qwen3_30b_qlora_$(date +%Y%m%d_%H%M%S)}"
shift $(( $# < 3 ? $# : 3 ))
MODEL="${MODEL:-Qwen/Qwen3-Coder-30B-A3B-Instruct}"
BATCH_SIZE="${BATCH_SIZE:-1}"
GRAD_ACCU="${GRAD_ACCU:-16}"
MAX_LEN="${MAX_LEN:-2048}"
export WANDB_PROJECT="${WANDB_PROJECT:-qwen3-coder-sft}"
wandb_mode

echo "QLoRA: model=$MODEL data=$DATA out=$OUT run=$RUN_NAME world=$WORLD_SIZE batch=$BATCH_SIZE x accu=$GRAD_ACCU"
exec "${TORCHRUN[@]}" train.py \
    --model_name_or_path "$MODEL" \
    --cache_dir "$HF_HOME/hub" \
    --data_path "$DATA" \
    --output_dir "$OUT" \
    --run_name "$RUN_NAME" \
    --use_qlora true \
    --bnb_4bit_quant_type nf4 \
    --bnb_4bit_compute_dtype bfloat16 \
    --peft_config_path configs/lora \
    --model_max_length "$MAX_LEN" \
    --per_device_train_batch_size "$BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCU" \
    --learning_rate 1e-4 \
    --num_train_epochs 3 \
    --warmup_steps 10 \
    --lr_scheduler_type cosine \
    --save_strategy steps \
    --save_steps 50 \
    --save_total_limit 3 \
    --logging_steps 1 \
    --optim paged_adamw_8bit \
    --lora_dtype bfloat16 \
    --loss_chunk_tokens 256 \
    --gradient_checkpointing true \
    --bf16 true \
    --report_to wandb,tensorboard \
    --resume_from_checkpoint auto \
    "${DRY_RUN_ARGS[@]}" "$@"
