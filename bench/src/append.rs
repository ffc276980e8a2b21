//! `append`: N concurrent clients, each appending one transaction at a time and waiting for its
//! confirmation (a durable, committed append), like command handlers in N application threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use myelin_proto::axon::event::ReadHighestSequenceNrRequest;
use serde_json::json;
use tokio::sync::Mutex;

use crate::common::{self, Common, Errors, Rng};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Concurrent clients (tasks), each with one append outstanding at a time.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Payload size of each event in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Events per AppendEvent call (one transaction, one aggregate).
    #[arg(long, default_value_t = 1)]
    pub events_per_append: usize,
    /// Clients per HTTP/2 connection.
    #[arg(long, default_value_t = 8)]
    pub clients_per_connection: usize,
    /// Number of shared "hot" aggregates (0: every append goes to a new aggregate).
    #[arg(long, default_value_t = 0)]
    pub hot_aggregates: usize,
    /// Share of appends that go to a hot aggregate.
    #[arg(long, default_value_t = 0.1)]
    pub hot_share: f64,
}

/// A shared aggregate: the next sequence number, locked for the duration of an append so that
/// clients sharing it append in order (as one aggregate's command handler would).
struct Hot {
    id: String,
    next: Mutex<i64>,
}

#[derive(Default)]
struct ClientResult {
    appends: u64,
    hot_appends: u64,
    errors: Errors,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients > 0 && args.events_per_append > 0,
        "clients and events-per-append must be > 0"
    );
    let connections = common::connect_many(&args.common.server, args.clients, args.clients_per_connection).await?;
    let data = common::payload(args.payload_bytes);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();

    let mut hot = Vec::new();
    for k in 0..args.hot_aggregates {
        let id = format!("hot-{run_id}-{k}");
        let highest = connections[0]
            .clone()
            .read_highest_sequence_nr(common::request(
                &args.common.context,
                ReadHighestSequenceNrRequest {
                    aggregate_id: id.clone(),
                    from_sequence_nr: 0,
                },
            ))
            .await?
            .into_inner()
            .to_sequence_nr;
        hot.push(Hot {
            id,
            next: Mutex::new(highest + 1),
        });
    }
    let hot = Arc::new(hot);

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);

    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut client = connections[c / args.clients_per_connection.max(1)].clone();
        let context = args.common.context.clone();
        let data = data.clone();
        let hot = hot.clone();
        let args = args.clone();
        let prefix = format!("b-{run_id}-{c}-");
        tasks.push(tokio::spawn(async move {
            let mut histogram = common::histogram();
            let mut result = ClientResult::default();
            let mut rng = Rng::new(c as u64 + 1);
            let mut n = 0u64;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let use_hot = !hot.is_empty() && rng.unit() < args.hot_share;
                let outcome = if use_hot {
                    let h = &hot[rng.below(hot.len() as u64) as usize];
                    let mut next = h.next.lock().await;
                    let events: Vec<_> = (0..args.events_per_append)
                        .map(|i| common::event(&h.id, *next + i as i64, &data))
                        .collect();
                    let r = client
                        .append_event(common::request(&context, tokio_stream::iter(events)))
                        .await;
                    match &r {
                        Ok(_) => *next += args.events_per_append as i64,
                        Err(_) => {
                            // Indefinite: learn where the aggregate stands before the next append.
                            if let Ok(resp) = client
                                .read_highest_sequence_nr(common::request(
                                    &context,
                                    ReadHighestSequenceNrRequest {
                                        aggregate_id: h.id.clone(),
                                        from_sequence_nr: 0,
                                    },
                                ))
                                .await
                            {
                                *next = resp.into_inner().to_sequence_nr + 1;
                            }
                        }
                    }
                    r
                } else {
                    let id = format!("{prefix}{n}");
                    n += 1;
                    let events: Vec<_> = (0..args.events_per_append)
                        .map(|i| common::event(&id, i as i64, &data))
                        .collect();
                    client
                        .append_event(common::request(&context, tokio_stream::iter(events)))
                        .await
                };
                let done = Instant::now();
                let measured = began >= measure_from && done <= end;
                match outcome {
                    Ok(resp) if resp.get_ref().success => {
                        if measured {
                            common::record(&mut histogram, done - began);
                            result.appends += 1;
                            if use_hot {
                                result.hot_appends += 1;
                            }
                        }
                    }
                    Ok(_) => result.errors.add("confirmation with success=false"),
                    Err(status) => {
                        result.errors.add(format!("{:?}: {}", status.code(), status.message()));
                        // Do not spin on a dead server.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (histogram, result)
        }));
    }

    let mut histogram = common::histogram();
    let mut total = ClientResult::default();
    for t in tasks {
        let (h, r) = t.await?;
        histogram.add(&h)?;
        total.appends += r.appends;
        total.hot_appends += r.hot_appends;
        total.errors.merge(r.errors);
    }
    let secs = args.duration;
    let appends_per_s = total.appends as f64 / secs;
    let events_per_s = appends_per_s * args.events_per_append as f64;
    let mut fields = common::latency_fields(&histogram);
    fields.insert("clients".into(), json!(args.clients));
    fields.insert("connections".into(), json!(connections.len()));
    fields.insert("duration_s".into(), json!(secs));
    fields.insert("warmup_s".into(), json!(args.warmup));
    fields.insert("payload_bytes".into(), json!(args.payload_bytes));
    fields.insert("events_per_append".into(), json!(args.events_per_append));
    fields.insert("hot_aggregates".into(), json!(args.hot_aggregates));
    fields.insert(
        "hot_share".into(),
        json!(if args.hot_aggregates > 0 { args.hot_share } else { 0.0 }),
    );
    fields.insert("appends".into(), json!(total.appends));
    fields.insert("hot_appends".into(), json!(total.hot_appends));
    fields.insert("appends_per_s".into(), json!(appends_per_s.round()));
    fields.insert("events_per_s".into(), json!(events_per_s.round()));
    fields.insert("errors".into(), json!(total.errors.count));
    fields.insert("error_samples".into(), json!(total.errors.samples));
    let summary = format!(
        "append: {} clients on {} connections, {:.0} s measured: {:.0} events/s, {:.0} appends/s ({} appends{}), errors {}\n  latency {}{}",
        args.clients,
        connections.len(),
        secs,
        events_per_s,
        appends_per_s,
        total.appends,
        if args.hot_aggregates > 0 {
            format!(", {} to {} hot aggregates", total.hot_appends, args.hot_aggregates)
        } else {
            String::new()
        },
        total.errors.count,
        common::latency_line(&histogram),
        if total.errors.samples.is_empty() {
            String::new()
        } else {
            format!("\n  errors: {:?}", total.errors.samples)
        },
    );
    common::emit(&args.common, "append", fields, &summary);
    Ok(())
}
