# Sourced by the recipe scripts: GPU count, batch arithmetic, the launcher and the logging backend.
#
# Environment (all optional):
#   NPROC_PER_NODE   processes per node (default: the GPUs torch sees, which honours CUDA_VISIBLE_DEVICES;
#                    1 without GPUs)
#   WORLD_SIZE       number of nodes, RANK this node's rank, MASTER_ADDR / MASTER_PORT the rendezvous
#                    (the variables a cluster's job launcher sets for one launcher process per node)
#   REPORT_TO        wandb | none | ... (default: wandb when it is installed and logged in, else none)

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/python.sh
# The saved dataset every recipe reads (DATA_DIR overrides it).
DATA_FLAGS=(--dataset_name "${DATA_DIR:-data/imagenet-1k-hf}" --load_from_disk True)

count_gpus() {
  if [ -n "${NPROC_PER_NODE:-}" ]; then echo "$NPROC_PER_NODE"
  else "$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))"
  fi
}
GPUS=$(count_gpus)
NNODES=${WORLD_SIZE:-1}
NODE_RANK=${RANK:-0}

# gradient_accumulation TOTAL_BATCH PER_DEVICE_BATCH: total / (per-device x processes), which must divide.
gradient_accumulation() {
  local devices=$((GPUS * NNODES))
  if (( $1 % ($2 * devices) )); then
    echo "total batch $1 is not a multiple of per-device batch $2 x $devices processes; set TOTAL_BATCH or PER_DEVICE_BATCH." >&2
    exit 1
  fi
  echo $(( $1 / ($2 * devices) ))
}

# scaled_lr BASE_LR TOTAL_BATCH: the linear scaling rule, lr = base_lr * total_batch / 256.
scaled_lr() { "$PYTHON" -c "print($1 * $2 / 256)"; }

if [ -z "${REPORT_TO:-}" ]; then
  if "$PYTHON" -c "import wandb, sys; sys.exit(0 if wandb.login(prompt=False) else 1)" >/dev/null 2>&1 && [ "${WANDB_MODE:-}" != disabled ]; then
    REPORT_TO=wandb
  else
    REPORT_TO=none
    echo "wandb is not installed or not logged in: logging to the console and trainer_state.json only (REPORT_TO=wandb to insist)." >&2
  fi
fi

# dataloader_flags: NUM_WORKERS loader processes per GPU (default 10), kept alive between epochs when there are any.
dataloader_flags() {
  local workers=${NUM_WORKERS:-10}
  echo "--dataloader_num_workers $workers --dataloader_persistent_workers $( ((workers > 0)) && echo True || echo False)" \
    "--dataloader_drop_last True"
}

# launch SCRIPT ARGS...: torchrun across every process of every node, plain python for one.
launch() {
  if (( GPUS * NNODES > 1 )); then
    "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
      --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" "$@"
  else
    "$PYTHON" "$@"
  fi
}
