//! The control DB: the node's configuration (nodes, contexts and their members, applications
//! and their roles, users, backup pointers) in one SQLite file.
//!
//! What holds:
//! - Every change is one SQLite transaction in WAL mode with `synchronous=FULL`: once a call
//!   returns, the change survives a crash or power cut, and a crash mid-change leaves nothing of
//!   it.
//! - The schema version is `PRAGMA user_version`; opening a file applies the migrations it lacks,
//!   in order, each in its own transaction together with the version bump (see `schema`). A
//!   file written by a newer Myelin (a higher version than this build knows) is refused rather
//!   than misread.
//! - The connection lives on one dedicated thread; async code sends it closures over a bounded
//!   channel and awaits the answer, so SQLite's blocking I/O never runs on the async runtime and
//!   no lock is held across an await.
//!
//! This file is also the `_admin` context's storage (`crate::raft`): its Raft log, vote and
//! snapshot are tables here, and the cluster configuration (nodes, contexts and members,
//! applications, users) changes only by applying committed `_admin` entries. The backup
//! pointers are this node's own and are written directly. `_admin` has no eventstore storage.

pub mod applications;
pub mod backups;
pub mod contexts;
pub mod schema;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

/// Milliseconds since the Unix epoch, the time unit of every timestamp column.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("control DB: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("control DB {path}: schema version {found} is newer than this Myelin understands ({supported})")]
    TooNew { path: PathBuf, found: i64, supported: i64 },
    #[error("control DB: {0}")]
    Io(#[from] std::io::Error),
    #[error("control DB is closed")]
    Closed,
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle on the control DB; cheap to clone.
#[derive(Clone)]
pub struct ControlDb {
    jobs: mpsc::Sender<Job>,
    path: Arc<PathBuf>,
}

/// Opens a connection with the settings every use relies on.
pub fn connect(path: &Path) -> Result<Connection, DbError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "control DB could not switch to WAL mode");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

impl ControlDb {
    /// Opens (creating it and its directory if needed) and migrates the file, then starts the
    /// thread that owns the connection.
    pub fn open(path: &Path) -> Result<ControlDb, DbError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let mut conn = connect(path)?;
        schema::migrate(&mut conn, path, schema::MIGRATIONS)?;
        let (jobs, mut rx) = mpsc::channel::<Job>(64);
        std::thread::Builder::new().name("control-db".into()).spawn(move || {
            while let Some(job) = rx.blocking_recv() {
                job(&mut conn);
            }
            // Every handle is gone: the connection closes here (checkpointing the WAL).
        })?;
        Ok(ControlDb {
            jobs,
            path: Arc::new(path.to_owned()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the DB thread and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = reply.send(f(conn));
        });
        self.jobs.send(job).await.map_err(|_| DbError::Closed)?;
        answer.await.map_err(|_| DbError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_run_on_the_db_thread_and_settings_hold() {
        let dir = tempfile::tempdir().unwrap();
        let db = ControlDb::open(&dir.path().join("sub/control.sqlite3")).unwrap();
        let (mode, sync, fk, thread) = db
            .call(|conn| {
                let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
                let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
                let fk: i64 = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
                Ok((mode, sync, fk, std::thread::current().name().map(str::to_owned)))
            })
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "synchronous=FULL");
        assert_eq!(fk, 1);
        assert_eq!(thread.as_deref(), Some("control-db"));
    }
}
