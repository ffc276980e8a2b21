//! Nodes, contexts and the role each member node plays in a context.
//!
//! These tables are cluster configuration, replicated through `_admin`: the functions that
//! change them are called only by the `_admin` state machine (`crate::raft::command`), inside
//! the transaction that applies an entry, and they take every value (timestamps included) from
//! the entry so that each member writes the same rows.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::DbError;

/// The role a node plays in a context (Axon's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MemberRole {
    /// Votes, may lead, serves clients.
    Primary,
    /// Stores; must be in every commit; never leads.
    ActiveBackup,
    /// Stores, best effort (a Raft learner).
    PassiveBackup,
    /// No storage: routes commands and queries only.
    MessagingOnly,
}

impl MemberRole {
    pub const ALL: [MemberRole; 4] = [
        MemberRole::Primary,
        MemberRole::ActiveBackup,
        MemberRole::PassiveBackup,
        MemberRole::MessagingOnly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MemberRole::Primary => "PRIMARY",
            MemberRole::ActiveBackup => "ACTIVE_BACKUP",
            MemberRole::PassiveBackup => "PASSIVE_BACKUP",
            MemberRole::MessagingOnly => "MESSAGING_ONLY",
        }
    }

    /// Whether a member in this role keeps the context's events.
    pub fn stores(self) -> bool {
        self != MemberRole::MessagingOnly
    }
}

impl fmt::Display for MemberRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}; a node's role in a context is PRIMARY, ACTIVE_BACKUP, PASSIVE_BACKUP or MESSAGING_ONLY")]
pub struct UnknownMemberRole(pub String);

impl FromStr for MemberRole {
    type Err = UnknownMemberRole;
    fn from_str(s: &str) -> Result<MemberRole, UnknownMemberRole> {
        MemberRole::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| UnknownMemberRole(s.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub host_name: String,
    pub grpc_port: u16,
    pub http_port: u16,
    pub internal_host_name: String,
    pub grpc_internal_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: String,
    pub role: MemberRole,
}

/// A member's place in its context's Raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seat {
    /// The member's id in the group: allocated when the member is added, never reused.
    pub id: u64,
    /// Whether the member was one of the context's first members (they start the group
    /// together); a member added later waits for the group's leader to add it.
    pub founding: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextRow {
    pub name: String,
    pub meta_data: BTreeMap<String, String>,
    pub created_at_millis: i64,
    /// Ordered by node name.
    pub members: Vec<Member>,
    /// Each member's seat, by node name.
    pub seats: BTreeMap<String, Seat>,
}

impl ContextRow {
    /// The member on `node`, with its seat.
    pub fn member(&self, node: &str) -> Option<(&Member, Seat)> {
        let member = self.members.iter().find(|m| m.node == node)?;
        Some((member, *self.seats.get(node)?))
    }

    /// The node holding member `id`.
    pub fn node_of(&self, id: u64) -> Option<&str> {
        self.seats.iter().find(|(_, s)| s.id == id).map(|(n, _)| n.as_str())
    }
}

/// A member that left a context, or whose context was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departure {
    pub context: String,
    pub node: String,
    pub member_id: u64,
    /// Keep the files (set aside) instead of removing them.
    pub preserve: bool,
    /// The context's group no longer counts the member (or the context is gone): its node may
    /// remove its copy. Before that the copy may still be needed for the group's majority.
    pub released: bool,
}

/// The cluster's nodes and its contexts with their members, in one call.
pub fn layout(conn: &Connection) -> Result<(Vec<Node>, Vec<ContextRow>), DbError> {
    Ok((nodes(conn)?, contexts(conn)?))
}

/// Records a node (or updates its addresses).
pub fn upsert_node(conn: &Connection, node: &Node) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO nodes (name, host_name, grpc_port, http_port, internal_host_name, grpc_internal_port)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (name) DO UPDATE SET host_name = ?2, grpc_port = ?3, http_port = ?4,
             internal_host_name = ?5, grpc_internal_port = ?6",
        params![
            node.name,
            node.host_name,
            node.grpc_port,
            node.http_port,
            node.internal_host_name,
            node.grpc_internal_port
        ],
    )?;
    Ok(())
}

pub fn nodes(conn: &Connection) -> Result<Vec<Node>, DbError> {
    let mut statement = conn.prepare(
        "SELECT name, host_name, grpc_port, http_port, internal_host_name, grpc_internal_port
         FROM nodes ORDER BY name",
    )?;
    let rows = statement.query_map([], node_of_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A `nodes` row selected as (name, host_name, grpc_port, http_port, internal_host_name,
/// grpc_internal_port).
fn node_of_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Node> {
    Ok(Node {
        name: r.get(0)?,
        host_name: r.get(1)?,
        grpc_port: r.get(2)?,
        http_port: r.get(3)?,
        internal_host_name: r.get(4)?,
        grpc_internal_port: r.get(5)?,
    })
}

pub fn node(conn: &Connection, name: &str) -> Result<Option<Node>, DbError> {
    Ok(conn
        .query_row(
            "SELECT name, host_name, grpc_port, http_port, internal_host_name, grpc_internal_port
             FROM nodes WHERE name = ?1",
            [name],
            node_of_row,
        )
        .optional()?)
}

pub fn node_exists(conn: &Connection, name: &str) -> Result<bool, DbError> {
    Ok(conn
        .query_row("SELECT 1 FROM nodes WHERE name = ?1", [name], |_| Ok(()))
        .optional()?
        .is_some())
}

/// The contexts a node is a member of, ordered by name.
pub fn contexts_of_node(conn: &Connection, node: &str) -> Result<Vec<String>, DbError> {
    let mut statement = conn.prepare("SELECT context FROM context_members WHERE node = ?1 ORDER BY context")?;
    let rows = statement.query_map([node], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Removes a node that is a member of no context. `Ok(false)`: there was no such node.
pub fn remove_node(conn: &Connection, name: &str) -> Result<bool, DbError> {
    Ok(conn.execute("DELETE FROM nodes WHERE name = ?1", [name])? > 0)
}

type Members = (Vec<Member>, BTreeMap<String, Seat>);

fn members_of(conn: &Connection, context: &str) -> Result<Members, DbError> {
    let mut statement =
        conn.prepare("SELECT node, role, member_id, founding FROM context_members WHERE context = ?1 ORDER BY node")?;
    let rows = statement.query_map([context], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut members = Vec::new();
    let mut seats = BTreeMap::new();
    for row in rows {
        let (node, role, id, founding) = row?;
        // The CHECK constraint admits only known roles.
        let role = role
            .parse()
            .map_err(|e: UnknownMemberRole| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        seats.insert(
            node.clone(),
            Seat {
                id: id as u64,
                founding: founding == 1,
            },
        );
        members.push(Member { node, role });
    }
    Ok((members, seats))
}

fn parse_meta(text: &str) -> BTreeMap<String, String> {
    serde_json::from_str(text).unwrap_or_default()
}

pub fn context(conn: &Connection, name: &str) -> Result<Option<ContextRow>, DbError> {
    let row = conn
        .query_row(
            "SELECT name, meta_data, created_at_millis FROM contexts WHERE name = ?1",
            [name],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)),
        )
        .optional()?;
    let Some((name, meta, created_at_millis)) = row else {
        return Ok(None);
    };
    let (members, seats) = members_of(conn, &name)?;
    Ok(Some(ContextRow {
        name,
        meta_data: parse_meta(&meta),
        created_at_millis,
        members,
        seats,
    }))
}

pub fn contexts(conn: &Connection) -> Result<Vec<ContextRow>, DbError> {
    let names: Vec<String> = {
        let mut statement = conn.prepare("SELECT name FROM contexts ORDER BY name")?;
        statement.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        if let Some(row) = context(conn, &name)? {
            out.push(row);
        }
    }
    Ok(out)
}

/// Inserts a context with its members (each the seat beside it, all founding), inside the
/// caller's transaction (a member on an unknown node fails it: the caller rolls back).
/// `Ok(false)`: it exists already, and nothing changed.
pub fn insert_context(
    conn: &Connection,
    name: &str,
    meta_data: &BTreeMap<String, String>,
    members: &[(Member, u64)],
    created_at_millis: i64,
) -> Result<bool, DbError> {
    let exists = conn
        .query_row("SELECT 1 FROM contexts WHERE name = ?1", [name], |_| Ok(()))
        .optional()?
        .is_some();
    if exists {
        return Ok(false);
    }
    let meta = serde_json::to_string(meta_data).expect("a string map serializes");
    conn.execute(
        "INSERT INTO contexts (name, meta_data, created_at_millis) VALUES (?1, ?2, ?3)",
        params![name, meta, created_at_millis],
    )?;
    for (member, id) in members {
        add_member(
            conn,
            name,
            member,
            Seat {
                id: *id,
                founding: true,
            },
        )?;
    }
    Ok(true)
}

/// Removes a context, its members, the application and user roles granted in it and this node's
/// backup pointers for it, inside the caller's transaction. `Ok(false)`: there was no such
/// context.
pub fn delete_context(conn: &Connection, name: &str) -> Result<bool, DbError> {
    let deleted = conn.execute("DELETE FROM contexts WHERE name = ?1", [name])?;
    // A context created later under the same name must not inherit these grants.
    conn.execute("DELETE FROM application_roles WHERE context = ?1", [name])?;
    conn.execute("DELETE FROM user_roles WHERE context = ?1", [name])?;
    // Node-local bookkeeping, but what it points at is gone.
    conn.execute("DELETE FROM segment_backups WHERE context = ?1", [name])?;
    Ok(deleted > 0)
}

/// Makes a node a member of a context (which must exist, as must the node) in `seat`.
pub fn add_member(conn: &Connection, context: &str, member: &Member, seat: Seat) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO context_members (context, node, role, member_id, founding) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            context,
            member.node,
            member.role.name(),
            seat.id as i64,
            i64::from(seat.founding)
        ],
    )?;
    Ok(())
}

/// Records that a member left its context (or the context went).
pub fn add_departure(conn: &Connection, departure: &Departure) -> Result<(), DbError> {
    conn.execute(
        "INSERT OR REPLACE INTO departures (context, node, member_id, preserve, released) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            departure.context,
            departure.node,
            departure.member_id as i64,
            i64::from(departure.preserve),
            i64::from(departure.released)
        ],
    )?;
    Ok(())
}

/// Marks the departure of `context`'s member `member_id` released; false if there is none
/// waiting.
pub fn release_departure(conn: &Connection, context: &str, member_id: u64) -> Result<bool, DbError> {
    Ok(conn.execute(
        "UPDATE departures SET released = 1 WHERE context = ?1 AND member_id = ?2 AND released = 0",
        params![context, member_id as i64],
    )? > 0)
}

const DEPARTURE_COLUMNS: &str = "SELECT context, node, member_id, preserve, released FROM departures";

fn departure_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Departure> {
    Ok(Departure {
        context: r.get(0)?,
        node: r.get(1)?,
        member_id: r.get::<_, i64>(2)? as u64,
        preserve: r.get::<_, i64>(3)? == 1,
        released: r.get::<_, i64>(4)? == 1,
    })
}

/// The departures of `node`'s members.
pub fn departures_of(conn: &Connection, node: &str) -> Result<Vec<Departure>, DbError> {
    let mut statement = conn.prepare(&format!("{DEPARTURE_COLUMNS} WHERE node = ?1 ORDER BY context"))?;
    let rows = statement.query_map([node], departure_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The departures not released yet, of every node.
pub fn unreleased_departures(conn: &Connection) -> Result<Vec<Departure>, DbError> {
    let mut statement = conn.prepare(&format!("{DEPARTURE_COLUMNS} WHERE released = 0 ORDER BY context"))?;
    let rows = statement.query_map([], departure_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The `_admin` member id a node was given when it registered (none for the node that started
/// the cluster: it is member [`crate::raft::LOCAL_NODE`] of the group it initialised).
pub fn admin_member(conn: &Connection, node: &str) -> Result<Option<u64>, DbError> {
    let id: Option<Option<i64>> = conn
        .query_row("SELECT admin_member FROM nodes WHERE name = ?1", [node], |r| r.get(0))
        .optional()?;
    Ok(id.flatten().map(|id| id as u64))
}

/// Every node with the `_admin` member id it was given when it registered (none for the node
/// that started the cluster).
pub fn admin_members(conn: &Connection) -> Result<Vec<(String, Option<u64>)>, DbError> {
    let mut statement = conn.prepare("SELECT name, admin_member FROM nodes ORDER BY name")?;
    let rows = statement.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?.map(|id| id as u64)))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Records a registered node's `_admin` member id.
pub fn set_admin_member(conn: &Connection, node: &str, id: u64) -> Result<(), DbError> {
    conn.execute(
        "UPDATE nodes SET admin_member = ?2 WHERE name = ?1",
        params![node, id as i64],
    )?;
    Ok(())
}

/// This node's `_admin` member id once it joined a cluster (node-local, never replicated).
pub fn admin_identity(conn: &Connection) -> Result<Option<u64>, DbError> {
    let id: Option<i64> = conn
        .query_row("SELECT member FROM admin_identity WHERE id = 1", [], |r| r.get(0))
        .optional()?;
    Ok(id.map(|id| id as u64))
}

/// `Ok(false)`: the node was no member of the context.
pub fn remove_member(conn: &Connection, context: &str, node: &str) -> Result<bool, DbError> {
    Ok(conn.execute(
        "DELETE FROM context_members WHERE context = ?1 AND node = ?2",
        params![context, node],
    )? > 0)
}

pub fn context_exists(conn: &Connection, name: &str) -> Result<bool, DbError> {
    Ok(conn
        .query_row("SELECT 1 FROM contexts WHERE name = ?1", [name], |_| Ok(()))
        .optional()?
        .is_some())
}

pub fn is_member(conn: &Connection, context: &str, node: &str) -> Result<bool, DbError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM context_members WHERE context = ?1 AND node = ?2",
            params![context, node],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::control_db::schema;

    pub(crate) fn open() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite3");
        let mut conn = crate::control_db::connect(&path).unwrap();
        schema::migrate(&mut conn, &path, schema::MIGRATIONS).unwrap();
        (dir, conn)
    }

    pub(crate) fn node(name: &str) -> Node {
        Node {
            name: name.into(),
            host_name: "h".into(),
            grpc_port: 8124,
            http_port: 8024,
            internal_host_name: "ih".into(),
            grpc_internal_port: 8224,
        }
    }

    #[test]
    fn contexts_with_members_round_trip() {
        let (_dir, mut conn) = open();
        upsert_node(&conn, &node("n1")).unwrap();
        let mut moved = node("n1");
        moved.grpc_port = 9000;
        upsert_node(&conn, &moved).unwrap();
        assert_eq!(nodes(&conn).unwrap(), vec![moved]);
        assert!(node_exists(&conn, "n1").unwrap());
        assert!(!node_exists(&conn, "n2").unwrap());

        let meta = BTreeMap::from([("k".to_owned(), "v".to_owned())]);
        let members = vec![Member {
            node: "n1".into(),
            role: MemberRole::Primary,
        }];
        let seated: Vec<(Member, u64)> = members.iter().map(|m| (m.clone(), 701)).collect();
        assert!(insert_context(&conn, "orders", &meta, &seated, 7).unwrap());
        assert!(!insert_context(&conn, "orders", &BTreeMap::new(), &[], 8).unwrap());
        let row = context(&conn, "orders").unwrap().unwrap();
        assert_eq!(
            row.member("n1").map(|(_, seat)| seat),
            Some(Seat {
                id: 701,
                founding: true
            })
        );
        assert_eq!(row.node_of(701), Some("n1"));
        assert_eq!((row.meta_data, row.members, row.created_at_millis), (meta, members, 7));
        assert_eq!(contexts(&conn).unwrap().len(), 1);
        assert_eq!(contexts_of_node(&conn, "n1").unwrap(), vec!["orders".to_owned()]);
        assert!(is_member(&conn, "orders", "n1").unwrap());

        // A member on an unknown node fails the insert; the caller's transaction takes it back.
        let bad = vec![(
            Member {
                node: "ghost".into(),
                role: MemberRole::Primary,
            },
            1,
        )];
        {
            let tx = conn.transaction().unwrap();
            assert!(insert_context(&tx, "other", &BTreeMap::new(), &bad, 1).is_err());
        }
        assert!(context(&conn, "other").unwrap().is_none());

        // A node with members cannot go.
        assert!(remove_node(&conn, "n1").is_err());
        assert!(remove_member(&conn, "orders", "n1").unwrap());
        assert!(!remove_member(&conn, "orders", "n1").unwrap());
        add_member(
            &conn,
            "orders",
            &Member {
                node: "n1".into(),
                role: MemberRole::Primary,
            },
            Seat {
                id: 901,
                founding: false,
            },
        )
        .unwrap();

        assert!(delete_context(&conn, "orders").unwrap());
        assert!(!delete_context(&conn, "orders").unwrap());
        assert!(contexts(&conn).unwrap().is_empty());
        assert!(remove_node(&conn, "n1").unwrap());
        assert!(!remove_node(&conn, "n1").unwrap());
    }

    #[test]
    fn member_roles_parse() {
        for role in MemberRole::ALL {
            assert_eq!(role.name().parse::<MemberRole>().unwrap(), role);
        }
        assert!("primary".parse::<MemberRole>().is_err());
        assert!(!MemberRole::MessagingOnly.stores());
    }
}
