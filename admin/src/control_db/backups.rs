//! Backup pointers: when the control DB was last copied, and per context and kind the newest
//! segment a backup took. The backup procedure reads and advances them; nothing else does.
//!
//! They say what this node's backups copied, so they are node-local: written directly, never
//! replicated through `_admin` nor replaced by its snapshots.

use rusqlite::{Connection, OptionalExtension, params};

use super::{DbError, now_millis};

/// A kind of segment a backup copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    Event,
    Snapshot,
    Log,
}

impl SegmentKind {
    pub fn name(self) -> &'static str {
        match self {
            SegmentKind::Event => "EVENT",
            SegmentKind::Snapshot => "SNAPSHOT",
            SegmentKind::Log => "LOG",
        }
    }
}

/// Records a control-DB backup written to `path`.
pub fn record_control_db_backup(conn: &Connection, path: &str) -> Result<i64, DbError> {
    let at = now_millis();
    conn.execute(
        "INSERT INTO control_db_backups (path, created_at_millis) VALUES (?1, ?2)",
        params![path, at],
    )?;
    Ok(at)
}

/// Time (Unix millis) and path of the newest control-DB backup.
pub fn last_control_db_backup(conn: &Connection) -> Result<Option<(i64, String)>, DbError> {
    Ok(conn
        .query_row(
            "SELECT created_at_millis, path FROM control_db_backups ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

/// Sets the newest segment backed up for a context and kind.
pub fn set_last_segment(conn: &Connection, context: &str, kind: SegmentKind, base: i64) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO segment_backups (context, kind, last_segment, updated_at_millis) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (context, kind) DO UPDATE SET last_segment = ?3, updated_at_millis = ?4",
        params![context, kind.name(), base, now_millis()],
    )?;
    Ok(())
}

/// The newest segment backed up for a context and kind, if any backup took one.
pub fn last_segment(conn: &Connection, context: &str, kind: SegmentKind) -> Result<Option<i64>, DbError> {
    Ok(conn
        .query_row(
            "SELECT last_segment FROM segment_backups WHERE context = ?1 AND kind = ?2",
            params![context, kind.name()],
            |r| r.get(0),
        )
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_db::contexts::tests::open;

    #[test]
    fn pointers_advance() {
        let (_dir, conn) = open();
        assert_eq!(last_control_db_backup(&conn).unwrap(), None);
        record_control_db_backup(&conn, "/b/1.zip").unwrap();
        record_control_db_backup(&conn, "/b/2.zip").unwrap();
        assert_eq!(last_control_db_backup(&conn).unwrap().unwrap().1, "/b/2.zip");
        assert_eq!(last_segment(&conn, "default", SegmentKind::Event).unwrap(), None);
        set_last_segment(&conn, "default", SegmentKind::Event, 100).unwrap();
        set_last_segment(&conn, "default", SegmentKind::Event, 200).unwrap();
        set_last_segment(&conn, "default", SegmentKind::Snapshot, 5).unwrap();
        assert_eq!(last_segment(&conn, "default", SegmentKind::Event).unwrap(), Some(200));
        assert_eq!(last_segment(&conn, "default", SegmentKind::Snapshot).unwrap(), Some(5));
    }
}
