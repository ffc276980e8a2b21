//! Access control: who may call what, on HTTP here and on gRPC in the router.
//!
//! Off by default; on with `axoniq.axonserver.accesscontrol.enabled=true`. Callers prove who they
//! are with a token (header or query parameter `AxonIQ-Access-Token`):
//! - the configured admin token (`accesscontrol.admin-token`) may do everything;
//! - the configured application token (`accesscontrol.token`, Axon Server SE's single token)
//!   may use every context as a client (`USE_CONTEXT` in `*`), but not administer the node;
//! - each registered application's token holds the roles given to it per context.
//!
//! Tokens are never stored: only their SHA-256 (they are long random strings, so a fast hash is
//! enough; passwords would need a slow one). The same rules reach the router as an
//! [`AccessSnapshot`] through `AccessRules.Watch`, and every change is pushed at once.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::Stream;
use myelin_proto::errors::{ERROR_CODE_KEY, ErrorCode};
use myelin_proto::internal::access_rules_server::AccessRules;
use myelin_proto::internal::{AccessSnapshot, AccessToken, ContextRoles, WatchAccessRequest};
use myelin_proto::roles::{Operation, Role};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::control_db::applications::Grant;

/// The name of the header (and query parameter) carrying a token.
pub const TOKEN_HEADER: &str = "AxonIQ-Access-Token";

/// The SHA-256 of a token, the only form in which tokens are kept.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Access-control settings from the node's configuration.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub enabled: bool,
    pub admin_token: Option<String>,
    pub app_token: Option<String>,
}

/// The rules in force, and the channel that tells the router about every change.
pub struct Access {
    settings: Settings,
    rules: watch::Sender<Arc<AccessSnapshot>>,
}

impl Access {
    pub fn new(settings: Settings, applications: Vec<Grant>) -> Arc<Access> {
        let snapshot = Arc::new(build_snapshot(&settings, &applications));
        let (rules, _) = watch::channel(snapshot);
        Arc::new(Access { settings, rules })
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// Call after every change to applications or their roles.
    pub fn update(&self, applications: &[Grant]) {
        let snapshot = Arc::new(build_snapshot(&self.settings, applications));
        self.rules.send_replace(snapshot);
    }

    /// Keeps the rules in step with the control DB's published grants, for the life of admin.
    pub fn follow(self: &Arc<Access>, mut grants: watch::Receiver<Arc<Vec<Grant>>>) {
        let access = self.clone();
        tokio::spawn(async move {
            loop {
                let current = grants.borrow_and_update().clone();
                access.update(&current);
                if grants.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    pub fn snapshot(&self) -> Arc<AccessSnapshot> {
        self.rules.borrow().clone()
    }

    /// Decides an HTTP call; `None` means allowed.
    pub fn check(&self, token: Option<&str>, context: Option<&str>, operation: Operation) -> Option<Denied> {
        let snapshot = self.snapshot();
        if !snapshot.enabled {
            return None;
        }
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Some(Denied::MissingToken);
        };
        let hash = token_hash(token);
        let Some(grant) = snapshot.tokens.iter().find(|t| t.token_sha256[..] == hash[..]) else {
            return Some(Denied::InvalidToken);
        };
        if allows(grant, context, operation) {
            None
        } else {
            Some(Denied::Forbidden {
                owner: grant.owner.clone(),
            })
        }
    }
}

/// Whether a token's grant covers `operation`; node-wide operations (no context) need a role
/// held in `*`, or admin.
fn allows(grant: &AccessToken, context: Option<&str>, operation: Operation) -> bool {
    if grant.admin {
        return true;
    }
    grant
        .roles
        .iter()
        .filter(|r| r.context == "*" || Some(r.context.as_str()) == context)
        .flat_map(|r| r.roles.iter())
        .filter_map(|name| name.parse::<Role>().ok())
        .any(|role| role.grants(operation))
}

fn build_snapshot(settings: &Settings, applications: &[Grant]) -> AccessSnapshot {
    let mut tokens = Vec::new();
    if let Some(admin) = settings.admin_token.as_deref().filter(|t| !t.is_empty()) {
        tokens.push(AccessToken {
            token_sha256: token_hash(admin).to_vec().into(),
            owner: "admin-token".into(),
            admin: true,
            roles: vec![],
        });
    }
    if let Some(app) = settings.app_token.as_deref().filter(|t| !t.is_empty()) {
        tokens.push(AccessToken {
            token_sha256: token_hash(app).to_vec().into(),
            owner: "token".into(),
            admin: false,
            roles: vec![ContextRoles {
                context: "*".into(),
                roles: vec![Role::UseContext.name().into()],
            }],
        });
    }
    for app in applications {
        let mut by_context: HashMap<&str, Vec<String>> = HashMap::new();
        for (context, roles) in &app.roles {
            by_context
                .entry(context.as_str())
                .or_default()
                .extend(roles.iter().map(|r| r.name().to_owned()));
        }
        tokens.push(AccessToken {
            token_sha256: app.token_sha256.to_vec().into(),
            owner: app.name.clone(),
            admin: app.roles.iter().any(|(_, roles)| roles.contains(&Role::Admin)),
            roles: by_context
                .into_iter()
                .map(|(context, roles)| ContextRoles {
                    context: context.to_owned(),
                    roles,
                })
                .collect(),
        });
    }
    AccessSnapshot {
        enabled: settings.enabled,
        tokens,
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    MissingToken,
    InvalidToken,
    Forbidden { owner: String },
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            Denied::MissingToken => (
                StatusCode::UNAUTHORIZED,
                ErrorCode::AuthenticationTokenMissing,
                format!("no token: send it in the {TOKEN_HEADER} header"),
            ),
            Denied::InvalidToken => (
                StatusCode::UNAUTHORIZED,
                ErrorCode::AuthenticationInvalidToken,
                "invalid token".to_owned(),
            ),
            Denied::Forbidden { owner } => (
                StatusCode::FORBIDDEN,
                ErrorCode::AuthenticationInvalidToken,
                format!("{owner} holds no role that allows this operation"),
            ),
        };
        let body = serde_json::json!({ "code": code.code(), "message": message });
        let mut response = (status, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert(ERROR_CODE_KEY, HeaderValue::from_static(code.code()));
        response
    }
}

/// The operation an HTTP call performs, and the context it concerns. `None`: open to everyone
/// (health, the OpenAPI document and its browser, static assets).
pub fn http_operation(method: &Method, path: &str, query: Option<&str>) -> Option<(Operation, Option<String>)> {
    use Operation as O;
    let param = |names: &[&str]| -> Option<String> {
        let query = query?;
        url_pairs(query)
            .find(|(k, _)| names.contains(&k.as_str()))
            .map(|(_, v)| v)
    };
    let context = || param(&["context", "targetContext"]);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let get = method == Method::GET;
    let operation = match segments.as_slice() {
        ["actuator", ..] | ["v3", "api-docs", ..] | ["swagger-ui", ..] | ["swagger-ui.html"] | ["favicon.ico"] => {
            return None;
        }
        [""] => O::Monitor,
        ["createControlDbBackup"] | ["v1", "backup", "createControlDbBackup"] => O::CreateControlDbBackup,
        ["v1", "backup", "log", "filenames"] => O::ListBackupLogfiles,
        ["v1", "backup", ..] => O::ListBackupFilenames,
        ["v1", "public", "context"] | ["v1", "context"] if get => O::ListContexts,
        ["v1", "context"] => O::CreateContext,
        ["v1", "context", name] => {
            let operation = if get { O::ListContexts } else { O::DeleteContext };
            return Some((operation, Some(decode(name))));
        }
        ["v1", "public"] | ["v1", "public", "me"] => O::ListNodes,
        ["v1", "public", "applications"] => O::ListApplications,
        ["v1", "applications"] if get => O::ListApplications,
        ["v1", "applications", ..] => {
            if get {
                O::ListApplications
            } else if method == Method::DELETE {
                O::DeleteApplication
            } else {
                O::CreateApplication
            }
        }
        ["v1", "clients"] => O::ListClients,
        ["v1", "handlers"] => O::ListHandlers,
        ["v1", "processors", ..] => O::GetEventProcessors,
        ["v1", "instructions"] => O::ReconnectClient,
        ["v1", "components", _, "processors", _, "pause"] => O::PauseEventProcessor,
        ["v1", "components", _, "processors", _, "start"] => O::StartEventProcessor,
        ["v1", "components", _, "processors", _, "segments", "split"] => O::SplitEventProcessorSegments,
        ["v1", "components", _, "processors", _, "segments", "merge"] => O::MergeEventProcessorSegments,
        ["v1", "components", ..] if get => O::GetEventProcessors,
        // Anything else under the API, present or future, is for administrators only.
        _ => O::CreateContext,
    };
    let context = if operation.is_context_scoped() { context() } else { None };
    Some((operation, context))
}

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// `application/x-www-form-urlencoded` pairs of a query string.
fn url_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned()))
}

/// Axum middleware: refuses calls the caller's token does not allow.
pub async fn middleware(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    if !access.enabled() {
        return next.run(request).await;
    }
    let uri = request.uri();
    let Some((operation, context)) = http_operation(request.method(), uri.path(), uri.query()) else {
        return next.run(request).await;
    };
    let token = request
        .headers()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            uri.query().and_then(|q| {
                url_pairs(q)
                    .find(|(k, _)| k.eq_ignore_ascii_case(TOKEN_HEADER))
                    .map(|(_, v)| v)
            })
        });
    match access.check(token.as_deref(), context.as_deref(), operation) {
        None => next.run(request).await,
        Some(denied) => {
            tracing::info!(path = uri.path(), ?denied, "HTTP call denied");
            denied.into_response()
        }
    }
}

/// `AccessRules` for the router: the current snapshot at once, then every change.
pub struct RulesService {
    pub access: Arc<Access>,
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<AccessSnapshot, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AccessRules for RulesService {
    type WatchStream = SnapshotStream;

    async fn watch(
        &self,
        _: tonic::Request<WatchAccessRequest>,
    ) -> Result<tonic::Response<SnapshotStream>, tonic::Status> {
        let mut changes = self.access.rules.subscribe();
        let stream = async_stream(move |tx| async move {
            loop {
                let snapshot = changes.borrow_and_update().clone();
                if tx.send(Ok((*snapshot).clone())).await.is_err() {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(stream))
    }
}

/// A stream fed by a task through a small bounded channel.
fn async_stream<F, Fut>(task: F) -> SnapshotStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<AccessSnapshot, tonic::Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(task(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Arc<Access> {
        Access::new(
            Settings {
                enabled: true,
                admin_token: Some("root".into()),
                app_token: Some("shared".into()),
            },
            vec![Grant {
                name: "billing".into(),
                token_sha256: token_hash("billing-token"),
                roles: vec![("orders".into(), vec![Role::ReadEvents, Role::ContextAdmin])],
            }],
        )
    }

    #[test]
    fn admin_token_does_everything_app_token_only_client_work() {
        let a = access();
        assert_eq!(a.check(Some("root"), None, Operation::CreateContext), None);
        assert_eq!(
            a.check(Some("shared"), None, Operation::CreateContext),
            Some(Denied::Forbidden { owner: "token".into() })
        );
        assert_eq!(a.check(Some("shared"), Some("x"), Operation::GetEventProcessors), None);
        assert_eq!(a.check(None, None, Operation::ListNodes), Some(Denied::MissingToken));
        assert_eq!(
            a.check(Some("nope"), None, Operation::ListNodes),
            Some(Denied::InvalidToken)
        );
    }

    #[test]
    fn application_roles_hold_in_their_context_only() {
        let a = access();
        assert_eq!(
            a.check(Some("billing-token"), Some("orders"), Operation::PauseEventProcessor),
            None
        );
        assert!(
            a.check(Some("billing-token"), Some("default"), Operation::PauseEventProcessor)
                .is_some()
        );
        assert!(
            a.check(Some("billing-token"), None, Operation::CreateApplication)
                .is_some()
        );
        a.update(&[]);
        assert_eq!(
            a.check(Some("billing-token"), Some("orders"), Operation::ListEvents),
            Some(Denied::InvalidToken)
        );
    }

    #[test]
    fn disabled_allows_everything() {
        let a = Access::new(Settings::default(), vec![]);
        assert_eq!(a.check(None, None, Operation::CreateContext), None);
    }

    #[test]
    fn http_calls_map_to_operations() {
        let op = |m: Method, p: &str, q: Option<&str>| http_operation(&m, p, q);
        assert_eq!(op(Method::GET, "/actuator/health", None), None);
        assert_eq!(op(Method::GET, "/swagger-ui/index.html", None), None);
        assert_eq!(
            op(Method::POST, "/v1/context", None),
            Some((Operation::CreateContext, None))
        );
        assert_eq!(
            op(Method::DELETE, "/v1/context/orders", None),
            Some((Operation::DeleteContext, Some("orders".into())))
        );
        assert_eq!(
            op(
                Method::PATCH,
                "/v1/components/app/processors/p1/pause",
                Some("context=orders")
            ),
            Some((Operation::PauseEventProcessor, Some("orders".into())))
        );
        assert_eq!(
            op(Method::GET, "/v1/backup/filenames", Some("type=EVENT&context=a%2Db")),
            Some((Operation::ListBackupFilenames, Some("a-b".into())))
        );
        assert_eq!(
            op(Method::GET, "/v1/whatever/new", None),
            Some((Operation::CreateContext, None))
        );
    }

    #[tokio::test]
    async fn the_router_hears_every_change() {
        let a = access();
        let service = RulesService { access: a.clone() };
        let mut stream = service
            .watch(tonic::Request::new(WatchAccessRequest {}))
            .await
            .unwrap()
            .into_inner();
        use futures::StreamExt;
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.tokens.len(), 3);
        a.update(&[]);
        let second = stream.next().await.unwrap().unwrap();
        assert_eq!(second.tokens.len(), 2);
    }
}
