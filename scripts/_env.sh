# Sourced by the stage scripts: enter the repo, build/reuse .venv, export $PY.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=$(bash scripts/setup_env.sh "${ORCA_ENV:-runtime}")
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
