//! Query counters of one context, kept in plain atomics so that routing never waits on them.
//! The admin API reads them later through [`QueryMetrics::snapshot`].

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds; the last bucket takes everything above.
const BUCKET_BOUNDS_MICROS: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000, 10_000_000, 60_000_000,
];

#[derive(Default)]
pub struct QueryMetrics {
    routed: AtomicU64,
    streaming: AtomicU64,
    in_flight: AtomicI64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    completed: AtomicU64,
    latency_micros_total: AtomicU64,
    latency_micros_max: AtomicU64,
    buckets: [AtomicU64; BUCKET_BOUNDS_MICROS.len() + 1],
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryMetricsSnapshot {
    /// Queries that reached at least one handler.
    pub routed: u64,
    /// Of the routed queries, those the dispatcher asked to stream (CLIENT_SUPPORTS_STREAMING);
    /// they count in every other counter like any query.
    pub streaming: u64,
    pub in_flight: i64,
    /// Queries that ended with an error: no handler, duplicate id, queue full, timeout, overflow,
    /// or the error a handler answered last.
    pub failed: u64,
    pub timed_out: u64,
    /// Queries whose latency was recorded (routed and finished).
    pub completed: u64,
    pub latency_micros_total: u64,
    pub latency_micros_max: u64,
    /// `(upper bound in µs, count)`; the last bound is `u64::MAX`.
    pub latency_buckets: Vec<(u64, u64)>,
}

impl QueryMetrics {
    pub fn started(&self) {
        self.routed.fetch_add(1, Relaxed);
        self.in_flight.fetch_add(1, Relaxed);
    }

    /// Marks a query counted by [`started`](Self::started) as a streaming one.
    pub fn streamed(&self) {
        self.streaming.fetch_add(1, Relaxed);
    }

    pub fn failed(&self) {
        self.failed.fetch_add(1, Relaxed);
    }

    pub fn timed_out(&self) {
        self.timed_out.fetch_add(1, Relaxed);
    }

    /// Ends a query counted by [`started`](Self::started).
    pub fn finished(&self, latency: Duration) {
        self.in_flight.fetch_sub(1, Relaxed);
        self.completed.fetch_add(1, Relaxed);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_micros_total.fetch_add(micros, Relaxed);
        self.latency_micros_max.fetch_max(micros, Relaxed);
        let bucket = BUCKET_BOUNDS_MICROS
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(BUCKET_BOUNDS_MICROS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> QueryMetricsSnapshot {
        let bounds = BUCKET_BOUNDS_MICROS.iter().copied().chain([u64::MAX]);
        QueryMetricsSnapshot {
            routed: self.routed.load(Relaxed),
            streaming: self.streaming.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            failed: self.failed.load(Relaxed),
            timed_out: self.timed_out.load(Relaxed),
            completed: self.completed.load(Relaxed),
            latency_micros_total: self.latency_micros_total.load(Relaxed),
            latency_micros_max: self.latency_micros_max.load(Relaxed),
            latency_buckets: bounds.zip(self.buckets.iter().map(|b| b.load(Relaxed))).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_its_bucket() {
        let metrics = QueryMetrics::default();
        metrics.started();
        metrics.finished(Duration::from_micros(300));
        let snapshot = metrics.snapshot();
        assert_eq!((snapshot.routed, snapshot.in_flight, snapshot.completed), (1, 0, 1));
        assert_eq!(snapshot.latency_buckets[2], (500, 1));
        assert_eq!(snapshot.latency_micros_max, 300);
    }
}
