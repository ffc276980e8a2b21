//! Access control on the client API: every call names a token (`AxonIQ-Access-Token`, legacy
//! `Access-Token`) that must grant the call's operation in the call's context.
//!
//! The rules live in admin (applications and their roles in the control DB, the configured
//! tokens). The router follows them over admin's Unix socket (`AccessRules.Watch`): it keeps the
//! newest snapshot in memory and decides each call locally, so a call costs one hash and one map
//! lookup, never a round trip. If admin is away the last snapshot stays in force.
//!
//! Fail closed: a router started with access control on denies every call (UNAVAILABLE) until the
//! first snapshot arrives, instead of serving with no rules.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use myelin_proto::errors::{ERROR_CODE_KEY, ErrorCode};
use myelin_proto::internal::AccessSnapshot;
use myelin_proto::roles::{Operation, Role};
use sha2::{Digest, Sha256};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Header names a client may carry its token in (lower case, as HTTP/2 sends them).
const TOKEN_HEADERS: [&str; 2] = ["axoniq-access-token", "access-token"];

/// The outcome of checking one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Access control is on but the rules have not arrived from admin yet.
    NotLoaded,
    MissingToken,
    InvalidToken,
    /// A known token without a role that grants the operation in the context.
    Forbidden {
        owner: String,
    },
}

/// What one token may do.
#[derive(Debug, Clone, Default)]
struct Grant {
    owner: String,
    admin: bool,
    /// Context name (or `*`) to the roles held there.
    roles: HashMap<String, Vec<Role>>,
}

impl Grant {
    fn allows(&self, context: &str, operation: Operation) -> bool {
        self.admin
            || [context, "*"]
                .iter()
                .filter_map(|c| self.roles.get(*c))
                .flatten()
                .any(|role| role.grants(operation))
    }
}

#[derive(Debug, Default)]
struct Rules {
    enabled: bool,
    loaded: bool,
    /// SHA-256 of a token to what it grants.
    tokens: HashMap<[u8; 32], Grant>,
}

impl Rules {
    fn from_snapshot(snapshot: &AccessSnapshot) -> Rules {
        let mut tokens = HashMap::new();
        for token in &snapshot.tokens {
            let Ok(hash) = <[u8; 32]>::try_from(&token.token_sha256[..]) else {
                tracing::warn!(owner = %token.owner, "access rule with a malformed token hash ignored");
                continue;
            };
            let mut roles: HashMap<String, Vec<Role>> = HashMap::new();
            for context_roles in &token.roles {
                let parsed = context_roles.roles.iter().filter_map(|r| match r.parse::<Role>() {
                    Ok(role) => Some(role),
                    Err(e) => {
                        tracing::warn!(owner = %token.owner, error = %e, "unknown role ignored");
                        None
                    }
                });
                roles.entry(context_roles.context.clone()).or_default().extend(parsed);
            }
            let grant = Grant {
                owner: token.owner.clone(),
                admin: token.admin,
                roles,
            };
            tokens.insert(hash, grant);
        }
        Rules {
            enabled: snapshot.enabled,
            loaded: true,
            tokens,
        }
    }
}

/// The rules in force, shared by every connection.
#[derive(Debug)]
pub struct AccessRules {
    current: RwLock<Arc<Rules>>,
}

impl AccessRules {
    /// Rules before the first snapshot: open when access control is off, closed when it is on.
    pub fn new(enabled: bool) -> Arc<AccessRules> {
        Arc::new(AccessRules {
            current: RwLock::new(Arc::new(Rules {
                enabled,
                loaded: false,
                tokens: HashMap::new(),
            })),
        })
    }

    /// Replaces the rules with a snapshot from admin.
    pub fn apply(&self, snapshot: &AccessSnapshot) {
        let rules = Arc::new(Rules::from_snapshot(snapshot));
        tracing::info!(
            enabled = rules.enabled,
            tokens = rules.tokens.len(),
            "access rules updated"
        );
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = rules;
    }

    fn rules(&self) -> Arc<Rules> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn enabled(&self) -> bool {
        self.rules().enabled
    }

    /// Decides whether `token` may perform `operation` in `context`.
    pub fn check(&self, token: Option<&str>, context: &str, operation: Operation) -> Decision {
        let rules = self.rules();
        if !rules.enabled {
            return Decision::Allow;
        }
        if !rules.loaded {
            return Decision::NotLoaded;
        }
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Decision::MissingToken;
        };
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        match rules.tokens.get(&hash) {
            None => Decision::InvalidToken,
            Some(grant) if grant.allows(context, operation) => Decision::Allow,
            Some(grant) => Decision::Forbidden {
                owner: grant.owner.clone(),
            },
        }
    }
}

/// The gRPC status a denied call gets.
pub fn denial(decision: &Decision, path: &str, context: &str) -> Option<Status> {
    Some(match decision {
        Decision::Allow => return None,
        Decision::NotLoaded => ErrorCode::AxonserverNodeNotConnected
            .status("access control is on and its rules are not loaded yet; try again shortly"),
        Decision::MissingToken => ErrorCode::AuthenticationTokenMissing.status(format!("No token for {path}")),
        Decision::InvalidToken => ErrorCode::AuthenticationInvalidToken.status(format!("Invalid token for {path}")),
        Decision::Forbidden { owner } => {
            let code = ErrorCode::AuthenticationInvalidToken.code();
            let mut metadata = MetadataMap::new();
            metadata.insert(ERROR_CODE_KEY, MetadataValue::from_static(code));
            Status::with_metadata(
                Code::PermissionDenied,
                format!("[{code}] {owner} holds no role that allows {path} in context {context}"),
                metadata,
            )
        }
    })
}

/// Follows admin's rules for as long as the router runs, reconnecting when admin restarts.
pub fn follow(admin_socket: PathBuf, rules: Arc<AccessRules>) -> tokio::task::JoinHandle<()> {
    use myelin_proto::internal::WatchAccessRequest;
    use myelin_proto::internal::access_rules_client::AccessRulesClient;
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let endpoint = match std::path::absolute(&admin_socket) {
                Ok(path) => tonic::transport::Endpoint::from_shared(format!("unix://{}", path.display())),
                Err(e) => {
                    tracing::error!(error = %e, "admin socket path");
                    return;
                }
            };
            let result = async {
                let channel = endpoint?.connect().await?;
                let mut stream = AccessRulesClient::new(channel)
                    .watch(WatchAccessRequest {})
                    .await?
                    .into_inner();
                while let Some(snapshot) = stream.message().await? {
                    rules.apply(&snapshot);
                    backoff = Duration::from_millis(100);
                }
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "following access rules: admin not reachable; retrying");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    })
}

/// A tower layer that checks every client call before it reaches a service.
#[derive(Clone)]
pub struct AccessLayer {
    rules: Arc<AccessRules>,
}

impl AccessLayer {
    pub fn new(rules: Arc<AccessRules>) -> AccessLayer {
        AccessLayer { rules }
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = AccessService<S>;
    fn layer(&self, inner: S) -> AccessService<S> {
        AccessService {
            inner,
            rules: self.rules.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AccessService<S> {
    inner: S,
    rules: Arc<AccessRules>,
}

fn header<'a, B>(request: &'a http::Request<B>, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|name| request.headers().get(*name))
        .and_then(|v| v.to_str().ok())
}

impl<S, B> tower::Service<http::Request<B>> for AccessService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, std::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let Some(operation) = Operation::of_grpc_path(path) else {
            return Either::Left(self.inner.call(request));
        };
        let context = header(&request, &[myelin_proto::AXON_CONTEXT_KEY, "context"])
            .filter(|c| !c.is_empty())
            .unwrap_or(myelin_proto::DEFAULT_CONTEXT);
        let token = header(&request, &TOKEN_HEADERS);
        let decision = self.rules.check(token, context, operation);
        match denial(&decision, path, context) {
            None => Either::Left(self.inner.call(request)),
            Some(status) => {
                tracing::info!(path, context, ?decision, "call denied");
                Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use myelin_proto::internal::{AccessToken, ContextRoles};

    fn token(text: &str, owner: &str, admin: bool, roles: &[(&str, &[&str])]) -> AccessToken {
        AccessToken {
            token_sha256: Sha256::digest(text.as_bytes()).to_vec().into(),
            owner: owner.into(),
            admin,
            roles: roles
                .iter()
                .map(|(c, r)| ContextRoles {
                    context: (*c).into(),
                    roles: r.iter().map(|s| (*s).into()).collect(),
                })
                .collect(),
        }
    }

    fn rules() -> Arc<AccessRules> {
        let rules = AccessRules::new(true);
        rules.apply(&AccessSnapshot {
            enabled: true,
            tokens: vec![
                token("admin-secret", "admin", true, &[]),
                token("reader", "reporting", false, &[("orders", &["READ_EVENTS"])]),
                token("everywhere", "ops", false, &[("*", &["PUBLISH_EVENTS", "BOGUS"])]),
            ],
        });
        rules
    }

    #[test]
    fn closed_until_loaded_when_enabled_and_open_when_disabled() {
        let closed = AccessRules::new(true);
        assert_eq!(
            closed.check(Some("x"), "default", Operation::AppendEvent),
            Decision::NotLoaded
        );
        let open = AccessRules::new(false);
        assert_eq!(open.check(None, "default", Operation::AppendEvent), Decision::Allow);
    }

    #[test]
    fn tokens_grant_roles_per_context() {
        let rules = rules();
        let check = |t, c, o| rules.check(t, c, o);
        assert_eq!(check(None, "orders", Operation::ListEvents), Decision::MissingToken);
        assert_eq!(check(Some(""), "orders", Operation::ListEvents), Decision::MissingToken);
        assert_eq!(
            check(Some("wrong"), "orders", Operation::ListEvents),
            Decision::InvalidToken
        );
        assert_eq!(check(Some("reader"), "orders", Operation::ListEvents), Decision::Allow);
        assert_eq!(
            check(Some("reader"), "orders", Operation::AppendEvent),
            Decision::Forbidden {
                owner: "reporting".into()
            }
        );
        assert!(matches!(
            check(Some("reader"), "default", Operation::ListEvents),
            Decision::Forbidden { .. }
        ));
        assert_eq!(
            check(Some("everywhere"), "any", Operation::AppendEvent),
            Decision::Allow
        );
        assert_eq!(
            check(Some("admin-secret"), "any", Operation::HandleQueries),
            Decision::Allow
        );
    }

    #[test]
    fn denials_carry_axon_codes() {
        let s = denial(&Decision::MissingToken, "/p/M", "default").unwrap();
        assert_eq!(s.code(), Code::Unauthenticated);
        assert!(s.message().starts_with("[AXONIQ-1000]"), "{}", s.message());
        let s = denial(&Decision::Forbidden { owner: "app".into() }, "/p/M", "orders").unwrap();
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(s.metadata().get(ERROR_CODE_KEY).unwrap(), "AXONIQ-1001");
        assert!(denial(&Decision::Allow, "/p/M", "default").is_none());
    }

    #[test]
    fn a_new_snapshot_replaces_the_rules() {
        let rules = rules();
        rules.apply(&AccessSnapshot {
            enabled: false,
            tokens: vec![],
        });
        assert_eq!(rules.check(None, "orders", Operation::AppendEvent), Decision::Allow);
    }
}
