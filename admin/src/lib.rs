//! The admin process: the operators' HTTP API (port 8024) over the control DB.
//!
//! - `control_db`: the SQLite file holding nodes, contexts and members, applications, users and
//!   backup pointers; migrations in code; every access on one dedicated thread.
//! - `raft`: the `_admin` Raft group, whose log and state machine live in the control DB: every
//!   change to cluster configuration is a committed entry applied to each member's file.
//! - `api`: the REST API (Axon Server's paths), its OpenAPI document and Swagger UI, health and
//!   Prometheus metrics. `api::router` builds the whole HTTP service in one place.
//! - `reconcile`: at start, the control DB is aligned with the contexts the event store holds.
//! - `status`: the HTML status page at `/`.
//!
//! Contexts are created and deleted through the event store's `StorageControl` service on its
//! Unix socket; connected clients, processors and instructions go through the router's
//! `RouterControl`.

pub mod access;
pub mod api;
pub mod backup;
pub mod cluster;
pub mod control_db;
pub mod raft;
pub mod reconcile;
pub mod status;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use utoipa_axum::router::OpenApiRouter;

use crate::api::AppState;

/// Command-line arguments of `myelin admin`, normally set by the supervisor.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address for the HTTP API (Axon's `server.port`).
    #[arg(long, default_value = "0.0.0.0:8024")]
    pub listen: SocketAddr,
    /// Unix socket to serve gRPC health on (for the supervisor).
    #[arg(long)]
    pub socket: PathBuf,
    /// The eventstore's Unix socket.
    #[arg(long)]
    pub eventstore_socket: PathBuf,
    /// The router's Unix socket (connected clients, processors, instructions, metrics).
    #[arg(long)]
    pub router_socket: Option<PathBuf>,
    /// This node's name.
    #[arg(long, default_value = "myelin")]
    pub node_name: String,
    /// A tag of this node, `NAME=VALUE` (Axon's `axoniq.axonserver.tags.NAME`), shown in
    /// `/v1/public/me`; repeat for more.
    #[arg(long = "tag", value_name = "NAME=VALUE", value_parser = myelin_proto::limits::parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Host name this node advertises to clients.
    #[arg(long, default_value = "localhost")]
    pub hostname: String,
    /// gRPC port this node serves clients on.
    #[arg(long, default_value_t = 8124)]
    pub grpc_port: u16,
    /// Host name other nodes reach this one at (default: `--hostname`).
    #[arg(long)]
    pub internal_hostname: Option<String>,
    /// Port other nodes reach this one at.
    #[arg(long, default_value_t = 8224)]
    pub internal_port: u16,
    /// The control DB file (created with its directory if missing).
    #[arg(long, default_value = "data/controldb/myelin-controldb.sqlite3")]
    pub control_db: PathBuf,
    /// The event store's data directory, for the disk-space health check.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Free bytes on the data directory's file system below which health reports WARN.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub disk_space_threshold: u64,
    /// Where control-DB backups are written (Axon's `controldb-backup-location`; default:
    /// `backups` under the data directory).
    #[arg(long)]
    pub controldb_backup_location: Option<PathBuf>,
    /// After a control-DB backup, no Raft log segment is deleted for this many minutes.
    #[arg(long, default_value_t = backup::DEFAULT_LOG_HOLD_MINUTES,
          value_parser = clap::value_parser!(u64).range(1..=backup::MAX_LOG_HOLD_MINUTES))]
    pub backup_log_hold_minutes: u64,
    /// Axon's `autocluster.first`: the internal address (`host[:port]`, port 8224 by default) of
    /// the node that starts the cluster. On a clean start, this node joins that node's cluster,
    /// or starts it if it is that node.
    #[arg(long)]
    pub autocluster_first: Option<String>,
    /// Axon's `autocluster.contexts`: the contexts the first node creates and the others join
    /// (none: only `_admin`).
    #[arg(long, value_delimiter = ',')]
    pub autocluster_contexts: Vec<String>,
    /// Whether calls must carry a token (Axon's `accesscontrol.enabled`).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub access_control: bool,
    /// PEM certificate chain the HTTP port serves TLS with (Spring's `server.ssl.certificate`).
    /// With it the port speaks HTTPS only; a file that cannot be used stops admin at start.
    #[arg(long, value_name = "FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `--tls-cert-file` (Spring's `server.ssl.certificate-private-key`).
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Whether the node's client gRPC port serves TLS (what `/v1/public/me` reports as `ssl`).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub grpc_tls: bool,
    /// Token that may do everything (Axon's `accesscontrol.admin-token`). Read from the
    /// environment so that it never shows in a process listing.
    #[arg(long, env = "MYELIN_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Token every client application may use in every context (Axon SE's
    /// `accesscontrol.token`). Read from the environment, like the admin token.
    #[arg(long, env = "MYELIN_ACCESS_TOKEN", hide_env_values = true)]
    pub access_token: Option<String>,
}

/// Route sets that other modules add to the HTTP API. Each is merged, paths and OpenAPI
/// description alike, into the one router `api::router` builds (behind the same layers). A
/// module adds one line here, e.g. `backup::routes()`.
pub fn route_sets() -> Vec<OpenApiRouter<AppState>> {
    vec![backup::routes()]
}

/// Runs admin until SIGTERM or SIGINT.
pub fn main(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args, shutdown_signal()))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// A lazily connecting channel to a Unix socket.
fn unix_channel(path: &std::path::Path) -> anyhow::Result<tonic::transport::Channel> {
    let socket = std::path::absolute(path)?;
    Ok(
        tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(120))
            .connect_lazy(),
    )
}

/// Opens the control DB, starts this node's member of `_admin` over `network`, and builds the
/// state every handler shares (binds nothing).
pub async fn build_state<N>(args: &Args, network: N) -> anyhow::Result<AppState>
where
    N: openraft::network::RaftNetworkFactory<raft::AdminTypes>,
{
    use anyhow::Context as _;
    let db = control_db::ControlDb::open(&args.control_db)
        .with_context(|| format!("opening the control DB {}", args.control_db.display()))?;
    let internal_hostname = args.internal_hostname.clone().unwrap_or_else(|| args.hostname.clone());
    // Members are named by node name; routers map names to addresses (decision 0010).
    let options = match db.call(|conn| control_db::contexts::admin_identity(conn)).await? {
        Some(id) => raft::GroupOptions::joined(&args.node_name, id),
        None => raft::GroupOptions::standalone(&args.node_name),
    };
    let admin = raft::AdminGroup::start(db.clone(), options, network)
        .await
        .context("starting the _admin group")?;
    let storage = myelin_proto::internal::storage_control_client::StorageControlClient::new(unix_channel(
        &args.eventstore_socket,
    )?);
    let (router, router_health, admin_relay, peers) = match &args.router_socket {
        Some(path) => {
            let channel = unix_channel(path)?;
            (
                // No 4 MiB default on this trusted local link: a node with many handler
                // subscriptions lists more than that (`GET /v1/handlers` answered 500 before).
                Some(
                    myelin_proto::internal::router_control_client::RouterControlClient::new(channel.clone())
                        .max_decoding_message_size(usize::MAX),
                ),
                Some(tonic_health::pb::health_client::HealthClient::new(channel.clone())),
                Some(myelin_proto::internal::admin_relay_client::AdminRelayClient::new(
                    channel.clone(),
                )),
                Some(myelin_proto::internal::peer_directory_client::PeerDirectoryClient::new(
                    channel,
                )),
            )
        }
        None => (None, None, None, None),
    };
    let (grants, grants_rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
    let access = access::Access::new(
        access::Settings {
            enabled: args.access_control,
            admin_token: args.admin_token.clone(),
            app_token: args.access_token.clone(),
        },
        Vec::new(),
    );
    if args.access_control && args.admin_token.as_deref().is_none_or(str::is_empty) {
        tracing::warn!("access control is on without an admin token: only registered applications can call admin");
    }
    Ok(AppState {
        db,
        admin,
        grants_reload: Arc::new(tokio::sync::Mutex::new(())),
        storage,
        router,
        router_health,
        node: Arc::new(api::NodeSettings {
            name: args.node_name.clone(),
            hostname: args.hostname.clone(),
            grpc_port: args.grpc_port,
            http_port: args.listen.port(),
            internal_hostname,
            internal_port: args.internal_port,
            data_dir: args.data_dir.clone(),
            disk_space_threshold: args.disk_space_threshold,
            grpc_tls: args.grpc_tls,
            http_tls: args.tls_cert_file.is_some(),
            tags: args.tags.iter().cloned().collect(),
        }),
        http_metrics: Arc::new(api::actuator::HttpMetrics::default()),
        lifecycle: Arc::new(tokio::sync::Mutex::new(())),
        grants: Arc::new(grants),
        access: {
            access.follow(grants_rx);
            access
        },
        backup: Arc::new(backup::Settings::new(
            args.controldb_backup_location.as_deref(),
            args.data_dir.as_deref(),
            &args.control_db,
            args.backup_log_hold_minutes,
        )),
        admin_relay,
        peers,
        membership: Arc::new(tokio::sync::Mutex::new(())),
        restarting: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    })
}

/// Serves HTTP until `shutdown`, as a standalone node (its `_admin` group has no peers).
pub async fn run(args: Args, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    match args.router_socket.clone() {
        // The `_admin` group reaches the other nodes through this node's router.
        Some(router) => {
            let relay = myelin_raft_relay::relay_client(&router)?;
            let network = cluster::links::AdminNetwork::new(raft::ADMIN_GROUP, relay);
            run_with_network(args, network, shutdown).await
        }
        None => run_with_network(args, raft::NoPeers, shutdown).await,
    }
}

/// Serves HTTP until `shutdown`, reaching the other `_admin` members through `network`. Returns
/// an error if the `_admin` group stops on a storage failure (the supervisor restarts admin,
/// which recovers from the control DB).
pub async fn run_with_network<N>(
    args: Args,
    network: N,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    N: openraft::network::RaftNetworkFactory<raft::AdminTypes>,
{
    use anyhow::Context as _;
    // First: a certificate that cannot be used stops admin before it opens anything, and from
    // here on SIGHUP reloads it rather than ends the process.
    let tls = http_tls(&args)?;
    let state = build_state(&args, network).await?;
    // A node that joined a cluster records its addresses through the cluster's leader, once it
    // knows one; a standalone node does so before it serves.
    let joined = state.admin.id() != raft::LOCAL_NODE;
    if joined {
        tokio::spawn(reconcile::this_node_until_done(state.clone()));
    } else {
        reconcile::this_node(&state).await.context("recording this node")?;
    }
    state.applications_changed().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    // Grants change on every member when an entry is applied, not only where a handler ran.
    tokio::spawn({
        let state = state.clone();
        let mut changes = state.admin.changes();
        async move {
            while changes.changed().await.is_ok() {
                if let Err(e) = state.applications_changed().await {
                    tracing::warn!(error = %e, "republishing grants after an _admin change");
                }
            }
        }
    });

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the HTTP port {}", args.listen))?;
    tracing::info!(
        address = %listener.local_addr()?,
        tls = tls.is_some(),
        control_db = %args.control_db.display(),
        "admin serving HTTP"
    );

    let _ = std::fs::remove_file(&args.socket);
    let uds =
        tokio::net::UnixListener::bind(&args.socket).with_context(|| format!("binding {}", args.socket.display()))?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    // SERVING (and so the node's READY=1) only once the control DB knows the event store's
    // contexts: before that the API would answer "context not found" for contexts that exist.
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    // Autoclustering waits for the same alignment: the first node creates only the contexts its
    // event store does not hold already. Before it, a context the event store was still opening
    // (`myelin.contexts`) looked missing and was configured again under a new member id that the
    // event store never held, and that context was never replicated.
    let autocluster = args
        .autocluster_first
        .clone()
        .map(|first| (first, args.autocluster_contexts.clone()));
    tokio::spawn({
        let state = state.clone();
        async move {
            reconcile::contexts_until_done(state.clone()).await;
            health_reporter
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
            if let Some((first, contexts)) = autocluster {
                cluster::join::autocluster(state, first, contexts).await;
            }
        }
    });
    let _follow_peers = match &args.router_socket {
        Some(router) => Some(cluster::links::follow_peers(state.clone(), unix_channel(router)?)),
        None => None,
    };
    let _follow_nodes = cluster::members::follow_nodes(state.clone());
    let _follow_configuration =
        cluster::placement::follow_configuration(state.clone(), cluster::placement::Changing::default());
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_health = stop_rx.clone();
    let health_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(
                myelin_proto::internal::raft_inbox_server::RaftInboxServer::new(cluster::links::Inbox {
                    admin: state.admin.clone(),
                })
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            )
            .add_service(myelin_proto::internal::admin_inbox_server::AdminInboxServer::new(
                cluster::calls::Inbox { state: state.clone() },
            ))
            .add_service(myelin_proto::internal::access_rules_server::AccessRulesServer::new(
                access::RulesService {
                    access: state.access.clone(),
                },
            ))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(uds), async move {
                let _ = stop_health.changed().await;
            }),
    );
    let stop_tx = Arc::new(stop_tx);
    tokio::spawn({
        let stop_tx = stop_tx.clone();
        async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        }
    });
    let stopped = async move {
        let _ = stop_rx.changed().await;
    };
    // HTTPS or HTTP, never both: with a certificate configured there is no plaintext port.
    let mut serve = match tls {
        Some(config) => {
            let listener = tls::Listener::new(listener, config)?;
            let serve = axum::serve(listener, api::router(state.clone())).with_graceful_shutdown(stopped);
            tokio::spawn(std::future::IntoFuture::into_future(serve))
        }
        None => {
            let serve = axum::serve(listener, api::router(state.clone())).with_graceful_shutdown(stopped);
            tokio::spawn(std::future::IntoFuture::into_future(serve))
        }
    };
    let served = tokio::select! {
        served = &mut serve => served.context("the HTTP server task")?.context("serving HTTP"),
        fatal = state.admin.stopped() => {
            if state.restarting.load(std::sync::atomic::Ordering::SeqCst) {
                // Joined a cluster: finish the answer that says so, then end; the supervisor
                // starts admin again as a member of the cluster.
                tracing::info!("joined a cluster: admin restarts to follow it");
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = stop_tx.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(5), serve).await;
                Ok(())
            } else {
                // A storage error stops the group for good: stop the process, so that it
                // restarts and recovers from the control DB, rather than serve a
                // configuration that no longer moves.
                Err(anyhow::anyhow!("the _admin group stopped: {fatal}"))
            }
        }
    };
    if state.restarting.load(std::sync::atomic::Ordering::SeqCst) {
        // The socket's server would wait for the router's connections to close: the process
        // ends now instead, and the supervisor starts admin again.
        health_server.abort();
        let _ = std::fs::remove_file(&args.socket);
        return served;
    }
    state.admin.shutdown().await;
    served?;
    let _ = health_server.await;
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

/// The HTTP port's TLS configuration, if it has one: the certificate loaded and checked now (a
/// file that cannot be used stops admin before it serves), and kept current from then on.
fn http_tls(args: &Args) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let (Some(cert_path), Some(key_path)) = (&args.tls_cert_file, &args.tls_key_file) else {
        return Ok(None);
    };
    let files = myelin_tls::CertFiles {
        cert_key: "server.ssl.certificate".to_owned(),
        cert_path: cert_path.clone(),
        key_key: "server.ssl.certificate-private-key".to_owned(),
        key_path: key_path.clone(),
    };
    Ok(Some(myelin_tls::reloading_server_config(files, myelin_tls::ALPN_HTTP)?))
}
