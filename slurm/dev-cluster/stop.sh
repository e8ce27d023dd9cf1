#!/usr/bin/env bash
# slurm/dev-cluster/stop.sh [DIR] -- stop the daemons started by start.sh [DIR] (default /tmp/dist-ft-slurm).
# Only PIDs from DIR's pid files are signalled, and only if /proc/PID/comm is the expected daemon
# and its command line mentions DIR. Never kills by name. Keeps config/state/logs (rm -rf DIR to wipe).
#   SLURM_DEV_CANCEL_JOBS=1 (default): scancel this cluster's jobs first, so no slurmstepd outlives slurmd.
set -uo pipefail
DIR=$(realpath -m "${1:-/tmp/dist-ft-slurm}")
export SLURM_CONF="$DIR/etc/slurm.conf"
T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[%s %d.%03ds] %s\n' dev-cluster $((ms / 1000)) $((ms % 1000)) "$*"; }

alive_pid() {  # alive_pid NAME PIDFILE -> prints pid if it is our live NAME daemon
  local pid; pid=$(cat "$2" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ] \
    && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$DIR/" && echo "$pid"
}
stop_many() {  # stop_many NAME PIDFILE...  (SIGTERM all, wait up to 10 s, then SIGKILL leftovers)
  local name=$1 f pid pids=(); shift
  for f in "$@"; do
    [ -e "$f" ] || continue
    if pid=$(alive_pid "$name" "$f"); then log "stopping $name pid $pid ($(basename "$f"))"; kill -TERM "$pid" 2>/dev/null; pids+=("$pid")
    else log "$name ($f): not running"; fi
    rm -f "$f"
  done
  for _ in $(seq 1 100); do
    local left=(); for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && left+=("$pid"); done
    [ ${#left[@]} -eq 0 ] && return 0; sleep 0.1
  done
  for pid in "${left[@]}"; do log "$name pid $pid ignored SIGTERM, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null; done
}

if [ "${SLURM_DEV_CANCEL_JOBS:-1}" = 1 ] && alive_pid slurmctld "$DIR/run/slurmctld.pid" >/dev/null; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 100); do [ -z "$(squeue -h -t R,CG -o %A 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi

stop_many slurmd "$DIR"/run/slurmd-*.pid       # all slurmds in parallel
stop_many slurmctld "$DIR/run/slurmctld.pid"
stop_many munged "$DIR/munge/munged.pid"          # last: the others need munge while shutting down
log "stopped (config/state/logs kept in $DIR)"
