//! The admin HTTP API as seen from the command line: one blocking request per command, with a
//! deadline, the access token in the `AxonIQ-Access-Token` header, and every way it can go
//! wrong turned into a [`Failure`] of the right kind.
//!
//! Guarantees: a request never waits longer than the `--timeout` (connect included); an answer
//! larger than [`MAX_ANSWER`] is refused rather than read into memory; an error answer's
//! `{"code", "message"}` body (or at least its `AxonIQ-ErrorCode` header and status) reaches
//! the user as it came.

use std::time::Duration;

use serde_json::Value;
use ureq::Agent;
use ureq::http::Response;

use crate::failure::Failure;

/// Largest answer body read (a listing of many contexts or applications is far smaller).
pub const MAX_ANSWER: u64 = 16 * 1024 * 1024;
/// Longest connection setup allowed, whatever the overall timeout.
const MAX_CONNECT: Duration = Duration::from_secs(5);
/// Header carrying the token, as in Axon Server (REST and gRPC alike).
pub const TOKEN_HEADER: &str = "AxonIQ-Access-Token";

/// What a successful request answered.
#[derive(Debug, PartialEq)]
pub enum Answer {
    Json(Value),
    /// A body that is not JSON (Axon answers some actions with plain text), possibly empty.
    Text(String),
}

/// One admin HTTP endpoint.
pub struct Server {
    /// `scheme://authority[/prefix]`, without a trailing slash.
    base: String,
    token: Option<String>,
    timeout: Duration,
    agent: Agent,
}

impl Server {
    pub fn new(url: &str, token: Option<String>, timeout: Duration) -> Result<Server, Failure> {
        let base = parse_base(url)?;
        if let Some(token) = &token
            && (token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err(Failure::Usage(
                "the access token must be printable ASCII without spaces".to_string(),
            ));
        }
        let agent = agent(timeout, ureq::tls::TlsConfig::default());
        Ok(Server {
            base,
            token,
            timeout,
            agent,
        })
    }

    /// Talks TLS with `config` (https:// servers).
    pub fn with_tls(mut self, config: ureq::tls::TlsConfig) -> Server {
        self.agent = agent(self.timeout, config);
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn get(&self, path: &str) -> Result<Answer, Failure> {
        let url = self.url(path);
        let request = self.agent.get(&url).header("Accept", "application/json");
        let request = match &self.token {
            Some(token) => request.header(TOKEN_HEADER, token),
            None => request,
        };
        self.finish(&url, request.call())
    }

    pub fn post(&self, path: &str, body: Option<&Value>) -> Result<Answer, Failure> {
        let url = self.url(path);
        let request = self.agent.post(&url).header("Accept", "application/json");
        let request = match &self.token {
            Some(token) => request.header(TOKEN_HEADER, token),
            None => request,
        };
        let result = match body {
            Some(body) => request.send_json(body),
            None => request.send_empty(),
        };
        self.finish(&url, result)
    }

    pub fn delete(&self, path: &str) -> Result<Answer, Failure> {
        let url = self.url(path);
        let request = self.agent.delete(&url).header("Accept", "application/json");
        let request = match &self.token {
            Some(token) => request.header(TOKEN_HEADER, token),
            None => request,
        };
        self.finish(&url, request.call())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn finish(&self, url: &str, result: Result<Response<ureq::Body>, ureq::Error>) -> Result<Answer, Failure> {
        let mut response = result.map_err(|e| self.transport_failure(url, e))?;
        let status = response.status().as_u16();
        let header_code = response
            .headers()
            .get("AxonIQ-ErrorCode")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => Failure::BadAnswer {
                    url: url.to_string(),
                    reason: format!("the answer is larger than {} MiB", MAX_ANSWER / 1024 / 1024),
                },
                e => self.transport_failure(url, e),
            })?;
        if (200..300).contains(&status) {
            return Ok(match serde_json::from_str::<Value>(&body) {
                Ok(json) if !body.trim().is_empty() => Answer::Json(json),
                _ => Answer::Text(body),
            });
        }
        Err(refusal(status, header_code, &body))
    }

    /// Turns a transport error into a failure that names the URL and says what to check.
    fn transport_failure(&self, url: &str, error: ureq::Error) -> Failure {
        use std::io::ErrorKind;
        let unreachable = |reason: String| Failure::Unreachable {
            url: self.base.clone(),
            reason,
        };
        match error {
            ureq::Error::Io(e) if e.kind() == ErrorKind::ConnectionRefused => unreachable(
                "connection refused (is the node running, and is this its admin HTTP port, server.port, \
                 default 8024?)"
                    .to_string(),
            ),
            // rustls reports through the connection's I/O.
            ureq::Error::Io(e) => match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                Some(tls) => unreachable(format!(
                    "TLS failed ({tls}); give the CA of the node's certificate with --ca-file, or -i to skip \
                     the check"
                )),
                None => unreachable(e.to_string()),
            },
            ureq::Error::HostNotFound => unreachable("host not found".to_string()),
            ureq::Error::ConnectionFailed => unreachable("connection failed".to_string()),
            ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => unreachable(format!(
                "no connection within {} s",
                self.timeout.min(MAX_CONNECT).as_secs()
            )),
            ureq::Error::Timeout(_) => Failure::TimedOut {
                url: url.to_string(),
                seconds: self.timeout.as_secs(),
            },
            ureq::Error::Tls(e) => unreachable(format!(
                "TLS failed ({e}); give the CA of the node's certificate with --ca-file, or -i to skip \
                 the check"
            )),
            ureq::Error::Rustls(e) => unreachable(format!(
                "TLS failed ({e}); give the CA of the node's certificate with --ca-file, or -i to skip \
                 the check"
            )),
            ureq::Error::Protocol(e) if self.base.starts_with("http://") => unreachable(format!(
                "it does not speak HTTP/1.1 ({e}); the client gRPC port (8124) is not the admin HTTP port \
                 (8024), and a node serving HTTPS needs -s/--https or an https:// URL"
            )),
            ureq::Error::Protocol(e) => unreachable(format!(
                "it does not speak HTTP/1.1 ({e}); the client gRPC port (8124) is not the admin HTTP port (8024)"
            )),
            ureq::Error::TooManyRedirects | ureq::Error::RedirectFailed => Failure::BadAnswer {
                url: url.to_string(),
                reason: "redirected elsewhere; give the node's admin URL with -S".to_string(),
            },
            other => unreachable(other.to_string()),
        }
    }
}

fn agent(timeout: Duration, tls: ureq::tls::TlsConfig) -> Agent {
    Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .timeout_connect(Some(timeout.min(MAX_CONNECT)))
        .user_agent(format!("myelin-cli/{}", env!("CARGO_PKG_VERSION")))
        .tls_config(tls)
        .build()
        .into()
}

/// The failure for an error status: the body's `{"code", "message"}` when it has one, else the
/// `AxonIQ-ErrorCode` header and the body's text (or the status's reason).
fn refusal(status: u16, header_code: Option<String>, body: &str) -> Failure {
    let json = serde_json::from_str::<Value>(body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j.get(name))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let code = field("code").or(header_code);
    let message = field("message")
        .or_else(|| field("error"))
        .or_else(|| {
            let text = body.trim();
            (!text.is_empty() && json.is_none()).then(|| first_line(text, 300))
        })
        .unwrap_or_else(|| {
            ureq::http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("error")
                .to_string()
        });
    Failure::Refused { status, code, message }
}

fn first_line(text: &str, max_chars: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() > max_chars {
        format!("{}...", line.chars().take(max_chars).collect::<String>())
    } else {
        line.to_string()
    }
}

/// Checks a `-S` URL and returns it without a trailing slash.
pub fn parse_base(url: &str) -> Result<String, Failure> {
    let usage = |why: &str| {
        Failure::Usage(format!(
            "invalid server URL {url:?}: {why} (e.g. -S http://localhost:8024)"
        ))
    };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| usage("it must start with http:// or https://"))?;
    if url.contains(['?', '#']) || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(usage("no query, fragment or spaces allowed"));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return Err(usage("it needs a host (and no user name)"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// True when the URL's host is this machine (`localhost`, `127.x.x.x`, `::1`): only then is a
/// token file found on this machine offered to it.
pub fn is_loopback(base: &str) -> bool {
    let rest = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("https://"))
        .unwrap_or(base);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        authority.rsplit_once(':').map_or(authority, |(host, _)| host)
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(parse_base("http://localhost:8024/").unwrap(), "http://localhost:8024");
        assert_eq!(parse_base("https://h/prefix").unwrap(), "https://h/prefix");
        for bad in [
            "localhost:8024",
            "ftp://h",
            "http://",
            "http:///x",
            "http://h:1?x=1",
            "http://u@h",
            "http://h 1",
        ] {
            let err = parse_base(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}: {err}");
        }
    }

    #[test]
    fn loopback_hosts() {
        for local in [
            "http://localhost:8024",
            "http://LOCALHOST",
            "http://127.0.0.1:1",
            "http://127.1.2.3",
            "http://[::1]:8024",
            "https://localhost/x",
        ] {
            assert!(is_loopback(local), "{local}");
        }
        for remote in [
            "http://10.0.0.1:8024",
            "http://node-1:8024",
            "http://[fe80::1]:1",
            "http://localhost.evil",
        ] {
            assert!(!is_loopback(remote), "{remote}");
        }
    }

    #[test]
    fn refusals_keep_the_servers_code_and_message() {
        let f = refusal(
            400,
            Some("AXONIQ-9999".into()),
            r#"{"code":"AXONIQ-1304","message":"context orders already exists"}"#,
        );
        assert_eq!(f.to_string(), "context orders already exists (AXONIQ-1304)");
        let f = refusal(403, Some("AXONIQ-1001".into()), "");
        assert_eq!(f.to_string(), "Forbidden (AXONIQ-1001)");
        let f = refusal(500, None, "<html>\nboom");
        assert_eq!(f.to_string(), "<html> (HTTP 500)");
        let f = refusal(404, None, r#"{"other":1}"#);
        assert_eq!(f.to_string(), "Not Found (HTTP 404)");
        let f = refusal(400, None, &"x".repeat(1000));
        assert!(f.to_string().len() < 330);
    }

    #[test]
    fn tokens_must_fit_in_a_header() {
        let t = Duration::from_secs(1);
        assert!(Server::new("http://h", Some("ok-token".into()), t).is_ok());
        for bad in ["", "with space", "new\nline", "caf\u{e9}"] {
            assert_eq!(
                Server::new("http://h", Some(bad.into()), t).err().unwrap().exit_code(),
                2
            );
        }
    }

    /// A one-request HTTP server: returns its address and a handle yielding the request head
    /// it received. `answer` is written back verbatim (`None`: never answers).
    fn one_shot(answer: Option<String>) -> (String, std::thread::JoinHandle<String>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            match answer {
                Some(answer) => (&stream).write_all(answer.as_bytes()).unwrap(),
                None => std::thread::sleep(Duration::from_secs(3)),
            }
            head
        });
        (url, handle)
    }

    #[test]
    fn sends_the_token_header_and_reads_json() {
        let (url, request) = one_shot(Some(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\nconnection: close\r\n\r\n[1,2,3]"
                .to_string(),
        ));
        let server = Server::new(&url, Some("s3cret-token".into()), Duration::from_secs(5)).unwrap();
        assert_eq!(
            server.get("/v1/public").unwrap(),
            Answer::Json(serde_json::json!([1, 2, 3]))
        );
        let head = request.join().unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get /v1/public http/1.1"), "{head}");
        assert!(head.contains("axoniq-access-token: s3cret-token\r\n"), "{head}");
    }

    #[test]
    fn error_answers_over_the_wire() {
        let body = r#"{"code":"AXONIQ-1302","message":"orders: context not found"}"#;
        let answer = format!(
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\nAxonIQ-ErrorCode: AXONIQ-1302\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let (url, request) = one_shot(Some(answer));
        let server = Server::new(&url, None, Duration::from_secs(5)).unwrap();
        let failure = server.delete("/v1/context/orders").unwrap_err();
        assert_eq!(failure.to_string(), "orders: context not found (AXONIQ-1302)");
        assert_eq!(failure.exit_code(), 1);
        let head = request.join().unwrap().to_ascii_lowercase();
        assert!(!head.contains("axoniq-access-token"), "no token, no header: {head}");
    }

    #[test]
    fn a_silent_server_times_out_with_exit_3() {
        let (url, _request) = one_shot(None);
        let server = Server::new(&url, None, Duration::from_secs(1)).unwrap();
        let started = std::time::Instant::now();
        let failure = server.post("/v1/context", Some(&serde_json::json!({}))).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert!(matches!(failure, Failure::TimedOut { .. }), "{failure}");
        assert!(
            failure.to_string().contains("may or may not have taken effect"),
            "{failure}"
        );
        assert_eq!(failure.exit_code(), 3);
    }

    #[test]
    fn connection_refused_names_the_url_and_exits_3() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Server::new(&format!("http://127.0.0.1:{port}"), None, Duration::from_secs(5)).unwrap();
        let failure = server.get("/v1/public").unwrap_err();
        assert_eq!(failure.exit_code(), 3, "{failure}");
        assert!(failure.to_string().contains(&format!("127.0.0.1:{port}")), "{failure}");
    }
}
