# Shared by the training scripts (sourced, not run): caches in the project's .cache/, the torchrun
# environment for one or many GPUs and nodes, and a wandb setup that never waits for an interactive login.
#
#   GPUS_PER_NODE  processes per node (default: the number of visible GPUs, 1 without any)
#   NNODES NODE_RANK MASTER_ADDR MASTER_PORT   multi-node rendezvous (defaults: 1 node, localhost:6105)
#   DRY_RUN=1      validate config and data, print the plan, load no model

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PYTHON="${PYTHON:-python}"
[ -x "$ROOT/.venv/bin/python" ] && [ "$PYTHON" = python ] && PYTHON="$ROOT/.venv/bin/python"

# Caches inside the project: model downloads and compiled kernels do not fill a small home directory.
export HF_HOME="${HF_HOME:-$ROOT/.cache/huggingface}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$ROOT/.cache/triton}"
export WANDB_DIR="${WANDB_DIR:-$ROOT/.cache}"
export WANDB_CACHE_DIR="${WANDB_CACHE_DIR:-$ROOT/.cache/wandb}"
export QWEN_SFT_CACHE="${QWEN_SFT_CACHE:-$ROOT/.cache/qwen_sft}"
mkdir -p "$HF_HOME" "$WANDB_CACHE_DIR"
export TOKENIZERS_PARALLELISM=false

if [ -z "${GPUS_PER_NODE:-}" ]; then
    GPUS_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    [ "$GPUS_PER_NODE" -gt 0 ] 2>/dev/null || GPUS_PER_NODE=1
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-6105}"
WORLD_SIZE=$((GPUS_PER_NODE * NNODES))
TORCHRUN=("$PYTHON" -m torch.distributed.run --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES"
          --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

DRY_RUN_ARGS=()
if [ "${DRY_RUN:-0}" = 1 ]; then DRY_RUN_ARGS=(--dry_run true); fi
# Without a visible CUDA GPU transformers refuses bf16; say so and run on the CPU (dry runs, tiny models).
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA GPU visible: running on the CPU (--use_cpu true)"
    DRY_RUN_ARGS+=(--use_cpu true)
fi

# wandb: a key in WANDB_API_KEY or a `wandb login` (~/.netrc) → online; otherwise offline, said out loud.
# The key itself is never printed.
wandb_mode() {
    if [ -n "${WANDB_MODE:-}" ]; then
        echo "wandb: WANDB_MODE=$WANDB_MODE"
    elif [ -n "${WANDB_API_KEY:-}" ] || grep -qs "api.wandb.ai" "${NETRC:-$HOME/.netrc}"; then
        echo "wandb: logged in, project ${WANDB_PROJECT}"
    else
        export WANDB_MODE=offline
        echo "wandb: no WANDB_API_KEY and no 'wandb login' found -> logging offline to $WANDB_DIR/wandb" \
             "(upload later with 'wandb sync'); TensorBoard logs are written as well"
    fi
}

# recipe_defaults NAME=key …: each variable NAME not set in the environment takes the value of `key` in $RECIPE
# (configs/train/*.yaml, the recipe's one source), so a variable the user sets overrides the recipe.
recipe_defaults() {
    local assignments
    assignments=$("$PYTHON" -m qwen_sft.train.recipe "$RECIPE" "$@") || exit 2
    eval "$assignments"
}
