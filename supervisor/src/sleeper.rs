//! `myelin _sleeper`: a stand-in child that only serves gRPC health on its socket until SIGTERM
//! or SIGINT. The supervisor runs it in every role when `MYELIN_TEST_CHILDREN=sleeper`, so its
//! restart, readiness and shutdown logic can be tested before the real children exist.

use std::path::PathBuf;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

/// Names the role whose sleeper ignores SIGTERM (it must then be killed).
const IGNORE_TERM_ENV: &str = "MYELIN_SLEEPER_IGNORE_TERM";

/// Hidden test child.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The role this sleeper stands in for (only used in its log lines).
    #[arg(long)]
    pub role: String,
    /// Unix socket to serve gRPC health on.
    #[arg(long)]
    pub socket: PathBuf,
}

pub fn main(args: Args) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let _ = std::fs::remove_file(&args.socket);
    let listener =
        tokio::net::UnixListener::bind(&args.socket).with_context(|| format!("bind {}", args.socket.display()))?;
    // For tests of the supervisor's SIGKILL deadline: this sleeper ignores SIGTERM.
    let stubborn = std::env::var(IGNORE_TERM_ENV).is_ok_and(|role| role == args.role);
    // A new reporter already says SERVING for the overall service "".
    let (_reporter, health) = tonic_health::server::health_reporter();
    tracing::info!(role = %args.role, socket = %args.socket.display(), "sleeper serving health");
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), async {
            loop {
                tokio::select! {
                    _ = term.recv() => {
                        // Even a stubborn sleeper leaves with its supervisor (pdeathsig).
                        if !stubborn || !parent_is_supervisor() {
                            break;
                        }
                        tracing::info!(role = %args.role, "ignoring SIGTERM");
                    }
                    _ = int.recv() => break,
                }
            }
        })
        .await?;
    let _ = std::fs::remove_file(&args.socket);
    tracing::info!(role = %args.role, "sleeper stopped");
    Ok(())
}

fn parent_is_supervisor() -> bool {
    std::env::var(crate::child::SUPERVISOR_PID_ENV).is_ok_and(|pid| pid == nix::unistd::getppid().as_raw().to_string())
}
