#!/usr/bin/env bash
# Regenerate results/tables.md and results/tables.tex from the committed run summaries under
# results/runs (no GPU, seconds). Extra args go to scripts/make_tables.py, e.g. --check or --root DIR.
source "$(dirname "$0")/_env.sh"
exec "$PY" scripts/make_tables.py "$@"
