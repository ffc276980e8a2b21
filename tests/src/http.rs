//! HTTP calls to a node's admin API in tests: one blocking ureq request run off the async
//! runtime, answering status, the `AxonIQ-ErrorCode` header and the body whatever the status.

use std::time::Duration;

use serde_json::Value;

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub error_code: Option<String>,
    pub content_type: String,
    pub location: Option<String>,
    /// `myelin-unreachable-nodes`: nodes whose part of a cluster-wide listing is missing.
    pub unreachable_nodes: Option<String>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// Asserts an error answer: status, AXONIQ code in body and header, JSON shape.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert!(self.content_type.starts_with("application/json"), "{self:?}");
        let body = self.json();
        assert_eq!(body["code"], code, "{self:?}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{self:?}");
        assert_eq!(self.error_code.as_deref(), Some(code), "{self:?}");
    }
}

/// One request. `method` is GET, DELETE, PATCH, POST (JSON body when given) or POST-TEXT;
/// `token` goes in the `AxonIQ-Access-Token` header.
pub async fn request(port: u16, method: &'static str, path: &str, body: Option<String>, token: Option<&str>) -> Reply {
    request_at("127.0.0.1", port, method, path, body, token).await
}

/// [`request`] to a node listening on another loopback address.
pub async fn request_at(
    host: &str,
    port: u16,
    method: &'static str,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> Reply {
    let url = format!("http://{host}:{port}{path}");
    let token = token.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let with_token = |mut headers: Vec<(&'static str, String)>| {
            if let Some(token) = &token {
                headers.push(("AxonIQ-Access-Token", token.clone()));
            }
            headers
        };
        macro_rules! headers {
            ($builder:expr, $extra:expr) => {{
                let mut builder = $builder;
                for (name, value) in with_token($extra) {
                    builder = builder.header(name, value);
                }
                builder
            }};
        }
        let result = match (method, body) {
            ("GET", _) => headers!(agent.get(&url), vec![]).call(),
            ("DELETE", _) => headers!(agent.delete(&url), vec![]).call(),
            ("PATCH", None) => headers!(agent.patch(&url), vec![]).send_empty(),
            ("POST", None) => headers!(agent.post(&url), vec![]).send_empty(),
            ("POST", Some(body)) => {
                headers!(agent.post(&url), vec![("content-type", "application/json".to_owned())]).send(body)
            }
            ("POST-TEXT", Some(body)) => {
                headers!(agent.post(&url), vec![("content-type", "text/plain".to_owned())]).send(body)
            }
            other => panic!("unsupported {other:?}"),
        };
        let mut response = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Reply {
            status: response.status().as_u16(),
            error_code: header("AxonIQ-ErrorCode"),
            content_type: header("content-type").unwrap_or_default(),
            location: header("location"),
            unreachable_nodes: header("myelin-unreachable-nodes"),
            body: response.body_mut().read_to_string().unwrap_or_default(),
        }
    })
    .await
    .unwrap()
}
