# Body of sft_qwencoder.sh and sft_qwencoder_with_lora.sh (sourced after _env.sh with MODE_ARGS set).
if [ $# -lt 3 ]; then
    echo "usage: bash $0 DATA MODEL OUT [extra train.py flags …]" >&2
    exit 2
fi
DATA="$1"; MODEL="$2"; OUT="$3"; shift 3
GLOBAL_BATCH="${GLOBAL_BATCH:-1024}"
MICRO_BATCH="${MICRO_BATCH:-4}"
MAX_LEN="${MAX_LEN:-1280}"
DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG:-configs/default_offload_opt_param.json}"
PER_STEP=$((WORLD_SIZE * MICRO_BATCH))
if [ $((GLOBAL_BATCH % PER_STEP)) -ne 0 ]; then
    echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of WORLD_SIZE ($WORLD_SIZE) x MICRO_BATCH ($MICRO_BATCH)" >&2
    exit 2
fi
GRAD_ACCU=$((GLOBAL_BATCH / PER_STEP))
echo "model=$MODEL data=$DATA out=$OUT: $WORLD_SIZE processes x micro batch $MICRO_BATCH x accu $GRAD_ACCU = $GLOBAL_BATCH"
exec "${TORCHRUN[@]}" train.py \
    --model_name_or_path "$MODEL" \
    --cache_dir "$HF_HOME/hub" \
    --data_path "$DATA" \
    --output_dir "$OUT" \
    "${MODE_ARGS[@]}" \
    --model_max_length "$MAX_LEN" \
    --num_train_epochs 3 \
    --per_device_train_batch_size "$MICRO_BATCH" \
    --gradient_accumulation_steps "$GRAD_ACCU" \
    --eval_strategy no \
    --save_strategy steps \
    --save_steps 100 \
    --save_total_limit 10 \
    --learning_rate 5e-5 \
    --weight_decay 0.0 \
    --warmup_steps 100 \
    --logging_steps 1 \
    --lr_scheduler_type cosine \
    --report_to tensorboard \
    --bf16 true \
    --gradient_checkpointing true \
    --deepspeed "$DEEPSPEED_CONFIG" \
    "${DRY_RUN_ARGS[@]}" "$@"
