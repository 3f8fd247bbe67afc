#!/usr/bin/env bash
# NEPA-B/14 + UperNet on ADE20K (the paper reports 48.3 mIoU): drop path 0.1, UperNet channels 768 (MAE's and
# BEiT's ViT-B configs). The recipe is in recipe.sh.
MODEL=${MODEL:-outputs/nepa-base-patch14-224} DROP_PATH=0.1 DECODER=768 exec bash "$(dirname "$0")/recipe.sh" "$@"
