//! Harness for multi-process tests: starts the real `myelin` binary (supervisor plus its child
//! processes) in a temp dir on loopback ports, and talks to it as a client would.
//!
//! The binary is `$MYELIN_BIN`, else `target/release/myelin`, else `target/debug/myelin`: the
//! test command builds it before running the tests.

pub mod cluster;
pub mod command_apps;
pub mod handlers;
pub mod history;
pub mod http;
pub mod query_apps;
pub mod tls;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use myelin_proto::axon::SerializedObject;
use myelin_proto::axon::event::event_store_client::EventStoreClient;
use myelin_proto::axon::event::{Event, GetAggregateEventsRequest, GetEventsRequest, GetLastTokenRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::Channel;

pub fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("MYELIN_BIN") {
        return PathBuf::from(path);
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let release = target.join("release/myelin");
    if release.exists() {
        return release;
    }
    target.join("debug/myelin")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `n` distinct free ports: every listener is held until all are chosen, so the kernel cannot
/// hand out one port twice (one node's HTTP and internal ports once came out the same).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// Options of a test node.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Extra `KEY=value` environment entries (Axon-style config variables).
    pub env: Vec<(String, String)>,
    /// Where the data goes (default: inside the node's temp dir).
    pub data_dir: Option<PathBuf>,
    /// The `myelin` binary to run (default: [`binary`]).
    pub binary: Option<PathBuf>,
    /// The loopback address the node listens on (default 127.0.0.1); cluster tests give each node
    /// its own (127.0.0.2, ...).
    pub address: Option<std::net::Ipv4Addr>,
    /// The internal port (default: a free one), for a test that must name it before the node
    /// starts (`autocluster.first`).
    pub internal_port: Option<u16>,
    /// The CA (PEM) the node's client port certificate is signed by: set for a node serving
    /// TLS, and the harness then connects over TLS, verifying against it.
    pub tls_ca: Option<String>,
}

/// A running node. Dropping it kills every process of it.
pub struct Node {
    _dir: tempfile::TempDir,
    pub data: PathBuf,
    pub grpc_port: u16,
    pub http_port: u16,
    pub internal_port: u16,
    options: Options,
    process: Option<Child>,
    pub log: PathBuf,
}

impl Node {
    pub async fn start(options: Options) -> Node {
        // Short path: the runtime directory holds Unix sockets (108-byte limit).
        let dir = tempfile::Builder::new().prefix("my").tempdir_in("/tmp").unwrap();
        let data = options.data_dir.clone().unwrap_or_else(|| dir.path().join("d"));
        let log = dir.path().join("node.log");
        let explicit = options.internal_port;
        let ports = loop {
            let ports = free_ports(3);
            if explicit.is_none_or(|port| !ports[..2].contains(&port)) {
                break ports;
            }
        };
        let mut node = Node {
            data,
            log,
            grpc_port: ports[0],
            http_port: ports[1],
            internal_port: explicit.unwrap_or(ports[2]),
            options,
            process: None,
            _dir: dir,
        };
        node.launch().await;
        node
    }

    /// Sets an environment entry for the node's next launch.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.options.env.retain(|(k, _)| k != key);
        self.options.env.push((key.to_owned(), value.to_owned()));
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.address(), self.grpc_port)
    }

    /// The address the node listens on.
    pub fn address(&self) -> std::net::Ipv4Addr {
        self.options.address.unwrap_or(std::net::Ipv4Addr::LOCALHOST)
    }

    /// `host:port` of the node's internal (node-to-node) port.
    pub fn internal_address(&self) -> String {
        format!("{}:{}", self.address(), self.internal_port)
    }

    /// A connected channel to the client gRPC port, for any of the client services.
    pub async fn channel(&self) -> Channel {
        self.try_channel().await.expect("connect to node")
    }

    async fn try_channel(&self) -> Result<Channel, tonic::transport::Error> {
        match &self.options.tls_ca {
            Some(ca) => tls::channel(self.grpc_port, ca).await,
            None => Channel::from_shared(self.url()).unwrap().connect().await,
        }
    }

    /// Starts the processes and waits until clients are served.
    pub async fn launch(&mut self) {
        assert!(self.process.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new(self.options.binary.clone().unwrap_or_else(binary));
        command
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--bind-address", &self.address().to_string()])
            .args(["--port", &self.grpc_port.to_string()])
            .args(["--http-port", &self.http_port.to_string()])
            .args(["--internal-port", &self.internal_port.to_string()])
            .env("RUST_LOG", "info,openraft=warn")
            .env_remove("RUNTIME_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.options.env {
            command.env(k, v);
        }
        self.process = Some(command.spawn().expect("start myelin"));
        self.wait_ready(Duration::from_secs(60)).await;
    }

    /// Waits until an EventStore call succeeds.
    pub async fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.process.as_mut().and_then(|p| p.try_wait().unwrap()) {
                panic!(
                    "myelin exited with {status} before it was ready; log:\n{}",
                    self.log_text()
                );
            }
            // With access control on, a refusal for want of a token also shows the node serving
            // (rules not loaded yet would be UNAVAILABLE); so does "no such context" on a node of
            // a cluster that does not store `default`.
            if let Ok(mut client) = self.try_client().await
                && match client.get_last_token(GetLastTokenRequest {}).await {
                    Ok(_) => true,
                    Err(status) => matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::NotFound),
                }
                && self.admin_serving().await
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node not ready in time; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn try_client(&self) -> Result<EventStoreClient<Channel>, tonic::transport::Error> {
        let channel = self.try_channel().await?;
        Ok(EventStoreClient::new(channel).max_decoding_message_size(usize::MAX))
    }

    /// A client on a connection of its own.
    pub async fn client(&self) -> EventStoreClient<Channel> {
        self.try_client().await.expect("connect to node")
    }

    /// A client on a lazily connecting channel (survives node restarts).
    pub fn lazy_client(&self) -> EventStoreClient<Channel> {
        let channel = Channel::from_shared(self.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        EventStoreClient::new(channel).max_decoding_message_size(usize::MAX)
    }

    /// Whether admin says SERVING on its health socket: it does once its control DB knows the
    /// event store's contexts.
    pub async fn admin_serving(&self) -> bool {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let Ok(socket) = std::path::absolute(self.runtime_dir().join("admin.sock")) else {
            return false;
        };
        let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display())) else {
            return false;
        };
        let Ok(channel) = endpoint.connect_timeout(Duration::from_secs(1)).connect().await else {
            return false;
        };
        HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.data.join("run")
    }

    /// The pid of a child process (`eventstore`, `router`, `admin`) from its pid file.
    pub fn child_pid(&self, child: &str) -> Option<i32> {
        std::fs::read_to_string(self.runtime_dir().join(format!("{child}.pid")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Resident memory of a child process (`eventstore`, `router`, `admin`) in KiB, from
    /// `/proc/<pid>/status` (`VmRSS`); `None` when it is not running.
    pub fn rss_kib(&self, child: &str) -> Option<u64> {
        rss_kib(self.child_pid(child)?)
    }

    pub fn supervisor_pid(&self) -> Option<i32> {
        self.process.as_ref().map(|p| p.id() as i32)
    }

    /// SIGKILLs every process of the node at once: a power cut as far as the files know.
    pub fn crash(&mut self) {
        let pids: Vec<i32> = ["eventstore", "router", "admin"]
            .iter()
            .filter_map(|c| self.child_pid(c))
            .chain(self.supervisor_pid())
            .collect();
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        if let Some(mut p) = self.process.take() {
            let _ = p.wait();
        }
        // Children are not ours to wait for; make sure they are gone before a restart.
        for pid in pids {
            wait_gone(pid, Duration::from_secs(10));
        }
    }

    /// Sends `signal` to every process of the node: SIGSTOP freezes it as a long pause would
    /// (its sockets stay open, nothing answers), SIGCONT lets it go on. Dropping a frozen node
    /// still ends it (SIGKILL reaches a stopped process).
    pub fn signal_all(&self, signal: Signal) {
        let pids = ["eventstore", "router", "admin"]
            .iter()
            .filter_map(|c| self.child_pid(c))
            .chain(self.supervisor_pid());
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Stops the node with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = kill(Pid::from_raw(p.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while p.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = p.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

pub fn wait_gone(pid: i32, within: Duration) {
    let deadline = Instant::now() + within;
    while Path::new(&format!("/proc/{pid}")).exists() {
        // A zombie still has /proc but is gone for our purposes.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.split(") ").nth(1).is_some_and(|rest| rest.starts_with('Z')) {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} still alive");
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.process.is_some() {
            self.crash();
        }
    }
}

/// `message` as a client in `context` sends it: the context in Axon's `AxonIQ-Context` header.
pub fn with_context<T>(message: T, context: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("axoniq-context", context.parse().unwrap());
    request
}

/// An event of aggregate `aggregate` at `sequence`, with a ~200-byte payload.
pub fn event(aggregate: &str, sequence: i64, id: &str) -> Event {
    Event {
        message_identifier: id.to_owned(),
        aggregate_identifier: aggregate.to_owned(),
        aggregate_sequence_number: sequence,
        aggregate_type: "TestAggregate".to_owned(),
        timestamp: 1_700_000_000_000 + sequence,
        payload: Some(SerializedObject {
            r#type: "TestEvent".to_owned(),
            revision: "1".to_owned(),
            data: bytes::Bytes::from(format!("{id}:{}", "x".repeat(180))),
        }),
        meta_data: Default::default(),
        snapshot: false,
    }
}

/// Appends one transaction.
pub async fn append(client: &mut EventStoreClient<Channel>, events: Vec<Event>) -> Result<(), tonic::Status> {
    client.append_event(tokio_stream::iter(events)).await.map(|_| ())
}

/// Reads every event from token 0 up to the last token, in order.
pub async fn read_all(client: &mut EventStoreClient<Channel>) -> Vec<(i64, Event)> {
    let last = client
        .get_last_token(GetLastTokenRequest {})
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut out = Vec::new();
    if last < 0 {
        return out;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(GetEventsRequest {
        tracking_token: 0,
        number_of_permits: last + 1,
        client_id: "test".into(),
        component_name: "test".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .list_events(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    while (out.len() as i64) < last + 1 {
        let item = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("events keep coming")
            .unwrap()
            .expect("stream open");
        out.push((item.token, item.event.unwrap()));
    }
    drop(tx);
    out
}

/// Reads one aggregate's events.
pub async fn read_aggregate(client: &mut EventStoreClient<Channel>, aggregate: &str) -> Vec<Event> {
    let mut stream = client
        .list_aggregate_events(GetAggregateEventsRequest {
            aggregate_id: aggregate.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        out.push(e);
    }
    out
}

/// The newest snapshot of an aggregate (`ListAggregateSnapshots`' first answer), if any.
pub async fn newest_snapshot(client: &mut EventStoreClient<Channel>, aggregate: &str) -> Option<Event> {
    client
        .list_aggregate_snapshots(myelin_proto::axon::event::GetAggregateSnapshotsRequest {
            aggregate_id: aggregate.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
}
