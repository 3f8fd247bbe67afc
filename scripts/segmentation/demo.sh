#!/usr/bin/env bash
# Segmentation transfer in miniature on the CPU: NEPA-pretrained vs randomly initialised tiny encoder under UperNet
# on Fashion-MNIST canvases, 3 seeds. Extra arguments go to `python -m experiments.segmentation_demo` (--help lists the budgets).
set -euo pipefail
source "$(dirname "$0")/../setup_env.sh"
exec "$PYTHON" -m experiments.segmentation_demo "$@"
