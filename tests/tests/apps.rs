//! Command routing between separate client processes: two handler applications (the bench's
//! `command-handler`, each its own OS process and connection) and a dispatcher. Same routing key
//! → same handler; a handler process killed with SIGKILL is dropped from routing and the
//! survivor takes every key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use myelin_proto::axon::command::Command as AxonCommand;
use myelin_proto::axon::command::command_service_client::CommandServiceClient;
use myelin_proto::axon::{MetaDataValue, ProcessingInstruction, ProcessingKey, meta_data_value};
use myelin_tests::{Node, Options};

fn bench_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/myelin-bench");
    assert!(
        path.exists(),
        "{} missing: build the workspace in release first",
        path.display()
    );
    path
}

struct App(Child);

impl App {
    fn handler(node: &Node, ready: &Path) -> App {
        let child = Command::new(bench_binary())
            .args(["command-handler", "--server", &node.url(), "--command", "AppCommand"])
            .arg("--ready-file")
            .arg(ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a handler process");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "handler process never subscribed");
            std::thread::sleep(Duration::from_millis(20));
        }
        App(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Dispatches one command with `key` and returns the pid of the handler process that answered
/// (the bench handler names its responses `bench-command-handler-<pid>-...`).
async fn dispatch(
    client: &mut CommandServiceClient<tonic::transport::Channel>,
    key: &str,
    n: usize,
) -> Result<u32, String> {
    let command = AxonCommand {
        message_identifier: format!("cmd-{key}-{n}"),
        name: "AppCommand".into(),
        processing_instructions: vec![ProcessingInstruction {
            key: ProcessingKey::RoutingKey as i32,
            value: Some(MetaDataValue {
                data: Some(meta_data_value::Data::TextValue(key.into())),
            }),
        }],
        ..Default::default()
    };
    let response = client.dispatch(command).await.map_err(|s| s.to_string())?.into_inner();
    if !response.error_code.is_empty() {
        return Err(response.error_code);
    }
    let pid = response
        .message_identifier
        .strip_prefix("bench-command-handler-")
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse().ok())
        .ok_or_else(|| format!("unexpected response id {}", response.message_identifier))?;
    Ok(pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_route_between_separate_processes() {
    let node = Node::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = App::handler(&node, &dir.path().join("a.ready"));
    let b = App::handler(&node, &dir.path().join("b.ready"));
    let mut client = CommandServiceClient::connect(node.url()).await.unwrap();

    let keys: Vec<String> = (0..60).map(|i| format!("order-{i}")).collect();
    let mut owner: HashMap<&str, u32> = HashMap::new();
    for round in 0..3 {
        for key in &keys {
            let pid = dispatch(&mut client, key, round).await.unwrap();
            let first = *owner.entry(key).or_insert(pid);
            assert_eq!(
                first, pid,
                "key {key} moved between handlers while membership was unchanged"
            );
        }
    }
    let used: std::collections::HashSet<u32> = owner.values().copied().collect();
    assert_eq!(used.len(), 2, "both handler processes take keys");
    assert!(used.contains(&a.pid()) && used.contains(&b.pid()));

    // Kill one application outright: its stream goes, and every key ends up at the survivor.
    let dead = a.pid();
    a.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut answers = Vec::new();
        for (n, key) in keys.iter().enumerate() {
            answers.push(dispatch(&mut client, key, 100 + n).await);
        }
        if answers.iter().all(|a| a.as_ref().is_ok_and(|pid| *pid == b.pid())) {
            break;
        }
        // Only a short window may still see the dead handler as connection-lost.
        for answer in &answers {
            match answer {
                Ok(pid) => assert_ne!(*pid, dead, "a killed process cannot answer"),
                Err(code) => assert_eq!(code, "AXONIQ-4001", "only connection-lost errors while it goes"),
            }
        }
        assert!(
            Instant::now() < deadline,
            "the killed handler was never dropped from routing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
