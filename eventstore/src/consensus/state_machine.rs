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
//! always durable in the segments.

// openraft's StorageError is large; it is the error type the traits require.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

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

/// What `snapshot.json` holds: the newest snapshot and the token counts it guarantees durable.
/// A file of its own, so the snapshot builder (which runs beside apply) never overwrites the
/// state machine's membership record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotPointer {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    event_tokens: i64,
    snapshot_tokens: i64,
}

pub struct StateMachine {
    stored: Arc<StoredContext>,
    state_path: PathBuf,
    snapshot_path: PathBuf,
    state: PersistedState,
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

impl StateMachine {
    /// Opens the state machine over a recovered context. Fails if the segments hold less than a
    /// snapshot promised was durable: that data is gone from the log, so starting would lose it.
    pub fn open(stored: Arc<StoredContext>) -> std::io::Result<StateMachine> {
        let state_path = stored.dir.join("raft-state.json");
        let snapshot_path = stored.dir.join("snapshot.json");
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
        if let Some(pointer) = pointer
            && state.last_applied < pointer.meta.last_log_id
        {
            state.last_applied = pointer.meta.last_log_id;
        }
        Ok(StateMachine {
            stored,
            state_path,
            snapshot_path,
            state,
        })
    }

    /// Makes the applied state a snapshot: fsyncs the segments and points `snapshot.json` at the
    /// last applied entry.
    ///
    /// Used at start when the segments hold entries the Raft log does not: a data directory
    /// restored from a backup, whose log was copied before its segments (docs/backups.md).
    /// openraft then purges its log up to the applied entry, which it allows only behind a
    /// snapshot that covers it; the segments are that snapshot.
    pub fn snapshot_applied_state(&self) -> std::io::Result<()> {
        write_snapshot(&self.stored, &self.snapshot_path, &self.state)
            .map(|_| ())
            .map_err(std::io::Error::other)
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
        SnapshotBuilder {
            stored: self.stored.clone(),
            snapshot_path: self.snapshot_path.clone(),
            state: self.state.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        // A single-node group never receives a snapshot. Shipping segment files to a lagging
        // follower arrives with replication; until then refuse loudly rather than pretend.
        Err(StorageIOError::write_snapshot(
            Some(meta.signature()),
            AnyError::error("installing a snapshot from a leader is not supported yet"),
        )
        .into())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        // Read from the file: the builder runs apart from the state machine and writes it.
        let pointer: Option<SnapshotPointer> = read_json(&self.snapshot_path).map_err(sm_write_error)?;
        Ok(pointer.map(|p| Snapshot {
            meta: p.meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        }))
    }
}

pub struct SnapshotBuilder {
    stored: Arc<StoredContext>,
    snapshot_path: PathBuf,
    state: PersistedState,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let meta = tokio::task::block_in_place(|| write_snapshot(&self.stored, &self.snapshot_path, &self.state))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

/// Fsyncs the segments, then records in `snapshot.json` that everything up to `state`'s last
/// applied entry (and the token counts read before the fsync) is durable in them.
fn write_snapshot(
    stored: &StoredContext,
    snapshot_path: &std::path::Path,
    state: &PersistedState,
) -> Result<SnapshotMeta<NodeId, openraft::BasicNode>, StorageError<NodeId>> {
    let event_tokens = stored.events.next_token();
    let snapshot_tokens = stored.snapshots.next_token();
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
    };
    let bytes = serde_json::to_vec_pretty(&pointer).map_err(sm_write_error)?;
    write_atomically(snapshot_path, &bytes).map_err(sm_write_error)?;
    Ok(meta)
}
