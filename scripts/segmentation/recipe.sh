#!/usr/bin/env bash
# UperNet on ADE20K (SceneParse-150) over the NEPA encoder in MODEL. NEPA's own segmentation settings are not
# published, so this is MAE's / BEiT's UperNet recipe (mmsegmentation's MAE config): 160k iterations at total
# batch 16, AdamW (0.9, 0.999) at lr 1e-4 with layer-wise lr decay 0.65 and weight decay 0.05, linear warm-up over
# 1,500 iterations then linear decay to 0, drop path DROP_PATH, UperNet with DECODER channels and the auxiliary FCN
# head (weight 0.4), SyncBatchNorm; random resize 0.5-2.0 of a 2048x512 base, random crop (a class may cover at
# most 75 %), flip, photometric distortion; labels with ADE20K's "other" (0) ignored as 255; single-scale
# sliding-window evaluation; bidirectional attention.
# Crop 504, not 512: the crop must be a multiple of the patch size (14). 504 = 36 x 14 is the closest below 512
# (518 = 37 x 14 above it costs 6 % more tokens), and its even 36 x 36 grid makes the neck's half-resolution level
# exact (18 x 18). Evaluation windows are 504 with stride 336 (two thirds, as 341 is of 512).
# BatchNorm in the UperNet heads (SyncBatchNorm across GPUs) normalises over PER_DEVICE_BATCH x GPUs images: 16 on
# the recipe's 8 GPUs, but accumulation does not add to it, so 1 GPU reaches the total batch 16 with BatchNorm over 2
# images. The script says so when that number is below 16.
# nepa_b_ade20k.sh and nepa_l_ade20k.sh set the per-model numbers.
# Checkpoints every 16,000 iterations and every SAVE_EVERY_MINUTES (30), the newest 2 kept.
# Overrides: MODEL, DATA_DIR, OUTPUT_DIR, TOTAL_BATCH, PER_DEVICE_BATCH, STEPS, LR, LLRD, NUM_WORKERS,
# SAVE_EVERY_MINUTES; extra flags pass through.
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
  --learning_rate "${LR:-1e-4}" --llrd "${LLRD:-0.65}" --weight_decay 0.05 \
  --optim adamw_torch_fused --adam_beta1 0.9 --adam_beta2 0.999 \
  --lr_scheduler_type linear --warmup_steps 1500 \
  --drop_path "$DROP_PATH" --is_causal False \
  --decoder_hidden_size "$DECODER" --auxiliary_channels 256 --auxiliary_loss_weight 0.4 \
  --crop_size 504 --train_scale 2048 512 --ratio_range 0.5 2.0 --cat_max_ratio 0.75 --photometric True \
  --eval_scale 2048 512 --eval_stride 336 \
  --eval_strategy steps --eval_steps 16000 --save_strategy steps --save_steps 16000 \
  --save_every_minutes "${SAVE_EVERY_MINUTES:-30}" --save_total_limit 2 \
  --bf16 True --seed 0 --logging_steps 50 \
  $(dataloader_flags) \
  --report_to "$REPORT_TO" \
  "$@"
