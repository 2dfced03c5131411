# Sourced by scripts/reproduce.sh (and tests/test_prereg_pilots.py): the plateau pilots of the
# pre-registered knee sweeps, by task name X (configs/experiments/prereg/X_warmup.yaml, X_knee.yaml).
# A task's pilot is its knee file at uniform r = 8, seed 0, after its warm-up seed 0
# (results/preregistration.md, 4); the dial's is that at each of DIAL_PILOT_LEVELS, its two ends.
DIAL_PILOT_LEVELS="0 6"
PILOTS_DIR=${PILOTS_DIR:-results/pilots}   # the pilots' run directories and verdicts
# table_of FILE: the sweep table a sweep file writes to (its sweep.table)
table_of() { sed -n 's/^  table: *//p' "$1"; }
# pilot_suffixes TASK: the run-name infixes of TASK's pilots ("-" for none; "_level-L" per dial level)
pilot_suffixes() {
  if [ "$1" = dial ]; then local l; for l in $DIAL_PILOT_LEVELS; do printf '%s ' "_level-$l"; done; else echo "-"; fi
}
# pilot_keys TASK: the pilot verdicts TASK's sweep needs, as $PILOTS_DIR/<key>.json
pilot_keys() {
  local ktable sfx; ktable=$(table_of "configs/experiments/prereg/$1_knee.yaml")
  for sfx in $(pilot_suffixes "$1"); do printf '%s ' "$ktable${sfx#-}"; done
}
# pilots_passed TASK: whether every pilot TASK's sweep needs has plateaued
pilots_passed() {
  local key; for key in $(pilot_keys "$1"); do grep -q '"passed": true' "$PILOTS_DIR/$key.json" 2>/dev/null || return 1; done
}
# pilot_one TASK SUFFIX: its warm-up seed 0, then r = 8 seed 0, then the verdict.
pilot_one() {
  local task=$1 sfx=${2#-} warmup=configs/experiments/prereg/$1_warmup.yaml knee=configs/experiments/prereg/$1_knee.yaml
  local wtable ktable; wtable=$(table_of "$warmup") ktable=$(table_of "$knee")
  step "plateau pilot of $task${sfx}: warm-up seed 0, then r = 8 seed 0"
  within 600 "$PY" -m orca sweep "$warmup" --only "head${sfx}_s0" sweep.output_dir="$PILOTS_DIR"
  within 600 "$PY" -m orca sweep "$knee" --only "lora_r8${sfx}_s0" sweep.output_dir="$PILOTS_DIR" \
      model.warmup_from="$PILOTS_DIR/$wtable"
  "$PY" scripts/plateau_pilot.py "$PILOTS_DIR/$ktable/lora_r8${sfx}_s0" --out "$PILOTS_DIR/$ktable${sfx}.json" || \
    echo "($task${sfx}: no plateau, or the pilot did not finish)"
}

# The 12 pre-registered tasks by the key the analysis files their runs under
# (rank_estimation/preregistered.py, TASK_KEYS), the placebo comparison's two first.
PREREG_ALL_KEYS="darcy dial3 dial0 dial1 dial2 dial4 dial5 dial6 tones digits natural_patches fractal_heldout"
# prereg_task KEY: sets the array task_args to the overrides that make KEY's task exactly as its knee
# sweep trains it (same name and options), so that a gap and a knee are measured on the same data.
# RENDER_DEVICE (default cuda) renders the fractal tasks on another device, e.g. cpu for a gap profile
# on a machine without a GPU: the same images (tests/test_fractal.py: CUDA renders equal CPU's).
prereg_task() {
  local dev=${RENDER_DEVICE:-cuda}
  case $1 in
    dial[0-6]) task_args=(task.name=fractal_dial "task.options={level: ${1#dial}, cache: true, device: $dev}") ;;
    fractal_heldout) task_args=(task.name=fractal_heldout "task.options={cache: true, device: $dev}") ;;
    darcy | tones | digits | natural_patches) task_args=(task.name="$1") ;;
    *) echo "error: no pre-registered task '$1'; choose one of: $PREREG_ALL_KEYS" >&2; return 2 ;;
  esac
}
# finished DIR: whether DIR holds a finished run (a summary.json that is neither running nor failed:
# orca.runs.is_finished's rule)
finished() { [ -f "$1/summary.json" ] && ! grep -q '^  "status": "\(running\|failed\)"' "$1/summary.json"; }

# The equal-budget placebo comparison (results/preregistration.md, 5), read from its sweep file
# configs/experiments/prereg/placebo_KEY.yaml: the rank-map files of its grid, their budgets, and the
# head-only warm-ups its runs load (model.warmup_from: the knee sweep's, one per seed).
placebo_file() { echo "configs/experiments/prereg/placebo_$1.yaml"; }
# placebo_maps_of KEY: the rank-map files the sweep's grid names, in grid order
placebo_maps_of() { sed -n 's/^      - \(.*\.json\) *$/\1/p' "$(placebo_file "$1")"; }
# placebo_budgets KEY: the budgets of its stage-2 maps ({arm}_b{budget}.json), in grid order
placebo_budgets() { placebo_maps_of "$1" | sed -n 's/.*\/stage2_b\([0-9]*\)\.json$/\1/p' | tr '\n' ' '; }
# placebo_warmups_missing KEY: the warm-up run directories the sweep loads that hold no checkpoint
placebo_warmups_missing() {
  local file seeds sfx="" s dir; file=$(placebo_file "$1")
  dir=$(sed -n 's/^  warmup_from: *//p' "$file")
  seeds=$(sed -n 's/^    seed: *\[\(.*\)\] *$/\1/p' "$file" | tr -d ' ' | tr , ' ')
  [[ $1 == dial* ]] && sfx=_level-${1#dial}
  for s in $seeds; do [ -f "$dir/head${sfx}_s$s/ckpt/best.pt" ] || printf '%s ' "$dir/head${sfx}_s$s"; done
}
