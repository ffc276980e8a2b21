#!/usr/bin/env bash
# The floor: how fast can any server with Axon's gRPC API go on this machine, with this client?
#
# Runs the same workloads, with the same load generator, against (a) `myelin-bench null-server`,
# a server that does no work at all (appends confirmed unstored, commands and queries answered
# by itself), and (b) a real Myelin node with a handler application. The rounds alternate
# (null, node, null, node, ...) so that whatever else the machine does disturbs both alike.
# For each run it records throughput, latency and the CPU seconds of server, load generator and
# handler, so the cost per call of gRPC itself is visible next to Myelin's.
#
# Knobs: ROUNDS (2), SECS (5 measured), WARMUP (1), IN_FLIGHT ("1 64"), SKIP_BUILD=1,
# OUT (bench/results/<date>-floor.jsonl). Prints a Markdown table at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
cd "$ROOT"
ROUNDS="${ROUNDS:-2}"
SECS="${SECS:-5}"
WARMUP="${WARMUP:-1}"
IN_FLIGHT="${IN_FLIGHT:-1 64}"
STAMP="$(date -u +%Y-%m-%dT%H-%M-%SZ)"
OUT="${OUT:-$ROOT/bench/results/$STAMP-floor.jsonl}"
mkdir -p "$(dirname "$OUT")"
: >"$OUT"

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    cargo build --release -p myelin-supervisor -p myelin-bench
fi
MYELIN="$ROOT/target/release/myelin"
BENCH="$ROOT/target/release/myelin-bench"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/myelin-floor.XXXXXX")"
PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
    exit "$rc"
}
trap_cleanup

ticks() { # user+system CPU ticks of a process and its reaped children
    awk '{print $14+$15+$16+$17}' "/proc/$1/stat"
}
tree_ticks() { # the same, summed over a process and its live children
    local total=0 pid
    for pid in "$1" $(ps -o pid= --ppid "$1"); do
        total=$((total + $(ticks "$pid" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
wait_port() {
    for _ in $(seq 1 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    return 1
}

# One measured run: SERVER_PID's tree and HANDLER_PID (or none) are charged.
measure() {
    local system="$1" label="$2" server="$3" server_pid="$4" handler_pid="$5"
    shift 5
    local s0 h0 s1 h1
    s0="$(tree_ticks "$server_pid")"
    h0="$( [[ -n "$handler_pid" ]] && ticks "$handler_pid" || echo 0)"
    "$BENCH" "$@" --server "$server" --duration "$SECS" --warmup "$WARMUP" --json --label "$label" \
        >"$WORK/run.json" 2>>"$WORK/bench.log"
    s1="$(tree_ticks "$server_pid")"
    h1="$( [[ -n "$handler_pid" ]] && ticks "$handler_pid" || echo 0)"
    jq -c --arg sys "$system" --argjson s "$((s1 - s0))" --argjson h "$((h1 - h0))" \
        --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
        '{system:$sys, label:.label, in_flight:(.in_flight // .clients),
          rate:(.round_trips_per_s // .events_per_s), p50_ms:.p50_ms, p99_ms:.p99_ms,
          client_cpu_s:.client_cpu_s, server_cpu_s:($s/100),
          handler_cpu_s:($h/100), wall_s:(.warmup_s + .duration_s), loadavg:$load}' \
        "$WORK/run.json" | tee -a "$OUT"
}

start_null() {
    local port
    port="$(free_port)"
    "$BENCH" null-server --listen "127.0.0.1:$port" 2>>"$WORK/null.log" &
    NULL_PID=$!
    PIDS+=("$NULL_PID")
    wait_port "$port"
    NULL_SERVER="http://127.0.0.1:$port"
}

start_node() {
    local port http internal
    port="$(free_port)"
    http="$(free_port)"
    internal="$(free_port)"
    mkdir -p "$WORK/node"
    (cd "$WORK/node" && exec "$MYELIN" --data-dir "$WORK/node/data" --bind-address 127.0.0.1 --port "$port" \
        --http-port "$http" --internal-port "$internal" >"$WORK/node.log" 2>&1) &
    NODE_PID=$!
    PIDS+=("$NODE_PID")
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$http/v1/public/me" >/dev/null 2>&1 && break
        sleep 0.1
    done
    NODE_SERVER="http://127.0.0.1:$port"
}

start_handler() { # KIND: command or query
    local kind="$1" ready="$WORK/$1.ready"
    local name="Bench${kind^}"
    rm -f "$ready"
    "$BENCH" "$kind-handler" "--$kind" "$name" --handlers 1 --permits 5000 --server "$NODE_SERVER" \
        --ready-file "$ready" 2>>"$WORK/handler.log" &
    HANDLER_PID=$!
    PIDS+=("$HANDLER_PID")
    for _ in $(seq 1 300); do
        [[ -e "$ready" ]] && return 0
        sleep 0.1
    done
    echo "the $kind handler did not become ready" >&2
    tail -20 "$WORK/handler.log" >&2
    return 1
}

echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD)" >&2
start_null
start_node

for kind in command query; do
    start_handler "$kind"
    for round in $(seq 1 "$ROUNDS"); do
        for k in $IN_FLIGHT; do
            measure null "$kind-$k" "$NULL_SERVER" "$NULL_PID" "" \
                "$kind-dispatch" "--$kind" "Bench${kind^}" --in-flight "$k" --payload-bytes 200
            measure myelin "$kind-$k" "$NODE_SERVER" "$NODE_PID" "$HANDLER_PID" \
                "$kind-dispatch" "--$kind" "Bench${kind^}" --in-flight "$k" --payload-bytes 200
        done
    done
    kill -TERM "$HANDLER_PID"
    wait "$HANDLER_PID" 2>/dev/null || true
done
for round in $(seq 1 "$ROUNDS"); do
    for k in $IN_FLIGHT; do
        measure null "append-$k" "$NULL_SERVER" "$NULL_PID" "" append --clients "$k"
        measure myelin "append-$k" "$NODE_SERVER" "$NODE_PID" "" append --clients "$k"
    done
done

echo >&2
echo "results: $OUT" >&2
# Per workload: the best round of each system, and CPU µs per call (server, client, handler).
jq -rs '
  def r(x): (x * 10 | round) / 10;
  group_by(.label) | map(
    (map(select(.system=="null")) | max_by(.rate)) as $n
    | (map(select(.system=="myelin")) | max_by(.rate)) as $m
    | def per(s; x): r(x * 1e6 / (s.rate * s.wall_s));
      "| \(.[0].label) | \($n.rate) (\($n.p50_ms) / \($n.p99_ms)) | \(per($n; $n.server_cpu_s)) / \(per($n; $n.client_cpu_s)) | \($m.rate) (\($m.p50_ms) / \($m.p99_ms)) | \(per($m; $m.server_cpu_s)) / \(per($m; $m.client_cpu_s)) / \(per($m; $m.handler_cpu_s)) | \(r($m.rate / $n.rate * 100))% |"
  ) | (["| workload | null server: calls/s (p50 / p99 ms) | null: server / client CPU µs per call | Myelin: calls/s (p50 / p99 ms) | Myelin: server / client / handler CPU µs per call | Myelin ÷ null |", "|---|---|---|---|---|---|"] + .) | .[]' "$OUT"
