//! Errors of the HTTP API: every one is JSON `{"code": "AXONIQ-xxxx", "message": "..."}` with
//! the code also in the `AxonIQ-ErrorCode` header, as Axon Server sends them.
//!
//! The HTTP status comes from the code's row in the error table, except where the request
//! itself was malformed (unknown path, wrong method, unreadable body or parameters): those carry
//! AXONIQ-0001 with the 4xx status that says what was wrong. Anything a client can send gets a
//! 4xx; a 5xx means this node or a process behind it failed.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use myelin_proto::errors::{ERROR_CODE_KEY, ErrorCode};
use serde::Serialize;
use utoipa::ToSchema;

use crate::control_db::DbError;
use crate::raft::{ProposeError, Refusal};

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Axon's error code, `AXONIQ-xxxx`.
    #[schema(example = "AXONIQ-1302")]
    pub code: String,
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    /// An error with the HTTP status of its code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(code.http()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: message.into(),
        }
    }

    /// An error with a chosen status (for problems Axon has no code for).
    pub fn with_status(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// The error as a gRPC status carrying its code, for an admin call from another node
    /// (`from_status` reads it back there).
    pub fn into_status(self) -> tonic::Status {
        if self.code != ErrorCode::Other {
            return self.code.status(self.message);
        }
        let code = match self.status {
            StatusCode::BAD_REQUEST => tonic::Code::InvalidArgument,
            StatusCode::NOT_FOUND => tonic::Code::NotFound,
            StatusCode::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
            StatusCode::GATEWAY_TIMEOUT => tonic::Code::DeadlineExceeded,
            _ => tonic::Code::Internal,
        };
        tonic::Status::new(code, self.message)
    }

    /// A malformed request.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::with_status(StatusCode::BAD_REQUEST, ErrorCode::Other, message)
    }

    /// A failure of this node (logged: the caller cannot fix it).
    pub fn internal(message: impl Into<String>) -> ApiError {
        let message = message.into();
        tracing::error!(%message, "admin request failed");
        ApiError::with_status(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Other, message)
    }

    /// A status from a process behind admin (eventstore, router), keeping its AXONIQ code.
    pub fn from_status(what: &str, status: tonic::Status) -> ApiError {
        let code = status
            .metadata()
            .get(ERROR_CODE_KEY)
            .and_then(|v| v.to_str().ok())
            .map(ErrorCode::parse);
        // The internal hop's message already starts with "[AXONIQ-xxxx] ".
        let text = status.message();
        let text = match text.strip_prefix('[').and_then(|t| t.split_once("] ")) {
            Some((_, rest)) => rest,
            None => text,
        };
        match (code, status.code()) {
            (Some(code), _) if code != ErrorCode::Other => ApiError::new(code, text),
            (_, tonic::Code::Unavailable) => ApiError::with_status(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Other,
                format!("{what} is not available: {text}"),
            ),
            (_, tonic::Code::Unimplemented) => ApiError::with_status(
                StatusCode::NOT_IMPLEMENTED,
                ErrorCode::Other,
                format!("{what} does not support this yet: {text}"),
            ),
            (_, tonic::Code::DeadlineExceeded) => ApiError::with_status(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::Other,
                format!("{what} did not answer in time: {text}"),
            ),
            (_, tonic::Code::InvalidArgument) => ApiError::bad_request(text.to_owned()),
            (_, tonic::Code::NotFound) => ApiError::with_status(StatusCode::NOT_FOUND, ErrorCode::Other, text),
            _ => ApiError::internal(format!("{what}: {text}")),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}] {}", self.status, self.code.code(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.code().to_owned(),
            message: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        response
            .headers_mut()
            .insert(ERROR_CODE_KEY, HeaderValue::from_static(self.code.code()));
        response
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> ApiError {
        ApiError::internal(e.to_string())
    }
}

impl From<ProposeError> for ApiError {
    fn from(e: ProposeError) -> ApiError {
        match e {
            ProposeError::ForwardToLeader(forward) if forward.leader_id.is_none() => ApiError::with_status(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::NoLeaderAvailable,
                "No leader for _admin",
            ),
            // Until changes are forwarded to the leader, this node can only say where it is.
            ProposeError::ForwardToLeader(_) => ApiError::new(ErrorCode::NodeIsReplica, e.to_string()),
            ProposeError::Stopped(_) | ProposeError::Unexpected(_) => {
                ApiError::internal(format!("{e}; the change may or may not have been applied"))
            }
        }
    }
}

/// A change the configuration's state refused: the same answers the API gave before changes
/// went through `_admin`.
impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> ApiError {
        let message = refusal.to_string();
        match refusal {
            Refusal::ContextExists(_) => ApiError::new(ErrorCode::ContextExists, message),
            Refusal::ContextNotFound(_) => ApiError::new(ErrorCode::ContextNotFound, message),
            Refusal::NoSuchNode(_) => ApiError::new(ErrorCode::NoSuchNode, message),
            Refusal::NodeExists(_) => ApiError::new(ErrorCode::SameNodeName, message),
            Refusal::LastPrimary { .. } => ApiError::new(ErrorCode::CannotRemoveLastNode, message),
            Refusal::NoSuchApplication(_) => ApiError::new(ErrorCode::NoSuchApplication, message),
            Refusal::NotAMember { .. } => ApiError::new(ErrorCode::NotAMember, message),
            Refusal::NodeInUse { .. }
            | Refusal::AlreadyMember { .. }
            | Refusal::ApplicationExists(_)
            | Refusal::TokenInUse
            | Refusal::Constraint(_) => ApiError::bad_request(message),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        // 413 (too large) and 415 (not JSON) say what is wrong; every other rejection is an
        // unreadable body: 400, as Axon Server answers (axum would say 422 for wrong fields).
        let status = match rejection.status() {
            s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => s,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::with_status(status, ErrorCode::Other, rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::bad_request(rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::bad_request(rejection.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_from_behind_keep_their_http_status() {
        let e = ApiError::from_status(
            "the event store",
            ErrorCode::ContextNotFound.status("orders: context not found"),
        );
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.code, ErrorCode::ContextNotFound);
        assert_eq!(e.message, "orders: context not found");
        let e = ApiError::from_status("the router", tonic::Status::unavailable("connection refused"));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let response = ApiError::new(ErrorCode::ContextExists, "x").into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers().get(ERROR_CODE_KEY).unwrap(), "AXONIQ-1304");
    }

    #[test]
    fn refusals_and_proposal_failures_answer_as_before() {
        let e = ApiError::from(Refusal::ContextExists("orders".into()));
        assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, ErrorCode::ContextExists));
        assert_eq!(e.message, "orders: context already exists");
        let e = ApiError::from(Refusal::NoSuchApplication("billing".into()));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, ErrorCode::NoSuchApplication)
        );
        assert_eq!(e.message, "billing: no such application");
        let e = ApiError::from(Refusal::TokenInUse);
        assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, ErrorCode::Other));
        assert_eq!(e.message, "that token is in use by another application");

        let no_leader = openraft::error::ForwardToLeader::empty();
        let e = ApiError::from(ProposeError::ForwardToLeader(no_leader));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::NoLeaderAvailable)
        );
        let elsewhere = openraft::error::ForwardToLeader::new(2, openraft::BasicNode::new("n2:8224"));
        let e = ApiError::from(ProposeError::ForwardToLeader(elsewhere));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::NodeIsReplica)
        );
        assert!(e.message.contains("n2:8224"), "{}", e.message);
        let e = ApiError::from(ProposeError::Stopped(openraft::error::Fatal::Stopped));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(e.message.contains("may or may not"), "{}", e.message);
    }
}
