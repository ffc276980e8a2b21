//! `aggregate-read`: ListAggregateEvents of random aggregates (as a command handler sourcing its
//! aggregate would), checking each returns its complete, ordered event stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use myelin_proto::axon::event::GetAggregateEventsRequest;
use serde_json::json;

use crate::common::{self, Common, Errors, Rng};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Aggregate ids to read from.
    #[arg(long, num_args = 1..)]
    pub aggregates: Vec<String>,
    /// Or: read `<prefix>-<k>` for k in 0..aggregate-count (as made by `fill`).
    #[arg(long, default_value = "agg")]
    pub aggregate_prefix: String,
    #[arg(long, default_value_t = 0)]
    pub aggregate_count: u64,
    /// Measured reads.
    #[arg(long, default_value_t = 2000)]
    pub samples: u64,
    /// Reads before measuring (not recorded).
    #[arg(long, default_value_t = 100)]
    pub warmup_samples: u64,
    /// Concurrent readers.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Events each aggregate must return.
    #[arg(long, default_value_t = 50)]
    pub expect: usize,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let ids: Arc<Vec<String>> = Arc::new(if args.aggregates.is_empty() {
        (0..args.aggregate_count)
            .map(|k| format!("{}-{k}", args.aggregate_prefix))
            .collect()
    } else {
        args.aggregates.clone()
    });
    anyhow::ensure!(!ids.is_empty(), "name --aggregates or --aggregate-count");
    anyhow::ensure!(args.concurrency > 0, "concurrency must be > 0");
    let connections = common::connect_many(&args.common.server, args.concurrency, 8).await?;
    let next = Arc::new(AtomicU64::new(0));
    let total = args.warmup_samples + args.samples;
    let start = Instant::now();
    let mut measure_start = None::<Instant>;
    let measure_started = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let mut tasks = Vec::new();
    for c in 0..args.concurrency {
        let mut client = connections[c / 8].clone();
        let ids = ids.clone();
        let next = next.clone();
        let args = args.clone();
        let measure_started = measure_started.clone();
        tasks.push(tokio::spawn(async move {
            let mut histogram = common::histogram();
            let mut errors = Errors::default();
            let mut rng = Rng::new(0xA66 + c as u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                if i == args.warmup_samples {
                    *measure_started.lock().unwrap() = Some(Instant::now());
                }
                let id = &ids[rng.below(ids.len() as u64) as usize];
                let began = Instant::now();
                let result = async {
                    let mut stream = client
                        .list_aggregate_events(common::request(
                            &args.common.context,
                            GetAggregateEventsRequest {
                                aggregate_id: id.clone(),
                                initial_sequence: 0,
                                allow_snapshots: false,
                                ..Default::default()
                            },
                        ))
                        .await?
                        .into_inner();
                    let mut events = Vec::with_capacity(args.expect);
                    while let Some(e) = stream.message().await? {
                        events.push(e);
                    }
                    Ok::<_, tonic::Status>(events)
                }
                .await;
                let elapsed = began.elapsed();
                match result {
                    Ok(events) => {
                        let in_order = events
                            .iter()
                            .enumerate()
                            .all(|(n, e)| e.aggregate_sequence_number == n as i64 && &e.aggregate_identifier == id);
                        if events.len() != args.expect || !in_order {
                            errors.add(format!(
                                "{id}: {} events (expected {}), in order: {in_order}",
                                events.len(),
                                args.expect
                            ));
                        } else if i >= args.warmup_samples {
                            common::record(&mut histogram, elapsed);
                        }
                    }
                    Err(status) => errors.add(format!("{id}: {:?}: {}", status.code(), status.message())),
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
    if let Some(t) = *measure_started.lock().unwrap() {
        measure_start = Some(t);
    }
    let secs = measure_start.unwrap_or(start).elapsed().as_secs_f64();
    let rate = histogram.len() as f64 / secs;
    let mut fields = common::latency_fields(&histogram);
    fields.insert("aggregates".into(), json!(ids.len()));
    fields.insert("samples".into(), json!(histogram.len()));
    fields.insert("concurrency".into(), json!(args.concurrency));
    fields.insert("expect".into(), json!(args.expect));
    fields.insert("reads_per_s".into(), json!(rate.round()));
    fields.insert("errors".into(), json!(errors.count));
    fields.insert("error_samples".into(), json!(errors.samples));
    let summary = format!(
        "aggregate-read: {} reads of {}-event aggregates (from {} ids), concurrency {}: {rate:.0} reads/s, errors {}\n  latency {}{}",
        histogram.len(),
        args.expect,
        ids.len(),
        args.concurrency,
        errors.count,
        common::latency_line(&histogram),
        if errors.samples.is_empty() {
            String::new()
        } else {
            format!("\n  errors: {:?}", errors.samples)
        },
    );
    common::emit(&args.common, "aggregate-read", fields, &summary);
    Ok(())
}
