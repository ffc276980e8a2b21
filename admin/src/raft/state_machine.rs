//! The `_admin` state machine: the control DB's replicated tables.
//!
//! What holds:
//! - **Each entry is applied exactly once, across crashes.** A batch of entries is applied in one
//!   SQLite transaction that also records the last applied log id (and the membership, for a
//!   membership entry). The transaction commits whole or not at all, and it is fsynced on commit
//!   (`synchronous=FULL`): after a crash the applied id names exactly the entries whose changes
//!   are in the tables, and openraft re-applies only those after it.
//! - **Apply is deterministic** (see `command`): a refused command is an answer, not an error;
//!   only an SQLite failure is an error, which stops this member's group.
//! - **A snapshot is the replicated tables** (see `snapshot`), read in one transaction with the
//!   applied id and membership it corresponds to, and kept in `raft_snapshot` so it survives a
//!   restart. Installing one replaces those tables, the applied id and the membership in one
//!   transaction.
//! - Every apply that changed something, and every installed snapshot, bumps a counter others
//!   can watch ([`AdminStateMachine::changes`]): access control reloads the grants on it, on
//!   followers too, where no API handler saw the change.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, StorageIOError, StoredMembership};
use rusqlite::{OptionalExtension, params};
use tokio::sync::watch;

use super::command::{self, AdminResponse};
use super::log_store::{corrupt, read_state, write_state};
use super::snapshot;
use super::{AdminTypes, Entry, LogId, Membership, SnapshotMeta, StorageError};
use crate::control_db::{ControlDb, DbError};

/// The state machine over one control DB; cheap to clone (it is its own snapshot builder).
#[derive(Clone)]
pub struct AdminStateMachine {
    db: ControlDb,
    changes: Arc<watch::Sender<u64>>,
}

fn read_applied(conn: &rusqlite::Connection) -> Result<(Option<LogId>, Membership), DbError> {
    let applied: Option<LogId> = read_state::<Option<LogId>>(conn, "applied")?.flatten();
    let membership: Membership = read_state(conn, "membership")?.unwrap_or_default();
    Ok((applied, membership))
}

fn read_snapshot(conn: &rusqlite::Connection) -> Result<Option<(SnapshotMeta, Vec<u8>)>, DbError> {
    let row: Option<(String, Vec<u8>)> = conn
        .query_row("SELECT meta, data FROM raft_snapshot WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    row.map(|(meta, data)| {
        let meta = serde_json::from_str(&meta).map_err(|e| corrupt("snapshot meta", e))?;
        Ok((meta, data))
    })
    .transpose()
}

fn write_snapshot(conn: &rusqlite::Connection, meta: &SnapshotMeta, data: &[u8]) -> Result<(), DbError> {
    let meta = serde_json::to_string(meta).expect("snapshot meta serializes");
    conn.execute(
        "INSERT INTO raft_snapshot (id, meta, data) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET meta = ?1, data = ?2",
        params![meta, data],
    )?;
    Ok(())
}

fn snapshot_error(meta: Option<&SnapshotMeta>, verb_write: bool, e: impl std::error::Error + 'static) -> StorageError {
    let signature = meta.map(|m| m.signature());
    let source = AnyError::new(&e);
    if verb_write {
        StorageIOError::write_snapshot(signature, source).into()
    } else {
        StorageIOError::read_snapshot(signature, source).into()
    }
}

impl AdminStateMachine {
    pub fn new(db: ControlDb) -> AdminStateMachine {
        let (changes, _) = watch::channel(0);
        AdminStateMachine {
            db,
            changes: Arc::new(changes),
        }
    }

    /// A counter bumped after every applied batch that changed replicated rows, and every
    /// installed snapshot (once the change is committed).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }
}

impl RaftSnapshotBuilder<AdminTypes> for AdminStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<AdminTypes>, StorageError> {
        let (meta, data) = self
            .db
            .call(|conn| {
                // One transaction: the rows, the applied id and the membership are of one moment,
                // and the snapshot is stored with them.
                let tx = conn.transaction()?;
                let (applied, membership) = read_applied(&tx)?;
                let data = snapshot::dump(&tx)?;
                let snapshot_id = match applied {
                    Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, crate::control_db::now_millis()),
                    None => format!("empty-{}", crate::control_db::now_millis()),
                };
                let meta = SnapshotMeta {
                    last_log_id: applied,
                    last_membership: membership,
                    snapshot_id,
                };
                write_snapshot(&tx, &meta, &data)?;
                tx.commit()?;
                Ok((meta, data))
            })
            .await
            .map_err(|e| snapshot_error(None, true, e))?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "_admin snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<AdminTypes> for AdminStateMachine {
    type SnapshotBuilder = AdminStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        self.db
            .call(|conn| read_applied(conn))
            .await
            .map_err(|e| StorageIOError::read_state_machine(AnyError::new(&e)).into())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<AdminResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        let (responses, changed) = self
            .db
            .call(move |conn| {
                let mut tx = conn.transaction()?;
                let mut responses = Vec::with_capacity(entries.len());
                let mut changed = false;
                for entry in entries {
                    let response = match entry.payload {
                        EntryPayload::Blank => AdminResponse::Applied,
                        EntryPayload::Normal(command) => {
                            let response = command::apply(&mut tx, entry.log_id.index, &command)?;
                            changed |= response == AdminResponse::Applied;
                            tracing::debug!(
                                index = entry.log_id.index,
                                command = command.kind(),
                                ?response,
                                "_admin applied"
                            );
                            response
                        }
                        EntryPayload::Membership(membership) => {
                            write_state(
                                &tx,
                                "membership",
                                &StoredMembership::new(Some(entry.log_id), membership),
                            )?;
                            AdminResponse::Applied
                        }
                    };
                    responses.push(response);
                }
                write_state(&tx, "applied", &Some(last))?;
                tx.commit()?;
                Ok((responses, changed))
            })
            .await
            .map_err(|e| StorageError::from(StorageIOError::apply(last, AnyError::new(&e))))?;
        if changed {
            self.changed();
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> AdminStateMachine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let owned = meta.clone();
        let bytes = data.len();
        self.db
            .call(move |conn| {
                let tx = conn.transaction()?;
                // A snapshot this build cannot hold is refused whole (the transaction rolls back).
                Ok(match snapshot::restore(&tx, &data) {
                    Ok(()) => {
                        write_state(&tx, "applied", &owned.last_log_id)?;
                        write_state(&tx, "membership", &owned.last_membership)?;
                        write_snapshot(&tx, &owned, &data)?;
                        tx.commit()?;
                        Ok(())
                    }
                    Err(e) => Err(e),
                })
            })
            .await
            .map_err(|e| snapshot_error(Some(meta), true, e))?
            .map_err(|e| snapshot_error(Some(meta), true, e))?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes, last_log_id = ?meta.last_log_id, "_admin snapshot installed");
        self.changed();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<AdminTypes>>, StorageError> {
        let stored = self
            .db
            .call(|conn| read_snapshot(conn))
            .await
            .map_err(|e| snapshot_error(None, false, e))?;
        Ok(stored.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
