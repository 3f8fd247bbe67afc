# Sourced by the shell scripts: PYTHON is the interpreter they run, $PYTHON when set, else the project's .venv
# (scripts/setup_env.sh makes it), else python3 on the PATH.
PYTHON=${PYTHON:-$(venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python"; [ -x "$venv" ] && echo "$venv" || echo python3)}
