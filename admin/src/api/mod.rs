//! The HTTP API on port 8024: Axon Server's REST paths where they exist, described by an
//! OpenAPI document at `/v3/api-docs` with a browsable Swagger UI at `/swagger-ui/` (assets built
//! into the binary; `/swagger-ui.html` redirects there).
//!
//! Handlers validate every input before touching anything: bodies are at most
//! [`MAX_BODY_BYTES`], unknown JSON fields are refused, names have length limits, and every error
//! is JSON with an AXONIQ code (see `error`). The whole route set is built in [`router`], the one
//! place where a layer for every route (access control, metrics) is added.

pub mod actuator;
pub mod applications;
pub mod clients;
pub mod cluster;
pub mod contexts;
pub mod error;
pub mod nodes;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::admin_relay_client::AdminRelayClient;
use myelin_proto::internal::router_control_client::RouterControlClient;
use myelin_proto::internal::storage_control_client::StorageControlClient;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::control_db::ControlDb;
use crate::control_db::applications::Grant;
use crate::raft::{AdminCommand, AdminGroup};
pub use error::ApiError;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// This node as admin describes it.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub name: String,
    pub hostname: String,
    pub grpc_port: u16,
    pub http_port: u16,
    pub internal_hostname: String,
    pub internal_port: u16,
    /// Where the event store keeps its files (for the disk-space health check).
    pub data_dir: Option<PathBuf>,
    /// Free bytes below which disk space is reported as WARN.
    pub disk_space_threshold: u64,
    /// Whether the client gRPC port serves TLS.
    pub grpc_tls: bool,
    /// Whether this HTTP port serves TLS.
    pub http_tls: bool,
    /// This node's tags (`axoniq.axonserver.tags.*`).
    pub tags: std::collections::BTreeMap<String, String>,
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The local control DB: handlers read it directly, and change replicated rows only through
    /// `admin`.
    pub db: ControlDb,
    /// This node's member of `_admin`.
    pub admin: AdminGroup,
    /// Serializes reloading and publishing the grants, so that a reload that read older rows
    /// never publishes after one that read newer rows.
    pub grants_reload: Arc<tokio::sync::Mutex<()>>,
    pub storage: StorageControlClient<Channel>,
    /// `None` when admin runs without a router (tests).
    pub router: Option<RouterControlClient<Channel>>,
    pub router_health: Option<tonic_health::pb::health_client::HealthClient<Channel>>,
    pub node: Arc<NodeSettings>,
    pub http_metrics: Arc<actuator::HttpMetrics>,
    /// Serializes context creates and deletes (they span the event store and the control DB).
    pub lifecycle: Arc<tokio::sync::Mutex<()>>,
    /// The registered applications' grants, republished after every change (access control
    /// subscribes to it).
    pub grants: Arc<tokio::sync::watch::Sender<Arc<Vec<Grant>>>>,
    /// Backup location and log hold window (`crate::backup`).
    pub backup: Arc<crate::backup::Settings>,
    /// Who may call what (`crate::access`); checked on every HTTP call.
    pub access: Arc<crate::access::Access>,
    /// The router's relay to other nodes' admins; `None` without a router (tests).
    pub admin_relay: Option<AdminRelayClient<Channel>>,
    /// The router's directory of peers (which links are up); `None` without a router.
    pub peers: Option<myelin_proto::internal::peer_directory_client::PeerDirectoryClient<Channel>>,
    /// Serializes joins and unregistrations handled here (each checks, then proposes).
    pub membership: Arc<tokio::sync::Mutex<()>>,
    /// Set when this node joined a cluster: its `_admin` group stopped on purpose, and the
    /// process ends (to be started again) once the answer is sent.
    pub restarting: Arc<std::sync::atomic::AtomicBool>,
}

impl AppState {
    /// Proposes a change to `_admin` and waits until it is committed and applied here. A change
    /// the state refuses comes back as its API error.
    /// Proposed on this node when it leads `_admin`, else forwarded to the leader (and then
    /// waited for until this node has applied it too, so a read after it sees it).
    pub async fn change(&self, command: AdminCommand) -> Result<(), ApiError> {
        crate::cluster::calls::propose(self, command).await?.into_result()?;
        Ok(())
    }

    /// Reloads the applications' grants and publishes them.
    pub async fn applications_changed(&self) -> Result<(), ApiError> {
        let _one_at_a_time = self.grants_reload.lock().await;
        let grants = self
            .db
            .call(|conn| crate::control_db::applications::grants(conn))
            .await?;
        // Admin's own rules first, at once: a token registered by this call must hold for the
        // next HTTP call as soon as this one returns (the rules' follower task, which also
        // serves the router, could be a moment behind: a fresh token was refused as unknown
        // under load). The router catches up through the published grants.
        self.access.update(&grants);
        self.grants.send_replace(Arc::new(grants));
        Ok(())
    }

    /// The contexts this node's event store holds, with their positions.
    pub async fn stored_contexts(&self) -> Result<Vec<myelin_proto::internal::ContextStatus>, ApiError> {
        Ok(self
            .storage
            .clone()
            .list_contexts(myelin_proto::internal::ListContextsRequest {})
            .await
            .map_err(|s| ApiError::from_status("the event store", s))?
            .into_inner()
            .contexts)
    }

    pub fn router_control(&self) -> Result<RouterControlClient<Channel>, ApiError> {
        self.router.clone().ok_or_else(|| {
            ApiError::with_status(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Other,
                "this admin runs without a router",
            )
        })
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Myelin admin API",
        description = "Operating a Myelin node: contexts, nodes, applications, connected clients, event \
                       processors, health and metrics. Paths follow Axon Server's REST API where it has them. \
                       Every error is JSON `{\"code\": \"AXONIQ-xxxx\", \"message\": \"...\"}` with the code also \
                       in the `AxonIQ-ErrorCode` header."
    ),
    tags(
        (name = "contexts", description = "Contexts and the nodes that serve them"),
        (name = "cluster", description = "The cluster as a whole: init-cluster and its nodes"),
        (name = "nodes", description = "Nodes of the cluster"),
        (name = "applications", description = "Registered applications and their access tokens"),
        (name = "clients", description = "Connected client applications, their event processors and handlers"),
        (name = "actuator", description = "Health and metrics"),
        (name = "backup", description = "Control-DB backups and the event store files a backup copies"),
    ),
    components(schemas(error::ErrorBody))
)]
struct ApiDoc;

/// Every documented route (including those merged in by `crate::route_sets`).
pub fn openapi_routes() -> OpenApiRouter<AppState> {
    let mut routes = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(contexts::list))
        .routes(routes!(contexts::create))
        .routes(routes!(contexts::details, contexts::delete))
        .routes(routes!(cluster::init))
        .routes(routes!(cluster::nodes, crate::cluster::join::register))
        .routes(routes!(crate::cluster::join::unregister))
        .routes(routes!(contexts::add_node, contexts::remove_node))
        .routes(routes!(nodes::list))
        .routes(routes!(nodes::me))
        .routes(routes!(applications::create))
        .routes(routes!(applications::list))
        .routes(routes!(applications::delete))
        .routes(routes!(clients::clients))
        .routes(routes!(clients::processors))
        .routes(routes!(clients::handlers))
        .routes(routes!(clients::pause))
        .routes(routes!(clients::start))
        .routes(routes!(clients::split))
        .routes(routes!(clients::merge))
        .routes(routes!(clients::reconnect))
        .routes(routes!(actuator::health))
        .routes(routes!(actuator::prometheus));
    for extra in crate::route_sets() {
        routes = routes.merge(extra);
    }
    routes
}

/// The OpenAPI document alone (for tests and tools).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut api = openapi_routes().into_openapi();
    finish(&mut api);
    api
}

/// Makes the merged document valid whatever each route set wrote: every response gets a
/// description (the status's reason phrase when it has none), and every operation id is unique
/// (a repeated one gets its method and path appended).
fn finish(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for item in api.paths.paths.values() {
        for operation in operations(item) {
            if let Some(id) = &operation.operation_id {
                *seen.entry(id.clone()).or_default() += 1;
            }
        }
    }
    for (path, item) in api.paths.paths.iter_mut() {
        for (method, operation) in operations_mut(item) {
            if let Some(id) = &operation.operation_id
                && seen.get(id).copied().unwrap_or(0) > 1
            {
                let words: String = path
                    .split(|c: char| !c.is_ascii_alphanumeric())
                    .filter(|w| !w.is_empty())
                    .map(|w| format!("{}{}", w[..1].to_ascii_uppercase(), &w[1..]))
                    .collect();
                operation.operation_id = Some(format!("{id}_{method}{words}"));
            }
            for (status, response) in operation.responses.responses.iter_mut() {
                if let RefOr::T(response) = response
                    && response.description.is_empty()
                {
                    response.description = status
                        .parse::<u16>()
                        .ok()
                        .and_then(|s| axum::http::StatusCode::from_u16(s).ok())
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("Response")
                        .to_owned();
                }
            }
        }
    }
}

fn operations(item: &utoipa::openapi::PathItem) -> impl Iterator<Item = &utoipa::openapi::path::Operation> {
    [
        &item.get,
        &item.put,
        &item.post,
        &item.delete,
        &item.options,
        &item.head,
        &item.patch,
        &item.trace,
    ]
    .into_iter()
    .flatten()
}

fn operations_mut(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = (&'static str, &mut utoipa::openapi::path::Operation)> {
    [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("options", &mut item.options),
        ("head", &mut item.head),
        ("patch", &mut item.patch),
        ("trace", &mut item.trace),
    ]
    .into_iter()
    .filter_map(|(method, operation)| operation.as_mut().map(|o| (method, o)))
}

/// The complete HTTP service. Layers that must see every call go here.
pub fn router(state: AppState) -> axum::Router {
    let (routes, mut api) = openapi_routes().split_for_parts();
    finish(&mut api);
    let metrics = state.http_metrics.clone();
    routes
        .route("/", get(crate::status::page))
        .route(
            "/swagger-ui.html",
            get(|| async { Redirect::permanent("/swagger-ui/") }),
        )
        .merge(SwaggerUi::new("/swagger-ui").url("/v3/api-docs", api))
        .route_layer(axum::middleware::from_fn_with_state(metrics, actuator::count_requests))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.access.clone(),
            crate::access::middleware,
        ))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn not_found(axum::extract::State(state): axum::extract::State<AppState>, uri: axum::http::Uri) -> Response {
    state.http_metrics.record("", "unmatched", 404, 0.0);
    ApiError::with_status(
        axum::http::StatusCode::NOT_FOUND,
        ErrorCode::Other,
        format!("no such resource: {}", uri.path()),
    )
    .into_response()
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    ApiError::with_status(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::Other,
        format!("{method} is not allowed on {}", uri.path()),
    )
    .into_response()
}

/// A JSON body whose rejections are API errors.
pub struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(Body(value))
    }
}

/// Query parameters whose rejections are API errors.
pub struct Params<T>(pub T);

impl<S, T> FromRequestParts<S> for Params<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Query(value) = axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Params(value))
    }
}

/// Path parameters whose rejections are API errors.
pub struct PathParams<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(value) = axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(PathParams(value))
    }
}

/// Longest context name (the event store's rule: it is a directory name).
pub const MAX_CONTEXT_NAME: usize = 64;

/// Checks a context name a client sent. The same rule as the event store's: 1 to 64 of
/// `A-Z a-z 0-9 - _ .`, not starting with `.`.
pub fn check_context_name(name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_CONTEXT_NAME
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if valid {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidContextName,
            format!(
                "invalid context name {:?}: use 1 to {MAX_CONTEXT_NAME} letters, digits, '-', '_' or '.', \
                 not starting with '.'",
                clip(name)
            ),
        ))
    }
}

/// Checks a simple name (application, component, processor, client): printable, bounded.
pub fn check_name(what: &str, name: &str, max: usize) -> Result<(), ApiError> {
    if name.is_empty() || name.chars().count() > max || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "invalid {what} {:?}: 1 to {max} characters, no control characters",
            clip(name)
        )));
    }
    Ok(())
}

/// A long client-sent string, shortened for an error message.
pub fn clip(text: &str) -> String {
    const MAX: usize = 80;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        format!("{}...", text.chars().take(MAX).collect::<String>())
    }
}

/// The context a query names, after checking it exists; `None` when it names none.
pub async fn existing_context(state: &AppState, context: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(name) = context else {
        return Ok(None);
    };
    check_context_name(name)?;
    let owned = name.to_owned();
    let exists = state
        .db
        .call(move |conn| Ok(crate::control_db::contexts::context(conn, &owned)?.is_some()))
        .await?;
    if !exists {
        return Err(ApiError::new(
            ErrorCode::ContextNotFound,
            format!("{name}: context not found"),
        ));
    }
    Ok(Some(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_names() {
        for ok in ["default", "orders-2", "a.b", "_admin"] {
            assert!(check_context_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../x", "a/b", ".hidden", "sp ace", &"x".repeat(65), "ü"] {
            let e = check_context_name(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidContextName, "{bad}");
        }
    }

    #[test]
    fn the_openapi_document_lists_every_endpoint() {
        let api = openapi();
        let paths: Vec<&str> = api.paths.paths.keys().map(String::as_str).collect();
        for path in [
            "/v1/public/context",
            "/v1/context",
            "/v1/context/{name}",
            "/v1/public",
            "/v1/public/me",
            "/v1/applications",
            "/v1/public/applications",
            "/v1/applications/{name}",
            "/v1/clients",
            "/v1/processors",
            "/v1/handlers",
            "/v1/components/{component}/processors/{processor}/pause",
            "/v1/components/{component}/processors/{processor}/segments/split",
            "/v1/instructions",
            "/actuator/health",
            "/actuator/prometheus",
        ] {
            assert!(paths.contains(&path), "{path} missing from {paths:?}");
        }
        let mut ids = std::collections::HashSet::new();
        for item in api.paths.paths.values() {
            for operation in operations(item) {
                let id = operation.operation_id.clone().expect("every operation has an id");
                assert!(ids.insert(id.clone()), "operation id {id} repeats");
                for (status, response) in &operation.responses.responses {
                    if let utoipa::openapi::RefOr::T(r) = response {
                        assert!(!r.description.is_empty(), "{id} {status} has no description");
                    }
                }
            }
        }
        let json = api.to_json().unwrap();
        assert!(json.contains("\"openapi\":\"3.1"), "{}", &json[..100]);
    }
}
