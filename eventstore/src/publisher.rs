//! The leader's side of scheduled events: proposing schedule changes, and the timer that
//! proposes the publication of due ones.
//!
//! Every member keeps the book (`crate::scheduled`), but only the member that leads the group
//! fires: when the earliest schedule is due by its clock it proposes one
//! [`Command::PublishScheduled`] entry naming the due tokens. Apply then appends the events of
//! those still pending and removes them, in the same entry. So a leader change never publishes
//! one twice (a second publish of the same token finds it gone) nor loses one (the new leader's
//! book holds every schedule whose publish did not commit, and its timer fires them). A
//! schedule fires at its instant or just after: the leader's clock, an election, and the time
//! to commit one entry (an fsync on a majority) are the delay.

use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio_util::sync::CancellationToken;

use crate::append::AppendError;
use crate::command::{Command, Outcome};
use crate::consensus::{NodeId, Raft};
use crate::stored::StoredContext;

/// Schedules published by one entry at most; more due ones go in the next entries.
const MAX_PER_ENTRY: usize = 256;
/// The longest the timer sleeps without looking again, so that a wall clock set forward (the
/// instants are wall-clock times) is noticed within this long.
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// The pause after a publish that failed (e.g. leadership lost mid-way) before trying again.
const RETRY: Duration = Duration::from_millis(200);

/// Unix time in milliseconds.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Proposes a schedule change on this member, which must lead, and returns its outcome once
/// committed and applied. Like an append: a write refused before it was proposed is a definite
/// `NotLeader`; one lost after it was proposed is `Unknown` (it may still commit).
pub async fn propose(raft: &Raft, command: Command) -> Result<Outcome, AppendError> {
    let leading = {
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        metrics.current_leader == Some(metrics.id)
    };
    if !leading {
        return Err(AppendError::NotLeader);
    }
    match raft.client_write(command).await {
        Ok(response) => response
            .data
            .outcomes
            .into_iter()
            .next()
            .ok_or_else(|| AppendError::Storage("a schedule change applied without an outcome".into())),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(AppendError::Unknown(
            "this node lost the leadership before the schedule change was committed".into(),
        )),
        Err(e) => {
            // As for appends: a storage failure stops this replica, to recover at start.
            tracing::error!(error = %e, "raft write failed; stopping the eventstore for recovery");
            std::process::exit(70);
        }
    }
}

/// Starts the timer of one context; it ends when `closed` is cancelled or the group stops.
pub fn start(raft: Raft, stored: std::sync::Arc<StoredContext>, me: NodeId, closed: CancellationToken) {
    tokio::spawn(async move {
        let context = stored.name.clone();
        run(raft, stored, me, closed).await;
        tracing::debug!(%context, "scheduled event timer stopped");
    });
}

async fn run(raft: Raft, stored: std::sync::Arc<StoredContext>, me: NodeId, closed: CancellationToken) {
    let mut changed = stored.scheduled.subscribe();
    let mut metrics = raft.metrics();
    loop {
        let leading = {
            let m = metrics.borrow_and_update();
            m.current_leader == Some(me) && m.state.is_leader()
        };
        let mut sleep = None;
        if leading {
            let now = now_millis();
            let due = stored.scheduled.read(|book| book.due(now, MAX_PER_ENTRY));
            if !due.is_empty() {
                use tracing::Instrument as _;
                let span = tracing::info_span!("publish_scheduled", context = %stored.name, count = due.len());
                match raft.client_write(Command::PublishScheduled(due)).instrument(span).await {
                    Ok(response) => {
                        let published = response
                            .data
                            .outcomes
                            .iter()
                            .filter(|o| matches!(o, Outcome::Stored { .. }))
                            .count();
                        tracing::debug!(context = %stored.name, published, "scheduled events published");
                        crate::metrics::context(&stored.name)
                            .events_stored
                            .increment(published as u64);
                        continue;
                    }
                    Err(RaftError::APIError(e)) => {
                        tracing::info!(context = %stored.name, error = %e, "publishing due scheduled events: will retry");
                        sleep = Some(RETRY);
                    }
                    Err(RaftError::Fatal(e)) => {
                        tracing::info!(context = %stored.name, error = %e, "the group stopped");
                        return;
                    }
                }
            } else if let Some(at) = stored.scheduled.read(|book| book.next_instant()) {
                sleep = Some(Duration::from_millis(at.saturating_sub(now).max(1) as u64).min(MAX_SLEEP));
            }
        }
        tokio::select! {
            _ = closed.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
            _ = changed.changed() => {}
            _ = tokio::time::sleep(sleep.unwrap_or(MAX_SLEEP)), if sleep.is_some() => {}
        }
    }
}
