//! The Raft state machine of a context: committed entries are applied to its segment stores.
//!
//! The state machine is persistent: the segments are the state, and every record names the Raft
//! entry it came from, so after a restart `applied_state` is read back from the files (plus
//! `raft-state.json` for membership and entries that stored nothing). Entries after that are
//! re-applied from the log by openraft; apply is deterministic, so re-applying gives the same
//! result.
//!
//! A snapshot is a pointer, not a copy: building one fsyncs the segments and records how far they
//! go. Only then may openraft purge the log behind it, so an event the log no longer holds is
//! always durable in the segments. The token counts it records are exactly those of its last
//! entry (read where apply runs, not where the snapshot is built), so the segments up to them are
//! the state at that entry: what a member behind the purged log is sent (`transfer`), and what
//! it installs in place of its own segments (`crate::install`).

// openraft's StorageError is large; it is the error type the traits require.
#![allow(clippy::result_large_err)]

use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::transfer::{Incoming, Outgoing, SegmentStream};
use super::{NodeId, TypeConfig};
use crate::command::CommandResult;
use crate::segment::{EntryRef, store::write_atomically};
use crate::stored::StoredContext;

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

/// What `raft-state.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PersistedState {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
}

/// What `snapshot.json` holds: the newest snapshot and the token counts it guarantees durable,
/// which are the counts right after its last entry was applied. A file of its own, so the
/// snapshot builder (which runs beside apply) never overwrites the state machine's membership
/// record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotPointer {
    pub meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    pub event_tokens: i64,
    pub snapshot_tokens: i64,
    /// The pending scheduled events at its last entry (see `crate::scheduled`).
    #[serde(default)]
    pub scheduled: crate::scheduled::Persisted,
}

/// The token counts of both stores.
#[derive(Debug, Clone, Copy)]
struct Tokens {
    events: i64,
    snapshots: i64,
}

impl Tokens {
    fn of(stored: &StoredContext) -> Tokens {
        Tokens {
            events: stored.events.next_token(),
            snapshots: stored.snapshots.next_token(),
        }
    }
}

pub struct StateMachine {
    stored: Arc<StoredContext>,
    state_path: PathBuf,
    snapshot_path: PathBuf,
    state: PersistedState,
    /// The first entry whose schedule changes the book does not hold yet: the one after the
    /// snapshot it was read from (see `replay_scheduled`).
    scheduled_from: u64,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn log_id_of(entry: EntryRef) -> LogId<NodeId> {
    LogId::new(openraft::CommittedLeaderId::new(entry.term, entry.leader), entry.index)
}

fn entry_ref(log_id: &LogId<NodeId>) -> EntryRef {
    EntryRef {
        term: log_id.leader_id.term,
        leader: log_id.leader_id.node_id,
        index: log_id.index,
    }
}

fn sm_write_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

fn sm_read_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_snapshot(None, AnyError::new(&e)).into()
}

impl StateMachine {
    /// Opens the state machine over a recovered context. Fails if the segments hold less than a
    /// snapshot promised was durable: that data is gone from the log, so starting would lose it.
    pub fn open(stored: Arc<StoredContext>) -> std::io::Result<StateMachine> {
        let state_path = stored.dir.join("raft-state.json");
        let snapshot_path = stored.dir.join(crate::install::POINTER_FILE);
        let mut state: PersistedState = read_json(&state_path)?.unwrap_or_default();
        let pointer: Option<SnapshotPointer> = read_json(&snapshot_path)?;
        if let Some(pointer) = &pointer
            && (stored.events.next_token() < pointer.event_tokens
                || stored.snapshots.next_token() < pointer.snapshot_tokens)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "context {}: segments end at token {} (snapshots {}) but were fsynced up to {} ({}); \
                     refusing to start on lost data",
                    stored.name,
                    stored.events.next_token(),
                    stored.snapshots.next_token(),
                    pointer.event_tokens,
                    pointer.snapshot_tokens
                ),
            ));
        }
        if let Some(entry) = stored.last_entry() {
            let from_segments = log_id_of(entry);
            if state.last_applied.is_none_or(|l| l.index < from_segments.index) {
                state.last_applied = Some(from_segments);
            }
        }
        let mut scheduled_from = 0;
        if let Some(pointer) = pointer {
            let book = crate::scheduled::Book::try_from(&pointer.scheduled)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            stored.scheduled.replace(book);
            scheduled_from = pointer.meta.last_log_id.map_or(0, |l| l.index + 1);
            if state.last_applied < pointer.meta.last_log_id {
                state.last_applied = pointer.meta.last_log_id;
            }
            // An installed snapshot brings the membership of the state it holds.
            if state.membership.log_id() < pointer.meta.last_membership.log_id() {
                state.membership = pointer.meta.last_membership;
            }
        }
        Ok(StateMachine {
            stored,
            state_path,
            snapshot_path,
            state,
            scheduled_from,
        })
    }

    /// Brings the book of scheduled events from its snapshot up to the applied state: replays
    /// the schedule changes of the entries after the snapshot that are already applied (those
    /// the segments hold, and entries that stored nothing), read from the Raft log. Entries
    /// after the applied state are applied by openraft as usual. Called once, before the group
    /// starts.
    ///
    /// openraft purges its log only behind a snapshot, so these entries are in it; only a data
    /// directory restored from a backup (whose segments may be ahead of its log) can lack some,
    /// and their schedule changes are then missing (logged; docs/backups.md).
    pub async fn replay_scheduled(&mut self, log: &mut super::log_store::LogStore) -> anyhow::Result<()> {
        use anyhow::Context as _;
        use openraft::storage::{RaftLogReader, RaftLogStorage};
        let Some(applied) = self.state.last_applied.map(|l| l.index) else {
            return Ok(());
        };
        let state = log.get_log_state().await.context("reading the log state")?;
        let first_held = state.last_purged_log_id.map_or(0, |l| l.index + 1);
        let last_held = state.last_log_id.map_or(0, |l| l.index);
        let from = self.scheduled_from.max(first_held);
        let to = applied.min(last_held);
        if self.scheduled_from <= applied && (first_held > self.scheduled_from || last_held < applied) {
            tracing::warn!(
                context = %self.stored.name,
                book_from = self.scheduled_from,
                applied,
                log_from = first_held,
                log_to = last_held,
                "the Raft log lacks applied entries after the snapshot: their schedule changes are missing"
            );
        }
        let mut reader = log.get_log_reader().await;
        let mut next = from;
        let mut replayed = 0usize;
        while next <= to && state.last_log_id.is_some() && from <= applied {
            let end = (next + 64).min(to + 1);
            let entries = reader
                .try_get_log_entries(next..end)
                .await
                .context("reading the Raft log")?;
            for entry in &entries {
                if let EntryPayload::Normal(command) = &entry.payload
                    && !matches!(
                        command,
                        crate::command::Command::AppendEvents(_) | crate::command::Command::AppendSnapshots(_)
                    )
                {
                    self.stored.scheduled.update(|book| book.apply(command));
                    replayed += 1;
                }
            }
            next = end;
        }
        self.scheduled_from = applied + 1;
        if replayed > 0 || self.stored.scheduled.read(|b| !b.is_empty()) {
            tracing::info!(
                context = %self.stored.name,
                replayed,
                pending = self.stored.scheduled.read(|b| b.len()),
                "scheduled events restored"
            );
        }
        Ok(())
    }

    /// Makes the applied state a snapshot: fsyncs the segments and points `snapshot.json` at the
    /// last applied entry.
    ///
    /// Used at start when the segments hold entries the Raft log does not: a data directory
    /// restored from a backup, whose log was copied before its segments (docs/backups.md).
    /// openraft then purges its log up to the applied entry, which it allows only behind a
    /// snapshot that covers it; the segments are that snapshot.
    pub fn snapshot_applied_state(&self) -> std::io::Result<()> {
        write_snapshot(
            &self.stored,
            &self.snapshot_path,
            &self.state,
            Tokens::of(&self.stored),
            self.stored.scheduled.persisted(),
        )
        .map(|_| ())
        .map_err(std::io::Error::other)
    }

    /// The current snapshot as a stream of its files. A pointer whose token counts are not
    /// those of its last entry (written before they were kept exact) is taken anew first, once
    /// (`retake`).
    fn outgoing(&self, retake: bool) -> Result<Option<(SnapshotPointer, Outgoing)>, StorageError<NodeId>> {
        let read = || -> Result<Option<SnapshotPointer>, StorageError<NodeId>> {
            read_json(&self.snapshot_path).map_err(sm_read_error)
        };
        let Some(pointer) = read()? else {
            return Ok(None);
        };
        let (events, snapshots) = tokio::task::block_in_place(|| {
            Ok::<_, StorageError<NodeId>>((
                self.stored
                    .events
                    .shipment(pointer.event_tokens)
                    .map_err(sm_read_error)?,
                self.stored
                    .snapshots
                    .shipment(pointer.snapshot_tokens)
                    .map_err(sm_read_error)?,
            ))
        })?;
        let last = pointer.meta.last_log_id.map(|l| l.index);
        let exact = [&events, &snapshots]
            .iter()
            .all(|s| s.last.is_none_or(|e| Some(e.index) <= last) && s.following.is_none_or(|e| Some(e.index) > last));
        if !exact {
            if !retake {
                return Err(sm_read_error(std::io::Error::other(format!(
                    "snapshot {}: the segments do not end at its entry",
                    pointer.meta.snapshot_id
                ))));
            }
            tracing::info!(context = %self.stored.name, "the snapshot pointer is not exact: taking it anew");
            tokio::task::block_in_place(|| self.snapshot_applied_state()).map_err(sm_write_error)?;
            return self.outgoing(false);
        }
        let stream = Outgoing::new(pointer.clone(), events, snapshots).map_err(sm_read_error)?;
        Ok(Some((pointer, stream)))
    }

    fn persist(&self) -> Result<(), StorageError<NodeId>> {
        let bytes = serde_json::to_vec_pretty(&self.state).map_err(sm_write_error)?;
        write_atomically(&self.state_path, &bytes).map_err(sm_write_error)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        Ok((self.state.last_applied, self.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = super::Entry> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            let result = match &entry.payload {
                EntryPayload::Blank => CommandResult::default(),
                EntryPayload::Normal(command) => {
                    // File writes of page-cache speed, done in place: handing the worker over
                    // (`block_in_place`) costs more thread switches per append than the write
                    // itself. Only an entry that may close a segment (an fsync, the index files)
                    // is applied off the runtime, so the eventstore's one worker never stalls.
                    let entry = entry_ref(&log_id);
                    let outcomes = if self.stored.may_roll(command) {
                        tokio::task::block_in_place(|| self.stored.apply(entry, command))
                    } else {
                        self.stored.apply(entry, command)
                    }
                    .map_err(|e| StorageError::from(StorageIOError::apply(log_id, AnyError::new(&e))))?;
                    CommandResult { outcomes }
                }
                EntryPayload::Membership(membership) => {
                    self.state.membership = StoredMembership::new(Some(log_id), membership.clone());
                    self.state.last_applied = Some(log_id);
                    self.persist()?;
                    CommandResult::default()
                }
            };
            self.state.last_applied = Some(log_id);
            results.push(result);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        // Here apply is not running: the token counts are exactly those of the last applied entry.
        SnapshotBuilder {
            stored: self.stored.clone(),
            snapshot_path: self.snapshot_path.clone(),
            state: self.state.clone(),
            tokens: Tokens::of(&self.stored),
            scheduled: self.stored.scheduled.persisted(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SegmentStream>, StorageError<NodeId>> {
        Ok(Box::new(SegmentStream::Incoming(Box::new(Incoming::new(
            &self.stored.dir,
        )))))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<SegmentStream>,
    ) -> Result<(), StorageError<NodeId>> {
        let refused = |why: String| -> StorageError<NodeId> {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::error(why)).into()
        };
        let SegmentStream::Incoming(incoming) = *snapshot else {
            return Err(refused("a snapshot to install must be one received".to_owned()));
        };
        let received = incoming.finish().map_err(refused)?;
        let pointer = &received.manifest.pointer;
        if pointer.meta.last_log_id != meta.last_log_id || pointer.meta.snapshot_id != meta.snapshot_id {
            return Err(refused(format!(
                "the files received are of snapshot {}, not {}",
                pointer.meta.snapshot_id, meta.snapshot_id
            )));
        }
        let files = received.manifest.files.len();
        let data_bytes = received.manifest.data_bytes();
        let pointer_bytes = serde_json::to_vec_pretty(pointer).map_err(sm_write_error)?;
        // Read before anything is installed: a book that does not read back refuses the snapshot.
        let book = crate::scheduled::Book::try_from(&pointer.scheduled).map_err(|e| refused(e.to_string()))?;
        tokio::task::block_in_place(|| {
            received.staging.mark_ready(&pointer_bytes)?;
            crate::crash::point("install-after-ready");
            self.stored.install(received.staging)
        })
        .map_err(sm_write_error)?;
        // The book comes with the snapshot, exact at its last entry.
        self.stored.scheduled.replace(book);
        self.scheduled_from = meta.last_log_id.map_or(0, |l| l.index + 1);
        self.state.last_applied = meta.last_log_id;
        self.state.membership = meta.last_membership.clone();
        self.persist()?;
        let took = received.started.elapsed();
        let metrics = crate::metrics::context(&self.stored.name);
        metrics.snapshots_installed.increment(1);
        metrics.snapshot_bytes_received.increment(received.bytes);
        tracing::info!(
            context = %self.stored.name,
            snapshot = %meta.snapshot_id,
            files,
            data_bytes,
            stream_bytes = received.bytes,
            next_token = self.stored.events.next_token(),
            took_ms = took.as_millis() as u64,
            "installed a snapshot of segment files from the leader"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        // Read from the file: the builder runs apart from the state machine and writes it.
        Ok(self.outgoing(true)?.map(|(pointer, stream)| Snapshot {
            meta: pointer.meta,
            snapshot: Box::new(SegmentStream::Outgoing(Box::new(stream))),
        }))
    }
}

pub struct SnapshotBuilder {
    stored: Arc<StoredContext>,
    snapshot_path: PathBuf,
    state: PersistedState,
    tokens: Tokens,
    /// The book of scheduled events at `state`'s last entry.
    scheduled: crate::scheduled::Persisted,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let meta = tokio::task::block_in_place(|| {
            write_snapshot(
                &self.stored,
                &self.snapshot_path,
                &self.state,
                self.tokens,
                self.scheduled.clone(),
            )
        })?;
        // openraft only keeps the meta of a snapshot it built; the files are listed when it
        // sends one (`get_current_snapshot`).
        Ok(Snapshot {
            snapshot: Box::new(SegmentStream::empty(&meta)),
            meta,
        })
    }
}

/// Fsyncs the segments, then records in `snapshot.json` that everything up to `state`'s last
/// applied entry, which left the stores at `tokens`, is durable in them.
fn write_snapshot(
    stored: &StoredContext,
    snapshot_path: &std::path::Path,
    state: &PersistedState,
    tokens: Tokens,
    scheduled: crate::scheduled::Persisted,
) -> Result<SnapshotMeta<NodeId, openraft::BasicNode>, StorageError<NodeId>> {
    let (event_tokens, snapshot_tokens) = (tokens.events, tokens.snapshots);
    // A snapshot installed while this one was being built is newer: keep it.
    if let Ok(Some(existing)) = read_json::<SnapshotPointer>(snapshot_path)
        && existing.meta.last_log_id > state.last_applied
    {
        return Ok(existing.meta);
    }
    stored.sync().map_err(sm_write_error)?;
    crate::crash::point("snapshot-after-sync");
    let last = state.last_applied;
    let meta = SnapshotMeta {
        last_log_id: last,
        last_membership: state.membership.clone(),
        snapshot_id: format!("{}-{}", last.map_or(0, |l| l.index), event_tokens),
    };
    let pointer = SnapshotPointer {
        meta: meta.clone(),
        event_tokens,
        snapshot_tokens,
        scheduled,
    };
    let bytes = serde_json::to_vec_pretty(&pointer).map_err(sm_write_error)?;
    write_atomically(snapshot_path, &bytes).map_err(sm_write_error)?;
    Ok(meta)
}
