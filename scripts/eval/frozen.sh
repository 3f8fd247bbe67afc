#!/usr/bin/env bash
# Frozen-encoder evaluation of a NEPA encoder on ImageNet-1k (docs/recipes.md), PROTOCOL knn | linear | attentive:
#   knn        DINO's weighted k-NN, k = 10, 20 (eval_accuracy), 100 and 200 in one pass, T = 0.07; each GPU keeps its
#              shard of the train features (fp16).
#   linear     DINOv2's linear probe: 8 learning rates x 3 features (mean patch token, CLS, last 4 blocks' mean
#              tokens), 10 epochs at total batch 1024, AdamW without weight decay, cosine, RandomResizedCrop + flip.
#   attentive  AIMv2's attentive probe (arXiv 2411.14402, Table A2): the last 6 blocks' tokens averaged, 7 learning
#              rates, 100 epochs at total batch 1024, AdamW (0.9, 0.999), weight decay 0.05, clipping 3.0, 5 warm-up
#              epochs, cosine to 1e-5, bicubic RandomResizedCrop (0.08, 1) + flip + RandAugment rand-m9-mstd0.5-inc1.
# bf16, torchrun on every GPU of every node (scripts/common.sh); the probes checkpoint every SAVE_STEPS steps and a
# second run resumes. MODEL is a pretraining output or a released pretrained checkpoint (downloaded with
# `hf download`; the script says which when MODEL is missing). nepa_{b,l}_{knn,linear,attentive}.sh set the rest.
# Overrides: MODEL, DATA_DIR, OUTPUT_DIR, TOTAL_BATCH, PER_DEVICE_BATCH, IS_CAUSAL (True: the default; False:
# bidirectional attention), NUM_WORKERS, SAVE_STEPS; extra flags pass through (e.g. --num_train_epochs 1).
set -euo pipefail
source "$(dirname "$0")/../common.sh"

: "${MODEL:?set MODEL to a NEPA encoder folder}" "${PROTOCOL:?set PROTOCOL to knn, linear or attentive}"
require_dir "$MODEL" "pretrain one (scripts/pretrain/) or download the released encoder where there is network:" \
  "hf download ${HUB_ID:?} --local-dir $MODEL"
TOTAL_BATCH=${TOTAL_BATCH:-1024}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-128}
case "$PROTOCOL" in
  knn) RECIPE=(--knn_k 10 20 100 200 --knn_temperature 0.07) ;;
  linear) RECIPE=(--num_train_epochs 10 --optim adamw_torch_fused --weight_decay 0 --max_grad_norm 0 --warmup_steps 0) ;;
  attentive) RECIPE=(--num_train_epochs 100 --optim adamw_torch_fused --adam_beta1 0.9 --adam_beta2 0.999
                     --weight_decay 0.05 --max_grad_norm 3.0 --warmup_steps 0.05 --probe_min_lr 1e-5
                     --attentive_blocks 6 --aa rand-m9-mstd0.5-inc1) ;;
  *) echo "PROTOCOL=$PROTOCOL: use knn, linear or attentive" >&2; exit 1 ;;
esac
if [ "$PROTOCOL" != knn ]; then
  RECIPE+=(--per_device_train_batch_size "$PER_DEVICE_BATCH" --lr_scheduler_type cosine
           --gradient_accumulation_steps "$(gradient_accumulation "$TOTAL_BATCH" "$PER_DEVICE_BATCH")"
           --save_steps "${SAVE_STEPS:-1000}" --save_total_limit 2 --logging_steps 100 --ddp_find_unused_parameters False
           $(dataloader_flags))
else
  RECIPE+=(--dataloader_num_workers "${NUM_WORKERS:-10}")
fi
launch eval.py \
  --model_name_or_path "$MODEL" \
  "${DATA_FLAGS[@]}" \
  --protocol "$PROTOCOL" --is_causal "${IS_CAUSAL:-True}" \
  --output_dir "${OUTPUT_DIR:-outputs/$(basename "$MODEL")-$PROTOCOL}" \
  --crop_pct "$CROP_PCT" \
  --per_device_eval_batch_size 256 \
  --bf16 True --seed 0 \
  --report_to "$REPORT_TO" \
  "${RECIPE[@]}" \
  "$@"
