#!/bin/sh
# Stop the single-node SLURM cluster that .ci/start-slurm.sh started (jobs, slurmd, slurmctld,
# munged). Idempotent; leaves the packages and slurm.conf in place.
set -u

stop_daemon() {
    name=$1
    pidfile=$2
    pid=""
    [ -s "$pidfile" ] && pid=$(cat "$pidfile")
    [ -n "$pid" ] || pid=$(pgrep -x "$name" | head -n 1 || true)
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    i=0
    while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 50 ]; do
        sleep 0.2
        i=$((i + 1))
    done
    kill -KILL "$pid" 2>/dev/null || true
}

if command -v scancel >/dev/null 2>&1 && pgrep -x slurmctld >/dev/null 2>&1; then
    scancel --user="$(id -un)" 2>/dev/null || true
fi
stop_daemon slurmd /run/slurmd.pid
stop_daemon slurmctld /run/slurmctld.pid
stop_daemon munged /run/munge/munged.pid
echo "stop-slurm: stopped"
