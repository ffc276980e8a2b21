//! Health (`/actuator/health`, Spring's shape) and Prometheus metrics (`/actuator/prometheus`).
//!
//! Health is DOWN when the event store does not answer (clients cannot store or read events),
//! WARN when disk space is below the threshold (or the router does not answer: clients cannot
//! connect, but stored data is safe), UP otherwise. DOWN answers 503 so that load balancers and
//! probes see it without parsing.
//!
//! A node of a cluster of several nodes adds its view of the cluster (`cluster`): its link to
//! each other node, and the leader of `_admin` and of each context it stores. WARN when a link
//! is down or such a group has no leader (its clients cannot append here), not DOWN: this node
//! itself is sound, and a probe must not take it out of service for a fault elsewhere.
//!
//! The metrics text is the concatenation of the event store's and the router's own (asked over
//! their sockets; one that does not answer is left out with a comment saying so) and admin's
//! HTTP request counters, without the samples of contexts the control DB does not hold (a
//! deleted context's series are dropped from the next scrape).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use myelin_proto::internal::{ListContextsRequest, MetricsRequest};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

/// How long a health check waits for a process behind admin.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Up,
    Warn,
    Down,
}

/// One part's health.
#[derive(Debug, Serialize, ToSchema)]
pub struct Component {
    pub status: Status,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, serde_json::Value>,
}

/// The node's health, as Spring Boot's actuator shapes it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: Status,
    /// `eventStore`, `router`, `diskSpace`; `cluster` on a node of a cluster of several.
    pub components: BTreeMap<String, Component>,
}

/// (method, route, status) -> (requests, seconds spent).
type Counts = BTreeMap<(String, String, u16), (u64, f64)>;

/// Counts of admin's own HTTP requests, per method, route and status.
#[derive(Default)]
pub struct HttpMetrics {
    counts: Mutex<Counts>,
}

impl HttpMetrics {
    pub fn record(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let entry = counts.entry((method.to_owned(), route.to_owned(), status)).or_default();
        entry.0 += 1;
        entry.1 += seconds;
    }

    /// The counters in the Prometheus text format.
    pub fn render(&self) -> String {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        out.push_str("# HELP myelin_admin_http_requests_total HTTP requests admin answered.\n");
        out.push_str("# TYPE myelin_admin_http_requests_total counter\n");
        for ((method, route, status), (count, _)) in counts.iter() {
            let _ = writeln!(
                out,
                "myelin_admin_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {count}",
                label(method),
                label(route)
            );
        }
        out.push_str("# HELP myelin_admin_http_request_seconds_total Time spent answering HTTP requests.\n");
        out.push_str("# TYPE myelin_admin_http_request_seconds_total counter\n");
        for ((method, route, status), (_, seconds)) in counts.iter() {
            let _ = writeln!(
                out,
                "myelin_admin_http_request_seconds_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {seconds}",
                label(method),
                label(route)
            );
        }
        out
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Middleware counting each request under its route pattern (bounded label values).
pub async fn count_requests(
    State(metrics): State<std::sync::Arc<HttpMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    metrics.record(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

async fn event_store_health(state: &AppState) -> Component {
    let mut call = tonic::Request::new(ListContextsRequest {});
    call.set_timeout(PROBE_TIMEOUT);
    match state.storage.clone().list_contexts(call).await {
        Ok(r) => {
            let details = r
                .into_inner()
                .contexts
                .into_iter()
                .map(|c| {
                    (
                        c.name,
                        serde_json::json!({
                            "firstToken": c.first_token,
                            "lastEvent": c.last_token,
                            "lastSnapshot": c.last_snapshot_token,
                            "appliedIndex": c.applied_index,
                        }),
                    )
                })
                .collect();
            Component {
                status: Status::Up,
                details,
            }
        }
        Err(status) => Component {
            status: Status::Down,
            details: BTreeMap::from([("error".to_owned(), status.message().into())]),
        },
    }
}

async fn router_health(state: &AppState) -> Component {
    let Some(mut health) = state.router_health.clone() else {
        return Component {
            status: Status::Warn,
            details: BTreeMap::from([("error".to_owned(), "admin runs without a router".into())]),
        };
    };
    let mut call = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: String::new() });
    call.set_timeout(PROBE_TIMEOUT);
    match health.check(call).await {
        Ok(r) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 => {
            Component {
                status: Status::Up,
                details: BTreeMap::new(),
            }
        }
        Ok(_) => Component {
            status: Status::Warn,
            details: BTreeMap::from([("error".to_owned(), "the router is not serving".into())]),
        },
        Err(status) => Component {
            status: Status::Warn,
            details: BTreeMap::from([("error".to_owned(), status.message().into())]),
        },
    }
}

fn disk_health(state: &AppState) -> Component {
    let Some(dir) = state.node.data_dir.clone() else {
        return Component {
            status: Status::Up,
            details: BTreeMap::new(),
        };
    };
    let threshold = state.node.disk_space_threshold;
    match nix::sys::statvfs::statvfs(&dir) {
        Ok(stat) => {
            let free = stat.blocks_available() * stat.fragment_size();
            let total = stat.blocks() * stat.fragment_size();
            let status = if free == 0 {
                Status::Down
            } else if free < threshold {
                Status::Warn
            } else {
                Status::Up
            };
            Component {
                status,
                details: BTreeMap::from([
                    ("path".to_owned(), dir.display().to_string().into()),
                    ("total".to_owned(), total.into()),
                    ("free".to_owned(), free.into()),
                    ("threshold".to_owned(), threshold.into()),
                ]),
            }
        }
        Err(errno) => Component {
            status: Status::Warn,
            details: BTreeMap::from([
                ("path".to_owned(), dir.display().to_string().into()),
                ("error".to_owned(), errno.to_string().into()),
            ]),
        },
    }
}

/// This node's view of its cluster, or `None` on a node of its own.
async fn cluster_health(state: &AppState) -> Option<Component> {
    let (nodes, contexts) = state
        .db
        .call(|conn| crate::control_db::contexts::layout(conn))
        .await
        .ok()?;
    if nodes.len() < 2 {
        return None;
    }
    let connected = super::nodes::connected_peers(state).await;
    let links: serde_json::Map<String, serde_json::Value> = nodes
        .iter()
        .filter(|n| n.name != state.node.name)
        .map(|n| (n.name.clone(), connected.contains(&n.name).into()))
        .collect();
    let mut leaders = serde_json::Map::new();
    for row in contexts.iter().filter(|c| c.member(&state.node.name).is_some()) {
        let leader = super::contexts::leader_of(state, row).await;
        leaders.insert(row.name.clone(), leader.map_or(serde_json::Value::Null, Into::into));
    }
    let sound = links.values().all(|c| c.as_bool() == Some(true)) && leaders.values().all(|l| !l.is_null());
    Some(Component {
        status: if sound { Status::Up } else { Status::Warn },
        details: BTreeMap::from([
            ("connected".to_owned(), links.into()),
            ("leaders".to_owned(), leaders.into()),
        ]),
    })
}

/// The node's health: event store, router, disk space, and on a cluster its view of it.
#[utoipa::path(get, path = "/actuator/health", operation_id = "health", tag = "actuator",
    responses(
        (status = 200, description = "UP or WARN", body = Health),
        (status = 503, description = "DOWN", body = Health),
    ))]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let (event_store, router, cluster) = tokio::join!(
        event_store_health(&state),
        router_health(&state),
        cluster_health(&state)
    );
    let disk = disk_health(&state);
    let mut components = BTreeMap::from([
        ("eventStore".to_owned(), event_store),
        ("router".to_owned(), router),
        ("diskSpace".to_owned(), disk),
    ]);
    if let Some(cluster) = cluster {
        components.insert("cluster".to_owned(), cluster);
    }
    let status = components.values().map(|c| c.status).max().unwrap_or(Status::Up);
    let code = if status == Status::Down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(Health { status, components }))
}

/// The text of a process's metrics, or a comment saying why there is none.
fn section(
    process: &str,
    result: Result<tonic::Response<myelin_proto::internal::MetricsText>, tonic::Status>,
) -> String {
    match result {
        Ok(r) => {
            let mut text = r.into_inner().text;
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text
        }
        Err(status) => format!(
            "# {process} metrics unavailable: {}\n",
            status.message().replace('\n', " ")
        ),
    }
}

/// Metrics of the event store, the router and admin, in the Prometheus text format.
#[utoipa::path(get, path = "/actuator/prometheus", operation_id = "prometheus", tag = "actuator",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String)))]
pub async fn prometheus(State(state): State<AppState>) -> Response {
    let mut storage_call = tonic::Request::new(MetricsRequest {});
    storage_call.set_timeout(PROBE_TIMEOUT);
    let mut storage = state.storage.clone();
    let storage_text = storage.metrics(storage_call);
    let router_text = async {
        match state.router.clone() {
            Some(mut router) => {
                let mut call = tonic::Request::new(MetricsRequest {});
                call.set_timeout(PROBE_TIMEOUT);
                router.metrics(call).await
            }
            None => Err(tonic::Status::unavailable("admin runs without a router")),
        }
    };
    let (storage_text, router_text) = tokio::join!(storage_text, router_text);
    let mut body = section("eventstore", storage_text);
    body.push_str(&section("router", router_text));
    // Read after the scrape: a context created meanwhile is kept, one deleted meanwhile dropped.
    match state.db.call(|conn| crate::control_db::contexts::contexts(conn)).await {
        Ok(rows) => {
            let contexts: BTreeSet<String> = rows.into_iter().map(|row| row.name).collect();
            body = only_existing_contexts(&body, &contexts);
        }
        Err(e) => tracing::debug!(error = %e, "metrics: cannot list the contexts; every series is shown"),
    }
    body.push_str(&state.http_metrics.render());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}

/// The metrics text without the samples of contexts that do not exist: the event store and the
/// router keep a deleted context's series for their life (and the router a series for every
/// context a client named, up to its label budget), so a scrape after a delete went on showing
/// it. A sample is kept when its `context` label names a context of the control DB or the
/// router's overflow label `_other`, or when it has no `context` label.
fn only_existing_contexts(text: &str, contexts: &BTreeSet<String>) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let keep =
            line.starts_with('#') || context_label(line).is_none_or(|c| c == "_other" || contexts.contains(c.as_str()));
        if keep {
            out.push_str(line);
        }
    }
    out
}

/// The value of the `context` label of a sample line `name{a="x",context="y"} value`, unescaped.
fn context_label(line: &str) -> Option<String> {
    let open = line.find('{')?;
    if line[..open].contains(' ') {
        return None;
    }
    let mut rest = &line[open + 1..];
    loop {
        let eq = rest.find("=\"")?;
        let name = rest[..eq].trim_start_matches(',').trim();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (i, '"') => break eq + 2 + i + 1,
                (_, c) => value.push(c),
            }
        };
        if name == "context" {
            return Some(value);
        }
        rest = &rest[end..];
        if rest.starts_with('}') {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_of_contexts_that_do_not_exist_are_dropped() {
        let text = "# HELP myelin_events_appended_total Events appended\n\
                    # TYPE myelin_events_appended_total counter\n\
                    myelin_events_appended_total{context=\"default\"} 3\n\
                    myelin_events_appended_total{context=\"orders\"} 5\n\
                    myelin_event_calls_total{call=\"append\",context=\"orders\",outcome=\"ok\"} 1\n\
                    myelin_event_calls_total{call=\"a,b=\\\"c\\\"\",context=\"default\"} 1\n\
                    myelin_events_appended_total{context=\"_other\"} 7\n\
                    myelin_clients_connected 2\n\
                    myelin_x{node=\"context=\\\"orders\\\"\"} 1\n";
        let contexts: BTreeSet<String> = ["_admin", "default"].iter().map(|c| c.to_string()).collect();
        let kept = only_existing_contexts(text, &contexts);
        assert!(!kept.contains("orders\"} "), "{kept}");
        assert!(!kept.contains("context=\"orders\""), "{kept}");
        for line in [
            "# TYPE myelin_events_appended_total counter\n",
            "myelin_events_appended_total{context=\"default\"} 3\n",
            "myelin_event_calls_total{call=\"a,b=\\\"c\\\"\",context=\"default\"} 1\n",
            "myelin_events_appended_total{context=\"_other\"} 7\n",
            "myelin_clients_connected 2\n",
            "myelin_x{node=\"context=\\\"orders\\\"\"} 1\n",
        ] {
            assert!(kept.contains(line), "{line:?} dropped: {kept}");
        }
    }

    #[test]
    fn counters_render_as_prometheus_text() {
        let m = HttpMetrics::default();
        m.record("GET", "/v1/context/{name}", 200, 0.5);
        m.record("GET", "/v1/context/{name}", 200, 0.25);
        m.record("GET", "a\"b", 404, 0.0);
        let text = m.render();
        assert!(
            text.contains(
                "myelin_admin_http_requests_total{method=\"GET\",route=\"/v1/context/{name}\",status=\"200\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains("route=\"a\\\"b\""), "{text}");
        assert!(text.contains("status=\"200\"} 0.75\n"), "{text}");
    }

    #[test]
    fn the_worst_component_decides() {
        assert_eq!([Status::Up, Status::Warn].into_iter().max(), Some(Status::Warn));
        assert_eq!([Status::Down, Status::Warn].into_iter().max(), Some(Status::Down));
        assert_eq!(
            serde_json::to_string(&Status::Warn).unwrap(),
            "\"WARN\"",
            "Spring's spelling"
        );
    }
}
