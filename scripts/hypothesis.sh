#!/usr/bin/env bash
# Regenerate results/hypothesis.{md,json} and the hypothesis figures from the committed run summaries
# under results/runs (no GPU). Extra args go to scripts/hypothesis.py, e.g. --check.
source "$(dirname "$0")/_env.sh"
exec "$PY" scripts/hypothesis.py "$@"
