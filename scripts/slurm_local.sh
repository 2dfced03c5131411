#!/usr/bin/env bash
# A single-node Slurm on this machine (Debian's slurm-wlm + munge, no systemd), for trying
# `sweep.sh --slurm --submit` without a cluster; CI and tests/test_slurm.py use it. Usage:
#   bash scripts/slurm_local.sh install    # apt-get install slurm-wlm munge (root; skipped when present)
#   bash scripts/slurm_local.sh start      # munged, slurmctld, slurmd up and the node idle (idempotent)
#   bash scripts/slurm_local.sh stop       # stop the slurmctld and slurmd this script started
#   eval "$(bash scripts/slurm_local.sh env)"   # SLURM_CONF for sbatch/squeue in this shell
# The cluster lives in $ORCA_SLURM_DIR (default /var/tmp/orca-slurm): its own slurm.conf (this host's
# CPUs and memory as `slurmd -C` reports them), state, logs and pid files, on ports 6917/6918, so it
# never touches /etc/slurm or a system Slurm on the default ports. Clients find it through SLURM_CONF.
# `start` exits 0 once a job can be scheduled; otherwise 1 with the reason on stderr.
set -euo pipefail

# The daemons (slurmctld, slurmd, munged) live in sbin, which a non-login or minimal PATH may lack.
for d in /usr/sbin /sbin /usr/local/sbin; do [[ :$PATH: == *:$d:* ]] || PATH=$PATH:$d; done
export PATH
DIR=${ORCA_SLURM_DIR:-/var/tmp/orca-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

die() { echo "slurm_local: $*" >&2; exit 1; }

logs_tail() {
  for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log; do
    [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 15 "$f" >&2; }
  done
  return 0
}

install_packages() {
  if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
      && command -v munged >/dev/null; then
    echo "slurm_local: slurm-wlm and munge already installed"
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "installing slurm-wlm and munge needs root (apt-get)"
  command -v apt-get >/dev/null || die "no apt-get here: install Slurm (slurmctld, slurmd, sbatch) and munge by hand"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  munge_ok && return
  [ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; } \
    || die "could not create /etc/munge/munge.key"
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged || die "munged did not start"
  for _ in $(seq 50); do munge_ok && return; sleep 0.1; done
  die "munged started but munge -n | unmunge fails"
}

write_conf() {
  local node
  node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
  [[ $node == NodeName=* ]] || die "slurmd -C did not describe this node: $node"
  mkdir -p "$DIR"/state "$DIR"/spool "$DIR"/log
  cat > "$CONF.tmp" <<EOF
# Written by scripts/slurm_local.sh: a single-node cluster on this host.
ClusterName=orca-local
SlurmctldHost=$(hostname -s)
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$node State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -N -o %t 2>/dev/null | head -n 1; }

start() {
  command -v slurmctld >/dev/null || die "Slurm is not installed (bash scripts/slurm_local.sh install, as root)"
  if running "$DIR/slurmctld.pid" && running "$DIR/slurmd.pid" && scontrol ping >/dev/null 2>&1 \
      && [[ $(node_state) == idle* || $(node_state) == mix* || $(node_state) == alloc* ]]; then
    echo "slurm_local: already up ($CONF, node $(node_state))"
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "starting munged, slurmctld and slurmd needs root"
  start_munge
  write_conf
  running "$DIR/slurmctld.pid" || slurmctld -f "$CONF" || { logs_tail; die "slurmctld did not start"; }
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
  scontrol ping >/dev/null 2>&1 || { logs_tail; die "slurmctld does not answer scontrol ping"; }
  running "$DIR/slurmd.pid" || slurmd -f "$CONF" || { logs_tail; die "slurmd did not start"; }
  local state=""
  for _ in $(seq 150); do
    state=$(node_state)
    case $state in
      idle*|mix*|alloc*) echo "slurm_local: up ($CONF, node $state)"; return ;;
      drain*|down*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  logs_tail
  die "the node did not become idle (state: ${state:-unknown})"
}

stop() {
  for d in slurmd slurmctld; do
    if running "$DIR/$d.pid"; then
      kill "$(cat "$DIR/$d.pid")" && echo "slurm_local: stopped $d"
    fi
  done
}

case "${1:-}" in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: bash scripts/slurm_local.sh install|start|stop|env" >&2; exit 2 ;;
esac
