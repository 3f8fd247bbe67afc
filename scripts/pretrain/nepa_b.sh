#!/usr/bin/env bash
# NEPA-B/14 pretraining (ViT-B, patch 14, 224 px): 256 images per 80 GB GPU. The recipe is in recipe.sh.
CONFIG=configs/pretrain/nepa-base-patch14-224 PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-256} \
  exec bash "$(dirname "$0")/recipe.sh" "$@"
