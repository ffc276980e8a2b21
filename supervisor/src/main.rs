//! `myelin`: one binary for a whole Myelin node.
//!
//! - `myelin` (or `myelin run`) is the supervisor: it reads the configuration, starts the node's
//!   processes, reports readiness to systemd, restarts a process that dies, and stops them all in
//!   order on SIGTERM/SIGINT. See `supervise.rs`.
//! - `myelin eventstore|router|admin <flags>` runs one of those processes; the supervisor starts
//!   them this way, from its own executable, with every setting on the command line.
//!
//! Exit codes of the supervisor: 0 after a requested stop, 1 when a child kept failing or the
//! node could not be started, 2 for an invalid configuration or usage (nothing was started).

mod child;
mod config;
mod datasize;
mod health;
mod logging;
mod restart;
mod sleeper;
mod supervise;
mod tls;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

use crate::child::ChildMode;
use crate::supervise::Outcome;

/// Environment variable that makes the supervisor run `myelin _sleeper` stand-ins instead of
/// the real children (`MYELIN_TEST_CHILDREN=sleeper`); for testing the supervisor alone.
const TEST_CHILDREN_ENV: &str = "MYELIN_TEST_CHILDREN";

/// Myelin: an event store and message router speaking Axon Server's gRPC API.
///
/// Without a subcommand, runs a node: the supervisor starts the eventstore, router and admin
/// processes and keeps them running. Configuration comes from axonserver.properties, a TOML
/// file, AXONIQ_AXONSERVER_* / SERVER_PORT environment variables and the flags below (later
/// sources win); see docs/configuration.md.
#[derive(Parser, Debug)]
#[command(name = "myelin", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node under the supervisor (the default when no subcommand is given).
    Run(RunArgs),
    /// Run the eventstore process (normally started by the supervisor).
    Eventstore(myelin_eventstore::Args),
    /// Run the router process (normally started by the supervisor).
    Router(myelin_router::Args),
    /// Run the admin process (normally started by the supervisor).
    Admin(myelin_admin::Args),
    /// Test stand-in for a child: serves gRPC health on a socket until SIGTERM.
    #[command(name = "_sleeper", hide = true)]
    Sleeper(sleeper::Args),
}

/// The supervisor's flags; each overrides the configuration key it names.
#[derive(clap::Args, Debug, Default)]
struct RunArgs {
    /// Read Axon Server properties from FILE [default: ./axonserver.properties, else
    /// ./config/axonserver.properties]
    #[arg(long, value_name = "FILE")]
    properties: Option<PathBuf>,
    /// Read TOML configuration from FILE [default: ./myelin.toml if present]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (axoniq.axonserver.event.storage) [default: ./data]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Client gRPC port (axoniq.axonserver.port) [default: 8124]
    #[arg(long)]
    port: Option<u16>,
    /// Admin HTTP port (server.port) [default: 8024]
    #[arg(long)]
    http_port: Option<u16>,
    /// Node-to-node gRPC port (axoniq.axonserver.internal-port) [default: 8224]
    #[arg(long)]
    internal_port: Option<u16>,
    /// Node name (axoniq.axonserver.name) [default: the OS host name]
    #[arg(long)]
    name: Option<String>,
    /// Host name clients connect to (axoniq.axonserver.hostname) [default: the OS host name]
    #[arg(long)]
    hostname: Option<String>,
    /// Address the network ports listen on (myelin.bind-address) [default: 0.0.0.0]
    #[arg(long, value_name = "IP")]
    bind_address: Option<IpAddr>,
}

impl RunArgs {
    /// The given flags as (flag, configuration key, value).
    fn flags(&self) -> Vec<(&'static str, &'static str, String)> {
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        [
            (
                "--data-dir",
                "axoniq.axonserver.event.storage",
                self.data_dir.as_ref().map(path),
            ),
            ("--port", "axoniq.axonserver.port", self.port.map(|p| p.to_string())),
            ("--http-port", "server.port", self.http_port.map(|p| p.to_string())),
            (
                "--internal-port",
                "axoniq.axonserver.internal-port",
                self.internal_port.map(|p| p.to_string()),
            ),
            ("--name", "axoniq.axonserver.name", self.name.clone()),
            ("--hostname", "axoniq.axonserver.hostname", self.hostname.clone()),
            (
                "--bind-address",
                "myelin.bind-address",
                self.bind_address.map(|a| a.to_string()),
            ),
        ]
        .into_iter()
        .filter_map(|(flag, key, value)| value.map(|v| (flag, key, v)))
        .collect()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => supervisor_main(cli.run),
        Some(Command::Run(args)) => supervisor_main(args),
        Some(Command::Eventstore(args)) => child_main("eventstore", || myelin_eventstore::main(args)),
        Some(Command::Router(args)) => child_main("router", || myelin_router::main(args)),
        Some(Command::Admin(args)) => child_main("admin", || myelin_admin::main(args)),
        Some(Command::Sleeper(args)) => {
            let role = args.role.clone();
            child_main(&role, || sleeper::main(args))
        }
    }
}

/// Runs one child process: guard against outliving the supervisor, then the child's own main.
fn child_main(role: &str, run: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    let guard = child::guard_parent();
    logging::init(role);
    if let Err(e) = guard {
        error!("{e:#}");
        return ExitCode::FAILURE;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn supervisor_main(args: RunArgs) -> ExitCode {
    logging::init("supervisor");
    let usage_error = ExitCode::from(2);

    let mode = match std::env::var(TEST_CHILDREN_ENV).as_deref() {
        Err(_) | Ok("") => ChildMode::Real,
        Ok("sleeper") => {
            warn!("{TEST_CHILDREN_ENV}=sleeper: running test stand-ins instead of the real children");
            ChildMode::Sleeper
        }
        Ok(other) => {
            error!("{TEST_CHILDREN_ENV}={other:?} is not supported (only \"sleeper\")");
            return usage_error;
        }
    };

    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(e) => {
            error!("cannot determine the working directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let inputs = config::Inputs {
        cwd,
        flags: args.flags(),
        properties_file: args.properties,
        toml_file: args.config,
        env: std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect(),
        os_hostname: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".to_string()),
    };
    let loaded = match config::load(&inputs) {
        Ok(loaded) => loaded,
        Err(e) => {
            error!("{e}");
            return usage_error;
        }
    };
    for file in &loaded.files {
        info!("configuration read from {}", file.display());
    }
    for warning in &loaded.warnings {
        warn!("{warning}");
    }
    let config = loaded.config;
    // Before any child starts: a TLS setting that cannot be honoured stops the node here.
    let mut warnings = Vec::new();
    let tls = match tls::check(&config, &mut warnings) {
        Ok(tls) => tls,
        Err(e) => {
            error!("cannot serve TLS as configured: {e}");
            return usage_error;
        }
    };
    for warning in &warnings {
        warn!("{warning}");
    }
    let launches = match child::launches(&config, &tls, mode) {
        Ok(launches) => launches,
        Err(e) => {
            error!("{e:#}");
            return usage_error;
        }
    };
    info!(
        name = %config.name,
        data = %config.event_storage.display(),
        runtime = %config.runtime_directory.display(),
        "starting node"
    );

    // One thread: children are forked from it, and their PR_SET_PDEATHSIG is tied to it.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(supervise::run(config, launches)) {
        Ok(Outcome::Stopped) => ExitCode::SUCCESS,
        Ok(Outcome::GaveUp(_)) => ExitCode::FAILURE,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_means_run_and_flags_map_to_keys() {
        let cli = Cli::try_parse_from(["myelin", "--port", "9124", "--data-dir", "/d"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(
            cli.run.flags(),
            vec![
                ("--data-dir", "axoniq.axonserver.event.storage", "/d".to_string()),
                ("--port", "axoniq.axonserver.port", "9124".to_string()),
            ]
        );
        let cli = Cli::try_parse_from(["myelin", "run", "--http-port", "1"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Run(RunArgs { http_port: Some(1), .. }))
        ));
        assert!(Cli::try_parse_from(["myelin", "--port", "1", "router"]).is_err());
    }

    #[test]
    fn child_subcommands_parse_their_crates_args() {
        let cli = Cli::try_parse_from([
            "myelin",
            "router",
            "--socket",
            "/r.sock",
            "--eventstore-socket",
            "/e.sock",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Router(args)) => assert_eq!(args.socket, PathBuf::from("/r.sock")),
            other => panic!("{other:?}"),
        }
    }
}
