//! The event store's contexts follow the configuration.
//!
//! What the configuration says (`_admin`): which nodes are members of a context, in which role,
//! and each member's seat (its id in the context's group, never reused). What this module does,
//! on every node, after every applied change and every [`PERIOD`]:
//! - a context this node is a storing member of, and its event store lacks: joined, as the
//!   member its seat names: a founding member starts the group with the other founding
//!   PRIMARYs (each is given the same list), a member added later waits for the leader to add it;
//! - a context whose group this node's event store leads: the group's members are brought in line
//!   with the configured ones, one change at a time (a new member is added as a learner and made
//!   a voter once it caught up, a departed one removed);
//! - a member of this node that departed (removed from the context, or the context deleted):
//!   its copy is removed, or set aside under `.preserved/` when the departure says so, once the
//!   departure is released. Only a copy held under the departed member's id is touched: a copy
//!   this node holds under another id (it was added again since) is the new member's.
//! - a departure is released by the leader of the context's group once the group no longer
//!   counts the member (`ReleaseMember`; a deleted context's departures are released at once).
//!   Until then the member keeps its copy and keeps voting: the group may need it for its
//!   majority (removing n2 from {n1, n2} while adding n3 needs n2 until n3 is a voter), and
//!   openraft does not tell a removed member that it was removed.
//!
//! Each action is idempotent, and a failed one is retried on the next round; nothing here decides
//! configuration, it only carries it out. An API handler that changed a context runs one round
//! itself ([`converge`]) so that its answer reflects this node's event store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use myelin_proto::internal::{
    AddMemberRequest, DeleteContextRequest, GroupMember, GroupStatus, GroupStatusRequest, JoinContextRequest,
    ListContextsRequest, RemoveMemberRequest,
};

use crate::api::AppState;
use crate::api::contexts::ADMIN_CONTEXT;
use crate::control_db::contexts::{self as db, ContextRow, Departure, MemberRole};

/// How often the contexts are checked even when nothing changed.
const PERIOD: Duration = Duration::from_secs(2);
/// How long a membership change on a context's group may take (adding a member waits until it
/// caught up).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(300);

/// Membership changes under way, by context: at most one each, run beside the rounds.
#[derive(Clone, Default)]
pub struct Changing(Arc<Mutex<BTreeSet<String>>>);

/// Runs rounds until the process ends.
pub fn follow_configuration(state: AppState, changing: Changing) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let what = "bringing the event store's contexts in line with the configuration";
        super::each_change(&state, PERIOD, what, || async {
            round(&state, &changing, None).await.map(|()| true)
        })
        .await;
    })
}

/// One round for `context` only (an API handler's own change), without membership changes of
/// groups (those run in the background rounds).
pub async fn converge(state: &AppState, context: &str) -> Result<(), String> {
    round(state, &Changing::default(), Some(context)).await
}

/// This node's copies as its event store holds them: context -> (member id, group status).
async fn local_copies(state: &AppState) -> Result<BTreeMap<String, GroupStatus>, String> {
    let mut storage = state.storage.clone();
    let names: Vec<String> = storage
        .list_contexts(ListContextsRequest {})
        .await
        .map_err(|s| format!("the event store: {}", s.message()))?
        .into_inner()
        .contexts
        .into_iter()
        .map(|c| c.name)
        .collect();
    let mut copies = BTreeMap::new();
    for name in names {
        match storage
            .get_group_status(GroupStatusRequest { context: name.clone() })
            .await
        {
            Ok(status) => {
                copies.insert(name, status.into_inner());
            }
            // Deleted meanwhile.
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => return Err(format!("the group of {name}: {}", status.message())),
        }
    }
    Ok(copies)
}

async fn round(state: &AppState, changing: &Changing, only: Option<&str>) -> Result<(), String> {
    let me = state.node.name.clone();
    let owned = me.clone();
    let (configured, departures, unreleased) = state
        .db
        .call(move |conn| {
            Ok((
                db::contexts(conn)?,
                db::departures_of(conn, &owned)?,
                db::unreleased_departures(conn)?,
            ))
        })
        .await
        .map_err(|e| e.to_string())?;
    let copies = local_copies(state).await?;
    let mut errors = Vec::new();
    for row in configured.iter().filter(|c| c.name != ADMIN_CONTEXT) {
        if only.is_some_and(|o| o != row.name) {
            continue;
        }
        let copy = copies.get(&row.name);
        match (row.member(&me), copy) {
            (Some((member, seat)), None) if member.role.stores() => {
                if let Err(e) = join(state, row, seat.id, seat.founding).await {
                    errors.push(e);
                }
            }
            (Some((_, seat)), Some(group)) if group.member_id != seat.id => errors.push(format!(
                "this node holds {} as member {} of its group, but is configured as member {}",
                row.name, group.member_id, seat.id
            )),
            _ => {}
        }
        // The group's leader brings its members in line, also when it is itself the member
        // that departed (it leads until it has removed itself; a new leader releases it).
        if let Some(group) = copy
            && only.is_none()
            && group.leader == Some(group.member_id)
        {
            lead_membership(state, changing, row, group);
            if let Err(e) = release(state, row, group, &unreleased).await {
                errors.push(e);
            }
        }
    }
    for departure in &departures {
        if only.is_some_and(|o| o != departure.context) {
            continue;
        }
        let held_as_departed = copies
            .get(&departure.context)
            .is_some_and(|g| g.member_id == departure.member_id);
        if !departure.released {
            continue;
        }
        if held_as_departed && let Err(e) = leave(state, departure).await {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

async fn join(state: &AppState, row: &ContextRow, id: u64, founding: bool) -> Result<(), String> {
    let initial_members = if founding {
        row.members
            .iter()
            .filter(|m| m.role == MemberRole::Primary)
            .filter_map(|m| {
                let seat = row.seats.get(&m.node)?;
                seat.founding.then(|| GroupMember {
                    id: seat.id,
                    node: m.node.clone(),
                    voter: true,
                    matched_index: None,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut request = tonic::Request::new(JoinContextRequest {
        name: row.name.clone(),
        member_id: id,
        initial_members,
    });
    request.set_timeout(Duration::from_secs(60));
    state
        .storage
        .clone()
        .join_context(request)
        .await
        .map_err(|s| format!("joining {} as member {id}: {}", row.name, s.message()))?;
    tracing::info!(context = %row.name, member = id, founding, "context joined");
    Ok(())
}

async fn leave(state: &AppState, departure: &Departure) -> Result<(), String> {
    state
        .storage
        .clone()
        .delete_context(DeleteContextRequest {
            name: departure.context.clone(),
            preserve_files: departure.preserve,
        })
        .await
        .map_err(|s| format!("removing this node's copy of {}: {}", departure.context, s.message()))?;
    tracing::info!(
        context = %departure.context,
        member = departure.member_id,
        preserved = departure.preserve,
        "this node's copy of a context it left removed"
    );
    if let Ok(router) = state.router_control() {
        let _ = router
            .clone()
            .close_context(myelin_proto::internal::CloseContextRequest {
                context: departure.context.clone(),
            })
            .await;
    }
    Ok(())
}

/// On the node whose event store leads `row`'s group: releases the departed members the group
/// no longer has, so that their nodes may remove their copies.
async fn release(
    state: &AppState,
    row: &ContextRow,
    group: &GroupStatus,
    unreleased: &[Departure],
) -> Result<(), String> {
    for departure in unreleased.iter().filter(|d| d.context == row.name) {
        if group.members.iter().any(|m| m.id == departure.member_id) {
            continue;
        }
        tracing::info!(context = %row.name, member = departure.member_id, node = %departure.node, "the group let a departed member go");
        state
            .change(crate::raft::AdminCommand::ReleaseMember {
                context: row.name.clone(),
                member_id: departure.member_id,
            })
            .await
            .map_err(|e| {
                format!(
                    "releasing member {} of {}: {}",
                    departure.member_id, row.name, e.message
                )
            })?;
    }
    Ok(())
}

/// On the node whose event store leads `row`'s group: starts the next membership change, if
/// one is due and none is under way.
fn lead_membership(state: &AppState, changing: &Changing, row: &ContextRow, group: &GroupStatus) {
    let wanted: BTreeMap<u64, &str> = row
        .members
        .iter()
        .filter(|m| m.role.stores())
        .filter_map(|m| Some((row.seats.get(&m.node)?.id, m.node.as_str())))
        .collect();
    let add = wanted
        .iter()
        .find(|(id, _)| !group.members.iter().any(|g| g.id == **id && g.voter))
        .map(|(id, node)| (*id, (*node).to_owned()));
    let remove = group
        .members
        .iter()
        .find(|g| !wanted.contains_key(&g.id) && g.id != group.member_id)
        .or_else(|| group.members.iter().find(|g| !wanted.contains_key(&g.id)))
        .map(|g| g.id);
    let context = row.name.clone();
    let change = match (add, remove) {
        (Some((id, node)), _) => Change::Add { id, node },
        (None, Some(id)) => Change::Remove { id },
        (None, None) => return,
    };
    {
        let mut busy = changing.0.lock().expect("membership changes");
        if !busy.insert(context.clone()) {
            return;
        }
    }
    let state = state.clone();
    let changing = changing.clone();
    tokio::spawn(async move {
        let mut storage = state.storage.clone();
        let outcome = match &change {
            Change::Add { id, node } => {
                tracing::info!(context = %context, member = id, node = %node, "adding a member to the context's group");
                let mut request = tonic::Request::new(AddMemberRequest {
                    context: context.clone(),
                    member: Some(GroupMember {
                        id: *id,
                        node: node.clone(),
                        voter: true,
                        matched_index: None,
                    }),
                });
                request.set_timeout(CHANGE_TIMEOUT);
                storage.add_member(request).await.map(|_| ())
            }
            Change::Remove { id } => {
                tracing::info!(context = %context, member = id, "removing a member from the context's group");
                let mut request = tonic::Request::new(RemoveMemberRequest {
                    context: context.clone(),
                    member_id: *id,
                });
                request.set_timeout(CHANGE_TIMEOUT);
                storage.remove_member(request).await.map(|_| ())
            }
        };
        if let Err(status) = outcome {
            tracing::warn!(context = %context, ?change, error = %status.message(), "membership change failed; retried next round");
        }
        changing.0.lock().expect("membership changes").remove(&context);
    });
}

#[derive(Debug)]
enum Change {
    Add { id: u64, node: String },
    Remove { id: u64 },
}
