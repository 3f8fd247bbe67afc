#!/usr/bin/env bash
# The paper's ImageNet-1k fine-tuning recipe (docs/recipes.md) for the classifier in MODEL, as the release runs it:
# total batch 1024, 100 epochs, wd 0.05, lr BASE_LR * batch / 256, per-group warm-up WARMUP then cosine, drop path
# DROP_PATH, best checkpoint by EMA accuracy, bidirectional attention, DDP without the unused-parameter search.
# The rest of the recipe is train_finetune.py's defaults, which this script does not repeat: the layer-wise decay
# and eval crop of ViT-B (nepa_l_sft.sh sets LLRD and CROP_PCT for ViT-L), the head lr, the frozen patch
# embedding, RandAugment, random erasing, mixup / cutmix, label smoothing, the EMA and AdamW's betas.
# nepa_b_sft.sh and nepa_l_sft.sh set the per-model numbers where they differ from those defaults.
# Speed (docs/performance.md): fused AdamW (the Trainer's default), torch.compile (--torch_compile False turns it off), workers kept
# between epochs.
# Checkpoints every epoch and every SAVE_EVERY_MINUTES (30), the newest 2 and the best kept.
# RECIPE chooses the layer decay (docs/recipes.md, "The paper's recipe and the release's"): release (the default) runs
# the release scripts' constant LLRD under llrd_cosine_warmup; paper runs the paper's ramp from PAPER_LLRD to
# PAPER_LLRD_END under llrd_cosine, one warm-up for every group (set by nepa_b_sft.sh; the paper gives none for ViT-L).
# Overrides: MODEL, DATA_DIR, OUTPUT_DIR, TOTAL_BATCH, PER_DEVICE_BATCH, EPOCHS, NUM_WORKERS, SAVE_EVERY_MINUTES, RECIPE,
# LLRD, CROP_PCT;
# extra flags pass through.
set -euo pipefail
case "${RECIPE:=release}" in
  release) DECAY_FLAGS=(${LLRD:+--llrd "$LLRD"}) ;;
  paper)
    if [ -z "${PAPER_LLRD:-}" ]; then
      echo "RECIPE=paper: the paper publishes its layer-decay ramp for ViT-B only (nepa_b_sft.sh: 0.35 -> 1.0), none for" \
        "this model. Run RECIPE=release, or choose a ramp yourself: add --llrd START --llrd_end END to the command." >&2
      exit 1
    fi
    DECAY_FLAGS=(--llrd "$PAPER_LLRD" --llrd_end "$PAPER_LLRD_END") ;;
  *)
    echo "RECIPE=$RECIPE: unknown. RECIPE=release (the default) runs the release scripts' constant layer decay;" \
      "RECIPE=paper runs the paper's layer-decay ramp (docs/recipes.md)." >&2
    exit 1 ;;
esac
source "$(dirname "$0")/../common.sh"

: "${MODEL:?set MODEL to a classifier folder from init_nepa_cls_from_pretrain.py}"
require_dir "$MODEL" "convert a pretraining checkpoint first, e.g." \
  "python init_nepa_cls_from_pretrain.py --pretrained_model_id outputs/nepa-base-patch14-224 \\" \
  "  --config_model_id configs/finetune/nepa-base-patch14-224-sft --save_local --local_dir $MODEL"
TOTAL_BATCH=${TOTAL_BATCH:-1024}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-128}
launch train_finetune.py \
  --model_name_or_path "$MODEL" \
  "${DATA_FLAGS[@]}" \
  --output_dir "${OUTPUT_DIR:-outputs/$(basename "$MODEL")-sft}" \
  --do_train --do_eval \
  --num_train_epochs "${EPOCHS:-100}" \
  --per_device_train_batch_size "$PER_DEVICE_BATCH" --per_device_eval_batch_size "$PER_DEVICE_BATCH" \
  --gradient_accumulation_steps "$(gradient_accumulation "$TOTAL_BATCH" "$PER_DEVICE_BATCH")" \
  --learning_rate "$(scaled_lr "$BASE_LR" "$TOTAL_BATCH")" "${DECAY_FLAGS[@]}" \
  --warmup_steps "$WARMUP" --weight_decay 0.05 \
  --drop_path "$DROP_PATH" --is_causal False \
  ${CROP_PCT:+--crop_pct "$CROP_PCT"} \
  --eval_strategy epoch --save_strategy epoch --save_every_minutes "${SAVE_EVERY_MINUTES:-30}" --save_total_limit 2 \
  --metric_for_best_model ema_accuracy --greater_is_better True --load_best_model_at_end True \
  --bf16 True --torch_compile True --seed 1337 --logging_steps 100 \
  --ddp_find_unused_parameters False \
  $(dataloader_flags) \
  --report_to "$REPORT_TO" \
  "$@"
