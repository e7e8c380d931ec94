#!/usr/bin/env bash
# slurm/local/stop.sh - stop the daemons that slurm/local/start.sh started (by their saved PIDs only;
# daemons that were running before start.sh are left alone). Idempotent.
#   SLURM_LOCAL_DIR=/tmp/slurm-local   (same as for start.sh)
#   SLURM_LOCAL_KEEP_JOBS=0            1: do not scancel queued/running jobs first
set -uo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then exec sudo -E bash "$0" "$@"; fi
log() { echo "[slurm/local/stop.sh] $*" >&2; }
[ -d "$DIR/pids" ] || { log "nothing to stop ($DIR/pids missing)"; exit 0; }

stop_pid() { # stop_pid <pidfile> <expected cmdline substring>
  local f=$1 what=$2 p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null && grep -q "$what" "/proc/$p/cmdline" 2>/dev/null; then
    log "stopping $(basename "$f" .pid) (pid $p)"
    kill -TERM "$p"
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$p" 2>/dev/null; then log "pid $p still alive, SIGKILL"; kill -KILL "$p"; fi
  fi
  rm -f "$f"
}

# cancel jobs so no slurmstepd/job processes outlive slurmd
if [ "${SLURM_LOCAL_KEEP_JOBS:-0}" != 1 ] && [ -s "$DIR/pids/slurmctld.pid" ] \
   && kill -0 "$(cat "$DIR/pids/slurmctld.pid")" 2>/dev/null; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"; timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 100); do [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
for f in "$DIR"/pids/slurmd-*.pid; do stop_pid "$f" slurmd; done
stop_pid "$DIR/pids/slurmctld.pid" slurmctld
stop_pid "$DIR/pids/slurmdbd.pid" slurmdbd
stop_pid "$DIR/pids/mariadb.pid" mariadbd
stop_pid "$DIR/pids/munged.pid" munged
log "done"
