#!/usr/bin/env bash
# A real SLURM cluster on this machine, for the SLURM tests (tests/test_slurm.py, tests/test_slurm_multinode.py)
# and for trying slurm/*.sh by hand. Debian/Ubuntu, run as root; no init system needed (daemons start directly).
#
#   bash tools/slurm_cluster.sh up       install slurm + munge (apt) if missing, configure, start, wait until idle
#   bash tools/slurm_cluster.sh down     stop slurmd, slurmctld and munged
#   bash tools/slurm_cluster.sh status   print whether it is up (exit 0 up, 1 down)
#
#   bash tools/slurm_cluster.sh up --nodes N      an N-node cluster (N >= 2), beside the one-node one
#   bash tools/slurm_cluster.sh down --nodes N    stop it and remove its namespaces, bridge and /etc/hosts lines
#   bash tools/slurm_cluster.sh status --nodes N
#   bash tools/slurm_cluster.sh kill-node NAME    what a node failure looks like: SIGKILL its slurmd and tasks
#
# All are idempotent; `up --nodes N` also restarts a node that `kill-node` took down.
#
# One node: this host, with the CPUs and memory `slurmd -C` reports, in one partition `debug`; no GPUs
# (GresTypes is not needed: `sbatch --gpus-per-node=0` is accepted without it). It writes /etc/slurm/slurm.conf
# (where the Debian clients look) and refuses to replace one it did not write.
#
# N nodes: each node mn1..mnN is a network namespace with its own address (10.77.0.11, .12, ...) on a bridge
# (10.77.0.1, the controller) and its own host name, running its own slurmd; the file system is shared, as on a
# cluster with a shared /home. Traffic between the nodes crosses real sockets between separate network stacks,
# so the host list -> MASTER_ADDR, node ranks, cross-node rendezvous and a node's death behave as on a cluster,
# and nothing leaves this machine. Its config is $MELLAMA_SLURM_STATE/multi/slurm.conf, on other ports than the
# one-node cluster's, so both can run at once: point the clients at it with the SLURM_CONF that `up` prints.
# (Several slurmd daemons in one network namespace, Debian's slurm-wlm-emulator, would also give node names, but
# share one address: MASTER_ADDR and gloo would never leave the host's own stack. The emulator build also
# needs front-end nodes, which cannot run batch jobs on more than one node.)
#
# State, logs and pid files live in $MELLAMA_SLURM_STATE (default /var/spool/mellama-slurm).
set -Eeuo pipefail

STATE=${MELLAMA_SLURM_STATE:-/var/spool/mellama-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by mellama-train tools/slurm_cluster.sh"
MUNGE_KEY=/etc/munge/munge.key
NODE=$(hostname -s)

die() {
    echo "slurm_cluster: $*" >&2
    exit 1
}
# Anything not handled below still ends in one line naming the command that failed.
trap 'die "${ACTION:-?} failed at line $LINENO: $BASH_COMMAND"' ERR

# A live process, not a zombie: a container's init may never reap a killed daemon, and kill -0 succeeds on those.
running() { [[ $(ps -o stat= -p "$1" 2>/dev/null) =~ ^[[:space:]]*[^Z[:space:]] ]]; }
alive() { [[ -s $1 ]] && running "$(cat "$1")"; }

wait_for() { # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true; }
node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    echo "slurm_cluster: installing slurmctld slurmd slurm-client munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$STATE/apt.log" 2>&1 || die "apt-get update failed (see $STATE/apt.log)"
    # --no-install-recommends: 8 packages instead of slurm-wlm's 43 (HDF5, IPMI, ROCm, ... plugins).
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >>"$STATE/apt.log" 2>&1 ||
        die "apt-get install slurmctld slurmd slurm-client munge failed (see $STATE/apt.log)"
}

start_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        mkdir -p "$(dirname "$MUNGE_KEY")"
        mungekey --create --keyfile "$MUNGE_KEY" || die "mungekey --create failed"
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    munge_works && return
    runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
    wait_for 10 munge_works || die "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
}

write_config() {
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "refusing to replace $CONF: it was not written by this script (move it away to use this test cluster)"
    fi
    # Jobs and clients reach the controller and MASTER_ADDR (the first node) by this host's name.
    if ! getent hosts "$NODE" >/dev/null; then
        echo "slurm_cluster: $NODE does not resolve; adding '127.0.0.1 $NODE' to /etc/hosts"
        echo "127.0.0.1 $NODE" >>/etc/hosts
    fi
    local hw
    # The node's real shape (CPUs, sockets, cores, threads, RealMemory), so slurmd registers without a mismatch.
    hw=$(slurmd -C | head -n1) || die "slurmd -C failed"
    [[ $hw == NodeName=* ]] || die "slurmd -C printed no node line: $hw"
    mkdir -p "$(dirname "$CONF")" "$STATE/ctld" "$STATE/d"
    cat >"$CONF.new" <<EOF
$MARKER
# A one-node test cluster: this host is controller and compute node. Regenerated by every \`up\`.
ClusterName=mellama
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
# Cores only: memory is not a consumable, so a job without --mem does not claim the whole node.
SelectTypeParameters=CR_Core
# No cgroups: track processes by parent pid, no CPU binding (containers often have no usable cgroup tree).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
# A node that comes back after \`down\` returns to service by itself.
ReturnToService=2
# Short timeouts: a test cluster should notice failures in seconds, not minutes.
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
KillWait=10
InactiveLimit=0
Waittime=0
$hw State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"
}

up() {
    [[ $EUID -eq 0 ]] || die "up must run as root (it installs packages and starts daemons)"
    mkdir -p "$STATE"
    install_packages
    start_munge
    write_config
    if ! alive "$STATE/slurmctld.pid"; then
        slurmctld || die "slurmctld did not start (see $STATE/slurmctld.log)"
    else
        scontrol reconfigure >/dev/null 2>&1 || true # pick up a regenerated slurm.conf
    fi
    wait_for 30 scontrol ping || die "slurmctld is not answering scontrol ping (see $STATE/slurmctld.log)"
    if ! alive "$STATE/slurmd.pid"; then
        slurmd || die "slurmd did not start (see $STATE/slurmd.log)"
    fi
    local deadline=$((SECONDS + 60)) state
    until node_usable; do
        state=$(node_state)
        # A node left down/drained by an earlier run (or by a kill): tell slurmctld it is fine again.
        if [[ $state =~ down|drain|fail ]]; then
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        fi
        ((SECONDS < deadline)) || die "node $NODE is '${state:-unknown}', not idle, after 60 s (see $STATE/slurmd.log, $STATE/slurmctld.log)"
        sleep 1
    done
    echo "slurm_cluster: up: node $NODE $(node_state), partition debug, $(sinfo -V), state in $STATE"
}

stop_pidfile() { # stop_pidfile NAME PIDFILE
    alive "$2" || return 0
    local pid
    pid=$(cat "$2")
    kill "$pid"
    wait_for 20 not_running "$pid" || die "$1 (pid $pid) did not stop within 20 s"
}
not_running() { ! running "$1"; }

down() {
    [[ $EUID -eq 0 ]] || die "down must run as root"
    stop_pidfile slurmd "$STATE/slurmd.pid"
    stop_pidfile slurmctld "$STATE/slurmctld.pid"
    stop_pidfile munged /run/munge/munged.pid
    echo "slurm_cluster: down"
}

status() {
    if command -v scontrol >/dev/null && scontrol ping >/dev/null 2>&1 && node_usable; then
        echo "slurm_cluster: up: node $NODE $(node_state)"
    else
        echo "slurm_cluster: down"
        return 1
    fi
}

# --- the N-node cluster: one network namespace per node --------------------------------------------------
MULTI=$STATE/multi
MCONF=$MULTI/slurm.conf
NET=10.77.0 # the bridge is $NET.1 (the controller); node i is $NET.(10+i)
BRIDGE=mellama-br
HOSTS_TAG="# mellama-train slurm_cluster.sh multi-node"
# Other ports than the one-node cluster's (6817/6818), so the two controllers can run side by side.
MPORTS='SlurmctldPort=6917\nSlurmdPort=6918' # \n: a new line in sed's replacement

mnodes() { seq 1 "$NODES"; }
netns_of() { echo "mellama-n$1"; }

# Clients of the N-node cluster: the same commands, with its config.
mslurm() { SLURM_CONF=$MCONF "$@"; }
mnode_state() { mslurm sinfo -h -n "mn$1" -o %T 2>/dev/null | head -n1 || true; }
mnode_usable() { [[ $(mnode_state "$1") =~ ^(idle|mixed|allocated|completing)$ ]]; }

# Rewritten in place, not replaced (sed -i renames): in a container /etc/hosts is often a bind mount.
drop_host_lines() {
    local kept
    kept=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
    printf '%s\n' "$kept" >/etc/hosts
}
netns_empty() { [[ -z $(ip netns pids "$1" 2>/dev/null) ]]; }

network_up() {
    if ! command -v ip >/dev/null; then
        echo "slurm_cluster: installing iproute2 (apt)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iproute2 >>"$STATE/apt.log" 2>&1 ||
            die "the ip command is missing and apt-get install iproute2 failed (see $STATE/apt.log)"
    fi
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge || die "cannot create bridge $BRIDGE (this needs CAP_NET_ADMIN)"
        ip addr add "$NET.1/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    local i ns
    for i in $(mnodes); do
        ns=$(netns_of "$i")
        [[ -e /run/netns/$ns ]] || ip netns add "$ns" || die "cannot create network namespace $ns"
        if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
            # A host end left from a namespace that is gone (its killed processes may outlive its name): recreate.
            ip link delete "mellama-v$i" 2>/dev/null || true
            ip link add "mellama-v$i" type veth peer name eth0 netns "$ns"
            ip link set "mellama-v$i" master "$BRIDGE"
            ip -n "$ns" addr add "$NET.$((10 + i))/24" dev eth0
        fi
        ip link set "mellama-v$i" up
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        ip -n "$ns" route replace default via "$NET.1"
    done
    # Names every node, every job and gloo resolve: the controller by the host's name, the nodes by theirs.
    drop_host_lines
    {
        for i in $(mnodes); do echo "$NET.$((10 + i)) mn$i $HOSTS_TAG"; done
    } >>/etc/hosts
}

network_down() {
    local ns
    for ns in /run/netns/mellama-n*; do
        [[ -e $ns ]] || continue
        ns=${ns##*/}
        # Whatever still runs there (a killed node's tasks, a stray rank) goes with it.
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns delete "$ns" || true
    done
    # The host ends of the node links: deleting one removes its pair, whatever still holds the namespace.
    local link
    for link in $(ip -o link show | grep -oE 'mellama-v[0-9]+' | sort -u); do
        ip link delete "$link" 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE"; fi
    drop_host_lines
}

write_multi_config() {
    local hw i
    hw=$(slurmd -C | head -n1) || die "slurmd -C failed"
    [[ $hw == NodeName=* ]] || die "slurmd -C printed no node line: $hw"
    hw=${hw#NodeName=* } # the shape without this host's name
    mkdir -p "$MULTI/ctld"
    for i in $(mnodes); do mkdir -p "$MULTI/d-mn$i"; done
    # The one-node config, with this cluster's name, ports, paths and nodes.
    sed -e "s|^ClusterName=.*|ClusterName=mellama-multi|" \
        -e "s|^SlurmctldHost=.*|SlurmctldHost=$NODE($NET.1)\n$MPORTS|" \
        -e "s|^StateSaveLocation=.*|StateSaveLocation=$MULTI/ctld|" \
        -e "s|^SlurmdSpoolDir=.*|SlurmdSpoolDir=$MULTI/d-%n|" \
        -e "s|^SlurmctldPidFile=.*|SlurmctldPidFile=$MULTI/slurmctld.pid|" \
        -e "s|^SlurmdPidFile=.*|SlurmdPidFile=$MULTI/slurmd-%n.pid|" \
        -e "s|^SlurmctldLogFile=.*|SlurmctldLogFile=$MULTI/slurmctld.log|" \
        -e "s|^SlurmdLogFile=.*|SlurmdLogFile=$MULTI/slurmd-%n.log|" \
        -e "/^NodeName=/d" -e "/^PartitionName=/d" \
        -e "s|^# A one-node test cluster.*|# A $NODES-node test cluster: one network namespace per node. Regenerated by every \`up --nodes\`.|" \
        "$CONF" >"$MCONF.new"
    for i in $(mnodes); do
        # Every node claims the host's CPUs: the nodes share them, as the tests' tiny jobs can.
        echo "NodeName=mn$i NodeAddr=$NET.$((10 + i)) $hw State=UNKNOWN" >>"$MCONF.new"
    done
    echo "PartitionName=debug Nodes=mn[1-$NODES] Default=YES MaxTime=INFINITE State=UP" >>"$MCONF.new"
    mv "$MCONF.new" "$MCONF"
}

start_node() { # start_node I: slurmd for node mnI inside its namespace, with its own host name
    alive "$MULTI/slurmd-mn$1.pid" && return
    # nsenter --net, not `ip netns exec`: the latter remounts /sys, which hides the cgroup tree slurmd reads.
    # unshare --uts gives the node its own host name, which the job's `hostname` and gloo's address lookup use.
    nsenter --net="/run/netns/$(netns_of "$1")" unshare --uts \
        sh -c "hostname mn$1 && exec slurmd -f '$MCONF' -N mn$1" ||
        die "slurmd for mn$1 did not start (see $MULTI/slurmd-mn$1.log)"
}

multi_up() {
    [[ $EUID -eq 0 ]] || die "up must run as root (it installs packages, creates namespaces, starts daemons)"
    ((NODES >= 2)) || die "--nodes must be 2 or more (without it: the one-node cluster)"
    mkdir -p "$STATE" "$MULTI"
    install_packages
    start_munge
    write_config # the one-node config is the template; writing it starts nothing
    network_up
    write_multi_config
    if ! alive "$MULTI/slurmctld.pid"; then
        slurmctld -f "$MCONF" || die "slurmctld did not start (see $MULTI/slurmctld.log)"
    else
        mslurm scontrol reconfigure >/dev/null 2>&1 || true
    fi
    wait_for 30 mslurm scontrol ping || die "slurmctld is not answering (see $MULTI/slurmctld.log)"
    local i state deadline
    for i in $(mnodes); do start_node "$i"; done
    for i in $(mnodes); do
        deadline=$((SECONDS + 60))
        until mnode_usable "$i"; do
            state=$(mnode_state "$i")
            # A node left down by kill-node: it is back, tell slurmctld.
            if [[ $state =~ down|drain|fail ]]; then
                mslurm scontrol update nodename="mn$i" state=resume >/dev/null 2>&1 || true
            fi
            ((SECONDS < deadline)) || die "node mn$i is '${state:-unknown}', not idle, after 60 s (see $MULTI/slurmd-mn$i.log)"
            sleep 1
        done
    done
    echo "slurm_cluster: up: $NODES nodes mn[1-$NODES] ($NET.11-$((10 + NODES))), partition debug, state in $MULTI"
    echo "export SLURM_CONF=$MCONF"
}

multi_down() {
    [[ $EUID -eq 0 ]] || die "down must run as root"
    local pidfile
    for pidfile in "$MULTI"/slurmd-mn*.pid; do
        [[ -e $pidfile ]] && stop_pidfile "slurmd ${pidfile##*/}" "$pidfile"
    done
    stop_pidfile slurmctld "$MULTI/slurmctld.pid"
    network_down
    # Its jobs go with it: a job left by an interrupted test would otherwise be back at the next `up`.
    rm -rf "$MULTI/ctld"
    echo "slurm_cluster: down: the multi-node cluster, its namespaces and bridge (munged stays for the one-node cluster)"
}

multi_status() {
    local i
    mslurm scontrol ping >/dev/null 2>&1 || { echo "slurm_cluster: down"; return 1; }
    for i in $(mnodes); do
        mnode_usable "$i" || { echo "slurm_cluster: node mn$i is '$(mnode_state "$i")'"; return 1; }
    done
    echo "slurm_cluster: up: $NODES nodes"
    echo "export SLURM_CONF=$MCONF"
}

kill_node() { # kill_node mnI: as a power loss would: its link goes dark, then everything in it is SIGKILLed
    [[ $1 =~ ^mn([0-9]+)$ ]] || die "kill-node takes a node name mn1, mn2, ...; got '$1'"
    local i=${BASH_REMATCH[1]} ns
    ns=$(netns_of "$i")
    [[ -e /run/netns/$ns ]] || die "no node $1 (no namespace $ns): bash tools/slurm_cluster.sh up --nodes N"
    # The link first: a dead machine sends no goodbye. Killed processes on a live link would close their sockets
    # and their peers would fail at once, which is a crashed process, not a lost node: with the link down the
    # peers block until SLURM declares the node down (SlurmdTimeout), as on a cluster.
    ip link set "mellama-v$i" down
    # A pid may exit between the listing and the kill: that is fine, what matters is that none is left.
    ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
    wait_for 10 netns_empty "$ns" || die "processes of node $1 survived SIGKILL: $(ip netns pids "$ns" | paste -sd' ' -)"
    rm -f "$MULTI/slurmd-$1.pid" # its pid may be reused by an unrelated process
    echo "slurm_cluster: killed node $1 (link down, slurmd and tasks SIGKILLed); slurmctld marks it down within SlurmdTimeout; \`up --nodes N\` brings it back"
}

ACTION=${1:-}
NODES=1
if [[ ${2:-} == --nodes ]]; then
    NODES=${3:-}
    [[ $NODES =~ ^[0-9]+$ ]] || die "--nodes takes a number, got '${NODES}'"
elif [[ ${2:-} == --nodes=* ]]; then
    NODES=${2#--nodes=}
    [[ $NODES =~ ^[0-9]+$ ]] || die "--nodes takes a number, got '${NODES}'"
fi
case $ACTION:$((NODES > 1)) in
up:0) up ;;
down:0) down ;;
status:0)
    trap - ERR # "down" is an answer here, not a failure
    status
    ;;
up:1) multi_up ;;
down:1) multi_down ;;
status:1)
    trap - ERR
    multi_status
    ;;
kill-node:*) kill_node "${2:-}" ;;
*)
    echo "usage: bash tools/slurm_cluster.sh up|down|status [--nodes N] | kill-node NAME" >&2
    exit 2
    ;;
esac
