#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try (and test) carlos's cluster path:
#   scripts/local_slurm.sh up       install slurm-wlm and munge where missing (apt-get, as root), write a
#                                   one-node config, start munged, slurmctld and slurmd, wait for the node
#   scripts/local_slurm.sh down     stop what `up` started (by the daemons' pid files, nothing broader)
#   scripts/local_slurm.sh status   sinfo, or why there is no cluster
# Running `up` twice is harmless. Written by hand because no package sets up a single-node cluster
# without systemd: Debian's slurm-wlm expects systemd units and a site's slurm.conf.
set -euo pipefail

STATE=${CARLOS_SLURM_DIR:-/var/lib/carlos-slurm}   # config, state, logs and pid files of this cluster
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)

die() { echo "local_slurm: $*" >&2; exit 2; }

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed, and installing them needs root: run as root, or: sudo apt-get install slurm-wlm munge"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get here; install SLURM with this system's package manager"
    apt-get update -qq >/dev/null
    # the daemons and the client only: slurm-wlm's recommends add some 40 plugin and -dev packages
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    mkdir -p "$STATE"/{spool,state,log} /etc/slurm /run/munge /var/log/munge
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
    cat >"$CONF.new" <<EOF
# written by carlos's scripts/local_slurm.sh: one node, no accounting, no cgroups
ClusterName=carlos
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again: 120 by default, 10 on this test node
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
# look for startable jobs every 2 s rather than every 30-60 s: a job requeued here starts within seconds
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
KillWait=10
MinJobAge=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    if cmp -s "$CONF.new" "$CONF"; then rm "$CONF.new"; else
        # a changed config (another machine size, a newer version of this script) needs fresh daemons
        running "$STATE/slurmctld.pid" && down >/dev/null && sleep 1
        mv "$CONF.new" "$CONF"
    fi
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown -R munge:munge /etc/munge /run/munge /var/log/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
    install
    [ "$(id -u)" = 0 ] || die "starting the SLURM daemons needs root"
    write_config
    running /run/munge/munged.pid || { runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid 2>/dev/null || /usr/sbin/munged --force; }
    running "$STATE/slurmctld.pid" || /usr/sbin/slurmctld
    running "$STATE/slurmd.pid" || /usr/sbin/slurmd
    for _ in $(seq 1 60); do
        if sinfo -h -N -o "%T" 2>/dev/null | grep -qx "idle"; then
            sinfo
            return
        fi
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        sleep 1
    done
    die "the node did not become idle in 60 s; see $STATE/log/slurmctld.log and slurmd.log"
}

down() {
    for pid in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
        if running "$pid"; then kill "$(cat "$pid")"; fi
    done
    echo "local_slurm: stopped"
}

status() {
    command -v sinfo >/dev/null || die "SLURM is not installed (scripts/local_slurm.sh up installs it)"
    sinfo || die "no SLURM controller answers (scripts/local_slurm.sh up starts one)"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) die "usage: scripts/local_slurm.sh up|down|status" ;;
esac
