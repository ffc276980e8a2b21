//! Shared driver of the round-trip workloads (`command-dispatch`, `query-dispatch`): K concurrent
//! loops, each with one request outstanding, an HDR histogram of the measured ones, and the
//! readiness wait that precedes them.

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

use crate::common::{self, Common, Errors};

/// Options of a dispatching workload.
#[derive(clap::Args, Debug, Clone)]
pub struct Load {
    /// Concurrent dispatch loops, each with one request outstanding.
    #[arg(long, default_value_t = 1)]
    pub in_flight: usize,
    /// HTTP/2 connections the loops share (loop i uses connection i % connections). One is what a
    /// single application has.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Payload size of each request in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Seconds to wait for a handler to be subscribed (requests answered with the no-handler
    /// error are retried until then) before the warm-up starts.
    #[arg(long, default_value_t = 30.0)]
    pub ready_timeout: f64,
}

pub struct Outcome {
    pub histogram: Histogram<u64>,
    pub ok: u64,
    pub errors: Errors,
    pub ready_after_ms: f64,
}

/// Calls `attempt` until it succeeds; an error containing `no_handler_code` is retried until the
/// timeout, any other error fails at once.
pub async fn wait_ready<F, Fut>(timeout: f64, no_handler_code: &str, mut attempt: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(timeout);
    loop {
        match attempt().await {
            Ok(()) => return Ok(start.elapsed().as_secs_f64() * 1000.0),
            Err(e) if e.contains(no_handler_code) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => anyhow::bail!("handler not ready after {:.1} s: {e}", start.elapsed().as_secs_f64()),
        }
    }
}

/// Runs `load.in_flight` loops of `one(loop, n)` for warm-up + duration. Only calls that start
/// after the warm-up and end within the measured window count.
pub async fn drive<F, Fut>(load: &Load, one: F) -> anyhow::Result<Outcome>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(load.warmup);
    let end = measure_from + Duration::from_secs_f64(load.duration);
    let mut tasks = Vec::new();
    for i in 0..load.in_flight {
        let one = one.clone();
        tasks.push(tokio::spawn(async move {
            let mut histogram = common::histogram();
            let mut ok = 0u64;
            let mut errors = Errors::default();
            let mut n = 0u64;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let result = one(i, n).await;
                n += 1;
                let done = Instant::now();
                match result {
                    Ok(()) => {
                        if began >= measure_from && done <= end {
                            common::record(&mut histogram, done - began);
                            ok += 1;
                        }
                    }
                    Err(e) => {
                        errors.add(e);
                        // Do not spin on a dead server.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (histogram, ok, errors)
        }));
    }
    let mut outcome = Outcome {
        histogram: common::histogram(),
        ok: 0,
        errors: Errors::default(),
        ready_after_ms: 0.0,
    };
    for t in tasks {
        let (h, ok, errors) = t.await?;
        outcome.histogram.add(&h)?;
        outcome.ok += ok;
        outcome.errors.merge(errors);
    }
    Ok(outcome)
}

/// JSON fields and the human summary of a round-trip run.
pub fn report(load: &Load, what: &str, name: &str, outcome: &Outcome) -> (Map<String, Value>, String) {
    let per_s = outcome.ok as f64 / load.duration;
    let mut fields = common::latency_fields(&outcome.histogram);
    fields.insert("name".into(), json!(name));
    fields.insert("in_flight".into(), json!(load.in_flight));
    fields.insert("connections".into(), json!(load.connections));
    fields.insert("duration_s".into(), json!(load.duration));
    fields.insert("warmup_s".into(), json!(load.warmup));
    fields.insert("payload_bytes".into(), json!(load.payload_bytes));
    fields.insert("round_trips".into(), json!(outcome.ok));
    fields.insert("round_trips_per_s".into(), json!(per_s.round()));
    fields.insert("ready_after_ms".into(), json!(outcome.ready_after_ms.round()));
    fields.insert("errors".into(), json!(outcome.errors.count));
    fields.insert("error_samples".into(), json!(outcome.errors.samples));
    let summary = format!(
        "{what} '{name}': {} in flight on {} connection(s), {:.0} s measured: {:.0} round trips/s ({} round trips), errors {}\n  latency {}{}",
        load.in_flight,
        load.connections,
        load.duration,
        per_s,
        outcome.ok,
        outcome.errors.count,
        common::latency_line(&outcome.histogram),
        if outcome.errors.samples.is_empty() {
            String::new()
        } else {
            format!("\n  errors: {:?}", outcome.errors.samples)
        },
    );
    (fields, summary)
}

/// The whole dispatcher side of a round-trip benchmark (commands and queries alike): wait until
/// a handler answers, drive the load over the clients, report. `make(i, n)` builds loop `i`'s
/// `n`-th message; `once(client, context, message)` sends it and waits for its answer.
#[allow(clippy::too_many_arguments)]
pub async fn dispatcher<C, M, Make, Once, Fut>(
    common: &Common,
    load: &Load,
    what: &str,
    name: &str,
    no_handler_code: &str,
    clients: Vec<C>,
    make: Make,
    once: Once,
) -> anyhow::Result<()>
where
    C: Clone + Send + Sync + 'static,
    M: Send + 'static,
    Make: Fn(usize, u64) -> M + Clone + Send + Sync + 'static,
    Once: Fn(C, String, M) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    anyhow::ensure!(!clients.is_empty(), "connections must be > 0");
    let context = common.context.clone();
    let probe = clients[0].clone();
    let mut k = 0u64;
    let ready_after_ms = wait_ready(load.ready_timeout, no_handler_code, || {
        k += 1;
        once(probe.clone(), context.clone(), make(usize::MAX, k))
    })
    .await?;
    let clients = std::sync::Arc::new(clients);
    let mut outcome = drive(load, {
        let once = once.clone();
        move |i, n| once(clients[i % clients.len()].clone(), context.clone(), make(i, n))
    })
    .await?;
    outcome.ready_after_ms = ready_after_ms;
    let (fields, summary) = report(load, what, name, &outcome);
    common::emit(common, what, fields, &summary);
    Ok(())
}
