//! Contexts: list, details, create, delete, and their members (add and remove a node).
//!
//! Every change is an `_admin` entry first; each member's node then carries it out on its event
//! store (`crate::cluster::placement`): a create gives every member its seat in the context's
//! group, a delete or a removed member leaves a departure that the member's node acts on (its
//! copy removed, or set aside with `preserveEventStore`). A crash at any step heals by itself:
//! placement retries until the event stores match the configuration.
//!
//! The handler answers once the entry is committed and applied to this node's control DB, and
//! this node's own part is done (its storage created or removed); membership changes of a
//! context's group (a node added or removed) complete in the background, on the group's leader.
//!
//! `_admin` is the control DB itself: it is listed (this node PRIMARY) but holds no event
//! storage, and neither it nor any other name starting with `_` can be created or deleted here.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::{CloseContextRequest, ContextStatus, GroupStatusRequest, ListContextsRequest};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::{ApiError, AppState, Body, Params, PathParams, check_context_name, check_name, clip};
use crate::control_db::contexts::{self as db, ContextRow, Member, MemberRole};
use crate::control_db::now_millis;
use crate::raft::AdminCommand;

/// The control DB's own context.
pub const ADMIN_CONTEXT: &str = "_admin";
const MAX_ROLES: usize = 16;
const MAX_META_ENTRIES: usize = 64;
const MAX_META_KEY: usize = 128;
const MAX_META_VALUE: usize = 1024;

/// A node's role in a context.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeAndRole {
    #[schema(example = "node-1", min_length = 1, max_length = 255)]
    pub node: String,
    /// PRIMARY, ACTIVE_BACKUP, PASSIVE_BACKUP or MESSAGING_ONLY (a single node holds its
    /// contexts as PRIMARY).
    #[schema(
        example = "PRIMARY",
        pattern = "^(PRIMARY|ACTIVE_BACKUP|PASSIVE_BACKUP|MESSAGING_ONLY)$"
    )]
    pub role: String,
}

/// A context as Axon Server lists it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContextJson {
    pub context: String,
    /// The Raft group storing it: the context's own.
    pub replication_group: String,
    pub meta_data: BTreeMap<String, String>,
    pub change_pending: bool,
    pub pending_since: i64,
    /// The node leading its group; absent when no node stores it.
    pub leader: Option<String>,
    pub roles: Vec<NodeAndRole>,
}

/// Where a context's event store stands.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Positions {
    /// First token still stored (0 unless truncated).
    pub first_token: i64,
    /// Token of the newest event, -1 when there is none.
    pub last_token: i64,
    /// Token of the newest snapshot, -1 when there is none.
    pub last_snapshot_token: i64,
    /// Index of the last Raft entry applied.
    pub applied_index: u64,
}

/// A context with the state of its storage.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContextDetails {
    #[serde(flatten)]
    pub context: ContextJson,
    /// Unix time in milliseconds when it was recorded.
    pub created_at: i64,
    /// Positions on this node; absent for `_admin` (no event storage) or when the event store
    /// does not answer.
    pub event_store: Option<Positions>,
}

/// Request to create a context.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateContext {
    /// 1 to 64 letters, digits, `-`, `_` or `.`; not starting with `_` (reserved) or `.`.
    #[schema(
        example = "orders",
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9-][A-Za-z0-9_.-]{0,63}$"
    )]
    pub context: String,
    /// Members and their roles; default: this node as PRIMARY.
    #[serde(default)]
    #[schema(max_items = 16)]
    pub roles: Option<Vec<NodeAndRole>>,
    /// Axon's shorthand: these nodes as PRIMARY members (beside `roles`).
    #[serde(default)]
    #[schema(max_items = 16)]
    pub nodes: Option<Vec<String>>,
    /// Free-form properties, kept with the context.
    #[serde(default)]
    pub meta_data: Option<BTreeMap<String, String>>,
    /// Accepted for Axon compatibility: must be absent, empty or the context's own name.
    #[serde(default)]
    pub replication_group: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct DeleteParams {
    /// Keep the context's files on disk (moved under `.preserved/` in the data directory)
    /// instead of removing them.
    #[serde(default)]
    pub preserve_event_store: Option<bool>,
}

/// The outcome of a delete.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Deleted {
    pub context: String,
    pub preserved_event_store: bool,
}

/// The node leading `row`'s group, as this node knows it: `_admin`'s from its own member, a
/// context's from this node's event store when it stores the context (else unknown here).
pub(crate) async fn leader_of(state: &AppState, row: &ContextRow) -> Option<String> {
    if row.name == ADMIN_CONTEXT {
        return state.admin.leader().map(|(_, name)| name);
    }
    row.member(&state.node.name)?;
    let status = state
        .storage
        .clone()
        .get_group_status(GroupStatusRequest {
            context: row.name.clone(),
        })
        .await
        .ok()?
        .into_inner();
    row.node_of(status.leader?).map(str::to_owned)
}

fn to_json(row: &ContextRow, leader: Option<String>) -> ContextJson {
    ContextJson {
        context: row.name.clone(),
        replication_group: row.name.clone(),
        meta_data: row.meta_data.clone(),
        change_pending: false,
        pending_since: 0,
        leader,
        roles: row
            .members
            .iter()
            .map(|m| NodeAndRole {
                node: m.node.clone(),
                role: m.role.name().to_owned(),
            })
            .collect(),
    }
}

fn positions(status: &ContextStatus) -> Positions {
    Positions {
        first_token: status.first_token,
        last_token: status.last_token,
        last_snapshot_token: status.last_snapshot_token,
        applied_index: status.applied_index,
    }
}

/// Every context, with its members and their roles.
#[utoipa::path(get, path = "/v1/public/context", operation_id = "listContexts", tag = "contexts",
    responses((status = 200, description = "OK", body = Vec<ContextJson>)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<ContextJson>>, ApiError> {
    let rows = state.db.call(|conn| db::contexts(conn)).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(to_json(row, leader_of(&state, row).await));
    }
    Ok(Json(out))
}

async fn find(state: &AppState, name: &str) -> Result<ContextRow, ApiError> {
    let owned = name.to_owned();
    state
        .db
        .call(move |conn| db::context(conn, &owned))
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::ContextNotFound, format!("{name}: context not found")))
}

/// One context: members, roles, and where its event store stands.
#[utoipa::path(get, path = "/v1/context/{name}", operation_id = "getContext", tag = "contexts",
    params(("name" = String, Path, description = "Context name", min_length = 1, max_length = 64,
        pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")),
    responses(
        (status = 200, description = "OK", body = ContextDetails),
        (status = 400, description = "Invalid name (AXONIQ-2308)", body = ErrorBody),
        (status = 404, description = "No such context (AXONIQ-1302)", body = ErrorBody),
    ))]
pub async fn details(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<ContextDetails>, ApiError> {
    check_context_name(&name)?;
    let row = find(&state, &name).await?;
    let event_store = if name == ADMIN_CONTEXT {
        None
    } else {
        match state.storage.clone().list_contexts(ListContextsRequest {}).await {
            Ok(r) => r.into_inner().contexts.iter().find(|c| c.name == name).map(positions),
            Err(status) => {
                tracing::warn!(error = %status, "event store did not answer");
                None
            }
        }
    };
    Ok(Json(ContextDetails {
        context: to_json(&row, leader_of(&state, &row).await),
        created_at: row.created_at_millis,
        event_store,
    }))
}

/// Checks a create request and returns its members and metadata.
async fn validate(
    state: &AppState,
    request: &CreateContext,
) -> Result<(Vec<Member>, BTreeMap<String, String>), ApiError> {
    let name = &request.context;
    check_context_name(name)?;
    if name.starts_with('_') {
        return Err(ApiError::new(
            ErrorCode::InvalidContextName,
            format!("{name}: names starting with '_' are reserved for the system"),
        ));
    }
    if let Some(group) = &request.replication_group
        && !group.is_empty()
        && group != name
    {
        return Err(ApiError::new(
            ErrorCode::InvalidPropertyValue,
            format!(
                "replication group {:?}: a context is stored in its own group here (use {name:?} or leave it out)",
                clip(group)
            ),
        ));
    }
    let meta = request.meta_data.clone().unwrap_or_default();
    if meta.len() > MAX_META_ENTRIES {
        return Err(ApiError::new(
            ErrorCode::InvalidPropertyValue,
            format!("at most {MAX_META_ENTRIES} metaData entries"),
        ));
    }
    for (key, value) in &meta {
        if key.is_empty() || key.chars().count() > MAX_META_KEY || value.chars().count() > MAX_META_VALUE {
            return Err(ApiError::new(
                ErrorCode::InvalidPropertyValue,
                format!(
                    "metaData {:?}: keys are 1 to {MAX_META_KEY} characters, values at most {MAX_META_VALUE}",
                    clip(key)
                ),
            ));
        }
    }

    let mut requested = request.roles.clone().unwrap_or_default();
    for node in request.nodes.clone().unwrap_or_default() {
        if !requested.iter().any(|r| r.node == node) {
            requested.push(NodeAndRole {
                node,
                role: MemberRole::Primary.name().to_owned(),
            });
        }
    }
    if requested.len() > MAX_ROLES {
        return Err(ApiError::bad_request(format!("at most {MAX_ROLES} roles")));
    }
    let this_node = state.node.name.clone();
    if requested.is_empty() {
        return Ok((
            vec![Member {
                node: this_node,
                role: MemberRole::Primary,
            }],
            meta,
        ));
    }
    let mut members: Vec<Member> = Vec::new();
    for NodeAndRole { node, role } in requested {
        check_name("node name", &node, 255)?;
        let role: MemberRole = role.parse().map_err(|_| {
            ApiError::new(
                ErrorCode::UnknownRole,
                format!(
                    "unknown role {:?}; a node's role in a context is PRIMARY, ACTIVE_BACKUP, PASSIVE_BACKUP or \
                     MESSAGING_ONLY",
                    clip(&role)
                ),
            )
        })?;
        let owned = node.clone();
        if !state.db.call(move |conn| db::node_exists(conn, &owned)).await? {
            return Err(ApiError::new(
                ErrorCode::NoSuchNode,
                format!("{}: no such node", clip(&node)),
            ));
        }
        if members.iter().any(|m| m.node == node) {
            return Err(ApiError::bad_request(format!("node {node} is named twice")));
        }
        members.push(Member { node, role });
    }
    // One node: it stores what it serves, so it can only be the context's PRIMARY.
    if let Some(other) = members.iter().find(|m| m.role != MemberRole::Primary) {
        return Err(ApiError::new(
            ErrorCode::InvalidPropertyValue,
            format!(
                "node {} as {}: this single node can hold a context only as PRIMARY (backup and \
                 messaging-only members arrive with clustering)",
                other.node, other.role
            ),
        ));
    }
    Ok((members, meta))
}

/// Creates a context: its storage on this node and its record in the control DB.
#[utoipa::path(post, path = "/v1/context", operation_id = "createContext", tag = "contexts",
    request_body = CreateContext,
    responses(
        (status = 200, description = "Created", body = ContextJson),
        (status = 400, description = "Invalid or reserved name (AXONIQ-2308), exists (AXONIQ-1304), \
                                      unknown role (AXONIQ-2510), bad body", body = ErrorBody),
        (status = 404, description = "Unknown node (AXONIQ-1301)", body = ErrorBody),
        (status = 413, description = "Body larger than 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Body(request): Body<CreateContext>,
) -> Result<Json<ContextJson>, ApiError> {
    create_context(&state, request).await.map(Json)
}

/// Creates a context as `POST /v1/context` does (also used by `POST /v1/context/init`).
pub(crate) async fn create_context(state: &AppState, request: CreateContext) -> Result<ContextJson, ApiError> {
    let state = state.clone();
    let (members, meta) = validate(&state, &request).await?;
    let name = request.context;
    let _lifecycle = state.lifecycle.lock().await;
    let owned = name.clone();
    if state.db.call(move |conn| db::context(conn, &owned)).await?.is_some() {
        return Err(ApiError::new(
            ErrorCode::ContextExists,
            format!("{name}: context already exists"),
        ));
    }
    let stores_here = members.iter().any(|m| m.node == state.node.name && m.role.stores());
    let command = AdminCommand::CreateContext {
        name: name.clone(),
        meta_data: meta,
        members,
        created_at_millis: now_millis(),
        seats: Vec::new(),
    };
    state.change(command).await?;
    if stores_here {
        // Its storage here, now (the other members' nodes create theirs as they apply it).
        crate::cluster::placement::converge(&state, &name)
            .await
            .map_err(|e| ApiError::internal(format!("{name} is created, but its storage here is not yet: {e}")))?;
    }
    tracing::info!(context = %name, "context created");
    let row = find(&state, &name).await?;
    let leader = leader_of(&state, &row).await;
    Ok(to_json(&row, leader))
}

/// Deletes a context: stops it, removes its files (unless `preserveEventStore=true`), forgets it,
/// and disconnects its clients' streams.
#[utoipa::path(delete, path = "/v1/context/{name}", operation_id = "deleteContext", tag = "contexts",
    params(("name" = String, Path, description = "Context name", min_length = 1, max_length = 64,
        pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$"), DeleteParams),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 400, description = "Invalid name (AXONIQ-2308)", body = ErrorBody),
        (status = 403, description = "Internal context (AXONIQ-2304)", body = ErrorBody),
        (status = 404, description = "No such context (AXONIQ-1302)", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
    Params(params): Params<DeleteParams>,
) -> Result<Json<Deleted>, ApiError> {
    check_context_name(&name)?;
    if name.starts_with('_') {
        return Err(ApiError::new(
            ErrorCode::CannotDeleteInternalContext,
            format!("{name}: internal contexts cannot be deleted"),
        ));
    }
    let preserve = params.preserve_event_store.unwrap_or(false);
    let _lifecycle = state.lifecycle.lock().await;
    find(&state, &name).await?;
    match state
        .change(AdminCommand::DeleteContext {
            name: name.clone(),
            preserve,
        })
        .await
    {
        // Gone already: what the caller asked for holds.
        Err(e) if e.code == ErrorCode::ContextNotFound => {}
        other => other?,
    }
    // This node's copy goes now (the other members' nodes remove theirs as they apply it).
    if let Err(e) = crate::cluster::placement::converge(&state, &name).await {
        tracing::warn!(context = %name, error = %e, "removing this node's copy; retried in the background");
    }
    // Grants in the context went with it.
    state.applications_changed().await?;
    close_clients(&state, &name).await;
    tracing::info!(context = %name, preserve, "context deleted");
    Ok(Json(Deleted {
        context: name,
        preserved_event_store: preserve,
    }))
}

/// Asks the router to end the client streams of a deleted context; best effort.
async fn close_clients(state: &AppState, name: &str) {
    let Some(mut router) = state.router.clone() else {
        return;
    };
    let mut call = tonic::Request::new(CloseContextRequest {
        context: name.to_owned(),
    });
    call.set_timeout(Duration::from_secs(10));
    match router.close_context(call).await {
        Ok(r) => tracing::info!(
            context = name,
            streams = r.into_inner().closed_streams,
            "client streams closed"
        ),
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            tracing::info!(context = name, "the router cannot close a context's streams yet")
        }
        Err(status) => tracing::warn!(context = name, error = %status, "closing the context's client streams"),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RoleParams {
    /// The node's role in the context (default PRIMARY).
    pub role: Option<String>,
}

/// Makes a node a member of a context (`add-node-to-context`). The node's copy is created and
/// caught up in the background; the context's listing shows it as a member at once.
#[utoipa::path(post, path = "/v1/context/{context}/{node}", operation_id = "addNodeToContext", tag = "contexts",
    params(
        ("context" = String, Path, description = "Context name", min_length = 1, max_length = 64),
        ("node" = String, Path, description = "Node name", min_length = 1, max_length = 255),
        RoleParams),
    responses(
        (status = 202, description = "Added; the node catches up in the background", body = super::cluster::RestResponse),
        (status = 400, description = "Already a member, unknown role (AXONIQ-2510), bad name", body = ErrorBody),
        (status = 404, description = "No such context (AXONIQ-1302) or node (AXONIQ-1301)", body = ErrorBody),
    ))]
pub async fn add_node(
    State(state): State<AppState>,
    PathParams((context, node)): PathParams<(String, String)>,
    Params(params): Params<RoleParams>,
) -> Result<(axum::http::StatusCode, Json<super::cluster::RestResponse>), ApiError> {
    check_context_name(&context)?;
    check_name("node name", &node, 255)?;
    if context.starts_with('_') {
        return Err(ApiError::new(
            ErrorCode::InvalidContextName,
            format!("{context}: the members of internal contexts follow the nodes of the cluster"),
        ));
    }
    let role: MemberRole = params.role.as_deref().unwrap_or("PRIMARY").parse().map_err(|_| {
        ApiError::new(
            ErrorCode::UnknownRole,
            format!(
                "unknown role {:?}; a node's role in a context is PRIMARY, ACTIVE_BACKUP, PASSIVE_BACKUP or MESSAGING_ONLY",
                clip(params.role.as_deref().unwrap_or_default())
            ),
        )
    })?;
    if role != MemberRole::Primary {
        return Err(ApiError::new(
            ErrorCode::InvalidPropertyValue,
            format!("node {node} as {role}: only PRIMARY members are built so far (node roles come next)"),
        ));
    }
    let _lifecycle = state.lifecycle.lock().await;
    state
        .change(AdminCommand::AddMember {
            context: context.clone(),
            node: node.clone(),
            role,
        })
        .await?;
    if node == state.node.name
        && let Err(e) = crate::cluster::placement::converge(&state, &context).await
    {
        tracing::warn!(context = %context, error = %e, "joining the context here; retried in the background");
    }
    tracing::info!(context = %context, node = %node, %role, "node added to context");
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(super::cluster::RestResponse {
            success: true,
            message: format!("{node} is a {role} member of {context}; it catches up in the background"),
        }),
    ))
}

/// Removes a node from a context's members (`delete-node-from-context`); its copy is removed
/// there, or set aside with `preserveEventStore=true`.
#[utoipa::path(delete, path = "/v1/context/{context}/{node}", operation_id = "deleteNodeFromContext", tag = "contexts",
    params(
        ("context" = String, Path, description = "Context name", min_length = 1, max_length = 64),
        ("node" = String, Path, description = "Node name", min_length = 1, max_length = 255),
        DeleteParams),
    responses(
        (status = 202, description = "Removed", body = super::cluster::RestResponse),
        (status = 400, description = "Not a member (AXONIQ-2307), the last PRIMARY (AXONIQ-2310)", body = ErrorBody),
        (status = 403, description = "An internal context's members follow the nodes (AXONIQ-2304)", body = ErrorBody),
        (status = 404, description = "No such context (AXONIQ-1302)", body = ErrorBody),
    ))]
pub async fn remove_node(
    State(state): State<AppState>,
    PathParams((context, node)): PathParams<(String, String)>,
    Params(params): Params<DeleteParams>,
) -> Result<(axum::http::StatusCode, Json<super::cluster::RestResponse>), ApiError> {
    check_context_name(&context)?;
    check_name("node name", &node, 255)?;
    if context.starts_with('_') {
        return Err(ApiError::new(
            ErrorCode::CannotDeleteInternalContext,
            format!("{context}: the members of internal contexts follow the nodes of the cluster (unregister-node)"),
        ));
    }
    let preserve = params.preserve_event_store.unwrap_or(false);
    let _lifecycle = state.lifecycle.lock().await;
    state
        .change(AdminCommand::RemoveMember {
            context: context.clone(),
            node: node.clone(),
            preserve,
        })
        .await?;
    if node == state.node.name
        && let Err(e) = crate::cluster::placement::converge(&state, &context).await
    {
        tracing::warn!(context = %context, error = %e, "removing the copy here; retried in the background");
    }
    tracing::info!(context = %context, node = %node, preserve, "node removed from context");
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(super::cluster::RestResponse {
            success: true,
            message: format!(
                "{node} is no longer a member of {context}; its copy is {}",
                if preserve { "set aside" } else { "removed" }
            ),
        }),
    ))
}
