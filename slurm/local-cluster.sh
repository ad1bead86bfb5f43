#!/usr/bin/env bash
# A real Slurm on this one machine, for trying `shardwright submit` and for the tests:
# munge, slurmctld and two slurmd daemons, nodes n1 and n2 (2 CPUs each), partition `debug`.
#
#   slurm/local-cluster.sh up       install (apt-get, Debian/Ubuntu) if missing, configure, start; idempotent
#   slurm/local-cluster.sh down     cancel jobs and stop the daemons this script started
#   slurm/local-cluster.sh status   the nodes as Slurm sees them; exit 1 if the cluster is not up
#
# Needs root (apt-get, /etc/hosts, /etc/slurm/slurm.conf, daemons). Both nodes are this machine:
# Debian builds slurmd with multiple-slurmd support, so `slurmd -N n1` and `slurmd -N n2` run side
# by side on their own ports (17001, 17002) and both names resolve to 127.0.0.1 through /etc/hosts.
# State, spool and logs live under $SHARDWRIGHT_SLURM_DIR (default /var/lib/shardwright-slurm).
set -Eeuo pipefail
# Any command that fails without its own message still says which one (set -e alone exits silently).
trap 'echo "local-cluster: error: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

DIR=${SHARDWRIGHT_SLURM_DIR:-/var/lib/shardwright-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by shardwright slurm/local-cluster.sh"
NODES=(n1 n2)
PORTS=(17001 17002)
CPUS=${SHARDWRIGHT_SLURM_CPUS:-2}  # per node; slurmd is told to trust this, not the hardware
PACKAGES=(slurmctld slurmd slurm-client munge)

die() {
    echo "local-cluster: error: $*" >&2
    exit 1
}

need_root() {
    [ "$(id -u)" = 0 ] || die "$1 needs root (apt-get, /etc/hosts, /etc/slurm, daemons); run it with sudo"
}

alive() {  # alive PIDFILE: the daemon the pid file names is running (not a stale, reused pid)
    [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$(basename "$1" .pid | cut -d- -f1)" ]
}

install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd sbatch munged; do
        command -v "$cmd" >/dev/null || missing=1
    done
    [ "$missing" = 0 ] && return
    command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is not available; install ${PACKAGES[*]} with this system's package manager"
    local log=/tmp/shardwright-slurm-apt.log
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >"$log" 2>&1; then
        tail -n 5 "$log" >&2
        die "apt-get could not install ${PACKAGES[*]} (full log: $log)"
    fi
}

resolve_nodes() {  # the node names must resolve: Slurm and the rendezvous use them as host names
    local node missing=()
    for node in "${NODES[@]}"; do
        getent hosts "$node" >/dev/null || missing+=("$node")
    done
    [ "${#missing[@]}" = 0 ] && return
    echo "127.0.0.1 ${missing[*]} $MARK" >>/etc/hosts 2>/dev/null \
        || die "cannot add ${missing[*]} to /etc/hosts; make the names resolve to 127.0.0.1 some other way"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
    touch "$DIR/started-munge"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged started but credentials do not round-trip (see /var/log/munge/munged.log)"
}

write_config() {
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; this machine already has a Slurm configuration, use that cluster instead"
    fi
    local host nodes="" i
    host=$(hostname -s)
    for i in "${!NODES[@]}"; do
        nodes+="NodeName=${NODES[$i]} NodeAddr=127.0.0.1 NodeHostname=$host Port=${PORTS[$i]} CPUs=$CPUS State=UNKNOWN"$'\n'
    done
    mkdir -p /etc/slurm "$DIR/ctld" "$DIR/log"
    cat >"$CONF.tmp" <<EOF
$MARK
# A two-node test cluster on one machine (n1, n2 = this host). Remove with: slurm/local-cluster.sh down
ClusterName=shardwright-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again after cred_expire + 1 s (default 120).
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups: plain process tracking works in containers and VMs alike.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmdTimeout=60
# Look at pending jobs every second (a requeued job becomes eligible without any other event).
SchedulerParameters=sched_interval=1,bf_interval=1
$nodes
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
    if ! cmp -s "$CONF.tmp" "$CONF"; then
        mv "$CONF.tmp" "$CONF"
        return 0  # changed: running daemons must restart
    fi
    rm -f "$CONF.tmp"
    return 1
}

wait_idle() {  # every node answers and can take jobs
    local states="" usable
    for _ in $(seq 150); do
        # `|| true`: under pipefail a controller that does not answer yet, or no usable node yet
        # (grep finds nothing), would otherwise end the script without a word.
        states=$(sinfo -h -N -p debug -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        usable=$({ grep -oE '=(idle|mixed|allocated|completing)( |$)' <<<"$states" || true; } | wc -l)
        [ "$usable" = "${#NODES[@]}" ] && return 0
        case "$states" in *down* | *drain* | *fail*)
            scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    die "nodes did not become idle within 30 s (sinfo: ${states:-no answer}); logs: $DIR/log/"
}

up() {
    if [ "$(id -u)" != 0 ] && controller_up; then
        echo "local Slurm cluster is already up (slurm/local-cluster.sh status shows the nodes)"
        return
    fi
    need_root up
    mkdir -p "$DIR"
    install_packages
    resolve_nodes
    start_munge
    local changed=0 node
    write_config && changed=1
    if [ "$changed" = 1 ]; then
        down_daemons
    fi
    if ! alive "$DIR/slurmctld.pid"; then
        slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    fi
    for node in "${NODES[@]}"; do
        mkdir -p "$DIR/spool-$node"
        if ! alive "$DIR/slurmd-$node.pid"; then
            slurmd -f "$CONF" -N "$node" || die "slurmd -N $node did not start; see $DIR/log/slurmd-$node.log"
        fi
    done
    wait_idle
    echo "local Slurm cluster up: nodes ${NODES[*]} ($CPUS CPUs each), partition debug; logs in $DIR/log"
}

stop() {  # stop PIDFILE: TERM the process and wait for it to go
    alive "$1" || return 0
    local pid
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

down_daemons() {
    local node
    for node in "${NODES[@]}"; do
        stop "$DIR/slurmd-$node.pid"
    done
    stop "$DIR/slurmctld.pid"
}

down() {
    need_root down
    if alive "$DIR/slurmctld.pid"; then
        scancel --full --quiet --partition debug 2>/dev/null || true
    fi
    down_daemons
    if [ -e "$DIR/started-munge" ]; then
        stop /run/munge/munged.pid
        rm -f "$DIR/started-munge"
    fi
    echo "local Slurm cluster down"
}

controller_up() {  # our slurm.conf is in place and its slurmctld answers
    [ -e "$CONF" ] && grep -qF "$MARK" "$CONF" && command -v scontrol >/dev/null \
        && timeout 10 scontrol ping 2>/dev/null | grep -q "is UP"
}

status() {
    if ! controller_up; then
        echo "local Slurm cluster is not up (start it with: slurm/local-cluster.sh up)"
        exit 1
    fi
    sinfo -N -p debug
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
