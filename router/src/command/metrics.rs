//! Command routing counters per context, kept in atomics until an exporter reads them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (inclusive, microseconds) of the latency histogram's buckets; one more bucket
/// counts everything slower.
pub const LATENCY_BUCKETS_MICROS: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000, 10_000_000, 60_000_000,
];

/// The counters of one context.
#[derive(Default)]
pub struct CommandMetrics {
    routed: AtomicU64,
    in_flight: AtomicI64,
    failed: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_MICROS.len() + 1],
}

/// A copy of one context's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CommandMetricsSnapshot {
    /// Commands handed to a handler.
    pub routed: u64,
    /// Commands waiting for their response now.
    pub in_flight: i64,
    /// Commands answered with a routing error (no handler, timeout, lost connection, ...).
    pub failed: u64,
    /// Round-trip latency counts per bucket of [`LATENCY_BUCKETS_MICROS`], plus the overflow.
    pub latency_buckets: Vec<u64>,
}

impl CommandMetrics {
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn routed(&self) {
        self.routed.fetch_add(1, Ordering::Relaxed);
    }

    /// A command that was started finished, successfully or not.
    pub fn finished(&self, failed: bool, elapsed: Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(LATENCY_BUCKETS_MICROS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CommandMetricsSnapshot {
        CommandMetricsSnapshot {
            routed: self.routed.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            latency_buckets: self.latency.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
        }
    }
}

/// The counters of every context that has seen a command.
#[derive(Default)]
pub struct Metrics {
    contexts: Mutex<HashMap<String, Arc<CommandMetrics>>>,
}

impl Metrics {
    pub fn context(&self, context: &str) -> Arc<CommandMetrics> {
        let mut contexts = self.contexts.lock().unwrap();
        if let Some(metrics) = contexts.get(context) {
            return metrics.clone();
        }
        contexts.entry(context.to_owned()).or_default().clone()
    }

    pub fn snapshot(&self) -> HashMap<String, CommandMetricsSnapshot> {
        let contexts = self.contexts.lock().unwrap();
        contexts.iter().map(|(name, m)| (name.clone(), m.snapshot())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_buckets() {
        let metrics = Metrics::default();
        let m = metrics.context("default");
        m.started();
        m.routed();
        m.finished(false, Duration::from_micros(50));
        m.started();
        m.finished(true, Duration::from_secs(120));
        let snap = &metrics.snapshot()["default"];
        assert_eq!((snap.routed, snap.in_flight, snap.failed), (1, 0, 1));
        assert_eq!(snap.latency_buckets[0], 1);
        assert_eq!(*snap.latency_buckets.last().unwrap(), 1);
    }
}
