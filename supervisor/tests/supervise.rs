//! The real `myelin` binary supervising `_sleeper` stand-in children (`MYELIN_TEST_CHILDREN=sleeper`):
//! readiness and sd_notify, restart after a kill, ordered shutdown, Ctrl-C, no orphans after the
//! supervisor is killed, and refusal of a bad configuration, of a data directory another node uses,
//! and of a port already in use.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

const ROLES: [&str; 3] = ["eventstore", "router", "admin"];

/// A supervisor process in a short temp dir (socket paths must stay under 108 bytes).
struct Node {
    process: Child,
    dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
    /// Set once the log pipe reached its end: every line anyone wrote to it is in `log`.
    log_ended: Arc<AtomicBool>,
}

/// Three distinct free loopback ports (every listener held until all are chosen).
fn free_ports() -> [u16; 3] {
    let listeners: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let port = |i: usize| listeners[i].local_addr().unwrap().port();
    [port(0), port(1), port(2)]
}

/// The binary under test: `$MYELIN_BIN` (to run these tests against another build), else the
/// one cargo built.
fn binary() -> PathBuf {
    std::env::var_os("MYELIN_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_myelin")), PathBuf::from)
}

impl Node {
    fn start(configure: impl FnOnce(&mut Command, &Path)) -> Node {
        Node::start_on(free_ports(), configure)
    }

    /// Starts a node with gRPC, HTTP and internal ports `ports`.
    fn start_on(ports: [u16; 3], configure: impl FnOnce(&mut Command, &Path)) -> Node {
        let dir = tempfile::Builder::new().prefix("my").tempdir_in("/tmp").unwrap();
        let mut cmd = Command::new(binary());
        cmd.current_dir(dir.path())
            .args(["--data-dir", "d", "--bind-address", "127.0.0.1"])
            .args(["--port", &ports[0].to_string()])
            .args(["--http-port", &ports[1].to_string()])
            .args(["--internal-port", &ports[2].to_string()])
            .env("MYELIN_TEST_CHILDREN", "sleeper")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Nothing from the test's own environment may configure the node.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("AXONIQ_")
                || (name.starts_with("MYELIN_") && name != "MYELIN_TEST_CHILDREN")
                || ["SERVER_PORT", "RUNTIME_DIRECTORY", "NOTIFY_SOCKET", "JOURNAL_STREAM"].contains(&name.as_ref())
                || name.starts_with("WATCHDOG_")
            {
                cmd.env_remove(name.as_ref());
            }
        }
        configure(&mut cmd, dir.path());
        let mut process = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = process.stderr.take().unwrap();
        let sink = log.clone();
        let log_ended = Arc::new(AtomicBool::new(false));
        let ended = log_ended.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                sink.lock().unwrap().push(line);
            }
            ended.store(true, Ordering::Release);
        });
        Node {
            process,
            dir,
            log,
            log_ended,
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("d/run")
    }

    fn pid(&self) -> i32 {
        self.process.id() as i32
    }

    fn child_pid(&self, role: &str) -> Option<i32> {
        std::fs::read_to_string(self.run_dir().join(format!("{role}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn child_pids(&self) -> Vec<i32> {
        ROLES
            .iter()
            .map(|role| self.child_pid(role).unwrap_or_else(|| panic!("no pid file for {role}")))
            .collect()
    }

    fn log_has(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    fn log_position(&self, needle: &str) -> Option<usize> {
        self.log.lock().unwrap().iter().position(|l| l.contains(needle))
    }

    fn wait_ready(&self) {
        assert!(
            wait_until(Duration::from_secs(30), || self.log_has("node ready")),
            "no 'node ready' line"
        );
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).unwrap();
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                // The reader thread may still be behind the pipe: a test reading the log right
                // after the exit must see its last lines (children share the pipe, so it ends
                // once they are gone too; a child that outlives the supervisor only delays this).
                let drained = Instant::now() + Duration::from_secs(5);
                while !self.log_ended.load(Ordering::Acquire) && Instant::now() < drained {
                    thread::sleep(Duration::from_millis(10));
                }
                return status;
            }
            assert!(Instant::now() < deadline, "supervisor still running after {timeout:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// `/proc/<pid>/stat` fields after the command name: state, ppid, pgrp, ...
fn stat(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split(' ').map(str::to_string).collect())
}

/// Running (a zombie waiting for some reaper counts as gone).
fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|fields| fields[0] != "Z" && fields[0] != "X")
}

fn parent_of(pid: i32) -> Option<i32> {
    stat(pid)?.get(1)?.parse().ok()
}

fn environment_of(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// Collects the datagrams the supervisor sends to its NOTIFY_SOCKET.
fn notify_listener(path: &Path) -> Arc<Mutex<Vec<String>>> {
    let socket = UnixDatagram::bind(path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Ends when the test process ends; the socket file goes with the temp dir.
        loop {
            if let Ok(n) = socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().extend(message.lines().map(str::to_string));
            }
        }
    });
    received
}

#[test]
fn restarts_a_killed_child_notifies_systemd_and_stops_in_order() {
    let notify_dir = tempfile::Builder::new().prefix("mn").tempdir_in("/tmp").unwrap();
    let notify_path = notify_dir.path().join("n.sock");
    let notifications = notify_listener(&notify_path);
    let mut node = Node::start(|cmd, _| {
        cmd.env("NOTIFY_SOCKET", &notify_path).env("WATCHDOG_USEC", "400000");
    });
    node.wait_ready();
    let notified = |state: &str| notifications.lock().unwrap().iter().any(|m| m == state);
    assert!(wait_until(Duration::from_secs(5), || notified("READY=1")));
    assert!(
        wait_until(Duration::from_secs(5), || notified("WATCHDOG=1")),
        "no watchdog ping: {:?}",
        notifications.lock().unwrap()
    );

    let pids = node.child_pids();
    for pid in &pids {
        assert!(alive(*pid), "child {pid} not running");
        assert_eq!(parent_of(*pid), Some(node.pid()), "child {pid} is not the supervisor's");
        let env = environment_of(*pid);
        assert!(env.contains(&format!("MYELIN_SUPERVISOR_PID={}", node.pid())));
        assert!(!env.iter().any(|v| v.starts_with("NOTIFY_SOCKET=")), "{env:?}");
        assert!(!env.iter().any(|v| v.starts_with("WATCHDOG_")), "{env:?}");
    }
    for role in ROLES {
        assert!(node.run_dir().join(format!("{role}.sock")).exists());
    }

    // Kill the router: it comes back with a new pid, and the kill is logged.
    let old_router = pids[1];
    kill(Pid::from_raw(old_router), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || {
            node.child_pid("router")
                .is_some_and(|pid| pid != old_router && alive(pid))
        }),
        "router was not restarted"
    );
    let new_router = node.child_pid("router").unwrap();
    assert_eq!(parent_of(new_router), Some(node.pid()));
    assert!(!alive(old_router));
    assert!(node.log_has("router was killed by SIGKILL; restarting in 100 ms"));
    assert!(alive(pids[0]) && alive(pids[2]), "the other children were disturbed");

    // SIGTERM: router, admin, eventstore stop in that order; exit 0 within a few seconds.
    let since = Instant::now();
    node.signal(Signal::SIGTERM);
    let status = node.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        since.elapsed() < Duration::from_secs(5),
        "slow stop: {:?}",
        since.elapsed()
    );
    for pid in [pids[0], new_router, pids[2]] {
        assert!(!alive(pid), "child {pid} survived the supervisor");
    }
    let order: Vec<_> = ROLES
        .iter()
        .map(|role| {
            node.log_position(&format!("sending SIGTERM to {role}"))
                .unwrap_or_else(|| panic!("{role} was not sent SIGTERM"))
        })
        .collect();
    let (eventstore, router, admin) = (order[0], order[1], order[2]);
    assert!(router < admin && admin < eventstore, "stop order {order:?}");
    assert!(wait_until(Duration::from_secs(2), || notified("STOPPING=1")));
    for role in ROLES {
        assert!(!node.run_dir().join(format!("{role}.pid")).exists());
    }
    assert!(!node.run_dir().join("supervisor.pid").exists());
}

#[test]
fn ctrl_c_stops_the_node_without_restarts() {
    // A terminal sends SIGINT to its foreground process group: put the supervisor in a group of
    // its own and signal that group, as the terminal would.
    let mut node = Node::start(|cmd, _| {
        cmd.process_group(0);
    });
    node.wait_ready();
    let pids = node.child_pids();
    killpg(Pid::from_raw(node.pid()), Signal::SIGINT).unwrap();
    let status = node.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    for pid in pids {
        assert!(!alive(pid), "child {pid} survived");
    }
    assert!(node.log_has("received SIGINT"));
    assert!(!node.log_has("restarting in"), "a child was restarted during shutdown");
}

#[test]
fn children_die_with_a_killed_supervisor() {
    let mut node = Node::start(|_, _| {});
    node.wait_ready();
    let pids = node.child_pids();
    assert!(pids.iter().all(|pid| alive(*pid)));
    node.signal(Signal::SIGKILL);
    let status = node.wait_exit(Duration::from_secs(5));
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    assert!(
        wait_until(Duration::from_secs(5), || pids.iter().all(|pid| !alive(*pid))),
        "orphans left: {:?}",
        pids.iter().filter(|pid| alive(**pid)).collect::<Vec<_>>()
    );
}

#[test]
fn bad_configuration_exits_2_and_starts_nothing() {
    // The file in the working directory is found without --properties.
    let mut node = Node::start(|_, dir| {
        std::fs::write(
            dir.join("axonserver.properties"),
            "axoniq.axonserver.event.segment-size=12XB\n",
        )
        .unwrap();
    });
    let status = node.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(2));
    assert!(wait_until(Duration::from_secs(2), || {
        node.log_has("axoniq.axonserver.event.segment-size") && node.log_has("axonserver.properties")
    }));
    assert!(!node.dir.path().join("d").exists(), "the data directory was created");
}

#[test]
fn second_supervisor_on_the_same_runtime_directory_is_refused() {
    let first = Node::start(|_, _| {});
    first.wait_ready();
    let run_dir = first.run_dir();
    let mut second = Node::start(|cmd, _| {
        cmd.env("MYELIN_RUNTIME_DIRECTORY", &run_dir);
    });
    let status = second.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    assert!(wait_until(Duration::from_secs(2), || {
        second.log_has("another supervisor")
    }));
    // The first node's children are untouched.
    for pid in first.child_pids() {
        assert!(alive(pid));
    }
    assert!(run_dir.join("router.sock").exists());
}

#[test]
fn a_child_ignoring_sigterm_is_killed_after_its_grace_period() {
    let mut node = Node::start(|cmd, _| {
        cmd.env("MYELIN_SLEEPER_IGNORE_TERM", "admin");
    });
    node.wait_ready();
    let pids = node.child_pids();
    let since = Instant::now();
    node.signal(Signal::SIGTERM);
    let status = node.wait_exit(Duration::from_secs(10));
    let took = since.elapsed();
    assert!(status.success(), "{status:?}");
    // admin's grace is 2 s; the others stop at once.
    assert!(
        took >= Duration::from_secs(2),
        "admin was not given its grace: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "stop took {took:?}");
    assert!(node.log_has("admin did not stop within 2.0 s; sending SIGKILL"));
    assert!(node.log_has("admin killed: was killed by SIGKILL"));
    for pid in pids {
        assert!(!alive(pid), "child {pid} survived");
    }
}

#[test]
fn a_second_signal_kills_at_once() {
    let mut node = Node::start(|cmd, _| {
        cmd.env("MYELIN_SLEEPER_IGNORE_TERM", "router");
    });
    node.wait_ready();
    let pids = node.child_pids();
    let since = Instant::now();
    node.signal(Signal::SIGTERM);
    assert!(wait_until(Duration::from_secs(2), || {
        node.log_has("ignoring SIGTERM")
    }));
    node.signal(Signal::SIGINT);
    let status = node.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(node.log_has("received SIGINT again; killing every child now"));
    // Killed because of the second signal, not because its grace period ran out.
    assert!(node.log_has("router killed: was killed by SIGKILL"));
    assert!(!node.log_has("router did not stop within"));
    assert!(since.elapsed() < Duration::from_secs(5), "{:?}", since.elapsed());
    for pid in pids {
        assert!(!alive(pid), "child {pid} survived");
    }
}

/// Issue 16, defect 2: the lock lived only in the runtime directory, so a second node with its
/// own runtime directory (systemd's /run/myelin and a manual start, say) started on a data
/// directory in use. The data directory's own lock refuses it before any child starts, naming the
/// holder. The second node reaches the directory through a symlink: the lock is on the
/// directory, not its name.
#[test]
fn a_second_node_on_the_same_data_directory_is_refused_naming_the_holder() {
    let first = Node::start(|_, _| {});
    first.wait_ready();
    let data = first.dir.path().join("d");
    let since = Instant::now();
    let mut second = Node::start(|cmd, dir| {
        std::os::unix::fs::symlink(&data, dir.join("d")).unwrap();
        cmd.env("MYELIN_RUNTIME_DIRECTORY", dir.join("run"));
    });
    let status = second.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    assert!(since.elapsed() < Duration::from_secs(3), "{:?}", since.elapsed());
    let holder = format!("pid {}", first.pid());
    assert!(
        wait_until(Duration::from_secs(2), || second.log_has(&holder)
            && second.log_has("myelin.lock")),
        "{:?}",
        second.log.lock().unwrap()
    );
    assert!(!second.log_has("started "), "the second node started a child");
    for pid in first.child_pids() {
        assert!(alive(pid));
    }
}

/// Issue 16, defect 3: a port in use kept the node retrying for ~43 s (the child that could not
/// listen was restarted until the supervisor gave up). Now the first start stops at once, naming
/// the port and its key. (The sleepers listen on no port: this is the supervisor's own check.)
#[test]
fn a_port_in_use_stops_the_first_start_at_once_naming_it() {
    for (i, key) in [
        "axoniq.axonserver.port",
        "server.port",
        "axoniq.axonserver.internal-port",
    ]
    .into_iter()
    .enumerate()
    {
        let ports = free_ports();
        let _taken = TcpListener::bind(("127.0.0.1", ports[i])).unwrap();
        let since = Instant::now();
        let mut node = Node::start_on(ports, |_, _| {});
        let status = node.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(1), "{key}");
        assert!(since.elapsed() < Duration::from_secs(3), "{key}: {:?}", since.elapsed());
        let named = format!("port {} ({key})", ports[i]);
        assert!(
            wait_until(Duration::from_secs(2), || node.log_has(&named)),
            "{named}: {:?}",
            node.log.lock().unwrap()
        );
        assert!(!node.log_has("started "), "{key}: a child was started");
    }
}

/// Issue 16, defect 4: `timeout`, and many process managers, send SIGTERM to a process and then
/// to its group, so the supervisor gets two in a row; the second one used to SIGKILL every child
/// in the middle of the graceful drain. Now only SIGINT (a second Ctrl-C) cuts the drain short.
#[test]
fn a_second_sigterm_does_not_cut_the_drain_short() {
    let mut node = Node::start(|cmd, _| {
        cmd.env("MYELIN_SLEEPER_IGNORE_TERM", "router");
    });
    node.wait_ready();
    let pids = node.child_pids();
    let since = Instant::now();
    node.signal(Signal::SIGTERM);
    assert!(wait_until(Duration::from_secs(2), || {
        node.log_has("ignoring SIGTERM")
    }));
    node.signal(Signal::SIGTERM);
    let status = node.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(!node.log_has("killing every child now"));
    // The router had its whole grace period; the others were stopped, not killed.
    assert!(node.log_has("router did not stop within 2.0 s; sending SIGKILL"));
    assert!(since.elapsed() >= Duration::from_secs(2), "{:?}", since.elapsed());
    for role in ["admin", "eventstore"] {
        assert!(node.log_has(&format!("{role} stopped after")), "{role}");
    }
    assert!(node.log_has("received SIGTERM again"));
    for pid in pids {
        assert!(!alive(pid), "child {pid} survived");
    }
}
