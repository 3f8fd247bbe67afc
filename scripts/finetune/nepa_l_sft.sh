#!/usr/bin/env bash
# Fine-tune NEPA-L/14 on ImageNet-1k: base lr 1e-3, layer decay 0.75, warm-up 30 %, drop path 0.2,
# eval crop_pct 0.95. No RECIPE=paper: the paper publishes no layer-decay ramp for ViT-L. The recipe is in recipe.sh.
MODEL=${MODEL:-outputs/nepa-large-patch14-224-cls} BASE_LR=1e-3 LLRD=0.75 WARMUP=0.3 DROP_PATH=0.2 CROP_PCT=0.95 \
  exec bash "$(dirname "$0")/recipe.sh" "$@"
