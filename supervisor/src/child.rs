//! The node's child processes: what they are called, how they are started, and the guard each
//! runs first so it never outlives its supervisor.
//!
//! Every child is this same binary, started with a subcommand (`myelin eventstore ...`), so one
//! installed file is the whole node. The supervisor passes each child everything it needs on the
//! command line; children read no configuration files.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::config::Config;
use crate::tls::Tls;

/// Set by the supervisor in its children's environment: its own pid.
pub const SUPERVISOR_PID_ENV: &str = "MYELIN_SUPERVISOR_PID";

/// Longest socket path: `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Eventstore,
    Router,
    Admin,
}

impl Role {
    /// Start order: storage first, so the others find it soon.
    pub const START_ORDER: [Role; 3] = [Role::Eventstore, Role::Router, Role::Admin];
    /// Stop order: the network edge first (no new client work), storage last (it flushes).
    pub const STOP_ORDER: [Role; 3] = [Role::Router, Role::Admin, Role::Eventstore];

    pub fn name(self) -> &'static str {
        match self {
            Role::Eventstore => "eventstore",
            Role::Router => "router",
            Role::Admin => "admin",
        }
    }

    /// How long a child may take to stop after SIGTERM before it is killed. The sum stays well
    /// under systemd's and an impatient operator's patience.
    pub fn stop_grace(self) -> Duration {
        match self {
            Role::Router | Role::Admin => Duration::from_secs(2),
            Role::Eventstore => Duration::from_secs(4),
        }
    }
}

/// Which programs the supervisor runs as its children.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildMode {
    /// The real eventstore, router and admin.
    Real,
    /// `myelin _sleeper` in every role: serves health only. For testing the supervisor itself;
    /// selected with `MYELIN_TEST_CHILDREN=sleeper`.
    Sleeper,
}

/// One child's command line, minus the program.
#[derive(Clone, Debug)]
pub struct Launch {
    pub role: Role,
    /// The Unix socket the child serves `grpc.health.v1.Health` (and its internal API) on.
    pub socket: PathBuf,
    pub args: Vec<OsString>,
    /// Extra environment: secrets travel here rather than in `args`, which every user of the
    /// machine can read in the process list.
    pub env: Vec<(String, String)>,
    /// Whether the child reloads its TLS certificate on SIGHUP (the supervisor forwards its
    /// own); a child without TLS is never sent SIGHUP, which would end it.
    pub reloads_on_hangup: bool,
}

/// The sockets of a node's children, in its runtime directory.
pub fn socket_path(runtime_dir: &Path, role: Role) -> PathBuf {
    runtime_dir.join(format!("{}.sock", role.name()))
}

/// A child's pid file in the runtime directory, for operators and tests.
pub fn pid_path(runtime_dir: &Path, role: Role) -> PathBuf {
    runtime_dir.join(format!("{}.pid", role.name()))
}

/// Builds the three children's command lines from the configuration and its checked TLS
/// settings.
pub fn launches(config: &Config, tls: &Tls, mode: ChildMode) -> anyhow::Result<Vec<Launch>> {
    let socket = |role| -> anyhow::Result<PathBuf> {
        let path = socket_path(&config.runtime_directory, role);
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "socket path {} is {} bytes, longer than the {MAX_SOCKET_PATH} a Unix socket allows; \
                 choose a shorter myelin.runtime-directory",
                path.display(),
                path.as_os_str().len()
            );
        }
        Ok(path)
    };
    let es_socket = socket(Role::Eventstore)?;
    let router_socket = socket(Role::Router)?;
    let admin_socket = socket(Role::Admin)?;
    let hostname = config.advertised_hostname();

    let mut launches = Vec::new();
    for role in Role::START_ORDER {
        let own_socket = socket(role)?;
        let mut args: Vec<OsString> = Vec::new();
        let mut arg = |flag: &str, value: &dyn AsRef<OsStr>| {
            args.push(flag.into());
            args.push(value.as_ref().to_owned());
        };
        match (mode, role) {
            (ChildMode::Sleeper, _) => {
                arg("--role", &role.name());
                arg("--socket", &own_socket);
            }
            (ChildMode::Real, Role::Eventstore) => {
                arg("--data-dir", &config.event_storage);
                arg("--socket", &own_socket);
                arg("--router-socket", &router_socket);
                arg("--segment-size", &config.event_segment_size.to_string());
                let snapshot_segment_size = config.snapshot_segment_size.to_string();
                arg("--snapshot-segment-size", &snapshot_segment_size);
                for context in &config.contexts {
                    arg("--context", context);
                }
                arg("--max-message-size", &config.max_message_size.to_string());
                arg("--node-name", &config.name);
                if let Some(threads) = config.eventstore_worker_threads {
                    arg("--worker-threads", &threads.to_string());
                }
                for (flag, value) in &config.eventstore_limits {
                    arg(flag, &value.to_string());
                }
            }
            (ChildMode::Real, Role::Router) => {
                let listen = SocketAddr::new(config.bind_address, config.port);
                arg("--listen", &listen.to_string());
                arg("--socket", &own_socket);
                arg("--eventstore-socket", &es_socket);
                arg("--admin-socket", &admin_socket);
                let internal = SocketAddr::new(config.bind_address, config.internal_port);
                arg("--internal-listen", &internal.to_string());
                arg("--max-message-size", &config.max_message_size.to_string());
                arg("--node-name", &config.name);
                arg("--hostname", &hostname);
                arg("--grpc-port", &config.port.to_string());
                arg("--http-port", &config.http_port.to_string());
                if let Some(enabled) = config.heartbeat.enabled {
                    arg("--heartbeats", &enabled.to_string());
                }
                if let Some(ms) = config.heartbeat.frequency_ms {
                    arg("--heartbeat-interval-ms", &ms.to_string());
                }
                if let Some(ms) = config.heartbeat.timeout_ms {
                    arg("--heartbeat-timeout-ms", &ms.to_string());
                }
                if let Some(auto) = config.balancing.auto {
                    arg("--auto-balancing", &auto.to_string());
                }
                if let Some(s) = config.balancing.delay_s {
                    arg("--rebalance-delay-ms", &(s * 1000).to_string());
                }
                if let Some(s) = config.balancing.interval_s {
                    arg("--rebalance-interval-ms", &(s * 1000).to_string());
                }
                if let Some(threads) = config.router_worker_threads {
                    arg("--worker-threads", &threads.to_string());
                }
                for (name, value) in &config.tags {
                    arg("--tag", &format!("{name}={value}"));
                }
                for (flag, value) in &config.router_limits {
                    arg(flag, &value.to_string());
                }
                if config.access_control.enabled {
                    arg("--access-control", &"true");
                }
                if let Some(files) = &tls.grpc {
                    arg("--tls-cert-chain-file", &files.cert_path);
                    arg("--tls-private-key-file", &files.key_path);
                }
            }
            (ChildMode::Real, Role::Admin) => {
                let listen = SocketAddr::new(config.bind_address, config.http_port);
                arg("--listen", &listen.to_string());
                arg("--socket", &own_socket);
                arg("--eventstore-socket", &es_socket);
                arg("--router-socket", &router_socket);
                arg("--node-name", &config.name);
                for (name, value) in &config.tags {
                    arg("--tag", &format!("{name}={value}"));
                }
                arg("--hostname", &hostname);
                arg("--grpc-port", &config.port.to_string());
                arg("--internal-hostname", &config.advertised_internal_hostname());
                arg("--internal-port", &config.internal_port.to_string());
                arg("--control-db", &config.control_db);
                arg("--data-dir", &config.event_storage);
                arg("--disk-space-threshold", &config.disk_space_threshold.to_string());
                arg("--controldb-backup-location", &config.controldb_backup_location);
                arg("--backup-log-hold-minutes", &config.backup_log_hold_minutes.to_string());
                if config.access_control.enabled {
                    arg("--access-control", &"true");
                }
                if let Some(files) = &tls.http {
                    arg("--tls-cert-file", &files.cert_path);
                    arg("--tls-key-file", &files.key_path);
                }
                if tls.grpc.is_some() {
                    arg("--grpc-tls", &"true");
                }
                if let Some(first) = &config.autocluster_first {
                    arg("--autocluster-first", first);
                    if !config.autocluster_contexts.is_empty() {
                        arg("--autocluster-contexts", &config.autocluster_contexts.join(","));
                    }
                }
            }
        }
        let subcommand: OsString = match mode {
            ChildMode::Real => role.name().into(),
            ChildMode::Sleeper => "_sleeper".into(),
        };
        args.insert(0, subcommand);
        let mut env = Vec::new();
        if mode == ChildMode::Real
            && role == Role::Router
            && config.access_control.enabled
            && let Some(token) = &config.access_control.internal_token
        {
            env.push(("MYELIN_INTERNAL_TOKEN".to_owned(), token.clone()));
        }
        if mode == ChildMode::Real && role == Role::Admin {
            let access = &config.access_control;
            if let Some(token) = &access.admin_token {
                env.push(("MYELIN_ADMIN_TOKEN".to_owned(), token.clone()));
            }
            if let Some(token) = &access.token {
                env.push(("MYELIN_ACCESS_TOKEN".to_owned(), token.clone()));
            }
        }
        let reloads_on_hangup = mode == ChildMode::Real
            && match role {
                Role::Router => tls.grpc.is_some(),
                Role::Admin => tls.http.is_some(),
                Role::Eventstore => false,
            };
        launches.push(Launch {
            role,
            socket: own_socket,
            args,
            env,
            reloads_on_hangup,
        });
    }
    Ok(launches)
}

/// Starts one child. It gets its own process group, so a terminal's Ctrl-C reaches only the
/// supervisor, which then stops the children in order; `kill_on_drop` covers supervisor panics.
pub fn spawn(exe: &Path, launch: &Launch) -> std::io::Result<tokio::process::Child> {
    tokio::process::Command::new(exe)
        .args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .env(SUPERVISOR_PID_ENV, std::process::id().to_string())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

/// Run first in every child: ask the kernel for SIGTERM when the supervisor dies, then make sure
/// it has not died already (it may have between our fork and the prctl). Without the variable
/// (a child run by hand) there is nothing to guard.
pub fn guard_parent() -> anyhow::Result<()> {
    let Some(raw) = std::env::var_os(SUPERVISOR_PID_ENV) else {
        return Ok(());
    };
    let expected: i32 = raw
        .to_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{SUPERVISOR_PID_ENV}={raw:?} is not a pid"))?;
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).context("prctl(PR_SET_PDEATHSIG)")?;
    let parent = nix::unistd::getppid().as_raw();
    if parent != expected {
        bail!("the supervisor (pid {expected}) is gone (parent is now {parent}); exiting");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Inputs, load};

    fn config(dir: &Path) -> Config {
        let inputs = Inputs {
            cwd: dir.to_path_buf(),
            os_hostname: "box1".into(),
            env: vec![
                ("AXONIQ_AXONSERVER_DOMAIN".into(), "example.org".into()),
                ("MYELIN_CONTEXTS".into(), "default,orders".into()),
                ("MYELIN_BIND_ADDRESS".into(), "127.0.0.1".into()),
            ],
            ..Inputs::default()
        };
        load(&inputs).unwrap().config
    }

    fn strings(launch: &Launch) -> Vec<String> {
        launch.args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn access_control_reaches_router_and_admin_and_tokens_stay_out_of_argv() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.access_control.enabled = true;
        c.access_control.admin_token = Some("adm1n".into());
        c.access_control.token = Some("app".into());
        let l = launches(&c, &Tls::default(), ChildMode::Real).unwrap();
        for launch in &l[1..] {
            let args = strings(launch).join(" ");
            assert!(args.contains("--access-control true"), "{args}");
            assert!(!args.contains("adm1n") && !args.contains(" app"), "{args}");
        }
        assert!(!strings(&l[0]).join(" ").contains("--access-control"));
        assert_eq!(
            l[2].env,
            vec![
                ("MYELIN_ADMIN_TOKEN".to_owned(), "adm1n".to_owned()),
                ("MYELIN_ACCESS_TOKEN".to_owned(), "app".to_owned())
            ]
        );
        assert!(l[1].env.is_empty());
    }

    #[test]
    fn real_children_get_their_flags() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let run = c.runtime_directory.display().to_string();
        let l = launches(&c, &Tls::default(), ChildMode::Real).unwrap();
        assert_eq!(l.iter().map(|l| l.role).collect::<Vec<_>>(), Role::START_ORDER);
        let es = strings(&l[0]);
        assert_eq!(es[0], "eventstore");
        let es = es[1..].join(" ");
        assert_eq!(
            es,
            format!(
                "--data-dir {} --socket {run}/eventstore.sock --router-socket {run}/router.sock \
                 --segment-size 268435456 \
                 --snapshot-segment-size 268435456 --context default --context orders \
                 --max-message-size 4194304 --node-name box1",
                c.event_storage.display()
            )
        );
        assert_eq!(
            strings(&l[1]).join(" "),
            format!(
                "router --listen 127.0.0.1:8124 --socket {run}/router.sock \
                 --eventstore-socket {run}/eventstore.sock --admin-socket {run}/admin.sock \
                 --internal-listen 127.0.0.1:8224 --max-message-size 4194304 \
                 --node-name box1 --hostname box1.example.org --grpc-port 8124 --http-port 8024"
            )
        );
        assert_eq!(
            strings(&l[2]).join(" "),
            format!(
                "admin --listen 127.0.0.1:8024 --socket {run}/admin.sock \
                 --eventstore-socket {run}/eventstore.sock --router-socket {run}/router.sock --node-name box1 \
                 --hostname box1.example.org --grpc-port 8124 --internal-hostname box1.example.org \
                 --internal-port 8224 --control-db {data}/_admin/myelin-controldb.sqlite3 --data-dir {data} \
                 --disk-space-threshold 268435456 --controldb-backup-location {data}/backups \
                 --backup-log-hold-minutes 30",
                data = c.event_storage.display()
            )
        );
    }

    /// The command lines must parse with the children's own `Args`, or a child would exit at
    /// once with a usage error and be restarted forever.
    #[test]
    fn real_children_accept_their_command_lines() {
        use clap::{Args, Command, FromArgMatches};
        fn parse<A: Args + FromArgMatches>(launch: &Launch) -> A {
            let cmd = A::augment_args(Command::new(launch.role.name()));
            let matches = cmd.try_get_matches_from(&launch.args).unwrap();
            A::from_arg_matches(&matches).unwrap()
        }
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let l = launches(&c, &Tls::default(), ChildMode::Real).unwrap();
        let es: myelin_eventstore::Args = parse(&l[0]);
        assert_eq!(es.contexts, vec!["default", "orders"]);
        assert_eq!(es.data_dir, c.event_storage);
        let router: myelin_router::Args = parse(&l[1]);
        assert_eq!(router.listen.to_string(), "127.0.0.1:8124");
        assert_eq!(router.eventstore_socket, es.socket);
        let admin: myelin_admin::Args = parse(&l[2]);
        assert_eq!(admin.listen.to_string(), "127.0.0.1:8024");
        assert_eq!(admin.hostname, "box1.example.org");
        assert_eq!(admin.control_db, c.control_db);
        assert_eq!(admin.data_dir.as_ref(), Some(&c.event_storage));
    }

    #[test]
    fn tls_files_reach_the_router_and_admin() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let files = |cert: &str, key: &str| myelin_tls::CertFiles {
            cert_key: "c".into(),
            cert_path: cert.into(),
            key_key: "k".into(),
            key_path: key.into(),
        };
        let tls = Tls {
            grpc: Some(files("/g.crt", "/g.key")),
            http: Some(files("/h.crt", "/h.key")),
        };
        let l = launches(&c, &tls, ChildMode::Real).unwrap();
        let router = strings(&l[1]).join(" ");
        assert!(
            router.ends_with("--tls-cert-chain-file /g.crt --tls-private-key-file /g.key"),
            "{router}"
        );
        let admin = strings(&l[2]).join(" ");
        assert!(
            admin.contains("--tls-cert-file /h.crt --tls-key-file /h.key --grpc-tls true"),
            "{admin}"
        );
        assert!(!strings(&l[0]).join(" ").contains("tls"));
        let router: myelin_router::Args = {
            use clap::{Args, Command, FromArgMatches};
            let cmd = myelin_router::Args::augment_args(Command::new("router"));
            myelin_router::Args::from_arg_matches(&cmd.try_get_matches_from(&l[1].args).unwrap()).unwrap()
        };
        assert_eq!(router.tls_private_key_file, Some(PathBuf::from("/g.key")));
    }

    #[test]
    fn sleepers_replace_every_child() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let l = launches(&c, &Tls::default(), ChildMode::Sleeper).unwrap();
        assert_eq!(
            strings(&l[1]),
            vec![
                "_sleeper".to_string(),
                "--role".into(),
                "router".into(),
                "--socket".into(),
                l[1].socket.display().to_string(),
            ]
        );
    }

    #[test]
    fn long_socket_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.runtime_directory = PathBuf::from(format!("/tmp/{}", "d".repeat(100)));
        let err = launches(&c, &Tls::default(), ChildMode::Real).unwrap_err().to_string();
        assert!(err.contains("longer than the 107"), "{err}");
    }
}
