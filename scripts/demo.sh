#!/usr/bin/env bash
# The whole pipeline in miniature on Fashion-MNIST, on the CPU: set up .venv, build the dataset,
# NEPA-pretrain, convert, fine-tune, evaluate, and compare with random initialisation.
# Extra arguments go to scripts/demo.py (e.g. --pretrain_steps 3000, --rerun).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
exec "$PYTHON" scripts/demo.py "$@"
