#!/usr/bin/env bash
# NEPA-L/14 pretraining (ViT-L, patch 14, 224 px): 128 images per 80 GB GPU; the release trains 1600 epochs
# (the paper's table lists 800: EPOCHS=800). The recipe is in recipe.sh.
CONFIG=configs/pretrain/nepa-large-patch14-224 PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-128} \
  exec bash "$(dirname "$0")/recipe.sh" "$@"
