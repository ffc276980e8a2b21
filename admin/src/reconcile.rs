//! Bringing the control DB in line with what this node actually stores, at start.
//!
//! A context create or delete touches the event store first and the control DB second (see
//! `api::contexts`), so a crash between the two leaves the control DB one step behind. At start
//! admin records this node, makes sure `_admin` exists with this node as PRIMARY, then asks the
//! event store which contexts it stores: each one missing from the control DB is added (this node
//! PRIMARY; on a fresh node that is `default`), and each context the control DB says this node
//! stores but the event store does not have is removed (its delete had reached the event store).
//! Every such change is an `_admin` entry, like the API's; a change that already holds (refused
//! as existing, or as gone) is no error.

use std::collections::BTreeMap;
use std::time::Duration;

use myelin_proto::internal::ListContextsRequest;

use crate::api::AppState;
use crate::api::contexts::ADMIN_CONTEXT;
use crate::control_db::contexts::{self as db, Member, MemberRole, Node};
use crate::control_db::now_millis;
use crate::raft::{AdminCommand, AdminResponse, Refusal};

/// Proposes a change the caller only wants to hold: a refusal that says it holds already is
/// success, another refusal is an error.
async fn ensure(state: &AppState, command: AdminCommand, holds_if: fn(&Refusal) -> bool) -> anyhow::Result<bool> {
    let kind = command.kind();
    match state.admin.propose(command).await? {
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
        };
        ensure(state, command, |r| matches!(r, Refusal::ContextExists(_))).await?;
    }
    Ok(())
}

/// Aligns the contexts with the event store's; returns (added, removed).
pub async fn contexts(state: &AppState) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let _lifecycle = state.lifecycle.lock().await;
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
        let command = AdminCommand::CreateContext {
            name: name.clone(),
            meta_data: BTreeMap::new(),
            members: vec![Member {
                node: me.clone(),
                role: MemberRole::Primary,
            }],
            created_at_millis: now_millis(),
        };
        if ensure(state, command, |r| matches!(r, Refusal::ContextExists(_))).await? {
            added.push(name.clone());
        }
    }
    let mut removed = Vec::new();
    for context in known {
        let stored_here = context.members.iter().any(|m| m.node == me && m.role.stores());
        if context.name != ADMIN_CONTEXT && stored_here && !stored.contains(&context.name) {
            let command = AdminCommand::DeleteContext {
                name: context.name.clone(),
            };
            if ensure(state, command, |r| matches!(r, Refusal::ContextNotFound(_))).await? {
                removed.push(context.name);
            }
        }
    }
    if !added.is_empty() {
        tracing::info!(contexts = ?added, "contexts the event store holds added to the control DB");
    }
    if !removed.is_empty() {
        tracing::warn!(contexts = ?removed, "contexts the event store no longer holds removed from the control DB");
        if let Err(e) = state.applications_changed().await {
            tracing::warn!(error = %e, "republishing grants");
        }
    }
    Ok((added, removed))
}

/// Retries [`contexts`] until the event store answers (it may still be starting).
pub async fn contexts_until_done(state: AppState) {
    let mut attempt = 0u32;
    loop {
        match contexts(&state).await {
            Ok(_) => return,
            Err(e) => {
                attempt += 1;
                if attempt % 20 == 1 {
                    tracing::warn!(error = %e, attempt, "cannot yet align the control DB with the event store");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
