//! Admin-to-admin calls through the routers (`AdminCall`), and the handler of calls from other
//! nodes (`AdminInbox` on admin's socket).
//!
//! A change is proposed where `_admin` is led: a node that does not lead forwards the command to
//! the leader its group names, and waits until it has applied the entry itself, so that a read
//! right after the change (the API answers with what it reads back) sees it. A call is forwarded
//! at most [`MAX_HOPS`] times: during an election two nodes could each name the other. A leader
//! that was unregistered is not called: the change waits for the next leader ([`HANDOVER_WAIT`]).

use std::time::Duration;

use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::admin_call::Target;
use myelin_proto::internal::admin_inbox_server::AdminInbox;
use myelin_proto::internal::{AdminAnswer, AdminCall, AdminCallKind};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::api::{ApiError, AppState};
use crate::control_db::contexts as db;
use crate::raft::{AdminCommand, AdminResponse, ProposeError};

/// How many times a call may be passed on towards the leader.
pub const MAX_HOPS: u32 = 2;
/// How long a node waits to apply an entry the leader committed for it.
const APPLY_WAIT: Duration = Duration::from_secs(10);
/// How long a change waits for the next `_admin` leader when the one it knows was unregistered
/// (its hand-over: leaving `_admin`, then an election among the others, about a second).
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// What the leader answers a forwarded proposal.
#[derive(Debug, Serialize, Deserialize)]
pub struct Proposed {
    /// The entry's log index (the caller waits until it has applied it).
    pub index: u64,
    pub response: AdminResponse,
}

fn encode(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("admin call bodies serialize")
}

fn decode<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::internal(format!("{what}: unreadable answer: {e}")))
}

/// Calls another node's admin through this node's router.
pub async fn call(
    state: &AppState,
    target: Target,
    kind: AdminCallKind,
    body: Vec<u8>,
    hops: u32,
) -> Result<Vec<u8>, ApiError> {
    let Some(relay) = state.admin_relay.clone() else {
        return Err(ApiError::with_status(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Other,
            "this admin runs without a router: it cannot reach other nodes",
        ));
    };
    let who = match &target {
        Target::Node(node) => node.clone(),
        Target::Address(address) => address.clone(),
    };
    let request = AdminCall {
        target: Some(target),
        from_node: state.node.name.clone(),
        kind: kind as i32,
        body: body.into(),
        hops,
    };
    match relay.clone().call(request).await {
        Ok(answer) => Ok(answer.into_inner().body.to_vec()),
        Err(status) => Err(ApiError::from_status(&who, status)),
    }
}

/// Proposes `command` to `_admin` wherever it is led, and returns what applying it answered
/// once this node has applied it too.
pub async fn propose(state: &AppState, command: AdminCommand) -> Result<AdminResponse, ApiError> {
    propose_from(state, command, 0).await.map(|p| p.response)
}

async fn propose_from(state: &AppState, command: AdminCommand, hops: u32) -> Result<Proposed, ApiError> {
    let handover_deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
    let leader = loop {
        let (leader_id, leader) = match state.admin.propose_at(command.clone()).await {
            Ok((log_id, response)) => {
                return Ok(Proposed {
                    index: log_id.index,
                    response,
                });
            }
            Err(ProposeError::ForwardToLeader(forward)) if hops < MAX_HOPS => match forward.leader_node {
                Some(node) => (forward.leader_id, node.addr),
                None => return Err(ProposeError::ForwardToLeader(forward).into()),
            },
            Err(e) => return Err(e.into()),
        };
        // A leader no longer in the nodes table was unregistered: it hands `_admin` over by
        // leaving it, and this node's router no longer reaches it (its peers follow the table).
        // Nothing was sent: wait for the next leader and propose again. (Checked again every
        // moment: on a node that has just joined, the table may not hold the leader yet.)
        let name = leader.clone();
        let registered = state.db.call(move |conn| db::node(conn, &name)).await?.is_some();
        let remaining = handover_deadline.saturating_duration_since(tokio::time::Instant::now());
        if registered || remaining.is_zero() {
            break leader;
        }
        tracing::debug!(leader = %leader, "the _admin leader was unregistered: waiting for the next one");
        let _ = state
            .admin
            .raft()
            .wait(Some(remaining.min(Duration::from_millis(100))))
            .metrics(
                |m| m.current_leader.is_some() && m.current_leader != leader_id,
                "the next _admin leader",
            )
            .await;
    };
    tracing::debug!(leader = %leader, command = command.kind(), "forwarding an _admin change to its leader");
    let body = call(
        state,
        Target::Node(leader),
        AdminCallKind::Propose,
        encode(&command),
        hops + 1,
    )
    .await?;
    let proposed: Proposed = decode("the _admin leader", &body)?;
    wait_applied(state, proposed.index).await?;
    Ok(proposed)
}

/// Waits until this node has applied `_admin` entry `index`.
pub async fn wait_applied(state: &AppState, index: u64) -> Result<(), ApiError> {
    state
        .admin
        .raft()
        .wait(Some(APPLY_WAIT))
        .metrics(
            |m| m.last_applied.is_some_and(|applied| applied.index >= index),
            "the change applied here",
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            ApiError::with_status(
                axum::http::StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::Other,
                format!("the change is committed, but this node has not applied it yet: {e}"),
            )
        })
}

/// `AdminInbox` on admin's socket: calls from other nodes' admins, handed over by the router.
pub struct Inbox {
    pub state: AppState,
}

#[tonic::async_trait]
impl AdminInbox for Inbox {
    #[tracing::instrument(skip_all, fields(kind = request.get_ref().kind, from = %request.get_ref().from_node))]
    async fn call(&self, request: Request<AdminCall>) -> Result<Response<AdminAnswer>, Status> {
        let call = request.into_inner();
        let state = &self.state;
        let body = match AdminCallKind::try_from(call.kind) {
            Ok(AdminCallKind::Hello) => Ok(encode(&state.node.name)),
            Ok(AdminCallKind::Propose) => {
                let command: AdminCommand = serde_json::from_slice(&call.body)
                    .map_err(|e| Status::invalid_argument(format!("an _admin command that does not decode: {e}")))?;
                propose_from(state, command, call.hops).await.map(|p| encode(&p))
            }
            Ok(AdminCallKind::Join) => super::join::accept(state, &call.body, call.hops).await,
            _ => return Err(Status::unimplemented(format!("admin call kind {}", call.kind))),
        };
        body.map(|body| Response::new(AdminAnswer { body: body.into() }))
            .map_err(ApiError::into_status)
    }
}
