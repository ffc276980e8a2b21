//! The control DB's schema as a list of migrations, applied in order.
//!
//! `PRAGMA user_version` is the number of migrations a file has had. Each migration runs in one
//! transaction that also sets the new version, so a crash leaves the file at a whole version.
//! Migrations are append-only: once released, a migration's SQL never changes; a change to the
//! schema is a new migration at the end of the list.
//!
//! Tables are `STRICT` (values must have the declared type) with `CHECK`s for what a row must
//! satisfy, so a bug upstream cannot store a row the rest of the code would misread.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::DbError;

/// One schema step.
pub struct Migration {
    pub description: &'static str,
    pub sql: &'static str,
}

/// Every migration, oldest first; the schema version is the length of this list.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        description: "nodes, contexts and their members",
        sql: "
            CREATE TABLE nodes (
                name TEXT PRIMARY KEY NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
                host_name TEXT NOT NULL CHECK (length(host_name) BETWEEN 1 AND 255),
                grpc_port INTEGER NOT NULL CHECK (grpc_port BETWEEN 0 AND 65535),
                http_port INTEGER NOT NULL CHECK (http_port BETWEEN 0 AND 65535),
                internal_host_name TEXT NOT NULL CHECK (length(internal_host_name) BETWEEN 1 AND 255),
                grpc_internal_port INTEGER NOT NULL CHECK (grpc_internal_port BETWEEN 0 AND 65535)
            ) STRICT;
            CREATE TABLE contexts (
                name TEXT PRIMARY KEY NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
                meta_data TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(meta_data)),
                created_at_millis INTEGER NOT NULL
            ) STRICT;
            CREATE TABLE context_members (
                context TEXT NOT NULL REFERENCES contexts (name) ON DELETE CASCADE,
                node TEXT NOT NULL REFERENCES nodes (name) ON DELETE RESTRICT,
                role TEXT NOT NULL
                    CHECK (role IN ('PRIMARY', 'ACTIVE_BACKUP', 'PASSIVE_BACKUP', 'MESSAGING_ONLY')),
                PRIMARY KEY (context, node)
            ) STRICT;
        ",
    },
    Migration {
        description: "applications, their roles per context, users",
        sql: "
            CREATE TABLE applications (
                name TEXT PRIMARY KEY NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
                description TEXT NOT NULL DEFAULT '' CHECK (length(description) <= 1024),
                token_sha256 BLOB NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
                token_prefix TEXT NOT NULL CHECK (length(token_prefix) <= 16),
                created_at_millis INTEGER NOT NULL
            ) STRICT;
            CREATE TABLE application_roles (
                application TEXT NOT NULL REFERENCES applications (name) ON DELETE CASCADE,
                -- A context name, or '*' for every context.
                context TEXT NOT NULL CHECK (length(context) BETWEEN 1 AND 64),
                role TEXT NOT NULL CHECK (length(role) BETWEEN 1 AND 64),
                PRIMARY KEY (application, context, role)
            ) STRICT;
            CREATE TABLE users (
                name TEXT PRIMARY KEY NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
                -- A PHC string from a password KDF; NULL: the user cannot log in.
                password_hash TEXT,
                enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1))
            ) STRICT;
            CREATE TABLE user_roles (
                user TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
                context TEXT NOT NULL CHECK (length(context) BETWEEN 1 AND 64),
                role TEXT NOT NULL CHECK (length(role) BETWEEN 1 AND 64),
                PRIMARY KEY (user, context, role)
            ) STRICT;
        ",
    },
    Migration {
        description: "backup pointers",
        sql: "
            CREATE TABLE control_db_backups (
                id INTEGER PRIMARY KEY,
                path TEXT NOT NULL,
                created_at_millis INTEGER NOT NULL
            ) STRICT;
            CREATE TABLE segment_backups (
                context TEXT NOT NULL CHECK (length(context) BETWEEN 1 AND 64),
                kind TEXT NOT NULL CHECK (kind IN ('EVENT', 'SNAPSHOT', 'LOG')),
                -- Base token (or first log index) of the newest segment backed up.
                last_segment INTEGER NOT NULL,
                updated_at_millis INTEGER NOT NULL,
                PRIMARY KEY (context, kind)
            ) STRICT;
        ",
    },
    Migration {
        description: "the _admin Raft log, its pointers and its snapshot",
        // The rows a file already holds stay as they are: they are the `_admin` state before
        // its first entry (see `crate::raft`). Values are openraft's types as JSON.
        sql: "
            CREATE TABLE raft_log (
                log_index INTEGER PRIMARY KEY NOT NULL CHECK (log_index >= 0),
                entry TEXT NOT NULL CHECK (json_valid(entry))
            ) STRICT;
            -- vote, committed and purged belong to the log; applied and membership to the state
            -- machine, written in the transaction that applies the entry they name.
            CREATE TABLE raft_state (
                name TEXT PRIMARY KEY NOT NULL
                    CHECK (name IN ('vote', 'committed', 'purged', 'applied', 'membership')),
                value TEXT NOT NULL CHECK (json_valid(value))
            ) STRICT;
            CREATE TABLE raft_snapshot (
                id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
                meta TEXT NOT NULL CHECK (json_valid(meta)),
                data BLOB NOT NULL
            ) STRICT;
        ",
    },
    Migration {
        description: "placement: member ids, departures, this node's _admin identity",
        // Before this migration every context had one member, this node, as member 1 of its
        // group (the id a standalone eventstore gives itself).
        sql: "
            ALTER TABLE nodes ADD COLUMN admin_member INTEGER CHECK (admin_member IS NULL OR admin_member > 0);
            ALTER TABLE context_members ADD COLUMN member_id INTEGER NOT NULL DEFAULT 1 CHECK (member_id > 0);
            ALTER TABLE context_members ADD COLUMN founding INTEGER NOT NULL DEFAULT 1 CHECK (founding IN (0, 1));
            CREATE UNIQUE INDEX context_member_ids ON context_members (context, member_id);
            -- Members that left a context (or whose context was deleted): the node that held one
            -- removes (or, with preserve, sets aside) its copy when it sees its own row here.
            CREATE TABLE departures (
                context TEXT NOT NULL CHECK (length(context) BETWEEN 1 AND 64),
                node TEXT NOT NULL CHECK (length(node) BETWEEN 1 AND 255),
                member_id INTEGER NOT NULL CHECK (member_id > 0),
                preserve INTEGER NOT NULL CHECK (preserve IN (0, 1)),
                PRIMARY KEY (context, node, member_id)
            ) STRICT;
            -- Node-local: this node's member id in _admin once it joined a cluster (absent: a
            -- standalone node, member 1 of its own one-node group).
            CREATE TABLE admin_identity (
                id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
                member INTEGER NOT NULL CHECK (member > 1),
                joined_at_millis INTEGER NOT NULL
            ) STRICT;
        ",
    },
    Migration {
        description: "a departed member keeps its copy until its context's group let it go",
        // Released: the context's group no longer counts the member (or the context is gone),
        // so its node may remove its copy. Rows from before this migration were acted on at
        // once, as then.
        sql: "
            ALTER TABLE departures ADD COLUMN released INTEGER NOT NULL DEFAULT 1 CHECK (released IN (0, 1));
        ",
    },
];

/// The schema version this build writes.
pub fn latest() -> i64 {
    MIGRATIONS.len() as i64
}

pub fn version(conn: &Connection) -> Result<i64, DbError> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

/// Brings the file to the last of `migrations`, one transaction per step.
pub fn migrate(conn: &mut Connection, path: &Path, migrations: &[Migration]) -> Result<(), DbError> {
    let found = version(conn)?;
    let supported = migrations.len() as i64;
    if found > supported {
        return Err(DbError::TooNew {
            path: path.to_owned(),
            found,
            supported,
        });
    }
    for (number, migration) in migrations.iter().enumerate().skip(found as usize) {
        let target = number as i64 + 1;
        // IMMEDIATE: take the write lock first, so two processes never migrate at once.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process may have migrated meanwhile.
        if version(&tx)? >= target {
            continue;
        }
        tx.execute_batch(migration.sql)?;
        tx.pragma_update(None, "user_version", target)?;
        tx.commit()?;
        tracing::info!(path = %path.display(), version = target, migration.description, "control DB migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_db::{ControlDb, connect};

    #[tokio::test]
    async fn an_old_file_is_migrated_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sqlite3");
        {
            // A file as the first release wrote it.
            let mut conn = connect(&path).unwrap();
            migrate(&mut conn, &path, &MIGRATIONS[..1]).unwrap();
            assert_eq!(version(&conn).unwrap(), 1);
            conn.execute_batch(
                "INSERT INTO nodes (name, host_name, grpc_port, http_port, internal_host_name, grpc_internal_port) VALUES ('n1', 'h', 8124, 8024, 'h', 8224);
                 INSERT INTO contexts (name, created_at_millis) VALUES ('orders', 1);
                 INSERT INTO context_members (context, node, role) VALUES ('orders', 'n1', 'PRIMARY');",
            )
            .unwrap();
        }
        let db = ControlDb::open(&path).unwrap();
        let (v, members, apps) = db
            .call(|conn| {
                let members: i64 = conn.query_row("SELECT count(*) FROM context_members", [], |r| r.get(0))?;
                let apps: i64 = conn.query_row("SELECT count(*) FROM applications", [], |r| r.get(0))?;
                Ok((version(conn)?, members, apps))
            })
            .await
            .unwrap();
        assert_eq!(v, latest());
        assert_eq!((members, apps), (1, 0));
    }

    #[test]
    fn a_newer_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sqlite3");
        {
            let conn = connect(&path).unwrap();
            conn.pragma_update(None, "user_version", latest() + 1).unwrap();
        }
        let err = ControlDb::open(&path).err().unwrap();
        assert!(
            matches!(err, DbError::TooNew { found, .. } if found == latest() + 1),
            "{err}"
        );
    }

    #[test]
    fn a_failing_migration_leaves_the_previous_version_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sqlite3");
        let mut conn = connect(&path).unwrap();
        let broken = [
            Migration {
                description: "fine",
                sql: "CREATE TABLE a (x INTEGER) STRICT;",
            },
            Migration {
                description: "half good, then broken",
                sql: "CREATE TABLE b (x INTEGER) STRICT; CREATE TABLE a (x INTEGER);",
            },
        ];
        assert!(migrate(&mut conn, &path, &broken).is_err());
        assert_eq!(version(&conn).unwrap(), 1);
        let b: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'b'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(b, 0, "nothing of the failed step stays");
    }

    #[test]
    fn constraints_hold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sqlite3");
        let mut conn = connect(&path).unwrap();
        migrate(&mut conn, &path, MIGRATIONS).unwrap();
        conn.execute_batch(
            "INSERT INTO nodes (name, host_name, grpc_port, http_port, internal_host_name, grpc_internal_port) VALUES ('n1', 'h', 8124, 8024, 'h', 8224);
             INSERT INTO contexts (name, created_at_millis) VALUES ('c', 1);",
        )
        .unwrap();
        let bad = [
            // unknown member role
            "INSERT INTO context_members (context, node, role) VALUES ('c', 'n1', 'LEADER')",
            // member of a context that does not exist
            "INSERT INTO context_members (context, node, role) VALUES ('nope', 'n1', 'PRIMARY')",
            // member on a node that does not exist
            "INSERT INTO context_members (context, node, role) VALUES ('c', 'n2', 'PRIMARY')",
            // port out of range, and a text where a number belongs (STRICT)
            "INSERT INTO nodes (name, host_name, grpc_port, http_port, internal_host_name, grpc_internal_port) VALUES ('n3', 'h', 70000, 8024, 'h', 8224)",
            "INSERT INTO nodes (name, host_name, grpc_port, http_port, internal_host_name, grpc_internal_port) VALUES ('n3', 'h', 'x', 8024, 'h', 8224)",
            // token hash of the wrong length
            "INSERT INTO applications (name, token_sha256, token_prefix, created_at_millis) VALUES ('a', x'00', 'p', 1)",
            // invalid JSON metadata
            "INSERT INTO contexts (name, meta_data, created_at_millis) VALUES ('d', '{', 1)",
            // empty name
            "INSERT INTO contexts (name, created_at_millis) VALUES ('', 1)",
        ];
        for sql in bad {
            assert!(conn.execute(sql, []).is_err(), "accepted: {sql}");
        }
        // A node with members cannot go; deleting a context takes its members with it.
        conn.execute(
            "INSERT INTO context_members (context, node, role) VALUES ('c', 'n1', 'PRIMARY')",
            [],
        )
        .unwrap();
        assert!(conn.execute("DELETE FROM nodes WHERE name = 'n1'", []).is_err());
        conn.execute("DELETE FROM contexts WHERE name = 'c'", []).unwrap();
        let members: i64 = conn
            .query_row("SELECT count(*) FROM context_members", [], |r| r.get(0))
            .unwrap();
        assert_eq!(members, 0);
    }
}
