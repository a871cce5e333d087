#!/bin/sh
# Start a real single-node SLURM cluster (munged, slurmctld, slurmd) on this machine for tests.
# Idempotent: installs the Debian packages if missing, (re)writes slurm.conf, starts only the
# daemons that are not running, and waits until `sinfo` shows the node idle (or mixed/allocated).
# Needs root. Stop everything with .ci/stop-slurm.sh.
#
# Ports (environment variables; the defaults are Slurm's own, which the client tools then use
# through /etc/slurm/slurm.conf):
#   SLURMCTLD_PORT  slurmctld's port (SlurmctldPort), default 6817
#   SLURMD_PORT     slurmd's port (SlurmdPort), default 6818
# Changing one rewrites slurm.conf and restarts the daemon on the new port.
set -eu

SLURMCTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
SPOOL=/var/spool

need_install=0
for bin in sbatch squeue slurmctld slurmd munged; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need_install=1
done
if [ "$need_install" = 1 ]; then
    echo "start-slurm: installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$CONF_DIR" "$LOG_DIR" "$SPOOL/slurmctld" "$SPOOL/slurmd" /run/munge /var/lib/munge
# No cgroup.conf on purpose: Slurm 22.05 rejects `CgroupPlugin=disabled`, and
# proctrack/linuxproc + task/none need none.
# The partition allows up to 4 jobs to share a CPU: the node has 2 CPUs, and tests run two
# replicas plus a successor (or a foreign job) at the same time.
cat >"$CONF.tmp" <<EOF
# Written by .ci/start-slurm.sh: a single-node test cluster.
ClusterName=bioengine-ci
SlurmctldHost=localhost
SlurmctldAddr=127.0.0.1
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
MinJobAge=300
KillWait=10
SchedulerParameters=sched_interval=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
EOF
if ! cmp -s "$CONF.tmp" "$CONF" 2>/dev/null; then
    mv "$CONF.tmp" "$CONF"
    changed=1
else
    rm -f "$CONF.tmp"
    changed=0
fi

running() { pgrep -x "$1" >/dev/null 2>&1; }

if ! running munged; then
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    su -s /bin/sh munge -c /usr/sbin/munged
fi

# A port change needs a restart (scontrol reconfigure keeps the listening sockets).
listening() { ss -ltnH "sport = :$1" 2>/dev/null | grep -q .; }
if [ "$changed" = 1 ] && running slurmctld; then
    if listening "$SLURMCTLD_PORT" && listening "$SLURMD_PORT"; then
        scontrol reconfigure || true
    else
        for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
            [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
        done
        sleep 2
    fi
fi
if ! running slurmctld; then
    /usr/sbin/slurmctld -i
fi
if ! running slurmd; then
    /usr/sbin/slurmd -N localhost
fi

# Wait until the node accepts jobs.
i=0
while :; do
    state=$(sinfo -h -n localhost -o '%T' 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle | mixed | allocated) break ;;
        down* | drain* | fail*)
            scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    i=$((i + 1))
    if [ "$i" -ge 60 ]; then
        echo "start-slurm: node not idle after 30 s (state: '$state')" >&2
        tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
        exit 1
    fi
    sleep 0.5
done
echo "start-slurm: cluster up, node localhost is $state"
