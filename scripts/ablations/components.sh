#!/usr/bin/env bash
# The components ablation table; extra arguments go to the driver (e.g. --max_steps 150 --finetune --seeds 3).
source "$(dirname "$0")/../python.sh"
cd "$(dirname "$0")/../.."
exec "$PYTHON" -m experiments.ablations --table components "$@"
