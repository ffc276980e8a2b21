//! Backups with the real binaries: `myelin` nodes and `myelin-backup-agent` as a separate process,
//! driven the way cron or an operator would (see docs/backups.md).
//!
//! - a full backup restored into a wiped data directory serves every event with its token, and
//!   the node goes on appending after them; restore refuses a running node, a used directory and
//!   an incomplete set;
//! - incremental runs copy only the closed segments that are new (counted from `--json`);
//! - a backup taken while 32 clients append loses no event confirmed before it started, and the
//!   restored node's tokens are the original's;
//! - `verify` finds a damaged or missing file, and a backup killed mid-run leaves a set `verify`
//!   calls incomplete, which the next run completes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use myelin_proto::axon::event::event_store_client::EventStoreClient;
use myelin_proto::axon::event::{Event, GetLastTokenRequest};
use myelin_tests::http::request;
use myelin_tests::{Node, Options, append, event, newest_snapshot, read_aggregate, read_all};
use tonic::transport::Channel;

/// The agent next to the `myelin` binary under test (`$MYELIN_BACKUP_AGENT` overrides).
fn agent() -> PathBuf {
    if let Ok(path) = std::env::var("MYELIN_BACKUP_AGENT") {
        return PathBuf::from(path);
    }
    let path = myelin_tests::binary().with_file_name("myelin-backup-agent");
    assert!(path.exists(), "{} missing: build the workspace first", path.display());
    path
}

async fn run_agent(args: &[&str]) -> Output {
    tokio::process::Command::new(agent())
        .args(args)
        .output()
        .await
        .expect("run myelin-backup-agent")
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A backup run with `--json`; panics unless it succeeded.
async fn backup(node: &Node, dest: &Path) -> serde_json::Value {
    let server = format!("http://{}:{}", node.address(), node.http_port);
    let output = run_agent(&[
        "backup",
        "--json",
        "--server",
        &server,
        "--dest",
        dest.to_str().unwrap(),
    ])
    .await;
    assert!(output.status.success(), "backup failed: {}", text(&output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {}", text(&output)))
}

async fn verify(dest: &Path) -> (Option<i32>, String) {
    let output = run_agent(&["verify", dest.to_str().unwrap()]).await;
    (output.status.code(), text(&output))
}

async fn restore(dest: &Path, data: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["restore", dest.to_str().unwrap(), "--data", data.to_str().unwrap()];
    args.extend(extra);
    run_agent(&args).await
}

fn small_segments() -> Options {
    Options {
        env: vec![
            ("AXONIQ_AXONSERVER_EVENT_SEGMENT_SIZE".into(), "4096".into()),
            ("AXONIQ_AXONSERVER_SNAPSHOT_SEGMENT_SIZE".into(), "4096".into()),
        ],
        ..Options::default()
    }
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").unwrap()
}

/// Closed segments of the node's `default` events folder (all but the newest file).
fn closed_event_segments(node: &Node) -> usize {
    let count = std::fs::read_dir(node.data.join("default/events"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".events"))
        .count();
    count - 1
}

/// (token, message id, aggregate, sequence) of every event, for comparing nodes.
fn identities(events: &[(i64, Event)]) -> Vec<(i64, String, String, i64)> {
    events
        .iter()
        .map(|(t, e)| {
            (
                *t,
                e.message_identifier.clone(),
                e.aggregate_identifier.clone(),
                e.aggregate_sequence_number,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_node_serves_every_event_with_its_token() {
    let mut node = Node::start(small_segments()).await;
    let mut client = node.client().await;
    for round in 0..40i64 {
        for agg in 0..5 {
            let aggregate = format!("order-{agg}");
            let events = (0..1 + round % 3)
                .map(|i| {
                    let seq = (0..round).map(|r| 1 + r % 3).sum::<i64>() + i;
                    event(&aggregate, seq, &format!("{aggregate}-{seq}"))
                })
                .collect();
            append(&mut client, events).await.unwrap();
        }
    }
    let mut snapshot = event("order-1", 10, "snapshot-order-1-10");
    snapshot.snapshot = true;
    client.append_snapshot(snapshot).await.unwrap();
    let before = read_all(&mut client).await;
    assert!(closed_event_segments(&node) >= 5, "small segments roll");

    let set = temp_dir("mybs");
    let summary = backup(&node, set.path()).await;
    assert_eq!(verify(set.path()).await.0, Some(0));
    assert!(
        summary["controlDb"]
            .as_str()
            .unwrap()
            .starts_with("controldb/controldb")
    );

    // Restore refuses the running node's data directory.
    let refused = restore(set.path(), &node.data, &[]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("running node"), "{}", text(&refused));

    node.stop();
    // A used data directory needs --force, which moves what is there aside.
    let refused = restore(set.path(), &node.data, &[]).await;
    assert!(text(&refused).contains("not empty"), "{}", text(&refused));
    std::fs::remove_dir_all(&node.data).unwrap();
    let restored = restore(set.path(), &node.data, &[]).await;
    assert!(restored.status.success(), "{}", text(&restored));

    let node = Node::start(Options {
        data_dir: Some(node.data.clone()),
        ..small_segments()
    })
    .await;
    let mut client = node.client().await;
    let after = read_all(&mut client).await;
    assert_eq!(identities(&after), identities(&before));
    assert_eq!(after, before, "every event comes back byte for byte");
    let order1 = read_aggregate(&mut client, "order-1").await;
    assert_eq!(order1.len(), (0..40).map(|r| 1 + r % 3).sum::<i64>() as usize);
    let snapshots = newest_snapshot(&mut client, "order-1")
        .await
        .expect("the snapshot is restored");
    assert_eq!(snapshot_id(&snapshots), "snapshot-order-1-10");

    // The restored node goes on: the next token, and sequence checks against restored events.
    let next = order1.len() as i64;
    append(&mut client, vec![event("order-1", next, "after-restore")])
        .await
        .unwrap();
    let err = append(&mut client, vec![event("order-1", 3, "stale")])
        .await
        .unwrap_err();
    assert!(err.message().contains("AXONIQ-2000"), "{err:?}");
    let last = read_all(&mut client).await;
    assert_eq!(last.len(), before.len() + 1);
    assert_eq!(last.last().unwrap().1.message_identifier, "after-restore");
}

fn snapshot_id(event: &Event) -> &str {
    &event.message_identifier
}

#[tokio::test(flavor = "multi_thread")]
async fn incremental_backups_copy_only_new_closed_segments() {
    let node = Node::start(small_segments()).await;
    let mut client = node.client().await;
    async fn write(client: &mut EventStoreClient<Channel>, from: i64, n: i64) {
        for seq in from..from + n {
            append(client, vec![event("inc", seq, &format!("inc-{seq}"))])
                .await
                .unwrap();
        }
    }
    write(&mut client, 0, 100).await;
    let closed_first = closed_event_segments(&node);
    assert!(closed_first >= 3, "{closed_first} closed segments");

    let set = temp_dir("mybs");
    let first = backup(&node, set.path()).await;
    let events = &first["contexts"]["default"]["segments"]["EVENT"];
    assert_eq!(events["closedSegmentsCopied"], closed_first);
    // Each closed segment with its index and bloom filter, and the open segment.
    assert_eq!(events["filesCopied"], 3 * closed_first + 1);

    // The control-DB backup held the event store's log compaction for the window.
    let log = node.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("log compaction hold") && l.contains("on=true")),
        "no hold in the node's log"
    );

    // Nothing new: only the open segment (and the log, the control DB) again.
    let second = backup(&node, set.path()).await;
    let events = &second["contexts"]["default"]["segments"]["EVENT"];
    assert_eq!(events["closedSegmentsCopied"], 0);
    assert_eq!(events["filesCopied"], 1);
    assert!(second["filesCopied"].as_u64() < first["filesCopied"].as_u64());
    assert_eq!(second["filesInSet"], first["filesInSet"]);

    write(&mut client, 100, 100).await;
    let closed_now = closed_event_segments(&node);
    assert!(closed_now > closed_first);
    let third = backup(&node, set.path()).await;
    let events = &third["contexts"]["default"]["segments"]["EVENT"];
    assert_eq!(events["closedSegmentsCopied"], closed_now - closed_first);
    assert_eq!(events["filesCopied"], 3 * (closed_now - closed_first) + 1);
    assert_eq!(verify(set.path()).await.0, Some(0));
    let copies = std::fs::read_dir(set.path().join("contexts/default/events"))
        .unwrap()
        .count();
    assert_eq!(
        copies,
        3 * closed_now + 1,
        "the set holds every closed segment once, and one open"
    );
}

/// 32 clients append without pause while a backup runs; the restore must hold every event
/// confirmed before the backup started, under the tokens the original node gave them.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_under_load_keeps_every_event_confirmed_before_it() {
    let node = Node::start(Options {
        env: vec![("AXONIQ_AXONSERVER_EVENT_SEGMENT_SIZE".into(), "65536".into())],
        ..Options::default()
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut appenders = Vec::new();
    for i in 0..32 {
        let mut client = node.client().await;
        let stop = stop.clone();
        appenders.push(tokio::spawn(async move {
            let aggregate = format!("load-{i}");
            let mut confirmed: Vec<(String, Instant)> = Vec::new();
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("{aggregate}-{seq}");
                append(&mut client, vec![event(&aggregate, seq, &id)])
                    .await
                    .unwrap_or_else(|e| panic!("append {id}: {e}"));
                confirmed.push((id, Instant::now()));
                seq += 1;
            }
            confirmed
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let set = temp_dir("mybs");
    let started = Instant::now();
    let summary = backup(&node, set.path()).await;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut confirmed = Vec::new();
    for appender in appenders {
        confirmed.extend(appender.await.unwrap());
    }
    let before_backup: Vec<&String> = confirmed
        .iter()
        .filter(|(_, at)| *at < started)
        .map(|(id, _)| id)
        .collect();
    assert!(before_backup.len() > 100, "appenders made progress before the backup");
    assert!(
        confirmed.iter().any(|(_, at)| *at > started && *at < started + took),
        "appends went on during the backup"
    );
    assert_eq!(verify(set.path()).await.0, Some(0));

    let mut client = node.client().await;
    let original: HashMap<String, i64> = read_all(&mut client)
        .await
        .into_iter()
        .map(|(t, e)| (e.message_identifier, t))
        .collect();
    assert_eq!(original.len(), confirmed.len(), "every confirmed append is stored once");

    let fresh = temp_dir("myrs");
    let data = fresh.path().join("d");
    let restored = restore(set.path(), &data, &[]).await;
    assert!(restored.status.success(), "{}", text(&restored));
    let copy = Node::start(Options {
        data_dir: Some(data),
        ..Options::default()
    })
    .await;
    let mut client = copy.client().await;
    let events = read_all(&mut client).await;
    let mut present = HashMap::new();
    for (token, event) in &events {
        assert_eq!(
            original.get(&event.message_identifier),
            Some(token),
            "{} has the token the original node gave it",
            event.message_identifier
        );
        present.insert(event.message_identifier.clone(), *token);
    }
    let missing: Vec<&&String> = before_backup.iter().filter(|id| !present.contains_key(**id)).collect();
    assert!(
        missing.is_empty(),
        "confirmed before the backup, missing after restore: {missing:?}"
    );
    eprintln!(
        "confirmed {} ({} before the backup, which took {took:?} and copied {} files); restored {}; \
         segments ahead of the copied log: {}; a purge deferred by the hold: {}",
        confirmed.len(),
        before_backup.len(),
        summary["filesCopied"],
        events.len(),
        copy.log_text().contains("segments are ahead of the Raft log"),
        node.log_text().contains("log compaction on hold")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_damage_and_a_killed_backup_is_completed_by_the_next_run() {
    let node = Node::start(small_segments()).await;
    let mut client = node.client().await;
    for batch in 0..200i64 {
        let events = (0..20)
            .map(|i| event("big", batch * 20 + i, &format!("big-{}", batch * 20 + i)))
            .collect();
        append(&mut client, events).await.unwrap();
    }
    let set = temp_dir("mybs");
    backup(&node, set.path()).await;
    let (code, out) = verify(set.path()).await;
    assert_eq!(code, Some(0), "{out}");

    // Damage: a flipped byte, then a missing file.
    let closed = set.path().join("contexts/default/events/00000000000000000000.events");
    let original = std::fs::read(&closed).unwrap();
    let mut flipped = original.clone();
    flipped[100] ^= 0x01;
    std::fs::write(&closed, &flipped).unwrap();
    let (code, out) = verify(set.path()).await;
    assert_eq!(code, Some(4), "{out}");
    assert!(out.contains("00000000000000000000.events: checksum differs"), "{out}");
    let data = temp_dir("myrs");
    let refused = restore(set.path(), &data.path().join("d"), &[]).await;
    assert!(
        !refused.status.success() && text(&refused).contains("damaged"),
        "{}",
        text(&refused)
    );
    assert!(
        !data.path().join("d/default").exists(),
        "a failed restore leaves no context behind"
    );
    std::fs::remove_file(&closed).unwrap();
    let (code, out) = verify(set.path()).await;
    assert_eq!(code, Some(4), "{out}");
    assert!(out.contains("missing"), "{out}");
    std::fs::write(&closed, &original).unwrap();
    assert_eq!(verify(set.path()).await.0, Some(0));

    // A run killed after it started changing the set leaves it incomplete.
    let server = format!("http://127.0.0.1:{}", node.http_port);
    let manifest = set.path().join("manifest.json");
    let mut killed = false;
    for attempt in 0..20 {
        let mut child = std::process::Command::new(agent())
            .args(["backup", "--server", &server, "--dest", set.path().to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while manifest.exists() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            std::hint::spin_loop();
        }
        // Somewhere in the run: right away, or a few milliseconds into the copying.
        std::thread::sleep(Duration::from_millis(attempt % 4 * 3));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if !status.success() && !manifest.exists() {
            killed = true;
            break;
        }
    }
    assert!(killed, "never caught a backup before it finished");
    let (code, out) = verify(set.path()).await;
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("INCOMPLETE"), "{out}");
    let refused = restore(set.path(), &data.path().join("d2"), &[]).await;
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));

    backup(&node, set.path()).await;
    let (code, out) = verify(set.path()).await;
    assert_eq!(code, Some(0), "{out}");
    let restored = restore(set.path(), &data.path().join("d3"), &[]).await;
    assert!(restored.status.success(), "{}", text(&restored));
}

/// Status, `code` of the JSON error body (if any) and body of one request to admin.
async fn http(port: u16, method: &'static str, path: &str) -> (u16, Option<String>, String) {
    let reply = request(port, method, path, None, None).await;
    let code = serde_json::from_str::<serde_json::Value>(&reply.body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned));
    (reply.status, code, reply.body)
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_endpoints_answer_bad_input_with_4xx_and_json() {
    let node = Node::start(Options::default()).await;
    let port = node.http_port;
    for (path, status, code) in [
        ("/v1/backup/filenames", 400, "AXONIQ-0001"),
        ("/v1/backup/filenames?context=default", 400, "AXONIQ-0001"),
        ("/v1/backup/filenames?type=LOG&context=default", 400, "AXONIQ-0001"),
        ("/v1/backup/filenames?type=EVENT", 400, "AXONIQ-0001"),
        ("/v1/backup/filenames?type=EVENT&context=nope", 404, "AXONIQ-1302"),
        ("/v1/backup/filenames?type=EVENT&context=..%2Fx", 400, "AXONIQ-2308"),
        (
            "/v1/backup/filenames?type=EVENT&context=default&lastSegmentBackedUp=x",
            400,
            "AXONIQ-0001",
        ),
        (
            "/v1/backup/filenames?type=EVENT&context=default&lastSegmentBackedUp=-5",
            400,
            "AXONIQ-0001",
        ),
        (
            "/v1/backup/filenames?type=EVENT&context=default&lastSegmentBackedUp=99999999999999999999",
            400,
            "AXONIQ-0001",
        ),
        ("/v1/backup/eventstore", 400, "AXONIQ-0001"),
        (
            "/v1/backup/eventstore?type=EVENT&targetContext=nope",
            404,
            "AXONIQ-1302",
        ),
        ("/v1/backup/log/filenames", 400, "AXONIQ-0001"),
        ("/v1/backup/log/filenames?context=nope", 404, "AXONIQ-1302"),
        ("/v1/backup/log/filenames?context=_admin", 404, "AXONIQ-1302"),
    ] {
        let (got, got_code, body) = http(port, "GET", path).await;
        assert_eq!((got, got_code.as_deref()), (status, Some(code)), "{path}: {body}");
    }

    let (status, _, body) = http(port, "GET", "/v1/backup/eventstore?type=EVENT").await;
    assert_eq!(status, 200, "{body}");
    let files: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(files["lastClosedSegment"], -1);
    let names = files["filenames"].as_array().unwrap();
    assert_eq!(names.len(), 1, "the open segment only: {body}");
    assert!(
        names[0]
            .as_str()
            .unwrap()
            .ends_with("/default/events/00000000000000000000.events")
    );
    let (status, _, body) = http(port, "GET", "/v1/backup/filenames?type=SNAPSHOT&context=default").await;
    assert_eq!((status, body.as_str()), (200, "[]"), "no closed segment yet");
    let (status, _, body) = http(port, "GET", "/v1/backup/log/filenames?context=default").await;
    assert_eq!(status, 200, "{body}");
    let log: Vec<String> = serde_json::from_str(&body).unwrap();
    assert!(log[0].ends_with("/default/log/00000000000000000000.log"), "{log:?}");
    assert!(log.iter().any(|p| p.ends_with("/default/raft-state.json")), "{log:?}");

    for path in ["/v1/backup/createControlDbBackup", "/createControlDbBackup"] {
        let (status, _, body) = http(port, "POST", path).await;
        assert_eq!(status, 200, "{path}: {body}");
        let zip = PathBuf::from(&body);
        assert!(zip.starts_with(node.data.join("backups")), "{body}");
        assert_eq!(&std::fs::read(&zip).unwrap()[..4], b"PK\x03\x04", "{body} is a zip");
    }
    let (status, code, body) = http(port, "GET", "/v1/backup/createControlDbBackup").await;
    assert_eq!((status, code.as_deref()), (405, Some("AXONIQ-0001")), "{body}");
}

/// With access control on, the agent's calls need a token that may back up; it sends the one it
/// is given (`--token` or `MYELIN_TOKEN`) as `AxonIQ-Access-Token`.
#[tokio::test(flavor = "multi_thread")]
async fn with_access_control_the_agent_sends_its_token() {
    const TOKEN: &str = "backup-admin-token-for-tests";
    let node = Node::start(Options {
        env: vec![
            ("AXONIQ_AXONSERVER_ACCESSCONTROL_ENABLED".into(), "true".into()),
            ("AXONIQ_AXONSERVER_ACCESSCONTROL_ADMIN_TOKEN".into(), TOKEN.into()),
        ],
        ..Options::default()
    })
    .await;
    let server = format!("http://127.0.0.1:{}", node.http_port);
    let set = temp_dir("mybs");
    let dest = set.path().to_str().unwrap();

    let done = run_agent(&["backup", "--server", &server, "--dest", dest, "--token", TOKEN]).await;
    assert!(done.status.success(), "{}", text(&done));

    let refused = run_agent(&["backup", "--server", &server, "--dest", dest]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("401"), "{}", text(&refused));
    let wrong = run_agent(&["backup", "--server", &server, "--dest", dest, "--token", "wrong"]).await;
    assert_eq!(wrong.status.code(), Some(1), "{}", text(&wrong));
    let unknown = run_agent(&["backup", "--server", &server, "--dest", dest, "-t", TOKEN, "-c", "nope"]).await;
    assert!(
        text(&unknown).contains("context nope is not on the node"),
        "{}",
        text(&unknown)
    );
    // A refused run leaves the last backup complete.
    assert_eq!(verify(set.path()).await.0, Some(0));
    let from_env = tokio::process::Command::new(agent())
        .args(["backup", "--server", &server, "--dest", dest])
        .env("MYELIN_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    assert!(from_env.status.success(), "{}", text(&from_env));
    assert_eq!(verify(set.path()).await.0, Some(0));
}

/// A member of a three-node cluster (here one that does not lead the context) is backed up like
/// a single node: the agent asks that node, and the set holds its copy of the context, whose
/// event segments are byte for byte the leader's, with every confirmed event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_member_is_backed_up_like_a_single_node() {
    use myelin_tests::cluster::Cluster;
    let cluster = Cluster::start_autocluster(3, "orders").await;
    let leader = all_three_vote(&cluster).await;
    let follower = (leader + 1) % 3;
    let mut client = cluster.nodes[follower].client().await;
    for k in 0..50i64 {
        let events = vec![
            event(&format!("b-{k}"), 0, &format!("b-{k}-0")),
            event(&format!("b-{k}"), 1, &format!("b-{k}-1")),
        ];
        client
            .append_event(myelin_tests::with_context(tokio_stream::iter(events), "orders"))
            .await
            .expect("append through the follower");
    }
    // The follower has applied all of it (the token calls wait for the leader's read index).
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.replica(follower, "orders").await.len() < 100 {
        assert!(Instant::now() < deadline, "the follower lags");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let set = temp_dir("mybs");
    let summary = backup(&cluster.nodes[follower], set.path()).await;
    assert_eq!(verify(set.path()).await.0, Some(0));
    assert!(
        summary["contexts"]["orders"]["segments"]["EVENT"]["filesCopied"].as_u64() >= Some(1),
        "{summary}"
    );
    // The set's event segments of orders are the leader's files, byte for byte.
    fn segments(dir: &Path, found: &mut Vec<(String, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()) {
            let path = entry.path();
            if path.is_dir() {
                segments(&path, found);
            } else if path.to_string_lossy().contains("orders") && path.to_string_lossy().ends_with(".events") {
                found.push((
                    entry.file_name().to_string_lossy().into_owned(),
                    std::fs::read(&path).unwrap(),
                ));
            }
        }
    }
    let mut copied = Vec::new();
    segments(set.path(), &mut copied);
    assert!(!copied.is_empty(), "no event segment of orders in the set");
    let leaders = cluster.nodes[leader].data.join("orders").join("events");
    for (name, bytes) in &copied {
        let original = std::fs::read(leaders.join(name)).unwrap();
        assert!(
            original.starts_with(bytes) || bytes == &original,
            "{name} in the set is not the leader's"
        );
    }

    // Restoring that backup onto the follower alone is refused: its Raft log and vote would go
    // back in time under the two others. Nothing changes.
    let mut cluster = cluster;
    cluster.nodes[follower].stop();
    let data = cluster.nodes[follower].data.clone();
    let live = tree(&data);
    let refused = restore(set.path(), &data, &["--force"]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("a member of a cluster of 3 nodes"),
        "{}",
        text(&refused)
    );
    assert!(tree(&data) == live, "a refused restore changed the data directory");
}

/// Every entry under `dir` (relative path, and a file's content), sorted.
fn tree(dir: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Option<Vec<u8>>)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() {
                out.push((name, None));
                walk(root, &path, out);
            } else {
                out.push((name, std::fs::read(&path).ok()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Issue 16, defect 1: `restore --force` from a damaged set once moved the live data aside before
/// it found the damage, so the node came back empty. Now nothing is touched until every file
/// (the control DB too) is copied and checked.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_forced_restore_leaves_the_data_directory_as_it_was() {
    let mut node = Node::start(small_segments()).await;
    let mut client = node.client().await;
    for i in 0..60i64 {
        append(&mut client, vec![event("live", i, &format!("live-{i}"))])
            .await
            .unwrap();
    }
    let set = temp_dir("mybs");
    backup(&node, set.path()).await;
    // The live data moves on after the backup.
    for i in 60..80i64 {
        append(&mut client, vec![event("live", i, &format!("live-{i}"))])
            .await
            .unwrap();
    }
    let before = read_all(&mut client).await;
    drop(client);
    node.stop();

    let segment = set.path().join("contexts/default/events/00000000000000000000.events");
    let zip = {
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(set.path().join("manifest.json")).unwrap()).unwrap();
        set.path().join(manifest["controlDb"].as_str().unwrap())
    };
    for damaged in [&segment, &zip] {
        let original = std::fs::read(damaged).unwrap();
        let mut flipped = original.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 0x01;
        std::fs::write(damaged, &flipped).unwrap();

        let live = tree(&node.data);
        let refused = restore(set.path(), &node.data, &["--force"]).await;
        assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
        assert!(text(&refused).contains("damaged"), "{}", text(&refused));
        let after = tree(&node.data);
        let left: Vec<_> = after
            .iter()
            .filter(|(name, _)| name.starts_with(".restoring-") || name.starts_with(".pre-restore-"))
            .map(|(name, _)| name)
            .collect();
        assert!(left.is_empty(), "{} left behind: {left:?}", damaged.display());
        assert!(
            after == live,
            "damaging {} changed the data directory",
            damaged.display()
        );
        assert!(
            text(&refused).contains("stopped before it changed"),
            "{}",
            text(&refused)
        );
        std::fs::write(damaged, &original).unwrap();
    }

    let node = Node::start(Options {
        data_dir: Some(node.data.clone()),
        ..small_segments()
    })
    .await;
    let mut client = node.client().await;
    assert_eq!(read_all(&mut client).await, before, "the node serves what it held");
}

/// Issue 16, defect 6: the agent exited 1 for a node it could not reach where `myelin-cli`
/// exits 3; both now say 3 ("not now: a later run may succeed"), and the set is left as it was.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_node_exits_3_like_the_cli() {
    let set = temp_dir("mybs");
    let port = myelin_tests::free_port();
    let server = format!("http://127.0.0.1:{port}");
    let output = run_agent(&["backup", "--server", &server, "--dest", set.path().to_str().unwrap()]).await;
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    assert!(
        text(&output).contains(&format!("cannot reach {server}: connection refused")),
        "{}",
        text(&output)
    );
    assert!(!set.path().join("manifest.json").exists());
}

/// A disaster: every node of a three-node cluster is stopped and restored from its own backup
/// with `--whole-cluster`. The cluster comes back as it was when the backups were taken: a
/// leader, every backed-up event on every replica under the same token, and it takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_cluster_is_restored_from_its_members_backups() {
    use myelin_tests::cluster::Cluster;
    let mut cluster = Cluster::start_autocluster(3, "orders").await;
    let leader = all_three_vote(&cluster).await;
    let mut client = cluster.nodes[leader].client().await;
    for k in 0..40i64 {
        let events = vec![
            event(&format!("w-{k}"), 0, &format!("w-{k}-0")),
            event(&format!("w-{k}"), 1, &format!("w-{k}-1")),
        ];
        client
            .append_event(myelin_tests::with_context(tokio_stream::iter(events), "orders"))
            .await
            .expect("append");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..3 {
        while cluster.replica(i, "orders").await.len() < 80 {
            assert!(Instant::now() < deadline, "n{} lags", i + 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let backed_up = cluster.replica(leader, "orders").await;
    let sets: Vec<_> = (0..3).map(|_| temp_dir("mybw")).collect();
    for (i, set) in sets.iter().enumerate() {
        backup(&cluster.nodes[i], set.path()).await;
    }
    // Written after the backups: gone with the restore, as with any restore.
    client
        .append_event(myelin_tests::with_context(
            tokio_stream::iter(vec![event("after", 0, "after-0")]),
            "orders",
        ))
        .await
        .expect("append after the backups");
    drop(client);

    for node in &mut cluster.nodes {
        node.stop();
    }
    for (i, set) in sets.iter().enumerate() {
        let data = cluster.nodes[i].data.clone();
        let restored = restore(set.path(), &data, &["--force", "--whole-cluster"]).await;
        assert!(restored.status.success(), "restoring n{}: {}", i + 1, text(&restored));
    }
    for node in &mut cluster.nodes {
        node.launch().await;
    }
    let leader = all_three_vote(&cluster).await;
    // Every member serves the backed-up events once its router knows the others again (admin
    // gives it the peers at start; until then a follower's read finds no leader and says so).
    let started = Instant::now();
    for i in 0..3 {
        loop {
            let mut probe = EventStoreClient::new(cluster.nodes[i].channel().await);
            match probe
                .get_last_token(myelin_tests::with_context(GetLastTokenRequest {}, "orders"))
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(8) {
                        let log = cluster.nodes[i].log_text();
                        let tail: Vec<&str> = log.lines().rev().take(60).collect();
                        panic!(
                            "n{}: {e:?}\n{}",
                            i + 1,
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let replica = cluster.replica(i, "orders").await;
        assert_eq!(replica, backed_up, "n{} after the restore", i + 1);
    }
    eprintln!(
        "restored cluster readable on every member after {:?}",
        started.elapsed()
    );
    let mut client = cluster.nodes[leader].client().await;
    client
        .append_event(myelin_tests::with_context(
            tokio_stream::iter(vec![event("again", 0, "again-0")]),
            "orders",
        ))
        .await
        .expect("the restored cluster takes writes");
}

/// Waits until `orders` has a leader whose group counts the three nodes as voters; its node.
async fn all_three_vote(cluster: &myelin_tests::cluster::Cluster) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let leader = cluster.wait_leader("orders", Duration::from_secs(60)).await;
        let voters = cluster
            .status(leader, "orders")
            .await
            .map(|s| s.members.iter().filter(|m| m.voter).count());
        if voters == Some(3) {
            return leader;
        }
        assert!(Instant::now() < deadline, "orders never had three voters");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A context created through the API on a single node has a member id from `_admin` (not the 1
/// a first start gives `default`). Its backup carries that identity (`member.json`), so the
/// restored node opens the context as the same member of its group and serves it: before,
/// the copy opened as a new member 1 that the log's membership did not count, and never had a
/// leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_context_created_through_the_api_is_restored_as_the_same_member() {
    let node = Node::start(Options::default()).await;
    let created = request(
        node.http_port,
        "POST",
        "/v1/context",
        Some(serde_json::json!({ "context": "orders" }).to_string()),
        None,
    )
    .await;
    assert!(
        created.status < 300,
        "creating orders: {} {}",
        created.status,
        created.body
    );
    let mut client = node.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for k in 0..5i64 {
        loop {
            let events = vec![event("o-1", k, &format!("o-{k}"))];
            match client
                .append_event(myelin_tests::with_context(tokio_stream::iter(events), "orders"))
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "appending to orders: {e:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let set = temp_dir("mybo");
    backup(&node, set.path()).await;
    let fresh = temp_dir("myro");
    let data = fresh.path().join("d");
    let restored = restore(set.path(), &data, &[]).await;
    assert!(restored.status.success(), "{}", text(&restored));
    assert!(
        data.join("orders").join("member.json").exists(),
        "the member's identity is restored"
    );
    let copy = Node::start(Options {
        data_dir: Some(data),
        ..Options::default()
    })
    .await;
    let mut client = copy.client().await;
    let started = Instant::now();
    let highest = loop {
        match client
            .read_highest_sequence_nr(myelin_tests::with_context(
                myelin_proto::axon::event::ReadHighestSequenceNrRequest {
                    aggregate_id: "o-1".into(),
                    ..Default::default()
                },
                "orders",
            ))
            .await
        {
            Ok(answer) => break answer.into_inner().to_sequence_nr,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "the restored orders: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(highest, 4, "the restored node serves orders with its five events");
}
