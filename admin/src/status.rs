//! The status page at `/`: this node and its contexts' positions, as HTML.

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use myelin_proto::internal::ListContextsRequest;

use crate::api::{ApiError, AppState};

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub async fn page(State(state): State<AppState>) -> Response {
    let contexts = match state.storage.clone().list_contexts(ListContextsRequest {}).await {
        Ok(r) => r.into_inner().contexts,
        Err(status) => return ApiError::from_status("the event store", status).into_response(),
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
         <tbody>{rows}</tbody></table>\
         <p><a href=\"/swagger-ui/\">API documentation</a></p></body></html>",
        name = escape(&state.node.name),
        host = escape(&state.node.hostname),
        grpc = state.node.grpc_port,
    ))
    .into_response()
}
