#!/usr/bin/env bash
# The shift ablation table; extra arguments go to the driver (e.g. --max_steps 150 --finetune --seeds 3).
exec python "$(dirname "$0")/run.py" --table shift "$@"
