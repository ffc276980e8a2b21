//! The `_admin` Raft log, in the control DB's own file (docs/decisions/0009-admin-raft-log.md).
//!
//! Entries are rows of `raft_log` (index, the entry as JSON); the vote, the committed id and the
//! last purged id are rows of `raft_state`. What holds:
//! - **Durable before acknowledged.** Every write is one SQLite transaction, and the control DB
//!   runs in WAL mode with `synchronous=FULL`, so a transaction that committed is on disk. The
//!   vote is saved, and `LogFlushed` is called, only after the transaction commits.
//! - **In order, without holes.** All I/O runs on the control DB's one thread, in the order
//!   openraft asks for it; an append writes its entries in one transaction, a truncate deletes a
//!   suffix and a purge a prefix (recording the purged id in the same transaction), so the rows
//!   are always one run of consecutive indexes.
//! - **Never on the async runtime.** Each call hands a closure to `ControlDb::call`.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, StorageIOError};
use rusqlite::{Connection, OptionalExtension, params};

use super::{AdminTypes, Entry, LogId, NodeId, StorageError, Vote};
use crate::control_db::{ControlDb, DbError};

/// Reads a JSON value from `raft_state`.
pub(super) fn read_state<T: serde::de::DeserializeOwned>(conn: &Connection, name: &str) -> Result<Option<T>, DbError> {
    let text: Option<String> = conn
        .query_row("SELECT value FROM raft_state WHERE name = ?1", [name], |r| r.get(0))
        .optional()?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| corrupt(name, e)))
        .transpose()
}

/// Writes a JSON value into `raft_state` (inside the caller's transaction, if any).
pub(super) fn write_state<T: serde::Serialize>(conn: &Connection, name: &str, value: &T) -> Result<(), DbError> {
    let text = serde_json::to_string(value).expect("openraft's types serialize");
    conn.execute(
        "INSERT INTO raft_state (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = ?2",
        params![name, text],
    )?;
    Ok(())
}

/// A stored value that does not decode: the file was changed behind our back.
pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> DbError {
    DbError::Sqlite(rusqlite::Error::ToSqlConversionFailure(
        format!("_admin {what} does not decode: {e}").into(),
    ))
}

fn decode_entry(text: &str, index: u64) -> Result<Entry, DbError> {
    serde_json::from_str(text).map_err(|e| corrupt(&format!("log entry {index}"), e))
}

fn sql_index(index: u64) -> i64 {
    // Raft indexes start at 0 and grow by one per entry: far from i64::MAX.
    i64::try_from(index).expect("log index fits in i64")
}

fn error(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: DbError) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

/// The `_admin` log: a handle on the control DB, cheap to clone (it is its own reader).
#[derive(Clone)]
pub struct AdminLog {
    db: ControlDb,
}

impl AdminLog {
    pub fn new(db: ControlDb) -> AdminLog {
        AdminLog { db }
    }

    async fn entries(&self, from: u64, to: Option<u64>) -> Result<Vec<Entry>, DbError> {
        self.db
            .call(move |conn| {
                let to = to.map_or(i64::MAX, sql_index);
                let mut statement = conn.prepare_cached(
                    "SELECT log_index, entry FROM raft_log WHERE log_index >= ?1 AND log_index < ?2
                     ORDER BY log_index",
                )?;
                let rows = statement.query_map(params![sql_index(from), to], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })?;
                let mut out = Vec::new();
                for row in rows {
                    let (index, text) = row?;
                    out.push(decode_entry(&text, index as u64)?);
                }
                Ok(out)
            })
            .await
    }
}

impl RaftLogReader<AdminTypes> for AdminLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let from = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(&i) => Some(i + 1),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        self.entries(from, to)
            .await
            .map_err(|e| error(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<AdminTypes> for AdminLog {
    type LogReader = AdminLog;

    async fn get_log_state(&mut self) -> Result<LogState<AdminTypes>, StorageError> {
        self.db
            .call(|conn| {
                let last_purged_log_id: Option<LogId> = read_state(conn, "purged")?;
                let last: Option<(i64, String)> = conn
                    .query_row(
                        "SELECT log_index, entry FROM raft_log ORDER BY log_index DESC LIMIT 1",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let last_log_id = match last {
                    Some((index, text)) => Some(decode_entry(&text, index as u64)?.log_id),
                    None => last_purged_log_id,
                };
                Ok(LogState {
                    last_purged_log_id,
                    last_log_id,
                })
            })
            .await
            .map_err(|e| error(ErrorSubject::Logs, ErrorVerb::Read, e))
    }

    async fn get_log_reader(&mut self) -> AdminLog {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.db
            .call(move |conn| write_state(conn, "vote", &vote))
            .await
            .map_err(|e| error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.db
            .call(|conn| read_state(conn, "vote"))
            .await
            .map_err(|e| error(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.db
            .call(move |conn| write_state(conn, "committed", &committed))
            .await
            .map_err(|e| error(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.db
            .call(|conn| Ok(read_state::<Option<LogId>>(conn, "committed")?.flatten()))
            .await
            .map_err(|e| error(ErrorSubject::Store, ErrorVerb::Read, e))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<AdminTypes>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        let rows: Vec<(i64, String)> = entries
            .iter()
            .map(|e| {
                let text = serde_json::to_string(e).expect("an entry serializes");
                (sql_index(e.log_id.index), text)
            })
            .collect();
        let written = self
            .db
            .call(move |conn| {
                let tx = conn.transaction()?;
                {
                    // REPLACE: openraft may rewrite an index it truncated before.
                    let mut insert =
                        tx.prepare_cached("INSERT OR REPLACE INTO raft_log (log_index, entry) VALUES (?1, ?2)")?;
                    for (index, text) in &rows {
                        insert.execute(params![index, text])?;
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await;
        match written {
            Ok(()) => {
                // Committed, and with synchronous=FULL that means on disk.
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let message = e.to_string();
                callback.log_io_completed(Err(std::io::Error::other(message)));
                Err(error(ErrorSubject::Logs, ErrorVerb::Write, e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.db
            .call(move |conn| {
                conn.execute("DELETE FROM raft_log WHERE log_index >= ?1", [sql_index(log_id.index)])?;
                Ok(())
            })
            .await
            .map_err(|e| error(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.db
            .call(move |conn| {
                let tx = conn.transaction()?;
                write_state(&tx, "purged", &log_id)?;
                tx.execute("DELETE FROM raft_log WHERE log_index <= ?1", [sql_index(log_id.index)])?;
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(|e| error(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))
    }
}
