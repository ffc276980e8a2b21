//! `replay`: one ListEvents stream from a token, flow-controlled as Axon Framework does (an
//! initial grant, then more permits whenever half of them are used), until N events arrived.

use std::time::{Duration, Instant};

use myelin_proto::axon::event::GetEventsRequest;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::common::{self, Common};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// First token to read (inclusive).
    #[arg(long, default_value_t = 0)]
    pub from: i64,
    /// Events to receive.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Initial permits; more are granted whenever half are used.
    #[arg(long, default_value_t = 10_000)]
    pub permits: i64,
    /// Give up when no event arrives for this many seconds.
    #[arg(long, default_value_t = 30.0)]
    pub idle_timeout: f64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.permits > 1, "permits must be > 1");
    let mut client = common::connect(&args.common.server).await?;
    let (requests, rx) = mpsc::channel(16);
    requests
        .send(GetEventsRequest {
            tracking_token: args.from,
            number_of_permits: args.permits,
            client_id: format!("myelin-bench-{}", std::process::id()),
            component_name: "myelin-bench".to_owned(),
            processor: "replay".to_owned(),
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    let mut stream = client
        .list_events(common::request(&args.common.context, ReceiverStream::new(rx)))
        .await?
        .into_inner();
    let mut received = 0u64;
    let mut used_since_grant = 0i64;
    let mut grants = 0u64;
    let mut expected_token = args.from;
    let mut gaps = 0u64;
    let mut payload_bytes = 0u64;
    let mut first_event = None;
    let idle = Duration::from_secs_f64(args.idle_timeout);
    let mut error = None;
    while received < args.events {
        let item = match tokio::time::timeout(idle, stream.message()).await {
            Ok(Ok(Some(item))) => item,
            Ok(Ok(None)) => {
                error = Some("stream ended early".to_owned());
                break;
            }
            Ok(Err(status)) => {
                error = Some(format!("{:?}: {}", status.code(), status.message()));
                break;
            }
            Err(_) => {
                error = Some(format!("no event for {:.0} s", args.idle_timeout));
                break;
            }
        };
        if first_event.is_none() {
            first_event = Some(start.elapsed());
        }
        if item.token != expected_token {
            gaps += 1;
        }
        expected_token = item.token + 1;
        if let Some(p) = item.event.as_ref().and_then(|e| e.payload.as_ref()) {
            payload_bytes += p.data.len() as u64;
        }
        received += 1;
        used_since_grant += 1;
        if used_since_grant >= args.permits / 2 {
            grants += 1;
            requests
                .send(GetEventsRequest {
                    number_of_permits: used_since_grant,
                    ..Default::default()
                })
                .await?;
            used_since_grant = 0;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(requests);
    let rate = received as f64 / secs;
    let errors = u64::from(error.is_some()) + gaps;
    let mut fields = serde_json::Map::new();
    fields.insert("from".into(), json!(args.from));
    fields.insert("events".into(), json!(received));
    fields.insert("events_requested".into(), json!(args.events));
    fields.insert("permits".into(), json!(args.permits));
    fields.insert("permit_grants".into(), json!(grants));
    fields.insert("seconds".into(), json!((secs * 1000.0).round() / 1000.0));
    fields.insert("events_per_s".into(), json!(rate.round()));
    fields.insert(
        "mb_payload_per_s".into(),
        json!((payload_bytes as f64 / secs / 1e6 * 10.0).round() / 10.0),
    );
    fields.insert(
        "first_event_ms".into(),
        json!(first_event.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)),
    );
    fields.insert("token_gaps".into(), json!(gaps));
    fields.insert("errors".into(), json!(errors));
    fields.insert("error_samples".into(), json!(error.iter().collect::<Vec<_>>()));
    let summary = format!(
        "replay: {received}/{} events from token {} in {secs:.2} s: {rate:.0} events/s (permits {}, {grants} grants), first event after {:.1} ms, token gaps {gaps}{}",
        args.events,
        args.from,
        args.permits,
        first_event.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        error.as_ref().map(|e| format!(", error: {e}")).unwrap_or_default(),
    );
    common::emit(&args.common, "replay", fields, &summary);
    anyhow::ensure!(error.is_none(), "replay failed: {}", error.unwrap_or_default());
    Ok(())
}
