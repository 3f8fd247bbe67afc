#!/usr/bin/env bash
# The paper's ImageNet-1k fine-tuning recipe (docs/recipes.md) for the classifier in MODEL, as the release runs it:
# total batch 1024, 100 epochs, AdamW (0.9, 0.999), wd 0.05, lr BASE_LR * batch / 256 with layer-wise decay
# LLRD (fc_norm at the full lr), head lr 1e-3 for the classifier and final norm, per-group warm-up WARMUP then
# cosine, drop path DROP_PATH, patch embedding frozen, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25,
# mixup 0.8 / cutmix 1.0, smoothing 0.1, EMA 0.9999 evaluated beside the raw weights, best checkpoint by EMA
# accuracy, bidirectional attention, DDP without the unused-parameter search.
# nepa_b_sft.sh and nepa_l_sft.sh set the per-model numbers.
# Speed (docs/performance.md): fused AdamW, torch.compile (--torch_compile False turns it off), workers kept
# between epochs.
# Checkpoints every epoch and every SAVE_EVERY_MINUTES (30), the newest 2 and the best kept.
# RECIPE chooses the layer decay (docs/recipes.md, "The paper's recipe and the release's"): release (the default) runs
# the release scripts' constant LLRD under llrd_cosine_warmup; paper runs the paper's ramp from PAPER_LLRD to
# PAPER_LLRD_END under llrd_cosine, one warm-up for every group (set by nepa_b_sft.sh; the paper gives none for ViT-L).
# Overrides: MODEL, DATA_DIR, OUTPUT_DIR, TOTAL_BATCH, PER_DEVICE_BATCH, EPOCHS, NUM_WORKERS, SAVE_EVERY_MINUTES, RECIPE;
# extra flags pass through.
set -euo pipefail
case "${RECIPE:=release}" in
  release) DECAY_FLAGS=(--llrd "$LLRD") ;;
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
  --learning_rate "$(scaled_lr "$BASE_LR" "$TOTAL_BATCH")" --head_lr 1e-3 "${DECAY_FLAGS[@]}" \
  --warmup_steps "$WARMUP" \
  --optim adamw_torch_fused --adam_beta1 0.9 --adam_beta2 0.999 --weight_decay 0.05 \
  --drop_path "$DROP_PATH" --is_causal False --freeze_embed True \
  --aa rand-m9-mstd0.5-inc1 --reprob 0.25 \
  --mixup 0.8 --cutmix 1.0 --mixup_prob 1.0 --mixup_switch_prob 0.5 --smoothing 0.1 \
  --crop_pct "$CROP_PCT" \
  --use_ema True --ema_decay 0.9999 \
  --eval_strategy epoch --save_strategy epoch --save_every_minutes "${SAVE_EVERY_MINUTES:-30}" --save_total_limit 2 \
  --metric_for_best_model ema_accuracy --greater_is_better True --load_best_model_at_end True \
  --bf16 True --torch_compile True --seed 1337 --logging_steps 100 \
  --ddp_find_unused_parameters False \
  $(dataloader_flags) \
  --report_to "$REPORT_TO" \
  "$@"
