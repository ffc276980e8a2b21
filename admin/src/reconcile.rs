//! Recording this node, and adopting what a standalone node's event store holds, at start.
//!
//! At start admin records this node (when it is new or its addresses changed) and makes sure
//! `_admin` exists. On a standalone node (a cluster of one) it then asks the event store which
//! contexts it stores: each one missing from the configuration is adopted, this node PRIMARY
//! under the member id the event store holds it as (on a fresh node that is `default`; also a
//! data directory restored without its control DB). In a cluster of several nodes nothing is
//! adopted: the configuration decides what is stored where (`cluster::placement`), and a context
//! configured here but missing from the event store is joined there, not forgotten.
//! Every change is an `_admin` entry, like the API's; a change that already holds (refused as
//! existing) is no error.

use std::collections::BTreeMap;
use std::time::Duration;

use myelin_proto::internal::{GroupStatusRequest, ListContextsRequest};

use crate::api::AppState;
use crate::api::contexts::ADMIN_CONTEXT;
use crate::control_db::contexts::{self as db, Member, MemberRole, Node};
use crate::control_db::now_millis;
use crate::raft::{AdminCommand, AdminResponse, Refusal};

/// Proposes a change the caller only wants to hold: a refusal that says it holds already is
/// success, another refusal is an error.
async fn ensure(state: &AppState, command: AdminCommand, holds_if: fn(&Refusal) -> bool) -> anyhow::Result<bool> {
    let kind = command.kind();
    match crate::cluster::calls::propose(state, command)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
    {
        AdminResponse::Applied => Ok(true),
        AdminResponse::Refused(refusal) if holds_if(&refusal) => Ok(false),
        AdminResponse::Refused(refusal) => Err(anyhow::anyhow!("{kind}: {refusal}")),
    }
}

/// Records this node (when it is new or its addresses changed) and `_admin`, through `_admin`.
pub async fn this_node(state: &AppState) -> anyhow::Result<()> {
    let settings = state.node.clone();
    let me = Node {
        name: settings.name.clone(),
        host_name: settings.hostname.clone(),
        grpc_port: settings.grpc_port,
        http_port: settings.http_port,
        internal_host_name: settings.internal_hostname.clone(),
        grpc_internal_port: settings.internal_port,
    };
    let name = me.name.clone();
    let (recorded, admin_exists) = state
        .db
        .call(move |conn| Ok((db::node(conn, &name)?, db::context_exists(conn, ADMIN_CONTEXT)?)))
        .await?;
    // Proposed only when something changed, so a restart adds no entry.
    if recorded.as_ref() != Some(&me) {
        ensure(state, AdminCommand::UpsertNode(me.clone()), |_| false).await?;
    }
    if !admin_exists {
        let command = AdminCommand::CreateContext {
            name: ADMIN_CONTEXT.to_owned(),
            meta_data: BTreeMap::new(),
            members: vec![Member {
                node: me.name,
                role: MemberRole::Primary,
            }],
            created_at_millis: now_millis(),
            seats: vec![state.admin.id()],
        };
        ensure(state, command, |r| matches!(r, Refusal::ContextExists(_))).await?;
    }
    Ok(())
}

/// Retries [`this_node`] until it holds (a node that joined a cluster records itself through
/// the cluster's leader, which it may not know yet at start).
pub async fn this_node_until_done(state: AppState) {
    let mut attempt = 0u32;
    loop {
        match this_node(&state).await {
            Ok(()) => return,
            Err(e) => {
                attempt += 1;
                if attempt % 20 == 1 {
                    tracing::warn!(error = %e, attempt, "cannot yet record this node's addresses in the cluster");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// On a standalone node: adopts the contexts the event store holds and the configuration
/// lacks; returns those adopted.
pub async fn contexts(state: &AppState) -> anyhow::Result<Vec<String>> {
    let _lifecycle = state.lifecycle.lock().await;
    let nodes = state.db.call(|conn| db::nodes(conn)).await?;
    if nodes.len() > 1 || state.admin.voter_count() > 1 || state.admin.id() != crate::raft::LOCAL_NODE {
        return Ok(Vec::new());
    }
    let stored: Vec<String> = state
        .storage
        .clone()
        .list_contexts(ListContextsRequest {})
        .await?
        .into_inner()
        .contexts
        .into_iter()
        .map(|c| c.name)
        .collect();
    let me = state.node.name.clone();
    let known = state.db.call(|conn| db::contexts(conn)).await?;
    let mut added = Vec::new();
    for name in &stored {
        if known.iter().any(|c| &c.name == name) {
            continue;
        }
        let group = state
            .storage
            .clone()
            .get_group_status(GroupStatusRequest { context: name.clone() })
            .await?
            .into_inner();
        let command = AdminCommand::CreateContext {
            name: name.clone(),
            meta_data: BTreeMap::new(),
            members: vec![Member {
                node: me.clone(),
                role: MemberRole::Primary,
            }],
            created_at_millis: now_millis(),
            seats: vec![group.member_id],
        };
        if ensure(state, command, |r| matches!(r, Refusal::ContextExists(_))).await? {
            added.push(name.clone());
        }
    }
    if !added.is_empty() {
        tracing::info!(contexts = ?added, "contexts the event store holds added to the control DB");
    }
    Ok(added)
}

/// Attempts (500 ms apart) after which a control DB that still cannot be aligned is worth a
/// warning: before that the event store is usually just still starting, a race of every start
/// that is no operator's concern.
const QUIET_ATTEMPTS: u32 = 20;

/// Retries [`contexts`] until the event store answers (it may still be starting). Logs at debug
/// level while that is the likely reason, then a warning every 10 s.
pub async fn contexts_until_done(state: AppState) {
    let mut attempt = 0u32;
    loop {
        match contexts(&state).await {
            Ok(_) => return,
            Err(e) => {
                attempt += 1;
                if attempt.is_multiple_of(QUIET_ATTEMPTS) {
                    tracing::warn!(
                        error = %e,
                        attempt,
                        "cannot align the control DB with the event store yet; retrying"
                    );
                } else {
                    tracing::debug!(error = %e, attempt, "cannot yet align the control DB with the event store");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
