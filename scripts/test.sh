#!/usr/bin/env bash
# Set up .venv (reused when requirements.txt has not changed), then run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
exec "$PYTHON" -m pytest "$@"
