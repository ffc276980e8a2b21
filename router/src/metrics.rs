//! The router's metrics in the Prometheus text format, served to admin by `RouterControl.Metrics`.
//!
//! Counters, gauges and histograms go through the `metrics` facade into one process-wide
//! Prometheus recorder ([`install`]; the plumbing is shared with the eventstore in
//! [`myelin_proto::telemetry`]). Hot paths never look a metric up by name: each keeps the
//! handles of a context in a [`PerContext`] cache (one read-locked map lookup, then atomic
//! increments), and no lock is held across an await. Histograms are rendered with fixed buckets
//! ([`LATENCY_BUCKETS_SECONDS`]) so that Prometheus can aggregate them. A histogram keeps its raw
//! samples until the next upkeep, which [`install`]'s caller runs every second, so memory stays
//! bounded however busy the node is.
//!
//! Labels are bounded too: a context name comes from a client header, so at most
//! [`MAX_CONTEXT_LABELS`] distinct contexts get their own series; the rest share the label
//! [`OVERFLOW_CONTEXT`].
//!
//! What is only known at scrape time (connected clients, the query router's own counters) is
//! copied in by [`Exporter::render`].

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, RwLock};

use metrics_exporter_prometheus::PrometheusHandle;
use myelin_proto::telemetry;
pub use myelin_proto::telemetry::{LATENCY_BUCKETS_SECONDS, UPKEEP_INTERVAL, builder, keep_up};

use crate::platform::Clients;
use crate::query::QueryRouter;

/// Distinct context labels at most.
pub const MAX_CONTEXT_LABELS: usize = 1_000;
/// The context label of every context beyond [`MAX_CONTEXT_LABELS`].
pub const OVERFLOW_CONTEXT: &str = "_other";

/// Installs this process's recorder (with the router's descriptions) on first use and returns
/// its handle; metrics recorded before that are lost. The caller runs
/// [`PrometheusHandle::run_upkeep`] every [`UPKEEP_INTERVAL`] (see [`keep_up`]).
pub fn install() -> PrometheusHandle {
    telemetry::install("router", describe)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "myelin_commands_total",
        "Commands dispatched, by outcome (success or error)"
    );
    describe_counter!("myelin_commands_routed_total", "Commands handed to a handler");
    describe_gauge!("myelin_commands_in_flight", "Commands waiting for their response");
    describe_histogram!(
        "myelin_command_duration_seconds",
        Unit::Seconds,
        "Command round trip from dispatch to response"
    );
    describe_counter!("myelin_queries_total", "Queries that reached at least one handler");
    describe_counter!("myelin_queries_failed_total", "Queries that ended with an error");
    describe_counter!("myelin_queries_timed_out_total", "Queries that timed out");
    describe_gauge!("myelin_queries_in_flight", "Queries waiting for their handlers");
    describe_gauge!(
        "myelin_clients_connected",
        "Client applications with an open control stream"
    );
    crate::event_metrics::describe();
}

/// Metric handles per context, created on first use and kept for the life of the process.
pub struct PerContext<T> {
    map: RwLock<HashMap<String, Arc<T>>>,
    make: fn(&str) -> T,
}

impl<T> PerContext<T> {
    /// `make` creates the handles of one context label.
    pub fn new(make: fn(&str) -> T) -> PerContext<T> {
        PerContext {
            map: RwLock::new(HashMap::new()),
            make,
        }
    }

    /// The handles of `context` (or of [`OVERFLOW_CONTEXT`] once the label budget is spent).
    pub fn get(&self, context: &str) -> Arc<T> {
        if let Some(found) = self.map.read().unwrap_or_else(|e| e.into_inner()).get(context) {
            return found.clone();
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let label = if map.len() >= MAX_CONTEXT_LABELS && !map.contains_key(context) {
            OVERFLOW_CONTEXT
        } else {
            context
        };
        let make = self.make;
        map.entry(label.to_owned())
            .or_insert_with(|| Arc::new(make(label)))
            .clone()
    }
}

/// Renders the router's metrics, with what is only known at scrape time copied in first.
pub struct Exporter {
    handle: PrometheusHandle,
    clients: Arc<Clients>,
    queries: QueryRouter,
    /// Contexts that had connected clients at an earlier scrape, so their gauge drops to 0.
    seen_client_contexts: Mutex<BTreeSet<String>>,
}

impl Exporter {
    pub fn new(handle: PrometheusHandle, clients: Arc<Clients>, queries: QueryRouter) -> Exporter {
        Exporter {
            handle,
            clients,
            queries,
            seen_client_contexts: Mutex::new(BTreeSet::new()),
        }
    }

    /// The Prometheus text (format 0.0.4).
    pub fn render(&self) -> String {
        self.copy_clients();
        let queries = self.queries.metrics();
        for (context, q) in &queries {
            let context = context.clone();
            metrics::counter!("myelin_queries_total", "context" => context.clone()).absolute(q.routed);
            metrics::counter!("myelin_queries_failed_total", "context" => context.clone()).absolute(q.failed);
            metrics::counter!("myelin_queries_timed_out_total", "context" => context.clone()).absolute(q.timed_out);
            metrics::gauge!("myelin_queries_in_flight", "context" => context).set(q.in_flight as f64);
        }
        let mut text = self.handle.render();
        append_query_histograms(&mut text, &queries);
        text
    }

    fn copy_clients(&self) {
        let counts = self.clients.count_per_context();
        let mut seen = self.seen_client_contexts.lock().unwrap_or_else(|e| e.into_inner());
        for gone in seen.iter().filter(|c| !counts.contains_key(*c)) {
            metrics::gauge!("myelin_clients_connected", "context" => gone.clone()).set(0.0);
        }
        for (context, count) in &counts {
            metrics::gauge!("myelin_clients_connected", "context" => context.clone()).set(*count as f64);
        }
        seen.extend(counts.into_keys());
    }
}

/// The query router keeps its latency in buckets of its own; they are written out as one
/// Prometheus histogram, `myelin_query_duration_seconds`.
fn append_query_histograms(text: &mut String, queries: &[(String, crate::query::QueryMetricsSnapshot)]) {
    if queries.is_empty() {
        return;
    }
    let _ = writeln!(
        text,
        "# HELP myelin_query_duration_seconds Query round trip from dispatch to the last response"
    );
    let _ = writeln!(text, "# TYPE myelin_query_duration_seconds histogram");
    let mut sorted: Vec<&(String, crate::query::QueryMetricsSnapshot)> = queries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (context, q) in sorted {
        let context = escape_label(context);
        let mut cumulative = 0u64;
        for (bound_micros, count) in &q.latency_buckets {
            cumulative += count;
            let le = if *bound_micros == u64::MAX {
                "+Inf".to_owned()
            } else {
                (*bound_micros as f64 / 1e6).to_string()
            };
            let _ = writeln!(
                text,
                "myelin_query_duration_seconds_bucket{{context=\"{context}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = q.latency_micros_total as f64 / 1e6;
        let _ = writeln!(text, "myelin_query_duration_seconds_sum{{context=\"{context}\"}} {sum}");
        let _ = writeln!(
            text,
            "myelin_query_duration_seconds_count{{context=\"{context}\"}} {}",
            q.completed
        );
    }
}

fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The value of the sample `name` whose labels include `labels`, from Prometheus text (for
/// tests and tools; label values must not contain `,` or `"`).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find_map(|(series, value)| {
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
            if matches { value.parse().ok() } else { None }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_labels_are_bounded() {
        let cache = PerContext::new(|label: &str| label.to_owned());
        for i in 0..MAX_CONTEXT_LABELS {
            assert_eq!(*cache.get(&format!("c{i}")), format!("c{i}"));
        }
        assert_eq!(*cache.get("one-more"), OVERFLOW_CONTEXT);
        assert_eq!(*cache.get("c1"), "c1");
        assert!(Arc::ptr_eq(&cache.get("c1"), &cache.get("c1")));
    }

    #[test]
    fn histograms_render_as_buckets_and_samples_parse() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("t_seconds", "context" => "a").record(0.0003);
            metrics::counter!("t_total", "context" => "a", "outcome" => "ok").increment(3);
        });
        let text = handle.render();
        assert!(text.contains("# TYPE t_seconds histogram"), "{text}");
        assert_eq!(
            sample(&text, "t_seconds_bucket", &[("context", "a"), ("le", "0.00025")]),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "t_seconds_bucket", &[("context", "a"), ("le", "0.0005")]),
            Some(1.0)
        );
        assert_eq!(sample(&text, "t_seconds_count", &[("context", "a")]), Some(1.0));
        assert_eq!(sample(&text, "t_total", &[("outcome", "ok")]), Some(3.0));
        assert_eq!(sample(&text, "t_total", &[("outcome", "error")]), None);
    }

    #[test]
    fn query_latency_buckets_become_a_cumulative_histogram() {
        let snapshot = crate::query::QueryMetricsSnapshot {
            completed: 3,
            latency_micros_total: 1_500,
            latency_buckets: vec![(100, 1), (1_000, 2), (u64::MAX, 0)],
            ..Default::default()
        };
        let mut text = String::new();
        append_query_histograms(&mut text, &[("ctx".to_owned(), snapshot)]);
        let bucket = |le| {
            sample(
                &text,
                "myelin_query_duration_seconds_bucket",
                &[("context", "ctx"), ("le", le)],
            )
        };
        assert_eq!(bucket("0.0001"), Some(1.0));
        assert_eq!(bucket("0.001"), Some(3.0));
        assert_eq!(bucket("+Inf"), Some(3.0));
        assert_eq!(
            sample(&text, "myelin_query_duration_seconds_sum", &[("context", "ctx")]),
            Some(0.0015)
        );
        assert_eq!(
            sample(&text, "myelin_query_duration_seconds_count", &[("context", "ctx")]),
            Some(3.0)
        );
    }
}
