# Body of sft_qwencoder.sh and sft_qwencoder_with_lora.sh (sourced after _env.sh with RECIPE set): the recipe's
# values, with the seed's positional arguments and environment variables on top (defaults: the recipe's).
if [ $# -lt 3 ]; then
    echo "usage: bash $0 DATA MODEL OUT [extra train.py flags …]" >&2
    exit 2
fi
DATA="$1"; MODEL="$2"; OUT="$3"; shift 3
recipe_defaults GLOBAL_BATCH=global_batch_size MICRO_BATCH=per_device_train_batch_size MAX_LEN=model_max_length \
    DEEPSPEED_CONFIG=deepspeed
# The accumulation (GLOBAL_BATCH / (processes x MICRO_BATCH)) is worked out and checked by train.py, logged as
# "global batch: N processes x micro batch M x accu A = GLOBAL_BATCH".
echo "$RECIPE: model=$MODEL data=$DATA out=$OUT: $WORLD_SIZE processes x micro batch $MICRO_BATCH, global batch $GLOBAL_BATCH"
exec "${TORCHRUN[@]}" train.py --config "$RECIPE" \
    --model_name_or_path "$MODEL" \
    --cache_dir "$HF_HOME/hub" \
    --data_path "$DATA" \
    --output_dir "$OUT" \
    --model_max_length "$MAX_LEN" \
    --global_batch_size "$GLOBAL_BATCH" \
    --per_device_train_batch_size "$MICRO_BATCH" \
    --deepspeed "$DEEPSPEED_CONFIG" \
    "${DRY_RUN_ARGS[@]}" "$@"
