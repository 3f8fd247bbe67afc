#!/usr/bin/env bash
# UperNet on ADE20K (SceneParse-150) over the NEPA encoder in MODEL. NEPA's own segmentation settings are not
# published, so this is MAE's / BEiT's UperNet recipe (mmsegmentation's MAE config; docs/recipes.md): 160k iterations
# at total batch 16, AdamW at lr 1e-4 and weight decay 0.05, linear warm-up over 1,500 iterations then linear decay
# to 0, UperNet with DECODER channels, SyncBatchNorm. The rest of the recipe is train_segmentation.py's defaults,
# which this script does not repeat: layer-wise lr decay, the auxiliary FCN head, drop path (nepa_l_ade20k.sh sets
# ViT-L's), bidirectional attention, the crops (mmsegmentation's pipeline at a crop of a multiple of the patch size)
# and the sliding-window evaluation.
# BatchNorm in the UperNet heads (SyncBatchNorm across GPUs) normalises over PER_DEVICE_BATCH x GPUs images: 16 on
# the recipe's 8 GPUs, but accumulation does not add to it, so 1 GPU reaches the total batch 16 with BatchNorm over 2
# images. The script says so when that number is below 16.
# nepa_b_ade20k.sh and nepa_l_ade20k.sh set the per-model numbers where they differ from those defaults.
# Checkpoints every 16,000 iterations and every SAVE_EVERY_MINUTES (30), the newest 2 kept.
# Overrides: MODEL, DATA_DIR, OUTPUT_DIR, TOTAL_BATCH, PER_DEVICE_BATCH, STEPS, LR, LLRD, DROP_PATH,
# NUM_WORKERS, SAVE_EVERY_MINUTES; extra flags pass through.
set -euo pipefail
DATA_DIR=${DATA_DIR:-data/ade20k-hf}
source "$(dirname "$0")/../common.sh"

: "${MODEL:?set MODEL to a NEPA pretraining or classification folder}"
require_dir "$MODEL" "pretrain one (scripts/pretrain/nepa_b.sh) or download a released checkpoint, e.g." \
  "hf download SixAILab/nepa-base-patch14-224 --local-dir $MODEL"
require_dir "$DATA_DIR" "build it with" \
  "python download_dataset.py --dataset ade20k --archive /path/to/ADEChallengeData2016.zip --output_dir $DATA_DIR"
TOTAL_BATCH=${TOTAL_BATCH:-16}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-2}
if (( PER_DEVICE_BATCH * GPUS * NNODES < 16 )); then
  echo "BatchNorm will normalise over $((PER_DEVICE_BATCH * GPUS * NNODES)) images ($PER_DEVICE_BATCH x $((GPUS * NNODES)) GPUs), not the" \
    "recipe's 16 (2 x 8 GPUs): gradient accumulation reaches the total batch, not BatchNorm's. Expect a lower mIoU than" \
    "the recipe's; a larger PER_DEVICE_BATCH (if memory allows) or more GPUs bring it closer." >&2
fi
launch train_segmentation.py \
  --model_name_or_path "$MODEL" \
  "${DATA_FLAGS[@]}" \
  --output_dir "${OUTPUT_DIR:-outputs/$(basename "$MODEL")-ade20k}" \
  --do_train --do_eval \
  --max_steps "${STEPS:-160000}" \
  --per_device_train_batch_size "$PER_DEVICE_BATCH" --per_device_eval_batch_size 1 \
  --gradient_accumulation_steps "$(gradient_accumulation "$TOTAL_BATCH" "$PER_DEVICE_BATCH")" \
  --learning_rate "${LR:-1e-4}" ${LLRD:+--llrd "$LLRD"} --weight_decay 0.05 \
  --warmup_steps 1500 \
  ${DROP_PATH:+--drop_path "$DROP_PATH"} --decoder_hidden_size "$DECODER" \
  --eval_strategy steps --eval_steps 16000 --save_steps 16000 \
  --save_every_minutes "${SAVE_EVERY_MINUTES:-30}" --save_total_limit 2 \
  --bf16 True --seed 0 --logging_steps 50 \
  $(dataloader_flags) \
  --report_to "$REPORT_TO" \
  "$@"
