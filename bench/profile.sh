#!/usr/bin/env bash
# Profile of Myelin's append path under load: starts a fresh single node in a temp dir, runs
# `myelin-bench compare --system myelin --workload append` (CLIENTS clients, one event per call)
# and, inside the measured window, in turn
#   1. `perf record` of the eventstore and router processes (self time per symbol),
#   2. `strace -c -f` of the same two (system calls by type; divided by the events appended in
#      the same window: syscalls per event),
#   3. `perf stat` of context switches and CPU migrations.
# Writes docs/benchmarks/<UTC date>-<machine>-profile.md (OUT_DIR to change). strace slows the
# traced processes a lot: its window is separate from perf's, and its throughput is reported.
#
# Knobs: CLIENTS (64), SECS seconds per window (8), SKIP_BUILD=1, KEEP=1, BENCH_TMPDIR, OUT_DIR.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
cd "$ROOT"
CLIENTS="${CLIENTS:-64}"
SECS="${SECS:-8}"
OUT_DIR="${OUT_DIR:-$ROOT/docs/benchmarks}"
for tool in perf strace jq curl; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    cargo build --release -p myelin-supervisor -p myelin-bench
fi
MYELIN="$ROOT/target/release/myelin"
BENCH="$ROOT/target/release/myelin-bench"

cpu_model="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
MACHINE="${MACHINE:-$(nproc)cpu-$(echo "$cpu_model" | tr 'A-Z' 'a-z' | sed -E 's/\((r|tm)\)//g; s/ (processor|cpu)\b.*//; s/[^a-z0-9]+/-/g; s/^-|-$//g' | cut -c1-30)}"
STAMP="$(date -u +%Y-%m-%dT%H%MZ)"
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/$STAMP-$MACHINE-profile.md"

WORK="$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/myelin-profile.XXXXXX")"
NODE=""
LOAD=""
cleanup() {
    local rc=$?
    [[ -z "$LOAD" ]] || kill -TERM "$LOAD" 2>/dev/null || true
    if [[ -n "$NODE" ]] && kill -0 -- "-$NODE" 2>/dev/null; then
        kill -TERM -- "-$NODE" 2>/dev/null || true
        for _ in $(seq 1 200); do kill -0 -- "-$NODE" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$NODE" 2>/dev/null || true
    fi
    if [[ "${KEEP:-0}" == 1 ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap_cleanup

PORT="$(free_port)" HTTP="$(free_port)" INTERNAL="$(free_port)"
mkdir -p "$WORK/data"
pushd "$WORK" >/dev/null
setsid "$MYELIN" --data-dir "$WORK/data" --bind-address 127.0.0.1 --port "$PORT" --http-port "$HTTP" \
    --internal-port "$INTERNAL" >"$WORK/node.log" 2>&1 </dev/null &
NODE=$!
popd >/dev/null
for i in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$HTTP/v1/public/me" >/dev/null 2>&1 && break
    [[ "$i" != 600 ]] || { tail -30 "$WORK/node.log" >&2; exit 1; }
    sleep 0.1
done
child() { pgrep -P "$NODE" -f " $1( |$)" | head -1; }
ES="$(child eventstore)" ROUTER="$(child router)"
[[ -n "$ES" && -n "$ROUTER" ]] || { echo "eventstore/router processes not found" >&2; exit 1; }
echo "node $NODE: eventstore $ES, router $ROUTER" >&2

# Runs the append load for warm-up + SECS; "$@" runs (backgrounded) after the warm-up, for
# SECS - 1 seconds. Prints the load generator's JSON line.
window() {
    local warm=3
    "$BENCH" compare --system myelin --server "http://127.0.0.1:$PORT" --workload append --clients "$CLIENTS" \
        --duration "$SECS" --warmup "$warm" --server-pid "$NODE" --json >"$WORK/load.json" &
    LOAD=$!
    sleep "$warm"
    "$@"
    wait "$LOAD"
    LOAD=""
    cat "$WORK/load.json"
}
rate() { jq -r '.events_per_s' <<<"$1"; }

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "perf record window" >&2
PERF_JSON="$(window perf record -F 499 -p "$ES,$ROUTER" -o "$WORK/perf.data" -- sleep $((SECS - 1)) 2>/dev/null)"
echo "strace window" >&2
# strace detaches and writes its summary on SIGINT (given a command it would wait for the
# attached processes too).
STRACE_JSON="$(window timeout -s INT $((SECS - 1)) strace -c -f -p "$ES" -p "$ROUTER" -o "$WORK/strace.txt" 2>/dev/null || true)"
echo "perf stat window" >&2
STAT_JSON="$(window perf stat -e context-switches,cpu-migrations,task-clock -p "$ES,$ROUTER" -o "$WORK/stat.txt" -- sleep $((SECS - 1)))"
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"
# Thread id → process, to split perf's samples between eventstore and router.
{ ls "/proc/$ES/task" | sed 's/$/ eventstore/'; ls "/proc/$ROUTER/task" | sed 's/$/ router/'; } >"$WORK/tids.txt"

# strace's window (SECS - 1 s) holds about rate × (SECS - 1) events.
strace_events="$(jq -r "(.events_per_s * ($SECS - 1)) | floor" <<<"$STRACE_JSON")"
{
    echo "# Profile of Myelin's append path: $STAMP, $MACHINE"
    echo
    echo "Commit $(git rev-parse --short HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo ' (uncommitted changes in the tree)'); $(nproc) CPUs ($cpu_model); load average at start $LOAD_START, at end $LOAD_END."
    echo "Load: \`myelin-bench compare --system myelin --workload append --clients $CLIENTS\` (one event per call, 10% to hot aggregates), $SECS s windows after 3 s warm-up."
    echo
    echo "| window | events/s | p50 / p99 ms | node CPU µs/event | bench CPU µs/event | other CPU s |"
    echo "|---|---:|---|---:|---:|---:|"
    for w in perf:"$PERF_JSON" strace:"$STRACE_JSON" "perf stat":"$STAT_JSON"; do
        jq -r --arg w "${w%%:*}" '"| \($w) | \(.events_per_s) | \(.p50_ms) / \(.p99_ms) | \(.server_cpu_us_per_event) | \(.bench_cpu_us_per_event) | \(.other_cpu_s) |"' <<<"${w#*:}"
    done
    echo
    report() {
        perf report -i "$WORK/perf.data" --stdio --no-children --percent-limit "$1" --sort "$2" 2>/dev/null |
            grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | head -"$3" || true
    }
    echo "## perf: share of samples by process, by thread name, by binary, and self time by symbol (top 40)"
    echo
    echo "Flat profile (Rust release builds have no frame pointers, so no call graphs): -F 499 over eventstore + router."
    echo
    echo '```'
    report 0 pid 1000 | awk 'NR == FNR {proc[$1] = $2; next}
        {split($2, t, ":"); p = (t[1] in proc) ? proc[t[1]] : "other"; sub("%", "", $1); share[p] += $1}
        END {for (p in share) printf "%8.2f%%  %s (all threads)\n", share[p], p}' "$WORK/tids.txt" - | sort -rn
    echo
    report 1 comm 10
    echo
    report 0.5 dso 10
    echo
    report 0.4 comm,dso,symbol 40
    echo '```'
    echo
    echo "Myelin's own code only (share of all samples, top 25):"
    echo
    echo '```'
    perf report -i "$WORK/perf.data" --stdio --no-children --dsos myelin --sort symbol --percent-limit 0.15 2>/dev/null |
        grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | head -25 || true
    echo '```'
    echo
    echo "## strace -c -f: system calls of eventstore + router (window of $((SECS - 1)) s, ~$strace_events events appended)"
    echo
    echo '```'
    awk -v ev="$strace_events" 'NR <= 2 {print; next} /^-/ {print; next}
        $4 ~ /^[0-9]+$/ {printf "%s   %.2f per event\n", $0, $4 / (ev > 0 ? ev : 1); next} {print}' "$WORK/strace.txt" | head -30 || true
    echo '```'
    echo
    echo "## perf stat (eventstore + router)"
    echo
    echo '```'
    grep -E 'context-switches|cpu-migrations|task-clock|seconds time' "$WORK/stat.txt" | sed 's/^ *//' || true
    echo '```'
    echo
    echo "Context switches per event: $(awk -v r="$(rate "$STAT_JSON")" -v s=$((SECS - 1)) '/context-switches/ {gsub(",", "", $1); printf "%.2f", $1 / (r * s)}' "$WORK/stat.txt")"
} >"$REPORT"
echo "wrote $REPORT" >&2
cat "$REPORT"
