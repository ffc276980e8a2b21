//! The `_admin` snapshot: every row of the replicated tables, as one JSON value.
//!
//! Which tables are cluster configuration is decided here, in [`REPLICATED_TABLES`]: nodes,
//! contexts and their members, applications and their roles, users and their roles. Everything
//! else in the control DB is this node's own bookkeeping and is never replicated nor replaced by
//! a snapshot: the backup pointers (`control_db_backups`, `segment_backups`: what this node's
//! backups copied) and the Raft tables themselves.
//!
//! A snapshot is read in one read transaction, so it is the state after exactly the entry it
//! names. Installing one replaces the replicated tables' rows inside the caller's transaction
//! (the one that also records the snapshot's last entry as applied). Column names travel with
//! the rows and are checked against this build's schema: a snapshot from a build with another
//! schema is refused whole instead of stored in part. The control DB is small (kilobytes to a
//! few megabytes), so a snapshot in memory is fine.

use std::collections::BTreeMap;

use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, params_from_iter};
use serde::{Deserialize, Serialize};

use crate::control_db::DbError;

/// The replicated tables, parents before the tables that reference them.
pub const REPLICATED_TABLES: [&str; 8] = [
    "nodes",
    "contexts",
    "context_members",
    "departures",
    "applications",
    "application_roles",
    "users",
    "user_roles",
];

/// Version of the snapshot's layout.
const FORMAT: u32 = 1;

/// One SQLite value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Cell {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Table {
    columns: Vec<String>,
    rows: Vec<Vec<Cell>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Dump {
    format: u32,
    tables: BTreeMap<String, Table>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the snapshot does not decode: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the snapshot has format {0}; this build reads format {FORMAT}")]
    Format(u32),
    #[error("the snapshot holds table {0:?}, which is not replicated here")]
    UnknownTable(String),
    #[error("the snapshot's table {table} has column {column:?}, which this build's schema lacks")]
    UnknownColumn { table: String, column: String },
    #[error("a row of {0} has the wrong number of values")]
    RowShape(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<rusqlite::Error> for SnapshotError {
    fn from(e: rusqlite::Error) -> SnapshotError {
        SnapshotError::Db(e.into())
    }
}

/// The replicated rows as bytes. Run it inside a transaction, so the rows are of one moment.
pub fn dump(conn: &Connection) -> Result<Vec<u8>, DbError> {
    let mut tables = BTreeMap::new();
    for table in REPLICATED_TABLES {
        let mut statement = conn.prepare(&format!("SELECT * FROM \"{table}\" ORDER BY rowid"))?;
        let columns: Vec<String> = statement.column_names().map(str::to_owned).collect();
        let width = columns.len();
        let mut rows = Vec::new();
        let mut cursor = statement.query([])?;
        while let Some(row) = cursor.next()? {
            let mut cells = Vec::with_capacity(width);
            for i in 0..width {
                cells.push(match row.get_ref(i)? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(v) => Cell::Integer(v),
                    ValueRef::Real(v) => Cell::Real(v),
                    ValueRef::Text(v) => Cell::Text(String::from_utf8_lossy(v).into_owned()),
                    ValueRef::Blob(v) => Cell::Blob(v.to_vec()),
                });
            }
            rows.push(cells);
        }
        tables.insert(table.to_owned(), Table { columns, rows });
    }
    let dump = Dump { format: FORMAT, tables };
    Ok(serde_json::to_vec(&dump).expect("a dump serializes"))
}

fn columns_of(conn: &Connection, table: &str) -> Result<Vec<String>, DbError> {
    let mut statement = conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
    let names = statement.query_map([], |r| r.get(0))?;
    Ok(names.collect::<Result<_, _>>()?)
}

/// Replaces every replicated row with the snapshot's, inside the caller's transaction. The
/// snapshot is checked whole before anything is deleted.
pub fn restore(conn: &Connection, data: &[u8]) -> Result<(), SnapshotError> {
    let dump: Dump = serde_json::from_slice(data)?;
    if dump.format != FORMAT {
        return Err(SnapshotError::Format(dump.format));
    }
    for (name, table) in &dump.tables {
        if !REPLICATED_TABLES.contains(&name.as_str()) {
            return Err(SnapshotError::UnknownTable(name.clone()));
        }
        let known = columns_of(conn, name)?;
        if let Some(column) = table.columns.iter().find(|c| !known.contains(c)) {
            return Err(SnapshotError::UnknownColumn {
                table: name.clone(),
                column: column.clone(),
            });
        }
        if table.rows.iter().any(|row| row.len() != table.columns.len()) {
            return Err(SnapshotError::RowShape(name.clone()));
        }
    }
    // Children first, so no reference is left dangling on the way.
    for table in REPLICATED_TABLES.iter().rev() {
        conn.execute(&format!("DELETE FROM \"{table}\""), [])?;
    }
    for table in REPLICATED_TABLES {
        let Some(Table { columns, rows }) = dump.tables.get(table) else {
            continue;
        };
        if columns.is_empty() {
            continue;
        }
        // Column names were checked against the schema above.
        let names: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
        let marks: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
        let mut insert = conn.prepare(&format!(
            "INSERT INTO \"{table}\" ({}) VALUES ({})",
            names.join(", "),
            marks.join(", ")
        ))?;
        for row in rows {
            insert.execute(params_from_iter(row.iter().map(|cell| match cell {
                Cell::Null => Value::Null,
                Cell::Integer(v) => Value::Integer(*v),
                Cell::Real(v) => Value::Real(*v),
                Cell::Text(v) => Value::Text(v.clone()),
                Cell::Blob(v) => Value::Blob(v.clone()),
            })))?;
        }
    }
    // Backup pointers of contexts that no longer exist point at nothing.
    conn.execute(
        "DELETE FROM segment_backups WHERE context NOT IN (SELECT name FROM contexts)",
        [],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_db::contexts::tests::open;

    fn fill(conn: &Connection) {
        conn.execute_batch(
            "INSERT INTO nodes (name, host_name, grpc_port, http_port, internal_host_name, grpc_internal_port) VALUES ('n1', 'h', 8124, 8024, 'h', 8224);
             INSERT INTO nodes (name, host_name, grpc_port, http_port, internal_host_name, grpc_internal_port) VALUES ('n2', 'h2', 8125, 8025, 'h2', 8225);
             INSERT INTO contexts (name, meta_data, created_at_millis) VALUES ('orders', '{\"k\":\"v\"}', 3);
             INSERT INTO context_members (context, node, role) VALUES ('orders', 'n1', 'PRIMARY');
             INSERT INTO applications VALUES ('app', 'd', zeroblob(32), 'pre', 4);
             INSERT INTO application_roles VALUES ('app', 'orders', 'READ_EVENTS');
             INSERT INTO users VALUES ('u', NULL, 1);
             INSERT INTO user_roles VALUES ('u', '*', 'ADMIN');",
        )
        .unwrap();
    }

    #[test]
    fn a_dump_restores_to_the_same_rows_and_leaves_local_tables_alone() {
        let (_a, a) = open();
        fill(&a);
        let data = dump(&a).unwrap();

        let (_b, mut b) = open();
        b.execute_batch(
            "INSERT INTO nodes (name, host_name, grpc_port, http_port, internal_host_name, grpc_internal_port) VALUES ('stale', 'x', 1, 2, 'x', 3);
             INSERT INTO contexts (name, created_at_millis) VALUES ('gone', 1);
             INSERT INTO context_members (context, node, role) VALUES ('gone', 'stale', 'PRIMARY');
             INSERT INTO segment_backups VALUES ('gone', 'EVENT', 10, 1);
             INSERT INTO segment_backups VALUES ('orders', 'EVENT', 20, 1);
             INSERT INTO control_db_backups (path, created_at_millis) VALUES ('/b.zip', 1);",
        )
        .unwrap();
        let tx = b.transaction().unwrap();
        restore(&tx, &data).unwrap();
        tx.commit().unwrap();
        assert_eq!(dump(&b).unwrap(), data, "the same rows, byte for byte");
        let pointers: Vec<String> = b
            .prepare("SELECT context FROM segment_backups")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(pointers, vec!["orders".to_owned()], "pointers of a vanished context go");
        let backups: i64 = b
            .query_row("SELECT count(*) FROM control_db_backups", [], |r| r.get(0))
            .unwrap();
        assert_eq!(backups, 1, "node-local rows stay");
    }

    #[test]
    fn a_snapshot_this_schema_cannot_hold_is_refused_before_anything_changes() {
        let (_a, a) = open();
        fill(&a);
        let mut value: serde_json::Value = serde_json::from_slice(&dump(&a).unwrap()).unwrap();
        value["tables"]["nodes"]["columns"][1] = "colour".into();
        let bad = serde_json::to_vec(&value).unwrap();
        let (_b, mut b) = open();
        fill(&b);
        let before = dump(&b).unwrap();
        let tx = b.transaction().unwrap();
        let err = restore(&tx, &bad).unwrap_err();
        assert!(matches!(err, SnapshotError::UnknownColumn { .. }), "{err}");
        drop(tx);
        assert_eq!(dump(&b).unwrap(), before);

        let mut value: serde_json::Value = serde_json::from_slice(&dump(&a).unwrap()).unwrap();
        value["tables"]["raft_log"] = value["tables"]["nodes"].clone();
        let tx = b.transaction().unwrap();
        let err = restore(&tx, &serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert!(matches!(err, SnapshotError::UnknownTable(_)), "{err}");
        let tx2 = tx;
        assert!(matches!(restore(&tx2, b"{").unwrap_err(), SnapshotError::Decode(_)));
    }
}
