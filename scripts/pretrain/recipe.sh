#!/usr/bin/env bash
# The paper's NEPA pretraining recipe on ImageNet-1k (docs/recipes.md), for the model in CONFIG:
# total batch 4096, 1600 epochs, AdamW (beta2 0.95; the rest Transformers' defaults), wd 0.05, base lr 3e-4 scaled by batch / 256,
# cosine schedule with 2.5 % warm-up, bf16, seed 1337, an EMA of the weights (decay 0.9999, the default, as in the
# release; --use_ema False turns it off), DDP without the unused-parameter search. nepa_b.sh and nepa_l.sh choose
# the model.
# Speed (docs/performance.md): fused AdamW (the Trainer's default), torch.compile (--torch_compile False turns it off), workers kept
# between epochs.
# Checkpoints every 50,000 steps (as the release) and every SAVE_EVERY_MINUTES (30), the newest 2 kept; a stop signal
# saves one too (docs/cluster.md).
# Watching the encoder: every KNN_EVAL_STEPS (5,000) steps and at the end, a k-NN of 50,000 train images against 10,000
# validation images (eval.py's protocol) and RankMe, of the weights and of the EMA, logged as eval_knn_top1 etc.; about
# 0.8 % of the training time of ViT-B on 8 H100s (docs/performance.md). KNN_EVAL_STEPS=0 turns it off.
# Overrides: DATA_DIR, OUTPUT_DIR, TOTAL_BATCH, PER_DEVICE_BATCH, EPOCHS, NUM_WORKERS, SAVE_EVERY_MINUTES,
# KNN_EVAL_STEPS; extra flags pass through.
set -euo pipefail
source "$(dirname "$0")/../common.sh"

TOTAL_BATCH=${TOTAL_BATCH:-4096}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-256}
: "${CONFIG:?set CONFIG to a configs/pretrain folder, or run nepa_b.sh / nepa_l.sh}"
launch train_pretrain.py \
  --config_name "$CONFIG" \
  "${DATA_FLAGS[@]}" \
  --output_dir "${OUTPUT_DIR:-outputs/$(basename "$CONFIG")}" \
  --do_train \
  --num_train_epochs "${EPOCHS:-1600}" \
  --per_device_train_batch_size "$PER_DEVICE_BATCH" \
  --gradient_accumulation_steps "$(gradient_accumulation "$TOTAL_BATCH" "$PER_DEVICE_BATCH")" \
  --learning_rate "$(scaled_lr 3e-4 "$TOTAL_BATCH")" \
  --lr_scheduler_type cosine --warmup_steps 0.025 \
  --adam_beta2 0.95 --weight_decay 0.05 \
  --bf16 True --torch_compile True --seed 1337 \
  --save_steps 50000 --save_every_minutes "${SAVE_EVERY_MINUTES:-30}" --save_total_limit 2 --logging_steps 100 \
  --ddp_find_unused_parameters False \
  --knn_eval_steps "${KNN_EVAL_STEPS:-5000}" --per_device_eval_batch_size "$PER_DEVICE_BATCH" \
  $(dataloader_flags) \
  --report_to "$REPORT_TO" \
  "$@"
