//! The router process: the node's network edge for clients.
//!
//! It serves Axon's client gRPC API (port 8124) and relays event store calls to the eventstore
//! process over its Unix socket, naming the client's context (`AxonIQ-Context`, else
//! `default`). It holds no event data itself. It is also the node's only link to other nodes:
//! on the internal port it relays every Raft group's messages (`peers`).

pub mod access;
pub mod append_pipe;
pub mod command;
pub mod connections;
pub mod context;
pub mod control;
pub mod event_metrics;
pub mod event_reads;
pub mod event_scheduler;
pub mod event_store;
pub mod handler_limits;
pub mod limits;
pub mod metrics;
pub mod peers;
pub mod platform;
pub mod query;
pub mod transaction;
pub mod unimplemented;

use std::net::SocketAddr;
use std::path::PathBuf;

/// Command-line arguments of `myelin router`, normally set by the supervisor.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address for the client gRPC API (Axon's `axoniq.axonserver.port`).
    #[arg(long, default_value = "0.0.0.0:8124")]
    pub listen: SocketAddr,
    /// Address for node-to-node gRPC (Axon's `axoniq.axonserver.internal-port`): other nodes'
    /// routers send the Raft messages of every group here, on one connection per node.
    #[arg(long, default_value = "0.0.0.0:8224")]
    pub internal_listen: SocketAddr,
    /// The token every node-to-node call carries (Axon's `accesscontrol.internal-token`); when set,
    /// calls without it are refused. Given in the environment, never on the command line.
    #[arg(long, env = "MYELIN_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// Unix socket to serve gRPC health (for the supervisor) and `RouterControl` (for admin) on.
    #[arg(long)]
    pub socket: PathBuf,
    /// The eventstore's Unix socket.
    #[arg(long)]
    pub eventstore_socket: PathBuf,
    /// Admin's Unix socket, where the router follows the access rules it enforces. Without it
    /// access control stays off.
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// Whether calls must carry a token (Axon's `accesscontrol.enabled`). The rules themselves
    /// come from admin; until they arrive every call is refused.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub access_control: bool,
    /// Largest message accepted from a client, in bytes (Axon's `max-message-size`).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_message_size: usize,
    /// This node's name.
    #[arg(long, default_value = "myelin")]
    pub node_name: String,
    /// Host name clients are told to connect to.
    #[arg(long, default_value = "localhost")]
    pub hostname: String,
    /// gRPC port clients are told to connect to.
    #[arg(long, default_value_t = 8124)]
    pub grpc_port: u16,
    /// HTTP port of this node's admin API.
    #[arg(long, default_value_t = 8024)]
    pub http_port: u16,
    /// How long a dispatched command waits for its handler's response, in milliseconds
    /// (Axon's `default-command-timeout`); a command's TIMEOUT instruction overrides it.
    #[arg(long, default_value_t = 300_000)]
    pub command_timeout_ms: u64,
    /// Whether the node exchanges heartbeats with clients on their control streams and
    /// disconnects clients that stop sending them (Axon's `heartbeat.enabled`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub heartbeats: bool,
    /// How often the node sends a client a heartbeat, in milliseconds
    /// (Axon's `client-heartbeat-frequency`).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_interval_ms: u64,
    /// How long a client that has sent heartbeats may stay silent before it is disconnected, in
    /// milliseconds (Axon's `client-heartbeat-timeout`).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_timeout_ms: u64,
    /// Threads running the router's tasks; 0 means half the machine's CPUs (at least one). Every
    /// message crosses the router, and a wake-up of a parked thread costs more than most of
    /// what a call does here, so fewer threads than CPUs leave the rest to the eventstore (its
    /// fsyncs) and the applications on the same machine.
    #[arg(long, default_value_t = 0)]
    pub worker_threads: usize,
    /// Whether the node asks clients to reconnect to a lighter node when it serves more than its
    /// share of a context's clients (Axon's `cluster.auto-balancing`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_balancing: bool,
    /// How long the node waits, after the nodes it reaches for a context changed (one joined),
    /// before it balances that context's clients, in milliseconds (Axon's
    /// `cluster.rebalance-delay`, in seconds there).
    #[arg(long, default_value_t = 7_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub rebalance_delay_ms: u64,
    /// How often the node looks at whether it serves more than its share of clients, in
    /// milliseconds (Axon's `cluster.rebalance-interval`, in seconds there).
    #[arg(long, default_value_t = 15_000, value_parser = clap::value_parser!(u64).range(500..=3_600_000))]
    pub rebalance_interval_ms: u64,
    /// A tag of this node, `NAME=VALUE` (Axon's `axoniq.axonserver.tags.NAME`); repeat for
    /// more. `GetPlatformServer` sends a client to the node whose tags match most of its own.
    #[arg(long = "tag", value_name = "NAME=VALUE", value_parser = myelin_proto::limits::parse_tag)]
    pub tags: Vec<(String, String)>,
    /// PEM certificate chain the client port serves TLS with (Axon's `ssl.cert-chain-file`).
    /// With it the port speaks TLS only; a file that cannot be used stops the router at start.
    #[arg(long, value_name = "FILE", requires = "tls_private_key_file")]
    pub tls_cert_chain_file: Option<PathBuf>,
    /// PEM private key of `--tls-cert-chain-file` (Axon's `ssl.private-key-file`).
    #[arg(long, value_name = "FILE", requires = "tls_cert_chain_file")]
    pub tls_private_key_file: Option<PathBuf>,
    /// Bounds on streams, event reads and transactions (docs/limits.md).
    #[command(flatten)]
    pub limits: Limits,
    /// Bounds on command and query queues and handler subscriptions (docs/limits.md).
    #[command(flatten)]
    pub handler_limits: handler_limits::HandlerLimits,
}

/// Bounds on what clients may hold open (docs/limits.md has each one's reason and test).
#[derive(clap::Args, Debug, Clone)]
pub struct Limits {
    /// Client connections open at once (`myelin.limits.connections`); one more is closed at once.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub connections: u64,
    /// Concurrent streams (calls) one client connection may have open: HTTP/2's
    /// MAX_CONCURRENT_STREAMS (`myelin.limits.streams-per-connection`).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub streams_per_connection: u32,
    /// Event reads (tracking and aggregate) open at once on the node (`myelin.limits.event-reads`).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub event_reads: u64,
    /// Events one AppendEvent transaction may carry (`myelin.limits.events-per-transaction`).
    #[arg(long, default_value_t = 32_768, value_parser = clap::value_parser!(u64).range(1..))]
    pub events_per_transaction: u64,
    /// Bytes of every transaction still being received, node-wide
    /// (`myelin.limits.transaction-buffer`).
    #[arg(long, default_value_t = 256 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub transaction_buffer_bytes: u64,
    /// How long an AppendEvent call may take to send its transaction and half-close, in
    /// milliseconds (`myelin.limits.transaction-timeout`).
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub transaction_timeout_ms: u64,
}

/// HTTP/2 flow-control windows of the client port (see `run`).
const CLIENT_STREAM_WINDOW: u32 = 256 << 10;
const CLIENT_CONNECTION_WINDOW: u32 = 4 << 20;

/// Runs the router until SIGTERM or SIGINT.
pub fn main(args: Args) -> anyhow::Result<()> {
    let threads = match args.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() / 2).max(1),
        n => n,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(run(args, shutdown_signal()))
}

/// A `--tag NAME=VALUE`.
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

/// Serves clients until `shutdown`.
pub async fn run(args: Args, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    use anyhow::Context as _;
    // First: a certificate that cannot be used stops the router before anything else, and from
    // here on SIGHUP reloads it rather than ends the process.
    let tls = client_tls(&args)?;
    // Every append and read crosses this link: see `local_socket` for why it is not tonic's own.
    // Two connections: the one stream that carries every append has a connection of its own, so
    // that no read, however its client behaves, shares flow control with it (docs/limits.md).
    let storage_client = |channel| {
        myelin_proto::internal::event_storage_client::EventStorageClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    };
    let storage = storage_client(myelin_proto::local_socket::channel(&args.eventstore_socket)?);
    let append_link = storage_client(myelin_proto::local_socket::channel(&args.eventstore_socket)?);
    let limits = &args.limits;
    let relay = event_store::EventStoreRelay {
        appends: append_pipe::AppendPipe::new(append_link),
        storage,
        transactions: transaction::TransactionLimits::new(
            usize::try_from(limits.events_per_transaction).unwrap_or(usize::MAX),
            myelin_proto::limits::max_transaction_bytes(args.max_message_size),
            usize::try_from(limits.transaction_buffer_bytes).unwrap_or(usize::MAX),
            std::time::Duration::from_millis(limits.transaction_timeout_ms),
        ),
    };
    let scheduler = event_scheduler::EventSchedulerRelay {
        scheduling: myelin_proto::internal::event_scheduling_client::EventSchedulingClient::new(
            myelin_proto::local_socket::channel(&args.eventstore_socket)?,
        )
        .max_encoding_message_size(usize::MAX),
    };
    let max_reads = usize::try_from(limits.event_reads).unwrap_or(usize::MAX);
    let metrics_handle = metrics::install();
    let _upkeep = metrics::keep_up(metrics_handle.clone());
    let disconnects = platform::Disconnects::new();
    let peers = peers::Peers::new(
        args.node_name.clone(),
        args.internal_token.clone(),
        peers::LinkBounds::default(),
    );
    let platform = platform::Platform::new(
        myelin_proto::axon::control::NodeInfo {
            host_name: args.hostname.clone(),
            grpc_port: i32::from(args.grpc_port),
            http_port: i32::from(args.http_port),
            version: 0,
            node_name: args.node_name.clone(),
        },
        platform::Heartbeats {
            enabled: args.heartbeats,
            interval: std::time::Duration::from_millis(args.heartbeat_interval_ms),
            timeout: std::time::Duration::from_millis(args.heartbeat_timeout_ms),
        },
        disconnects.clone(),
        peers.clone(),
    );
    anyhow::ensure!(
        args.tags.len() <= platform::placement::MAX_TAGS,
        "{} tags (at most {})",
        args.tags.len(),
        platform::placement::MAX_TAGS
    );
    platform.placement().set_local_tags(args.tags.iter().cloned().collect());
    let _balancing = platform.keep_balanced(platform::Balancing {
        auto: args.auto_balancing,
        delay: std::time::Duration::from_millis(args.rebalance_delay_ms),
        interval: std::time::Duration::from_millis(args.rebalance_interval_ms),
    });
    let commands = command::Commands::new(
        args.node_name.clone(),
        std::time::Duration::from_millis(args.command_timeout_ms),
        args.handler_limits.clone(),
    )
    .with_disconnects(disconnects.clone());
    let access_rules = access::AccessRules::new(args.access_control);
    let _follow_access = args
        .admin_socket
        .clone()
        .map(|socket| access::follow(socket, access_rules.clone()));
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the client port {}", args.listen))?;
    tracing::info!(address = %listener.local_addr()?, tls = tls.is_some(), "router serving clients");

    // Health for the supervisor on the Unix socket; it says SERVING once the client port is bound.
    let _ = std::fs::remove_file(&args.socket);
    let uds =
        tokio::net::UnixListener::bind(&args.socket).with_context(|| format!("binding {}", args.socket.display()))?;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let queries = query::QueryRouter::new(args.node_name.clone()).with_limits(args.handler_limits.clone());
    let router_control = std::sync::Arc::new(control::Control {
        node_name: args.node_name.clone(),
        exporter: metrics::Exporter::new(metrics_handle, platform.clients().clone(), queries.clone()),
        platform: platform.clone(),
        commands: commands.dispatcher().clone(),
        queries: queries.clone(),
        peers: peers.clone(),
    });
    let _pinging = peers.keep_pinging();
    let remote_queries = std::sync::Arc::new(query::remote::RemoteQueries::new(queries.clone(), peers.clone()));
    let remote_handlers = std::sync::Arc::new(
        command::remote::RemoteHandlers::new(peers.clone(), commands.dispatcher().clone())
            .with_platform(platform.clients().clone(), platform.placement().clone())
            .with_queries(remote_queries.clone()),
    );
    let _remote_handlers = remote_handlers.start();
    let internal_listener = tokio::net::TcpListener::bind(args.internal_listen)
        .await
        .with_context(|| format!("binding the internal port {}", args.internal_listen))?;
    tracing::info!(address = %internal_listener.local_addr()?, "router serving other nodes");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_health = stop_rx.clone();
    let health_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(
                myelin_proto::internal::router_control_server::RouterControlServer::from_arc(router_control.clone()),
            )
            .add_service(
                myelin_proto::internal::raft_relay_server::RaftRelayServer::new(peers::Relay { peers: peers.clone() })
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(myelin_proto::internal::admin_relay_server::AdminRelayServer::new(
                peers::AdminCalls { peers: peers.clone() },
            ))
            .add_service(myelin_proto::internal::peer_directory_server::PeerDirectoryServer::new(
                peers::Directory {
                    peers: peers.clone(),
                    placement: platform.placement().clone(),
                },
            ))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(uds), async move {
                let _ = stop_health.changed().await;
            }),
    );

    // Node-to-node: only a stream's own window may stop it (see `peers`).
    let inbound = peers::Inbound {
        node_name: args.node_name.clone(),
        token: args.internal_token.clone(),
        eventstore: peers::inbox(&args.eventstore_socket)?,
        admin: args.admin_socket.as_deref().map(peers::inbox).transpose()?,
        admin_calls: args.admin_socket.as_deref().map(peers::admin_inbox).transpose()?,
        commands: remote_handlers,
        queries: remote_queries,
        control: router_control,
        last_refusal_logged: std::sync::atomic::AtomicU64::new(0),
    };
    let mut stop_internal = stop_rx.clone();
    let internal_server = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(1)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(3)))
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some((1 << 31) - 1))
            .add_service(
                myelin_proto::internal::peer_link_server::PeerLinkServer::new(inbound)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX),
            )
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(internal_listener).with_nodelay(Some(true)),
                async move {
                    let _ = stop_internal.changed().await;
                },
            ),
    );

    let max = args.max_message_size;
    let mut stop_clients = stop_rx;
    let clients = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            limits::rewrite_response::<tonic::body::Body>,
        ))
        .layer(access::AccessLayer::new(access_rules))
        .layer(unimplemented::UnimplementedLayer::default())
        .layer(event_metrics::EventMetricsLayer::default())
        .http2_keepalive_interval(Some(std::time::Duration::from_millis(2500)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_millis(5000)))
        .max_concurrent_streams(Some(args.limits.streams_per_connection))
        // A stream's window bounds what one call may send ahead of the router, the connection's
        // what one client connection may (memory: at most 4 MiB a connection); it is larger so
        // that no one call can stop the others. h2 also ends a connection (GOAWAY
        // ENHANCE_YOUR_CALM, "too_many_data_frames") whose unread small DATA frames outweigh half
        // the connection window: at hyper's 1 MiB for both, a single stream of ~150-byte events
        // that the router read a little slower than a grpcio client sent them took every call of
        // the connection down (issue 15, D10). With sixteen stream windows in the connection's,
        // no stream of messages of 29 bytes or more can reach that bound (a stream of p-byte
        // frames costs (256 - p) / p per byte of its window), while a flood of tiny frames does.
        .initial_stream_window_size(Some(CLIENT_STREAM_WINDOW))
        .initial_connection_window_size(Some(CLIENT_CONNECTION_WINDOW))
        .add_service(event_reads::EventStoreService::new(relay, max, max_reads))
        .add_service(
            myelin_proto::axon::event::event_scheduler_server::EventSchedulerServer::new(scheduler)
                .max_decoding_message_size(max),
        )
        .add_service(
            myelin_proto::axon::control::platform_service_server::PlatformServiceServer::new(platform)
                .max_decoding_message_size(max),
        )
        .add_service(
            myelin_proto::axon::command::command_service_server::CommandServiceServer::new(commands)
                .max_decoding_message_size(max)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            myelin_proto::axon::query::query_service_server::QueryServiceServer::new(query::service::QueryEndpoint {
                router: queries,
                disconnects,
            })
            .max_decoding_message_size(max),
        );
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let max_connections = usize::try_from(args.limits.connections).unwrap_or(usize::MAX);
    let stopped = async move {
        let _ = stop_clients.changed().await;
    };
    // TLS or plaintext, never both: with a certificate configured there is no plaintext port.
    let served = match tls {
        Some(config) => {
            clients
                .serve_with_incoming_shutdown(
                    connections::limit(myelin_tls::incoming(listener, config, true), max_connections),
                    stopped,
                )
                .await
        }
        None => {
            clients
                .serve_with_incoming_shutdown(
                    connections::limit(
                        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                        max_connections,
                    ),
                    stopped,
                )
                .await
        }
    };
    served.context("serving clients")?;
    let _ = health_server.await;
    let _ = internal_server.await;
    let _ = std::fs::remove_file(&args.socket);
    tracing::info!("router stopped");
    Ok(())
}

/// The client port's TLS configuration, if it has one: the certificate loaded and checked now
/// (so a file that cannot be used stops the router before it serves anything), and kept current
/// from then on (SIGHUP, or a change of the files).
fn client_tls(args: &Args) -> anyhow::Result<Option<std::sync::Arc<rustls::ServerConfig>>> {
    let (Some(cert_path), Some(key_path)) = (&args.tls_cert_chain_file, &args.tls_private_key_file) else {
        return Ok(None);
    };
    let files = myelin_tls::CertFiles {
        cert_key: "axoniq.axonserver.ssl.cert-chain-file".to_owned(),
        cert_path: cert_path.clone(),
        key_key: "axoniq.axonserver.ssl.private-key-file".to_owned(),
        key_path: key_path.clone(),
    };
    Ok(Some(myelin_tls::reloading_server_config(files, myelin_tls::ALPN_GRPC)?))
}
