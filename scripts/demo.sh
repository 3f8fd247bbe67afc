#!/usr/bin/env bash
# NEPA's label efficiency in miniature on Fashion-MNIST, on the CPU: set up .venv, build the dataset,
# NEPA-pretrain, then probe and fine-tune on 1 % and 10 % of the labels, against random initialisation.
# Extra arguments go to `python -m experiments.demo` (e.g. --seeds 3, --label_percents 1 10 100, --rerun).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
exec "$PYTHON" -m experiments.demo "$@"
