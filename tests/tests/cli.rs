//! `myelin-cli`, the real binary, against a real node: every command's table and `--json`
//! output, what the node holds afterwards, and the exit codes of refusals (1), bad input (2,
//! and then nothing changed on the node) and an unreachable server (3).
//!
//! The CLI binary is `$MYELIN_CLI_BIN`, else the `myelin-cli` next to the `myelin` the other
//! tests use, else `target/release` or `target/debug`.

use std::path::{Path, PathBuf};
use std::process::Command;

use myelin_tests::{Node, Options};
use serde_json::{Value, json};

fn cli_binary() -> PathBuf {
    if let Ok(path) = std::env::var("MYELIN_CLI_BIN") {
        return PathBuf::from(path);
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    [
        myelin_tests::binary().with_file_name("myelin-cli"),
        target.join("release/myelin-cli"),
        target.join("debug/myelin-cli"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("myelin-cli is not built (cargo build --release --workspace)")
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "{self:?}");
        assert!(self.stderr.is_empty(), "{self:?}");
        self
    }

    fn json(self) -> Value {
        let run = self.ok();
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {run:?}"))
    }

    /// Asserts the exit code, that nothing went to stdout, and that stderr has `needle`.
    fn fails(self, code: i32, needle: &str) -> Run {
        assert_eq!(self.code, code, "{self:?}");
        assert!(self.stdout.is_empty(), "{self:?}");
        assert!(self.stderr.starts_with("error: "), "{self:?}");
        assert!(self.stderr.contains(needle), "expected {needle:?}: {self:?}");
        self
    }
}

/// Runs the CLI with `args` in an empty directory, with no server, token or token file from
/// the environment.
fn run_cli(args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(cli_binary())
        .args(args)
        .current_dir(dir.path())
        .env_remove("MYELIN_SERVER")
        .env_remove("MYELIN_TOKEN")
        .env_remove("MYELIN_TOKEN_FILE")
        .output()
        .expect("run myelin-cli");
    Run {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// Runs the CLI against the node (`-S` after the command, as Axon's CLI takes it).
fn cli(node: &Node, args: &[&str]) -> Run {
    let server = format!("http://127.0.0.1:{}", node.http_port);
    let mut all = args.to_vec();
    all.extend(["-S", &server]);
    run_cli(&all)
}

/// Starts a node and waits until admin lists `default` (it aligns its control DB with the event
/// store's contexts just after the start).
async fn start_node() -> Node {
    let node = Node::start(Options::default()).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !context_names(&node).iter().any(|c| c == "default") {
        assert!(
            std::time::Instant::now() < deadline,
            "admin never listed the default context"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    node
}

fn contexts(node: &Node) -> Vec<Value> {
    cli(node, &["contexts", "--json"]).json().as_array().unwrap().clone()
}

fn context_names(node: &Node) -> Vec<String> {
    contexts(node)
        .iter()
        .map(|c| c["context"].as_str().unwrap().to_string())
        .collect()
}

fn application_names(node: &Node) -> Vec<String> {
    cli(node, &["applications", "-o", "json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect()
}

/// The table row (first cell `first`), split into cells on runs of 2+ spaces.
fn row(table: &str, first: &str) -> Vec<String> {
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{table}"));
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_contexts_as_tables_and_json() {
    let node = start_node().await;

    let nodes = cli(&node, &["nodes", "--json"]).json();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let me = &nodes[0];
    assert_eq!(me["grpcPort"], node.grpc_port);
    assert_eq!(me["httpPort"], node.http_port);
    assert_eq!(me["grpcInternalPort"], node.internal_port);
    assert_eq!(me["connected"], true);
    let name = me["name"].as_str().unwrap().to_string();
    let table = cli(&node, &["nodes"]).ok().stdout;
    assert!(table.starts_with("NAME"), "{table}");
    let cells = row(&table, &name);
    assert_eq!(cells[2], node.grpc_port.to_string(), "{table}");
    assert_eq!(cells[3], node.http_port.to_string(), "{table}");
    assert_eq!(cells.last().unwrap(), "yes", "{table}");

    let listed = contexts(&node);
    let default = listed
        .iter()
        .find(|c| c["context"] == "default")
        .unwrap_or_else(|| panic!("no default context: {listed:?}"));
    assert_eq!(default["roles"], json!([{"node": name, "role": "PRIMARY"}]));
    // The global options may also come first, and -o json is --json.
    let server = format!("http://127.0.0.1:{}", node.http_port);
    let first = run_cli(&["-S", &server, "-o", "json", "contexts"]).json();
    assert_eq!(first.as_array().unwrap().len(), listed.len());
    let table = cli(&node, &["contexts"]).ok().stdout;
    assert!(table.starts_with("CONTEXT"), "{table}");
    assert_eq!(row(&table, "default")[2], format!("{name}[PRIMARY]"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_and_delete_contexts() {
    let node = start_node().await;
    let name = cli(&node, &["nodes", "--json"]).json()[0]["name"]
        .as_str()
        .unwrap()
        .to_string();

    let created = cli(&node, &["register-context", "-c", "orders"]).ok();
    assert_eq!(created.stdout, "context orders created\n");
    let created = cli(&node, &["register-context", "-c", "audit", "-n", &name, "--json"]).json();
    assert_eq!(created, json!({"context": "audit", "status": "created"}));
    let listed = contexts(&node);
    for context in ["orders", "audit"] {
        let c = listed.iter().find(|c| c["context"] == context).unwrap();
        assert_eq!(c["roles"], json!([{"node": name, "role": "PRIMARY"}]), "{c}");
    }
    let table = cli(&node, &["contexts"]).ok().stdout;
    assert_eq!(row(&table, "orders")[2], format!("{name}[PRIMARY]"), "{table}");

    // Refused by the server: exit 1 with its message and code; nothing changed.
    cli(&node, &["register-context", "-c", "orders"]).fails(1, "orders: context already exists (AXONIQ-1304)");
    cli(&node, &["register-context", "-c", "x", "-n", "no-such-node"]).fails(1, "(AXONIQ-1301)");
    // Bad input: exit 2, nothing sent.
    let before = context_names(&node);
    cli(&node, &["register-context", "-c", "bad name"]).fails(2, "may contain only letters");
    cli(&node, &["register-context", "-c", "_system"]).fails(2, "the system's own");
    cli(&node, &["register-context", "-c", &"c".repeat(65)]).fails(2, "longer than 64");
    cli(&node, &["register-context", "-c", "dup", "-n", "a", "-p", "a"]).fails(2, "named twice");
    cli(&node, &["register-context", "-c", "x", "-o", "yaml"]).fails(2, "invalid value 'yaml'");
    cli(&node, &["register-context"]).fails(2, "--context <NAME>");
    cli(&node, &["delete-context", "-c", "_admin"]).fails(2, "the system's own");
    assert_eq!(context_names(&node), before);

    let deleted = cli(&node, &["delete-context", "-c", "orders"]).ok();
    assert_eq!(deleted.stdout, "context orders deleted\n");
    let deleted = cli(
        &node,
        &["delete-context", "-c", "audit", "--preserve-event-store", "--json"],
    )
    .json();
    assert_eq!(
        deleted,
        json!({"context": "audit", "status": "deleted (event store kept on disk)"})
    );
    let left = context_names(&node);
    assert!(!left.iter().any(|c| c == "orders" || c == "audit"), "{left:?}");
    assert!(left.iter().any(|c| c == "default"), "{left:?}");
    cli(&node, &["delete-context", "-c", "orders"]).fails(1, "(AXONIQ-1302)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_list_and_delete_applications() {
    let node = start_node().await;
    cli(&node, &["register-context", "-c", "orders"]).ok();
    assert_eq!(cli(&node, &["applications"]).ok().stdout, "no applications\n");

    let registered = cli(
        &node,
        &[
            "register-application",
            "-a",
            "billing",
            "-d",
            "Billing service",
            "-r",
            "READ_EVENTS@orders,publish_events@orders,MONITOR",
        ],
    )
    .ok();
    let token = registered
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap_or_else(|| panic!("no token line: {registered:?}"))
        .to_string();
    assert!(
        token.len() >= 16 && token.chars().all(|c| c.is_ascii_graphic()),
        "{token}"
    );
    assert!(registered.stdout.contains("will not be shown again"), "{registered:?}");

    let own_token = "a-token-of-our-own-choosing";
    let fixed = cli(
        &node,
        &[
            "register-application",
            "-a",
            "auditor",
            "-r",
            "READ_EVENTS@default",
            "-T",
            own_token,
            "--json",
        ],
    )
    .json();
    assert_eq!(
        fixed,
        json!({"application": "auditor", "status": "registered", "token": own_token})
    );

    let listed = cli(&node, &["applications", "--json"]).json();
    let billing = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "billing")
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(billing["description"], "Billing service");
    let roles = billing["roles"].as_array().unwrap();
    let orders = roles.iter().find(|r| r["context"] == "orders").unwrap();
    let mut granted: Vec<&str> = orders["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    granted.sort_unstable();
    assert_eq!(granted, ["PUBLISH_EVENTS", "READ_EVENTS"], "{billing}");
    let everywhere = roles.iter().find(|r| r["context"] == "*").unwrap();
    assert_eq!(everywhere["roles"], json!(["MONITOR"]), "{billing}");
    assert!(!listed.to_string().contains(&token), "a token was listed");
    let table = cli(&node, &["applications"]).ok().stdout;
    let cells = row(&table, "billing");
    assert_eq!(cells[1], "Billing service", "{table}");
    assert_eq!(cells[2], format!("{}...", &token[..8]), "{table}");
    let orders_line = table
        .lines()
        .find(|l| l.contains("orders: "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        orders_line.contains("READ_EVENTS") && orders_line.contains("PUBLISH_EVENTS"),
        "{table}"
    );
    assert!(table.contains("*: MONITOR"), "{table}");
    assert!(!table.contains(&token), "a token was listed");

    // Refused by the server.
    cli(&node, &["register-application", "-a", "billing", "-r", "MONITOR"]).fails(1, "exists");
    cli(&node, &["register-application", "-a", "x", "-r", "NO_SUCH_ROLE@orders"]).fails(1, "(AXONIQ-2510)");
    cli(&node, &["register-application", "-a", "x", "-r", "READ_EVENTS@nowhere"]).fails(1, "(AXONIQ-1302)");
    // Bad input, nothing sent.
    cli(&node, &["register-application", "-a", "x", "-r", "READ_EVENTS@"]).fails(2, "invalid role");
    cli(&node, &["register-application", "-a", "x y", "-r", "MONITOR"]).fails(2, "application name");
    cli(
        &node,
        &["register-application", "-a", "x", "-r", "MONITOR", "-T", "short"],
    )
    .fails(2, "16 to 512");
    cli(&node, &["register-application", "-a", "x"]).fails(2, "--roles <ROLES>");
    let names = application_names(&node);
    assert_eq!(names.len(), 2, "{names:?}");

    let deleted = cli(&node, &["delete-application", "-a", "billing"]).ok();
    assert_eq!(deleted.stdout, "application billing deleted\n");
    let deleted = cli(&node, &["delete-application", "-a", "auditor", "--json"]).json();
    assert_eq!(deleted, json!({"application": "auditor", "status": "deleted"}));
    assert!(application_names(&node).is_empty());
    cli(&node, &["delete-application", "-a", "billing"]).fails(1, "billing: no such application (AXONIQ-1300)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_control_db_prints_the_zip_path() {
    let node = start_node().await;
    let path = cli(&node, &["backup-control-db"]).ok().stdout;
    let path = Path::new(path.trim_end());
    assert!(path.is_absolute() && path.is_file(), "{}", path.display());
    let json = cli(&node, &["backup-control-db", "--json"]).json();
    assert!(Path::new(json["path"].as_str().unwrap()).is_file(), "{json}");
}

#[test]
fn an_unreachable_server_exits_3_and_names_the_url() {
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    run_cli(&["contexts", "-S", &url]).fails(3, &format!("cannot reach {url}: connection refused"));
    run_cli(&["register-context", "-c", "x", "-S", &url]).fails(3, &url);
    // A usage error is found before any connection is tried.
    run_cli(&["register-context", "-c", "a/b", "-S", &url]).fails(2, "may contain only");
    run_cli(&["contexts", "-S", "localhost:8024"]).fails(2, "must start with http://");
    let help = run_cli(&["--help"]).ok();
    assert!(help.stdout.contains("register-application"), "{help:?}");
}

/// Axon's documented start-up works on a fresh node: `init-cluster` succeeds (the node already is
/// a cluster of its own), again without change, and with `-c` creates that context; `cluster`
/// lists the node. A reserved name is a usage error and nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_cluster_on_a_fresh_node() {
    let node = start_node().await;
    let first = cli(&node, &["init-cluster"]).ok().stdout;
    assert!(first.contains("default"), "{first}");
    cli(&node, &["init-cluster"]).ok();
    assert!(!context_names(&node).contains(&"orders".to_string()));
    cli(&node, &["init-cluster", "-c", "orders"]).ok();
    assert!(context_names(&node).contains(&"orders".to_string()));
    cli(&node, &["init-cluster", "-c", "_admin"]).fails(2, "_admin");
    let nodes = cli(&node, &["cluster", "--json"]).json();
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["grpcInternalPort"], node.internal_port);
}

/// The `myelin-cli` lines of a Markdown file's `sh` code blocks, in order, split into
/// arguments, with a trailing `# comment` removed. (The documented lines use no quoting.)
fn documented_commands(markdown: &str) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in markdown.lines() {
        let trimmed = line.trim();
        if let Some(fence) = trimmed.strip_prefix("```") {
            in_sh = !in_sh && fence == "sh";
            continue;
        }
        if in_sh && trimmed.starts_with("myelin-cli ") {
            let command = trimmed.split(" #").next().unwrap();
            commands.push(command.split_whitespace().skip(1).map(str::to_owned).collect());
        }
    }
    commands
}

/// Issue 16, defect 5: README.md's own example failed (`APPEND_EVENTS` is no role). Every
/// `myelin-cli` command of README.md's examples runs against a node, in the documented order,
/// and succeeds, so the examples cannot drift from the tool again. docs/cluster.md's are run by
/// [`the_cluster_guide_cli_commands_build_a_cluster`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_cli_examples_run_as_documented() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let commands = documented_commands(&readme);
    assert!(
        commands.len() >= 8 && commands.iter().any(|c| c[0] == "register-application"),
        "the README's CLI examples were not found: {commands:?}"
    );
    let node = start_node().await;
    for command in &commands {
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        let run = cli(&node, &args);
        assert_eq!(run.code, 0, "README.md: myelin-cli {}: {run:?}", command.join(" "));
    }
    assert!(
        application_names(&node).is_empty(),
        "the README's sequence deletes its application"
    );
}

/// docs/cluster.md's `myelin-cli` commands, run in order on three nodes: `http://node-N:8024`
/// becomes node N's admin address and `-h node-N` its internal address (`-p` its test port, as
/// nodes here do not listen on 8224). After each `register-node` the test waits for the join,
/// as an operator would; every command must succeed and the cluster must end with three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_guide_cli_commands_build_a_cluster() {
    use myelin_tests::cluster::Cluster;
    let guide = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cluster.md")).unwrap();
    let commands = documented_commands(&guide);
    assert!(
        commands.iter().filter(|c| c[0] == "register-node").count() == 2,
        "docs/cluster.md's CLI steps were not found: {commands:?}"
    );
    let cluster = Cluster::start_nodes(3, &[]).await;
    let node_index = |name: &str| -> Option<usize> {
        let n: usize = name.strip_prefix("node-")?.parse().ok()?;
        (1..=3).contains(&n).then(|| n - 1)
    };
    let mut members = 1;
    for command in &commands {
        let mut args: Vec<String> = Vec::new();
        let mut target = None;
        for arg in command {
            let host = arg.strip_prefix("http://").and_then(|a| a.strip_suffix(":8024"));
            if let Some(i) = host.and_then(node_index) {
                let node = &cluster.nodes[i];
                args.push(format!("http://{}:{}", node.address(), node.http_port));
                target = Some(i);
            } else if args.last().is_some_and(|a| a == "-h")
                && let Some(i) = node_index(arg)
            {
                let node = &cluster.nodes[i];
                args.extend([node.address().to_string(), "-p".into(), node.internal_port.to_string()]);
            } else {
                args.push(arg.clone());
            }
        }
        let run = run_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            run.code,
            0,
            "docs/cluster.md: myelin-cli {}: {run:?}",
            command.join(" ")
        );
        if command[0] == "register-node" {
            members += 1;
            let count = members;
            cluster
                .wait_for(
                    target.expect("register-node names its node with -S"),
                    "/v1/cluster",
                    std::time::Duration::from_secs(60),
                    "the node joined",
                    |v| v.as_array().is_some_and(|nodes| nodes.len() == count),
                )
                .await;
        }
    }
    assert_eq!(members, 3);
    for i in 0..3 {
        cluster
            .wait_for(
                i,
                "/v1/cluster",
                std::time::Duration::from_secs(60),
                "three nodes",
                |v| v.as_array().is_some_and(|nodes| nodes.len() == 3),
            )
            .await;
    }
}
