#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine, on loopback only: a head node and one worker
# node, each a separate raylet with --num-cpus=1 (see /work/shared/reference/stack-notes.md).
# Use it to try RAY_ADDRESS-style cluster runs and the `cluster`-marked tests without a cloud.
#
#   infra/local-cluster.sh start     # prints the variables a client needs
#   eval "$(infra/local-cluster.sh env)"
#   ray status                       # 2 nodes
#   infra/local-cluster.sh stop      # stops only the processes of this cluster
#
# Settings (environment):
#   UNLEARNFLOW_RAY_DIR   state + Ray temp dir (default /tmp/ulf-ray-$UID; keep it short:
#                         Ray's unix socket paths live under it)
#   RAY_HEAD_PORT         GCS port of the head node (default: a free port)
#   RAY_NUM_CPUS          CPUs per node (default 1)
#
# Token authentication is on (RAY_AUTH_MODE=token): the script writes its own token to
# $UNLEARNFLOW_RAY_DIR/auth_token and points RAY_AUTH_TOKEN_PATH at it, so ~/.ray/auth_token is
# neither read nor written. Clients need what `env` prints: RAY_ADDRESS, RAY_AUTH_MODE,
# RAY_AUTH_TOKEN_PATH and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (without the last, Ray rewrites
# 127.0.0.1 into the machine's other IP and the client cannot reach the cluster).
# `stop` does not use `ray stop`, which would stop every Ray process on the machine: it
# signals only processes whose command line names this cluster's temp dir or GCS port, and
# their descendants (Ray's worker processes rename themselves `ray::...`). If `start` fails
# half-way, `stop` cleans up what it left.
set -euo pipefail

DIR="${UNLEARNFLOW_RAY_DIR:-/tmp/ulf-ray-${UID}}"
TMP="$DIR/tmp"
STATE="$DIR/cluster.env"
NUM_CPUS="${RAY_NUM_CPUS:-1}"

die() { echo "local-cluster.sh: $*" >&2; exit 1; }

command -v ray >/dev/null || die "ray not on PATH (activate the project's virtual environment)"
PY="$(dirname "$(command -v ray)")/python"
[ -x "$PY" ] || PY=python3

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# PIDs whose command line mentions this cluster's temp dir, plus all their descendants.
cluster_pids() {
    local all=" " pid
    local -a queue kids
    # The Ray client server names only the GCS address, not the temp dir: match that too.
    # (the patterns go to awk through the environment, so awk's own command line does not match)
    local gcs="--address=[^ ]*:$(cat "$DIR/head_port" 2>/dev/null || echo none)( |\$)"
    read -r -a queue <<<"$(ps -eo pid=,args= | D="$TMP/" G="$gcs" awk \
        'index($0, ENVIRON["D"]) || $0 ~ ENVIRON["G"] { print $1 }' | tr '\n' ' ')"
    while [ "${#queue[@]}" -gt 0 ]; do
        pid="${queue[0]}"
        queue=("${queue[@]:1}")
        case "$all" in *" $pid "*) continue ;; esac
        [ "$pid" = "$$" ] && continue
        all="$all$pid "
        read -r -a kids <<<"$(ps -o pid= --ppid "$pid" 2>/dev/null | tr '\n' ' ')"
        queue+=("${kids[@]}")
    done
    echo $all
}

client_env() {
    [ -f "$STATE" ] || die "no cluster state in $STATE (run: $0 start)"
    cat "$STATE"
}

cmd_start() {
    if [ -f "$STATE" ] && [ -n "$(cluster_pids)" ]; then
        die "a cluster from $DIR is already running (run: $0 stop)"
    fi
    mkdir -p "$TMP"
    chmod 700 "$DIR"
    local port="${RAY_HEAD_PORT:-$(free_port)}"
    echo "$port" >"$DIR/head_port"
    local token="$DIR/auth_token"
    [ -s "$token" ] || "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$token"
    chmod 600 "$token"

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token"
    # Loopback only. Ray rewrites a node IP or address of 127.0.0.1/localhost into the
    # machine's routable IP, and its servers then bind 0.0.0.0, unless
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; with that set everything stays on 127.0.0.1, but
    # the `ray start --address` CLI refuses to add a node. So the head node comes from
    # `ray start --head`, and the worker node from the same Node class `ray start` uses
    # (below), without that CLI check. Fixed default ports (dashboard 8265, client server
    # 10001, dashboard agent 52365) are replaced by free ones so clusters do not clash.
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
    unset RAY_ADDRESS
    ray start --head --node-ip-address=127.0.0.1 --port="$port" --num-cpus="$NUM_CPUS" \
        --temp-dir="$TMP" --disable-usage-stats \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$(free_port)" \
        --ray-client-server-port="$(free_port)" \
        --dashboard-agent-listen-port="$(free_port)" >"$DIR/head.log" 2>&1 \
        || { cat "$DIR/head.log" >&2; die "head node failed to start (log: $DIR/head.log)"; }
    "$PY" - "127.0.0.1:$port" "$NUM_CPUS" "$TMP" "$(free_port)" >"$DIR/worker.log" 2>&1 <<'PYEOF' \
        || { cat "$DIR/worker.log" >&2; die "worker node failed to start (log: $DIR/worker.log)"; }
import sys

import ray._private.node
from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
from ray._private.parameter import RayParams
from ray._private.resource_isolation_config import ResourceIsolationConfig

gcs_address, num_cpus, temp_dir, agent_port = sys.argv[1:5]
params = RayParams(
    gcs_address=gcs_address, node_ip_address="127.0.0.1", node_name="127.0.0.1",
    num_cpus=int(num_cpus), temp_dir=temp_dir, dashboard_agent_listen_port=int(agent_port),
    resource_isolation_config=ResourceIsolationConfig(enable_resource_isolation=False),
)
ensure_token_if_auth_enabled(None, create_token_if_missing=False)
# As `ray start --address` does: the processes outlive this interpreter.
ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False, connect_only=False)
print(f"worker node started, joined {gcs_address}")
PYEOF

    cat >"$STATE" <<EOF
export RAY_ADDRESS=127.0.0.1:$port
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
EOF
    echo "Ray cluster up: head + 1 worker node, $NUM_CPUS CPU each, GCS at 127.0.0.1:$port"
    echo "Client environment (eval \"\$($0 env)\"):"
    cat "$STATE"
}

alive() {  # a zombie has exited: only its parent (init here) has yet to reap it
    local st
    st="$(ps -o stat= -p "$1" 2>/dev/null || true)"
    [ -n "$st" ] && [ "${st#Z}" = "$st" ]
}

# SIGTERM, wait up to $1 seconds, then SIGKILL what is left.
terminate() {
    local grace="$1" left p; shift
    [ "$#" -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for _ in $(seq 1 $((grace * 4))); do
        left=""
        for p in "$@"; do if alive "$p"; then left="$left $p"; fi; done
        [ -z "$left" ] && return 0
        sleep 0.25
    done
    echo "SIGKILL to the processes still running after ${grace}s:$left"
    kill -KILL $left 2>/dev/null || true
}

cmd_stop() {
    local pids p raylets="" gcs="" others=""
    pids="$(cluster_pids)"
    if [ -z "$pids" ]; then
        echo "no processes of the cluster in $TMP are running"
    else
        echo "stopping $(echo $pids | wc -w) processes of the cluster in $TMP"
        # Ray's own order (`ray stop`): raylets, then everything else, then the GCS last.
        for p in $pids; do
            case "$(ps -o comm= -p "$p" 2>/dev/null || true)" in
                raylet) raylets="$raylets $p" ;;
                gcs_server) gcs="$gcs $p" ;;
                *) others="$others $p" ;;
            esac
        done
        terminate 10 $raylets
        terminate 10 $others
        terminate 10 $gcs
    fi
    pids="$(for p in $(cluster_pids); do if alive "$p"; then echo "$p"; fi; done)"
    [ -z "$pids" ] || die "still running: $pids"
    rm -f "$STATE" "$DIR/head_port"
    echo "stopped"
}

cmd_status() {
    local pids
    pids="$(cluster_pids)"
    echo "processes of the cluster in $TMP: $(echo $pids | wc -w)"
    if [ -f "$STATE" ]; then ( . "$STATE"; ray status --address="$RAY_ADDRESS" ); fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) client_env ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
