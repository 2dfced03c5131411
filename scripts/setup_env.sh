#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned packages. Idempotent: a stamp file holding the hash of the
# requirement files makes the second call instant, and a changed pin reinstalls.
# Usage: source-free; `bash scripts/setup_env.sh [dev]` prints the venv's python path at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-runtime}
req=requirements.txt; [ "$want" = dev ] && req=requirements-dev.txt
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] >= (3, 10), sys.version' || {
  echo "orca-rank needs Python >= 3.10 (3.11 tested); found $("$PY" --version)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.orca-$want-$(cat requirements.txt "$req" constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "[setup] installing $req into .venv (first run only; a few minutes)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req" -c constraints.txt >&2
  touch "$stamp"
fi
# Our `datasets/` must be the one Python sees; refuse an environment where HF's is installed (an
# editable install of this checkout, `pip install -e .`, finds ours, which is fine).
if ! .venv/bin/python -I -c 'import importlib.util as u, os, sys; s = u.find_spec("datasets")
sys.exit(0 if s is None or os.path.realpath(s.origin) == os.path.realpath("datasets/__init__.py") else 1)'; then
  echo "[setup] Hugging Face 'datasets' is installed in .venv and would shadow orca-rank's datasets/ package; run: .venv/bin/pip uninstall -y datasets" >&2; exit 1
fi
echo .venv/bin/python
