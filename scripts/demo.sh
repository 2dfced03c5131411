#!/usr/bin/env bash
# The offline demo: generate a small Darcy-flow set (211x211 solves subsampled to 43x43), fine-tune
# a small randomly initialised Swin on it on the CPU, print the test relative L2 and the run path.
# Extra args are config overrides, e.g. `bash scripts/demo.sh train.epochs=5`.
source "$(dirname "$0")/_env.sh"
"$PY" -m orca stage3 --config configs/darcy_tiny.yaml output_dir=runs/demo "$@"
