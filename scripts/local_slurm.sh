#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying sweep.py's SLURM executor on a laptop and for
# the `slurm` tests. Needs root and Debian's slurm-wlm and munge (apt-get install slurm-wlm munge).
#
#   eval "$(bash scripts/local_slurm.sh start)"   # starts munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   sbatch --wrap "hostname"; squeue                  # a real cluster: arrays, dependencies, scancel, sacct-less
#   bash scripts/local_slurm.sh stop                  # stops the three daemons and removes the folder
#   bash scripts/local_slurm.sh status                # says whether it runs (exit 0) or not (exit 1)
#
# Everything lives in one folder (LOCAL_SLURM_DIR, default /tmp/local-slurm): slurm.conf, state, spool,
# logs and the pid files. The node has this machine's CPUs and memory; the partition is called `local`.
set -euo pipefail
DIR=${LOCAL_SLURM_DIR:-/tmp/local-slurm}
CONF="$DIR/slurm.conf"
cmd=${1:-status}

need() { command -v "$1" >/dev/null 2>&1 || { echo "local_slurm: $1 not found (apt-get install slurm-wlm munge)" >&2; exit 2; }; }

running() { [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null \
            && [ -f "$DIR/slurmd.pid" ] && kill -0 "$(cat "$DIR/slurmd.pid")" 2>/dev/null; }

start() {
    [ "$(id -u)" -eq 0 ] || { echo "local_slurm: needs root (slurmd runs jobs as their users)" >&2; exit 2; }
    for c in munged slurmctld slurmd sinfo; do need "$c"; done
    if running; then echo "export SLURM_CONF=$CONF"; return 0; fi
    mkdir -p "$DIR"/{state,spool,log}
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat > "$CONF" <<EOF
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    # munge: a key and a running daemon (Debian's package makes the key; make one if it is missing)
    mkdir -p /etc/munge /var/run/munge /var/log/munge /var/lib/munge
    [ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown -R munge:munge /etc/munge /var/run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    pgrep -x munged >/dev/null || runuser -u munge -- munged 2>/dev/null || munged --force
    SLURM_CONF=$CONF slurmctld -f "$CONF"
    SLURM_CONF=$CONF slurmd -f "$CONF"
    for _ in $(seq 60); do
        if SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 1
    done
    echo "local_slurm: the node did not come up within 60 s; see $DIR/log" >&2
    exit 1
}

stop() {
    for d in slurmd slurmctld; do
        if [ -f "$DIR/$d.pid" ]; then kill "$(cat "$DIR/$d.pid")" 2>/dev/null || true; fi
    done
    sleep 1
    pkill -f "slurmctld -f $CONF" 2>/dev/null || true
    pkill -f "slurmd -f $CONF" 2>/dev/null || true
    rm -rf "$DIR"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) if running; then echo "running (SLURM_CONF=$CONF)"; else echo "not running"; exit 1; fi ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
