#!/usr/bin/env bash
# Stage 0: pretrain the offline fractal Swin body within pretrain.time_budget_s.
# Usage: bash scripts/stage0_pretrain.sh [--export PATH.safetensors] CONFIG.yaml [section.key=value ...]
#   e.g. bash scripts/stage0_pretrain.sh configs/stage0_fractal.yaml pretrain.time_budget_s=300
#        bash scripts/stage0_pretrain.sh --export results/checkpoints/fractal_swin.safetensors \
#            configs/stage0_fractal.yaml output_dir=results/runs
# --export copies the run's body.safetensors to PATH once training ends, checks that it loads as a
# model.weights=file body, and records its sha256 in the run's summary.json.
source "$(dirname "$0")/_env.sh"
usage="usage: bash scripts/stage0_pretrain.sh [--export PATH.safetensors] CONFIG.yaml [overrides...]"
export_to=
if [ "${1:-}" = --export ]; then
  [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
  export_to=$2; shift 2
fi
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
cfg=$1; shift
if [ -z "$export_to" ]; then
  exec "$PY" -m orca stage0 --config "$cfg" "$@"
fi
out=$(mktemp); trap 'rm -f "$out"' EXIT
"$PY" -m orca stage0 --config "$cfg" "$@" | tee "$out"
run_dir=$(sed -n 's/^\[stage0\] outputs: //p' "$out" | tail -n 1)
[ -n "$run_dir" ] || { echo "stage0 printed no run directory; nothing exported" >&2; exit 1; }
"$PY" -m orca.pretrain export "$run_dir" "$export_to"
