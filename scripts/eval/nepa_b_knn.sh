#!/usr/bin/env bash
# k-NN (k 10, 20, 100, 200) of the frozen NEPA-B/14 encoder on ImageNet-1k, eval crop_pct 0.875: our pretraining output, or
# MODEL=checkpoints/nepa-base-patch14-224 for the released SixAILab/nepa-base-patch14-224. The recipe is in frozen.sh.
MODEL=${MODEL:-outputs/nepa-base-patch14-224} HUB_ID=SixAILab/nepa-base-patch14-224 PROTOCOL=knn \
  exec bash "$(dirname "$0")/frozen.sh" "$@"
