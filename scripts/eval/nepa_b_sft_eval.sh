#!/usr/bin/env bash
# SixAILab/nepa-base-patch14-224-sft on ImageNet-1k val, resize 256 / centre crop 224.
# Expected: eval_accuracy 0.8375, eval_loss 0.7169. The recipe is in recipe.sh.
HUB_ID=SixAILab/nepa-base-patch14-224-sft MODEL=${MODEL:-checkpoints/nepa-base-patch14-224-sft} \
  exec bash "$(dirname "$0")/recipe.sh" "$@"
