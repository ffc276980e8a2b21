//! The admin HTTP API calls a backup makes. Errors name the call and carry the server's own
//! message (its JSON `{"code", "message"}` body) so an operator reading a cron mail knows what
//! went wrong.

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A listing longer than this is not one a node sends.
const MAX_RESPONSE_BYTES: u64 = 64 << 20;

pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

/// What `/v1/backup/eventstore` answers.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventStoreFiles {
    pub last_closed_segment: i64,
    pub filenames: Vec<String>,
}

/// `/v1/public/me`; only the contexts this node stores matter here.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeEntry {
    storage_context_names: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    code: Option<String>,
    message: Option<String>,
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// HTTPS to the node, with `myelin-cli`'s flags (Axon's `-s/--https`, `-i/--insecure-ssl`) and
/// a CA file. Without `--ca-file` the node's certificate must chain to the Mozilla roots built
/// into the agent.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Tls {
    /// Use HTTPS, even when the server URL says http://.
    #[arg(long = "https", short = 's')]
    pub https: bool,
    /// Do not verify the node's TLS certificate.
    #[arg(long = "insecure-ssl", short = 'i')]
    pub insecure: bool,
    /// PEM file of the CA certificates the node's TLS certificate must chain to.
    #[arg(long = "ca-file", value_name = "FILE", env = "MYELIN_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

impl Tls {
    fn config(&self) -> anyhow::Result<ureq::tls::TlsConfig> {
        let mut config = ureq::tls::TlsConfig::builder();
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path).with_context(|| format!("--ca-file: cannot read {}", path.display()))?;
            let mut certificates = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                if let ureq::tls::PemItem::Certificate(certificate) =
                    item.with_context(|| format!("--ca-file: {} is not PEM", path.display()))?
                {
                    certificates.push(certificate);
                }
            }
            if certificates.is_empty() {
                bail!("--ca-file: {} holds no PEM certificate", path.display());
            }
            config = config.root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certificates)));
        }
        if self.insecure {
            eprintln!("myelin-backup-agent: warning: -i/--insecure-ssl: the node's certificate is not verified");
            config = config.disable_verification(true);
        }
        Ok(config.build())
    }
}

impl Client {
    pub fn new(base: &str, token: Option<String>, tls: &Tls) -> anyhow::Result<Client> {
        let mut base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--server must be an http:// or https:// URL, not {base:?}");
        }
        if tls.https
            && let Some(rest) = base.strip_prefix("http://")
        {
            base = format!("https://{rest}");
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .tls_config(tls.config()?)
            .build()
            .into();
        Ok(Client { agent, base, token })
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    fn finish(
        &self,
        what: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<String> {
        let mut response = result.map_err(|e| self.unreachable(what, e))?;
        let status = response.status();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_string()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => {
                    anyhow::anyhow!("{what}: the answer is larger than {} MiB", MAX_RESPONSE_BYTES >> 20)
                }
                e => self.unreachable(what, e).into(),
            })?;
        if !status.is_success() {
            let detail = match serde_json::from_str::<ErrorBody>(&body) {
                Ok(ErrorBody {
                    code: Some(code),
                    message: Some(message),
                }) => format!("{code}: {message}"),
                _ => body.chars().take(500).collect(),
            };
            bail!("{what}: the server answered {status}: {detail}");
        }
        Ok(body)
    }

    fn get<T: DeserializeOwned>(&self, what: &str, path_and_query: &str) -> anyhow::Result<T> {
        let mut request = self.agent.get(format!("{}{path_and_query}", self.base));
        if let Some(token) = &self.token {
            request = request.header("AxonIQ-Access-Token", token);
        }
        let body = self.finish(what, request.call())?;
        serde_json::from_str(&body).with_context(|| format!("{what}: unexpected answer {:?}", clip(&body)))
    }

    /// Every context whose events this node stores, except the internal ones (`_admin`). On a
    /// node of a cluster that is not every context of the cluster: a node backs up its own
    /// copies.
    pub fn contexts(&self) -> anyhow::Result<Vec<String>> {
        let me: NodeEntry = self.get("listing the contexts this node stores", "/v1/public/me")?;
        Ok(me
            .storage_context_names
            .into_iter()
            .filter(|name| !name.starts_with('_'))
            .collect())
    }

    /// Backs up the control DB; returns the zip's path on the server's host.
    pub fn create_control_db_backup(&self) -> anyhow::Result<String> {
        let what = "backing up the control DB";
        let mut request = self
            .agent
            .post(format!("{}/v1/backup/createControlDbBackup", self.base));
        if let Some(token) = &self.token {
            request = request.header("AxonIQ-Access-Token", token);
        }
        let body = self.finish(what, request.send_empty())?;
        let path = body.trim().to_owned();
        if !path.starts_with('/') {
            bail!("{what}: expected an absolute path, got {:?}", clip(&path));
        }
        Ok(path)
    }

    /// The context's Raft log segment files and Raft state files, in copy order.
    pub fn log_files(&self, context: &str) -> anyhow::Result<Vec<String>> {
        self.get(
            &format!("listing the log of context {context}"),
            &format!("/v1/backup/log/filenames?context={}", encode(context)),
        )
    }

    /// Closed segments after `last_closed` and the open segment of a context.
    pub fn segment_files(&self, context: &str, kind: &str, last_closed: i64) -> anyhow::Result<EventStoreFiles> {
        self.get(
            &format!("listing the {kind} segments of context {context}"),
            &format!(
                "/v1/backup/eventstore?targetContext={}&type={kind}&lastClosedSegmentBackedUp={last_closed}",
                encode(context)
            ),
        )
    }
}

/// No HTTP conversation with the node was possible (refused, unknown host, no answer in time,
/// not HTTP): exit code 3, as `myelin-cli` says of an unreachable server, since a later run may
/// succeed.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

impl Client {
    fn unreachable(&self, what: &str, error: ureq::Error) -> Unreachable {
        let reason = match error {
            ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                "connection refused (is the node running, and is this its admin HTTP port, server.port, default \
                 8024?)"
                    .to_owned()
            }
            // rustls reports through the connection's I/O.
            ureq::Error::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => {
                format!(
                    "TLS failed ({e}): give the CA of the node's certificate with --ca-file, or -i to skip the check"
                )
            }
            ureq::Error::Protocol(e) => format!(
                "it does not speak HTTP/1.1 ({e}): is this the admin HTTP port (and, if the node serves HTTPS, \
                 is it an https:// URL or -s/--https given)?"
            ),
            ureq::Error::Tls(e) => {
                format!(
                    "TLS failed ({e}): give the CA of the node's certificate with --ca-file, or -i to skip the check"
                )
            }
            ureq::Error::Rustls(e) => {
                format!(
                    "TLS failed ({e}): give the CA of the node's certificate with --ca-file, or -i to skip the check"
                )
            }
            e => e.to_string(),
        };
        Unreachable(format!("{what}: cannot reach {}: {reason}", self.base))
    }
}

fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("a-b_c.d"), "a-b_c.d");
        assert_eq!(encode("a b&c"), "a%20b%26c");
        assert!(Client::new("ftp://x", None, &Tls::default()).is_err());
        assert_eq!(
            Client::new("http://h:8024/", None, &Tls::default()).unwrap().server(),
            "http://h:8024"
        );
        let https = Tls {
            https: true,
            ..Tls::default()
        };
        assert_eq!(
            Client::new("http://h:8024", None, &https).unwrap().server(),
            "https://h:8024"
        );
    }
}
