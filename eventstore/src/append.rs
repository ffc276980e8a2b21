//! Group commit: concurrent appends of a context are batched into one Raft entry.
//!
//! One task per context collects waiting appends while earlier batches are in flight, checks
//! each transaction's aggregate sequences against committed state plus the sequences reserved
//! by batches still in flight, answers conflicts at once, and proposes the rest as one entry.
//!
//! How many entries may be in flight depends on the group: a group of one voter has one (openraft
//! 0.9 flushes each log append before the next, so a second entry would only wait for the fsync
//! while its batch could have grown); a group with followers has up to [`MAX_IN_FLIGHT`], so
//! that the leader's fsync of one entry overlaps the round trip of the one before to the
//! followers, and openraft sends them several entries per AppendEntries.
//!
//! The check here is an early answer, not the guard: apply repeats it deterministically against
//! the state every entry before it left, so two appends at the same sequence can never both be
//! stored, even across a leader change. A client gets its answer only after its entry is
//! committed (fsynced) and applied.

use std::collections::HashMap;
use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::command::{Command, EventRecord, Outcome, Transaction};
use crate::consensus::Raft;
use crate::stored::StoredContext;

/// Entries in flight in a group with followers (one when the leader is the only voter). Two
/// took as many appends per second as four with 64 clients on three nodes, in a third fewer
/// entries (each an fsync on every member; see docs/benchmarks.md).
const MAX_IN_FLIGHT: usize = 2;
const MAX_BATCH_ITEMS: usize = 4096;
const MAX_BATCH_BYTES: usize = 16 << 20;
const QUEUE: usize = 8192;

/// What a client asked to store.
pub enum Work {
    Events(Transaction),
    Snapshot(EventRecord),
}

impl Work {
    fn size(&self) -> usize {
        match self {
            Work::Events(tx) => tx
                .events
                .iter()
                .map(|e| e.encoded.len() + e.aggregate_id.len() + 32)
                .sum(),
            Work::Snapshot(r) => r.encoded.len() + r.aggregate_id.len() + 32,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum AppendError {
    /// Definite: nothing was proposed.
    #[error("this node is not the leader of the context")]
    NotLeader,
    /// Definite: the context is shutting down; nothing was proposed.
    #[error("the context is shutting down")]
    Closed,
    /// Indefinite: the entry may or may not have been stored.
    #[error("storage failure: {0}")]
    Storage(String),
    /// Indefinite: forwarded to the leader, and the answer was lost on the way back (or the
    /// leader lost its place before the entry committed).
    #[error("{0}")]
    Unknown(String),
}

struct Pending {
    work: Work,
    reply: oneshot::Sender<Result<Outcome, AppendError>>,
}

#[derive(Clone)]
pub struct Appender {
    queue: mpsc::Sender<Pending>,
    closing: tokio_util::sync::CancellationToken,
    task: Arc<parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Appender {
    pub fn start(raft: Raft, stored: Arc<StoredContext>) -> Appender {
        let (queue, rx) = mpsc::channel(QUEUE);
        let closing = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(batch_loop(raft, stored, rx, closing.clone()));
        Appender {
            queue,
            closing,
            task: Arc::new(parking_lot::Mutex::new(Some(task))),
        }
    }

    /// Stops taking work (the context is being deleted): appends still queued are answered
    /// `Closed` (definite: not proposed), and this returns once the batches already proposed
    /// have their outcome, so the Raft group can be stopped without an entry in flight.
    pub async fn close(&self) {
        self.closing.cancel();
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Stores `work` and returns its outcome once committed and applied.
    pub async fn append(&self, work: Work) -> Result<Outcome, AppendError> {
        self.submit(work).await?.await.map_err(|_| AppendError::Closed)?
    }

    /// Queues `work`; its outcome comes on the receiver once committed and applied. Works
    /// submitted one after the other are batched in that order.
    pub async fn submit(&self, work: Work) -> Result<oneshot::Receiver<Result<Outcome, AppendError>>, AppendError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { work, reply })
            .await
            .map_err(|_| AppendError::Closed)?;
        Ok(answer)
    }
}

/// Sequences reserved by batches in flight: aggregate -> (highest sequence, batch number).
type Reservations = HashMap<String, (i64, u64)>;

async fn batch_loop(
    raft: Raft,
    stored: Arc<StoredContext>,
    mut rx: mpsc::Receiver<Pending>,
    closing: tokio_util::sync::CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
    let mut reservations = Reservations::new();
    let mut batch_no = 0u64;
    let mut carry: Option<Pending> = None;
    let metrics = crate::metrics::context(&stored.name);
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => tokio::select! {
                _ = closing.cancelled() => break,
                Some(done) = done_rx.recv() => {
                    reservations.retain(|_, (_, b)| *b != done);
                    continue;
                }
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => return,
                },
            },
        };
        // While every slot is busy, more appends queue up: the batch grows with the load. A
        // lone voter takes every slot: one entry in flight.
        let alone = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            metrics.membership_config.membership().voter_ids().count() <= 1
        };
        let cost = if alone { MAX_IN_FLIGHT as u32 } else { 1 };
        let Ok(slot) = slots.clone().acquire_many_owned(cost).await else {
            return;
        };
        while let Ok(done) = done_rx.try_recv() {
            reservations.retain(|_, (_, b)| *b != done);
        }
        batch_no += 1;
        let mut txs = Vec::new();
        let mut tx_replies = Vec::new();
        let mut snapshots = Vec::new();
        let mut snapshot_replies = Vec::new();
        let mut bytes = 0usize;
        let mut next = Some(first);
        while let Some(pending) = next.take() {
            let size = pending.work.size();
            let started = !txs.is_empty() || !snapshots.is_empty();
            if started && (bytes + size > MAX_BATCH_BYTES || txs.len() + snapshots.len() >= MAX_BATCH_ITEMS) {
                carry = Some(pending);
                break;
            }
            bytes += size;
            match pending.work {
                Work::Events(tx) => match precheck(&stored, &reservations, &tx) {
                    Ok(seen) => {
                        for (id, seq) in seen {
                            reservations.insert(id, (seq, batch_no));
                        }
                        txs.push(tx);
                        tx_replies.push(pending.reply);
                    }
                    Err(outcome) => {
                        metrics.rejected.increment(1);
                        let _ = pending.reply.send(Ok(outcome));
                    }
                },
                Work::Snapshot(record) => {
                    snapshots.push(record);
                    snapshot_replies.push(pending.reply);
                }
            }
            next = rx.try_recv().ok();
        }
        let raft = raft.clone();
        let done_tx = done_tx.clone();
        let number = batch_no;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if !txs.is_empty() {
                propose(&raft, Command::AppendEvents(txs), tx_replies, &metrics).await;
            }
            if !snapshots.is_empty() {
                propose(&raft, Command::AppendSnapshots(snapshots), snapshot_replies, &metrics).await;
            }
            let _ = done_tx.send(number);
            drop(slot);
        });
    }
    // Closing: refuse what is queued, then wait for the batches in flight.
    rx.close();
    while let Ok(pending) = rx.try_recv() {
        let _ = pending.reply.send(Err(AppendError::Closed));
    }
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
}

/// Checks a transaction's sequences; on success returns the highest sequence per aggregate.
fn precheck(
    stored: &StoredContext,
    reservations: &Reservations,
    tx: &Transaction,
) -> Result<Vec<(String, i64)>, Outcome> {
    let mut seen: Vec<(String, i64)> = Vec::new();
    for event in tx.events.iter().filter(|e| e.indexed) {
        let id = event.aggregate_id.as_str();
        let last = match seen.iter().rev().find(|(s, _)| s == id) {
            Some((_, seq)) => Some(*seq),
            None => match reservations.get(id) {
                Some((seq, _)) => Some(*seq),
                // A read error here is left for apply to meet and report.
                None => stored.events.last_sequence(id).unwrap_or(None),
            },
        };
        let expected = last.map_or(0, |s| s + 1);
        if event.sequence != expected {
            return Err(Outcome::InvalidSequence {
                aggregate_id: id.to_owned(),
                got: event.sequence,
                expected,
            });
        }
        match seen.iter_mut().find(|(s, _)| s == id) {
            Some(entry) => entry.1 = event.sequence,
            None => seen.push((id.to_owned(), event.sequence)),
        }
    }
    Ok(seen)
}

async fn propose(
    raft: &Raft,
    command: Command,
    replies: Vec<oneshot::Sender<Result<Outcome, AppendError>>>,
    metrics: &crate::metrics::ContextMetrics,
) {
    let snapshots = matches!(command, Command::AppendSnapshots(_));
    // openraft answers `ForwardToLeader` both when this node does not lead (nothing proposed)
    // and when a proposed entry was overwritten by a new leader's log. Such an entry may still
    // be committed later (a follower that holds it can win the next election), so only a write
    // refused before it was proposed is a definite `NotLeader`.
    let leading = {
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        metrics.current_leader == Some(metrics.id)
    };
    if !leading {
        for reply in replies {
            let _ = reply.send(Err(AppendError::NotLeader));
        }
        return;
    }
    let started = std::time::Instant::now();
    let written = raft.client_write(command).await;
    metrics.batches.increment(1);
    metrics.batch_duration.record(started.elapsed());
    match written {
        Ok(response) => {
            let outcomes = response.data.outcomes;
            debug_assert_eq!(outcomes.len(), replies.len());
            for outcome in &outcomes {
                match outcome {
                    Outcome::Stored { count, .. } if snapshots => metrics.snapshots_stored.increment(u64::from(*count)),
                    Outcome::Stored { count, .. } => metrics.events_stored.increment(u64::from(*count)),
                    _ => metrics.rejected.increment(1),
                }
            }
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
            let lost = AppendError::Unknown("this node lost the leadership before the append was committed".into());
            for reply in replies {
                let _ = reply.send(Err(lost.clone()));
            }
        }
        Err(e) => {
            let error = AppendError::Storage(e.to_string());
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
            // A storage failure stops this replica (never retry an fsync): exit and let the
            // supervisor restart us into recovery.
            tracing::error!(error = %e, "raft write failed; stopping the eventstore for recovery");
            std::process::exit(70);
        }
    }
}
