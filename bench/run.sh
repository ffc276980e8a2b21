#!/usr/bin/env bash
# Reproducible benchmark run: builds release binaries, starts a fresh single node in a temp dir on
# loopback, runs the workloads of docs/benchmarks.md against it, prints a Markdown table and
# writes raw JSON lines to bench/results/<date>.jsonl. The node is stopped however this ends.
#
# Knobs (environment):
#   BENCH_TMPDIR        where the node's temp dir is made (default: $TMPDIR or /tmp); the disk
#                       under test
#   FILL_EVENTS         events loaded by the fill step (default 1000000)
#   APPEND_SECS         measured seconds per append run (default 10)
#   APPEND_WARMUP       warm-up seconds per append run (default 2)
#   READ_SAMPLES        aggregate reads measured (default 2000)
#   MSG_SECS            measured seconds per command/query round-trip run (default 10)
#   MSG_WARMUP          warm-up seconds per command/query run (default 2)
#   ONLY                `eventstore`: only the event-store steps; `messaging`: only the command and
#                       query round trips (default: all)
#   SKIP_BUILD=1        use the binaries already in target/release
#   KEEP=1              keep the temp dir (data + node log) afterwards
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
cd "$ROOT"

FILL_EVENTS="${FILL_EVENTS:-1000000}"
APPEND_SECS="${APPEND_SECS:-10}"
APPEND_WARMUP="${APPEND_WARMUP:-2}"
READ_SAMPLES="${READ_SAMPLES:-2000}"
MSG_SECS="${MSG_SECS:-10}"
MSG_WARMUP="${MSG_WARMUP:-2}"
ONLY="${ONLY:-all}"
AGG_SIZE=50
case "$ONLY" in all | eventstore | messaging) ;; *) echo "ONLY must be eventstore or messaging" >&2; exit 2 ;; esac

log() { printf '\n== %s\n' "$*" >&2; }

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "building (cargo build --release -p myelin-supervisor -p myelin-bench)"
    cargo build --release -p myelin-supervisor -p myelin-bench
fi
MYELIN="$ROOT/target/release/myelin"
BENCH="$ROOT/target/release/myelin-bench"
[[ -x "$MYELIN" && -x "$BENCH" ]] || { echo "missing $MYELIN or $BENCH" >&2; exit 1; }

mkdir -p "$ROOT/bench/results"
STAMP="$(date -u +%Y-%m-%dT%H-%M-%SZ)"
RESULTS="$ROOT/bench/results/$STAMP.jsonl"
: >"$RESULTS"

WORK="$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/myelin-bench.XXXXXX")"
DATA="$WORK/data"
mkdir -p "$DATA"
NODE_PID=""
BENCH_PID=""
HANDLER_PID=""

cleanup() {
    local rc=$?
    if [[ -n "$HANDLER_PID" ]] && kill -0 "$HANDLER_PID" 2>/dev/null; then
        kill -TERM "$HANDLER_PID" 2>/dev/null || true
        wait "$HANDLER_PID" 2>/dev/null || true
    fi
    if [[ -n "$BENCH_PID" ]] && kill -0 "$BENCH_PID" 2>/dev/null; then
        kill -TERM "$BENCH_PID" 2>/dev/null || true
        wait "$BENCH_PID" 2>/dev/null || true
    fi
    if [[ -n "$NODE_PID" ]] && kill -0 "$NODE_PID" 2>/dev/null; then
        kill -TERM "$NODE_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$NODE_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$NODE_PID" 2>/dev/null; then
            echo "node did not stop in 10 s; killing it" >&2
            kill -KILL "$NODE_PID" 2>/dev/null || true
        fi
        wait "$NODE_PID" 2>/dev/null || true
    fi
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap_cleanup

PORT="$(free_port)"
HTTP_PORT="$(free_port)"
INTERNAL_PORT="$(free_port)"
SERVER="http://127.0.0.1:$PORT"

# Machine facts.
CPU_MODEL="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
FS_TYPE="$(df -T "$WORK" | awk 'NR==2 {print $2}')"
FS_DEV="$(df -T "$WORK" | awk 'NR==2 {print $1}')"
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
jq -nc --arg date "$STAMP" --arg host "$(hostname)" --argjson nproc "$(nproc)" --arg cpu "$CPU_MODEL" \
    --arg kernel "$(uname -r)" --arg fs "$FS_TYPE" --arg dev "$FS_DEV" --arg dir "$WORK" \
    --arg mem "$(free -m | awk '/^Mem:/ {print $2}')" --arg load "$LOAD_START" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg only "$ONLY" --arg dirty "$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -qv '^??' && echo yes || echo no)" \
    '{workload:"machine", date:$date, host:$host, nproc:$nproc, cpu:$cpu, kernel:$kernel, fs:$fs,
      device:$dev, tmpdir:$dir, mem_mb:($mem|tonumber), loadavg_start:$load, commit:$commit,
      uncommitted_changes:$dirty, only:$only}' >>"$RESULTS"
log "machine: $(nproc) CPUs ($CPU_MODEL), kernel $(uname -r), $FS_TYPE on $FS_DEV, load $LOAD_START"
if awk -v l="${LOAD_START%% *}" 'BEGIN {exit !(l >= 1)}'; then
    echo "WARNING: 1-minute load average is $LOAD_START (>= 1): other work is running; figures may be disturbed" >&2
fi

log "starting node in $WORK (client port $PORT, http $HTTP_PORT, internal $INTERNAL_PORT)"
# Run from the temp dir so no ./axonserver.properties or ./myelin.toml of the caller is read.
(cd "$WORK" && exec "$MYELIN" --data-dir "$DATA" --bind-address 127.0.0.1 --port "$PORT" \
    --http-port "$HTTP_PORT" --internal-port "$INTERNAL_PORT" >"$WORK/node.log" 2>&1) &
NODE_PID=$!
for i in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$HTTP_PORT/v1/public/me" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$NODE_PID" 2>/dev/null; then
        echo "node exited during start; log:" >&2
        tail -50 "$WORK/node.log" >&2
        exit 1
    fi
    if [[ "$i" == 600 ]]; then
        echo "node not ready after 60 s; log:" >&2
        tail -50 "$WORK/node.log" >&2
        exit 1
    fi
    sleep 0.1
done
echo "node ready (pid $NODE_PID)" >&2

# All descendants of a pid.
descendants() {
    local kids k
    kids="$(pgrep -P "$1" || true)"
    for k in $kids; do
        echo "$k"
        descendants "$k"
    done
}
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# Records the node's memory (supervisor + children, and the eventstore child) as a JSON line.
record_memory() {
    local label="$1" total es_pid="" es_rss=0 es_hwm=0 router_rss=0 p cmd
    total="$(rss_kb "$NODE_PID")"
    for p in $(descendants "$NODE_PID"); do
        total=$((total + $(rss_kb "$p")))
        cmd="$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null || true)"
        case "$cmd" in
            *" eventstore "*) es_pid="$p"; es_rss="$(rss_kb "$p")"; es_hwm="$(hwm_kb "$p")" ;;
            *" router "*) router_rss="$(rss_kb "$p")" ;;
        esac
    done
    jq -nc --arg lbl "$label" --argjson total "$total" --argjson es "$es_rss" --argjson hwm "$es_hwm" \
        --argjson router "$router_rss" --argjson procs "$(( $(descendants "$NODE_PID" | wc -l) + 1 ))" \
        '{workload:"memory", "label":$lbl, node_rss_mb:(($total/1024*10|round)/10), processes:$procs,
          eventstore_rss_mb:(($es/1024*10|round)/10), eventstore_peak_rss_mb:(($hwm/1024*10|round)/10),
          router_rss_mb:(($router/1024*10|round)/10)}' | tee -a "$RESULTS" >&2
}
record_disk() {
    local label="$1" bytes
    bytes="$(du -sb "$DATA" | cut -f1)"
    jq -nc --arg lbl "$label" --argjson b "$bytes" \
        '{workload:"disk", "label":$lbl, data_dir_mb:(($b/1048576*10|round)/10), data_dir_bytes:$b}' \
        | tee -a "$RESULTS" >&2
}
# CPU ticks (1/100 s) used so far by the eventstore, the router, the whole node, the machine
# (busy) and the handler application (0 when none runs).
node_ticks() {
    local es=0 router=0 total p t cmd
    total="$(awk '{print $14+$15}' "/proc/$NODE_PID/stat" 2>/dev/null || echo 0)"
    for p in $(descendants "$NODE_PID"); do
        t="$(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0)"
        total=$((total + t))
        cmd="$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null || true)"
        case "$cmd" in
            *" eventstore "*) es="$t" ;;
            *" router "*) router="$t" ;;
        esac
    done
    echo "$es $router $total $(sys_busy_ticks) $(handler_ticks)"
}
handler_ticks() {
    if [[ -n "$HANDLER_PID" ]]; then
        awk '{print $14+$15}' "/proc/$HANDLER_PID/stat" 2>/dev/null || echo 0
    else
        echo 0
    fi
}
# Busy CPU ticks of the whole machine (all processes, all CPUs).
sys_busy_ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }
# Runs one workload against the node, recording its JSON line and the node's CPU use during it.
bench() {
    local label="$1" before after t0 t1
    shift
    log "$label: myelin-bench $*"
    read -r -a before <<<"$(node_ticks)"
    t0="$(date +%s.%N)"
    # In the background and waited for, so that a signal stops the run at once (see cleanup).
    "$BENCH" "$@" --server "$SERVER" --json --label "$label" >>"$RESULTS" &
    BENCH_PID=$!
    wait "$BENCH_PID"
    BENCH_PID=""
    t1="$(date +%s.%N)"
    read -r -a after <<<"$(node_ticks)"
    jq -nc --arg lbl "$label" --argjson es "$((after[0] - before[0]))" --argjson r "$((after[1] - before[1]))" \
        --argjson n "$((after[2] - before[2]))" --argjson sys "$((after[3] - before[3]))" --argjson wall "$(echo "$t1 - $t0" | bc -l)" \
        --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" --argjson h "$((after[4] - before[4]))" \
        --arg hpid "$HANDLER_PID" \
        '{workload:"cpu", "label":$lbl, wall_s:(($wall*100|round)/100), eventstore_cpu_s:($es/100),
          router_cpu_s:($r/100), node_cpu_s:($n/100), machine_busy_cpu_s:($sys/100), loadavg:$load}
         + (if $hpid == "" then {} else {handler_cpu_s:($h/100)} end)' | tee -a "$RESULTS" >&2
}
# Starts a handler application (`myelin-bench command-handler|query-handler ARGS`) as its own
# process; returns once all its streams are subscribed. Stopped by stop_handler or cleanup.
start_handler() {
    local label="$1" ready="$WORK/handler.ready"
    shift
    rm -f "$ready"
    log "$label: myelin-bench $* (separate process)"
    "$BENCH" "$@" --server "$SERVER" --json --label "$label" --ready-file "$ready" \
        >>"$RESULTS" 2>>"$WORK/handler.log" &
    HANDLER_PID=$!
    for i in $(seq 1 300); do
        [[ -e "$ready" ]] && break
        if ! kill -0 "$HANDLER_PID" 2>/dev/null || [[ "$i" == 300 ]]; then
            echo "handler did not become ready; its log:" >&2
            tail -20 "$WORK/handler.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "handler ready (pid $HANDLER_PID)" >&2
}
stop_handler() {
    kill -TERM "$HANDLER_PID" 2>/dev/null || true
    wait "$HANDLER_PID" || { echo "handler exited with an error; its log:" >&2; tail -20 "$WORK/handler.log" >&2; }
    HANDLER_PID=""
}

record_memory idle

if [[ "$ONLY" != messaging ]]; then
log "fsync: raw write+fdatasync rate of the data dir's disk"
"$BENCH" fsync --dir "$DATA" --duration 3 --json --label fsync-4k >>"$RESULTS"

bench append-1 append --clients 1 --duration "$APPEND_SECS" --warmup "$APPEND_WARMUP"
bench append-64 append --clients 64 --duration "$APPEND_SECS" --warmup "$APPEND_WARMUP"
bench append-64-x10 append --clients 64 --duration "$APPEND_SECS" --warmup "$APPEND_WARMUP" \
    --events-per-append 10
bench append-64-hot append --clients 64 --duration "$APPEND_SECS" --warmup "$APPEND_WARMUP" \
    --hot-aggregates 16 --hot-share 0.1

# The fill adds FILL_EVENTS on top of what the append runs stored; replay reads that many from 0.
bench fill fill --events "$FILL_EVENTS" --aggregate-size "$AGG_SIZE"
record_memory after-fill
record_disk after-fill

bench replay replay --from 0 --events "$FILL_EVENTS" --permits 10000
record_memory after-replay

AGGS=$((FILL_EVENTS / AGG_SIZE))
bench aggregate-read-1 aggregate-read --aggregate-prefix agg --aggregate-count "$AGGS" \
    --samples "$READ_SAMPLES" --concurrency 1 --expect "$AGG_SIZE"
bench aggregate-read-8 aggregate-read --aggregate-prefix agg --aggregate-count "$AGGS" \
    --samples "$READ_SAMPLES" --concurrency 8 --expect "$AGG_SIZE"
fi

if [[ "$ONLY" != eventstore ]]; then
    # Command and query round trips: the handler is a separate application (process) on its own
    # connection; the dispatcher is another. Each dispatch run first waits until the handler's
    # subscription routes (retrying AXONIQ-4000 / AXONIQ-5000 answers).
    start_handler command-handler command-handler --command BenchCommand --handlers 1 --permits 5000
    for k in 1 64; do
        bench "command-$k" command-dispatch --command BenchCommand --in-flight "$k" \
            --duration "$MSG_SECS" --warmup "$MSG_WARMUP" --payload-bytes 200
    done
    stop_handler
    start_handler query-handler query-handler --query BenchQuery --handlers 1 --permits 5000
    for k in 1 64; do
        bench "query-$k" query-dispatch --query BenchQuery --in-flight "$k" \
            --duration "$MSG_SECS" --warmup "$MSG_WARMUP" --payload-bytes 200
    done
    stop_handler
    record_memory after-messaging
fi
record_memory end

LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"
jq -nc --arg load "$LOAD_END" '{workload:"end", loadavg_end:$load}' >>"$RESULTS"
if grep -qiE ' (ERROR|WARN) ' "$WORK/node.log"; then
    log "node log warnings/errors:"
    grep -iE ' (ERROR|WARN) ' "$WORK/node.log" | tail -20 >&2
fi

log "results ($RESULTS)"
"$ROOT/bench/table.sh" "$RESULTS"
