//! Status of this node: an HTML page at `/` and JSON at `/v1/public/me`.

use axum::Json;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use myelin_proto::internal::storage_control_client::StorageControlClient;
use myelin_proto::internal::{ContextStatus, ListContextsRequest};
use serde::Serialize;
use tonic::transport::Channel;

#[derive(Clone)]
pub struct State {
    pub control: StorageControlClient<Channel>,
    pub node_name: String,
    pub hostname: String,
    pub grpc_port: u16,
    pub http_port: u16,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContextJson {
    pub name: String,
    pub first_token: i64,
    pub last_token: i64,
    pub last_snapshot_token: i64,
}

/// Shaped after Axon Server's `/v1/public/me`, plus Myelin's per-context positions.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Me {
    pub name: String,
    pub host_name: String,
    pub grpc_port: u16,
    pub http_port: u16,
    pub authentication: bool,
    pub clustered: bool,
    pub ssl: bool,
    pub admin_node: bool,
    pub development_mode: bool,
    pub context_names: Vec<String>,
    pub storage_context_names: Vec<String>,
    pub contexts: Vec<ContextJson>,
}

pub fn router(state: State) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/v1/public/me", get(me))
        .fallback(not_found)
        .with_state(state)
}

/// A JSON error body, as every admin error is.
fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(serde_json::json!({ "status": status.as_u16(), "error": message })),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error(StatusCode::NOT_FOUND, format!("no such resource: {}", uri.path()))
}

async fn contexts(state: &State) -> Result<Vec<ContextStatus>, Response> {
    let mut control = state.control.clone();
    match control.list_contexts(ListContextsRequest {}).await {
        Ok(r) => Ok(r.into_inner().contexts),
        Err(status) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("event store not available: {}", status.message()),
        )),
    }
}

async fn me(Extract(state): Extract<State>) -> Response {
    let contexts = match contexts(&state).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let names: Vec<String> = contexts.iter().map(|c| c.name.clone()).collect();
    Json(Me {
        name: state.node_name.clone(),
        host_name: state.hostname.clone(),
        grpc_port: state.grpc_port,
        http_port: state.http_port,
        authentication: false,
        clustered: false,
        ssl: false,
        admin_node: true,
        development_mode: false,
        context_names: names.clone(),
        storage_context_names: names,
        contexts: contexts
            .into_iter()
            .map(|c| ContextJson {
                name: c.name,
                first_token: c.first_token,
                last_token: c.last_token,
                last_snapshot_token: c.last_snapshot_token,
            })
            .collect(),
    })
    .into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn page(Extract(state): Extract<State>) -> Response {
    let contexts = match contexts(&state).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let rows: String = contexts
        .iter()
        .map(|c| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&c.name),
                c.last_token,
                c.last_snapshot_token
            )
        })
        .collect();
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Myelin {name}</title></head><body>\
         <h1>Myelin node {name}</h1><p>Clients: {host}:{grpc}</p>\
         <table><thead><tr><th>Context</th><th>Last token</th><th>Last snapshot token</th></tr></thead>\
         <tbody>{rows}</tbody></table></body></html>",
        name = escape(&state.node_name),
        host = escape(&state.hostname),
        grpc = state.grpc_port,
    ))
    .into_response()
}
