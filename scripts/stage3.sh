#!/usr/bin/env bash
# Stage 3. Usage: bash scripts/stage3.sh CONFIG.yaml [section.key=value ...]
#   e.g. bash scripts/stage3.sh configs/darcy_tiny.yaml seed=1
source "$(dirname "$0")/_env.sh"
[ $# -ge 1 ] || { echo "usage: bash scripts/stage3.sh CONFIG.yaml [overrides...]" >&2; exit 2; }
cfg=$1; shift
exec "$PY" -m orca stage3 --config "$cfg" "$@"
