#!/usr/bin/env bash
# A Ray cluster of separate nodes on this machine, laid out as docker-compose.yml lays it out, to
# rehearse the GPU cluster set-up on a laptop (docs/deploy.md) and for tests/test_cluster.py:
#
#   ray-head       schedules only: `ray start --head --num-cpus=0 --num-gpus=0`, no dashboard
#   ray-worker-N   `ray start --address=<head>`, its own CPUs, GPUs and temp dir
#
# every node with token authentication (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN) and one Tune
# storage directory shared by path. Each node is a `ray start --block` in its own session, so
# stopping or killing a node is one signal to its process group (raylet, agents, its workers).
#
#   scripts/local-cluster.sh up              start the head and the worker nodes (those not running;
#                                            all of them when the head is not); print how to join
#   scripts/local-cluster.sh status          which nodes run, and Ray's own view (`ray status`)
#   scripts/local-cluster.sh down            stop every node (SIGTERM, SIGKILL after a grace)
#   scripts/local-cluster.sh stop NODE       stop one node the same way (e.g. ray-head)
#   scripts/local-cluster.sh kill NODE       SIGKILL one node at once (e.g. ray-worker-1): a host lost
#
# then, in the shell that runs the dispatcher:  source <cluster dir>/cluster.env  (`up` prints the path)
#
# Settings (environment, all optional):
#   BITBENCH_CLUSTER_DIR      state, logs, Ray temp dirs and Tune storage (default /tmp/bitbench-cluster-<uid>;
#                             keep it short: Ray's socket paths live below it)
#   BITBENCH_CLUSTER_PORT     the head's GCS port (default: a free port, kept for later `up`s)
#   BITBENCH_CLUSTER_WORKERS  number of worker nodes (2)
#   BITBENCH_CLUSTER_CPUS     CPUs each worker node declares (1)
#   BITBENCH_CLUSTER_GPUS     GPUs each worker node declares, one count per node ("1 0": one GPU on the
#                             first; default none). Each node gets GPUs of its own: "1 1" shows the first
#                             GPU to ray-worker-1 and the second to ray-worker-2 (CUDA_VISIBLE_DEVICES).
#   BITBENCH_CLUSTER_GRACE_S  seconds `down` / `stop` wait after SIGTERM before SIGKILL (30; a node drains)
#   BITBENCH_CLUSTER_OBJECT_STORE_BYTES  each node's Ray object store (256 MiB; Ray's default is 30 % of RAM)
#   RAY_AUTH_TOKEN            the cluster's token (default: made at the first `up`, kept in DIR/token)
# Every other port a node opens is picked free at `up`, away from Ray's defaults (10001-19999, 52365…),
# so the cluster never collides with another Ray on the machine.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${BITBENCH_CLUSTER_DIR:-/tmp/bitbench-cluster-$(id -u)}
WORKERS=${BITBENCH_CLUSTER_WORKERS:-2}
CPUS=${BITBENCH_CLUSTER_CPUS:-1}
read -r -a GPUS <<<"${BITBENCH_CLUSTER_GPUS:-}"
GRACE_S=${BITBENCH_CLUSTER_GRACE_S:-30}
OBJECT_STORE_BYTES=${BITBENCH_CLUSTER_OBJECT_STORE_BYTES:-268435456}
WORKER_PORTS=100  # per node, for its Ray worker processes

if [ -x "$ROOT/.venv/bin/ray" ]; then BIN=$ROOT/.venv/bin; else BIN=$(dirname "$(command -v ray)"); fi
RAY=$BIN/ray
PY=$BIN/python

die() { echo "local-cluster: $*" >&2; exit 1; }
say() { echo "local-cluster: $*"; }

node_names() {
    echo ray-head
    for ((i = 1; i <= WORKERS; i++)); do echo "ray-worker-$i"; done
}

pid_of() { cat "$DIR/nodes/$1.pid" 2>/dev/null || true; }

alive() {  # NODE: whether its `ray start --block` (its process group's leader) runs (a zombie does not)
    local pid
    pid=$(pid_of "$1")
    [ -n "$pid" ] && ps -o stat= -p "$pid" 2>/dev/null | grep -qv '^Z'
}

group_alive() {  # NODE: whether any live process of its group is left (Ray's processes outlive the leader)
    local pid
    pid=$(pid_of "$1")
    [ -n "$pid" ] && ps -A -o pgid=,stat= | awk -v g="$pid" '$1 == g && $2 !~ /^Z/ {n++} END {exit n == 0}'
}

auth_env() {  # the token every Ray process and the dispatcher need
    [ -s "$DIR/token" ] || die "no cluster in $DIR (run: $0 up)"
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN
    RAY_AUTH_TOKEN=$(cat "$DIR/token")
}

free_ports() {  # COUNT: distinct free TCP ports from the kernel's ephemeral range
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

worker_port_base() {  # COUNT: the first of COUNT free consecutive ports in 20000-32767 (below the ephemeral range)
    "$PY" - "$1" <<'EOF'
import random, socket, sys
n = int(sys.argv[1])
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
for base in random.sample(range(20000, 32768 - n, 50), 100):
    if all(free(p) for p in range(base, base + n)):
        print(base)
        break
else:
    sys.exit("no free block of ports in 20000-32767")
EOF
}

start_node() {  # NAME ARGS...: `ray start --block` in its own session, its pid in DIR/nodes/NAME.pid
    local name=$1
    say "starting $name"
    shift
    mkdir -p "$DIR/$name"
    # setsid through Python: the node leads a new session and process group (macOS has no setsid(1))
    "$PY" -c 'import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])' \
        "$RAY" start --block --disable-usage-stats --node-ip-address=127.0.0.1 --temp-dir="$DIR/$name" \
        --object-store-memory="$OBJECT_STORE_BYTES" "$@" >"$DIR/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$DIR/nodes/$name.pid"
}

node_id() {  # NAME: the Ray node id of the node's latest start (Ray names files in its session dir after it)
    local f
    f=$(ls -t "$DIR/$1"/session_latest/metrics_export_port_* 2>/dev/null | head -n 1)
    echo "${f##*_}"
}

node_ports() {  # NAME BASE: a node's own ports (each picked free) and its block of worker ports
    local -a p
    read -r -a p <<<"$(free_ports 6)"
    echo "--node-manager-port=${p[0]} --object-manager-port=${p[1]} --dashboard-agent-listen-port=${p[2]}" \
         "--dashboard-agent-grpc-port=${p[3]} --runtime-env-agent-port=${p[4]} --metrics-export-port=${p[5]}" \
         "--min-worker-port=$2 --max-worker-port=$(($2 + WORKER_PORTS - 1))"
}

wait_for() {  # SECONDS COMMAND...: poll COMMAND every second until it succeeds; 1 after SECONDS
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

active_nodes() {  # the number of alive nodes the head's GCS knows
    "$RAY" status --address "$ADDRESS" 2>/dev/null | awk '/^Active:/{on=1; next} /^Pending:/{on=0} on && /node_/{n++} END{print n+0}'
}

all_joined() { [ "$(active_nodes)" -ge $((WORKERS + 1)) ]; }

cmd_up() {
    [ ${#DIR} -le 60 ] || die "BITBENCH_CLUSTER_DIR is too long for Ray's socket paths (${#DIR} > 60 characters)"
    mkdir -p "$DIR/nodes" "$DIR/logs" "$DIR/tune"
    chmod 700 "$DIR"
    if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
        (umask 077 && printf '%s' "$RAY_AUTH_TOKEN" >"$DIR/token")
    elif [ ! -s "$DIR/token" ]; then
        (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$DIR/token")
    fi
    auth_env
    export RAY_USAGE_STATS_ENABLED=0
    # the nodes run this checkout's code, as the image's nodes run the image's
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    local port=${BITBENCH_CLUSTER_PORT:-} base
    [ -n "$port" ] || port=$(sed -n 's/^export RAY_ADDRESS=127\.0\.0\.1:\([0-9]*\)$/\1/p' "$DIR/cluster.env" 2>/dev/null || true)
    [ -n "$port" ] || port=$(free_ports 1)
    ADDRESS=127.0.0.1:$port
    # node N's worker ports: base + N*100 …; the base is kept, so a node started again gets its old block
    [ -s "$DIR/worker-ports" ] || worker_port_base $(((WORKERS + 1) * WORKER_PORTS)) >"$DIR/worker-ports"
    base=$(cat "$DIR/worker-ports")

    local name
    if group_alive ray-head && "$RAY" health-check --address "$ADDRESS" >/dev/null 2>&1; then
        say "ray-head runs already (pid $(pid_of ray-head))"
    else
        # worker nodes of a head that is gone cannot join a new one: a fresh cluster
        for name in $(node_names); do
            if group_alive "$name"; then
                say "$name: left over from a head that is gone, SIGKILL"
                signal_node "$name" KILL
            fi
            rm -f "$DIR/nodes/$name.pid"
        done
        # shellcheck disable=SC2046  # node_ports prints flags to split
        start_node ray-head --head --port="$port" --num-cpus=0 --num-gpus=0 --include-dashboard=false \
            $(node_ports ray-head "$base")
        wait_for 120 "$RAY" health-check --address "$ADDRESS" \
            || die "the head did not come up in 120 s; $DIR/logs/ray-head.log ends:"$'\n'"$(tail -20 "$DIR/logs/ray-head.log")"
    fi

    local first_gpu=0 i g gpus visible
    for ((i = 1; i <= WORKERS; i++)); do
        gpus=${GPUS[$((i - 1))]:-0} visible=""
        for ((g = first_gpu; g < first_gpu + gpus; g++)); do visible+="${visible:+,}$g"; done
        first_gpu=$((first_gpu + gpus))
        if group_alive "ray-worker-$i"; then
            say "ray-worker-$i runs already (pid $(pid_of "ray-worker-$i"))"
            continue
        fi
        # shellcheck disable=SC2046
        CUDA_VISIBLE_DEVICES=$visible start_node "ray-worker-$i" --address="$ADDRESS" --num-cpus="$CPUS" \
            --num-gpus="$gpus" $(node_ports "ray-worker-$i" $((base + i * WORKER_PORTS)))
    done
    wait_for 180 all_joined || die "$(active_nodes) of $((WORKERS + 1)) nodes joined in 180 s; logs in $DIR/logs"

    cat >"$DIR/cluster.env" <<EOF
# made by scripts/local-cluster.sh up: source it in the shell that runs the dispatcher
export RAY_ADDRESS=$ADDRESS
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN
export BITBENCH_TUNE_DIR=$DIR/tune
EOF
    chmod 600 "$DIR/cluster.env"
    say "up: head at $ADDRESS, $WORKERS worker nodes (${CPUS} CPU each; GPUs: ${GPUS[*]:-none}); logs in $DIR/logs"
    say "join it:  source $DIR/cluster.env && python -m service.dispatcher"
}

signal_node() {  # NAME SIGNAL: to the node's whole process group
    local pid
    pid=$(pid_of "$1")
    [ -n "$pid" ] && kill "-$2" -- "-$pid" 2>/dev/null || true
}

stop_nodes() {  # NAME...: SIGTERM, then SIGKILL what is left after GRACE_S
    local name deadline=$((SECONDS + GRACE_S)) left
    for name in "$@"; do signal_node "$name" TERM; done
    while :; do
        left=()
        for name in "$@"; do group_alive "$name" && left+=("$name"); done
        ((${#left[@]} && SECONDS < deadline)) || break
        sleep 0.5
    done
    for name in "${left[@]}"; do
        say "$name still runs after ${GRACE_S} s: SIGKILL"
        signal_node "$name" KILL
    done
    for name in "$@"; do rm -f "$DIR/nodes/$name.pid"; done
}

known_node() { node_names | grep -qx -- "$1" || [ -e "$DIR/nodes/$1.pid" ] || die "no node named '$1' (see: $0 status)"; }

cmd_down() {
    local names=()
    for f in "$DIR"/nodes/*.pid; do [ -e "$f" ] && names+=("$(basename "$f" .pid)"); done
    ((${#names[@]})) || { say "down: nothing runs from $DIR"; return; }
    # workers first: a worker node's raylet waits 60 s for a head that is gone
    local workers=() name
    for name in "${names[@]}"; do [ "$name" = ray-head ] || workers+=("$name"); done
    ((${#workers[@]} == 0)) || stop_nodes "${workers[@]}"
    [ ! -e "$DIR/nodes/ray-head.pid" ] || stop_nodes ray-head
    say "down: ${names[*]} stopped"
}

cmd_status() {
    local name running=0
    for name in $(node_names); do
        if alive "$name"; then
            say "$name: running (pid $(pid_of "$name"), Ray node $(node_id "$name"))"
            running=1
        elif group_alive "$name"; then
            say "$name: stopped, processes left in its group (pid $(pid_of "$name")): run '$0 down'"
        else
            say "$name: not running"
        fi
    done
    [ -s "$DIR/cluster.env" ] && ADDRESS=$(sed -n 's/^export RAY_ADDRESS=//p' "$DIR/cluster.env")
    if alive ray-head && [ -n "${ADDRESS:-}" ]; then
        auth_env
        "$RAY" status --address "$ADDRESS" || true
    fi
    ((running))
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    stop) [ -n "${2:-}" ] || die "usage: $0 stop NODE"; known_node "$2"; stop_nodes "$2"; say "$2 stopped" ;;
    kill) [ -n "${2:-}" ] || die "usage: $0 kill NODE"; known_node "$2"; signal_node "$2" KILL
          say "$2 killed (SIGKILL to its process group)" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
