//! The eventstore's metrics in the Prometheus text format, served by `StorageControl.Metrics`.
//!
//! Two kinds, kept apart on purpose:
//! - **Counters and histograms** of what happened (events and snapshots stored, transactions
//!   rejected by the sequence check, group-commit batches and their duration from proposal to
//!   applied) go through the `metrics` facade into this process's Prometheus recorder
//!   ([`install`]). The batch loop of a context holds its handles ([`context`]), so recording
//!   is a few atomic operations per batch.
//! - **Gauges** of where each stored context stands (first, last and snapshot tokens, Raft
//!   applied index, term, leader, log and purged index, each member's lag on the leader, segment files
//!   and bytes per kind) are read from the contexts at scrape time
//!   and written out directly ([`render`]), so a deleted context's series simply disappear
//!   instead of lingering with stale values.
//!
//! Histogram samples are folded into buckets by an upkeep every second ([`keep_up`]), which
//! bounds their memory however busy the node is; the recorder, its buckets and the upkeep are
//! shared with the router ([`myelin_proto::telemetry`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use myelin_proto::telemetry;
pub use myelin_proto::telemetry::keep_up;

use crate::context::{Context, Contexts};

static CONTEXTS: OnceLock<Mutex<HashMap<String, Arc<ContextMetrics>>>> = OnceLock::new();

/// Installs this process's recorder (with the eventstore's descriptions) on first use and
/// returns its handle.
pub fn install() -> PrometheusHandle {
    telemetry::install("eventstore", describe)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!("myelin_eventstore_events_stored_total", "Events stored");
    describe_counter!("myelin_eventstore_snapshots_stored_total", "Snapshots stored");
    describe_counter!(
        "myelin_eventstore_appends_rejected_total",
        "Transactions and snapshots rejected by the aggregate sequence check"
    );
    describe_counter!(
        "myelin_eventstore_batches_total",
        "Group-commit batches proposed to Raft (one log entry and its fsync each)"
    );
    describe_counter!(
        "myelin_eventstore_token_at_records_read_total",
        "Segment records GetTokenAt read from disk to find its answers (at most one per call)"
    );
    describe_counter!(
        "myelin_eventstore_snapshot_installs_total",
        "Snapshots of segment files received from the leader and installed (a member that was behind the purged log)"
    );
    describe_counter!(
        "myelin_eventstore_snapshot_bytes_received_total",
        "Bytes of the snapshot streams installed (segment files and their framing)"
    );
    describe_counter!(
        "myelin_eventstore_forwarded_appends_total",
        "Appends of this node's clients sent to the context's leader on another node"
    );
    describe_counter!(
        "myelin_eventstore_forward_batches_total",
        "Messages that carried those appends to the leader (several appends each under load)"
    );
    describe_counter!(
        "myelin_eventstore_read_index_reads_total",
        "Reads that waited for a read index (every event committed before they started)"
    );
    describe_counter!(
        "myelin_eventstore_read_index_rounds_total",
        "Read index rounds (a heartbeat round on the leader, or a request to it) those reads shared"
    );
    describe_histogram!(
        "myelin_eventstore_batch_duration_seconds",
        Unit::Seconds,
        "A batch from its proposal until it is committed, fsynced and applied"
    );
}

/// The counters of one context.
pub struct ContextMetrics {
    pub events_stored: Counter,
    pub snapshots_stored: Counter,
    pub rejected: Counter,
    pub batches: Counter,
    pub batch_duration: Histogram,
    pub token_at_records_read: Counter,
    pub snapshots_installed: Counter,
    pub snapshot_bytes_received: Counter,
    pub forwarded_appends: Counter,
    pub forward_batches: Counter,
    pub read_index_reads: Counter,
    pub read_index_rounds: Counter,
}

impl ContextMetrics {
    fn new(context: &str) -> ContextMetrics {
        let ctx = context.to_owned();
        ContextMetrics {
            events_stored: metrics::counter!("myelin_eventstore_events_stored_total", "context" => ctx.clone()),
            snapshots_stored: metrics::counter!("myelin_eventstore_snapshots_stored_total", "context" => ctx.clone()),
            rejected: metrics::counter!("myelin_eventstore_appends_rejected_total", "context" => ctx.clone()),
            batches: metrics::counter!("myelin_eventstore_batches_total", "context" => ctx.clone()),
            batch_duration: metrics::histogram!("myelin_eventstore_batch_duration_seconds", "context" => ctx.clone()),
            token_at_records_read: metrics::counter!("myelin_eventstore_token_at_records_read_total", "context" => ctx.clone()),
            snapshots_installed: metrics::counter!("myelin_eventstore_snapshot_installs_total", "context" => ctx.clone()),
            snapshot_bytes_received: metrics::counter!("myelin_eventstore_snapshot_bytes_received_total", "context" => ctx.clone()),
            forwarded_appends: metrics::counter!("myelin_eventstore_forwarded_appends_total", "context" => ctx.clone()),
            forward_batches: metrics::counter!("myelin_eventstore_forward_batches_total", "context" => ctx.clone()),
            read_index_reads: metrics::counter!("myelin_eventstore_read_index_reads_total", "context" => ctx.clone()),
            read_index_rounds: metrics::counter!("myelin_eventstore_read_index_rounds_total", "context" => ctx),
        }
    }
}

/// The counters of a stored context (its name is a validated context name, and there are only
/// as many as the node stores).
pub fn context(name: &str) -> Arc<ContextMetrics> {
    let mut contexts = CONTEXTS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    contexts
        .entry(name.to_owned())
        .or_insert_with(|| Arc::new(ContextMetrics::new(name)))
        .clone()
}

/// Segment data files of one kind in `dir`: (count, bytes). Companion files are not counted.
fn segment_files(dir: &Path, suffix: &str) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    let mut count = 0;
    let mut bytes = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_segment = name
            .strip_suffix(suffix)
            .and_then(|stem| stem.strip_suffix('.'))
            .is_some_and(|base| base.len() == 20 && base.bytes().all(|b| b.is_ascii_digit()));
        if is_segment {
            count += 1;
            bytes += entry.metadata().map_or(0, |m| m.len());
        }
    }
    (count, bytes)
}

/// One gauge family: its help text and one value per label set.
struct Family {
    name: &'static str,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

fn gauges_of(contexts: &[Arc<Context>]) -> Vec<Family> {
    let mut families = vec![
        Family {
            name: "myelin_eventstore_first_token",
            help: "First token still stored",
            samples: Vec::new(),
        },
        Family {
            name: "myelin_eventstore_last_token",
            help: "Token of the newest stored event, -1 when none",
            samples: Vec::new(),
        },
        Family {
            name: "myelin_eventstore_last_snapshot_token",
            help: "Token of the newest stored snapshot, -1 when none",
            samples: Vec::new(),
        },
        Family {
            name: "myelin_eventstore_applied_index",
            help: "Raft index of the last applied log entry",
            samples: Vec::new(),
        },
        Family {
            name: "myelin_eventstore_segments",
            help: "Segment files, by kind (events, snapshots)",
            samples: Vec::new(),
        },
        Family {
            name: "myelin_eventstore_segment_bytes",
            help: "Bytes in segment files, by kind (events, snapshots)",
            samples: Vec::new(),
        },
        Family {
            name: "myelin_eventstore_raft_term",
            help: "Current Raft term of the context's group on this node",
            samples: Vec::new(),
        },
        Family {
            name: "myelin_eventstore_raft_leader",
            help: "Member id of the group's leader as this node knows it, -1 when none",
            samples: Vec::new(),
        },
        Family {
            name: "myelin_eventstore_raft_is_leader",
            help: "1 when this node leads the context's group, else 0",
            samples: Vec::new(),
        },
        Family {
            name: "myelin_eventstore_raft_last_log_index",
            help: "Index of the newest entry in this node's Raft log",
            samples: Vec::new(),
        },
        Family {
            name: "myelin_eventstore_raft_member_lag",
            help: "On the leader: log entries a member has not yet made durable (-1: none known yet)",
            samples: Vec::new(),
        },
        Family {
            name: "myelin_eventstore_raft_purged_index",
            help: "Index of the newest entry purged from this node's Raft log (-1: none); a member behind it catches up by a snapshot of segment files",
            samples: Vec::new(),
        },
    ];
    for c in contexts {
        let status = crate::control::context_status(c);
        let label = format!("context=\"{}\"", c.name);
        families[0].samples.push((label.clone(), status.first_token as f64));
        families[1].samples.push((label.clone(), status.last_token as f64));
        families[2]
            .samples
            .push((label.clone(), status.last_snapshot_token as f64));
        families[3].samples.push((label, status.applied_index as f64));
        for kind in ["events", "snapshots"] {
            let (count, bytes) = segment_files(&c.stored.dir.join(kind), kind);
            let label = format!("context=\"{}\",kind=\"{kind}\"", c.name);
            families[4].samples.push((label.clone(), count as f64));
            families[5].samples.push((label, bytes as f64));
        }
        let group = crate::membership::status(c);
        let label = format!("context=\"{}\"", c.name);
        let leads = group.leader == Some(group.member_id);
        families[6].samples.push((label.clone(), group.term as f64));
        families[7]
            .samples
            .push((label.clone(), group.leader.map_or(-1.0, |l| l as f64)));
        families[8].samples.push((label.clone(), if leads { 1.0 } else { 0.0 }));
        let last = group.last_log_index.unwrap_or(0);
        families[9].samples.push((label.clone(), last as f64));
        let purged = c.raft.metrics().borrow().purged.map_or(-1.0, |p| p.index as f64);
        families[11].samples.push((label, purged));
        if leads {
            for member in group.members.iter().filter(|m| m.id != group.member_id) {
                let lag = member.matched_index.map_or(-1.0, |m| last.saturating_sub(m) as f64);
                let label = format!(
                    "context=\"{}\",member=\"{}\",node=\"{}\"",
                    c.name, member.id, member.node
                );
                families[10].samples.push((label, lag));
            }
        }
    }
    families
}

fn write_gauges(text: &mut String, families: &[Family]) {
    for family in families.iter().filter(|f| !f.samples.is_empty()) {
        let _ = writeln!(text, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(text, "# TYPE {} gauge", family.name);
        for (labels, value) in &family.samples {
            let _ = writeln!(text, "{}{{{labels}}} {value}", family.name);
        }
    }
}

/// The Prometheus text (format 0.0.4) of this process.
pub fn render(contexts: &Contexts) -> String {
    let mut text = install().render();
    write_gauges(&mut text, &gauges_of(&contexts.all()));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_files_are_counted_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("{:020}.events", 0)), [0u8; 10]).unwrap();
        std::fs::write(dir.path().join(format!("{:020}.events", 42)), [0u8; 5]).unwrap();
        std::fs::write(dir.path().join(format!("{:020}.index", 0)), [0u8; 99]).unwrap();
        std::fs::write(dir.path().join("notes.events"), [0u8; 99]).unwrap();
        assert_eq!(segment_files(dir.path(), "events"), (2, 15));
        assert_eq!(segment_files(dir.path(), "snapshots"), (0, 0));
        assert_eq!(segment_files(&dir.path().join("missing"), "events"), (0, 0));
    }

    #[test]
    fn gauges_render_with_help_and_type() {
        let mut text = String::new();
        write_gauges(
            &mut text,
            &[Family {
                name: "g",
                help: "a gauge",
                samples: vec![("context=\"a\"".to_owned(), 3.0)],
            }],
        );
        assert_eq!(text, "# HELP g a gauge\n# TYPE g gauge\ng{context=\"a\"} 3\n");
    }

    #[test]
    fn context_handles_are_shared() {
        assert!(Arc::ptr_eq(&context("metrics-test"), &context("metrics-test")));
    }
}
