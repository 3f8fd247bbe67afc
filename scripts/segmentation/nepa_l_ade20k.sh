#!/usr/bin/env bash
# NEPA-L/14 + UperNet on ADE20K (the paper reports 54.0 mIoU): drop path 0.2, UperNet channels 1024 (BEiT's ViT-L
# config), blocks 8/12/16/24 (the config's default for 24 blocks). The recipe is in recipe.sh.
MODEL=${MODEL:-outputs/nepa-large-patch14-224} DROP_PATH=0.2 DECODER=1024 exec bash "$(dirname "$0")/recipe.sh" "$@"
