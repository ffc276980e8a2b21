//! Registered applications: their token (as a SHA-256 only) and the roles they hold per context.
//!
//! Cluster configuration, replicated through `_admin`: `create` and `delete` are called only by
//! the `_admin` state machine, inside the transaction that applies an entry.

use std::collections::BTreeMap;

use myelin_proto::roles::Role;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::DbError;

/// An application as listed: never its token, only the first characters for recognition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Application {
    pub name: String,
    pub description: String,
    pub token_prefix: String,
    pub created_at_millis: i64,
    /// Context (or `*`) to the roles held there, both ordered.
    pub roles: BTreeMap<String, Vec<Role>>,
}

/// What access control needs of an application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub name: String,
    pub token_sha256: [u8; 32],
    pub roles: Vec<(String, Vec<Role>)>,
}

/// A new application to store (the payload of its `_admin` entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewApplication {
    pub name: String,
    pub description: String,
    pub token_sha256: [u8; 32],
    pub token_prefix: String,
    /// Context (or `*`) to role names. Names, not `Role`s: a member stores what the proposer
    /// checked, whatever roles its own build knows (`list` skips unknown ones).
    pub roles: BTreeMap<String, Vec<String>>,
    /// Set by the proposer, so every member stores the same time.
    pub created_at_millis: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("an application named {0:?} exists")]
    Exists(String),
    #[error("that token is in use by another application")]
    TokenInUse,
    #[error(transparent)]
    Db(#[from] DbError),
}

fn roles_by_application(conn: &Connection) -> Result<BTreeMap<String, BTreeMap<String, Vec<Role>>>, DbError> {
    let mut statement =
        conn.prepare("SELECT application, context, role FROM application_roles ORDER BY application, context, role")?;
    let rows = statement.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
    })?;
    let mut out: BTreeMap<String, BTreeMap<String, Vec<Role>>> = BTreeMap::new();
    for row in rows {
        let (application, context, role) = row?;
        // Only known role names are stored; one a newer build added is skipped, not fatal.
        match role.parse::<Role>() {
            Ok(role) => out
                .entry(application)
                .or_default()
                .entry(context)
                .or_default()
                .push(role),
            Err(e) => tracing::warn!(application, context, error = %e, "skipping a stored role"),
        }
    }
    Ok(out)
}

pub fn list(conn: &Connection) -> Result<Vec<Application>, DbError> {
    let mut roles = roles_by_application(conn)?;
    let mut statement =
        conn.prepare("SELECT name, description, token_prefix, created_at_millis FROM applications ORDER BY name")?;
    let rows = statement.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (name, description, token_prefix, created_at_millis) = row?;
        let roles = roles.remove(&name).unwrap_or_default();
        out.push(Application {
            name,
            description,
            token_prefix,
            created_at_millis,
            roles,
        });
    }
    Ok(out)
}

pub fn grants(conn: &Connection) -> Result<Vec<Grant>, DbError> {
    let mut roles = roles_by_application(conn)?;
    let mut statement = conn.prepare("SELECT name, token_sha256 FROM applications ORDER BY name")?;
    let rows = statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (name, hash) = row?;
        // The CHECK constraint keeps every hash 32 bytes long.
        let Ok(token_sha256) = <[u8; 32]>::try_from(hash.as_slice()) else {
            continue;
        };
        let roles = roles.remove(&name).unwrap_or_default().into_iter().collect();
        out.push(Grant {
            name,
            token_sha256,
            roles,
        });
    }
    Ok(out)
}

/// Stores a new application with its roles, inside the caller's transaction.
pub fn create(tx: &Connection, app: &NewApplication) -> Result<(), CreateError> {
    let exists = |sql: &str, value: &dyn rusqlite::ToSql| -> Result<bool, DbError> {
        Ok(tx.query_row(sql, [value], |_| Ok(())).optional()?.is_some())
    };
    if exists("SELECT 1 FROM applications WHERE name = ?1", &app.name)? {
        return Err(CreateError::Exists(app.name.clone()));
    }
    if exists(
        "SELECT 1 FROM applications WHERE token_sha256 = ?1",
        &app.token_sha256.as_slice(),
    )? {
        return Err(CreateError::TokenInUse);
    }
    tx.execute(
        "INSERT INTO applications (name, description, token_sha256, token_prefix, created_at_millis)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            app.name,
            app.description,
            app.token_sha256.as_slice(),
            app.token_prefix,
            app.created_at_millis
        ],
    )
    .map_err(DbError::from)?;
    for (context, roles) in &app.roles {
        for role in roles {
            tx.execute(
                "INSERT OR IGNORE INTO application_roles (application, context, role) VALUES (?1, ?2, ?3)",
                params![app.name, context, role],
            )
            .map_err(DbError::from)?;
        }
    }
    Ok(())
}

/// `Ok(false)`: there was no such application.
pub fn delete(conn: &Connection, name: &str) -> Result<bool, DbError> {
    Ok(conn.execute("DELETE FROM applications WHERE name = ?1", [name])? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_db::contexts::tests::open;

    fn app(name: &str, token: u8) -> NewApplication {
        NewApplication {
            name: name.into(),
            description: "d".into(),
            token_sha256: [token; 32],
            token_prefix: "abcd".into(),
            roles: BTreeMap::from([
                (
                    "default".to_owned(),
                    vec![
                        Role::ReadEvents.name().to_owned(),
                        Role::PublishEvents.name().to_owned(),
                    ],
                ),
                ("*".to_owned(), vec![Role::Monitor.name().to_owned()]),
            ]),
            created_at_millis: 5,
        }
    }

    #[test]
    fn create_list_grants_delete() {
        let (_dir, conn) = open();
        create(&conn, &app("billing", 1)).unwrap();
        assert!(matches!(create(&conn, &app("billing", 2)), Err(CreateError::Exists(_))));
        assert!(matches!(create(&conn, &app("other", 1)), Err(CreateError::TokenInUse)));
        let listed = list(&conn).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].token_prefix, "abcd");
        assert_eq!(listed[0].created_at_millis, 5);
        assert_eq!(
            listed[0].roles["default"],
            vec![Role::PublishEvents, Role::ReadEvents],
            "ordered by name"
        );
        let grants = grants(&conn).unwrap();
        assert_eq!(grants[0].token_sha256, [1; 32]);
        assert_eq!(grants[0].roles.len(), 2);
        assert!(delete(&conn, "billing").unwrap());
        assert!(!delete(&conn, "billing").unwrap());
        let roles: i64 = conn
            .query_row("SELECT count(*) FROM application_roles", [], |r| r.get(0))
            .unwrap();
        assert_eq!(roles, 0, "roles go with their application");
    }
}
