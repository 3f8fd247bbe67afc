#!/usr/bin/env bash
# NEPA-B/14 + UperNet on ADE20K (the paper reports 48.3 mIoU): UperNet channels 768 (MAE's and BEiT's ViT-B
# configs); drop path is train_segmentation.py's default, ViT-B's. The recipe is in recipe.sh.
MODEL=${MODEL:-outputs/nepa-base-patch14-224} DECODER=768 exec bash "$(dirname "$0")/recipe.sh" "$@"
