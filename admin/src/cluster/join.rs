//! `register-node`: a node joins a cluster.
//!
//! Axon's order: the operator calls the **new** node (`-S`), naming a node of the cluster
//! (`-h`, `-p`: its internal address). Here:
//! 1. The new node checks that it may join: it is not part of a cluster of several nodes
//!    (AXONIQ-2306) and holds no events (AXONIQ-2502): joining gives up its own configuration and
//!    contexts, so a node with data never joins by accident, and two clusters' data never mix.
//! 2. It asks the named node (`AdminCall` JOIN, through the routers), which passes the request to
//!    the `_admin` leader. The leader refuses a name already in the cluster (AXONIQ-2500), checks
//!    that it can reach the new node at the internal address it gave (AXONIQ-2501), and records
//!    it: one `RegisterNode` entry, whose log index becomes the node's `_admin` member id (never
//!    used before, never used again), then one `AddMember` per context it is to serve.
//! 3. The new node removes its (empty) contexts, drops its own `_admin` state, records its
//!    member id, and its admin restarts (the supervisor starts it again) as a member waiting for
//!    the cluster's leader, which sends it the configuration as a snapshot.
//!
//! The leader's `members` task then adds the node to `_admin` (a learner, then a voter once it
//! has caught up), and each context's leader adds it to the context's group (`placement`).

use axum::Json;
use axum::extract::State;
use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::admin_call::Target;
use myelin_proto::internal::{AdminCallKind, DeleteContextRequest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::cluster::RestResponse;
use crate::api::contexts::ADMIN_CONTEXT;
use crate::api::error::ErrorBody;
use crate::api::{ApiError, AppState, Body, check_name, clip};
use crate::control_db::contexts::{self as db, MemberRole, Node};
use crate::raft::{AdminCommand, AdminResponse, Refusal};

/// Axon's `ClusterNode` as `register-node` sends it: where to find the cluster, and which
/// contexts to serve. The other fields of Axon's class are accepted and ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterNode {
    /// Host name of a node of the cluster to join (its internal host name).
    #[schema(example = "node-1", min_length = 1, max_length = 255)]
    pub internal_host_name: String,
    /// That node's internal port (default 8224).
    #[schema(example = 8224)]
    pub internal_grpc_port: Option<u16>,
    /// Serve only this context (default: every context of the cluster).
    pub context: Option<String>,
    /// Serve no context (only `_admin`).
    pub no_contexts: Option<bool>,
    pub name: Option<serde_json::Value>,
    pub host_name: Option<serde_json::Value>,
    pub grpc_port: Option<serde_json::Value>,
    pub http_port: Option<serde_json::Value>,
    pub connected: Option<serde_json::Value>,
    pub master: Option<serde_json::Value>,
}

/// What a joining node asks the `_admin` leader.
#[derive(Debug, Serialize, Deserialize)]
struct JoinRequest {
    node: Node,
    /// The contexts to serve: `None` for all of them.
    contexts: Option<Vec<String>>,
}

/// What the leader answers.
#[derive(Debug, Serialize, Deserialize)]
struct JoinAnswer {
    /// The new node's `_admin` member id.
    member_id: u64,
    /// The leader's name.
    leader: String,
    /// The contexts the new node was made a member of.
    contexts: Vec<String>,
}

fn this_node(state: &AppState) -> Node {
    let me = &state.node;
    Node {
        name: me.name.clone(),
        host_name: me.hostname.clone(),
        grpc_port: me.grpc_port,
        http_port: me.http_port,
        internal_host_name: me.internal_hostname.clone(),
        grpc_internal_port: me.internal_port,
    }
}

/// Makes this node a member of the cluster that the node at `internalHostName:internalGrpcPort`
/// belongs to (`register-node`).
#[utoipa::path(post, path = "/v1/cluster", operation_id = "registerNode", tag = "cluster",
    request_body = RegisterNode,
    responses(
        (status = 202, description = "Joined: admin restarts to follow the cluster", body = RestResponse),
        (status = 400, description = "Bad request, a node of that name exists (AXONIQ-2500), the cluster \
                                      cannot reach this node (AXONIQ-2501), this node holds events (AXONIQ-2502)",
            body = ErrorBody),
        (status = 406, description = "This node is part of a cluster of several nodes (AXONIQ-2306)", body = ErrorBody),
        (status = 413, description = "Body larger than 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    ))]
pub async fn register(
    State(state): State<AppState>,
    Body(request): Body<RegisterNode>,
) -> Result<(axum::http::StatusCode, Json<RestResponse>), ApiError> {
    check_name("internalHostName", &request.internal_host_name, 255)?;
    let port = request.internal_grpc_port.unwrap_or(8224);
    let no_contexts = request.no_contexts.unwrap_or(false);
    if no_contexts && request.context.is_some() {
        return Err(ApiError::bad_request("give a context or noContexts, not both"));
    }
    if let Some(context) = &request.context {
        crate::api::check_context_name(context)?;
    }
    let contexts = match (&request.context, no_contexts) {
        (Some(context), _) => Some(vec![context.clone()]),
        (None, true) => Some(Vec::new()),
        (None, false) => None,
    };
    let address = format!("{}:{port}", request.internal_host_name);
    let joined = join_cluster(&state, &address, contexts).await?;
    let message = format!(
        "{} joined the cluster of {} as _admin member {}, serving {}; its admin restarts to follow the cluster",
        state.node.name,
        joined.leader,
        joined.member_id,
        if joined.contexts.is_empty() {
            "no context".to_owned()
        } else {
            joined.contexts.join(", ")
        }
    );
    tracing::info!(leader = %joined.leader, member = joined.member_id, contexts = ?joined.contexts, "joined a cluster");
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(RestResponse { success: true, message }),
    ))
}

/// Joins the cluster of the node at `address` (its internal `host:port`), serving `contexts`
/// (`None`: all). On success this node's admin is about to restart as a member.
async fn join_cluster(state: &AppState, address: &str, contexts: Option<Vec<String>>) -> Result<JoinAnswer, ApiError> {
    let _one_at_a_time = state.membership.lock().await;
    let nodes = state.db.call(|conn| db::nodes(conn)).await?;
    let size = nodes.len().max(state.admin.voter_count());
    if size > 1 || state.admin.id() != crate::raft::LOCAL_NODE {
        return Err(ApiError::new(
            ErrorCode::AlreadyMemberOfCluster,
            format!(
                "{} is already a member of a cluster of {size} nodes; unregister it there (unregister-node) and \
                 start it with an empty data directory before it joins another",
                state.node.name
            ),
        ));
    }
    refuse_if_holding_events(state).await?;
    if address == format!("{}:{}", state.node.internal_hostname, state.node.internal_port) {
        return Err(ApiError::bad_request(format!(
            "{address} is this node's own internal address: name a node of the cluster to join"
        )));
    }
    let ask = JoinRequest {
        node: this_node(state),
        contexts,
    };
    let body = serde_json::to_vec(&ask).expect("a join request serializes");
    let answer = super::calls::call(state, Target::Address(address.to_owned()), AdminCallKind::Join, body, 0)
        .await
        .map_err(|e| unreachable_as_unknown_host(e, address))?;
    let joined: JoinAnswer = serde_json::from_slice(&answer)
        .map_err(|e| ApiError::internal(format!("{address} answered the join unreadably: {e}")))?;
    leave_own_state(state, joined.member_id).await?;
    Ok(joined)
}

/// Axon's `autocluster.first` / `autocluster.contexts`, at start: the node at `first` creates
/// the contexts; every other node joins its cluster (retrying until the first node answers),
/// serving those contexts. A node that is already a member of a cluster, or holds events, does
/// nothing (it says why in its log): autoclustering never merges data. Called once the control
/// DB knows the contexts this node's event store holds (`reconcile::contexts`), so that the first
/// node never configures a context it already stores under another member id.
pub async fn autocluster(state: AppState, first: String, contexts: Vec<String>) {
    if state.admin.id() != crate::raft::LOCAL_NODE {
        return;
    }
    let address = if first
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        first
    } else {
        format!("{first}:8224")
    };
    let me = format!("{}:{}", state.node.internal_hostname, state.node.internal_port);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let outcome = if address == me {
            create_first_contexts(&state, &contexts).await.map(|()| None)
        } else {
            join_cluster(&state, &address, Some(contexts.clone())).await.map(Some)
        };
        match outcome {
            Ok(None) => return,
            Ok(Some(joined)) => {
                tracing::info!(first = %address, leader = %joined.leader, contexts = ?joined.contexts, "autocluster: joined");
                return;
            }
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::AlreadyMemberOfCluster | ErrorCode::CannotJoin | ErrorCode::SameNodeName
                ) =>
            {
                if e.code != ErrorCode::AlreadyMemberOfCluster {
                    tracing::error!(first = %address, error = %e, "autocluster: this node does not join");
                }
                return;
            }
            Err(e) => {
                if attempt % 10 == 1 {
                    tracing::warn!(first = %address, error = %e, attempt, "autocluster: not yet; trying again");
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// On the first node: the autocluster contexts, created when missing (only while no other node
/// has joined: later, the configuration is the operators').
async fn create_first_contexts(state: &AppState, contexts: &[String]) -> Result<(), ApiError> {
    let nodes = state.db.call(|conn| db::nodes(conn)).await?;
    if nodes.len() > 1 {
        return Ok(());
    }
    for context in contexts {
        let owned = context.clone();
        if state.db.call(move |conn| db::context_exists(conn, &owned)).await? {
            continue;
        }
        let request = crate::api::contexts::CreateContext {
            context: context.clone(),
            roles: None,
            nodes: None,
            meta_data: None,
            replication_group: None,
        };
        match crate::api::contexts::create_context(state, request).await {
            Ok(_) => tracing::info!(context = %context, "autocluster: context created"),
            Err(e) if e.code == ErrorCode::ContextExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A node that could not be reached is Axon's UNKNOWN_HOST.
fn unreachable_as_unknown_host(e: ApiError, address: &str) -> ApiError {
    // No Axon code: the call did not reach a Myelin admin there (nothing listens, or something
    // else does, e.g. an HTTP port named instead of the internal one).
    if e.code == ErrorCode::Other && e.status.is_server_error() {
        ApiError::new(
            ErrorCode::UnknownHost,
            format!(
                "cannot reach a cluster node at {address}: {} (check the host name and the internal port)",
                e.message
            ),
        )
    } else {
        e
    }
}

async fn refuse_if_holding_events(state: &AppState) -> Result<(), ApiError> {
    let stored = state.stored_contexts().await?;
    let holding: Vec<String> = stored
        .iter()
        .filter(|c| c.last_token >= 0 || c.last_snapshot_token >= 0)
        .map(|c| c.name.clone())
        .collect();
    if holding.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::CannotJoin,
        format!(
            "{} holds events in {}: a node with data never joins another cluster (its data would be dropped, \
             or mixed with the cluster's). Back the data up and delete those contexts, or start the node with an \
             empty data directory, then register it again",
            state.node.name,
            holding.join(", ")
        ),
    ))
}

/// Gives up this node's own contexts and `_admin` state for the cluster's, and asks for a
/// restart (the group stops; `crate::run_with_network` ends the process once this answer is
/// sent, and the supervisor starts admin again as a member of the cluster).
async fn leave_own_state(state: &AppState, member_id: u64) -> Result<(), ApiError> {
    let stored = state.stored_contexts().await?;
    for context in stored {
        // Empty (checked before asking to join): the cluster's members of a context are placed
        // by the cluster's configuration from now on.
        state
            .storage
            .clone()
            .delete_context(DeleteContextRequest {
                name: context.name.clone(),
                preserve_files: false,
            })
            .await
            .map_err(|s| ApiError::from_status("the event store", s))?;
    }
    state.restarting.store(true, std::sync::atomic::Ordering::SeqCst);
    state.admin.shutdown().await;
    crate::raft::prepare_join(&state.db, member_id).await?;
    Ok(())
}

/// On the node the new one called: handled by the `_admin` leader (forwarded to it if need be).
pub async fn accept(state: &AppState, body: &[u8], hops: u32) -> Result<Vec<u8>, ApiError> {
    let request: JoinRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("a join request that does not decode: {e}")))?;
    if !state.admin.is_leader() {
        let Some((_, leader)) = state.admin.leader() else {
            return Err(ApiError::new(ErrorCode::NoLeaderAvailable, "No leader for _admin"));
        };
        if hops >= super::calls::MAX_HOPS {
            return Err(ApiError::new(
                ErrorCode::NodeIsReplica,
                format!("{} does not lead _admin ({leader} does)", state.node.name),
            ));
        }
        return super::calls::call(
            state,
            Target::Node(leader),
            AdminCallKind::Join,
            body.to_vec(),
            hops + 1,
        )
        .await;
    }
    let node = request.node;
    check_name("node name", &node.name, 255)?;
    check_name("internal host name", &node.internal_host_name, 255)?;
    check_name("host name", &node.host_name, 255)?;
    let _one_at_a_time = state.membership.lock().await;
    let name = node.name.clone();
    if state.db.call(move |conn| db::node_exists(conn, &name)).await? {
        return Err(same_name(&node.name));
    }
    let all = state.db.call(|conn| db::contexts(conn)).await?;
    let contexts: Vec<String> = match &request.contexts {
        None => all
            .iter()
            .map(|c| c.name.clone())
            .filter(|c| c != ADMIN_CONTEXT)
            .collect(),
        Some(wanted) => {
            for context in wanted {
                if !all.iter().any(|c| &c.name == context) || context == ADMIN_CONTEXT {
                    return Err(ApiError::new(
                        ErrorCode::ContextNotFound,
                        format!("{}: context not found", clip(context)),
                    ));
                }
            }
            wanted.clone()
        }
    };
    // The cluster must reach the new node where it says it is, and find that node there.
    let address = format!("{}:{}", node.internal_host_name, node.grpc_internal_port);
    let hello = super::calls::call(
        state,
        Target::Address(address.clone()),
        AdminCallKind::Hello,
        Vec::new(),
        0,
    )
    .await
    .map_err(|e| {
        ApiError::new(
            ErrorCode::UnknownHost,
            format!(
                "{} (the _admin leader) cannot reach {} at {address}: {} (check its internal host name and port)",
                state.node.name, node.name, e.message
            ),
        )
    })?;
    let there: String = serde_json::from_slice(&hello).unwrap_or_default();
    if there != node.name {
        return Err(ApiError::new(
            ErrorCode::CannotJoin,
            format!("the node at {address} is {there:?}, not {:?}", node.name),
        ));
    }
    let (log_id, response) = state.admin.propose_at(AdminCommand::RegisterNode(node.clone())).await?;
    match response {
        AdminResponse::Applied => {}
        AdminResponse::Refused(Refusal::NodeExists(name)) => return Err(same_name(&name)),
        AdminResponse::Refused(refusal) => return Err(refusal.into()),
    }
    let mut joined = Vec::new();
    for context in contexts {
        let command = AdminCommand::AddMember {
            context: context.clone(),
            node: node.name.clone(),
            role: MemberRole::Primary,
        };
        match state.admin.propose(command).await? {
            AdminResponse::Applied => joined.push(context),
            // Deleted meanwhile: nothing to serve.
            AdminResponse::Refused(Refusal::ContextNotFound(_)) => {}
            AdminResponse::Refused(refusal) => return Err(refusal.into()),
        }
    }
    tracing::info!(node = %node.name, member = log_id.index, contexts = ?joined, "node registered");
    let answer = JoinAnswer {
        member_id: log_id.index,
        leader: state.node.name.clone(),
        contexts: joined,
    };
    Ok(serde_json::to_vec(&answer).expect("a join answer serializes"))
}

fn same_name(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::SameNodeName,
        format!(
            "a node named {name} is already a member of this cluster: give the new node another name \
             (axoniq.axonserver.name), or unregister the old one first (unregister-node)"
        ),
    )
}

/// Removes a node from the cluster (`unregister-node`): it leaves every context it serves
/// (its copies are removed there) and `_admin`.
#[utoipa::path(delete, path = "/v1/cluster/{node}", operation_id = "unregisterNode", tag = "cluster",
    params(("node" = String, Path, description = "Node name", min_length = 1, max_length = 255)),
    responses(
        (status = 200, description = "Unregistered", body = RestResponse),
        (status = 400, description = "The node is the last PRIMARY of a context (AXONIQ-2310)", body = ErrorBody),
        (status = 404, description = "No such node (AXONIQ-1301)", body = ErrorBody),
    ))]
pub async fn unregister(
    State(state): State<AppState>,
    crate::api::PathParams(node): crate::api::PathParams<String>,
) -> Result<Json<RestResponse>, ApiError> {
    check_name("node name", &node, 255)?;
    state.change(AdminCommand::RemoveNode { name: node.clone() }).await?;
    tracing::info!(node = %node, "node unregistered");
    Ok(Json(RestResponse {
        success: true,
        message: format!("{node} is no longer a member of the cluster"),
    }))
}
