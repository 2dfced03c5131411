#!/usr/bin/env bash
# The GPU runs behind results/: one part per GPU session-sized block (<= 10 min on one H100).
# Usage: bash scripts/gpu_runs.sh PART OUT_DIR
#   body      generate Darcy-85 (CPU, in the background) while stage 0 pretrains the fractal body;
#             export it to results/checkpoints/fractal_swin.safetensors; the GPU-marked tests
#   stages    issue 4's fractal-vs-random evidence sweeps (3 runs per GPU at a time), stage 1 and
#             stage 2 on Darcy-85 with a random Swin-B body, bench_otdd, bench_stage2
#   finetune  Swin-B full fine-tuning on Darcy-85 (ORCA's recipe, 20 epochs), bench_adapters
# Each part writes its run directories, logs and bench outputs under OUT_DIR and reuses the Darcy
# cache under data/ when a previous part made it on the same machine. Runs are sequential inside a
# part unless said otherwise, so every timing is taken on an otherwise idle GPU.
source "$(dirname "$0")/_env.sh"
[ $# -eq 2 ] || { echo "usage: bash scripts/gpu_runs.sh body|stages|finetune OUT_DIR" >&2; exit 2; }
part=$1 out=$2
mkdir -p "$out"
darcy=configs/darcy_swinb.yaml
swinb_offline=(model.weights=none align.source=fractal)   # no hub weights, no CIFAR here
step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
# Darcy-85 in the background on N CPU processes while the GPU works; sets data_pid to wait on.
darcy_in_background() {
  step "Darcy-85 generation (background, $1 processes)"
  "$PY" -m orca data --config $darcy task.options.workers="$1" >"$out/darcy_data.log" 2>&1 &
  data_pid=$!
}

case $part in
body)
  darcy_in_background 10
  step "stage 0: fractal pretraining"
  bash scripts/stage0_pretrain.sh --export results/checkpoints/fractal_swin.safetensors \
      configs/stage0_fractal.yaml output_dir="$out"
  wait $data_pid && step "Darcy-85 ready: $(tail -n 1 "$out/darcy_data.log")"
  step "GPU-marked tests (QLoRA NF4 error, bf16 match, memory)"
  "$PY" -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log"
  ;;
stages)
  darcy_in_background 12
  step "issue 4 evidence: fractal vs random body on natural patches, then on Darcy-85"
  "$PY" -m orca.sweep configs/experiments/body_evidence_patches.yaml --per-gpu 3 sweep.output_dir="$out"
  wait $data_pid
  "$PY" -m orca.sweep configs/experiments/body_evidence_darcy.yaml --per-gpu 3 sweep.output_dir="$out"
  step "stage 1 on Darcy-85, Swin-B, OTDD against fractal source features"
  "$PY" -m orca stage1 --config $darcy "${swinb_offline[@]}" run_dir="$out/stage1_swinb"
  step "stage 2 on Darcy-85, Swin-B, the stage-1 embedder (bootstrap CIs for the cheap metrics)"
  "$PY" -m orca stage2 --config $darcy "${swinb_offline[@]}" run_dir="$out/stage2_swinb" \
      model.embedder_from="$out/stage1_swinb" 'rank.boot_metrics=[mmd,sliced_wasserstein,sinkhorn,pad]' 
  step "bench_otdd"
  "$PY" scripts/bench_otdd.py --out "$out/otdd"
  step "bench_stage2"
  "$PY" scripts/bench_stage2.py --out "$out"
  ;;
finetune)
  step "stage 3: Swin-B full fine-tuning on Darcy-85, ORCA's recipe for 20 epochs"
  "$PY" -m orca stage3 --config $darcy model.weights=none train.epochs=20 run_dir="$out/stage3_swinb_full"
  step "bench_adapters"
  "$PY" scripts/bench_adapters.py --out "$out"
  ;;
*)
  echo "unknown part '$part' (body, stages or finetune)" >&2; exit 2 ;;
esac
step "done: $part"
