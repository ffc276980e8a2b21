//! Who is a member of a context's group, and how that changes.
//!
//! The cluster configuration (`_admin`) decides membership; this module only carries out what it
//! decided, on the group itself. What holds:
//! - A member is added as a learner first and becomes a voter only once it has caught up (it
//!   acknowledged the entry that added it, and so the whole history before it), so that adding
//!   a member never stalls the group's commits behind a node that is still copying history, and
//!   never counts a node that has not opened the context towards a majority.
//! - Member ids are given by the caller and never reused (openraft panics on a member that comes
//!   back under its old id without its data).
//! - Only the leader changes membership; elsewhere the answer names the leader.

use std::collections::BTreeMap;
use std::time::Duration;

use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::{GroupMember, GroupStatus};
use openraft::{BasicNode, ChangeMembers};
use tonic::Status;

use crate::context::Context;

/// How long adding a member may take to bring it within the lag threshold.
const CATCH_UP: Duration = Duration::from_secs(300);

/// The group of `context` as this node sees it.
pub fn status(context: &Context) -> GroupStatus {
    let metrics = context.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let matched = metrics.replication.clone().unwrap_or_default();
    let members = membership
        .nodes()
        .map(|(id, node)| GroupMember {
            id: *id,
            node: node.addr.clone(),
            voter: voters.contains(id),
            matched_index: if *id == context.member.id && metrics.current_leader == Some(*id) {
                metrics.last_log_index
            } else {
                matched.get(id).and_then(|m| m.map(|l| l.index))
            },
        })
        .collect();
    GroupStatus {
        context: context.name.clone(),
        member_id: context.member.id,
        leader: metrics.current_leader,
        term: metrics.current_term,
        applied_index: metrics.last_applied.map(|l| l.index),
        last_log_index: metrics.last_log_index,
        members,
    }
}

fn not_leader(context: &Context) -> Status {
    let leader = context.raft.metrics().borrow().current_leader;
    match leader {
        Some(leader) => Status::failed_precondition(format!(
            "member {} does not lead context {}; member {leader} does",
            context.member.id, context.name
        )),
        None => ErrorCode::NoLeaderAvailable.status(format!("No leader for {}", context.name)),
    }
}

/// On the leader: adds `member` to the group, as a learner until it has caught up, then as a
/// voter. Adding a member that is already a voter changes nothing.
pub async fn add(context: &Context, member: GroupMember) -> Result<GroupStatus, Status> {
    if member.node.is_empty() {
        return Err(Status::invalid_argument("a member needs the name of its node"));
    }
    let me = context.member.id;
    let metrics = context.raft.metrics().borrow().clone();
    if metrics.current_leader != Some(me) {
        return Err(not_leader(context));
    }
    let membership = metrics.membership_config.membership().clone();
    if let Some(node) = membership.get_node(&member.id)
        && node.addr != member.node
    {
        return Err(Status::already_exists(format!(
            "member id {} of context {} belongs to node {}",
            member.id, context.name, node.addr
        )));
    }
    if membership.voter_ids().any(|id| id == member.id) {
        return Ok(status(context));
    }
    // A group created before this node had peers names its one member by no node: name it now,
    // so that the new member can reach it.
    if membership.get_node(&me).is_some_and(|n| n.addr.is_empty()) {
        let named = BTreeMap::from([(me, BasicNode::new(&context.member.node))]);
        context
            .raft
            .change_membership(ChangeMembers::SetNodes(named), true)
            .await
            .map_err(|e| change_failed(context, &e))?;
    }
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    let late = || {
        Status::deadline_exceeded(format!(
            "member {} of context {} did not catch up within {CATCH_UP:?}; it stays a learner",
            member.id, context.name
        ))
    };
    let learner = context.raft.add_learner(member.id, BasicNode::new(&member.node), true);
    let added = match tokio::time::timeout_at(deadline, learner).await {
        Ok(result) => result.map_err(|e| change_failed(context, &e))?,
        Err(_) => return Err(late()),
    };
    // openraft's blocking add_learner counts a learner as caught up once it is within
    // `replication_lag_threshold` entries of the leader, and a learner that never answered as
    // matched at nothing: in a young group it returns at once, even when the new member's node
    // has not opened the context yet. Such a voter counts towards every majority without
    // holding anything. So the learner must have acknowledged the entry that added it (and so
    // everything before it) before it may vote.
    let since = added.log_id.index;
    let wanted = member.id;
    let caught_up = context
        .raft
        .wait(Some(deadline.saturating_duration_since(tokio::time::Instant::now())))
        .metrics(
            |m| match &m.replication {
                // Not leading any more: the change below fails and says so.
                None => true,
                Some(matched) => matched
                    .get(&wanted)
                    .is_some_and(|l| l.is_some_and(|l| l.index >= since)),
            },
            "the new learner acknowledged the entry that added it",
        )
        .await;
    match caught_up {
        Ok(_) => {}
        Err(openraft::metrics::WaitError::Timeout(..)) => return Err(late()),
        Err(e) => return Err(change_failed(context, &e)),
    }
    context
        .raft
        .change_membership(ChangeMembers::AddVoterIds([member.id].into()), true)
        .await
        .map_err(|e| change_failed(context, &e))?;
    tracing::info!(context = %context.name, member = member.id, node = %member.node, "member added");
    Ok(status(context))
}

/// On the leader: removes member `id` from the group (as a voter first, so the group never
/// counts a departing member towards a majority, then entirely). The last voter is never
/// removed: a group without voters could never commit again.
pub async fn remove(context: &Context, id: u64) -> Result<GroupStatus, Status> {
    let me = context.member.id;
    let metrics = context.raft.metrics().borrow().clone();
    if metrics.current_leader != Some(me) {
        return Err(not_leader(context));
    }
    let membership = metrics.membership_config.membership().clone();
    if membership.get_node(&id).is_none() {
        return Ok(status(context));
    }
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    if voters.contains(&id) {
        if voters.len() == 1 {
            return Err(ErrorCode::CannotRemoveLastNode
                .status(format!("member {id} is the last voter of context {}", context.name)));
        }
        context
            .raft
            .change_membership(ChangeMembers::RemoveVoters([id].into()), true)
            .await
            .map_err(|e| change_failed(context, &e))?;
    }
    context
        .raft
        .change_membership(ChangeMembers::RemoveNodes([id].into()), false)
        .await
        .map_err(|e| change_failed(context, &e))?;
    tracing::info!(context = %context.name, member = id, "member removed");
    Ok(status(context))
}

fn change_failed(context: &Context, e: &dyn std::fmt::Display) -> Status {
    tracing::warn!(context = %context.name, error = %e, "membership change failed");
    Status::failed_precondition(format!("changing the members of context {}: {e}", context.name))
}
