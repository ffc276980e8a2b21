//! Shared pieces: connections, request metadata, histograms and result output.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use myelin_proto::axon::SerializedObject;
use myelin_proto::axon::event::Event;
use myelin_proto::axon::event::event_store_client::EventStoreClient;
use serde_json::{Map, Value, json};
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

/// Options every subcommand takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Client gRPC address of the node.
    #[arg(long, default_value = "http://127.0.0.1:8124")]
    pub server: String,
    /// Context, sent as `AxonIQ-Context` metadata.
    #[arg(long, default_value = "default")]
    pub context: String,
    /// Also print one JSON line of results on stdout (the human summary goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// A label copied into the JSON result (e.g. the runner's step name).
    #[arg(long)]
    pub label: Option<String>,
}

/// The servers of a comma-separated `--server` list (one for a single node; every node of a
/// cluster).
pub fn servers(list: &str) -> Vec<&str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
}

/// Opens one HTTP/2 connection (a tonic `Channel` is one connection) with large flow-control
/// windows, the same way for every gRPC event store under test.
pub async fn wide_channel(server: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(server.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        // Large windows so a replay stream is not bounded by HTTP/2 flow control.
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .connect()
        .await
        .with_context(|| format!("connecting to {server}"))
}

/// Opens one HTTP/2 connection to a Myelin (or Axon) server's event store.
pub async fn connect(server: &str) -> anyhow::Result<EventStoreClient<Channel>> {
    let channel = wide_channel(server).await?;
    Ok(EventStoreClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// Opens `ceil(clients / per_connection)` connections; client `i` uses `clients[i / per_connection]`.
pub async fn connect_many(
    server: &str,
    clients: usize,
    per_connection: usize,
) -> anyhow::Result<Vec<EventStoreClient<Channel>>> {
    let n = clients.div_ceil(per_connection.max(1)).max(1);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(connect(server).await?);
    }
    Ok(out)
}

/// Wraps `message` in a request naming the context.
pub fn request<T>(context: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = context.parse() {
        request.metadata_mut().insert(myelin_proto::AXON_CONTEXT_KEY, value);
    }
    request
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A payload of `n` bytes (printable, like a small JSON/XML document would be).
pub fn payload(n: usize) -> Bytes {
    let pattern = b"{\"orderId\":\"0f8fad5b-d9cb-469f-a165-70867728950e\",\"amount\":1234,\"note\":\"x\"}";
    Bytes::from(pattern.iter().cycle().take(n).copied().collect::<Vec<u8>>())
}

/// One event as a framework would send it.
pub fn event(aggregate_id: &str, sequence: i64, data: &Bytes) -> Event {
    Event {
        message_identifier: uuid::Uuid::new_v4().to_string(),
        aggregate_identifier: aggregate_id.to_owned(),
        aggregate_sequence_number: sequence,
        aggregate_type: "BenchAggregate".to_owned(),
        timestamp: now_millis(),
        payload: Some(SerializedObject {
            r#type: "io.myelin.bench.SomethingHappened".to_owned(),
            revision: String::new(),
            data: data.clone(),
        }),
        meta_data: Default::default(),
        snapshot: false,
    }
}

/// Latency histogram in microseconds (1 us .. 10 min, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, 600_000_000);
    h.saturating_record(us);
}

fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

/// Latency percentiles (ms) as JSON fields.
pub fn latency_fields(h: &Histogram<u64>) -> Map<String, Value> {
    let mut m = Map::new();
    if h.is_empty() {
        return m;
    }
    m.insert("p50_ms".into(), json!(ms(h.value_at_quantile(0.50))));
    m.insert("p90_ms".into(), json!(ms(h.value_at_quantile(0.90))));
    m.insert("p99_ms".into(), json!(ms(h.value_at_quantile(0.99))));
    m.insert("p999_ms".into(), json!(ms(h.value_at_quantile(0.999))));
    m.insert("max_ms".into(), json!(ms(h.max())));
    m.insert("mean_ms".into(), json!((h.mean() / 1000.0 * 1000.0).round() / 1000.0));
    m
}

pub fn latency_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".to_owned();
    }
    format!(
        "p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    )
}

static RUNTIME_THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Records the load generator's thread count for the result lines (set once, at start).
pub fn set_runtime_threads(threads: usize) {
    let _ = RUNTIME_THREADS.set(threads);
}

/// The load generator's thread count, as every result line reports it.
pub fn runtime_threads() -> usize {
    RUNTIME_THREADS.get().copied().unwrap_or(1)
}

/// Prints the result: the human summary on stderr, the JSON line on stdout when asked.
pub fn emit(common: &Common, workload: &str, mut fields: Map<String, Value>, summary: &str) {
    eprintln!("{summary}");
    if common.json {
        let mut m = Map::new();
        m.insert("workload".into(), json!(workload));
        if let Some(label) = &common.label {
            m.insert("label".into(), json!(label));
        }
        m.insert("timestamp".into(), json!(now_millis()));
        m.insert("server".into(), json!(common.server));
        m.insert("context".into(), json!(common.context));
        m.insert("bench_threads".into(), json!(runtime_threads()));
        if let Some(cpu) = own_cpu_seconds() {
            m.insert("client_cpu_s".into(), json!((cpu * 100.0).round() / 100.0));
        }
        m.append(&mut fields);
        println!("{}", Value::Object(m));
    }
}

/// CPU time (user + system) this process used so far, from /proc/self/stat (Linux; the
/// clock tick is taken as 100 Hz, Linux's USER_HZ).
pub fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Keeps the first few distinct error messages for the report.
#[derive(Default)]
pub struct Errors {
    pub count: u64,
    pub samples: Vec<String>,
}

impl Errors {
    pub fn add(&mut self, message: impl Into<String>) {
        self.count += 1;
        let message = message.into();
        if self.samples.len() < 5 && !self.samples.contains(&message) {
            self.samples.push(message);
        }
    }

    pub fn merge(&mut self, other: Errors) {
        self.count += other.count;
        for s in other.samples {
            if self.samples.len() < 5 && !self.samples.contains(&s) {
                self.samples.push(s);
            }
        }
    }
}

/// A tiny xorshift generator: enough to pick aggregates, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Opens one HTTP/2 connection as a plain channel (for the command and query services).
pub async fn channel(server: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(server.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {server}"))
}

/// Resolves when the process gets SIGTERM or SIGINT, or after `duration` seconds (when given).
pub async fn stop_signal(duration: Option<f64>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let timer = async {
        match duration {
            Some(s) => tokio::time::sleep(Duration::from_secs_f64(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = timer => {}
    }
}

/// Permits a handler stream holds: starts with `initial` and grants the used ones again once half
/// are used (as Axon Framework does). `take` returns the permits to grant now, if any.
pub struct Permits {
    initial: i64,
    left: i64,
}

impl Permits {
    pub fn new(initial: i64) -> Permits {
        Permits {
            initial: initial.max(1),
            left: initial.max(1),
        }
    }

    pub fn take(&mut self) -> Option<i64> {
        self.left -= 1;
        if self.left <= self.initial / 2 {
            let grant = self.initial - self.left;
            self.left = self.initial;
            Some(grant)
        } else {
            None
        }
    }
}
