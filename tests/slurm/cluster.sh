#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the test suite.
#
#   bash tests/slurm/cluster.sh up      # install (if needed) and start everything
#   bash tests/slurm/cluster.sh status  # sinfo/squeue, or "down"
#   bash tests/slurm/cluster.sh down    # stop everything and undo every change
#
# Layout (see /work/shared/FACTS.md, "A real SLURM cluster on this machine"):
#   host:  bridge itbr0 10.77.0.1/24, munged, slurmctld (UTS hostname "slurmctl")
#   node1: netns itslurm-node1, eth0 10.77.0.11/24, slurmd -N node1 (UTS hostname "node1")
#   node2: netns itslurm-node2, eth0 10.77.0.12/24, slurmd -N node2 (UTS hostname "node2")
# The namespaces have no default route: job steps reach only the bridge.
# Every name used resolves from /etc/hosts (incl. the IPv4-mapped IPv6 forms that torch's
# c10d reverse-resolves), so nothing ever asks the machine's outside DNS resolver.
#
# Must run as root.  Environment:
#   SLURM_TEST_DIR        state dir (default /tmp/imagenet-trainer-slurm)
#   SLURM_TEST_FAKE_GPUS  fake gres/gpu devices per node (default 2; 0 = no gres)
#   SLURM_TEST_UP_TIMEOUT seconds to wait for both nodes to be idle (default 60)
# Clients need SLURM_CONF=$SLURM_TEST_DIR/slurm.conf, unless /etc/slurm/slurm.conf did not
# exist before `up`: then `up` links it to the state dir's conf (and `down` removes the link).
# Exit codes: 0 ok, 1 failure, 3 packages missing and cannot be installed (tests skip).
set -euo pipefail

STATE=${SLURM_TEST_DIR:-/tmp/imagenet-trainer-slurm}
STATE=${STATE%/}
FAKE_GPUS=${SLURM_TEST_FAKE_GPUS:-2}
UP_TIMEOUT=${SLURM_TEST_UP_TIMEOUT:-60}

CONF=$STATE/slurm.conf
BRIDGE=itbr0
NET=10.77.0
CTL_NAME=slurmctl
CTL_IP=$NET.1
NODES=(node1 node2)
declare -A NODE_IP=([node1]=$NET.11 [node2]=$NET.12)
NS_PREFIX=itslurm-
VETH_PREFIX=itveth-
PARTITION=debug
NODE_CPUS=4
HOSTS_TAG="# imagenet-trainer-slurm-test"
ETC_CONF=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge iproute2)

export SLURM_CONF=$CONF

log() { echo "[cluster.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- packages
packages_missing() {
    local p missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    echo "${missing[@]:-}"
}

ensure_packages() {
    local missing
    missing=$(packages_missing)
    [ -z "$missing" ] && return 0
    command -v apt-get >/dev/null || { log "missing packages ($missing) and no apt-get"; exit 3; }
    log "installing: $missing"
    export DEBIAN_FRONTEND=noninteractive
    # Only refresh the package lists when they cannot serve the install.
    if ! apt-get install -y --no-install-recommends "${PACKAGES[@]}" >"${TMPDIR:-/tmp}/itslurm-apt.log" 2>&1; then
        apt-get update >>"${TMPDIR:-/tmp}/itslurm-apt.log" 2>&1 || true
        if ! apt-get install -y --no-install-recommends "${PACKAGES[@]}" >>"${TMPDIR:-/tmp}/itslurm-apt.log" 2>&1; then
            tail -n 20 "${TMPDIR:-/tmp}/itslurm-apt.log" >&2
            log "could not install $missing"
            exit 3
        fi
    fi
    missing=$(packages_missing)
    [ -z "$missing" ] || { log "still missing after install: $missing"; exit 3; }
    rm -f "${TMPDIR:-/tmp}/itslurm-apt.log"
}

# ---------------------------------------------------------------- helpers
pid_alive() {  # pidfile expected-comm
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ]
}

kill_wait() {  # pids... : TERM, wait up to 8 s, then KILL
    local pid i alive
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for i in $(seq 80); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && return 0
        sleep 0.1
    done
    kill -KILL "$@" 2>/dev/null || true
    sleep 0.2
}

# Processes of ours whose pidfile is gone: daemons started with a path in $STATE.
stray_pids() {
    local d comm cmd
    for d in /proc/[0-9]*; do
        comm=$(cat "$d/comm" 2>/dev/null) || continue
        case $comm in slurmctld|slurmd|slurmstepd|munged) ;; *) continue ;; esac
        cmd=$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null) || continue
        [[ "$cmd" == *"$STATE/"* ]] && echo "${d#/proc/}"
    done
    return 0
}

wait_for() {  # seconds description command...
    local secs=$1 what=$2 i
    shift 2
    for i in $(seq $((secs * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "timed out after ${secs}s waiting for $what"
}

# ---------------------------------------------------------------- /etc/hosts
hosts_add() {
    local n
    # Backup once; lines of ours (left by an interrupted run) never enter the backup.
    if [ ! -e "$STATE/hosts.orig" ]; then
        grep -vF "$HOSTS_TAG" /etc/hosts >"$STATE/hosts.orig" || true
    fi
    {
        cat "$STATE/hosts.orig"
        echo "$CTL_IP $CTL_NAME $HOSTS_TAG"
        echo "::ffff:$CTL_IP $CTL_NAME-v4mapped $HOSTS_TAG"
        for n in "${NODES[@]}"; do
            echo "${NODE_IP[$n]} $n $HOSTS_TAG"
            echo "::ffff:${NODE_IP[$n]} $n-v4mapped $HOSTS_TAG"
        done
    } >"$STATE/hosts.new"
    # Rewrite in place (never replace the inode: /etc/hosts may be a bind mount).
    cat "$STATE/hosts.new" >/etc/hosts
}

hosts_restore() {
    if [ -e "$STATE/hosts.orig" ]; then
        cat "$STATE/hosts.orig" >/etc/hosts
    elif grep -qF "$HOSTS_TAG" /etc/hosts; then
        local tmp
        tmp=$(mktemp)
        grep -vF "$HOSTS_TAG" /etc/hosts >"$tmp" || true
        cat "$tmp" >/etc/hosts
        rm -f "$tmp"
    fi
}

# ---------------------------------------------------------------- config
write_config() {
    local n gres_types="" node_gres="" gpu_last
    mkdir -p "$STATE"/{state,log,run,munge}
    for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n"; done
    chmod 755 "$STATE" "$STATE"/spool "$STATE"/spool/*

    if [ "$FAKE_GPUS" -gt 0 ] 2>/dev/null; then
        # Fake GPUs: character devices (major 195, like /dev/nvidiaN); never opened.
        mkdir -p "$STATE/dev"
        for n in $(seq 0 $((FAKE_GPUS - 1))); do
            [ -e "$STATE/dev/nvidia$n" ] || mknod "$STATE/dev/nvidia$n" c 195 "$n"
        done
        gpu_last=$((FAKE_GPUS - 1))
        gres_types="GresTypes=gpu"
        node_gres="Gres=gpu:$FAKE_GPUS"
        {
            echo "AutoDetect=off"
            echo "NodeName=node[1-2] Name=gpu File=$STATE/dev/nvidia[0-$gpu_last]"
        } >"$STATE/gres.conf"
    fi

    cat >"$CONF" <<EOF
# Generated by tests/slurm/cluster.sh -- a throwaway test cluster.
ClusterName=itcluster
SlurmctldHost=$CTL_NAME($CTL_IP)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=600
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=120
SlurmdTimeout=300
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
$gres_types
NodeName=node1 NodeAddr=${NODE_IP[node1]} NodeHostname=node1 CPUs=$NODE_CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NODE_CPUS ThreadsPerCore=1 RealMemory=4000 $node_gres State=UNKNOWN
NodeName=node2 NodeAddr=${NODE_IP[node2]} NodeHostname=node2 CPUs=$NODE_CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NODE_CPUS ThreadsPerCore=1 RealMemory=4000 $node_gres State=UNKNOWN
PartitionName=$PARTITION Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 644 "$CONF"

    # Let clients find the conf without SLURM_CONF, unless the machine has its own.
    if [ ! -e "$ETC_CONF" ] && [ ! -L "$ETC_CONF" ]; then
        mkdir -p "$(dirname "$ETC_CONF")"
        ln -s "$CONF" "$ETC_CONF"
    fi
}

# ---------------------------------------------------------------- network
net_up() {
    local n ns veth
    ip link add "$BRIDGE" type bridge
    ip addr add "$CTL_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for n in "${NODES[@]}"; do
        ns=$NS_PREFIX$n
        veth=$VETH_PREFIX$n
        ip netns add "$ns"
        ip link add "$veth" type veth peer name "${veth}p"
        ip link set "${veth}p" netns "$ns"
        ip -n "$ns" link set "${veth}p" name eth0
        ip -n "$ns" addr add "${NODE_IP[$n]}/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        ip link set "$veth" master "$BRIDGE"
        ip link set "$veth" up
    done
}

net_down() {
    local n ns
    for n in "${NODES[@]}"; do
        ns=$NS_PREFIX$n
        ip link del "$VETH_PREFIX$n" 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
}

ns_pids() {  # all processes inside our node namespaces
    local n
    for n in "${NODES[@]}"; do
        ip netns pids "$NS_PREFIX$n" 2>/dev/null || true
    done
}

# ---------------------------------------------------------------- daemons
start_munge() {
    mkdir -p /run/munge
    chown munge: /run/munge
    chmod 755 /run/munge
    chown munge: "$STATE/munge"
    chmod 700 "$STATE/munge"
    if [ ! -s "$STATE/munge/munge.key" ]; then
        dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    fi
    chown munge: "$STATE/munge/munge.key"
    chmod 400 "$STATE/munge/munge.key"
    runuser -u munge -- munged \
        --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/munge/munged.pid" \
        --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/munged.seed" \
        --origin="$CTL_IP" \
        --socket=/run/munge/munge.socket.2
    wait_for 15 "munged pidfile" pid_alive "$STATE/munge/munged.pid" munged
    wait_for 15 "munge round trip" sh -c 'munge -n | unmunge'
}

start_slurmctld() {
    # Own UTS namespace so the controller's hostname matches SlurmctldHost.
    unshare --uts sh -c "hostname $CTL_NAME && exec slurmctld -i -f '$CONF'"
    wait_for 20 "slurmctld pidfile" pid_alive "$STATE/run/slurmctld.pid" slurmctld
    wait_for 20 "slurmctld to answer" scontrol ping
}

start_slurmds() {
    local n
    for n in "${NODES[@]}"; do
        # Not `ip netns exec`: it remounts /sys and slurmd cannot start its cgroup plugin.
        nsenter --net="/run/netns/$NS_PREFIX$n" unshare --uts \
            sh -c "hostname $n && exec slurmd -N $n -f '$CONF'"
    done
    for n in "${NODES[@]}"; do
        wait_for 20 "slurmd $n pidfile" pid_alive "$STATE/run/slurmd-$n.pid" slurmd
    done
}

nodes_idle() {
    local out n
    out=$(sinfo -h -N -p "$PARTITION" -o '%N %t') || return 1
    for n in "${NODES[@]}"; do
        grep -qE "^$n idle\$" <<<"$out" || return 1
    done
}

check_network() {
    local n ns other
    for n in "${NODES[@]}"; do
        ns=/run/netns/$NS_PREFIX$n
        for other in "${NODES[@]}" "$CTL_NAME"; do
            nsenter --net="$ns" getent ahostsv4 "$other" | grep -q "^$NET\." \
                || die "$other does not resolve from /etc/hosts inside $n"
        done
        # TCP to the controller, and to the other node's slurmd, over the bridge.
        nsenter --net="$ns" timeout 5 bash -c "exec 3<>/dev/tcp/$CTL_IP/6817" \
            || die "$n cannot reach slurmctld at $CTL_IP:6817"
        for other in "${NODES[@]}"; do
            [ "$other" = "$n" ] && continue
            nsenter --net="$ns" timeout 5 bash -c "exec 3<>/dev/tcp/${NODE_IP[$other]}/6818" \
                || die "$n cannot reach slurmd on $other"
        done
        if nsenter --net="$ns" ip route show default | grep -q .; then
            die "namespace of $n has a default route"
        fi
    done
}

dump_logs() {
    local f
    for f in "$STATE"/log/*.log "$STATE"/munge/munged.log; do
        [ -e "$f" ] || continue
        echo "----- tail $f" >&2
        tail -n 25 "$f" >&2 || true
    done
}

# ---------------------------------------------------------------- commands
cmd_down() {
    local n pid pids=""
    # Everything at once (each daemon takes about 2 s to exit after SIGTERM):
    # the node namespaces' processes (slurmd, slurmstepd, job steps), our daemons by
    # pidfile, and daemons of ours whose pidfile is already gone.
    pids=$(ns_pids)
    for n in "${NODES[@]}"; do
        pid_alive "$STATE/run/slurmd-$n.pid" slurmd && pids+=" $(cat "$STATE/run/slurmd-$n.pid")"
    done
    pid_alive "$STATE/run/slurmctld.pid" slurmctld && pids+=" $(cat "$STATE/run/slurmctld.pid")"
    pid_alive "$STATE/munge/munged.pid" munged && pids+=" $(cat "$STATE/munge/munged.pid")"
    pids+=" $(stray_pids)"
    # shellcheck disable=SC2086
    pids=$(echo $pids | tr ' ' '\n' | sort -un | tr '\n' ' ')
    if [ -n "${pids// /}" ]; then
        log "stopping: $(for pid in $pids; do echo -n "$pid:$(cat /proc/"$pid"/comm 2>/dev/null) "; done)"
        # shellcheck disable=SC2086
        kill_wait $pids
    fi
    net_down
    hosts_restore
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then
        rm -f "$ETC_CONF"
    fi
    rm -rf "$STATE"
    return 0
}

cluster_running() {
    pid_alive "$STATE/run/slurmctld.pid" slurmctld || return 1
    pid_alive "$STATE/munge/munged.pid" munged || return 1
    local n
    for n in "${NODES[@]}"; do
        pid_alive "$STATE/run/slurmd-$n.pid" slurmd || return 1
    done
    nodes_idle_or_busy
}

nodes_idle_or_busy() {
    local out n
    out=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null) || return 1
    for n in "${NODES[@]}"; do
        grep -qE "^$n (idle|mix|alloc|comp)\$" <<<"$out" || return 1
    done
}

on_up_exit() {
    local rc=$?
    trap - EXIT
    if [ $rc -ne 0 ]; then
        log "up failed (exit $rc); logs and teardown follow"
        dump_logs
        cmd_down || true
    fi
    exit $rc
}

cmd_up() {
    local t0 i
    t0=$(date +%s)
    [ "$(id -u)" = 0 ] || { log "must run as root"; exit 3; }
    ensure_packages
    if cluster_running; then
        log "already up ($STATE)"
        return 0
    fi
    # Leftovers of an earlier partial run.
    cmd_down
    trap on_up_exit EXIT
    mkdir -p "$STATE"
    write_config
    hosts_add
    net_up
    start_munge
    start_slurmctld
    start_slurmds
    for i in $(seq $((UP_TIMEOUT * 2))); do
        nodes_idle && break
        [ "$i" = $((UP_TIMEOUT * 2)) ] && {
            sinfo -N -l >&2 || true
            die "nodes not idle after ${UP_TIMEOUT}s"
        }
        sleep 0.5
    done
    check_network
    trap - EXIT
    log "up in $(($(date +%s) - t0))s: SLURM_CONF=$CONF partition=$PARTITION nodes=${NODES[*]}"
}

cmd_status() {
    if [ -e "$CONF" ] && pid_alive "$STATE/run/slurmctld.pid" slurmctld; then
        sinfo -N -l
        squeue
    else
        echo down
    fi
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down; log "down" ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
