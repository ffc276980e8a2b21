//! Nodes: the cluster's nodes (`/v1/public`) and this node (`/v1/public/me`).

use axum::Json;
use axum::extract::State;
use myelin_proto::internal::ListPeersRequest;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::control_db::contexts as db;

/// A node as Axon Server lists it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeJson {
    pub name: String,
    pub host_name: String,
    pub grpc_port: u16,
    pub http_port: u16,
    pub internal_host_name: String,
    pub grpc_internal_port: u16,
    /// Whether this node's link to it is up (always true for itself).
    pub connected: bool,
}

/// Positions of one stored context.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContextPositions {
    pub name: String,
    pub first_token: i64,
    pub last_token: i64,
    pub last_snapshot_token: i64,
}

/// This node, shaped after Axon Server's `/v1/public/me`, plus each stored context's positions.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Me {
    pub name: String,
    pub host_name: String,
    pub grpc_port: u16,
    pub http_port: u16,
    pub internal_host_name: String,
    pub grpc_internal_port: u16,
    pub authentication: bool,
    pub clustered: bool,
    /// Whether the client gRPC port serves TLS (`axoniq.axonserver.ssl.enabled`), as in Axon.
    pub ssl: bool,
    /// Whether the HTTP port serves TLS (`server.ssl.*`); Myelin's own.
    pub http_ssl: bool,
    pub admin_node: bool,
    pub development_mode: bool,
    /// Every context this node serves, `_admin` included.
    pub context_names: Vec<String>,
    /// Contexts with event storage on this node.
    pub storage_context_names: Vec<String>,
    pub contexts: Vec<ContextPositions>,
    /// This node's tags (`axoniq.axonserver.tags.*`): where `GetPlatformServer` sends clients
    /// whose tags match.
    pub tags: std::collections::BTreeMap<String, String>,
}

/// The nodes this node's router has its link up to (best effort: none if the router does not
/// answer).
pub(crate) async fn connected_peers(state: &AppState) -> Vec<String> {
    let Some(mut peers) = state.peers.clone() else {
        return Vec::new();
    };
    match peers.list_peers(ListPeersRequest {}).await {
        Ok(list) => list
            .into_inner()
            .peers
            .into_iter()
            .filter(|p| p.connected)
            .map(|p| p.node)
            .collect(),
        Err(status) => {
            tracing::debug!(error = %status, "the router did not list its peers");
            Vec::new()
        }
    }
}

/// The nodes of the cluster.
#[utoipa::path(get, path = "/v1/public", operation_id = "listNodes", tag = "nodes", responses((status = 200, description = "OK", body = Vec<NodeJson>)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<NodeJson>>, ApiError> {
    let nodes = state.db.call(|conn| db::nodes(conn)).await?;
    let me = state.node.name.clone();
    let connected = connected_peers(&state).await;
    Ok(Json(
        nodes
            .into_iter()
            .map(|n| NodeJson {
                connected: n.name == me || connected.contains(&n.name),
                name: n.name,
                host_name: n.host_name,
                grpc_port: n.grpc_port,
                http_port: n.http_port,
                internal_host_name: n.internal_host_name,
                grpc_internal_port: n.grpc_internal_port,
            })
            .collect(),
    ))
}

/// This node's configuration and its contexts' positions.
#[utoipa::path(get, path = "/v1/public/me", operation_id = "getThisNode", tag = "nodes",
    responses(
        (status = 200, description = "OK", body = Me),
        (status = 503, description = "The event store does not answer", body = ErrorBody),
    ))]
pub async fn me(State(state): State<AppState>) -> Result<Json<Me>, ApiError> {
    let stored = state.stored_contexts().await?;
    let all = state.db.call(|conn| db::contexts(conn)).await?;
    let clustered = state.db.call(|conn| db::nodes(conn)).await?.len() > 1;
    let node = &state.node;
    let mut context_names: Vec<String> = all.into_iter().map(|c| c.name).collect();
    for c in &stored {
        if !context_names.contains(&c.name) {
            context_names.push(c.name.clone());
        }
    }
    Ok(Json(Me {
        name: node.name.clone(),
        host_name: node.hostname.clone(),
        grpc_port: node.grpc_port,
        http_port: node.http_port,
        internal_host_name: node.internal_hostname.clone(),
        grpc_internal_port: node.internal_port,
        authentication: false,
        clustered,
        ssl: node.grpc_tls,
        http_ssl: node.http_tls,
        admin_node: true,
        development_mode: false,
        context_names,
        storage_context_names: stored.iter().map(|c| c.name.clone()).collect(),
        contexts: stored
            .into_iter()
            .map(|c| ContextPositions {
                name: c.name,
                first_token: c.first_token,
                last_token: c.last_token,
                last_snapshot_token: c.last_snapshot_token,
            })
            .collect(),
        tags: node.tags.clone(),
    }))
}
