//! The changes `_admin` replicates, and how one is applied to a control DB.
//!
//! [`AdminCommand`] has one variant per change the admin API and the start-up reconciliation
//! make to cluster configuration. [`apply`] is a deterministic function of (DB state, command):
//! every value it writes comes from the command (timestamps are the proposer's), and it reads
//! nothing but the replicated tables. So every member that applies the same entries to the same
//! state ends with the same rows.
//!
//! Two kinds of failure, kept apart:
//! - **Refused** ([`Refusal`]): the state does not allow the change (the context exists, the node
//!   is unknown, a constraint of the schema says no). Nothing of the command is written, the
//!   entry still counts as applied, and the refusal is the proposer's answer. Every member
//!   refuses the same entry, since it depends only on the state and the command.
//! - **Failed** (`DbError`): SQLite could not read or write (I/O, a full disk, corruption). That
//!   is not a property of the entry: the state machine reports it to openraft as a storage
//!   error, which stops this member's group rather than let it skip an entry others applied.

use std::collections::BTreeMap;

use rusqlite::{Connection, ErrorCode};
use serde::{Deserialize, Serialize};

use crate::api::contexts::ADMIN_CONTEXT;
use crate::control_db::DbError;
use crate::control_db::applications::{self, CreateError, NewApplication};
use crate::control_db::contexts::{self, Departure, Member, MemberRole, Node, Seat};

/// A change to cluster configuration, as proposed to `_admin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminCommand {
    /// Records a node, or updates its addresses.
    UpsertNode(Node),
    /// A node joins the cluster (`register-node`): recorded with its `_admin` member id, which
    /// is this entry's log index (unique forever), and made a member of `_admin`. Refused if a
    /// node of that name exists.
    RegisterNode(Node),
    /// A node leaves the cluster (`unregister-node`): it leaves every context it is a member of,
    /// then is forgotten. Refused if it is the last PRIMARY of a context.
    RemoveNode { name: String },
    /// Creates a context with its members (every member node must be known).
    CreateContext {
        name: String,
        meta_data: BTreeMap<String, String>,
        members: Vec<Member>,
        created_at_millis: i64,
        /// The members' ids in the context's group, beside `members`, when they are given (a
        /// context this node's event store already holds is recorded under the id it has);
        /// empty: allocated from the entry's index.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        seats: Vec<u64>,
    },
    /// Deletes a context with its members and the roles granted in it; each member's node then
    /// removes its copy (or sets it aside, with `preserve`).
    DeleteContext {
        name: String,
        #[serde(default)]
        preserve: bool,
    },
    /// Makes a known node a member of a context.
    AddMember {
        context: String,
        node: String,
        role: MemberRole,
    },
    /// Removes a node from a context's members (refused for the last PRIMARY); its node then
    /// removes its copy (or sets it aside, with `preserve`).
    RemoveMember {
        context: String,
        node: String,
        #[serde(default)]
        preserve: bool,
    },
    /// The group of `context` no longer counts member `member_id` (proposed by the group's
    /// leader once it removed the member): the member's node may now remove its copy. Applied
    /// once; again, or for no such departure, it changes nothing.
    ReleaseMember { context: String, member_id: u64 },
    /// Registers an application with its token hash and roles.
    CreateApplication(NewApplication),
    /// Removes an application (its roles go with it).
    DeleteApplication { name: String },
}

impl AdminCommand {
    /// A short name for logs and spans.
    pub fn kind(&self) -> &'static str {
        match self {
            AdminCommand::UpsertNode(_) => "upsert-node",
            AdminCommand::RegisterNode(_) => "register-node",
            AdminCommand::RemoveNode { .. } => "remove-node",
            AdminCommand::CreateContext { .. } => "create-context",
            AdminCommand::DeleteContext { .. } => "delete-context",
            AdminCommand::AddMember { .. } => "add-member",
            AdminCommand::RemoveMember { .. } => "remove-member",
            AdminCommand::ReleaseMember { .. } => "release-member",
            AdminCommand::CreateApplication(_) => "create-application",
            AdminCommand::DeleteApplication { .. } => "delete-application",
        }
    }
}

/// Why the state did not allow a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("{0}: context already exists")]
    ContextExists(String),
    #[error("{0}: context not found")]
    ContextNotFound(String),
    #[error("{0}: no such node")]
    NoSuchNode(String),
    #[error("a node named {0} is already a member of the cluster")]
    NodeExists(String),
    #[error("node {node} is the last PRIMARY of context {context}; add another first")]
    LastPrimary { context: String, node: String },
    #[error("node {node} is a member of {contexts:?}; remove it from them first")]
    NodeInUse { node: String, contexts: Vec<String> },
    #[error("node {node} is already a member of {context}")]
    AlreadyMember { context: String, node: String },
    #[error("node {node} is not a member of {context}")]
    NotAMember { context: String, node: String },
    #[error("an application named {0} exists")]
    ApplicationExists(String),
    #[error("that token is in use by another application")]
    TokenInUse,
    #[error("{0}: no such application")]
    NoSuchApplication(String),
    /// A rule of the schema said no (a check or a reference): still a function of the state.
    #[error("the control DB refused the change: {0}")]
    Constraint(String),
}

/// What applying an entry answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResponse {
    /// The change is in the state (for blank and membership entries: nothing to change).
    Applied,
    /// The state did not allow it; nothing was written.
    Refused(Refusal),
}

impl AdminResponse {
    pub fn into_result(self) -> Result<(), Refusal> {
        match self {
            AdminResponse::Applied => Ok(()),
            AdminResponse::Refused(refusal) => Err(refusal),
        }
    }
}

/// The first member id of the members an entry adds: ids come from the entry's log index, so
/// they are unique forever (an index is never used twice), and readable (entry 12's members
/// are 1201, 1202, ...). At most [`MAX_MEMBERS_PER_ENTRY`] members per entry.
pub fn first_member_id(index: u64) -> u64 {
    index * 100 + 1
}

pub const MAX_MEMBERS_PER_ENTRY: usize = 99;

/// Applies one command, the entry at log `index`, inside the caller's transaction. A refused
/// command leaves nothing behind (it runs in a savepoint that is rolled back); an `Err` is an
/// I/O failure, not a refusal.
pub fn apply(tx: &mut rusqlite::Transaction<'_>, index: u64, command: &AdminCommand) -> Result<AdminResponse, DbError> {
    let savepoint = tx.savepoint()?;
    let outcome = match change(&savepoint, index, command) {
        Ok(outcome) => outcome,
        Err(DbError::Sqlite(e)) if is_constraint(&e) => Err(Refusal::Constraint(e.to_string())),
        Err(e) => return Err(e),
    };
    match outcome {
        Ok(()) => {
            savepoint.commit()?;
            Ok(AdminResponse::Applied)
        }
        Err(refusal) => {
            // Dropping the savepoint rolls back whatever the command wrote before it was refused.
            drop(savepoint);
            Ok(AdminResponse::Refused(refusal))
        }
    }
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
}

/// Removes `node` from `context`, recording its departure; refused for the last PRIMARY.
fn leave(conn: &Connection, context: &str, node: &str, preserve: bool) -> Result<Result<(), Refusal>, DbError> {
    let Some(row) = contexts::context(conn, context)? else {
        return Ok(Err(Refusal::ContextNotFound(context.to_owned())));
    };
    let Some((member, seat)) = row.member(node) else {
        return Ok(Err(Refusal::NotAMember {
            context: context.to_owned(),
            node: node.to_owned(),
        }));
    };
    let primaries = row.members.iter().filter(|m| m.role == MemberRole::Primary).count();
    if member.role == MemberRole::Primary && primaries == 1 {
        return Ok(Err(Refusal::LastPrimary {
            context: context.to_owned(),
            node: node.to_owned(),
        }));
    }
    contexts::remove_member(conn, context, node)?;
    if member.role.stores() {
        contexts::add_departure(
            conn,
            &Departure {
                context: context.to_owned(),
                node: node.to_owned(),
                member_id: seat.id,
                preserve,
                // The group may still need this member's copy for its majority.
                released: false,
            },
        )?;
    }
    Ok(Ok(()))
}

fn change(conn: &Connection, index: u64, command: &AdminCommand) -> Result<Result<(), Refusal>, DbError> {
    Ok(match command {
        AdminCommand::UpsertNode(node) => {
            contexts::upsert_node(conn, node)?;
            Ok(())
        }
        AdminCommand::RegisterNode(node) => {
            if contexts::node_exists(conn, &node.name)? {
                return Ok(Err(Refusal::NodeExists(node.name.clone())));
            }
            contexts::upsert_node(conn, node)?;
            contexts::set_admin_member(conn, &node.name, index)?;
            if contexts::context_exists(conn, ADMIN_CONTEXT)? {
                let member = Member {
                    node: node.name.clone(),
                    role: MemberRole::Primary,
                };
                let seat = Seat {
                    id: index,
                    founding: false,
                };
                contexts::add_member(conn, ADMIN_CONTEXT, &member, seat)?;
            }
            Ok(())
        }
        AdminCommand::RemoveNode { name } => {
            if !contexts::node_exists(conn, name)? {
                return Ok(Err(Refusal::NoSuchNode(name.clone())));
            }
            for context in contexts::contexts_of_node(conn, name)? {
                if let Err(refusal) = leave(conn, &context, name, false)? {
                    return Ok(Err(refusal));
                }
            }
            contexts::remove_node(conn, name)?;
            Ok(())
        }
        AdminCommand::CreateContext {
            name,
            meta_data,
            members,
            created_at_millis,
            seats,
        } => {
            if !seats.is_empty() && seats.len() != members.len() {
                return Ok(Err(Refusal::Constraint("one seat per member".to_owned())));
            }
            if contexts::context_exists(conn, name)? {
                return Ok(Err(Refusal::ContextExists(name.clone())));
            }
            if members.len() > MAX_MEMBERS_PER_ENTRY {
                return Ok(Err(Refusal::Constraint(format!(
                    "at most {MAX_MEMBERS_PER_ENTRY} members at once"
                ))));
            }
            let mut seated = Vec::with_capacity(members.len());
            for (k, member) in members.iter().enumerate() {
                if !contexts::node_exists(conn, &member.node)? {
                    return Ok(Err(Refusal::NoSuchNode(member.node.clone())));
                }
                // `_admin`'s members are the nodes' `_admin` member ids (its group is admin's).
                let id = if let Some(id) = seats.get(k) {
                    *id
                } else if name == ADMIN_CONTEXT {
                    contexts::admin_member(conn, &member.node)?.unwrap_or(super::LOCAL_NODE)
                } else {
                    first_member_id(index) + k as u64
                };
                seated.push((member.clone(), id));
            }
            if contexts::insert_context(conn, name, meta_data, &seated, *created_at_millis)? {
                Ok(())
            } else {
                Err(Refusal::ContextExists(name.clone()))
            }
        }
        AdminCommand::DeleteContext { name, preserve } => {
            let Some(row) = contexts::context(conn, name)? else {
                return Ok(Err(Refusal::ContextNotFound(name.clone())));
            };
            for member in row.members.iter().filter(|m| m.role.stores()) {
                if let Some(seat) = row.seats.get(&member.node) {
                    contexts::add_departure(
                        conn,
                        &Departure {
                            context: name.clone(),
                            node: member.node.clone(),
                            member_id: seat.id,
                            preserve: *preserve,
                            // The whole group goes: no majority to keep.
                            released: true,
                        },
                    )?;
                }
            }
            contexts::delete_context(conn, name)?;
            Ok(())
        }
        AdminCommand::AddMember { context, node, role } => {
            if !contexts::context_exists(conn, context)? {
                Err(Refusal::ContextNotFound(context.clone()))
            } else if !contexts::node_exists(conn, node)? {
                Err(Refusal::NoSuchNode(node.clone()))
            } else if contexts::is_member(conn, context, node)? {
                Err(Refusal::AlreadyMember {
                    context: context.clone(),
                    node: node.clone(),
                })
            } else {
                let member = Member {
                    node: node.clone(),
                    role: *role,
                };
                let seat = Seat {
                    id: first_member_id(index),
                    founding: false,
                };
                contexts::add_member(conn, context, &member, seat)?;
                Ok(())
            }
        }
        AdminCommand::RemoveMember {
            context,
            node,
            preserve,
        } => leave(conn, context, node, *preserve)?,
        AdminCommand::CreateApplication(app) => match applications::create(conn, app) {
            Ok(()) => Ok(()),
            Err(CreateError::Exists(name)) => Err(Refusal::ApplicationExists(name)),
            Err(CreateError::TokenInUse) => Err(Refusal::TokenInUse),
            Err(CreateError::Db(e)) => return Err(e),
        },
        AdminCommand::ReleaseMember { context, member_id } => {
            contexts::release_departure(conn, context, *member_id)?;
            Ok(())
        }
        AdminCommand::DeleteApplication { name } => {
            if applications::delete(conn, name)? {
                Ok(())
            } else {
                Err(Refusal::NoSuchApplication(name.clone()))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_db::contexts::tests::{node, open};

    fn create_context(name: &str, nodes: &[&str]) -> AdminCommand {
        AdminCommand::CreateContext {
            name: name.into(),
            meta_data: BTreeMap::new(),
            members: nodes
                .iter()
                .map(|n| Member {
                    node: (*n).into(),
                    role: MemberRole::Primary,
                })
                .collect(),
            created_at_millis: 42,
            seats: Vec::new(),
        }
    }

    fn run(conn: &mut Connection, command: &AdminCommand) -> AdminResponse {
        run_at(conn, 7, command)
    }

    fn run_at(conn: &mut Connection, index: u64, command: &AdminCommand) -> AdminResponse {
        let mut tx = conn.transaction().unwrap();
        let response = apply(&mut tx, index, command).unwrap();
        tx.commit().unwrap();
        response
    }

    /// Every replicated row, as text, for comparing two DBs.
    fn dump(conn: &Connection) -> String {
        let mut out = String::new();
        for table in crate::raft::snapshot::REPLICATED_TABLES {
            let mut statement = conn.prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2")).unwrap();
            let columns = statement.column_count();
            let mut rows = statement.query([]).unwrap();
            while let Some(row) = rows.next().unwrap() {
                let cells: Vec<String> = (0..columns).map(|i| format!("{:?}", row.get_ref(i).unwrap())).collect();
                out.push_str(&format!("{table}: {}\n", cells.join(", ")));
            }
        }
        out
    }

    fn app(name: &str, token: u8) -> AdminCommand {
        AdminCommand::CreateApplication(NewApplication {
            name: name.into(),
            description: String::new(),
            token_sha256: [token; 32],
            token_prefix: "abcd".into(),
            roles: BTreeMap::from([("orders".to_owned(), vec!["READ_EVENTS".to_owned()])]),
            created_at_millis: 9,
        })
    }

    /// A history with refusals in it: what each command answers.
    fn history() -> Vec<(AdminCommand, AdminResponse)> {
        use AdminResponse::Applied;
        let refused = AdminResponse::Refused;
        vec![
            (
                create_context("orders", &["n1"]),
                refused(Refusal::NoSuchNode("n1".into())),
            ),
            (AdminCommand::UpsertNode(node("n1")), Applied),
            (AdminCommand::UpsertNode(node("n2")), Applied),
            (create_context("orders", &["n1"]), Applied),
            (
                create_context("orders", &["n2"]),
                refused(Refusal::ContextExists("orders".into())),
            ),
            (
                AdminCommand::AddMember {
                    context: "orders".into(),
                    node: "n2".into(),
                    role: MemberRole::PassiveBackup,
                },
                Applied,
            ),
            (
                AdminCommand::AddMember {
                    context: "orders".into(),
                    node: "n2".into(),
                    role: MemberRole::Primary,
                },
                refused(Refusal::AlreadyMember {
                    context: "orders".into(),
                    node: "n2".into(),
                }),
            ),
            (
                AdminCommand::RemoveNode { name: "n1".into() },
                refused(Refusal::LastPrimary {
                    context: "orders".into(),
                    node: "n1".into(),
                }),
            ),
            (AdminCommand::RegisterNode(node("n3")), Applied),
            (
                AdminCommand::RegisterNode(node("n3")),
                refused(Refusal::NodeExists("n3".into())),
            ),
            (AdminCommand::RemoveNode { name: "n3".into() }, Applied),
            (app("billing", 1), Applied),
            (app("billing", 2), refused(Refusal::ApplicationExists("billing".into()))),
            (app("other", 1), refused(Refusal::TokenInUse)),
            (
                AdminCommand::RemoveMember {
                    context: "orders".into(),
                    node: "n2".into(),
                    preserve: true,
                },
                Applied,
            ),
            (AdminCommand::RemoveNode { name: "n2".into() }, Applied),
            (
                AdminCommand::ReleaseMember {
                    context: "orders".into(),
                    member_id: 7,
                },
                Applied,
            ),
            (
                AdminCommand::DeleteApplication { name: "nope".into() },
                refused(Refusal::NoSuchApplication("nope".into())),
            ),
            (
                AdminCommand::DeleteContext {
                    name: "orders".into(),
                    preserve: false,
                },
                Applied,
            ),
            (
                AdminCommand::DeleteContext {
                    name: "orders".into(),
                    preserve: false,
                },
                refused(Refusal::ContextNotFound("orders".into())),
            ),
        ]
    }

    #[test]
    fn refused_commands_are_answers_and_two_dbs_end_equal() {
        let (_a, mut a) = open();
        let (_b, mut b) = open();
        for (index, (command, expected)) in (2..).zip(history()) {
            assert_eq!(run_at(&mut a, index, &command), expected, "{command:?}");
            assert_eq!(run_at(&mut b, index, &command), expected, "{command:?}");
            assert_eq!(dump(&a), dump(&b), "after {command:?}");
        }
        // The grant in the deleted context went with it; the application stayed.
        let apps = crate::control_db::applications::list(&a).unwrap();
        assert_eq!(apps.len(), 1);
        assert!(apps[0].roles.is_empty());
        assert_eq!(dump(&a).lines().filter(|l| l.starts_with("nodes:")).count(), 1);
    }

    #[test]
    fn a_schema_rule_that_says_no_is_a_refusal_and_writes_nothing() {
        let (_dir, mut conn) = open();
        run(&mut conn, &AdminCommand::UpsertNode(node("n1")));
        let before = dump(&conn);
        // A port the schema's CHECK refuses cannot come from a u16; an empty name can.
        let mut bad = node("");
        bad.grpc_port = 1;
        let response = run(&mut conn, &AdminCommand::UpsertNode(bad));
        assert!(
            matches!(response, AdminResponse::Refused(Refusal::Constraint(_))),
            "{response:?}"
        );
        assert_eq!(dump(&conn), before);
        // A context whose second member is unknown leaves no row of the first.
        let response = run(&mut conn, &create_context("c", &["n1", "ghost"]));
        assert_eq!(response, AdminResponse::Refused(Refusal::NoSuchNode("ghost".into())));
        assert_eq!(dump(&conn), before);
    }

    #[test]
    fn a_departed_member_is_released_by_its_group_or_at_once_with_its_context() {
        let (_dir, mut conn) = open();
        for n in ["n1", "n2"] {
            run(&mut conn, &AdminCommand::UpsertNode(node(n)));
        }
        run(&mut conn, &create_context("orders", &["n1", "n2"]));
        run(&mut conn, &create_context("audit", &["n1", "n2"]));
        let remove = AdminCommand::RemoveMember {
            context: "orders".into(),
            node: "n2".into(),
            preserve: false,
        };
        assert_eq!(run(&mut conn, &remove), AdminResponse::Applied);
        let departures = contexts::departures_of(&conn, "n2").unwrap();
        assert_eq!(departures.len(), 1);
        assert!(!departures[0].released, "the group may still need n2's copy");
        assert_eq!(contexts::unreleased_departures(&conn).unwrap(), departures);
        let release = AdminCommand::ReleaseMember {
            context: "orders".into(),
            member_id: departures[0].member_id,
        };
        assert_eq!(run(&mut conn, &release), AdminResponse::Applied);
        assert!(contexts::departures_of(&conn, "n2").unwrap()[0].released);
        // Again, or for a member with no departure: nothing changes.
        let before = dump(&conn);
        assert_eq!(run(&mut conn, &release), AdminResponse::Applied);
        let unknown = AdminCommand::ReleaseMember {
            context: "audit".into(),
            member_id: 999,
        };
        assert_eq!(run(&mut conn, &unknown), AdminResponse::Applied);
        assert_eq!(dump(&conn), before);
        // A deleted context's members are released with it.
        let delete = AdminCommand::DeleteContext {
            name: "audit".into(),
            preserve: false,
        };
        assert_eq!(run(&mut conn, &delete), AdminResponse::Applied);
        assert!(contexts::unreleased_departures(&conn).unwrap().is_empty());
        assert_eq!(contexts::departures_of(&conn, "n1").unwrap().len(), 1);
    }

    #[test]
    fn commands_round_trip_through_json() {
        for (command, response) in history() {
            let text = serde_json::to_string(&command).unwrap();
            assert_eq!(serde_json::from_str::<AdminCommand>(&text).unwrap(), command);
            let text = serde_json::to_string(&response).unwrap();
            assert_eq!(serde_json::from_str::<AdminResponse>(&text).unwrap(), response);
        }
    }
}
