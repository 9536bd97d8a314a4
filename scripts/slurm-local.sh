#!/usr/bin/env bash
# slurm-local.sh — a real single-node SLURM cluster on localhost, for tests.
#
# Usage (as root, on Debian/Ubuntu):
#   scripts/slurm-local.sh [start]   install if missing, configure, start, wait until idle
#   scripts/slurm-local.sh stop      stop slurmd, slurmctld and munged (by their pid files)
#   scripts/slurm-local.sh restart   stop, then start
#   scripts/slurm-local.sh status    show daemons and `sinfo`
#
# What "start" does (idempotent: safe to run again while the cluster is up):
#   1. apt-get installs slurmctld slurmd slurm-client munge if any is missing;
#   2. makes two fake GPU character devices (/dev/fakegpu0, /dev/fakegpu1);
#   3. writes /etc/slurm/slurm.conf + gres.conf: ONE node on 127.0.0.1 with
#      Gres=gpu:2 backed by those devices (SLURM then sets CUDA_VISIBLE_DEVICES
#      for jobs asking for --gpus/--gres=gpu), $SLURM_LOCAL_CPUS advertised
#      CPUs (SlurmdParameters=config_overrides), DefMemPerCPU, MinJobAge=300
#      (squeue-based job status needs finished jobs kept >= 3x the plugin's
#      first status interval, 40 s by default), no slurmdbd / accounting;
#   4. starts munged (as the munge user), slurmctld, slurmd — no systemd;
#      daemons already running with the same config are left alone, a changed
#      config restarts them;
#   5. waits until `sinfo` shows the node idle (or mixed/allocated).
#
# Environment knobs (defaults in brackets):
#   SLURM_LOCAL_CPUS [8]        CPUs the node advertises (may exceed real cores)
#   SLURM_LOCAL_MEM_MB [80% of MemTotal, at most 65536]  node RealMemory
#   SLURM_LOCAL_DEFMEM [512]    DefMemPerCPU (MB) for jobs that give no --mem
#   SLURM_LOCAL_PARTITION [local]
#   SLURM_LOCAL_TIMEOUT [60]    seconds to wait for the node to become idle
set -euo pipefail

CMD="${1:-start}"
CPUS="${SLURM_LOCAL_CPUS:-8}"
DEFMEM="${SLURM_LOCAL_DEFMEM:-512}"
PARTITION="${SLURM_LOCAL_PARTITION:-local}"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"
CONF_DIR=/etc/slurm
SLURM_CONF="$CONF_DIR/slurm.conf"
GRES_CONF="$CONF_DIR/gres.conf"
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
NGPU=2
GPU_DEVS=(/dev/fakegpu0 /dev/fakegpu1)
GPU_MAJOR=240 # 240-254: "local/experimental use" char majors; no driver behind them

say() { echo "[slurm-local] $*"; }
die() {
    echo "[slurm-local] ERROR: $*" >&2
    exit 1
}

# Print the tail of a daemon log, to explain a failure.
show_log() {
    local f="$1"
    if [[ -s "$f" ]]; then
        echo "----- last lines of $f -----" >&2
        tail -n 15 "$f" >&2
        echo "-----" >&2
    fi
}

# pid from a pid file, if that process is alive.
live_pid() {
    local f="$1" pid
    [[ -s "$f" ]] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# Stop the daemon whose pid file is $2 (by pid only, never by name).
stop_daemon() {
    local name="$1" f="$2" pid i
    if ! pid="$(live_pid "$f")"; then
        say "$name is not running"
        rm -f "$f"
        return 0
    fi
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name did not exit after 10 s; sending SIGKILL to pid $pid"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$f"
}

do_stop() {
    [[ $EUID -eq 0 ]] || die "must run as root (stopping the SLURM daemons)"
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    stop_daemon munged "$MUNGE_PID"
    say "stopped"
}

install_packages() {
    local missing=() p
    for p in slurmctld slurmd slurm-client munge; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        say "packages present: slurmctld slurmd slurm-client munge"
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
    say "installing ${missing[*]} (apt-get, quiet)"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' init scripts from starting daemons with their own
    # config during installation; we start them ourselves below.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        made_policy=1
    fi
    local rc=0
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        >/tmp/slurm-local-apt.log 2>&1 || rc=$?
    ((made_policy)) && rm -f "$policy"
    if ((rc != 0)); then
        tail -n 20 /tmp/slurm-local-apt.log >&2
        die "apt-get failed (exit $rc); full log in /tmp/slurm-local-apt.log"
    fi
    say "installed ${missing[*]}"
}

make_fake_gpus() {
    local i dev
    for i in $(seq 0 $((NGPU - 1))); do
        dev="${GPU_DEVS[$i]}"
        if [[ -c "$dev" ]]; then continue; fi
        rm -f "$dev"
        mknod -m 666 "$dev" c "$GPU_MAJOR" "$i" ||
            die "mknod $dev failed (no CAP_MKNOD in this container?); gres.conf needs File= devices"
    done
    say "fake GPUs: ${GPU_DEVS[*]}"
}

default_mem_mb() {
    local kb mb
    kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
    mb=$((kb * 8 / 10240))
    ((mb > 65536)) && mb=65536
    echo "$mb"
}

# Write $2 to file $1 only when the content differs; return 0 if it changed.
write_if_changed() {
    local f="$1" content="$2"
    if [[ -f "$f" ]] && [[ "$(cat "$f")" == "$content" ]]; then
        return 1
    fi
    printf '%s\n' "$content" >"$f"
    return 0
}

write_config() {
    local node mem changed=1
    node="$(hostname -s)"
    mem="${SLURM_LOCAL_MEM_MB:-$(default_mem_mb)}"
    NODE="$node"
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
    local conf
    conf="# Written by foldsoup scripts/slurm-local.sh — single-node test cluster.
ClusterName=foldsoup-local
MailProg=/bin/true
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmdSpoolDir=${STATE_DIR}/slurmd
StateSaveLocation=${STATE_DIR}/slurmctld
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# No slurmdbd: sacct cannot work, job status must come from squeue, so keep
# finished jobs visible for 5 minutes (>= 3x the plugin's 40 s first check).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
# Let a small machine advertise more CPUs than it has.
SlurmdParameters=config_overrides
# Without a default, a job without --mem would take all of the node's memory.
DefMemPerCPU=${DEFMEM}
GresTypes=gpu
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${CPUS} Boards=1 SocketsPerBoard=1 CoresPerSocket=${CPUS} ThreadsPerCore=1 RealMemory=${mem} Gres=gpu:${NGPU} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    local gres
    gres="# Written by foldsoup scripts/slurm-local.sh. File= is required: a bare
# Count= leaves the node drained. SLURM derives CUDA_VISIBLE_DEVICES from the
# index of the device a job is given.
AutoDetect=off
NodeName=${node} Name=gpu File=/dev/fakegpu[0-$((NGPU - 1))]"
    write_if_changed "$SLURM_CONF" "$conf" || changed=0
    write_if_changed "$GRES_CONF" "$gres" && changed=1
    # Older Debian releases read /etc/slurm-llnl.
    if [[ -d /etc/slurm-llnl ]]; then
        ln -sf "$SLURM_CONF" /etc/slurm-llnl/slurm.conf
        ln -sf "$GRES_CONF" /etc/slurm-llnl/gres.conf
    fi
    CONFIG_CHANGED=$changed
    say "config: $SLURM_CONF (node $node, CPUs=$CPUS, RealMemory=${mem}MB, gpu:$NGPU, partition $PARTITION)$( ((changed)) && echo ' [written]' || echo ' [unchanged]')"
}

start_munge() {
    if live_pid "$MUNGE_PID" >/dev/null; then
        say "munged already running"
    else
        id munge >/dev/null 2>&1 || die "user 'munge' missing (munge package broken?)"
        if [[ ! -s /etc/munge/munge.key ]]; then
            say "creating /etc/munge/munge.key"
            if command -v mungekey >/dev/null; then
                runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
            else
                dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
            fi
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge
        chmod 755 /run/munge
        say "starting munged as user munge"
        runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" ||
            {
                show_log /var/log/munge/munged.log
                die "munged failed to start"
            }
    fi
    local i
    for i in $(seq 1 25); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    show_log /var/log/munge/munged.log
    die "munge does not work (munge -n | unmunge fails)"
}

start_slurmctld() {
    if live_pid "$CTLD_PID" >/dev/null; then
        say "slurmctld already running"
    else
        say "starting slurmctld"
        /usr/sbin/slurmctld || {
            show_log "$LOG_DIR/slurmctld.log"
            die "slurmctld failed to start"
        }
    fi
    local i
    for i in $(seq 1 50); do
        scontrol ping 2>/dev/null | grep -q "is UP" && return 0
        sleep 0.2
    done
    show_log "$LOG_DIR/slurmctld.log"
    die "slurmctld does not answer 'scontrol ping' after 10 s"
}

start_slurmd() {
    if live_pid "$SLURMD_PID" >/dev/null; then
        say "slurmd already running"
        return 0
    fi
    say "starting slurmd"
    /usr/sbin/slurmd || {
        show_log "$LOG_DIR/slurmd.log"
        die "slurmd failed to start"
    }
}

wait_idle() {
    local t0 state resumed=0
    t0=$SECONDS
    while ((SECONDS - t0 < TIMEOUT)); do
        state="$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -n1 || true)"
        case "$state" in
        idle | mix | alloc | comp)
            say "node $NODE is $state"
            sinfo
            return 0
            ;;
        drain* | drng | down*)
            # e.g. drained by an earlier bad config; ask once to resume it.
            if ((!resumed)); then
                say "node $NODE is '$state'; resuming it"
                scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
                resumed=1
            fi
            ;;
        esac
        sleep 0.5
    done
    sinfo -R >&2 || true
    show_log "$LOG_DIR/slurmd.log"
    show_log "$LOG_DIR/slurmctld.log"
    die "node $NODE not idle after ${TIMEOUT}s (state: '${state:-none}')"
}

do_start() {
    [[ $EUID -eq 0 ]] || die "must run as root (installs packages, writes /etc/slurm, starts daemons)"
    install_packages
    make_fake_gpus
    write_config
    if ((CONFIG_CHANGED)) && { live_pid "$CTLD_PID" >/dev/null || live_pid "$SLURMD_PID" >/dev/null; }; then
        say "config changed; restarting slurmctld and slurmd"
        stop_daemon slurmd "$SLURMD_PID"
        stop_daemon slurmctld "$CTLD_PID"
    fi
    start_munge
    start_slurmctld
    start_slurmd
    wait_idle
    say "cluster is up (stop it with: $0 stop)"
}

do_status() {
    local d f pid
    for d in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
        f="${d#*:}"
        if pid="$(live_pid "$f")"; then say "${d%%:*}: running (pid $pid)"; else say "${d%%:*}: stopped"; fi
    done
    if command -v sinfo >/dev/null; then sinfo 2>&1 || true; fi
}

case "$CMD" in
start) do_start ;;
stop) do_stop ;;
restart)
    do_stop
    do_start
    ;;
status) do_status ;;
-h | --help | help) sed -n '2,29p' "$0" ;;
*) die "unknown command '$CMD' (use start, stop, restart or status)" ;;
esac
