#!/usr/bin/env bash
# SixAILab/nepa-large-patch14-224-sft on ImageNet-1k val, crop_pct 0.95 (resize 235 / centre crop 224).
# Expected: eval_accuracy 0.854, eval_loss 0.6371. The recipe is in recipe.sh.
HUB_ID=SixAILab/nepa-large-patch14-224-sft MODEL=${MODEL:-checkpoints/nepa-large-patch14-224-sft} CROP_PCT=0.95 \
  exec bash "$(dirname "$0")/recipe.sh" "$@"
