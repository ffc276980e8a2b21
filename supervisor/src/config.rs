//! A node's configuration: Axon Server's keys (plus a few of Myelin's own), layered from
//! several sources, validated before anything starts.
//!
//! Sources, later ones overriding earlier ones key by key:
//! 1. built-in defaults;
//! 2. `axonserver.properties`: `--properties FILE`, else the first of `./axonserver.properties`
//!    and `./config/axonserver.properties`;
//! 3. a TOML file: `--config FILE`, else `./myelin.toml` if present (nested tables and quoted
//!    dotted keys both name the same dotted key);
//! 4. environment variables in Spring's form (`AXONIQ_AXONSERVER_PORT`, `SERVER_PORT`);
//! 5. command-line flags.
//!
//! Every value remembers where it came from, so an invalid one is reported with its key and its
//! source. Environment variable names are lossy (`_` stands for `.`, `-` and camelCase alike), so
//! they are matched against the list of known keys after normalising both sides, never split by
//! rule. Unknown `axoniq.*`/`myelin.*` keys in files are warnings: an Axon Server configuration
//! carries many settings Myelin does not have.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::datasize;

/// What a setting's value must look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Text,
    Port,
    Size,
    Bool,
    Path,
    Address,
    List,
    /// A duration in milliseconds.
    Millis,
}

/// Every key Myelin understands, with its kind. Defaults live in [`Config::from_settings`].
const KEYS: &[(&str, Kind)] = &[
    ("axoniq.axonserver.name", Kind::Text),
    ("axoniq.axonserver.hostname", Kind::Text),
    ("axoniq.axonserver.domain", Kind::Text),
    ("axoniq.axonserver.internal-hostname", Kind::Text),
    ("axoniq.axonserver.internal-domain", Kind::Text),
    ("axoniq.axonserver.port", Kind::Port),
    ("axoniq.axonserver.internal-port", Kind::Port),
    ("server.port", Kind::Port),
    ("axoniq.axonserver.event.storage", Kind::Path),
    ("axoniq.axonserver.snapshot.storage", Kind::Path),
    ("axoniq.axonserver.event.segment-size", Kind::Size),
    ("axoniq.axonserver.snapshot.segment-size", Kind::Size),
    ("axoniq.axonserver.max-message-size", Kind::Size),
    ("axoniq.axonserver.controldb-path", Kind::Path),
    ("axoniq.axonserver.controldb-backup-location", Kind::Path),
    ("myelin.backup.log-hold-minutes", Kind::Text),
    ("management.health.diskspace.threshold", Kind::Size),
    ("axoniq.axonserver.accesscontrol.enabled", Kind::Bool),
    ("axoniq.axonserver.accesscontrol.internal-token", Kind::Text),
    ("axoniq.axonserver.accesscontrol.token", Kind::Text),
    ("axoniq.axonserver.accesscontrol.admin-token", Kind::Text),
    ("axoniq.axonserver.accesscontrol.systemtokenfile", Kind::Path),
    ("axoniq.axonserver.accesscontrol.token-dir", Kind::Path),
    ("axoniq.axonserver.ssl.enabled", Kind::Bool),
    ("axoniq.axonserver.ssl.cert-chain-file", Kind::Path),
    ("axoniq.axonserver.ssl.private-key-file", Kind::Path),
    ("axoniq.axonserver.ssl.internal-cert-chain-file", Kind::Path),
    ("axoniq.axonserver.ssl.internal-private-key-file", Kind::Path),
    ("axoniq.axonserver.ssl.internal-trust-manager-file", Kind::Path),
    // Spring's TLS for the HTTP port: PEM only. The keystore keys are known so that a
    // configuration naming one is refused rather than silently served in plaintext.
    ("server.ssl.enabled", Kind::Bool),
    ("server.ssl.certificate", Kind::Path),
    ("server.ssl.certificate-private-key", Kind::Path),
    ("server.ssl.key-store", Kind::Text),
    ("server.ssl.key-store-type", Kind::Text),
    ("server.ssl.key-store-password", Kind::Text),
    ("server.ssl.key-alias", Kind::Text),
    ("server.ssl.key-password", Kind::Text),
    ("axoniq.axonserver.heartbeat.enabled", Kind::Bool),
    ("axoniq.axonserver.cluster.auto-balancing", Kind::Bool),
    ("axoniq.axonserver.cluster.rebalance-delay", Kind::Text),
    ("axoniq.axonserver.cluster.rebalance-interval", Kind::Text),
    ("axoniq.axonserver.client-heartbeat-frequency", Kind::Millis),
    ("axoniq.axonserver.client-heartbeat-timeout", Kind::Millis),
    ("myelin.runtime-directory", Kind::Path),
    ("myelin.bind-address", Kind::Address),
    ("myelin.contexts", Kind::List),
    ("axoniq.axonserver.autocluster.first", Kind::Text),
    ("axoniq.axonserver.autocluster.contexts", Kind::List),
    ("myelin.router.worker-threads", Kind::Text),
    ("myelin.eventstore.worker-threads", Kind::Text),
    // The eventstore's limits: see EVENTSTORE_LIMITS.
    ("myelin.limits.blacklist-entries", Kind::Text),
    ("myelin.limits.blacklist-bytes", Kind::Size),
    // The router's limits (docs/limits.md): see ROUTER_LIMITS.
    ("myelin.limits.connections", Kind::Text),
    ("myelin.limits.streams-per-connection", Kind::Text),
    ("myelin.limits.event-reads", Kind::Text),
    ("myelin.limits.events-per-transaction", Kind::Text),
    ("myelin.limits.transaction-buffer", Kind::Size),
    ("myelin.limits.transaction-timeout", Kind::Text),
    ("axoniq.axonserver.command-queue-capacity-per-client", Kind::Text),
    ("axoniq.axonserver.query-queue-capacity-per-client", Kind::Text),
    ("myelin.limits.command-queue-bytes-per-client", Kind::Size),
    ("myelin.limits.command-queue-bytes", Kind::Size),
    ("myelin.limits.query-queue-bytes-per-client", Kind::Size),
    ("myelin.limits.query-queue-bytes", Kind::Size),
    ("myelin.limits.command-subscriptions-per-stream", Kind::Text),
    ("myelin.limits.query-subscriptions-per-stream", Kind::Text),
    ("myelin.limits.subscription-bytes-per-stream", Kind::Size),
];

/// The eventstore's limits (docs/limits.md): each key with the eventstore flag it becomes. Counts
/// are Text keys, sizes Size keys; an unset key leaves the process's default, so the defaults
/// live in one place (the process's `Args`).
const EVENTSTORE_LIMITS: &[(&str, &str)] = &[
    ("myelin.limits.blacklist-entries", "--blacklist-entries"),
    ("myelin.limits.blacklist-bytes", "--blacklist-bytes"),
];

/// The router's limits, as [`EVENTSTORE_LIMITS`] are the eventstore's (the transaction timeout
/// is a count of milliseconds).
const ROUTER_LIMITS: &[(&str, &str)] = &[
    ("myelin.limits.connections", "--connections"),
    ("myelin.limits.streams-per-connection", "--streams-per-connection"),
    ("myelin.limits.event-reads", "--event-reads"),
    ("myelin.limits.events-per-transaction", "--events-per-transaction"),
    ("myelin.limits.transaction-buffer", "--transaction-buffer-bytes"),
    ("myelin.limits.transaction-timeout", "--transaction-timeout-ms"),
    (
        "axoniq.axonserver.command-queue-capacity-per-client",
        "--command-queue-capacity",
    ),
    (
        "axoniq.axonserver.query-queue-capacity-per-client",
        "--query-queue-capacity",
    ),
    (
        "myelin.limits.command-queue-bytes-per-client",
        "--command-queue-bytes-per-client",
    ),
    ("myelin.limits.command-queue-bytes", "--command-queue-bytes"),
    (
        "myelin.limits.query-queue-bytes-per-client",
        "--query-queue-bytes-per-client",
    ),
    ("myelin.limits.query-queue-bytes", "--query-queue-bytes"),
    (
        "myelin.limits.command-subscriptions-per-stream",
        "--command-subscriptions-per-stream",
    ),
    (
        "myelin.limits.query-subscriptions-per-stream",
        "--query-subscriptions-per-stream",
    ),
    (
        "myelin.limits.subscription-bytes-per-stream",
        "--subscription-bytes-per-stream",
    ),
];

const DEFAULT_SEGMENT_SIZE: u64 = 256 * 1024 * 1024;
const DEFAULT_MAX_MESSAGE_SIZE: u64 = 4 * 1024 * 1024;
const DEFAULT_DISK_SPACE_THRESHOLD: u64 = 256 * 1024 * 1024;
/// The control DB's file name inside its directory.
pub const CONTROL_DB_FILE: &str = "myelin-controldb.sqlite3";

/// Where a value came from; shown in errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Env(String),
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "file {}", path.display()),
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::Flag(flag) => write!(f, "command-line flag {flag}"),
        }
    }
}

/// A configuration problem: nothing is started when there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot parse configuration file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid value {value:?} for {key} (from {origin}): {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        origin: Origin,
        reason: String,
    },
}

/// What [`load`] reads, gathered by the caller so tests need no process environment.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Directory relative paths (and the default file locations) are resolved against.
    pub cwd: PathBuf,
    /// `--properties FILE`.
    pub properties_file: Option<PathBuf>,
    /// `--config FILE`.
    pub toml_file: Option<PathBuf>,
    /// The process environment.
    pub env: Vec<(String, String)>,
    /// Command-line flags that were given: (flag, key, value).
    pub flags: Vec<(&'static str, &'static str, String)>,
    /// The OS host name, the default node name and host name.
    pub os_hostname: String,
}

/// The validated configuration, plus what the operator should hear about it.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// Files that were read, in order.
    pub files: Vec<PathBuf>,
    pub warnings: Vec<String>,
}

/// Access control settings: accepted now, enforced by the router and admin later.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessControl {
    pub enabled: bool,
    pub internal_token: Option<String>,
    pub token: Option<String>,
    /// Token that may do everything, on HTTP and gRPC.
    pub admin_token: Option<String>,
    pub system_token_file: Option<PathBuf>,
    pub token_dir: Option<PathBuf>,
}

/// TLS settings for the gRPC ports (Axon's `axoniq.axonserver.ssl.*`); checked by `tls::check`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ssl {
    pub enabled: bool,
    pub cert_chain_file: Option<PathBuf>,
    pub private_key_file: Option<PathBuf>,
    pub internal_cert_chain_file: Option<PathBuf>,
    pub internal_private_key_file: Option<PathBuf>,
    pub internal_trust_manager_file: Option<PathBuf>,
}

/// TLS for the HTTP port, as Spring configures it (`server.ssl.*`); checked by `tls::check`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpSsl {
    /// `server.ssl.enabled`; unset means on when a certificate or keystore is named (Spring's
    /// rule).
    pub enabled: Option<bool>,
    pub certificate: Option<PathBuf>,
    pub certificate_private_key: Option<PathBuf>,
    /// `server.ssl.key-store`: not supported, only remembered to be refused.
    pub key_store: Option<String>,
}

/// A node's configuration. Paths are absolute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub name: String,
    pub hostname: String,
    pub domain: Option<String>,
    pub internal_hostname: String,
    pub internal_domain: Option<String>,
    /// Client gRPC port (`axoniq.axonserver.port`).
    pub port: u16,
    /// Node-to-node gRPC port (`axoniq.axonserver.internal-port`).
    pub internal_port: u16,
    /// Admin HTTP port (`server.port`).
    pub http_port: u16,
    pub bind_address: IpAddr,
    /// The data directory (`axoniq.axonserver.event.storage`).
    pub event_storage: PathBuf,
    pub snapshot_storage: PathBuf,
    pub event_segment_size: u64,
    pub snapshot_segment_size: u64,
    pub max_message_size: usize,
    /// Where the internal sockets and pid files live.
    pub runtime_directory: PathBuf,
    /// Contexts created at first start.
    pub contexts: Vec<String>,
    /// `autocluster.first`: the internal address (`host[:port]`) of the node that starts the
    /// cluster; on a clean start a node joins it (or, if it is that node, starts the cluster).
    pub autocluster_first: Option<String>,
    /// `autocluster.contexts`: the contexts the first node creates and the others join.
    pub autocluster_contexts: Vec<String>,
    /// The control DB file: `<axoniq.axonserver.controldb-path>/myelin-controldb.sqlite3`, by
    /// default in `<event storage>/_admin/` (the `_admin` context's directory, which no API call
    /// can create or delete).
    pub control_db: PathBuf,
    /// Free disk space below which health reports WARN (`management.health.diskspace.threshold`).
    pub disk_space_threshold: u64,
    /// Where admin writes control-DB backups (`axoniq.axonserver.controldb-backup-location`,
    /// default `<event storage>/backups`).
    pub controldb_backup_location: PathBuf,
    /// Minutes after a control-DB backup during which no Raft log segment is deleted
    /// (`myelin.backup.log-hold-minutes`, default 30, at most 1439).
    pub backup_log_hold_minutes: u64,
    pub access_control: AccessControl,
    pub ssl: Ssl,
    pub http_ssl: HttpSsl,
    pub heartbeat: Heartbeat,
    pub balancing: Balancing,
    /// Threads of the router's and the eventstore's task runtimes (`myelin.router.worker-threads`,
    /// `myelin.eventstore.worker-threads`); `None` leaves each process's default (half the CPUs,
    /// and one: see docs/decisions/0006).
    pub router_worker_threads: Option<u16>,
    pub eventstore_worker_threads: Option<u16>,
    /// The router's limits that were set: (router flag, value). See [`ROUTER_LIMITS`].
    pub router_limits: Vec<(&'static str, u64)>,
    /// The eventstore's limits that were set: (eventstore flag, value). See [`EVENTSTORE_LIMITS`].
    pub eventstore_limits: Vec<(&'static str, u64)>,
    /// This node's tags (`axoniq.axonserver.tags.<name>=<value>`): where `GetPlatformServer`
    /// sends a client whose tags match them.
    pub tags: BTreeMap<String, String>,
}

/// Application-level heartbeats with clients (Axon's `heartbeat.enabled`,
/// `client-heartbeat-frequency`, `client-heartbeat-timeout`). `None` leaves the router's default
/// (on, 500 ms, 5000 ms — what current Axon servers do).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Heartbeat {
    pub enabled: Option<bool>,
    pub frequency_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
}

/// Balancing clients over a context's nodes (Axon's `cluster.auto-balancing`,
/// `cluster.rebalance-delay` and `cluster.rebalance-interval`, both in seconds). `None` leaves
/// the router's default (on, 7 s, 15 s, as Axon Server).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Balancing {
    pub auto: Option<bool>,
    pub delay_s: Option<u64>,
    pub interval_s: Option<u64>,
}

impl Config {
    /// The host name clients are told to connect to: `hostname[.domain]`.
    pub fn advertised_hostname(&self) -> String {
        match &self.domain {
            Some(domain) => format!("{}.{domain}", self.hostname),
            None => self.hostname.clone(),
        }
    }

    /// The host name other nodes reach this one at: `internal-hostname[.internal-domain]`.
    pub fn advertised_internal_hostname(&self) -> String {
        match &self.internal_domain {
            Some(domain) => format!("{}.{domain}", self.internal_hostname),
            None => self.internal_hostname.clone(),
        }
    }
}

/// Reads every source and builds the validated configuration.
pub fn load(inputs: &Inputs) -> Result<Loaded, ConfigError> {
    let mut settings = Settings::default();
    let mut files = Vec::new();
    let mut warnings = Vec::new();

    let properties = match &inputs.properties_file {
        Some(path) => Some(inputs.cwd.join(path)),
        None => ["axonserver.properties", "config/axonserver.properties"]
            .iter()
            .map(|name| inputs.cwd.join(name))
            .find(|path| path.is_file()),
    };
    if let Some(path) = properties {
        let text = read(&path)?;
        let entries = java_properties::read(text.as_bytes()).map_err(|e| ConfigError::Syntax {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut entries: Vec<_> = entries.into_iter().collect();
        entries.sort();
        settings.apply_file(&path, entries, &mut warnings);
        files.push(path);
    }

    let toml_path = match &inputs.toml_file {
        Some(path) => Some(inputs.cwd.join(path)),
        None => Some(inputs.cwd.join("myelin.toml")).filter(|p| p.is_file()),
    };
    if let Some(path) = toml_path {
        let text = read(&path)?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut entries = Vec::new();
        flatten_toml("", &table, &mut entries).map_err(|message| ConfigError::Syntax {
            path: path.clone(),
            message,
        })?;
        settings.apply_file(&path, entries, &mut warnings);
        files.push(path);
    }

    for (name, value) in &inputs.env {
        if let Some(tag) = name.strip_prefix(TAG_ENV_PREFIX).filter(|t| !t.is_empty()) {
            settings.tags.insert(
                tag.to_ascii_lowercase(),
                (value.trim().to_owned(), Origin::Env(name.clone())),
            );
        } else if let Some(key) = key_for_env(name) {
            settings.set(key, value, Origin::Env(name.clone()));
        }
    }

    for (flag, key, value) in &inputs.flags {
        settings.set(
            known_key(key).expect("flags map to known keys"),
            value,
            Origin::Flag(flag),
        );
    }

    let runtime_env = inputs
        .env
        .iter()
        .find(|(name, _)| name == "RUNTIME_DIRECTORY")
        .and_then(|(_, value)| value.split(':').next())
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from);
    let config = Config::from_settings(&settings, inputs, runtime_env, &mut warnings)?;
    Ok(Loaded {
        config,
        files,
        warnings,
    })
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Turns a TOML document into dotted keys; arrays of scalars become comma lists.
fn flatten_toml(prefix: &str, table: &toml::Table, out: &mut Vec<(String, String)>) -> Result<(), String> {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            toml::Value::Table(inner) => flatten_toml(&key, inner, out)?,
            toml::Value::Array(items) => {
                let items = items
                    .iter()
                    .map(|item| scalar(item).ok_or_else(|| format!("{key}: nested values are not supported")))
                    .collect::<Result<Vec<_>, _>>()?;
                out.push((key, items.join(",")));
            }
            other => out.push((key, scalar(other).expect("non-table, non-array is a scalar"))),
        }
    }
    Ok(())
}

fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

/// Spring's relaxed form of a key written in a file: case, `-` and `_` do not matter
/// (`maxMessageSize`, `max_message_size` and `max-message-size` are the same key).
fn relaxed(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '-' && *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// An environment variable's name with every separator dropped.
fn env_form(name: &str) -> String {
    relaxed(name).replace('.', "")
}

fn known_key(key: &str) -> Option<&'static str> {
    let wanted = relaxed(key);
    KEYS.iter().map(|(k, _)| *k).find(|k| relaxed(k) == wanted)
}

fn key_for_env(name: &str) -> Option<&'static str> {
    // Only names in Spring's form (upper case, `_`) are candidates: `server.port` in the
    // environment of a shell is not a setting.
    if !name
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    {
        return None;
    }
    let wanted = env_form(name);
    KEYS.iter().map(|(k, _)| *k).find(|k| env_form(k) == wanted)
}

fn kind_of(key: &str) -> Kind {
    KEYS.iter()
        .find(|(k, _)| *k == key)
        .map(|(_, kind)| *kind)
        .expect("known key")
}

/// The prefix of a node tag's key (`axoniq.axonserver.tags.<name>=<value>`).
const TAG_PREFIX: &str = "axoniq.axonserver.tags.";
/// The environment's form of it: `AXONIQ_AXONSERVER_TAGS_REGION=eu` is the tag `region`.
const TAG_ENV_PREFIX: &str = "AXONIQ_AXONSERVER_TAGS_";
/// The most tags a node may have, and the longest name or value (the router's bounds).
const MAX_TAGS: usize = 64;
const MAX_TAG: usize = 256;

/// The merged key/value map, each value with its origin.
#[derive(Default, Debug)]
struct Settings {
    values: BTreeMap<&'static str, (String, Origin)>,
    /// Node tags by name: their names are the operator's, not known keys.
    tags: BTreeMap<String, (String, Origin)>,
}

impl Settings {
    fn set(&mut self, key: &'static str, value: &str, origin: Origin) {
        self.values.insert(key, (value.trim().to_string(), origin));
    }

    fn apply_file(&mut self, path: &Path, entries: Vec<(String, String)>, warnings: &mut Vec<String>) {
        for (key, value) in entries {
            if let Some(tag) = key.strip_prefix(TAG_PREFIX).filter(|t| !t.is_empty()) {
                self.tags.insert(
                    tag.to_owned(),
                    (value.trim().to_owned(), Origin::File(path.to_path_buf())),
                );
                continue;
            }
            match known_key(&key) {
                Some(known) => self.set(known, &value, Origin::File(path.to_path_buf())),
                None if key.starts_with("axoniq.") || key.starts_with("myelin.") => {
                    warnings.push(format!("{}: unknown key {key} ignored", path.display()))
                }
                // Spring and logging settings of an Axon Server installation.
                None => {}
            }
        }
    }

    /// The node tags, each name and value at most [`MAX_TAG`] bytes, at most [`MAX_TAGS`].
    fn checked_tags(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        if self.tags.len() > MAX_TAGS {
            let (name, (value, origin)) = self.tags.iter().nth(MAX_TAGS).expect("more than MAX_TAGS");
            return Err(ConfigError::Invalid {
                key: "axoniq.axonserver.tags.*",
                value: format!("{name}={value}"),
                origin: origin.clone(),
                reason: format!("at most {MAX_TAGS} tags"),
            });
        }
        let mut tags = BTreeMap::new();
        for (name, (value, origin)) in &self.tags {
            if name.len() > MAX_TAG || value.len() > MAX_TAG {
                return Err(ConfigError::Invalid {
                    key: "axoniq.axonserver.tags.*",
                    value: format!("{name}={value}"),
                    origin: origin.clone(),
                    reason: format!("a tag's name and value are at most {MAX_TAG} bytes each"),
                });
            }
            tags.insert(name.clone(), value.clone());
        }
        Ok(tags)
    }

    /// The raw value of a key, `None` when unset or empty (an empty value means "default").
    fn raw(&self, key: &'static str) -> Option<(&str, &Origin)> {
        debug_assert!(KEYS.iter().any(|(k, _)| *k == key));
        self.values
            .get(key)
            .filter(|(value, _)| !value.is_empty())
            .map(|(value, origin)| (value.as_str(), origin))
    }

    fn parse<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let Some((value, origin)) = self.raw(key) else {
            return Ok(None);
        };
        parse(value).map(Some).map_err(|reason| ConfigError::Invalid {
            key,
            value: value.to_string(),
            origin: origin.clone(),
            reason,
        })
    }

    fn text(&self, key: &'static str) -> Option<String> {
        debug_assert_eq!(kind_of(key), Kind::Text);
        self.raw(key).map(|(value, _)| value.to_string())
    }

    fn port(&self, key: &'static str, default: u16) -> Result<u16, ConfigError> {
        debug_assert_eq!(kind_of(key), Kind::Port);
        Ok(self.parse(key, parse_port)?.unwrap_or(default))
    }

    fn size(&self, key: &'static str, default: u64) -> Result<u64, ConfigError> {
        debug_assert_eq!(kind_of(key), Kind::Size);
        let size = self.parse(key, |v| {
            datasize::parse(v).and_then(|n| {
                if n == 0 {
                    Err("must be greater than zero".to_string())
                } else {
                    Ok(n)
                }
            })
        })?;
        Ok(size.unwrap_or(default))
    }

    fn millis(&self, key: &'static str) -> Result<Option<u64>, ConfigError> {
        debug_assert_eq!(kind_of(key), Kind::Millis);
        self.parse(key, |v| match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Ok(ms),
            _ => Err("not a positive number of milliseconds".to_string()),
        })
    }

    fn flag(&self, key: &'static str) -> Result<bool, ConfigError> {
        debug_assert_eq!(kind_of(key), Kind::Bool);
        Ok(self.parse(key, parse_bool)?.unwrap_or(false))
    }

    fn path(&self, key: &'static str, cwd: &Path) -> Option<PathBuf> {
        debug_assert_eq!(kind_of(key), Kind::Path);
        self.raw(key).map(|(value, _)| cwd.join(value))
    }
}

fn parse_port(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err("not a port number (1-65535)".to_string()),
    }
}

/// Spring's boolean words.
/// A thread count: 1 to 1024.
fn parse_threads(value: &str) -> Result<u16, String> {
    match value.trim().parse::<u16>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err("not a number of threads from 1 to 1024".to_string()),
    }
}

/// The limits of `table` that are set, as (flag, value), validated: a count from 1 to
/// 100,000,000, a size above zero that fits this machine.
fn limits(
    settings: &Settings,
    table: &[(&'static str, &'static str)],
) -> Result<Vec<(&'static str, u64)>, ConfigError> {
    let mut set = Vec::new();
    for &(key, flag) in table {
        let value = match kind_of(key) {
            Kind::Size => settings.parse(key, |v| match datasize::parse(v)? {
                0 => Err("must be greater than zero".to_string()),
                n if usize::try_from(n).is_err() => Err("too large for this machine".to_string()),
                n => Ok(n),
            })?,
            _ => settings.parse(key, |v| match v.trim().parse::<u64>() {
                Ok(n) if (1..=100_000_000).contains(&n) => Ok(n),
                _ => Err("not a count from 1 to 100000000".to_string()),
            })?,
        };
        set.extend(value.map(|value| (flag, value)));
    }
    Ok(set)
}

/// A whole number of seconds within `range`.
fn seconds(value: &str, range: std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    match value.trim().parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(format!(
            "not a number of seconds from {} to {}",
            range.start(),
            range.end()
        )),
    }
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err("not a boolean (true or false)".to_string()),
    }
}

/// A context name becomes a directory name: keep it to a safe alphabet.
fn parse_contexts(value: &str) -> Result<Vec<String>, String> {
    let mut contexts: Vec<String> = Vec::new();
    for name in value.split(',').map(str::trim) {
        let valid = !name.is_empty()
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
        if !valid {
            return Err(format!(
                "context name {name:?} is not valid (letters, digits, '-', '_', '.', '@')"
            ));
        }
        if !contexts.iter().any(|c| c == name) {
            contexts.push(name.to_string());
        }
    }
    Ok(contexts)
}

impl Config {
    fn from_settings(
        settings: &Settings,
        inputs: &Inputs,
        runtime_env: Option<PathBuf>,
        warnings: &mut Vec<String>,
    ) -> Result<Config, ConfigError> {
        let cwd = &inputs.cwd;
        let hostname = settings
            .text("axoniq.axonserver.hostname")
            .unwrap_or_else(|| inputs.os_hostname.clone());
        let domain = settings.text("axoniq.axonserver.domain");
        let event_storage = settings
            .path("axoniq.axonserver.event.storage", cwd)
            .unwrap_or_else(|| cwd.join("data"));
        let snapshot_storage = settings
            .path("axoniq.axonserver.snapshot.storage", cwd)
            .unwrap_or_else(|| event_storage.clone());
        if snapshot_storage != event_storage {
            warnings.push(format!(
                "axoniq.axonserver.snapshot.storage ({}) differs from the event storage; \
                 Myelin keeps snapshots under the event storage directory ({})",
                snapshot_storage.display(),
                event_storage.display()
            ));
        }
        let max_message_size = settings.size("axoniq.axonserver.max-message-size", DEFAULT_MAX_MESSAGE_SIZE)?;
        let max_message_size = usize::try_from(max_message_size).map_err(|_| ConfigError::Invalid {
            key: "axoniq.axonserver.max-message-size",
            value: max_message_size.to_string(),
            origin: settings
                .raw("axoniq.axonserver.max-message-size")
                .map(|(_, o)| o.clone())
                .expect("a non-default value has an origin"),
            reason: "too large for this machine".to_string(),
        })?;
        let control_db = settings
            .path("axoniq.axonserver.controldb-path", cwd)
            .unwrap_or_else(|| event_storage.join("_admin"))
            .join(CONTROL_DB_FILE);
        let runtime_directory = settings
            .path("myelin.runtime-directory", cwd)
            .or_else(|| runtime_env.map(|dir| cwd.join(dir)))
            .unwrap_or_else(|| event_storage.join("run"));

        let tags = settings.checked_tags()?;
        Ok(Config {
            tags,
            name: settings
                .text("axoniq.axonserver.name")
                .unwrap_or_else(|| inputs.os_hostname.clone()),
            internal_hostname: settings
                .text("axoniq.axonserver.internal-hostname")
                .unwrap_or_else(|| hostname.clone()),
            internal_domain: settings
                .text("axoniq.axonserver.internal-domain")
                .or_else(|| domain.clone()),
            hostname,
            domain,
            port: settings.port("axoniq.axonserver.port", 8124)?,
            internal_port: settings.port("axoniq.axonserver.internal-port", 8224)?,
            http_port: settings.port("server.port", 8024)?,
            bind_address: settings
                .parse("myelin.bind-address", |v| {
                    v.parse::<IpAddr>()
                        .map_err(|_| "not an IP address (e.g. 0.0.0.0, 127.0.0.1, ::)".to_string())
                })?
                .unwrap_or(IpAddr::from([0, 0, 0, 0])),
            event_segment_size: settings.size("axoniq.axonserver.event.segment-size", DEFAULT_SEGMENT_SIZE)?,
            snapshot_segment_size: settings.size("axoniq.axonserver.snapshot.segment-size", DEFAULT_SEGMENT_SIZE)?,
            max_message_size,
            control_db,
            disk_space_threshold: settings
                .size("management.health.diskspace.threshold", DEFAULT_DISK_SPACE_THRESHOLD)?,
            controldb_backup_location: settings
                .path("axoniq.axonserver.controldb-backup-location", cwd)
                .unwrap_or_else(|| event_storage.join("backups")),
            backup_log_hold_minutes: settings
                .parse("myelin.backup.log-hold-minutes", |v| match v.trim().parse::<u64>() {
                    Ok(m) if (1..=1439).contains(&m) => Ok(m),
                    _ => Err("not a number of minutes from 1 to 1439".to_string()),
                })?
                .unwrap_or(30),
            event_storage,
            snapshot_storage,
            runtime_directory,
            contexts: settings
                .parse("myelin.contexts", parse_contexts)?
                .unwrap_or_else(|| vec!["default".to_string()]),
            autocluster_first: settings.text("axoniq.axonserver.autocluster.first"),
            autocluster_contexts: settings
                .parse("axoniq.axonserver.autocluster.contexts", parse_contexts)?
                .unwrap_or_default(),
            heartbeat: Heartbeat {
                enabled: settings.parse("axoniq.axonserver.heartbeat.enabled", parse_bool)?,
                frequency_ms: settings.millis("axoniq.axonserver.client-heartbeat-frequency")?,
                timeout_ms: settings.millis("axoniq.axonserver.client-heartbeat-timeout")?,
            },
            balancing: Balancing {
                auto: settings.parse("axoniq.axonserver.cluster.auto-balancing", parse_bool)?,
                delay_s: settings.parse("axoniq.axonserver.cluster.rebalance-delay", |v| seconds(v, 0..=3600))?,
                interval_s: settings.parse("axoniq.axonserver.cluster.rebalance-interval", |v| seconds(v, 1..=3600))?,
            },
            router_limits: limits(settings, ROUTER_LIMITS)?,
            eventstore_limits: limits(settings, EVENTSTORE_LIMITS)?,
            router_worker_threads: settings.parse("myelin.router.worker-threads", parse_threads)?,
            eventstore_worker_threads: settings.parse("myelin.eventstore.worker-threads", parse_threads)?,
            access_control: AccessControl {
                enabled: settings.flag("axoniq.axonserver.accesscontrol.enabled")?,
                internal_token: settings.text("axoniq.axonserver.accesscontrol.internal-token"),
                token: settings.text("axoniq.axonserver.accesscontrol.token"),
                admin_token: settings.text("axoniq.axonserver.accesscontrol.admin-token"),
                system_token_file: settings.path("axoniq.axonserver.accesscontrol.systemtokenfile", cwd),
                token_dir: settings.path("axoniq.axonserver.accesscontrol.token-dir", cwd),
            },
            ssl: Ssl {
                enabled: settings.flag("axoniq.axonserver.ssl.enabled")?,
                cert_chain_file: settings.path("axoniq.axonserver.ssl.cert-chain-file", cwd),
                private_key_file: settings.path("axoniq.axonserver.ssl.private-key-file", cwd),
                internal_cert_chain_file: settings.path("axoniq.axonserver.ssl.internal-cert-chain-file", cwd),
                internal_private_key_file: settings.path("axoniq.axonserver.ssl.internal-private-key-file", cwd),
                internal_trust_manager_file: settings.path("axoniq.axonserver.ssl.internal-trust-manager-file", cwd),
            },
            http_ssl: HttpSsl {
                enabled: settings.parse("server.ssl.enabled", parse_bool)?,
                certificate: settings.path("server.ssl.certificate", cwd),
                certificate_private_key: settings.path("server.ssl.certificate-private-key", cwd),
                key_store: settings.text("server.ssl.key-store"),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(dir: &Path) -> Inputs {
        Inputs {
            cwd: dir.to_path_buf(),
            os_hostname: "box1".to_string(),
            ..Inputs::default()
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_make_a_standalone_node() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load(&inputs(dir.path())).unwrap();
        let c = loaded.config;
        assert_eq!(c.name, "box1");
        assert_eq!(c.hostname, "box1");
        assert_eq!(c.advertised_hostname(), "box1");
        assert_eq!(c.internal_hostname, "box1");
        assert_eq!((c.port, c.internal_port, c.http_port), (8124, 8224, 8024));
        assert_eq!(c.event_storage, dir.path().join("data"));
        assert_eq!(c.snapshot_storage, c.event_storage);
        assert_eq!(c.runtime_directory, dir.path().join("data/run"));
        assert_eq!(c.event_segment_size, 256 * 1024 * 1024);
        assert_eq!(c.snapshot_segment_size, 256 * 1024 * 1024);
        assert_eq!(c.max_message_size, 4 * 1024 * 1024);
        assert_eq!(c.bind_address, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(c.contexts, vec!["default"]);
        assert_eq!(c.control_db, dir.path().join("data/_admin/myelin-controldb.sqlite3"));
        assert_eq!(c.disk_space_threshold, 256 * 1024 * 1024);
        assert_eq!(c.controldb_backup_location, dir.path().join("data/backups"));
        assert_eq!(c.backup_log_hold_minutes, 30);
        assert!(!c.access_control.enabled);
        assert!(loaded.files.is_empty());
        assert!(loaded.warnings.is_empty());
    }

    #[test]
    fn properties_file_is_found_and_parsed() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "config/axonserver.properties",
            "# node settings\n\
             axoniq.axonserver.name=node-a\n\
             axoniq.axonserver.hostname = node-a\n\
             axoniq.axonserver.domain=example.org\n\
             axoniq.axonserver.port:9124\n\
             server.port=9024\n\
             axoniq.axonserver.event.storage=/var/lib/es\n\
             axoniq.axonserver.event.segment-size=1Mb\n\
             axoniq.axonserver.snapshot.segment-size=65536\n\
             axoniq.axonserver.maxMessageSize=8MB\n\
             axoniq.axonserver.accesscontrol.enabled=true\n\
             axoniq.axonserver.accesscontrol.internal-token=s3cret\n\
             axoniq.axonserver.controldb-path=/var/lib/cdb\n\
             management.health.diskspace.threshold=1GB\n\
             axoniq.axonserver.controldb-backup-location=/var/backups/cdb\n\
             myelin.backup.log-hold-minutes=45\n\
             logging.level.root=INFO\n",
        );
        let loaded = load(&inputs(dir.path())).unwrap();
        assert_eq!(loaded.files, vec![dir.path().join("config/axonserver.properties")]);
        let c = loaded.config;
        assert_eq!(c.name, "node-a");
        assert_eq!(c.advertised_hostname(), "node-a.example.org");
        assert_eq!(c.internal_domain.as_deref(), Some("example.org"));
        assert_eq!((c.port, c.http_port), (9124, 9024));
        assert_eq!(c.event_storage, PathBuf::from("/var/lib/es"));
        assert_eq!(c.snapshot_storage, PathBuf::from("/var/lib/es"));
        assert_eq!(c.runtime_directory, PathBuf::from("/var/lib/es/run"));
        assert_eq!(c.event_segment_size, 1024 * 1024);
        assert_eq!(c.snapshot_segment_size, 65536);
        assert_eq!(c.max_message_size, 8 * 1024 * 1024);
        assert_eq!(c.control_db, PathBuf::from("/var/lib/cdb/myelin-controldb.sqlite3"));
        assert_eq!(c.disk_space_threshold, 1024 * 1024 * 1024);
        assert_eq!(c.controldb_backup_location, PathBuf::from("/var/backups/cdb"));
        assert_eq!(c.backup_log_hold_minutes, 45);
        assert!(c.access_control.enabled);
        assert_eq!(c.access_control.internal_token.as_deref(), Some("s3cret"));
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn node_tags_come_from_the_file_and_the_environment_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "axonserver.properties",
            "axoniq.axonserver.tags.region=eu-west\naxoniq.axonserver.tags.disk=ssd\n",
        );
        let mut given = inputs(dir.path());
        given.env = vec![("AXONIQ_AXONSERVER_TAGS_REGION".into(), "eu-central".into())];
        let loaded = load(&given).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(
            loaded.config.tags,
            BTreeMap::from([
                ("disk".to_owned(), "ssd".to_owned()),
                ("region".to_owned(), "eu-central".to_owned()),
            ]),
            "the environment overrides the file"
        );
        write(
            dir.path(),
            "axonserver.properties",
            &format!("axoniq.axonserver.tags.region={}\n", "x".repeat(MAX_TAG + 1)),
        );
        let refused = load(&inputs(dir.path())).unwrap_err().to_string();
        assert!(refused.contains("axoniq.axonserver.tags"), "{refused}");
    }

    #[test]
    fn balancing_settings_reach_the_config_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(&inputs(dir.path())).unwrap().config;
        assert_eq!(c.balancing, Balancing::default(), "unset: the router's defaults apply");
        write(
            dir.path(),
            "axonserver.properties",
            "axoniq.axonserver.cluster.auto-balancing=false\n\
             axoniq.axonserver.cluster.rebalance-delay=0\n\
             axoniq.axonserver.cluster.rebalance-interval=2\n",
        );
        let c = load(&inputs(dir.path())).unwrap().config;
        assert_eq!(
            c.balancing,
            Balancing {
                auto: Some(false),
                delay_s: Some(0),
                interval_s: Some(2)
            }
        );
        for bad in [
            "axoniq.axonserver.cluster.rebalance-interval=0",
            "axoniq.axonserver.cluster.rebalance-delay=1h",
            "axoniq.axonserver.cluster.auto-balancing=sometimes",
        ] {
            write(dir.path(), "axonserver.properties", &format!("{bad}\n"));
            let error = load(&inputs(dir.path())).unwrap_err().to_string();
            let key = bad.split('=').next().unwrap();
            assert!(error.contains(key), "{bad}: {error}");
        }
    }

    #[test]
    fn heartbeat_settings_reach_the_config_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(&inputs(dir.path())).unwrap().config;
        assert_eq!(c.heartbeat, Heartbeat::default(), "unset: the router's defaults apply");
        write(
            dir.path(),
            "axonserver.properties",
            "axoniq.axonserver.heartbeat.enabled=false\n\
             axoniq.axonserver.client-heartbeat-frequency=250\n\
             axoniq.axonserver.client-heartbeat-timeout=2000\n",
        );
        let c = load(&inputs(dir.path())).unwrap().config;
        assert_eq!(
            c.heartbeat,
            Heartbeat {
                enabled: Some(false),
                frequency_ms: Some(250),
                timeout_ms: Some(2000)
            }
        );
        write(
            dir.path(),
            "axonserver.properties",
            "axoniq.axonserver.client-heartbeat-timeout=soon\n",
        );
        let error = load(&inputs(dir.path())).unwrap_err().to_string();
        assert!(error.contains("axoniq.axonserver.client-heartbeat-timeout"), "{error}");
    }

    #[test]
    fn command_and_query_limits_reach_the_config_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(&inputs(dir.path())).unwrap().config.router_limits.is_empty());
        write(
            dir.path(),
            "axonserver.properties",
            "axoniq.axonserver.command-queue-capacity-per-client=500\n\
             myelin.limits.query-queue-bytes=1GB\n",
        );
        let mut with_env = inputs(dir.path());
        with_env.env = vec![
            ("MYELIN_LIMITS_COMMAND_QUEUE_BYTES".to_string(), "8MB".to_string()),
            (
                "MYELIN_LIMITS_SUBSCRIPTION_BYTES_PER_STREAM".to_string(),
                "64KB".to_string(),
            ),
        ];
        let c = load(&with_env).unwrap().config;
        assert_eq!(
            c.router_limits,
            [
                ("--command-queue-capacity", 500),
                ("--command-queue-bytes", 8 << 20),
                ("--query-queue-bytes", 1 << 30),
                ("--subscription-bytes-per-stream", 64 << 10),
            ]
        );
        for (key, bad) in [
            ("myelin.limits.command-queue-bytes", "0"),
            ("myelin.limits.command-queue-bytes", "lots"),
            ("myelin.limits.query-subscriptions-per-stream", "0"),
            ("myelin.limits.query-subscriptions-per-stream", "-3"),
            ("axoniq.axonserver.query-queue-capacity-per-client", "1e9"),
        ] {
            write(dir.path(), "axonserver.properties", &format!("{key}={bad}\n"));
            let error = load(&inputs(dir.path())).unwrap_err().to_string();
            assert!(error.contains(key) && error.contains(bad), "{bad}: {error}");
        }
    }

    #[test]
    fn worker_threads_reach_the_config_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(&inputs(dir.path())).unwrap().config;
        assert_eq!((c.router_worker_threads, c.eventstore_worker_threads), (None, None));
        write(
            dir.path(),
            "axonserver.properties",
            "myelin.router.worker-threads=4\nmyelin.eventstore.worker-threads=2\n",
        );
        let c = load(&inputs(dir.path())).unwrap().config;
        assert_eq!(
            (c.router_worker_threads, c.eventstore_worker_threads),
            (Some(4), Some(2))
        );
        for bad in ["0", "-1", "many", "1025"] {
            write(
                dir.path(),
                "axonserver.properties",
                &format!("myelin.eventstore.worker-threads={bad}\n"),
            );
            let error = load(&inputs(dir.path())).unwrap_err().to_string();
            assert!(error.contains("myelin.eventstore.worker-threads"), "{bad}: {error}");
        }
    }

    #[test]
    fn blacklist_limits_reach_the_eventstore_flags() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(&inputs(dir.path())).unwrap().config.eventstore_limits.is_empty());
        write(
            dir.path(),
            "axonserver.properties",
            "myelin.limits.blacklist-entries=50\nmyelin.limits.blacklist-bytes=16KB\n",
        );
        let c = load(&inputs(dir.path())).unwrap().config;
        assert_eq!(
            c.eventstore_limits,
            vec![("--blacklist-entries", 50), ("--blacklist-bytes", 16 << 10)]
        );
        assert!(c.router_limits.is_empty());
        write(
            dir.path(),
            "axonserver.properties",
            "myelin.limits.blacklist-entries=0\n",
        );
        let error = load(&inputs(dir.path())).unwrap_err().to_string();
        assert!(error.contains("myelin.limits.blacklist-entries"), "{error}");
    }

    #[test]
    fn client_limits_reach_the_router_flags_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(&inputs(dir.path())).unwrap().config;
        assert!(c.router_limits.is_empty(), "unset limits keep the router's defaults");
        write(
            dir.path(),
            "axonserver.properties",
            "myelin.limits.streams-per-connection=64\nmyelin.limits.transaction-buffer=64MB\n\
             myelin.limits.transaction-timeout=5000\n",
        );
        let c = load(&inputs(dir.path())).unwrap().config;
        assert_eq!(
            c.router_limits,
            vec![
                ("--streams-per-connection", 64),
                ("--transaction-buffer-bytes", 64 << 20),
                ("--transaction-timeout-ms", 5000)
            ]
        );
        for (key, bad) in [
            ("myelin.limits.streams-per-connection", "0"),
            ("myelin.limits.event-reads", "many"),
            ("myelin.limits.events-per-transaction", "-5"),
            ("myelin.limits.transaction-buffer", "0"),
            ("myelin.limits.transaction-timeout", "soon"),
        ] {
            write(dir.path(), "axonserver.properties", &format!("{key}={bad}\n"));
            let error = load(&inputs(dir.path())).unwrap_err().to_string();
            assert!(error.contains(key), "{key}={bad}: {error}");
        }
    }

    #[test]
    fn working_directory_file_wins_over_config_subdirectory() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "axonserver.properties", "axoniq.axonserver.port=1111\n");
        write(
            dir.path(),
            "config/axonserver.properties",
            "axoniq.axonserver.port=2222\n",
        );
        let c = load(&inputs(dir.path())).unwrap().config;
        assert_eq!(c.port, 1111);
    }

    #[test]
    fn toml_nested_tables_and_dotted_keys() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "myelin.toml",
            r#"
"server.port" = 7024
[axoniq.axonserver]
name = "n1"
internal-port = 7224
event.segment-size = "64KB"
[myelin]
contexts = ["default", "orders"]
bind-address = "127.0.0.1"
runtime-directory = "rt"
"#,
        );
        let c = load(&inputs(dir.path())).unwrap().config;
        assert_eq!(c.name, "n1");
        assert_eq!(c.http_port, 7024);
        assert_eq!(c.internal_port, 7224);
        assert_eq!(c.event_segment_size, 64 * 1024);
        assert_eq!(c.contexts, vec!["default", "orders"]);
        assert_eq!(c.bind_address, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(c.runtime_directory, dir.path().join("rt"));
    }

    #[test]
    fn precedence_is_properties_toml_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let props = write(
            dir.path(),
            "etc/node.properties",
            "axoniq.axonserver.port=1001\n\
             axoniq.axonserver.internal-port=1002\n\
             server.port=1003\n\
             axoniq.axonserver.name=from-properties\n",
        );
        let toml = write(
            dir.path(),
            "etc/node.toml",
            "[axoniq.axonserver]\ninternal-port = 2002\nport = 2001\n",
        );
        let mut inputs = inputs(dir.path());
        inputs.properties_file = Some(props.clone());
        inputs.toml_file = Some(PathBuf::from("etc/node.toml"));
        inputs.env = vec![
            ("AXONIQ_AXONSERVER_PORT".into(), "3001".into()),
            ("SERVER_PORT".into(), "3003".into()),
            ("HOME".into(), "/root".into()),
            ("RUNTIME_DIRECTORY".into(), "/run/myelin".into()),
        ];
        inputs.flags = vec![("--port", "axoniq.axonserver.port", "4001".into())];
        let loaded = load(&inputs).unwrap();
        assert_eq!(loaded.files, vec![props, toml]);
        let c = loaded.config;
        assert_eq!(c.port, 4001, "flag beats env");
        assert_eq!(c.http_port, 3003, "env beats properties");
        assert_eq!(c.internal_port, 2002, "TOML beats properties");
        assert_eq!(c.name, "from-properties");
        assert_eq!(c.runtime_directory, PathBuf::from("/run/myelin"));
    }

    #[test]
    fn env_names_match_known_keys_only() {
        assert_eq!(
            key_for_env("AXONIQ_AXONSERVER_EVENT_SEGMENT_SIZE"),
            Some("axoniq.axonserver.event.segment-size")
        );
        assert_eq!(
            key_for_env("AXONIQ_AXONSERVER_MAXMESSAGESIZE"),
            Some("axoniq.axonserver.max-message-size")
        );
        assert_eq!(
            key_for_env("AXONIQ_AXONSERVER_INTERNAL_HOSTNAME"),
            Some("axoniq.axonserver.internal-hostname")
        );
        assert_eq!(
            key_for_env("MYELIN_RUNTIME_DIRECTORY"),
            Some("myelin.runtime-directory")
        );
        assert_eq!(key_for_env("SERVER_PORT"), Some("server.port"));
        assert_eq!(key_for_env("server.port"), None);
        assert_eq!(key_for_env("MYELIN_SUPERVISOR_PID"), None);
        assert_eq!(key_for_env("AXONIQ_AXONSERVER_DEVMODE_ENABLED"), None);
    }

    #[test]
    fn env_forms_of_known_keys_are_unambiguous() {
        for (i, (a, _)) in KEYS.iter().enumerate() {
            for (b, _) in &KEYS[i + 1..] {
                assert_ne!(env_form(a), env_form(b), "{a} and {b}");
            }
        }
    }

    #[test]
    fn data_dir_flag_moves_snapshots_and_runtime_dir_along() {
        let dir = tempfile::tempdir().unwrap();
        let mut inputs = inputs(dir.path());
        inputs.flags = vec![("--data-dir", "axoniq.axonserver.event.storage", "node1".into())];
        let c = load(&inputs).unwrap().config;
        assert_eq!(c.event_storage, dir.path().join("node1"));
        assert_eq!(c.snapshot_storage, dir.path().join("node1"));
        assert_eq!(c.runtime_directory, dir.path().join("node1/run"));
    }

    #[test]
    fn bad_port_names_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "axonserver.properties", "axoniq.axonserver.port=abc\n");
        let err = load(&inputs(dir.path())).unwrap_err();
        match &err {
            ConfigError::Invalid { key, value, origin, .. } => {
                assert_eq!(*key, "axoniq.axonserver.port");
                assert_eq!(value, "abc");
                assert_eq!(*origin, Origin::File(path.clone()));
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("axoniq.axonserver.port"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn bad_size_and_bad_env_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "myelin.toml",
            "[axoniq.axonserver.event]\nsegment-size = \"12XB\"\n",
        );
        let err = load(&inputs(dir.path())).unwrap_err().to_string();
        assert!(err.contains("axoniq.axonserver.event.segment-size"), "{err}");
        assert!(err.contains("myelin.toml"), "{err}");

        let empty = tempfile::tempdir().unwrap();
        let mut inputs = inputs(empty.path());
        inputs.env = vec![("SERVER_PORT".into(), "70000".into())];
        let err = load(&inputs).unwrap_err().to_string();
        assert!(err.contains("server.port"), "{err}");
        assert!(err.contains("environment variable SERVER_PORT"), "{err}");
    }

    #[test]
    fn other_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        for (line, key) in [
            ("server.port=0", "server.port"),
            ("axoniq.axonserver.accesscontrol.enabled=maybe", "accesscontrol.enabled"),
            ("myelin.bind-address=localhost", "myelin.bind-address"),
            ("myelin.contexts=default,../x", "myelin.contexts"),
            ("axoniq.axonserver.snapshot.segment-size=0", "segment-size"),
            ("myelin.backup.log-hold-minutes=0", "log-hold-minutes"),
            ("myelin.backup.log-hold-minutes=2000", "log-hold-minutes"),
        ] {
            write(dir.path(), "axonserver.properties", line);
            let err = load(&inputs(dir.path())).unwrap_err().to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }

    #[test]
    fn unknown_axon_keys_warn_and_broken_files_fail() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "axonserver.properties",
            "axoniq.axonserver.devmode.enabled=true\nspring.main.banner-mode=off\n",
        );
        let loaded = load(&inputs(dir.path())).unwrap();
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(loaded.warnings[0].contains("axoniq.axonserver.devmode.enabled"));

        write(dir.path(), "myelin.toml", "[axoniq\nport = 1\n");
        let err = load(&inputs(dir.path())).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");

        let mut missing = inputs(dir.path());
        missing.properties_file = Some(PathBuf::from("nope.properties"));
        let err = load(&missing).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn empty_value_means_default() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "axonserver.properties",
            "axoniq.axonserver.port=\naxoniq.axonserver.domain=\n",
        );
        let c = load(&inputs(dir.path())).unwrap().config;
        assert_eq!(c.port, 8124);
        assert_eq!(c.domain, None);
    }
}
