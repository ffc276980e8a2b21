//! The cluster as a whole: `POST /v1/context/init` (`init-cluster`) and `GET /v1/cluster`.
//!
//! Every node starts as a one-node cluster that holds `_admin` (DESIGN.md: zero configuration is
//! a usable node), so `init-cluster` on a node that is alone succeeds: it makes sure the named
//! context exists (`default` when none is named) and changes nothing else, which keeps Axon's
//! documented start-up sequence working as written. On a node that is part of a cluster of
//! several nodes it is refused with AXONIQ-2306: initialising again would split the cluster.

use axum::Json;
use axum::extract::{Query, State};
use myelin_proto::errors::ErrorCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::nodes::NodeJson;
use super::{ApiError, AppState};
use crate::control_db::contexts as db;

#[derive(Debug, Deserialize, IntoParams)]
pub struct InitParams {
    /// The first context to create besides `_admin` (default `default`).
    pub context: Option<String>,
}

/// Axon's `RestResponse`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RestResponse {
    pub success: bool,
    pub message: String,
}

/// Makes this node a one-node cluster with `_admin` and a first context (`init-cluster`).
#[utoipa::path(post, path = "/v1/context/init", operation_id = "initCluster", tag = "cluster",
    params(InitParams),
    responses(
        (status = 200, description = "This node is a cluster of its own with the context", body = RestResponse),
        (status = 400, description = "Invalid context name (AXONIQ-2308)", body = ErrorBody),
        (status = 406, description = "Already a member of a cluster of several nodes (AXONIQ-2306)", body = ErrorBody),
    ))]
pub async fn init(
    State(state): State<AppState>,
    Query(params): Query<InitParams>,
) -> Result<Json<RestResponse>, ApiError> {
    let context = params
        .context
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| myelin_proto::DEFAULT_CONTEXT.to_owned());
    let nodes = state.db.call(|conn| db::nodes(conn)).await?;
    let voters = {
        let metrics = state.admin.raft().metrics();
        let metrics = metrics.borrow();
        metrics.membership_config.membership().voter_ids().count()
    };
    if nodes.len() > 1 || voters > 1 {
        return Err(ApiError::new(
            ErrorCode::AlreadyMemberOfCluster,
            format!(
                "{} is already a member of a cluster of {} nodes; init-cluster would start another",
                state.node.name,
                nodes.len().max(voters)
            ),
        ));
    }
    let owned = context.clone();
    let exists = state.db.call(move |conn| db::context(conn, &owned)).await?.is_some();
    let message = if exists {
        format!("{} is a cluster of its own with _admin and {context}", state.node.name)
    } else {
        let request: super::contexts::CreateContext = serde_json::from_value(serde_json::json!({ "context": context }))
            .map_err(|e| ApiError::new(ErrorCode::InvalidContextName, format!("{context}: {e}")))?;
        super::contexts::create_context(&state, request).await?;
        format!(
            "{} is a cluster of its own with _admin and the new context {context}",
            state.node.name
        )
    };
    tracing::info!(context = %context, "init-cluster");
    Ok(Json(RestResponse { success: true, message }))
}

/// The nodes of the cluster (`cluster`), as `/v1/public` lists them.
#[utoipa::path(get, path = "/v1/cluster", operation_id = "listClusterNodes", tag = "cluster",
    responses((status = 200, description = "OK", body = Vec<NodeJson>)))]
pub async fn nodes(state: State<AppState>) -> Result<Json<Vec<NodeJson>>, ApiError> {
    super::nodes::list(state).await
}
