//! `_admin`'s members follow the `nodes` table.
//!
//! On the leader, after every applied change and every [`PERIOD`]: a registered node that is not
//! a member becomes a learner (under the member id its `RegisterNode` entry gave it); a learner
//! that has caught up becomes a voter; a member whose node was unregistered leaves. One change at
//! a time (openraft refuses a second while one is in progress), each retried on the next round
//! when it fails, so a leader that crashes half-way leaves nothing stuck: the next leader carries
//! on from the state it finds.
//!
//! On every node: one that finds itself no longer in the `nodes` table after applying past its
//! own registration was unregistered. Its `_admin` member stops campaigning (a removed member
//! must not disturb the cluster's leader) and says so in its log. It keeps its copies of
//! contexts: a group may need its vote until the group's leader has removed it, and the release
//! that says so is an `_admin` entry it no longer receives (the others forgot its address). The
//! operator starts it again with an empty data directory (its log says so).
//! The leader, unregistered, first removes itself from `_admin` (openraft makes it step down once
//! that is committed), and only then stops.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::BasicNode;

use crate::api::AppState;
use crate::control_db::contexts as db;
use crate::raft::{LOCAL_NODE, NodeId};

/// How often the members are checked even when nothing changed.
const PERIOD: Duration = Duration::from_secs(2);
/// A learner this close to the leader's log becomes a voter.
const CAUGHT_UP: u64 = 50;

/// Runs until the process ends (or this node finds itself unregistered).
pub fn follow_nodes(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        super::each_change(
            &state,
            PERIOD,
            "bringing _admin's members in line with the nodes",
            || async {
                if step(&state).await? != Step::Removed {
                    return Ok(true);
                }
                tracing::error!(
                    node = %state.node.name,
                    "this node was unregistered from the cluster: its _admin member no longer campaigns. Start it \
                     again with an empty data directory to use it elsewhere"
                );
                // A removed member that kept campaigning would disturb the cluster's leader.
                state.admin.raft().runtime_config().elect(false);
                Ok(false)
            },
        )
        .await;
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Nothing,
    Changed,
    Removed,
}

async fn step(state: &AppState) -> Result<Step, String> {
    let identity = state.admin.id();
    let registered = state
        .db
        .call(|conn| db::admin_members(conn))
        .await
        .map_err(|e| e.to_string())?;
    // Each registered node's `_admin` member id (the node that started the cluster has none
    // recorded: it is the group's first member). Members are matched by id, never by name: a
    // node registered again under its old name is a new member, and its old one must leave.
    let registered: BTreeMap<NodeId, String> = registered
        .into_iter()
        .map(|(name, id)| (id.unwrap_or(LOCAL_NODE), name))
        .collect();
    let metrics = state.admin.raft().metrics().borrow().clone();
    let applied = metrics.last_applied.map_or(0, |l| l.index);
    let known = registered.contains_key(&identity);
    // Past its own registration (or, for the node that started the cluster, once the table
    // holds anything), a node missing from the table was unregistered.
    let past_registration = match identity {
        LOCAL_NODE => !registered.is_empty(),
        id => applied >= id,
    };
    let leads = metrics.current_leader == Some(identity);
    // An unregistered leader first hands over by leaving (below, itself last); it is `Removed`
    // on a later round, once it no longer leads. Were it `Removed` at once, it would go on
    // leading (heartbeats keep the others from electing) while they no longer reach it, and
    // `_admin` would take no change.
    if !known && past_registration && metrics.membership_config.nodes().count() > 0 && !leads {
        return Ok(Step::Removed);
    }
    if !leads {
        return Ok(Step::Nothing);
    }
    let membership = metrics.membership_config.membership().clone();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let member_names: Vec<(NodeId, String)> = membership.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
    let raft_err = |e: crate::raft::ProposeError| e.to_string();

    // A registered node not yet a member: a learner first.
    if let Some((&id, name)) = registered
        .iter()
        .find(|(id, _)| !member_names.iter().any(|(member, _)| member == *id))
    {
        tracing::info!(node = %name, member = id, "adding a node to _admin as a learner");
        state
            .admin
            .add_learner(id, BasicNode::new(name))
            .await
            .map_err(raft_err)?;
        return Ok(Step::Changed);
    }
    // A learner of a registered node that has caught up: a voter.
    let last = metrics.last_log_index.unwrap_or(0);
    let replication = metrics.replication.clone().unwrap_or_default();
    let ready: Vec<NodeId> = member_names
        .iter()
        .filter(|(id, _)| !voters.contains(id) && registered.contains_key(id))
        .filter(|(id, _)| {
            replication
                .get(id)
                .and_then(|m| m.map(|l| l.index))
                .is_some_and(|matched| matched + CAUGHT_UP >= last)
        })
        .map(|(id, _)| *id)
        .collect();
    if !ready.is_empty() {
        tracing::info!(members = ?ready, "_admin learners caught up: making them voters");
        state
            .admin
            .change_voters(voters.iter().copied().chain(ready))
            .await
            .map_err(raft_err)?;
        return Ok(Step::Changed);
    }
    // Members whose node was unregistered leave (the leader last: it hands over by leaving).
    // Matched by id: a member whose id is no registered node's.
    let mut leaving: Vec<NodeId> = member_names
        .iter()
        .filter(|(id, _)| !registered.contains_key(id))
        .map(|(id, _)| *id)
        .collect();
    leaving.sort_by_key(|id| *id == identity);
    if let Some(&id) = leaving.first() {
        if voters.len() == 1 && voters.contains(&id) {
            return Err(format!("member {id} is _admin's last voter; it stays"));
        }
        tracing::info!(member = id, "removing an unregistered node from _admin");
        state.admin.remove_members([id]).await.map_err(raft_err)?;
        return Ok(Step::Changed);
    }
    Ok(Step::Nothing)
}
