//! The eventstore process: stores the events and snapshots of every context on this node.
//!
//! Layers, top to bottom:
//! - `service` / `schedule` / `tracking` / `control` / `inbox`: the internal gRPC API on a Unix socket
//!   (decode, call, encode); `inbox` takes Raft messages from other nodes via the router.
//! - `membership`: carrying out the cluster's decisions on who is in a context's group.
//! - `context` / `append` / `forward` / `outbox` / `read_index`: the contexts, group commit of
//!   concurrent appends, appends (and schedule changes) sent on to the leader (in batches) when
//!   this node does not lead, and the read index rounds that reads share; `publisher`: the
//!   leader's timer that proposes the publication of due scheduled events.
//! - `consensus`: one openraft group per context; the Raft log in `log/` segments.
//! - `stored` / `segment` / `scheduled`: applying committed entries to event and snapshot
//!   segment files and to the book of scheduled events;
//!   `install`: putting segments received from another member in the place of a context's own.
//!
//! An append is confirmed only after its Raft entry is fsynced and applied; recovery after a
//! crash keeps every confirmed event (see `segment::store` and `consensus::state_machine`).

pub mod append;
pub mod backup;
pub mod command;
pub mod consensus;
pub mod context;
pub mod control;
pub mod crash;
pub mod forward;
pub mod inbox;
pub mod install;
pub mod membership;
pub mod metrics;
pub mod outbox;
pub mod publisher;
pub mod read_index;
pub mod schedule;
pub mod scheduled;
pub mod segment;
pub mod service;
pub mod space;
pub mod stored;
pub mod tracking;

use std::path::PathBuf;

/// Command-line arguments of `myelin eventstore`, normally set by the supervisor.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Directory holding one sub-directory per context.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Unix socket to serve the internal storage API and gRPC health on.
    #[arg(long)]
    pub socket: PathBuf,
    /// The router's Unix socket: every Raft group reaches its members on other nodes through it.
    #[arg(long)]
    pub router_socket: Option<PathBuf>,
    /// Maximum size of an event segment file in bytes.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub segment_size: u64,
    /// Maximum size of a snapshot segment file in bytes.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub snapshot_segment_size: u64,
    /// Contexts to create at start if they do not exist yet (repeatable).
    #[arg(long = "context", default_values_t = [String::from("default")])]
    pub contexts: Vec<String>,
    /// Largest message accepted on the internal socket, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_message_size: usize,
    /// This node's name.
    #[arg(long, default_value = "myelin")]
    pub node_name: String,
    /// Threads running the eventstore's tasks. One is enough: its one client (the router) comes
    /// over one or two connections, fsyncs run on each context's log writer thread and file reads
    /// on the blocking pool; a second thread mostly added wake-ups between the two.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,
    /// Payload types one tracking stream's blacklist keeps; further ones are ignored
    /// (`myelin.limits.blacklist-entries`).
    #[arg(long, default_value_t = tracking::BLACKLIST_ENTRIES)]
    pub blacklist_entries: usize,
    /// Bytes of payload types one tracking stream's blacklist keeps
    /// (`myelin.limits.blacklist-bytes`).
    #[arg(long, default_value_t = tracking::BLACKLIST_BYTES)]
    pub blacklist_bytes: usize,
}

/// Runs the eventstore until SIGTERM or SIGINT.
pub fn main(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.worker_threads))
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

/// Opens every context, serves the internal API on the socket until `shutdown`, then stops.
pub async fn run(args: Args, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let _lock = lock_data_dir(&args.data_dir).await?;
    // After a write failed for want of space, recovery must not fail the same way again.
    space::wait_for_room(&args.data_dir)
        .await
        .with_context(|| format!("checking for space on {}", args.data_dir.display()))?;
    // Before any context opens: its log recovery must not delete segments a backup still needs.
    backup::restore_hold(&args.data_dir, backup::node_hold());
    let limits = stored::Limits {
        event_segment_size: args.segment_size,
        snapshot_segment_size: args.snapshot_segment_size,
    };
    let _metrics_upkeep = metrics::keep_up(metrics::install());
    let router_socket = args
        .router_socket
        .clone()
        .unwrap_or_else(|| args.socket.with_file_name("router.sock"));
    let relay = myelin_raft_relay::relay_client(&router_socket)
        .with_context(|| format!("router socket {}", router_socket.display()))?;
    let contexts = std::sync::Arc::new(context::Contexts::with_relay(
        &args.data_dir,
        limits,
        LOG_SEGMENT_SIZE,
        &args.node_name,
        relay,
    ));
    // Contexts stored earlier, plus the configured ones not deleted through the API.
    let names = contexts.open_at_start(&args.contexts).await?;

    let _ = std::fs::remove_file(&args.socket);
    let listener =
        tokio::net::UnixListener::bind(&args.socket).with_context(|| format!("binding {}", args.socket.display()))?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let storage = myelin_proto::internal::event_storage_server::EventStorageServer::new(service::Service {
        contexts: contexts.clone(),
        max_transaction_bytes: myelin_proto::limits::max_transaction_bytes(args.max_message_size),
        blacklist: tracking::BlacklistBound {
            entries: args.blacklist_entries,
            bytes: args.blacklist_bytes,
        },
    })
    .max_decoding_message_size(myelin_proto::limits::internal_message_limit(args.max_message_size))
    .max_encoding_message_size(usize::MAX);
    let scheduling = myelin_proto::internal::event_scheduling_server::EventSchedulingServer::new(schedule::Service {
        contexts: contexts.clone(),
        max_event_bytes: myelin_proto::limits::max_transaction_bytes(args.max_message_size),
    })
    .max_decoding_message_size(myelin_proto::limits::internal_message_limit(args.max_message_size));
    let control = myelin_proto::internal::storage_control_server::StorageControlServer::new(control::Control {
        contexts: contexts.clone(),
    });
    let inbox = myelin_proto::internal::raft_inbox_server::RaftInboxServer::new(inbox::Inbox {
        contexts: contexts.clone(),
    })
    .max_decoding_message_size(usize::MAX)
    .max_encoding_message_size(usize::MAX);
    tracing::info!(socket = %args.socket.display(), contexts = ?names, "eventstore serving");
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(myelin_proto::local_socket::window::WRITE_STREAM))
        .initial_connection_window_size(Some(myelin_proto::local_socket::window::CONNECTION))
        .add_service(health)
        .add_service(storage)
        .add_service(scheduling)
        .add_service(control)
        .add_service(inbox)
        .serve_with_incoming_shutdown(myelin_proto::local_socket::incoming(listener), shutdown)
        .await
        .context("serving the internal API")?;
    tracing::info!("eventstore stopping");
    contexts.shutdown().await;
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

/// Takes an exclusive lock on the data directory for the life of the process, so that two
/// eventstores never write the same files (e.g. an old one still flushing while a restarted one
/// starts). Waits a few seconds for a previous holder to finish.
async fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use anyhow::Context as _;
    let path = dir.join("eventstore.lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, errno)) if std::time::Instant::now() < deadline => {
                tracing::warn!(%errno, path = %path.display(), "data directory locked by another eventstore; waiting");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err((_, errno)) => anyhow::bail!("{} is locked by another eventstore: {errno}", path.display()),
        }
    }
}

/// Maximum size of a Raft log segment file.
const LOG_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;
