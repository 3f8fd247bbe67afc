#!/usr/bin/env bash
# Frozen-encoder evaluation of a NEPA encoder on ImageNet-1k (docs/recipes.md), PROTOCOL knn | linear | attentive:
#   knn        DINO's weighted k-NN, k = 10, 20 (eval_accuracy), 100 and 200 in one pass; each GPU keeps its shard
#              of the train features (fp16).
#   linear     DINOv2's linear probe: eval.py's defaults (its grid of learning rates and features, 10 epochs,
#              AdamW without weight decay, cosine, RandomResizedCrop + flip) at total batch 1024.
#   attentive  AIMv2's attentive probe (arXiv 2411.14402, Table A2): 100 epochs at total batch 1024, weight decay
#              0.05, clipping 3.0, 5 warm-up epochs, cosine to 1e-5; its blocks, grid and augmentation (bicubic
#              RandomResizedCrop + flip + RandAugment) are eval.py's defaults.
# bf16, torchrun on every GPU of every node (scripts/common.sh); the probes checkpoint every SAVE_STEPS steps and a
# second run resumes. MODEL is a pretraining output or a released pretrained checkpoint (downloaded with
# `hf download`; the script says which when MODEL is missing). nepa_{b,l}_{knn,linear,attentive}.sh set the rest.
# Overrides: MODEL, DATA_DIR, OUTPUT_DIR, TOTAL_BATCH, PER_DEVICE_BATCH, IS_CAUSAL (unset: causal, eval.py's default;
# False: bidirectional attention), NUM_WORKERS, SAVE_STEPS; extra flags pass through (e.g. --num_train_epochs 1).
set -euo pipefail
source "$(dirname "$0")/../common.sh"

: "${MODEL:?set MODEL to a NEPA encoder folder}" "${PROTOCOL:?set PROTOCOL to knn, linear or attentive}"
require_dir "$MODEL" "pretrain one (scripts/pretrain/) or download the released encoder where there is network:" \
  "hf download ${HUB_ID:?} --local-dir $MODEL"
TOTAL_BATCH=${TOTAL_BATCH:-1024}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-128}
case "$PROTOCOL" in
  knn) RECIPE=(--knn_k 10 20 100 200) ;;
  linear) RECIPE=() ;;
  attentive) RECIPE=(--num_train_epochs 100 --weight_decay 0.05 --max_grad_norm 3.0 --warmup_steps 0.05 --probe_min_lr 1e-5) ;;
  *) echo "PROTOCOL=$PROTOCOL: use knn, linear or attentive" >&2; exit 1 ;;
esac
if [ "$PROTOCOL" != knn ]; then
  RECIPE+=(--per_device_train_batch_size "$PER_DEVICE_BATCH"
           --gradient_accumulation_steps "$(gradient_accumulation "$TOTAL_BATCH" "$PER_DEVICE_BATCH")"
           --save_steps "${SAVE_STEPS:-1000}" --save_total_limit 2 --logging_steps 100 --ddp_find_unused_parameters False
           $(dataloader_flags))
else
  RECIPE+=(--dataloader_num_workers "${NUM_WORKERS:-10}")
fi
launch eval.py \
  --model_name_or_path "$MODEL" \
  "${DATA_FLAGS[@]}" \
  --protocol "$PROTOCOL" ${IS_CAUSAL:+--is_causal "$IS_CAUSAL"} \
  --output_dir "${OUTPUT_DIR:-outputs/$(basename "$MODEL")-$PROTOCOL}" \
  ${CROP_PCT:+--crop_pct "$CROP_PCT"} \
  --per_device_eval_batch_size 256 \
  --bf16 True --seed 0 \
  --report_to "$REPORT_TO" \
  "${RECIPE[@]}" \
  "$@"
