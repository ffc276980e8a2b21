//! The admin process: the operators' HTTP API (port 8024).
//!
//! For now it answers `GET /` with a status page and `GET /v1/public/me` with this node's
//! status as JSON, reading context positions from the eventstore over its Unix socket. The
//! control DB, REST API and backups arrive with issue #4.

pub mod access;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Host name this node advertises to clients.
    #[arg(long, default_value = "localhost")]
    pub hostname: String,
    /// gRPC port this node serves clients on.
    #[arg(long, default_value_t = 8124)]
    pub grpc_port: u16,
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

/// Serves HTTP until `shutdown`.
pub async fn run(args: Args, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let socket = std::path::absolute(&args.eventstore_socket)?;
    let channel = tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))?.connect_lazy();
    let state = status::State {
        control: myelin_proto::internal::storage_control_client::StorageControlClient::new(channel),
        node_name: args.node_name.clone(),
        hostname: args.hostname.clone(),
        grpc_port: args.grpc_port,
        http_port: args.listen.port(),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the HTTP port {}", args.listen))?;
    tracing::info!(address = %listener.local_addr()?, "admin serving HTTP");

    let _ = std::fs::remove_file(&args.socket);
    let uds =
        tokio::net::UnixListener::bind(&args.socket).with_context(|| format!("binding {}", args.socket.display()))?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_health = stop_rx.clone();
    let health_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(uds), async move {
                let _ = stop_health.changed().await;
            }),
    );
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    axum::serve(listener, status::router(state))
        .with_graceful_shutdown(async move {
            let _ = stop_rx.changed().await;
        })
        .await
        .context("serving HTTP")?;
    let _ = health_server.await;
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}
