//! The supervisor proper: starts the node's children, tells systemd when the node is ready,
//! keeps the children running, and stops them in order.
//!
//! Invariants:
//! - Children are forked from the runtime's only thread (the binary runs this on a
//!   `current_thread` runtime): PR_SET_PDEATHSIG, which every child sets, fires when the *thread*
//!   that forked it exits, so the forking thread must live as long as the process.
//! - Each child is owned by one task (`keep_running`) that starts it, waits for it, and restarts
//!   it with backoff; only that task signals or reaps it. Nothing here calls `waitpid(-1)`, which
//!   would steal exit statuses from tokio.
//! - Once shutdown starts, no child is started again: every task checks its stop signal before
//!   it (re)starts a child and during its backoff sleep.
//! - READY=1 is sent once, when every child answers SERVING on its health socket; WATCHDOG=1 only
//!   while every child is alive and answers (and, once ready, answers SERVING).
//! - Shutdown order is router (stop taking client work), admin, eventstore (flushes last), each
//!   with a grace period before SIGKILL. SIGINT during the stop (a second Ctrl-C) kills all
//!   children at once; a repeated SIGTERM does not (`timeout` and process managers send one to
//!   the process and another to its group), so it never cuts the drain short.
//! - One node per data directory: the supervisor holds `<data>/myelin.lock` (with its pid in it)
//!   from before any child starts until it exits, and refuses to start when another holds it.
//! - A first start with a port in use fails at once, naming it, before any child starts.

use std::fs::{DirBuilder, File};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::child::{self, Launch, Role};
use crate::config::Config;
use crate::health::{Health, Probe};
use crate::restart::{Backoff, Decision, RestartPolicy};

/// How the supervisor ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped by SIGTERM/SIGINT.
    Stopped,
    /// A child failed too often; the node was stopped.
    GaveUp(Role),
}

/// What a child's task is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Run,
    /// SIGTERM, then SIGKILL after the role's grace period.
    Term,
    /// SIGKILL now.
    Kill,
}

const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
const STARTUP_POLL: Duration = Duration::from_millis(100);
const RUNNING_POLL: Duration = Duration::from_secs(2);

struct Supervised {
    role: Role,
    stop: watch::Sender<Stop>,
    pid: watch::Receiver<Option<u32>>,
    task: JoinHandle<()>,
    probe: Probe,
}

/// Runs a node until SIGTERM/SIGINT or until a child fails too often.
pub async fn run(config: Config, launches: Vec<Launch>) -> anyhow::Result<Outcome> {
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let _locks = prepare_runtime(&config)?;
    check_ports(&config)?;
    let mut signals = Signals::new()?;
    notify(&[NotifyState::Status("starting eventstore, router and admin")]);

    let (gave_up_tx, mut gave_up_rx) = mpsc::unbounded_channel();
    let mut children = Vec::new();
    for launch in launches {
        let (stop_tx, stop_rx) = watch::channel(Stop::Run);
        let (pid_tx, pid_rx) = watch::channel(None);
        let probe = Probe::new(&launch.socket, HEALTH_TIMEOUT)?;
        let role = launch.role;
        if launch.reloads_on_hangup {
            signals.hangup_to.push((role, pid_rx.clone()));
        }
        let task = tokio::spawn(keep_running(
            launch,
            exe.clone(),
            config.runtime_directory.clone(),
            RestartPolicy::default(),
            stop_rx,
            pid_tx,
            gave_up_tx.clone(),
        ));
        children.push(Supervised {
            role,
            stop: stop_tx,
            pid: pid_rx,
            task,
            probe,
        });
    }

    let outcome = tokio::select! {
        signal = signals.recv() => {
            info!("received {signal}; shutting down");
            Outcome::Stopped
        }
        Some(role) = gave_up_rx.recv() => {
            error!(child = role.name(), "stopping the node because a child keeps failing");
            Outcome::GaveUp(role)
        }
        never = watch_node(&config, &children) => match never {},
    };
    shutdown(children, &mut signals).await;
    let _ = std::fs::remove_file(config.runtime_directory.join("supervisor.pid"));
    info!("supervisor stopped");
    Ok(outcome)
}

/// The node's lock in its data directory: whoever holds it runs a node on that directory.
pub const DATA_LOCK: &str = "myelin.lock";

/// Creates the data and runtime directories, takes the data directory's lock (one node per data
/// directory, whatever runtime directory each uses) and the runtime directory's (one supervisor
/// per runtime directory), and clears what a previous run left there.
fn prepare_runtime(config: &Config) -> anyhow::Result<(Flock<File>, Flock<File>)> {
    for dir in [&config.event_storage, &config.runtime_directory] {
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let data_lock = lock_data_dir(&config.event_storage)?;
    let run = &config.runtime_directory;
    let lock_path = run.join("supervisor.lock");
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        let holder = std::fs::read_to_string(run.join("supervisor.pid")).unwrap_or_default();
        anyhow::anyhow!(
            "another supervisor (pid {}) runs with runtime directory {}: {errno}",
            holder.trim(),
            run.display()
        )
    })?;
    for entry in std::fs::read_dir(run).with_context(|| format!("cannot list {}", run.display()))? {
        let path = entry?.path();
        if matches!(path.extension().and_then(|e| e.to_str()), Some("sock" | "pid")) {
            debug!(path = %path.display(), "removing stale file");
            std::fs::remove_file(&path).with_context(|| format!("cannot remove stale {}", path.display()))?;
        }
    }
    write_pid_file(&run.join("supervisor.pid"), std::process::id())?;
    Ok((data_lock, lock))
}

/// Takes `<data>/myelin.lock` and writes this supervisor's pid into it, or fails at once naming
/// the pid of the node that holds it. The lock is an `flock` on the file: the kernel drops it
/// when its holder exits, however it exits, so a stale file never blocks a start. The file is
/// never removed (removing a lock file races with the next taker).
fn lock_data_dir(data: &Path) -> anyhow::Result<Flock<File>> {
    let path = data.join(DATA_LOCK);
    let file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = match holder.trim() {
                "" => "pid unknown".to_owned(),
                pid => format!("pid {pid}"),
            };
            anyhow::bail!(
                "another node ({holder}) is running on the data directory {} (it holds {}); stop it first, or \
                 give this node a data directory of its own (axoniq.axonserver.event.storage)",
                data.display(),
                path.display()
            );
        }
        Err((_, errno)) => anyhow::bail!("cannot lock {}: {errno}", path.display()),
    };
    lock.set_len(0)
        .and_then(|()| writeln!(&mut *lock, "{}", std::process::id()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(lock)
}

/// Fails naming the port and its key when one of the node's TCP ports cannot be listened on
/// (another program, or another node, holds it). Without this a first start went on for ~43 s:
/// the child that could not listen was restarted until the supervisor gave up, while the other
/// children answered. The children bind the same way (`SO_REUSEADDR`, as std and tokio do) right
/// after; a program taking a port in between is still met by the restart loop.
fn check_ports(config: &Config) -> anyhow::Result<()> {
    for (key, port) in [
        ("axoniq.axonserver.port", config.port),
        ("server.port", config.http_port),
        ("axoniq.axonserver.internal-port", config.internal_port),
    ] {
        if port == 0 {
            continue;
        }
        if let Err(e) = std::net::TcpListener::bind((config.bind_address, port)) {
            anyhow::bail!(
                "cannot listen on port {port} ({key}) at {}: {e}; another program, or another node, \
                 uses it: stop it or configure another port",
                config.bind_address
            );
        }
    }
    Ok(())
}

/// Writes a pid file atomically (readers never see it half written).
fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("pid.tmp");
    let mut file = File::create(&tmp)?;
    writeln!(file, "{pid}")?;
    drop(file);
    std::fs::rename(tmp, path)
}

/// Owns one child: starts it, restarts it with backoff when it exits, stops it when asked.
async fn keep_running(
    launch: Launch,
    exe: PathBuf,
    runtime_dir: PathBuf,
    policy: RestartPolicy,
    mut stop: watch::Receiver<Stop>,
    pid_tx: watch::Sender<Option<u32>>,
    gave_up: mpsc::UnboundedSender<Role>,
) {
    let role = launch.role;
    let name = role.name();
    let pid_file = child::pid_path(&runtime_dir, role);
    let mut backoff = Backoff::new(policy);
    loop {
        if *stop.borrow() != Stop::Run {
            return;
        }
        let started = Instant::now();
        let (pid, status) = match child::spawn(&exe, &launch) {
            Ok(mut process) => {
                let pid = process.id();
                pid_tx.send_replace(pid);
                if let Some(pid) = pid
                    && let Err(e) = write_pid_file(&pid_file, pid)
                {
                    warn!(child = name, "cannot write {}: {e}", pid_file.display());
                }
                info!(child = name, pid, "started {name}");
                let status = tokio::select! {
                    status = process.wait() => status,
                    () = stop_requested(&mut stop) => {
                        stop_child(role, &mut process, &mut stop).await;
                        pid_tx.send_replace(None);
                        let _ = std::fs::remove_file(&pid_file);
                        return;
                    }
                };
                pid_tx.send_replace(None);
                let _ = std::fs::remove_file(&pid_file);
                (pid, describe(status))
            }
            Err(e) => (None, format!("could not be started: {e}")),
        };
        if *stop.borrow() != Stop::Run {
            info!(child = name, pid, "{name} exited during shutdown: {status}");
            return;
        }
        match backoff.exited(Instant::now().into_std(), started.elapsed()) {
            Decision::RestartAfter(delay) => {
                warn!(child = name, pid, "{name} {status}; restarting in {}", humanize(delay));
                notify(&[NotifyState::Status(&format!("{name} {status}; restarting"))]);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop_requested(&mut stop) => return,
                }
            }
            Decision::GiveUp { failures } => {
                error!(
                    child = name,
                    pid,
                    "{name} {status}; it failed {failures} times within {}, giving up",
                    humanize(policy.window)
                );
                let _ = gave_up.send(role);
                return;
            }
        }
    }
}

/// Resolves once the task is asked to stop (or the supervisor dropped the sender).
async fn stop_requested(stop: &mut watch::Receiver<Stop>) {
    loop {
        if *stop.borrow_and_update() != Stop::Run {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn kill_requested(stop: &mut watch::Receiver<Stop>) {
    loop {
        if *stop.borrow_and_update() == Stop::Kill {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// SIGTERM, wait up to the role's grace period, then SIGKILL.
async fn stop_child(role: Role, process: &mut tokio::process::Child, stop: &mut watch::Receiver<Stop>) {
    let name = role.name();
    let pid = process.id();
    let since = Instant::now();
    if *stop.borrow() == Stop::Term {
        if let Some(pid) = pid {
            info!(child = name, pid, "sending SIGTERM to {name}");
            // The child is not reaped until `wait` below returns, so its pid is still ours.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        let grace = role.stop_grace();
        tokio::select! {
            status = process.wait() => {
                info!(
                    child = name,
                    pid,
                    "{name} stopped after {}: {}",
                    humanize(since.elapsed()),
                    describe(status)
                );
                return;
            }
            () = tokio::time::sleep(grace) => {
                warn!(child = name, pid, "{name} did not stop within {}; sending SIGKILL", humanize(grace));
            }
            () = kill_requested(stop) => {
                warn!(child = name, pid, "sending SIGKILL to {name}");
            }
        }
    } else {
        warn!(child = name, pid, "sending SIGKILL to {name}");
    }
    let _ = process.start_kill();
    let status = process.wait().await;
    info!(child = name, pid, "{name} killed: {}", describe(status));
}

/// Watches the children's health: READY=1 once, WATCHDOG=1 while healthy, STATUS= on changes.
/// Runs until the supervisor stops watching.
async fn watch_node(config: &Config, children: &[Supervised]) -> std::convert::Infallible {
    let watchdog = sd_notify::watchdog_enabled();
    if let Some(interval) = watchdog {
        info!("systemd watchdog every {}", humanize(interval));
    }
    let mut watchdog_tick = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
    let mut poll = tokio::time::interval(STARTUP_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut next_wait_report = Duration::from_secs(10);
    let mut ready = false;
    let ready_status = format!(
        "ready: node {}, gRPC {}:{}, HTTP {}:{}",
        config.name, config.bind_address, config.port, config.bind_address, config.http_port
    );
    let mut last_trouble = String::new();

    loop {
        tokio::select! {
            _ = poll.tick() => {
                let health = check_all(children).await;
                let trouble = describe_trouble(&health);
                if !ready {
                    if trouble.is_empty() {
                        ready = true;
                        poll = tokio::time::interval_at(Instant::now() + RUNNING_POLL, RUNNING_POLL);
                        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        notify(&[NotifyState::Ready, NotifyState::Status(&ready_status)]);
                        info!(
                            name = %config.name,
                            grpc_port = config.port,
                            http_port = config.http_port,
                            internal_port = config.internal_port,
                            bind = %config.bind_address,
                            "node ready in {}",
                            humanize(started.elapsed())
                        );
                    } else if started.elapsed() >= next_wait_report {
                        next_wait_report += Duration::from_secs(10);
                        info!("waiting for the node to be ready: {trouble}");
                        notify(&[NotifyState::Status(&format!("starting: {trouble}"))]);
                    }
                } else if trouble != last_trouble {
                    if trouble.is_empty() {
                        info!("all children serving again");
                        notify(&[NotifyState::Status(&ready_status)]);
                    } else {
                        warn!("node degraded: {trouble}");
                        notify(&[NotifyState::Status(&format!("degraded: {trouble}"))]);
                    }
                    last_trouble = trouble;
                }
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                let alive = children.iter().all(|c| c.pid.borrow().is_some());
                let health = check_all(children).await;
                let answering = health.iter().all(|(_, h)| match h {
                    Health::Serving => true,
                    Health::NotServing => !ready,
                    Health::Silent => false,
                });
                if alive && answering {
                    notify(&[NotifyState::Watchdog]);
                } else {
                    warn!("withholding the systemd watchdog ping: {}", describe_trouble(&health));
                }
            }
        }
    }
}

async fn check_all(children: &[Supervised]) -> Vec<(Role, Health)> {
    let mut health = Vec::with_capacity(children.len());
    for child in children {
        let h = if child.pid.borrow().is_some() {
            child.probe.check().await
        } else {
            Health::Silent
        };
        health.push((child.role, h));
    }
    health
}

/// "" when all serve, else e.g. "router not answering, admin not serving".
fn describe_trouble(health: &[(Role, Health)]) -> String {
    health
        .iter()
        .filter_map(|(role, h)| match h {
            Health::Serving => None,
            Health::NotServing => Some(format!("{} not serving yet", role.name())),
            Health::Silent => Some(format!("{} not answering", role.name())),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Stops the children in order; a SIGINT during the stop (a second Ctrl-C) turns every remaining
/// stop into SIGKILL, a repeated SIGTERM does not.
async fn shutdown(children: Vec<Supervised>, signals: &mut Signals) {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping router, admin, eventstore"),
    ]);
    info!("stopping the node: router, then admin, then eventstore");
    let since = Instant::now();
    let mut killing = false;
    let (senders, mut handles): (Vec<_>, Vec<_>) = children
        .into_iter()
        .map(|c| ((c.role, c.stop), (c.role, c.task)))
        .unzip();
    for role in Role::STOP_ORDER {
        let Some(index) = handles.iter().position(|(r, _)| *r == role) else {
            continue;
        };
        let (_, mut task) = handles.swap_remove(index);
        if !killing {
            for (r, stop) in &senders {
                if *r == role {
                    stop.send_replace(Stop::Term);
                }
            }
        }
        loop {
            tokio::select! {
                _ = &mut task => break,
                signal = signals.recv() => {
                    if signal == "SIGTERM" {
                        // `timeout` and many process managers signal the process, then its
                        // group: a repeated SIGTERM is not a request to hurry.
                        warn!(
                            "received SIGTERM again; the graceful stop goes on (each child has its \
                             grace period; SIGINT kills the children at once)"
                        );
                        continue;
                    }
                    warn!("received {signal} again; killing every child now");
                    killing = true;
                    for (_, stop) in &senders {
                        stop.send_replace(Stop::Kill);
                    }
                }
            }
        }
    }
    info!("all children stopped in {}", humanize(since.elapsed()));
}

/// The supervisor's signals. SIGHUP asks for a reload of the TLS certificates: it is forwarded
/// to the children that serve TLS (each reloads its own, keeping the old one if the new files
/// cannot be used); nothing else in the configuration is reloaded.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    /// The children SIGHUP is forwarded to, with their current pid.
    hangup_to: Vec<(Role, watch::Receiver<Option<u32>>)>,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            hangup_to: Vec::new(),
        })
    }

    /// The next SIGTERM or SIGINT.
    async fn recv(&mut self) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => self.forward_hangup(),
            }
        }
    }

    fn forward_hangup(&self) {
        if self.hangup_to.is_empty() {
            warn!("received SIGHUP: no TLS is configured, and nothing else is reloaded; ignored");
            return;
        }
        for (role, pid) in &self.hangup_to {
            match *pid.borrow() {
                Some(pid) => {
                    info!(
                        child = role.name(),
                        "received SIGHUP: the child reloads its TLS certificate"
                    );
                    if let Ok(pid) = i32::try_from(pid)
                        && let Err(e) = kill(Pid::from_raw(pid), Signal::SIGHUP)
                    {
                        warn!(child = role.name(), "cannot forward SIGHUP: {e}");
                    }
                }
                // Not running: it loads the current files when it starts again.
                None => info!(child = role.name(), "received SIGHUP while the child is not running"),
            }
        }
    }
}

/// "exited with code 3", "was killed by SIGKILL".
fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => {
            if let Some(code) = status.code() {
                format!("exited with code {code}")
            } else if let Some(signal) = status.signal() {
                match Signal::try_from(signal) {
                    Ok(signal) => format!("was killed by {signal}"),
                    Err(_) => format!("was killed by signal {signal}"),
                }
            } else {
                format!("ended ({status})")
            }
        }
        Err(e) => format!("could not be waited for: {e}"),
    }
}

fn humanize(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("sd_notify failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_are_described() {
        assert_eq!(describe(Ok(ExitStatus::from_raw(3 << 8))), "exited with code 3");
        assert_eq!(describe(Ok(ExitStatus::from_raw(9))), "was killed by SIGKILL");
    }

    #[test]
    fn trouble_lists_the_unhealthy() {
        assert_eq!(
            describe_trouble(&[(Role::Eventstore, Health::Serving), (Role::Router, Health::Serving)]),
            ""
        );
        assert_eq!(
            describe_trouble(&[
                (Role::Eventstore, Health::NotServing),
                (Role::Router, Health::Serving),
                (Role::Admin, Health::Silent)
            ]),
            "eventstore not serving yet, admin not answering"
        );
    }
}
