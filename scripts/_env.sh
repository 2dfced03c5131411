# Sourced by the stage scripts: enter the repo, build/reuse .venv, export $PY.
# ORCA_PYTHON=/path/to/python skips the venv and uses that interpreter as it is (clusters or GPU
# images that already provide torch; missing packages then fail at import with their names).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${ORCA_PYTHON:-}" ]; then
  PY=$ORCA_PYTHON
else
  PY=$(bash scripts/setup_env.sh "${ORCA_ENV:-runtime}")
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
