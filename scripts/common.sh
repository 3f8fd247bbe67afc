# Sourced by the recipe scripts: GPU count, nodes, batch arithmetic, the launcher and the logging backend.
#
# Environment (all optional):
#   NPROC_PER_NODE   processes per node (default: the GPUs torch sees, which honours CUDA_VISIBLE_DEVICES;
#                    1 without GPUs)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
#                    number of nodes, this node's rank, the rendezvous host and port. Each is taken, in this
#                    order, from its own name; from the release's names (WORLD_SIZE = number of nodes, RANK = this
#                    node's rank, as a cluster's job launcher sets them for one launcher process per node); from
#                    SLURM (SLURM_NNODES, SLURM_NODEID, the first host of SLURM_JOB_NODELIST, a port from
#                    SLURM_JOB_ID); else one node, 127.0.0.1:29500. The script launches torchrun once per node:
#                    started by a per-process launcher (LOCAL_RANK set, or srun with several tasks a node) it stops.
#   DRY_RUN=1        print the launch line instead of running it
#   REPORT_TO        wandb | none | ... (default: wandb when it is installed and logged in, else none)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT
#                    seconds torchrun gives its processes to save a checkpoint after a stop signal (default 120)

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/python.sh
# The saved dataset every recipe reads (DATA_DIR overrides it).
DATA_FLAGS=(--dataset_name "${DATA_DIR:-data/imagenet-1k-hf}" --load_from_disk True)

count_gpus() {
  if [ -n "${NPROC_PER_NODE:-}" ]; then echo "$NPROC_PER_NODE"
  else "$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))"
  fi
}
if [ -n "${LOCAL_RANK:-}" ]; then
  echo "LOCAL_RANK=$LOCAL_RANK is set: this script was started once per process (torchrun, accelerate launch, srun with a" \
    "task per GPU), but it starts torchrun itself, once per node. Start it once per node (scripts/slurm/run.sbatch, or" \
    "srun --ntasks-per-node=1), or run the train_*.py script directly under your launcher." >&2
  exit 1
fi
if (( ${SLURM_STEP_NUM_TASKS:-0} > ${SLURM_STEP_NUM_NODES:-1} )); then
  echo "srun started $SLURM_STEP_NUM_TASKS tasks on $SLURM_STEP_NUM_NODES nodes, but this script starts torchrun once per" \
    "node: use srun --ntasks-per-node=1 (as scripts/slurm/run.sbatch does)." >&2
  exit 1
fi

# first_host NODELIST: the first host of a SLURM node list such as "gpu[07-10,12],cpu3" (gpu07): scontrol's answer,
# else read here (one bracket level).
first_host() {
  local host
  host=$(scontrol show hostnames "$1" 2>/dev/null | head -n 1) || true
  if [ -n "$host" ]; then echo "$host"; return; fi
  local prefix=${1%%[*}
  if [[ $prefix == *,* || $prefix == "$1" ]]; then echo "${1%%,*}"; return; fi
  local range=${1#*[}
  echo "$prefix${range%%[],-]*}"
}

GPUS=$(count_gpus)
NNODES=${NNODES:-${WORLD_SIZE:-${SLURM_NNODES:-1}}}
NODE_RANK=${NODE_RANK:-${RANK:-${SLURM_NODEID:-0}}}
MASTER_ADDR=${MASTER_ADDR:-$([ -n "${SLURM_JOB_NODELIST:-}" ] && first_host "$SLURM_JOB_NODELIST" || echo 127.0.0.1)}
MASTER_PORT=${MASTER_PORT:-$([ -n "${SLURM_JOB_ID:-}" ] && echo $((20000 + SLURM_JOB_ID % 20000)) || echo 29500)}

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

# require_dir DIR HOW COMMAND_LINE...: stop when DIR is missing, saying how to make it (each command line indented).
require_dir() {
  [ -d "$1" ] && return
  echo "$1 does not exist: $2" >&2
  printf '  %s\n' "${@:3}" >&2
  exit 1
}

# launch SCRIPT ARGS...: torchrun across every process of every node, plain python for one. A stop signal (SIGTERM,
# or SIGUSR1: a scheduler's warning) goes on to the training processes, which finish their optimiser step, save a
# checkpoint and exit with status 75; the launch then exits with 75 too, which scripts/slurm/run.sbatch requeues on.
# Under srun the signal is not passed on: srun delivers it to every process of the job step at once, torchrun and
# the training processes included, and a second one to torchrun while it waits for them makes it stop them again.
launch() {
  local command=("$PYTHON" "$@")
  if (( GPUS * NNODES > 1 )); then
    command=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS"
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
      --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}"
      "$@")
  fi
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${command[@]}"
    echo
    return
  fi
  local pid status=0 signalled=
  "${command[@]}" &
  pid=$!
  local forward=1
  if [ -n "${SLURM_STEP_ID:-}" ]; then forward=; fi
  trap 'signalled=1; [ -n "$forward" ] && kill -TERM "$pid" 2>/dev/null' TERM
  trap 'signalled=1; [ -n "$forward" ] && kill -USR1 "$pid" 2>/dev/null' USR1
  wait "$pid" || status=$?
  while [ -n "$signalled" ] && kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends `wait` early
    status=0
    wait "$pid" || status=$?
  done
  # torchrun reports a process's exit with status 1, whatever the status was.
  if [ -n "$signalled" ] && (( status != 0 )); then status=75; fi
  exit "$status"
}
