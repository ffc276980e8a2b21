//! `compare`: one workload against one system, in the same shape for every system, so that
//! Myelin and its peers are measured alike (bench/compare.sh runs the whole matrix).
//!
//! Workloads:
//! - `setup`: create the schema / stream and check the durability settings;
//! - `fill`: load `--events` events in aggregates `agg-<k>` of `--aggregate-size` events (each
//!   fill call carries event `s` of `--batch-events` aggregates, so an aggregate's events are
//!   spread over the log as in a real store);
//! - `replay`: read the first `--events` events in global order through one reader;
//! - `aggregate-read`: N clients each reading random fill aggregates, one read at a time,
//!   checking every read returns the whole aggregate in order;
//! - `append`: N clients each appending `--events-per-append` events per call, `--in-flight`
//!   calls outstanding per client; each call goes to a new aggregate, except a share
//!   `--hot-share` that goes to one of `--hot-aggregates` shared aggregates with the sequence
//!   check (clients sharing one serialize on it, as one aggregate's command handler would).
//!
//! Duration-based workloads run `--warmup` seconds, then measure `--duration` seconds: only
//! calls that start and end inside the window count. CPU time is measured over the same window:
//! of this process, and (with `--server-pid`) of the server's whole process tree.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

use crate::common::{self, Common, Errors, Rng};
use crate::cpu;
use crate::system::{Append, Kind, System};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Setup,
    Fill,
    Replay,
    AggregateRead,
    Append,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// The system behind `--server` (myelin: http://host:port; redis: redis://host:port/;
    /// postgres: "host=.. port=.. user=.."; nats: host:port; etcd: http://host:port). For a
    /// cluster (myelin, nats, etcd), `--server` lists every node, comma-separated: the
    /// connections are spread over them.
    #[arg(long, value_enum)]
    pub system: Kind,
    #[arg(long, value_enum)]
    pub workload: Workload,
    /// Concurrent clients.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Appends outstanding per client.
    #[arg(long, default_value_t = 1)]
    pub in_flight: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Events per append call (one transaction where the system has them).
    #[arg(long, default_value_t = 1)]
    pub events_per_append: usize,
    /// Shared aggregates that take `--hot-share` of the appends, with the sequence check.
    #[arg(long, default_value_t = 16)]
    pub hot_aggregates: usize,
    #[arg(long, default_value_t = 0.1)]
    pub hot_share: f64,
    /// Clients per connection (PostgreSQL always has one connection per client).
    #[arg(long, default_value_t = 8)]
    pub clients_per_connection: usize,
    /// Events stored by `fill` and read by `replay`.
    #[arg(long, default_value_t = 500_000)]
    pub events: u64,
    /// Events per fill aggregate (`aggregate-read` expects exactly this many).
    #[arg(long, default_value_t = 50)]
    pub aggregate_size: u64,
    /// Events per fill call.
    #[arg(long, default_value_t = 500)]
    pub batch_events: u64,
    /// Concurrent fill clients.
    #[arg(long, default_value_t = 8)]
    pub fill_clients: usize,
    /// Id prefix of the hot aggregates (default: random per run). Two processes given the same
    /// prefix contend for the same aggregates without sharing a lock: their appends must then
    /// be refused now and then by the system's sequence check (a test of that check).
    #[arg(long)]
    pub hot_prefix: Option<String>,
    /// NATS: replicas of the stream `setup` creates (3 on a three-server cluster); `setup`
    /// refuses a stream that exists with another count.
    #[arg(long, default_value_t = 1)]
    pub stream_replicas: usize,
    /// Root pid of the server's process tree, whose CPU time is measured (repeat for a server
    /// of several processes that are not one tree, e.g. a cluster's nodes).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
}

const FILL_PREFIX: &str = "agg";

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients > 0 && args.in_flight > 0 && args.events_per_append > 0 && args.aggregate_size > 0,
        "clients, in-flight, events-per-append and aggregate-size must be > 0"
    );
    anyhow::ensure!((0.0..=1.0).contains(&args.hot_share), "hot-share must be in [0, 1]");
    match args.workload {
        Workload::Setup => {
            let system = System::connect(args.system, &args.common.server, &args.common.context, 1).await?;
            system.setup(args.stream_replicas).await?;
            eprintln!("{}: ready at {}", args.system.name(), args.common.server);
            Ok(())
        }
        Workload::Fill => fill(args).await,
        Workload::Replay => replay(args).await,
        Workload::AggregateRead => aggregate_read(args).await,
        Workload::Append => append(args).await,
    }
}

/// How many connections `clients` clients share. With several servers (a cluster), every server
/// takes the same number of connections (rounded up to a multiple of the server count, but never
/// more connections than clients), as an application spread over the nodes would; client `c`
/// uses connection `c % n`, and connection `i` goes to server `i % servers`.
fn connections_for(args: &Args, clients: usize) -> usize {
    let per = args.system.clients_per_connection(args.clients_per_connection);
    let servers = common::servers(&args.common.server).len().max(1);
    let clients = clients.max(1);
    (clients.div_ceil(per).div_ceil(servers) * servers).min(clients)
}

/// The fields every result line has.
fn base_fields(args: &Args, workload: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("system".into(), json!(args.system.name()));
    m.insert("workload".into(), json!(workload));
    m.insert("payload_bytes".into(), json!(args.payload_bytes));
    m
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// CPU fields of a measured window in which `events` events were handled.
fn cpu_fields(m: &mut Map<String, Value>, from: &cpu::Snapshot, to: &cpu::Snapshot, events: f64) {
    let usage = from.until(to);
    m.insert("window_s".into(), json!(round(usage.wall, 3)));
    m.insert("bench_cpu_s".into(), json!(round(usage.client, 2)));
    m.insert("other_cpu_s".into(), json!(round(usage.other, 2)));
    m.insert("loadavg".into(), json!(loadavg()));
    if events > 0.0 {
        m.insert(
            "bench_cpu_us_per_event".into(),
            json!(round(usage.client / events * 1e6, 1)),
        );
    }
    if let Some(server) = usage.server {
        m.insert("server_cpu_s".into(), json!(round(server, 2)));
        if events > 0.0 {
            m.insert("server_cpu_us_per_event".into(), json!(round(server / events * 1e6, 1)));
        }
    }
}

/// The 1-, 5- and 15-minute load averages, as /proc/loadavg has them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn errors_fields(m: &mut Map<String, Value>, errors: &Errors) {
    m.insert("errors".into(), json!(errors.count));
    m.insert("error_samples".into(), json!(errors.samples));
}

fn error_suffix(errors: &Errors) -> String {
    if errors.samples.is_empty() {
        String::new()
    } else {
        format!("\n  errors: {:?}", errors.samples)
    }
}

async fn fill(args: Args) -> anyhow::Result<()> {
    let n = connections_for(&args, args.fill_clients);
    let system = Arc::new(System::connect(args.system, &args.common.server, &args.common.context, n).await?);
    let aggregates = args.events / args.aggregate_size;
    let total = aggregates * args.aggregate_size;
    let chunks = aggregates.div_ceil(args.batch_events.max(1));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let payload = common::payload(args.payload_bytes);
    let before = cpu::Snapshot::take(&args.server_pids);
    let mut tasks = Vec::new();
    for c in 0..args.fill_clients.max(1) {
        let (system, next, payload, args) = (system.clone(), next.clone(), payload.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            let mut errors = Errors::default();
            let mut stored = 0u64;
            loop {
                let chunk = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if chunk >= chunks {
                    break;
                }
                let first = chunk * args.batch_events;
                let last = (first + args.batch_events).min(aggregates);
                for seq in 0..args.aggregate_size as i64 {
                    let batch: Vec<(String, i64)> =
                        (first..last).map(|k| (format!("{FILL_PREFIX}-{k}"), seq)).collect();
                    match system.fill(c % n, &batch, &payload).await {
                        Ok(()) => stored += batch.len() as u64,
                        Err(e) => {
                            errors.add(format!("{e:#}"));
                            break;
                        }
                    }
                }
            }
            (stored, errors)
        }));
    }
    let mut stored = 0;
    let mut errors = Errors::default();
    for t in tasks {
        let (s, e) = t.await?;
        stored += s;
        errors.merge(e);
    }
    let after = cpu::Snapshot::take(&args.server_pids);
    let secs = before.until(&after).wall;
    let mut m = base_fields(&args, "fill");
    m.insert("events".into(), json!(stored));
    m.insert("events_requested".into(), json!(total));
    m.insert("aggregates".into(), json!(aggregates));
    m.insert("aggregate_size".into(), json!(args.aggregate_size));
    m.insert("batch_events".into(), json!(args.batch_events));
    m.insert("clients".into(), json!(args.fill_clients));
    m.insert("events_per_s".into(), json!((stored as f64 / secs).round()));
    cpu_fields(&mut m, &before, &after, stored as f64);
    errors_fields(&mut m, &errors);
    let summary = format!(
        "{} fill: {stored}/{total} events in {secs:.1} s ({:.0} events/s), errors {}{}",
        args.system.name(),
        stored as f64 / secs,
        errors.count,
        error_suffix(&errors)
    );
    common::emit(&args.common, "fill", m, &summary);
    anyhow::ensure!(errors.count == 0 && stored == total, "fill incomplete");
    Ok(())
}

async fn replay(args: Args) -> anyhow::Result<()> {
    let system = System::connect(args.system, &args.common.server, &args.common.context, 1).await?;
    let before = cpu::Snapshot::take(&args.server_pids);
    let outcome = system.replay(args.events).await;
    let after = cpu::Snapshot::take(&args.server_pids);
    let secs = before.until(&after).wall;
    let mut m = base_fields(&args, "replay");
    m.insert("clients".into(), json!(1));
    let mut errors = Errors::default();
    let summary = match &outcome {
        Ok(r) => {
            let rate = r.events as f64 / secs;
            m.insert("events".into(), json!(r.events));
            m.insert("events_per_s".into(), json!(rate.round()));
            m.insert("ops_per_s".into(), json!(rate.round()));
            m.insert(
                "mb_payload_per_s".into(),
                json!(round(r.payload_bytes as f64 / secs / 1e6, 1)),
            );
            m.insert(
                "first_event_ms".into(),
                json!(r.first_event.map(|d| round(d.as_secs_f64() * 1e3, 2))),
            );
            m.insert("out_of_order".into(), json!(r.out_of_order));
            cpu_fields(&mut m, &before, &after, r.events as f64);
            format!(
                "{} replay: {} events in {secs:.2} s: {rate:.0} events/s ({:.1} MB payload/s), first after {:.1} ms, out of order {}",
                args.system.name(),
                r.events,
                r.payload_bytes as f64 / secs / 1e6,
                r.first_event.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
                r.out_of_order
            )
        }
        Err(e) => {
            errors.add(format!("{e:#}"));
            format!("{} replay failed: {e:#}", args.system.name())
        }
    };
    errors_fields(&mut m, &errors);
    common::emit(&args.common, "replay", m, &summary);
    outcome.map(|_| ())
}

/// Latency of the calls of one window, plus their count and errors.
struct Measured {
    histogram: Histogram<u64>,
    ops: u64,
    hot_ops: u64,
    errors: Errors,
}

impl Measured {
    fn new() -> Measured {
        Measured {
            histogram: common::histogram(),
            ops: 0,
            hot_ops: 0,
            errors: Errors::default(),
        }
    }

    fn merge(&mut self, other: Measured) -> anyhow::Result<()> {
        self.histogram.add(&other.histogram)?;
        self.ops += other.ops;
        self.hot_ops += other.hot_ops;
        self.errors.merge(other.errors);
        Ok(())
    }
}

/// Sleeps through the warm-up and the measured window, snapshotting CPU at both edges.
async fn measure_window(server_pids: &[u32], from: Instant, to: Instant) -> (cpu::Snapshot, cpu::Snapshot) {
    tokio::time::sleep_until(from.into()).await;
    let a = cpu::Snapshot::take(server_pids);
    tokio::time::sleep_until(to.into()).await;
    let b = cpu::Snapshot::take(server_pids);
    (a, b)
}

async fn aggregate_read(args: Args) -> anyhow::Result<()> {
    let n = connections_for(&args, args.clients);
    let system = Arc::new(System::connect(args.system, &args.common.server, &args.common.context, n).await?);
    let aggregates = args.events / args.aggregate_size;
    anyhow::ensure!(
        aggregates > 0,
        "no fill aggregates to read (--events / --aggregate-size)"
    );
    let start = Instant::now();
    let from = start + Duration::from_secs_f64(args.warmup);
    let to = from + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let (system, args) = (system.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Measured::new();
            let mut rng = Rng::new(0xA66 + c as u64);
            loop {
                let began = Instant::now();
                if began >= to {
                    break;
                }
                let id = format!("{FILL_PREFIX}-{}", rng.below(aggregates));
                let result = system.read_aggregate(c % n, &id).await;
                let done = Instant::now();
                match result {
                    Ok(seqs) => {
                        let complete = seqs.len() as u64 == args.aggregate_size
                            && seqs.iter().enumerate().all(|(i, s)| *s == i as i64);
                        if !complete {
                            out.errors.add(format!(
                                "{id}: {} events (expected {}), in order: {}",
                                seqs.len(),
                                args.aggregate_size,
                                seqs.windows(2).all(|w| w[0] < w[1])
                            ));
                        } else if began >= from && done <= to {
                            common::record(&mut out.histogram, done - began);
                            out.ops += 1;
                        }
                    }
                    Err(e) => {
                        out.errors.add(format!("{id}: {e:#}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            out
        }));
    }
    let (a, b) = measure_window(&args.server_pids, from, to).await;
    let mut total = Measured::new();
    for t in tasks {
        total.merge(t.await?)?;
    }
    let reads_per_s = total.ops as f64 / args.duration;
    let events_per_s = reads_per_s * args.aggregate_size as f64;
    let mut m = base_fields(&args, "aggregate-read");
    m.insert("clients".into(), json!(args.clients));
    m.insert("connections".into(), json!(n));
    m.insert("duration_s".into(), json!(args.duration));
    m.insert("warmup_s".into(), json!(args.warmup));
    m.insert("aggregate_size".into(), json!(args.aggregate_size));
    m.insert("aggregates".into(), json!(aggregates));
    m.insert("ops".into(), json!(total.ops));
    m.insert("ops_per_s".into(), json!(reads_per_s.round()));
    m.insert("events_per_s".into(), json!(events_per_s.round()));
    m.append(&mut common::latency_fields(&total.histogram));
    cpu_fields(&mut m, &a, &b, total.ops as f64);
    // For reads the per-"event" CPU figures are per read.
    rename(&mut m, "bench_cpu_us_per_event", "bench_cpu_us_per_op");
    rename(&mut m, "server_cpu_us_per_event", "server_cpu_us_per_op");
    errors_fields(&mut m, &total.errors);
    let summary = format!(
        "{} aggregate-read: {} clients, {}-event aggregates: {reads_per_s:.0} reads/s, errors {}\n  latency {}{}",
        args.system.name(),
        args.clients,
        args.aggregate_size,
        total.errors.count,
        common::latency_line(&total.histogram),
        error_suffix(&total.errors)
    );
    common::emit(&args.common, "aggregate-read", m, &summary);
    Ok(())
}

fn rename(m: &mut Map<String, Value>, from: &str, to: &str) {
    if let Some(v) = m.remove(from) {
        m.insert(to.into(), v);
    }
}

/// A shared aggregate and where it stands. The lock is held for the whole append (the clients
/// sharing it take turns, as one aggregate's command handler would).
struct Hot {
    id: String,
    state: tokio::sync::Mutex<HotState>,
}

struct HotState {
    next: i64,
    after: Option<u64>,
    /// False after a failed append: the outcome is unknown, so ask the system first.
    known: bool,
}

/// One append call; returns when it started and ended and whether it succeeded.
async fn append_once(
    system: &System,
    conn: usize,
    hot: Option<&Hot>,
    new_id: String,
    count: usize,
    payload: &Bytes,
) -> (Instant, Instant, anyhow::Result<()>) {
    let began = Instant::now();
    let result = match hot {
        Some(h) => {
            let mut state = h.state.lock().await;
            let mut result = Ok(());
            if !state.known {
                match system.position(conn, &h.id).await {
                    Ok((next, after)) => {
                        state.next = next;
                        state.after = after;
                        state.known = true;
                    }
                    Err(e) => result = Err(e),
                }
            }
            if result.is_ok() {
                let a = Append {
                    aggregate: &h.id,
                    first: state.next,
                    after: state.after,
                    hot: true,
                    count,
                };
                match system.append(conn, &a, payload).await {
                    Ok(token) => {
                        state.next += count as i64;
                        state.after = Some(token);
                    }
                    Err(e) => {
                        state.known = false;
                        result = Err(e);
                    }
                }
            }
            result
        }
        None => {
            let a = Append {
                aggregate: &new_id,
                first: 0,
                after: None,
                hot: false,
                count,
            };
            system.append(conn, &a, payload).await.map(|_| ())
        }
    };
    if result.is_err() {
        // Do not spin on a failing server.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (began, Instant::now(), result)
}

async fn append(args: Args) -> anyhow::Result<()> {
    let n = connections_for(&args, args.clients);
    let system = Arc::new(System::connect(args.system, &args.common.server, &args.common.context, n).await?);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut hot = Vec::new();
    if args.hot_share > 0.0 {
        for k in 0..args.hot_aggregates {
            let id = match &args.hot_prefix {
                Some(p) => format!("hot-{p}-{k}"),
                None => format!("hot-{run_id}-{k}"),
            };
            let (next, after) = system.position(0, &id).await?;
            hot.push(Hot {
                id,
                state: tokio::sync::Mutex::new(HotState {
                    next,
                    after,
                    known: true,
                }),
            });
        }
    }
    let hot = Arc::new(hot);
    let payload = common::payload(args.payload_bytes);
    let start = Instant::now();
    let from = start + Duration::from_secs_f64(args.warmup);
    let to = from + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let (system, hot, payload, args) = (system.clone(), hot.clone(), payload.clone(), args.clone());
        let prefix = format!("b-{run_id}-{c}-");
        tasks.push(tokio::spawn(async move {
            let mut out = Measured::new();
            let mut rng = Rng::new(c as u64 + 1);
            let mut k = 0u64;
            let mut in_flight = FuturesUnordered::new();
            loop {
                while in_flight.len() < args.in_flight && Instant::now() < to {
                    let h = (!hot.is_empty() && rng.unit() < args.hot_share)
                        .then(|| &hot[rng.below(hot.len() as u64) as usize]);
                    let id = format!("{prefix}{k}");
                    k += 1;
                    let system = &system;
                    let payload = &payload;
                    let count = args.events_per_append;
                    in_flight.push(async move {
                        let (began, done, result) = append_once(system, c % n, h, id, count, payload).await;
                        (began, done, result, h.is_some())
                    });
                }
                let Some((began, done, result, was_hot)) = in_flight.next().await else {
                    break;
                };
                match result {
                    Ok(()) if began >= from && done <= to => {
                        common::record(&mut out.histogram, done - began);
                        out.ops += 1;
                        out.hot_ops += u64::from(was_hot);
                    }
                    Ok(()) => {}
                    Err(e) => out.errors.add(format!("{e:#}")),
                }
            }
            out
        }));
    }
    let (a, b) = measure_window(&args.server_pids, from, to).await;
    let mut total = Measured::new();
    for t in tasks {
        total.merge(t.await?)?;
    }
    let ops_per_s = total.ops as f64 / args.duration;
    let events_per_s = ops_per_s * args.events_per_append as f64;
    let workload = if args.events_per_append == 1 {
        "append"
    } else {
        "append-batch"
    };
    let mut m = base_fields(&args, workload);
    m.insert("clients".into(), json!(args.clients));
    m.insert("in_flight_per_client".into(), json!(args.in_flight));
    m.insert("connections".into(), json!(n));
    m.insert("events_per_op".into(), json!(args.events_per_append));
    m.insert("duration_s".into(), json!(args.duration));
    m.insert("warmup_s".into(), json!(args.warmup));
    m.insert("hot_aggregates".into(), json!(hot.len()));
    m.insert(
        "hot_share".into(),
        json!(if hot.is_empty() { 0.0 } else { args.hot_share }),
    );
    m.insert("ops".into(), json!(total.ops));
    m.insert("hot_ops".into(), json!(total.hot_ops));
    m.insert("ops_per_s".into(), json!(ops_per_s.round()));
    m.insert("events_per_s".into(), json!(events_per_s.round()));
    m.append(&mut common::latency_fields(&total.histogram));
    cpu_fields(&mut m, &a, &b, total.ops as f64 * args.events_per_append as f64);
    errors_fields(&mut m, &total.errors);
    let summary = format!(
        "{} {workload}: {} clients x {} in flight on {n} connections, {} events/call: {events_per_s:.0} events/s ({ops_per_s:.0} calls/s, {} to hot aggregates), errors {}\n  latency {}{}",
        args.system.name(),
        args.clients,
        args.in_flight,
        args.events_per_append,
        total.hot_ops,
        total.errors.count,
        common::latency_line(&total.histogram),
        error_suffix(&total.errors)
    );
    common::emit(&args.common, workload, m, &summary);
    Ok(())
}
