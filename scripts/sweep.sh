#!/usr/bin/env bash
# A grid of stage-3 runs from one sweep YAML (resumable; one run per GPU in parallel). Usage:
#   bash scripts/sweep.sh configs/experiments/table2_darcy_attn.yaml [--dry-run] [--gpus N] [--per-gpu K | --pack K] [key=value ...]
#   bash scripts/sweep.sh configs/experiments/table4_darcy_otdd.yaml model.embedder_from=results/runs/stage1__...
#   bash scripts/sweep.sh configs/experiments/ranks_patches.yaml --slurm [--submit] [--sbatch "--partition=gpu ..."]
# Exits non-zero when any run failed (listed at the end); rerunning skips the runs that completed.
# --slurm writes (and with --submit submits) an sbatch job array of the unfinished runs instead (orca/slurm.py).
source "$(dirname "$0")/_env.sh"
[ $# -ge 1 ] || { echo "usage: bash scripts/sweep.sh SWEEP.yaml [--dry-run] [--gpus N] [--per-gpu K | --pack K] [--slurm [--submit]] [overrides...]" >&2; exit 2; }
args=()
command=sweep
for a in "$@"; do
  if [ "$a" = "--slurm" ]; then command=slurm; else args+=("$a"); fi
done
exec "$PY" -m orca "$command" "${args[@]}"
