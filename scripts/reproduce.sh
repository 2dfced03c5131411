#!/usr/bin/env bash
# The GPU runs behind results/: one part per GPU command (<= 10 min on one H100).
# Usage: bash scripts/gpu_runs.sh PART OUT_DIR [SECONDS]
#   body      generate Darcy-85 (CPU, in the background) while stage 0 pretrains the fractal body;
#             export it to results/checkpoints/fractal_swin.safetensors; the GPU-marked tests
#   finetune  Darcy-85, then Swin-B full fine-tuning on it (ORCA's recipe, 20 epochs, compiled with
#             CUDA graphs), stage 1 (OTDD, fractal source) and stage 2 on it with a random Swin-B body
#   bench     the GPU-marked tests, bench_adapters, bench_otdd, bench_stage2, bench_train (every
#             method, batch 64 and 256, activation checkpointing, the stage-2 rank map when
#             RANK_MAP is set), in order of need
#   perf      kernel profiles (bench_train --profile) of compiled full fine-tuning and LoRA at
#             batch 256 (issue 7: where the step's time goes)
#   graphs    bench_train with CUDA graphs (compile mode reduce-overhead): full, our LoRA and its
#             variants (GRAPH_METHODS) compiled, peft eager, batch 256 then 64 (BATCHES; issues 3, 7)
#   sdpa      bench_train with Swin's window attention through F.scaled_dot_product_attention: eager
#             (bmm and sdpa side by side, batch 64 and 256), then CUDA graphs at batch 256 (issue 7)
#   mim       issue 4: stage 0 with classes + SimMIM (configs/stage0_fractal_mim.yaml, Darcy-85 in the
#             background), exported to results/checkpoints/fractal_swin_mim.safetensors; the run
#             directory (as stage0_mim.tgz) and the checkpoint (in 3 parts, each under the 16 MiB a
#             returned file may have; `cat` them back together) are written to OUT_DIR
#   mim_evidence  issue 4: that body against a random one under LoRA, on Darcy-85 and natural patches
#   droppath  issue 4: the fractal and the random body under LoRA with stochastic depth off (natural
#             patches while Darcy-85 generates, then Darcy-85)
#   evidence  issue 4's fractal-vs-random evidence sweeps (natural patches; Darcy-85 with LoRA, with
#             LoRA on the patch merges too, with full fine-tuning, with the frozen body alone, at
#             larger learning rates, with LoRA+, for 40 epochs, and at other ranks)
#             into results/runs/
#   tables    issue 8's table sweeps (Tables 2, 3, 1, then 4 with its stage 1) into results/runs/,
#             as far as the time allows; sweeps are resumable, so the next call continues
#   adaptive  issue 8 (d): stage-2 rank maps at three budgets per task, then the adaptive vs
#             uniform vs AdaLoRA sweeps, the knee sweeps of the other tasks (ranks_patches,
#             ranks_heldout, ranks_digits, ranks_tones) and their gap profiles, into results/runs/
#   issue8    tables, then adaptive, with what is left of SECONDS (resumable: call it until done)
#   ddp       issue 7 on 2+ GPUs (nvidia-h200-x2): bench_ddp (full and LoRA at batch 64 and 256 per GPU,
#             1 GPU vs all), then Darcy-85 full fine-tuning on 1 GPU and under DDP on 2, 3 seeds each
#   pack      tar every finished run directory under results/runs/ (one holding summary.json) into
#             OUT_DIR/runs.tgz, without checkpoints, TensorBoard files or *.pt, for the trip back
# SECONDS (default 560) is the part's whole budget: every step runs under `timeout` with what is
# left, so a slow step cannot take the later steps' logs with it. Each part writes its run
# directories, logs and bench outputs under OUT_DIR. Steps run one after another unless said
# otherwise, so every timing is taken on an otherwise idle GPU. Sweeps run PER_GPU runs at a time
# (default 6): the fractal body's eager runs are bound by Python, so they share one GPU well.
source "$(dirname "$0")/_env.sh"
[ $# -ge 2 ] || { echo "usage: bash scripts/gpu_runs.sh body|finetune|bench|perf|graphs|sdpa|mim|mim_evidence|droppath|evidence|tables|adaptive|issue8|ddp|pack OUT_DIR [SECONDS]" >&2; exit 2; }
part=$1 out=$2 deadline=$(( $(date +%s) + ${3:-560} ))
mkdir -p "$out"
darcy=configs/darcy_swinb.yaml
swinb_offline=(model.weights=none align.source=fractal)   # no hub weights, no CIFAR here
per_gpu=${PER_GPU:-6}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}   # PER_GPU processes x 16 CPU threads would thrash
step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
# within MAX_S CMD...: run CMD under timeout min(MAX_S, time left); a failure is logged, not fatal.
within() {
  local cap=$1 left=$(( deadline - $(date +%s) )); shift
  (( left < cap )) && cap=$left
  if (( cap < 10 )); then echo "(skipped, ${left}s left): $*"; return 0; fi
  timeout "$cap" "$@" || echo "(exit $? after at most ${cap}s): $*"
}
# Darcy-85 in the background on N CPU processes while the GPU works; sets data_pid to wait on.
darcy_in_background() {
  step "Darcy-85 generation (background, $1 processes)"
  "$PY" -m orca data --config $darcy task.options.workers="$1" >"$out/darcy_data.log" 2>&1 &
  data_pid=$!
}
darcy_wait() { wait $data_pid || echo "Darcy generation failed: see $out/darcy_data.log"; }
# sweeps WHY MAX_S NAME...: each configs/experiments/NAME.yaml as one sweep, PER_GPU runs at a time, under
# within MAX_S; overrides for every sweep go after `--`.
sweeps() {
  local why=$1 cap=$2 names=() t; shift 2
  while (( $# )) && [ "$1" != -- ]; do names+=("$1"); shift; done
  (( $# )) && shift
  for t in "${names[@]}"; do
    step "$why: $t ($per_gpu runs at a time)"
    within "$cap" "$PY" -m orca.sweep "configs/experiments/$t.yaml" --per-gpu "$per_gpu" "$@"
  done
}

# pending NAME: how many runs of configs/experiments/NAME.yaml are not done yet.
pending() {
  "$PY" -m orca.sweep "configs/experiments/$1.yaml" --dry-run 2>/dev/null | \
    sed -n 's/.* done, \([0-9]*\) pending$/\1/p'
}
# rank_maps TASK NAME: stage 2 on TASK at the three budgets of configs/experiments/NAME.yaml; the gaps
# are measured once (the first budget) and reused by the others (rank.gaps_from).
rank_maps() {
  local task=$1 name=$2 b measured=results/runs/$2/stage2_b282624 reuse
  for b in 282624 1177600 3014656; do
    [ -f results/runs/$name/stage2_b$b/rank_map.json ] && continue
    reuse=(); [ $b != 282624 ] && reuse=(rank.gaps_from=$measured)
    step "issue 8 (d): stage 2 on $task at budget $b ${reuse[*]}"
    within 200 bash scripts/stage2.sh configs/body_fractal.yaml name=$name task.name=$task rank.budget=$b \
        "${reuse[@]}" run_dir=results/runs/$name/stage2_b$b
  done
}
# gap_profile NAME TASK [OVERRIDE...]: stage 2 on TASK into results/runs/gaps_NAME/stage2, once, under
# within GAP_CAP (default 200 s).
gap_profile() {
  local name=$1 task=$2; shift 2
  [ -f results/runs/gaps_$name/stage2/summary.json ] && return 0
  step "gap profile of $task"
  within "${GAP_CAP:-200}" bash scripts/stage2.sh configs/body_fractal.yaml name=gaps_$name task.name=$task "$@" \
      run_dir=results/runs/gaps_$name/stage2
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
finetune)
  step "Darcy-85 generation (16 processes)"
  within 200 "$PY" -m orca data --config $darcy task.options.workers=16 >"$out/darcy_data.log" 2>&1
  tail -n 2 "$out/darcy_data.log"
  step "stage 3: Swin-B full fine-tuning on Darcy-85, ORCA's recipe for 20 epochs (compiled, CUDA graphs)"
  within 340 "$PY" -m orca stage3 --config $darcy model.weights=none train.epochs=20 train.compile=true \
      train.compile_mode=reduce-overhead run_dir="$out/stage3_swinb_full"
  step "stage 1 on Darcy-85, Swin-B, OTDD against fractal source features"
  within 120 "$PY" -m orca stage1 --config $darcy "${swinb_offline[@]}" run_dir="$out/stage1_swinb"
  step "stage 2 on Darcy-85, Swin-B, the stage-1 embedder (bootstrap CIs for the cheap metrics)"
  within 200 "$PY" -m orca stage2 --config $darcy "${swinb_offline[@]}" run_dir="$out/stage2_swinb" \
      model.embedder_from="$out/stage1_swinb" 'rank.boot_metrics=[mmd,sliced_wasserstein,sinkhorn,pad]'
  ;;
bench)
  step "GPU-marked tests (QLoRA NF4 error, bf16 match, memory)"
  within 90 "$PY" -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log"
  step "bench_adapters: full, our LoRA, peft LoRA, our QLoRA at batch 64 and 256"
  within 150 "$PY" scripts/bench_adapters.py --out "$out"
  step "bench_otdd"
  within 100 "$PY" scripts/bench_otdd.py --out "$out/otdd" --ref-clusters 1 --repeats 2
  step "bench_stage2"
  within 80 "$PY" scripts/bench_stage2.py --out "$out"
  step "bench_train: every method, batch 64 and 256, eager; activation checkpointing in all stages"
  within 300 "$PY" scripts/bench_train.py --out "$out" --grad-checkpointing 0 1 2 3 \
      ${RANK_MAP:+--rank-map "$RANK_MAP"}
  ;;
perf)
  # Issue 7's open question after session 8: with CUDA graphs full fine-tuning reaches 27% MFU at
  # batch 256 and our LoRA 1.07x of it, though a LoRA step does 69% of the FLOPs; a traffic estimate
  # puts the non-GEMM kernels at most of the step. A kernel profile of 3 extra steps says where the
  # time goes. Compile mode default, not CUDA graphs: the profiler then sees every kernel (under
  # graphs it sees graph launches); this run's img/s beside train_graphs_b256.md's says how much
  # launch overhead is left at this batch.
  # Session 10: PERF_ATTENTION=sdpa (the default since session 9; session 9's profile,
  # train_compile_b256_profile.md, is of bmm) and PERF_METHODS (default full lora).
  # Session 15: PERF_TAG names the files, e.g. PERF_METHODS="full lora rank0" PERF_TAG=_compile_sdpa_rank0_b256
  # (rank0: LoRA's step with adapters that cost nothing, the measured ceiling scripts/kernel_budget.py models).
  attn=${PERF_ATTENTION:-sdpa} methods=${PERF_METHODS:-full lora} tag=${PERF_TAG:-_compile_${attn}_b256}
  step "bench_train --profile 3: $methods at batch 256 with $attn attention, compiled (about 2 min each)"
  within 500 "$PY" scripts/bench_train.py --out "$out" --compile --methods $methods --batch-sizes 256 \
      --attention "$attn" --profile 3 --tag "$tag"
  ;;
graphs)
  # Issue 3's batch-64 criterion and issue 7's batch-256 ratios with the whole forward and backward
  # as CUDA graphs (torch.compile mode reduce-overhead, as stage 3's train.compile_mode): eager batch-64
  # steps are bound by Python per layer (session 4's profile), which graphs remove. peft stays eager,
  # the reference as its users run it. One batch size per process: a second shape would recompile.
  # Compiled, our LoRA takes the one-GEMM forward over [x, x A^T] (session 8: 1.07x full fine-tuning
  # at batch 64 and 256); lora_inplace pins the in-place rank-r update it replaced (0.96-0.97x).
  # ~100 s of compilation per compiled configuration, so one batch size per call (BATCHES, default
  # 256 then 64). COMPILE_MODE=max-autotune (also CUDA graphs, plus autotuned GEMMs) is issue 7's
  # next candidate for full fine-tuning's MFU; its compilation is slower: fewer GRAPH_METHODS.
  methods=${GRAPH_METHODS:-full lora lora_inplace peft}
  for b in ${BATCHES:-256 64}; do
    step "bench_train, CUDA graphs: $methods (peft eager, the rest compiled) at batch $b"
    within 520 "$PY" scripts/bench_train.py --out "$out" --compile --compile-mode "${COMPILE_MODE:-reduce-overhead}" \
        --eager-methods peft --methods $methods --batch-sizes $b --tag "_graphs${COMPILE_MODE:+_$COMPILE_MODE}_b$b"
  done
  ;;
sdpa)
  # Issue 7: Swin's window attention through F.scaled_dot_product_attention (model.attention=sdpa)
  # instead of timm's explicit matmuls, whose 49-token GEMMs ran on unaligned sm75 cutlass kernels,
  # ~22 ms of a 120 ms compiled step at batch 256 (session 9's profile). Eager first (both kinds,
  # every pair in one run, seconds), then CUDA graphs with sdpa at batch 256: full fine-tuning (its
  # MFU: 32.5% in session 9), SDPA_GRAPH_METHODS="full lora lora_joined" for the LoRA ratios too
  # (~80 s of compilation each). lora_joined: JoinedDenseWeight, the backward's two GEMMs over the
  # output gradient as one (session 10, with cuDNN attention: 1.02x plain LoRA under CUDA graphs,
  # 0.97x eager at batch 256; session 14, without cuDNN: 0.99x under graphs and compiled; not the default).
  # Session 10: sdpa keeps off cuDNN's attention kernel (orca.bodies.SDPA_BACKENDS), which PyTorch had
  # picked for LoRA's frozen bias (2x slower than the memory-efficient kernel); SDPA_EAGER_METHODS and
  # SDPA_EAGER_ATTENTION choose the eager run ("" skips it).
  eager_methods=${SDPA_EAGER_METHODS-full lora lora_joined peft} eager_attn=${SDPA_EAGER_ATTENTION:-bmm sdpa}
  if [ -n "$eager_methods" ]; then
    step "bench_train, eager: $eager_methods with $eager_attn attention at batch 64 and 256"
    within 150 "$PY" scripts/bench_train.py --out "$out" --methods $eager_methods --attention $eager_attn \
        --batch-sizes 64 256 --tag _eager_sdpa
  fi
  step "bench_train, CUDA graphs: ${SDPA_GRAPH_METHODS:-full} (and peft eager) with sdpa attention at batch 256"
  within 400 "$PY" scripts/bench_train.py --out "$out" --compile --compile-mode reduce-overhead \
      --eager-methods peft --methods ${SDPA_GRAPH_METHODS:-full} peft --attention sdpa --batch-sizes 256 --tag _graphs_sdpa_b256
  ;;
mim)
  darcy_in_background 10
  step "stage 0: fractal pretraining, classes + SimMIM"
  work=$(mktemp -d)
  within 560 bash scripts/stage0_pretrain.sh --export results/checkpoints/fractal_swin_mim.safetensors \
      configs/stage0_fractal_mim.yaml output_dir="$work"
  tar czf "$out/stage0_mim.tgz" --exclude=body.safetensors -C "$work" .
  split -n 3 -d results/checkpoints/fractal_swin_mim.safetensors "$out/fractal_swin_mim.safetensors.part-"
  sha256sum results/checkpoints/fractal_swin_mim.safetensors
  darcy_wait
  ;;
mim_evidence)
  sweeps "issue 4 evidence, classes + SimMIM body vs random body" 300 body_evidence_mim_patches body_evidence_mim_darcy
  ;;
droppath)
  darcy_in_background 10
  sweeps "issue 4 evidence, fractal vs random body, stochastic depth off" 300 body_evidence_patches_droppath
  darcy_wait
  sweeps "issue 4 evidence, fractal vs random body, stochastic depth off" 300 body_evidence_darcy_droppath
  ;;
evidence)
  darcy_in_background 10
  sweeps "issue 4 evidence, fractal vs random body" 300 body_evidence_patches
  darcy_wait
  sweeps "issue 4 evidence, fractal vs random body" 300 body_evidence_darcy body_evidence_darcy_merging \
      body_evidence_darcy_full body_evidence_darcy_head body_evidence_darcy_lr body_evidence_darcy_loraplus
  sweeps "issue 4 evidence, fractal vs random body, 40 epochs" 480 body_evidence_darcy_long
  sweeps "issue 4 evidence, fractal vs random body, LoRA r in {2, 32, 64}" 300 body_evidence_darcy_rank
  ;;
tables)
  # Run directories go to results/runs/<table>/ (the sweep files' output_dir), so that the
  # committed tables and make_tables.sh read them where a user's own runs would be. A sweep with a
  # pending Darcy run generates Darcy-85 first, on every core.
  sweeps "issue 8" 600 table2_darcy_attn table3_darcy_all table1_smallgap
  step "issue 8: stage 1 (OTDD) for Table 4, then its sweep"
  [ -f results/runs/table4/stage1_otdd_s0/summary.json ] || \
    within 120 bash scripts/stage1.sh configs/body_fractal.yaml name=t4_otdd task.name=darcy align.objective=otdd \
        align.source=fractal run_dir=results/runs/table4/stage1_otdd_s0
  sweeps "issue 8" 600 table4_darcy_otdd -- model.embedder_from=results/runs/table4/stage1_otdd_s0
  ;;
adaptive)
  # Stage-2 maps at the three budgets of configs/experiments/adaptive_*.yaml, then the sweeps
  # (uniform, AdaLoRA and adaptive at equal budgets), the other tasks' gap profiles and their knee
  # sweeps; run directories under results/runs/. One step at a time: stage 2's OTDD (POT) and PAD
  # (scikit-learn) are CPU-bound, like the sweeps' eager runs, and beside six of them a stage 2 that
  # takes ~45 s alone did not finish in 200 s (session 6).
  for task in natural_patches darcy; do
    name=adaptive_${task/natural_/}
    n=$(pending $name); (( ${n:-1} > 0 )) || continue
    rank_maps $task $name
    sweeps "issue 8 (d)" 600 $name
  done
  gap_profile digits digits
  gap_profile tones tones
  sweeps "issue 8 (a)-(b)" 600 ranks_patches ranks_digits ranks_tones
  # Held-out fractals last: 100 classes, so OTDD's exact OT per label pair made their stage 2 outlast
  # 119 s alone (session 6). The hypothesis reads the mmd profile, so that task measures the others.
  # Without OTDD it still outlasted 200 s alone (session 12) with all 5,000 training images as the
  # target sample; 2,000 is the size the other tasks' profiles have (digits 1,169, tones 2,100,
  # patches 2,144). The sweep goes first: its runs are the longer half.
  sweeps "issue 8 (a)-(b)" 600 ranks_heldout
  GAP_CAP=400 gap_profile heldout fractal_heldout 'task.options={cache: true, device: cuda}' \
      'rank.metrics=[mmd,sliced_wasserstein,sinkhorn,pad]' rank.n_target=2000
  ;;
ddp)
  # Issue 7's two-GPU criteria. The benchmark first, on an otherwise idle machine (eager steps at
  # batch 64 are bound by the CPU: Darcy generation beside them would skew the ratio).
  step "bench_ddp: full fine-tuning and LoRA r=8, batch 64 and 256 per GPU, 1 GPU then all GPUs (DDP)"
  within 330 "$PY" scripts/bench_ddp.py --out "$out" 2>&1 | tee "$out/bench_ddp.log"
  step "Darcy-85 generation (30 processes)"
  within 150 "$PY" -m orca data --config $darcy task.options.workers=30 >"$out/darcy_data.log" 2>&1
  sweeps "issue 7: Darcy-85 on 1 GPU and on 2 (DDP), same global batch" 300 ddp_darcy_1gpu ddp_darcy_2gpu
  ;;
issue8)
  # Everything issue 8 still lacks, in order of need (the tables' last few runs first: they are
  # short), within this call's budget; rerun until nothing is pending (each sweep skips finished
  # runs, each stage 2 an existing rank map or profile).
  for sub in tables adaptive; do
    left=$(( deadline - $(date +%s) ))
    if (( left >= 30 )); then bash "$0" $sub "$out/$sub" $left || echo "(part $sub exited $?)"; fi
  done
  ;;
pack)
  find results/runs -name summary.json -printf '%h\n' | sort | \
    tar czf "$out/runs.tgz" --exclude=ckpt --exclude=tb --exclude='*.pt' -T -
  echo "$(tar tzf "$out/runs.tgz" | grep -c summary.json) run directories in $out/runs.tgz"
  ;;
*)
  echo "unknown part '$part' (body, finetune, bench, perf, graphs, sdpa, mim, mim_evidence, droppath, evidence, tables, adaptive, issue8, ddp or pack)" >&2; exit 2 ;;
esac
step "done: $part"
