//! Command routing metrics per context: dispatched commands by outcome, commands handed to a
//! handler, commands in flight, and the round-trip latency from `Dispatch` to the response.
//!
//! The handles of a context are created once and cached (see [`crate::metrics::PerContext`]),
//! so a dispatch costs one map lookup and a few atomic operations.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

use crate::metrics::PerContext;

/// The handles of one context.
pub struct CommandMetrics {
    succeeded: Counter,
    failed: Counter,
    routed: Counter,
    in_flight: Gauge,
    duration: Histogram,
}

impl CommandMetrics {
    fn new(context: &str) -> CommandMetrics {
        let ctx = context.to_owned();
        CommandMetrics {
            succeeded: metrics::counter!("myelin_commands_total", "context" => ctx.clone(), "outcome" => "success"),
            failed: metrics::counter!("myelin_commands_total", "context" => ctx.clone(), "outcome" => "error"),
            routed: metrics::counter!("myelin_commands_routed_total", "context" => ctx.clone()),
            in_flight: metrics::gauge!("myelin_commands_in_flight", "context" => ctx.clone()),
            duration: metrics::histogram!("myelin_command_duration_seconds", "context" => ctx),
        }
    }

    pub fn started(&self) {
        self.in_flight.increment(1.0);
    }

    /// The command was handed to a handler.
    pub fn routed(&self) {
        self.routed.increment(1);
    }

    /// A command that was started finished, with a response or an error (a routing error or the
    /// handler's own).
    pub fn finished(&self, failed: bool, elapsed: Duration) {
        self.in_flight.decrement(1.0);
        if failed {
            self.failed.increment(1);
        } else {
            self.succeeded.increment(1);
        }
        self.duration.record(elapsed);
    }
}

/// The handles of every context that has seen a command.
pub struct Metrics {
    contexts: PerContext<CommandMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            contexts: PerContext::new(CommandMetrics::new),
        }
    }
}

impl Metrics {
    pub fn context(&self, context: &str) -> Arc<CommandMetrics> {
        self.contexts.get(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::sample;

    #[test]
    fn counts_and_latency() {
        let recorder = crate::metrics::builder().build_recorder();
        let handle = recorder.handle();
        let metrics = Metrics::default();
        let m = metrics::with_local_recorder(&recorder, || metrics.context("default"));
        m.started();
        m.routed();
        m.finished(false, Duration::from_micros(50));
        m.started();
        m.finished(true, Duration::from_secs(120));
        m.started();
        let text = handle.render();
        let value = |name, labels: &[(&str, &str)]| sample(&text, name, labels);
        assert_eq!(
            value("myelin_commands_routed_total", &[("context", "default")]),
            Some(1.0)
        );
        assert_eq!(value("myelin_commands_total", &[("outcome", "success")]), Some(1.0));
        assert_eq!(value("myelin_commands_total", &[("outcome", "error")]), Some(1.0));
        assert_eq!(value("myelin_commands_in_flight", &[("context", "default")]), Some(1.0));
        assert_eq!(
            value("myelin_command_duration_seconds_bucket", &[("le", "0.0001")]),
            Some(1.0)
        );
        assert_eq!(
            value("myelin_command_duration_seconds_bucket", &[("le", "+Inf")]),
            Some(2.0)
        );
    }
}
