//! The Prometheus recorder plumbing every Myelin process shares: one recorder per process,
//! latency histograms with the same fixed buckets everywhere (so Prometheus can aggregate them
//! across processes and nodes), and the upkeep that bounds a histogram's memory.
//!
//! Each process runs one role (eventstore or router), so the process-wide recorder is installed
//! once, by that role, with that role's metric descriptions. A histogram keeps its raw samples
//! until the next upkeep, which [`keep_up`] runs every [`UPKEEP_INTERVAL`], so memory stays
//! bounded however busy the node is.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Upper bounds of every latency histogram, in seconds.
pub const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0,
];
/// How often histogram samples are folded into their buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The Prometheus builder every Myelin process uses: histograms with fixed buckets.
pub fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets(&LATENCY_BUCKETS_SECONDS)
        .expect("the bucket list is not empty")
}

/// Installs this process's recorder on first use, runs `describe` (the process's metric
/// descriptions) and returns the recorder's handle; metrics recorded before that are lost, and
/// later calls return the same handle. `process` names the process in the warning logged when
/// another recorder is already installed. The caller runs the upkeep (see [`keep_up`]).
pub fn install(process: &str, describe: fn()) -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; the {process}'s metrics stay empty");
            }
            describe();
            handle
        })
        .clone()
}

/// Runs the recorder's upkeep every [`UPKEEP_INTERVAL`] until the runtime stops.
pub fn keep_up(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            ticker.tick().await;
            handle.run_upkeep();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_use_the_fixed_buckets() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || metrics::histogram!("t_seconds").record(0.0003));
        let text = handle.render();
        assert!(text.contains("t_seconds_bucket{le=\"0.00025\"} 0"), "{text}");
        assert!(text.contains("t_seconds_bucket{le=\"0.0005\"} 1"), "{text}");
        assert!(text.contains("t_seconds_bucket{le=\"120\"} 1"), "{text}");
    }
}
