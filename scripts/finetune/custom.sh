#!/usr/bin/env bash
# Fine-tune and evaluate a NEPA classifier on your own labelled images, IMAGES/train/<class>/* and
# IMAGES/val/<class>/* (or IMAGES/validation/):
#
#   IMAGES=/path/to/photos bash scripts/finetune/custom.sh
#
# 1. download_dataset.py --imagefolder IMAGES -> DATA_DIR (default data/<folder name>-hf; reused when it exists).
# 2. init_nepa_cls_from_pretrain.py: the NEPA encoder in PRETRAINED (default checkpoints/nepa-base-patch14-224,
#    the released NEPA-B) with CONFIG's fine-tuning architecture (default configs/finetune/nepa-base-patch14-224-sft;
#    CONFIG= keeps the encoder's own, made bidirectional) and one output per class of the dataset
#    -> OUTPUT_DIR-cls (reused when it exists).
# 3. train_finetune.py with the small-data recipe of docs/recipes.md (chosen by `python -m experiments.small_data_sweep`):
#    EPOCHS 30 at total batch 64, lr BASE_LR * batch / 256 (= 3e-3 at 64), warm-up 10 %, no augmentation but a
#    flip (the central square of each image; no RandAugment, mixup / cutmix, erasing or label smoothing), drop path
#    0.1, no EMA, no torch.compile (minutes of compiling for a run of minutes); the layer decay, head lr and frozen
#    patch projection are train_finetune.py's defaults, the ImageNet recipe's; evaluated on val after every epoch and at the end (OUTPUT_DIR/eval_results.json:
#    top-1, top-5, loss).
# Overrides: IMAGES, DATA_DIR, PRETRAINED, CONFIG, OUTPUT_DIR, EPOCHS, BASE_LR, TOTAL_BATCH, PER_DEVICE_BATCH,
# CROP_PCT, NUM_WORKERS; extra flags pass through to train_finetune.py (e.g. --use_cpu True --bf16 False).
set -euo pipefail
: "${IMAGES:?set IMAGES to a folder holding train/<class>/ and val/<class>/}"
IMAGES=$(realpath -m "$IMAGES")  # common.sh moves to the repository root; the other paths are relative to it
source "$(dirname "$0")/../common.sh"

NAME=$(basename "$IMAGES")
DATA_DIR=${DATA_DIR:-data/$NAME-hf}
PRETRAINED=${PRETRAINED:-checkpoints/nepa-base-patch14-224}
CONFIG=${CONFIG-configs/finetune/nepa-base-patch14-224-sft}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/$NAME-nepa}
TOTAL_BATCH=${TOTAL_BATCH:-64}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-$(( (TOTAL_BATCH + GPUS * NNODES - 1) / (GPUS * NNODES) ))}

if [ ! -f "$DATA_DIR/dataset_dict.json" ]; then
  "$PYTHON" download_dataset.py --imagefolder "$IMAGES" --output_dir "$DATA_DIR"
fi
if [ ! -f "$OUTPUT_DIR-cls/model.safetensors" ]; then
  require_dir "$PRETRAINED" "set PRETRAINED to a NEPA pretraining folder, or where there is network run" \
    "hf download SixAILab/nepa-base-patch14-224 --local-dir $PRETRAINED"
  "$PYTHON" init_nepa_cls_from_pretrain.py --pretrained_model_id "$PRETRAINED" ${CONFIG:+--config_model_id "$CONFIG"} \
    --dataset_name "$DATA_DIR" --save_local --local_dir "$OUTPUT_DIR-cls"
fi
launch train_finetune.py \
  --model_name_or_path "$OUTPUT_DIR-cls" \
  --dataset_name "$DATA_DIR" --load_from_disk True \
  --output_dir "$OUTPUT_DIR" \
  --do_train --do_eval \
  --num_train_epochs "${EPOCHS:-30}" \
  --per_device_train_batch_size "$PER_DEVICE_BATCH" --per_device_eval_batch_size "$PER_DEVICE_BATCH" \
  --gradient_accumulation_steps "$(gradient_accumulation "$TOTAL_BATCH" "$PER_DEVICE_BATCH")" \
  --learning_rate "$(scaled_lr "${BASE_LR:-1.2e-2}" "$TOTAL_BATCH")" \
  --warmup_steps 0.1 --weight_decay 0.05 \
  --drop_path 0.1 --is_causal False \
  --crop_scale 1 1 --crop_ratio 1 1 --aa "" --reprob 0 --mixup 0 --cutmix 0 --smoothing 0 \
  ${CROP_PCT:+--crop_pct "$CROP_PCT"} \
  --use_ema False \
  --eval_strategy epoch --save_strategy epoch --save_total_limit 1 \
  --bf16 True --seed 0 --logging_steps 10 \
  --ddp_find_unused_parameters False \
  $(dataloader_flags) \
  --report_to "$REPORT_TO" \
  "$@"
