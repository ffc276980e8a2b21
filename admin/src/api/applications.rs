//! Applications: registered client applications, the token each uses, and the roles it holds per
//! context.
//!
//! A token is shown once, in the answer to the create; the control DB keeps only its SHA-256
//! and its first characters (so an operator can tell tokens apart). Generated tokens are 32
//! bytes from the operating system's CSPRNG, hex-encoded.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use myelin_proto::errors::ErrorCode;
use myelin_proto::roles::Role;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::error::ErrorBody;
use super::{ApiError, AppState, Body, PathParams, check_context_name, clip};
use crate::control_db::applications::{self as db, NewApplication};
use crate::control_db::now_millis;
use crate::raft::AdminCommand;

const MAX_NAME: usize = 128;
const MAX_DESCRIPTION: usize = 1024;
const MAX_CONTEXT_ENTRIES: usize = 64;
const MAX_ROLES_PER_CONTEXT: usize = 32;
const MIN_TOKEN: usize = 16;
const MAX_TOKEN: usize = 512;
const TOKEN_BYTES: usize = 32;
const PREFIX_CHARS: usize = 8;

/// Roles held in one context.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContextRolesJson {
    /// A context name, or `*` for every context.
    #[schema(example = "default", pattern = "^(\\*|[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63})$")]
    pub context: String,
    /// Role names: ADMIN, CONTEXT_ADMIN, DISPATCH_COMMANDS, DISPATCH_QUERY, MONITOR,
    /// PUBLISH_EVENTS, READ, READ_EVENTS, SUBSCRIBE_COMMAND_HANDLER, SUBSCRIBE_QUERY_HANDLER,
    /// USE_CONTEXT, VIEW_CONFIGURATION, WRITE.
    #[schema(example = json!(["READ_EVENTS", "PUBLISH_EVENTS"]), max_items = 32)]
    pub roles: Vec<String>,
}

/// Request to register an application.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApplication {
    /// 1 to 128 letters, digits, `-`, `_` or `.`.
    #[schema(example = "billing", pattern = "^[A-Za-z0-9_.-]{1,128}$")]
    pub name: String,
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub description: Option<String>,
    #[serde(default)]
    #[schema(max_items = 64)]
    pub roles: Option<Vec<ContextRolesJson>>,
    /// The token to use (16 to 512 printable ASCII characters, no spaces); default: a generated
    /// one.
    #[serde(default)]
    #[schema(pattern = "^[!-~]{16,512}$")]
    pub token: Option<String>,
}

/// The answer to a create: the only time the token is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApplication {
    pub name: String,
    pub token: String,
}

/// An application as listed (never with its token).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationJson {
    pub name: String,
    pub description: String,
    /// The first characters of its token.
    pub token_prefix: String,
    /// Unix time in milliseconds.
    pub created_at: i64,
    pub roles: Vec<ContextRolesJson>,
}

/// The outcome of a delete.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedApplication {
    pub name: String,
}

fn check_application_name(name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid application name {:?}: use 1 to {MAX_NAME} letters, digits, '-', '_' or '.'",
            clip(name)
        )))
    }
}

fn generate_token() -> Result<String, ApiError> {
    use rand::TryRngCore;
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| ApiError::internal(format!("no randomness for a token: {e}")))?;
    Ok(hex::encode(bytes))
}

/// Checks the roles and resolves them to known contexts and roles.
async fn check_roles(
    state: &AppState,
    requested: Vec<ContextRolesJson>,
) -> Result<BTreeMap<String, Vec<Role>>, ApiError> {
    if requested.len() > MAX_CONTEXT_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_CONTEXT_ENTRIES} context entries in roles"
        )));
    }
    let mut out: BTreeMap<String, Vec<Role>> = BTreeMap::new();
    for ContextRolesJson { context, roles } in requested {
        if roles.len() > MAX_ROLES_PER_CONTEXT {
            return Err(ApiError::bad_request(format!(
                "at most {MAX_ROLES_PER_CONTEXT} roles per context"
            )));
        }
        if context != "*" {
            check_context_name(&context)?;
            super::existing_context(state, Some(&context)).await?;
        }
        let entry = out.entry(context).or_default();
        for role in roles {
            let role: Role = role.parse().map_err(|_| {
                let known: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
                ApiError::new(
                    ErrorCode::UnknownRole,
                    format!("unknown role {:?}; known roles: {}", clip(&role), known.join(", ")),
                )
            })?;
            if !entry.contains(&role) {
                entry.push(role);
            }
        }
    }
    Ok(out)
}

/// Registers an application. The token in the answer is never shown again.
#[utoipa::path(post, path = "/v1/applications", operation_id = "createApplication", tag = "applications",
    request_body = CreateApplication,
    responses(
        (status = 200, description = "Registered", body = CreatedApplication),
        (status = 400, description = "Invalid name, token or body; unknown role (AXONIQ-2510); name exists", body = ErrorBody),
        (status = 404, description = "A role names an unknown context (AXONIQ-1302)", body = ErrorBody),
        (status = 413, description = "Body larger than 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Body(request): Body<CreateApplication>,
) -> Result<Json<CreatedApplication>, ApiError> {
    check_application_name(&request.name)?;
    let description = request.description.unwrap_or_default();
    if description.chars().count() > MAX_DESCRIPTION {
        return Err(ApiError::bad_request(format!(
            "the description is longer than {MAX_DESCRIPTION} characters"
        )));
    }
    let token = match request.token {
        Some(token) => {
            let printable = token.bytes().all(|b| b.is_ascii_graphic());
            if token.len() < MIN_TOKEN || token.len() > MAX_TOKEN || !printable {
                return Err(ApiError::bad_request(format!(
                    "a token is {MIN_TOKEN} to {MAX_TOKEN} printable ASCII characters without spaces"
                )));
            }
            token
        }
        None => generate_token()?,
    };
    let roles = check_roles(&state, request.roles.unwrap_or_default()).await?;
    let app = NewApplication {
        name: request.name.clone(),
        description,
        token_sha256: Sha256::digest(token.as_bytes()).into(),
        token_prefix: token.chars().take(PREFIX_CHARS).collect(),
        roles: roles
            .into_iter()
            .map(|(context, roles)| (context, roles.iter().map(|r| r.name().to_owned()).collect()))
            .collect(),
        created_at_millis: now_millis(),
    };
    state.change(AdminCommand::CreateApplication(app)).await?;
    state.applications_changed().await?;
    tracing::info!(application = %request.name, "application registered");
    Ok(Json(CreatedApplication {
        name: request.name,
        token,
    }))
}

/// Every registered application with its roles (tokens are never listed).
#[utoipa::path(get, path = "/v1/public/applications", operation_id = "listApplications", tag = "applications",
    responses((status = 200, description = "OK", body = Vec<ApplicationJson>)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<ApplicationJson>>, ApiError> {
    let apps = state.db.call(|conn| db::list(conn)).await?;
    Ok(Json(
        apps.into_iter()
            .map(|a| ApplicationJson {
                name: a.name,
                description: a.description,
                token_prefix: a.token_prefix,
                created_at: a.created_at_millis,
                roles: a
                    .roles
                    .into_iter()
                    .map(|(context, roles)| ContextRolesJson {
                        context,
                        roles: roles.iter().map(|r| r.name().to_owned()).collect(),
                    })
                    .collect(),
            })
            .collect(),
    ))
}

/// Removes an application; its token stops working at once.
#[utoipa::path(delete, path = "/v1/applications/{name}", operation_id = "deleteApplication", tag = "applications",
    params(("name" = String, Path, description = "Application name", pattern = "^[A-Za-z0-9_.-]{1,128}$")),
    responses(
        (status = 200, description = "Deleted", body = DeletedApplication),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such application (AXONIQ-1300)", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<DeletedApplication>, ApiError> {
    check_application_name(&name)?;
    state
        .change(AdminCommand::DeleteApplication { name: name.clone() })
        .await?;
    state.applications_changed().await?;
    tracing::info!(application = %name, "application deleted");
    Ok(Json(DeletedApplication { name }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn application_names() {
        assert!(check_application_name("billing-2.v1").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(129)] {
            assert!(check_application_name(bad).is_err(), "{bad}");
        }
    }
}
