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
