//! `fill`: loads a store quickly. Every event belongs to an aggregate of exactly
//! `--aggregate-size` events, ids `<prefix>-<k>` for k in 0..events/aggregate-size.
//!
//! Aggregates are taken in chunks of `--batch-events`; a client appends, in one AppendEvent
//! call, event `s` of every aggregate of its chunk, for s = 0..aggregate-size. So an aggregate's
//! events are spread over the log, interleaved with the other aggregates' (and the other
//! clients'), as in a real store, and an aggregate read must use the index.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{self, Common, Errors};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Events to store (rounded down to a multiple of --aggregate-size).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Events per aggregate.
    #[arg(long, default_value_t = 50)]
    pub aggregate_size: u64,
    /// Events per AppendEvent call (= aggregates per chunk).
    #[arg(long, default_value_t = 500)]
    pub batch_events: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Clients per HTTP/2 connection.
    #[arg(long, default_value_t = 2)]
    pub clients_per_connection: usize,
    /// Payload size of each event in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Aggregate id prefix: ids are `<prefix>-<k>`.
    #[arg(long, default_value = "agg")]
    pub prefix: String,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.aggregate_size > 0 && args.batch_events > 0 && args.clients > 0,
        "sizes must be > 0"
    );
    let aggregates = args.events / args.aggregate_size;
    let total_events = aggregates * args.aggregate_size;
    let chunks = aggregates.div_ceil(args.batch_events);
    let connections = common::connect_many(&args.common.server, args.clients, args.clients_per_connection).await?;
    let data = common::payload(args.payload_bytes);
    let next_chunk = Arc::new(AtomicU64::new(0));
    let stored = Arc::new(AtomicU64::new(0));
    let start = Instant::now();

    let progress = {
        let stored = stored.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let now = stored.load(Ordering::Relaxed);
                eprintln!(
                    "  fill: {now}/{total_events} events, {:.0} events/s over the last 5 s",
                    (now - last) as f64 / 5.0
                );
                last = now;
            }
        })
    };

    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut client = connections[c / args.clients_per_connection.max(1)].clone();
        let args = args.clone();
        let data = data.clone();
        let next_chunk = next_chunk.clone();
        let stored = stored.clone();
        tasks.push(tokio::spawn(async move {
            let mut histogram = common::histogram();
            let mut errors = Errors::default();
            loop {
                let chunk = next_chunk.fetch_add(1, Ordering::Relaxed);
                if chunk >= chunks {
                    break;
                }
                let first = chunk * args.batch_events;
                let last = (first + args.batch_events).min(aggregates);
                let ids: Vec<String> = (first..last).map(|k| format!("{}-{k}", args.prefix)).collect();
                for seq in 0..args.aggregate_size as i64 {
                    let events: Vec<_> = ids.iter().map(|id| common::event(id, seq, &data)).collect();
                    let n = events.len() as u64;
                    let began = Instant::now();
                    match client
                        .append_event(common::request(&args.common.context, tokio_stream::iter(events)))
                        .await
                    {
                        Ok(r) if r.get_ref().success => {
                            common::record(&mut histogram, began.elapsed());
                            stored.fetch_add(n, Ordering::Relaxed);
                        }
                        Ok(_) => errors.add("confirmation with success=false"),
                        Err(status) => {
                            // The rest of this chunk would fail on sequence numbers: give it up.
                            errors.add(format!("{:?}: {}", status.code(), status.message()));
                            break;
                        }
                    }
                }
            }
            (histogram, errors)
        }));
    }
    let mut histogram = common::histogram();
    let mut errors = Errors::default();
    for t in tasks {
        let (h, e) = t.await?;
        histogram.add(&h)?;
        errors.merge(e);
    }
    progress.abort();
    let secs = start.elapsed().as_secs_f64();
    let done = stored.load(Ordering::Relaxed);
    let rate = done as f64 / secs;
    let mut fields = common::latency_fields(&histogram);
    fields.insert("events".into(), json!(done));
    fields.insert("events_requested".into(), json!(total_events));
    fields.insert("aggregates".into(), json!(aggregates));
    fields.insert("aggregate_size".into(), json!(args.aggregate_size));
    fields.insert(
        "aggregate_ids".into(),
        json!(format!("{0}-0 .. {0}-{1}", args.prefix, aggregates.saturating_sub(1))),
    );
    fields.insert("batch_events".into(), json!(args.batch_events));
    fields.insert("clients".into(), json!(args.clients));
    fields.insert("payload_bytes".into(), json!(args.payload_bytes));
    fields.insert("seconds".into(), json!((secs * 1000.0).round() / 1000.0));
    fields.insert("events_per_s".into(), json!(rate.round()));
    fields.insert("errors".into(), json!(errors.count));
    fields.insert("error_samples".into(), json!(errors.samples));
    let summary = format!(
        "fill: {done}/{total_events} events in {secs:.1} s ({rate:.0} events/s), {aggregates} aggregates {0}-0 .. {0}-{1} of {2} events, batches of {3}, {4} clients, errors {5}\n  batch latency {6}{7}",
        args.prefix,
        aggregates.saturating_sub(1),
        args.aggregate_size,
        args.batch_events,
        args.clients,
        errors.count,
        common::latency_line(&histogram),
        if errors.samples.is_empty() {
            String::new()
        } else {
            format!("\n  errors: {:?}", errors.samples)
        },
    );
    common::emit(&args.common, "fill", fields, &summary);
    anyhow::ensure!(errors.count == 0, "fill had {} errors", errors.count);
    Ok(())
}
