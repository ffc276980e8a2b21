//! The unit files in `systemd/`: they pass `systemd-analyze verify`, they say what README.md's
//! install section relies on, and the node starts and serves under the file-system and
//! privilege restrictions `myelin.service` puts on it.
//!
//! `systemd-analyze verify` needs every ExecStart binary to exist, so it checks copies of the
//! units whose `/usr/local/bin/...` paths point at the built binaries; and because it only warns
//! (exit 0) about unknown keys and unparsable values, any line it prints about our units counts
//! as a failure. A deliberately broken copy of each kind must fail that same check, so the check
//! itself is known to bite.
//!
//! The sandbox test emulates the parts of the service that could break the node, without
//! systemd (which is not PID 1 here): a mount namespace whose root is read-only (ProtectSystem=
//! strict) except the state and runtime directories, a private /tmp, an unprivileged user with
//! no capabilities and no-new-privileges, the working directory, `$RUNTIME_DIRECTORY`, the
//! sample properties file, and systemd's notify socket with a watchdog; then the backup unit's
//! command, confined the same way with only the backup directory writable, backs that node up.
//! Not emulated: the seccomp filter, the other Protect*/Restrict* settings, and scheduling.
//!
//! Tests that need a tool (systemd-analyze, unshare, setpriv, root) print why and pass when
//! it is missing.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const UNITS: [&str; 3] = ["myelin.service", "myelin-backup.service", "myelin-backup.timer"];
/// Where the units expect the binaries (README.md, "Install as a service").
const INSTALLED_MYELIN: &str = "/usr/local/bin/myelin";
const INSTALLED_AGENT: &str = "/usr/local/bin/myelin-backup-agent";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn unit_text(name: &str) -> String {
    std::fs::read_to_string(repo().join("systemd").join(name)).unwrap()
}

/// `(section, key) -> values`, in file order; comments and blank lines skipped.
fn parse_unit(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut settings: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line:?}"));
        settings
            .entry((section.clone(), key.trim().to_string()))
            .or_default()
            .push(value.trim().to_string());
    }
    settings
}

fn setting<'a>(unit: &'a BTreeMap<(String, String), Vec<String>>, section: &str, key: &str) -> &'a str {
    unit.get(&(section.to_string(), key.to_string()))
        .and_then(|v| v.last())
        .unwrap_or_else(|| panic!("[{section}] {key}= is missing"))
}

/// A built binary: next to the `myelin` the other tests use, else in target/release or debug.
fn built(name: &str) -> PathBuf {
    let myelin = myelin_tests::binary();
    let candidates = [
        myelin.with_file_name(name),
        repo().join("target/release").join(name),
        repo().join("target/debug").join(name),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} is not built (cargo build --release --workspace)"))
}

fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// Writes the units into `dir` with the install paths replaced by the built binaries; `edit`
/// may then change a unit's text (to break it).
fn install_copies(dir: &Path, edit: impl Fn(&str, String) -> String) -> Vec<PathBuf> {
    let myelin = built("myelin");
    let agent = built("myelin-backup-agent");
    UNITS
        .iter()
        .map(|name| {
            let text = unit_text(name)
                // The longer path first: it starts with the shorter one.
                .replace(INSTALLED_AGENT, agent.to_str().unwrap())
                .replace(INSTALLED_MYELIN, myelin.to_str().unwrap());
            let path = dir.join(name);
            std::fs::write(&path, edit(name, text)).unwrap();
            path
        })
        .collect()
}

/// `systemd-analyze verify` on the files: Ok when it exits 0 and says nothing about them.
fn verify(analyze: &Path, files: &[PathBuf]) -> Result<(), String> {
    let output = Command::new(analyze)
        .args(["verify", "--man=no"])
        .args(files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Lines about units that are not ours (a host's own broken units) are no concern of ours.
    let ours: Vec<&str> = text
        .lines()
        .filter(|line| {
            UNITS.iter().any(|u| line.contains(u)) || files.iter().any(|f| line.contains(f.to_str().unwrap()))
        })
        .collect();
    if !output.status.success() || !ours.is_empty() {
        return Err(format!("systemd-analyze verify: {}\n{text}", output.status));
    }
    if !text.trim().is_empty() {
        println!("systemd-analyze verify said, about other units:\n{text}");
    }
    Ok(())
}

fn systemd_analyze() -> Option<PathBuf> {
    let found = tool("systemd-analyze");
    if found.is_none() {
        println!("skipped: systemd-analyze is not installed");
    }
    found
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze() else { return };
    let dir = tempfile::tempdir().unwrap();
    let files = install_copies(dir.path(), |_, text| text);
    for file in &files[..2] {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            !text.contains("/usr/local/bin/"),
            "ExecStart not pointed at the build: {text}"
        );
    }
    verify(&analyze, &files).unwrap();
}

#[test]
fn broken_units_fail_the_check() {
    let Some(analyze) = systemd_analyze() else { return };
    let breakages: [(&str, &str, &str); 4] = [
        // A misspelt key: systemd ignores it with a warning and exits 0.
        ("myelin.service", "WatchdogSec=", "WatchdogSecs="),
        // A value systemd cannot parse: also only a warning.
        ("myelin.service", "Type=notify", "Type=notifyy"),
        // A binary that does not exist.
        (
            "myelin-backup.service",
            "backup --dest",
            "--no-such-binary backup --dest",
        ),
        // A timer that never fires.
        ("myelin-backup.timer", "OnCalendar=daily", "OnCalendar=dailyy"),
    ];
    for (unit, from, to) in breakages {
        let dir = tempfile::tempdir().unwrap();
        let files = install_copies(dir.path(), |name, text| {
            if name != unit {
                return text;
            }
            assert!(text.contains(from), "{unit} has no {from:?} to break");
            let broken = if to.starts_with("--no-such") {
                // Point ExecStart at a path that does not exist.
                let agent = built("myelin-backup-agent");
                text.replace(agent.to_str().unwrap(), "/nonexistent/myelin-backup-agent")
            } else {
                text.replace(from, to)
            };
            assert_ne!(broken, text);
            broken
        });
        let result = verify(&analyze, &files);
        assert!(result.is_err(), "{unit} with {from:?} -> {to:?} passed the check");
        println!(
            "as expected, broken {unit} failed: {}",
            result.unwrap_err().lines().nth(1).unwrap_or("")
        );
    }
}

#[test]
fn units_have_the_documented_settings() {
    let service = parse_unit(&unit_text("myelin.service"));
    let exec = setting(&service, "Service", "ExecStart");
    assert!(exec.starts_with(&format!("{INSTALLED_MYELIN} ")), "{exec}");
    assert!(
        exec.contains("--properties /etc/myelin/axonserver.properties"),
        "{exec}"
    );
    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("User", "myelin"),
        ("Group", "myelin"),
        ("StateDirectory", "myelin"),
        ("RuntimeDirectory", "myelin"),
        ("WorkingDirectory", "/var/lib/myelin"),
        ("LimitNOFILE", "65536"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("KillMode", "mixed"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(setting(&service, "Service", key), value, "myelin.service {key}=");
    }
    let watchdog: u64 = setting(&service, "Service", "WatchdogSec").parse().unwrap();
    assert!((10..=300).contains(&watchdog), "WatchdogSec={watchdog}");
    // The supervisor stops its children within 2 + 2 + 4 s of grace.
    let stop: u64 = setting(&service, "Service", "TimeoutStopSec").parse().unwrap();
    assert!(stop >= 10, "TimeoutStopSec={stop}");
    assert_eq!(setting(&service, "Install", "WantedBy"), "multi-user.target");

    let backup = parse_unit(&unit_text("myelin-backup.service"));
    assert_eq!(setting(&backup, "Service", "Type"), "oneshot");
    // The server comes from MYELIN_SERVER, defaulted here and overridable in backup.env (which
    // systemd reads after Environment=); a --server on the command line would override both.
    assert_eq!(
        setting(&backup, "Service", "ExecStart"),
        format!("{INSTALLED_AGENT} backup --dest /var/backups/myelin")
    );
    assert_eq!(
        setting(&backup, "Service", "Environment"),
        "MYELIN_SERVER=http://localhost:8024"
    );
    assert_eq!(
        setting(&backup, "Service", "EnvironmentFile"),
        "-/etc/myelin/backup.env"
    );
    let backup_text = unit_text("myelin-backup.service");
    assert!(
        backup_text.find("Environment=MYELIN_SERVER").unwrap() < backup_text.find("EnvironmentFile=").unwrap(),
        "backup.env must come after the default"
    );
    assert_eq!(setting(&backup, "Service", "IOSchedulingClass"), "idle");
    assert_eq!(setting(&backup, "Service", "User"), "myelin");
    assert_eq!(setting(&backup, "Service", "ReadWritePaths"), "/var/backups/myelin");
    assert_eq!(setting(&backup, "Service", "ProtectSystem"), "strict");
    assert!(setting(&backup, "Service", "Nice").parse::<i32>().unwrap() > 0);

    let timer = parse_unit(&unit_text("myelin-backup.timer"));
    assert_eq!(setting(&timer, "Timer", "OnCalendar"), "daily");
    assert_eq!(setting(&timer, "Timer", "Persistent"), "true");
    setting(&timer, "Timer", "RandomizedDelaySec");
    assert_eq!(setting(&timer, "Install", "WantedBy"), "timers.target");

    // README's install section installs these same paths, and the properties file (which may
    // hold tokens) readable by root and the service's group only.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(
        readme.contains(
            "install -m 0640 -o root -g myelin systemd/axonserver.properties /etc/myelin/axonserver.properties"
        ),
        "README.md must install axonserver.properties 0640 root:myelin"
    );
    assert!(
        !readme
            .lines()
            .any(|l| l.contains("axonserver.properties /etc/myelin") && !l.contains("-m 0640")),
        "README.md installs axonserver.properties with another mode"
    );
    for needle in [
        INSTALLED_MYELIN,
        INSTALLED_AGENT,
        "/etc/myelin/axonserver.properties",
        "/var/backups/myelin",
        "systemctl enable --now myelin",
        "systemctl enable --now myelin-backup.timer",
    ] {
        assert!(readme.contains(needle), "README.md does not mention {needle}");
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    Some((status, response.split_once("\r\n\r\n")?.1.to_string()))
}

/// Kills the sandboxed supervisor if the test fails half-way.
struct Supervisor(Child);

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A command that runs its program (the arguments added next) the way the units confine it:
/// in a mount namespace where only `writable` stays writable (bound onto themselves before the
/// root is remounted read-only: ProtectSystem=strict), with an empty private /tmp (PrivateTmp),
/// as uid/gid 65534 without supplementary groups, capabilities or new privileges (User=,
/// CapabilityBoundingSet=, NoNewPrivileges=), in `cwd` (WorkingDirectory=).
fn sandboxed(unshare: &Path, setpriv: &Path, writable: &[&Path], cwd: &Path) -> Command {
    let mut script = String::from("set -e\n");
    for (i, _) in writable.iter().enumerate() {
        script.push_str(&format!("mount --bind \"$RW{i}\" \"$RW{i}\"\n"));
    }
    script.push_str(
        "mount -o remount,bind,ro /\n\
         mount -t tmpfs -o mode=1777 tmpfs /tmp\n\
         cd \"$WORKDIR\"\n\
         exec \"$SETPRIV\" --reuid=65534 --regid=65534 --clear-groups --no-new-privs --inh-caps=-all \
         --bounding-set=-all \"$@\"\n",
    );
    let mut command = Command::new(unshare);
    command
        .args(["--mount", "--propagation", "private", "sh", "-c", &script, "sh"])
        .env("SETPRIV", setpriv)
        .env("WORKDIR", cwd);
    for (i, dir) in writable.iter().enumerate() {
        command.env(format!("RW{i}"), dir);
    }
    command
}

#[test]
fn node_runs_under_the_service_sandbox() {
    if !nix::unistd::Uid::effective().is_root() {
        println!("skipped: mount namespaces and changing user need root");
        return;
    }
    let (Some(unshare), Some(setpriv)) = (tool("unshare"), tool("setpriv")) else {
        println!("skipped: unshare or setpriv (util-linux) is not installed");
        return;
    };
    let service = parse_unit(&unit_text("myelin.service"));
    let exec: Vec<&str> = setting(&service, "Service", "ExecStart").split_whitespace().collect();
    assert_eq!(exec[0], INSTALLED_MYELIN);
    let working = setting(&service, "Service", "WorkingDirectory");
    assert_eq!(
        working,
        format!("/var/lib/{}", setting(&service, "Service", "StateDirectory"))
    );

    // Not under /tmp: the sandbox mounts an empty /tmp over it, and the checkout (with its
    // target dir) may itself be under /tmp, so the binaries are copied in too. The state and
    // runtime directories stand in for /var/lib/myelin and /run/myelin, the etc copy for
    // /etc/myelin.
    let outside_tmp = Path::new("/var/tmp");
    if !outside_tmp.is_dir() {
        println!("skipped: no /var/tmp to hold the sandboxed node outside /tmp");
        return;
    }
    let root = tempfile::Builder::new()
        .prefix("myelin-sd")
        .tempdir_in(outside_tmp)
        .unwrap();
    let bin = root.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let copy_binary = |name: &str| {
        let to = bin.join(name);
        std::fs::copy(built(name), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        to
    };
    let myelin = copy_binary("myelin");
    let agent = copy_binary("myelin-backup-agent");
    let state = root.path().join("state");
    let run = root.path().join("run");
    let etc = root.path().join("etc");
    let notify_dir = root.path().join("notify");
    for dir in [&state, &run, &etc, &notify_dir] {
        std::fs::create_dir(dir).unwrap();
    }
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let nobody = nix::unistd::Uid::from_raw(65534);
    let nogroup = nix::unistd::Gid::from_raw(65534);
    for dir in [&state, &run] {
        nix::unistd::chown(dir.as_path(), Some(nobody), Some(nogroup)).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    }
    // Installed as README.md says: 0640, root, the service's group (65534 here).
    let properties = etc.join("axonserver.properties");
    std::fs::copy(repo().join("systemd/axonserver.properties"), &properties).unwrap();
    nix::unistd::chown(properties.as_path(), Some(nix::unistd::Uid::from_raw(0)), Some(nogroup)).unwrap();
    std::fs::set_permissions(&properties, std::fs::Permissions::from_mode(0o640)).unwrap();
    let args: Vec<String> = exec[1..]
        .iter()
        .map(|a| a.replace("/etc/myelin", etc.to_str().unwrap()))
        .collect();

    let notify_path = notify_dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    std::fs::set_permissions(&notify_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();

    let http_port = free_port();
    let log_path = root.path().join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = sandboxed(&unshare, &setpriv, &[&state, &run], &state);
    let child = command
        .arg(&myelin)
        .args(&args)
        .env("RUNTIME_DIRECTORY", &run)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "1000000")
        .env("AXONIQ_AXONSERVER_PORT", free_port().to_string())
        .env("SERVER_PORT", http_port.to_string())
        .env("AXONIQ_AXONSERVER_INTERNAL_PORT", free_port().to_string())
        .env("MYELIN_BIND_ADDRESS", "127.0.0.1")
        .env("RUST_LOG", "info,openraft=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut supervisor = Supervisor(child);
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // READY=1, then watchdog pings every half second while the node is healthy.
    let mut messages: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while messages.iter().filter(|m| *m == "WATCHDOG=1").count() < 2 {
        if let Some(status) = supervisor.0.try_wait().unwrap() {
            panic!("the node exited with {status}; log:\n{}", log_text());
        }
        assert!(
            Instant::now() < deadline,
            "no READY=1 and watchdog pings: {messages:?}; log:\n{}",
            log_text()
        );
        let mut buf = [0u8; 4096];
        if let Ok(n) = notify.recv(&mut buf) {
            messages.extend(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string));
        }
    }
    assert!(messages.contains(&"READY=1".to_string()), "{messages:?}");

    let (status, body) = http_get(http_port, "/v1/public/me").expect("admin answers");
    assert_eq!(status, 200, "{body}");

    // Everything the node wrote is in the state directory (data defaults to ./data) and the
    // runtime directory; the rest of the file system was read-only to it.
    assert!(state.join("data/default").is_dir(), "no data in the state directory");
    for socket in ["eventstore.sock", "router.sock", "admin.sock"] {
        assert!(run.join(socket).exists(), "{socket} not in the runtime directory");
    }
    let owner = std::fs::metadata(state.join("data")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&owner),
        65534,
        "not written as the service user"
    );

    // myelin-backup.service's command, confined the same way with only the backup directory
    // writable, backs the sandboxed node up (as its user: it must read the data directory, which
    // is read-only to it), and the set verifies.
    let backup = parse_unit(&unit_text("myelin-backup.service"));
    let dest = root.path().join("backups");
    std::fs::create_dir(&dest).unwrap();
    nix::unistd::chown(dest.as_path(), Some(nobody), Some(nogroup)).unwrap();
    let backup_args: Vec<String> = setting(&backup, "Service", "ExecStart")
        .split_whitespace()
        .skip(1)
        .map(|a| a.replace("/var/backups/myelin", dest.to_str().unwrap()))
        .collect();
    // The unit's Environment=, with the port changed as backup.env would change it.
    let (key, server) = setting(&backup, "Service", "Environment").split_once('=').unwrap();
    let server = server.replace("http://localhost:8024", &format!("http://127.0.0.1:{http_port}"));
    let output = sandboxed(&unshare, &setpriv, &[&dest], root.path())
        .arg(&agent)
        .args(&backup_args)
        .env_remove("MYELIN_TOKEN")
        .env(key, server)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "backup under the unit's sandbox: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let verified = Command::new(&agent).arg("verify").arg(&dest).output().unwrap();
    assert!(
        verified.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );

    kill(Pid::from_raw(supervisor.0.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = supervisor.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no stop after SIGTERM; log:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = log_text();
    assert!(status.success(), "{status}; log:\n{log}");
    for trouble in ["Read-only file system", "Permission denied", "ERROR"] {
        assert!(!log.contains(trouble), "{trouble:?} in the log:\n{log}");
    }
}
