#!/usr/bin/env bash
# Stage 2. Usage: bash scripts/stage2.sh CONFIG.yaml [section.key=value ...]
#   e.g. bash scripts/stage2.sh configs/darcy_tiny.yaml seed=1
source "$(dirname "$0")/_env.sh"
[ $# -ge 1 ] || { echo "usage: bash scripts/stage2.sh CONFIG.yaml [overrides...]" >&2; exit 2; }
cfg=$1; shift
exec "$PY" -m orca stage2 --config "$cfg" "$@"
