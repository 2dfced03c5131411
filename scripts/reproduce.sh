#!/usr/bin/env bash
# Reproduce the committed GPU results on one GPU, one part at a time.
# Usage: bash scripts/reproduce.sh PART OUT_DIR [SECONDS]
#   gpu_tests      the GPU-marked tests (QLoRA's NF4 error and memory, CUDA equal to CPU)
#   stage0         generate Darcy-85 (CPU, in the background) while stage 0 pretrains the fractal body,
#                  exported to results/checkpoints/fractal_swin.safetensors
#   stage0_mim     the same with the fractal classes plus SimMIM (configs/stage0_fractal_mim.yaml),
#                  exported to results/checkpoints/fractal_swin_mim.safetensors; the run directory
#                  (stage0_mim.tgz) and the checkpoint's sha256 go to OUT_DIR (SPLIT=N also writes
#                  the checkpoint there in N parts, for transports that limit a file's size)
#   swinb_darcy    Darcy-85, then Swin-B (random body) full fine-tuning on it with ORCA's recipe for
#                  20 epochs (compiled, CUDA graphs), stage 1 (OTDD, fractal source) and stage 2
#   bench          bench_adapters, bench_otdd, bench_stage2, bench_train (every method, batch 64 and
#                  256, activation checkpointing; the stage-2 rank map when RANK_MAP is set)
#   profile        kernel profile (bench_train --profile) of compiled full fine-tuning, LoRA and
#                  rank0 at batch 256: where a step's time goes (PROFILE_METHODS, PROFILE_TAG)
#   bench_graphs   bench_train with CUDA graphs (compile mode reduce-overhead): full fine-tuning and
#                  our LoRA compiled, peft eager, batch 256 then 64 (GRAPH_METHODS, BATCHES)
#   bench_sdpa     bench_train with window attention through F.scaled_dot_product_attention: eager
#                  (explicit matmuls and sdpa side by side, batch 64 and 256), then CUDA graphs at 256
#   body_evidence  the fractal body against a random one: natural patches; Darcy-85 with LoRA, with
#                  LoRA on the patch merges too, full fine-tuning, the frozen body alone, larger
#                  learning rates, LoRA+, 40 epochs and other ranks
#   body_evidence_mim       the classes + SimMIM body against a random one under LoRA
#   body_evidence_droppath  the fractal and the random body under LoRA with stochastic depth off
#   tables         the paper's Tables 2, 3, 1, then 4 with its stage 1
#   hypothesis     what scripts/hypothesis.py reads besides Table 3: stage-2 rank maps at three budgets
#                  and the adaptive vs uniform vs AdaLoRA sweeps per task, then the other tasks' knee
#                  sweeps and gap profiles
#   sweeps         tables, then hypothesis, with what is left of SECONDS
#   pilot          the plateau pilots of PREREG_TASKS (default: darcy; a name X means
#                  configs/experiments/prereg/X_warmup.yaml and X_knee.yaml), side by side: warm-up
#                  seed 0, then uniform r = 8 seed 0 (the dial: at levels 0 and 6), under
#                  results/pilots/, judged by scripts/plateau_pilot.py into results/pilots/<knee
#                  table>.json (the dial: <knee table>_level-L.json)
#   prereg         the knee sweeps of PREREG_TASKS whose pilot plateaued: every warm-up, then every
#                  rank x seed, PACK (default 24) runs to a process; PREREG_SEEDS="0 1" limits both
#                  to those seeds; PREREG_PHASE=warmups or knees runs one half (the adapter runs load
#                  their warm-ups' checkpoints: on another machine, bring them with the warmups part)
#   prereg_gaps    the pre-registered gap profiles (stage 2 with configs/experiments/prereg/gaps.yaml) of
#                  PREREG_KEYS (default all 12: darcy dial3 dial0..6 tones digits natural_patches
#                  fractal_heldout) into results/runs/prereg_gaps/KEY, one after another, each at most
#                  GAP_CAP seconds (default 400); finished profiles are skipped; RENDER_DEVICE=cpu (default
#                  cuda) renders the fractal tasks on the CPU, so a machine without a GPU can compute them
#   prereg_placebo the equal-budget placebo comparison on PLACEBO_KEYS (default: darcy dial3): stage-2 maps at
#                  the budgets of placebo_KEY.yaml from the measured gap profile (prereg_gaps first), the four
#                  arms' map files (scripts/placebo_maps.py), then the sweep, PACK runs to a process; it
#                  needs the knee sweep's warm-ups of the task's seeds (the prereg part, or warmups.tgz)
#   prereg_stage1  the pre-registered stage-1 arm: stage 1 (OTDD) on Darcy and dial levels 2 and 5,
#                  their gap profiles with the aligned embedder, then the aligned warm-ups and knees
#   ddp            (2+ GPUs) bench_ddp, then Darcy-85 full fine-tuning on 1 GPU and under DDP on 2
#   pack           tar every finished run directory under results/runs/ (one holding summary.json) and
#                  the placebo rank maps into OUT_DIR/runs.tgz, without checkpoints, TensorBoard files or *.pt
#   warmups        tar the finished warm-ups of the knee sweeps (results/runs/warmup_*) with the
#                  checkpoint their adapter runs load into OUT_DIR/warmups.tgz, so that a later machine
#                  trains a task's adapter runs without repeating its warm-ups
# Run directories of sweeps go to results/runs/ (where make_tables.sh and hypothesis.py read them);
# logs and bench outputs to OUT_DIR. Sweeps skip finished runs and resume interrupted ones, so a part
# can be called again until nothing is pending. SECONDS, if given, is the part's whole time budget:
# each step then runs under `timeout` with at most what is left (and at most its own cap), so a slow
# step cannot take the later steps with it; without it every step runs to completion. Steps run one
# after another unless said otherwise, so every timing is taken on an otherwise idle GPU. Sweeps run
# PER_GPU runs at a time (default 6): the fractal body's eager runs are bound by Python, so they share
# one GPU well. The pre-registered parts' packed sweeps take PACK_OVERRIDES, dotted overrides for
# every pack (e.g. "train.compile=true train.compile_backend=cudagraphs": speed, not data).
source "$(dirname "$0")/_env.sh"
parts="gpu_tests stage0 stage0_mim swinb_darcy bench profile bench_graphs bench_sdpa body_evidence body_evidence_mim body_evidence_droppath tables hypothesis sweeps pilot prereg prereg_gaps prereg_placebo prereg_stage1 ddp pack warmups"
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/reproduce.sh PART OUT_DIR [SECONDS]; PART: ${parts// / | }" >&2
  exit 2
fi
part=$1 out=$2 budget=${3:-}
[[ -z $budget || $budget =~ ^[0-9]+$ ]] || { echo "error: SECONDS must be a whole number of seconds, got '$budget'" >&2; exit 2; }
[[ " $parts " == *" $part "* ]] || { echo "error: unknown part '$part'; choose one of: $parts" >&2; exit 2; }
deadline=$(( $(date +%s) + ${budget:-0} ))
mkdir -p "$out"
darcy=configs/darcy_swinb.yaml
read -r -a pack_overrides <<< "${PACK_OVERRIDES:-}"
swinb_offline=(model.weights=none align.source=fractal)   # no hub weights, no CIFAR offline
per_gpu=${PER_GPU:-6}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}   # PER_GPU processes x every core's threads would thrash
step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
# within MAX_S CMD...: with a budget, run CMD under timeout min(MAX_S, time left); without one, run
# it to completion. A failure is logged, not fatal.
within() {
  local cap=$1; shift
  if [ -z "$budget" ]; then "$@" || echo "(exit $?): $*"; return 0; fi
  local left=$(( deadline - $(date +%s) ))
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
    within "$cap" "$PY" -m orca sweep "configs/experiments/$t.yaml" --per-gpu "$per_gpu" "$@"
  done
}
# pending NAME: how many runs of configs/experiments/NAME.yaml are not done yet.
pending() {
  "$PY" -m orca sweep "configs/experiments/$1.yaml" --dry-run 2>/dev/null | \
    sed -n 's/.* done, \([0-9]*\) pending$/\1/p'
}
# rank_maps TASK NAME: stage 2 on TASK at the three budgets of configs/experiments/NAME.yaml; the gaps
# are measured once (the first budget) and reused by the others (rank.gaps_from).
rank_maps() {
  local task=$1 name=$2 b measured=results/runs/$2/stage2_b282624 reuse
  for b in 282624 1177600 3014656; do
    [ -f results/runs/$name/stage2_b$b/rank_map.json ] && continue
    reuse=(); [ $b != 282624 ] && reuse=(rank.gaps_from=$measured)
    step "stage 2 on $task at budget $b ${reuse[*]}"
    within 200 bash scripts/stage2.sh configs/body_fractal.yaml name=$name task.name=$task rank.budget=$b \
        "${reuse[@]}" run_dir=results/runs/$name/stage2_b$b
  done
}
# gap_profile NAME TASK [OVERRIDE...]: stage 2 on TASK into results/runs/gaps_NAME/stage2, once, under
# within GAP_CAP (default 200 s).
gap_profile() {
  local name=$1 task=$2; shift 2
  finished results/runs/gaps_$name/stage2 && return 0
  step "gap profile of $task"
  within "${GAP_CAP:-200}" bash scripts/stage2.sh configs/body_fractal.yaml name=gaps_$name task.name=$task "$@" \
      run_dir=results/runs/gaps_$name/stage2
}

source scripts/_prereg.sh   # the plateau pilots' names and verdicts

case $part in
gpu_tests)
  step "GPU-marked tests (QLoRA NF4 error, bf16 match, memory)"
  within 300 "$PY" -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log"
  ;;
stage0)
  darcy_in_background 10
  step "stage 0: fractal pretraining"
  bash scripts/stage0_pretrain.sh --export results/checkpoints/fractal_swin.safetensors \
      configs/stage0_fractal.yaml output_dir="$out"
  darcy_wait && step "Darcy-85 ready: $(tail -n 1 "$out/darcy_data.log")"
  sha256sum results/checkpoints/fractal_swin.safetensors | tee "$out/fractal_swin.sha256"
  ;;
stage0_mim)
  darcy_in_background 10
  step "stage 0: fractal pretraining, classes + SimMIM"
  work=$(mktemp -d)
  within 560 bash scripts/stage0_pretrain.sh --export results/checkpoints/fractal_swin_mim.safetensors \
      configs/stage0_fractal_mim.yaml output_dir="$work"
  tar czf "$out/stage0_mim.tgz" --exclude=body.safetensors -C "$work" .
  sha256sum results/checkpoints/fractal_swin_mim.safetensors | tee "$out/fractal_swin_mim.sha256"
  if [ -n "${SPLIT:-}" ]; then   # `cat` the parts back together
    split -n "$SPLIT" -d results/checkpoints/fractal_swin_mim.safetensors "$out/fractal_swin_mim.safetensors.part-"
  fi
  darcy_wait
  ;;
swinb_darcy)
  step "Darcy-85 generation (16 processes)"
  within 200 "$PY" -m orca data --config $darcy task.options.workers=16 >"$out/darcy_data.log" 2>&1
  tail -n 2 "$out/darcy_data.log"
  step "stage 3: Swin-B full fine-tuning on Darcy-85, ORCA's recipe for 20 epochs (compiled, CUDA graphs)"
  within 340 "$PY" -m orca stage3 --config $darcy model.weights=none train.epochs=20 train.compile=true \
      train.compile_mode=reduce-overhead run_dir="$out/full_darcy_swinb"
  step "stage 1 on Darcy-85, Swin-B, OTDD against fractal source features"
  within 120 "$PY" -m orca stage1 --config $darcy "${swinb_offline[@]}" run_dir="$out/align_darcy_swinb"
  step "stage 2 on Darcy-85, Swin-B, the stage-1 embedder (bootstrap CIs for the cheap metrics)"
  within 200 "$PY" -m orca stage2 --config $darcy "${swinb_offline[@]}" run_dir="$out/gaps_darcy_swinb" \
      model.embedder_from="$out/align_darcy_swinb" 'rank.boot_metrics=[mmd,sliced_wasserstein,sinkhorn,pad]'
  ;;
bench)
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
profile)
  # A kernel profile of 3 extra steps per configuration says where a step's time goes (GEMMs,
  # attention, elementwise work). Compile mode default, not CUDA graphs: the profiler then sees every
  # kernel (under graphs it sees graph launches). rank0 is LoRA's step with adapters that cost
  # nothing (body frozen, no adapters, the gradient still crossing every block): the measured ceiling
  # that scripts/kernel_budget.py models from this profile.
  attn=${PROFILE_ATTENTION:-sdpa} methods=${PROFILE_METHODS:-full lora rank0}
  tag=${PROFILE_TAG:-_compile_${attn}_rank0_b256}
  step "bench_train --profile 3: $methods at batch 256 with $attn attention, compiled (about 2 min each)"
  within 500 "$PY" scripts/bench_train.py --out "$out" --compile --methods $methods --batch-sizes 256 \
      --attention "$attn" --profile 3 --tag "$tag"
  ;;
bench_graphs)
  # The whole forward and backward as CUDA graphs (torch.compile mode reduce-overhead, as stage 3's
  # train.compile_mode): eager steps at batch 64 are bound by Python per layer, which graphs remove.
  # peft stays eager, the reference as its users run it. One batch size per process: a second shape
  # would recompile. Compiled, our LoRA takes the one-GEMM forward over [x, x A^T]; lora_inplace is
  # the in-place rank-r update it replaced. ~100 s of compilation per compiled configuration.
  methods=${GRAPH_METHODS:-full lora lora_inplace peft}
  for b in ${BATCHES:-256 64}; do
    step "bench_train, CUDA graphs: $methods (peft eager, the rest compiled) at batch $b"
    within 520 "$PY" scripts/bench_train.py --out "$out" --compile --compile-mode "${COMPILE_MODE:-reduce-overhead}" \
        --eager-methods peft --methods $methods --batch-sizes $b --tag "_graphs${COMPILE_MODE:+_$COMPILE_MODE}_b$b"
  done
  ;;
bench_sdpa)
  # Swin's window attention through F.scaled_dot_product_attention (model.attention=sdpa) against
  # timm's explicit matmuls, whose 49-token GEMMs run on unaligned kernels. Eager first (both kinds,
  # every pair in one run), then CUDA graphs with sdpa at batch 256 (SDPA_GRAPH_METHODS, ~80 s of
  # compilation each). lora_joined computes the backward's two GEMMs over the output gradient as one.
  # sdpa keeps off cuDNN's attention kernel (orca.bodies.SDPA_BACKENDS), which PyTorch picks for a
  # frozen bias and which is 2x slower here than the memory-efficient kernel. SDPA_EAGER_METHODS and
  # SDPA_EAGER_ATTENTION choose the eager run ("" skips it).
  eager_methods=${SDPA_EAGER_METHODS-full lora lora_joined peft} eager_attn=${SDPA_EAGER_ATTENTION:-bmm sdpa}
  if [ -n "$eager_methods" ]; then
    step "bench_train, eager: $eager_methods with $eager_attn attention at batch 64 and 256"
    within 150 "$PY" scripts/bench_train.py --out "$out" --methods $eager_methods --attention $eager_attn \
        --batch-sizes 64 256 --tag _eager_sdpa
  fi
  step "bench_train, CUDA graphs: ${SDPA_GRAPH_METHODS:-full lora} (and peft eager) with sdpa attention at batch 256"
  within 400 "$PY" scripts/bench_train.py --out "$out" --compile --compile-mode reduce-overhead \
      --eager-methods peft --methods ${SDPA_GRAPH_METHODS:-full lora} peft --attention sdpa --batch-sizes 256 --tag _graphs_sdpa_b256
  ;;
body_evidence)
  darcy_in_background 10
  sweeps "fractal vs random body" 300 body_evidence_patches
  darcy_wait
  sweeps "fractal vs random body" 300 body_evidence_darcy body_evidence_darcy_merging \
      body_evidence_darcy_full body_evidence_darcy_head body_evidence_darcy_lr body_evidence_darcy_loraplus
  sweeps "fractal vs random body, 40 epochs" 480 body_evidence_darcy_long
  sweeps "fractal vs random body, LoRA r in {2, 32, 64}" 300 body_evidence_darcy_rank
  ;;
body_evidence_mim)
  sweeps "classes + SimMIM body vs random body" 300 body_evidence_mim_patches body_evidence_mim_darcy
  ;;
body_evidence_droppath)
  darcy_in_background 10
  sweeps "fractal vs random body, stochastic depth off" 300 body_evidence_patches_droppath
  darcy_wait
  sweeps "fractal vs random body, stochastic depth off" 300 body_evidence_darcy_droppath
  ;;
tables)
  # Run directories go to results/runs/<table>/ (the sweep files' output_dir), so that the
  # committed tables and make_tables.sh read them where a user's own runs would be. A sweep with a
  # pending Darcy run generates Darcy-85 first, on every core.
  sweeps "the paper's tables" 600 table2_darcy_attn table3_darcy_all table1_smallgap
  step "stage 1 (OTDD) for Table 4, then its sweep"
  [ -f results/runs/table4/stage1_otdd_s0/summary.json ] || \
    within 120 bash scripts/stage1.sh configs/body_fractal.yaml name=t4_otdd task.name=darcy align.objective=otdd \
        align.source=fractal run_dir=results/runs/table4/stage1_otdd_s0
  sweeps "the paper's tables" 600 table4_darcy_otdd -- model.embedder_from=results/runs/table4/stage1_otdd_s0
  ;;
hypothesis)
  # Stage-2 maps at the three budgets of configs/experiments/adaptive_*.yaml, then the sweeps
  # (uniform, AdaLoRA and adaptive at equal budgets), the other tasks' gap profiles and their knee
  # sweeps; run directories under results/runs/. One step at a time: stage 2's OTDD (POT) and PAD
  # (scikit-learn) are CPU-bound, like the sweeps' eager runs, and beside six of them a stage 2 that
  # takes ~45 s alone did not finish in 200 s.
  for task in natural_patches darcy; do
    name=adaptive_${task/natural_/}
    n=$(pending $name); (( ${n:-1} > 0 )) || continue
    rank_maps $task $name
    sweeps "adaptive vs uniform vs AdaLoRA" 600 $name
  done
  gap_profile digits digits
  gap_profile tones tones
  sweeps "knee rank per task" 600 ranks_patches ranks_digits ranks_tones
  # Held-out fractals last: 100 classes, so OTDD's exact OT per label pair makes their stage 2 far
  # slower than the others'; the hypothesis reads the mmd profile, so that task measures the other
  # metrics only. Its target sample is 2,000 images, the size of the other tasks' profiles (digits
  # 1,169, tones 2,100, patches 2,144). The sweep goes first: its runs are the longer half.
  sweeps "knee rank per task" 600 ranks_heldout
  GAP_CAP=400 gap_profile heldout fractal_heldout 'task.options={cache: true, device: cuda}' \
      'rank.metrics=[mmd,sliced_wasserstein,sinkhorn,pad]' rank.n_target=2000
  ;;
pilot)
  # The pilot trains apart from the sweep (results/pilots/), so a knee sweep's runs all come from
  # one invocation. A pilot that does not plateau stops its task: the epoch count is doubled in the
  # committed task files before anything else of that task runs (results/preregistration.md, 4).
  # Tasks' pilots run side by side (one process each: a lone eager run leaves the GPU mostly idle);
  # each pilot's log is OUT_DIR/pilot_<task>[_level-L].log.
  for task in ${PREREG_TASKS:-darcy}; do
    for sfx in $(pilot_suffixes "$task"); do pilot_one "$task" "$sfx" >"$out/pilot_$task${sfx#-}.log" 2>&1 & done
  done
  wait
  cat "$out"/pilot_*.log | grep "^\[plateau_pilot\]\|^(" || true
  ;;
prereg)
  for task in ${PREREG_TASKS:-darcy}; do
    warmup=configs/experiments/prereg/${task}_warmup.yaml knee=configs/experiments/prereg/${task}_knee.yaml
    if ! pilots_passed "$task"; then
      echo "($task: no passing pilot in $PILOTS_DIR for $(pilot_keys "$task"); run the pilot part first)"; continue
    fi
    step "knee sweep of $task: warm-ups, then ranks x seeds${PREREG_SEEDS:+ (seeds $PREREG_SEEDS)}, ${PACK:-24} runs to a process"
    seeds=(); [ -n "${PREREG_SEEDS:-}" ] && seeds=("sweep.grid.seed=[$(echo $PREREG_SEEDS | tr ' ' ,)]")
    [ "${PREREG_PHASE:-both}" != knees ] && within 600 "$PY" -m orca sweep "$warmup" --pack "${PACK:-24}" "${seeds[@]}" "${pack_overrides[@]}"
    [ "${PREREG_PHASE:-both}" != warmups ] && within 600 "$PY" -m orca sweep "$knee" --pack "${PACK:-24}" "${seeds[@]}" "${pack_overrides[@]}"
  done
  ;;
prereg_gaps)
  # One profile at a time: a profile's OTDD and bootstraps keep the GPU busy on their own.
  for key in ${PREREG_KEYS:-$PREREG_ALL_KEYS}; do
    prereg_task "$key"
    gaps=results/runs/prereg_gaps/$key
    finished $gaps && { echo "($key: gap profile finished in $gaps)"; continue; }
    step "gap profile of $key (stage 2, configs/experiments/prereg/gaps.yaml)"
    within "${GAP_CAP:-400}" bash scripts/stage2.sh configs/experiments/prereg/gaps.yaml "${task_args[@]}" run_dir=$gaps
  done
  ;;
prereg_placebo)
  # Each step is skipped when its output exists, so the part resumes where a budget cut it.
  for key in ${PLACEBO_KEYS:-darcy dial3}; do
    [ -f "$(placebo_file "$key")" ] || { echo "error: PLACEBO_KEYS names '$key', which has no placebo sweep" \
        "$(placebo_file "$key"); the pre-registered ones are darcy and dial3" >&2; exit 2; }
    prereg_task "$key"
    gaps=results/runs/prereg_gaps/$key
    if ! finished $gaps; then echo "($key: no finished gap profile in $gaps; run the prereg_gaps part first)"; continue; fi
    budgets=($(placebo_budgets "$key")) stage2=() ready=1
    for b in "${budgets[@]}"; do
      s2=results/runs/prereg_stage2/${key}_b$b
      stage2+=($s2)
      finished $s2 && continue
      step "stage-2 map of $key at budget $b from its gap profile"
      within 120 bash scripts/stage2.sh configs/experiments/prereg/gaps.yaml "${task_args[@]}" name=prereg_stage2 \
          rank.allocate=true rank.budget=$b rank.gaps_from=$gaps run_dir=$s2
      finished $s2 || ready=0
    done
    if (( ! ready )); then echo "($key: a stage-2 map did not finish; the maps and the sweep wait for it)"; continue; fi
    maps=($(placebo_maps_of "$key")) absent=0
    for m in "${maps[@]}"; do [ -f "$m" ] || absent=1; done
    if (( absent )); then
      step "the four arms' rank maps of $key at budgets ${budgets[*]}"
      within 120 "$PY" scripts/placebo_maps.py --out "$(dirname "${maps[0]}")" --stage2 "${stage2[@]}" --budgets "${budgets[@]}"
    fi
    missing=$(placebo_warmups_missing "$key")
    if [ -n "$missing" ]; then
      echo "($key: the placebo runs load the knee sweep's warm-ups, and these have no checkpoint: ${missing% };"
      echo " train them first (PREREG_TASKS=${key%%[0-9]*} PREREG_PHASE=warmups with the prereg part) or untar warmups.tgz)"
      continue
    fi
    step "placebo sweep of $key: 4 arms x ${#budgets[@]} budgets x 3 seeds, ${PACK:-24} runs to a process"
    within 600 "$PY" -m orca sweep "$(placebo_file "$key")" --pack "${PACK:-24}" "${pack_overrides[@]}"
  done
  ;;
prereg_stage1)
  for key in darcy dial2 dial5; do
    prereg_task "$key"
    s1=results/runs/prereg_stage1/$key
    step "stage 1 (OTDD) on $key"
    finished $s1 || within 600 bash scripts/stage1.sh configs/experiments/prereg/stage1.yaml "${task_args[@]}" run_dir=$s1
    step "gap profile of $key with the aligned embedder"
    finished results/runs/prereg_gaps_aligned/$key || within 400 bash scripts/stage2.sh \
        configs/experiments/prereg/gaps_aligned.yaml "${task_args[@]}" model.embedder_from=$s1 run_dir=results/runs/prereg_gaps_aligned/$key
  done
  for name in darcy dial; do
    step "aligned warm-ups and knees: $name, ${PACK:-24} runs to a process"
    within 600 "$PY" -m orca sweep configs/experiments/prereg/${name}_aligned_warmup.yaml --pack "${PACK:-24}" "${pack_overrides[@]}"
    within 600 "$PY" -m orca sweep configs/experiments/prereg/${name}_aligned_knee.yaml --pack "${PACK:-24}" "${pack_overrides[@]}"
  done
  ;;
ddp)
  # Needs 2+ GPUs. The benchmark first, on an otherwise idle machine (eager steps at batch 64 are
  # bound by the CPU: Darcy generation beside them would skew the ratio).
  step "bench_ddp: full fine-tuning and LoRA r=8, batch 64 and 256 per GPU, 1 GPU then all GPUs (DDP)"
  within 330 "$PY" scripts/bench_ddp.py --out "$out" 2>&1 | tee "$out/bench_ddp.log"
  step "Darcy-85 generation (30 processes)"
  within 150 "$PY" -m orca data --config $darcy task.options.workers=30 >"$out/darcy_data.log" 2>&1
  sweeps "Darcy-85 on 1 GPU and on 2 (DDP), same global batch" 300 ddp_darcy_1gpu ddp_darcy_2gpu
  ;;
sweeps)
  # Everything the tables and the hypothesis still lack, the tables' short runs first; call again
  # until nothing is pending (each sweep skips finished runs, each stage 2 an existing map or profile).
  for sub in tables hypothesis; do
    if [ -z "$budget" ]; then bash "$0" $sub "$out/$sub" || echo "(part $sub exited $?)"; continue; fi
    left=$(( deadline - $(date +%s) ))
    if (( left >= 30 )); then bash "$0" $sub "$out/$sub" $left || echo "(part $sub exited $?)"; fi
  done
  ;;
pack)
  find results/runs \( -name summary.json -printf '%h\n' \) -o \( -path 'results/runs/placebo_maps/*.json' -print \) | \
    sort | tar czf "$out/runs.tgz" --exclude=ckpt --exclude=tb --exclude='*.pt' -T -
  echo "$(tar tzf "$out/runs.tgz" | grep -c summary.json) run directories in $out/runs.tgz"
  ;;
warmups)
  # The finished warm-ups with the checkpoint their adapter runs load (ckpt/best.pt), for a later
  # machine: untar OUT_DIR/warmups.tgz in the repo root there, and `prereg` trains only the adapter
  # runs. A warm-up checkpoint holds the embedder, the head and the body's buffers; Darcy's dense
  # head adds ~6 MB to each.
  find results/runs -path '*/warmup_*/*' -name summary.json -printf '%h\n' 2>/dev/null | sort | \
    tar czf "$out/warmups.tgz" --exclude=tb --exclude=last.pt -T -
  echo "$(tar tzf "$out/warmups.tgz" | grep -c 'ckpt/best.pt$') warm-up checkpoints in $out/warmups.tgz ($(du -h "$out/warmups.tgz" | cut -f1))"
  ;;
esac
step "done: $part"
