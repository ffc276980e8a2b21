//! A full disk: appends fail with an error instead of hanging or half-writing, nothing
//! unconfirmed is served, and once there is space again the node takes appends and still has
//! every confirmed event. Needs root (it mounts a small tmpfs), as CI and developers here are.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use myelin_tests::{Node, Options, append, event, read_aggregate, read_all};

struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(size: &str) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("full")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(ok.success(), "mounting a tmpfs needs root");
        Mount(dir)
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn used(path: &Path) -> String {
    let out = Command::new("df").arg("-h").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_fail_cleanly_when_the_disk_is_full() {
    let mount = Mount::tmpfs("3m");
    let data = mount.0.join("data");
    let mut node = Node::start(Options {
        data_dir: Some(data),
        env: vec![("AXONIQ_AXONSERVER_EVENT_SEGMENT_SIZE".into(), "256KB".into())],
        ..Options::default()
    })
    .await;
    let mut client = node.lazy_client();
    let mut confirmed = Vec::new();
    let mut failures = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0i64;
    // Fill the disk; the first failures end the loop.
    while failures < 3 {
        assert!(Instant::now() < deadline, "the disk never filled: {}", used(&mount.0));
        let id = format!("f{i}");
        match append(&mut client, vec![event(&id, 0, &id)]).await {
            Ok(()) => confirmed.push(id),
            Err(status) => {
                failures += 1;
                assert_ne!(status.code(), tonic::Code::Ok);
            }
        }
        i += 1;
    }
    assert!(
        confirmed.len() > 100,
        "stored {} before the disk was full",
        confirmed.len()
    );
    // Space again, quickly (the supervisor restarts the eventstore with backoff meanwhile).
    mount.resize("64m");
    node.wait_ready(Duration::from_secs(60)).await;
    let mut client = node.client().await;
    let mut appended = false;
    for _ in 0..100 {
        if append(&mut client, vec![event("after-full", 0, "after-full")])
            .await
            .is_ok()
        {
            appended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(appended, "appends work again once there is space");
    let stored: Vec<String> = read_all(&mut client)
        .await
        .into_iter()
        .map(|(_, e)| e.message_identifier)
        .collect();
    let set: std::collections::HashSet<&String> = stored.iter().collect();
    assert_eq!(set.len(), stored.len(), "no event twice");
    for id in &confirmed {
        assert!(set.contains(id), "confirmed {id} lost");
    }
    assert_eq!(stored.last().map(String::as_str), Some("after-full"));
    node.stop();
}

/// Issue 15, D4: clients keep appending to aggregates they already have while the disk fills,
/// retrying an append that failed with the same sequence. A failed write fences the eventstore:
/// nothing more is confirmed, and whatever the node says about sequences matches what it stores
/// (a sequence conflict never counts an event that is not stored). Once there is space again the
/// node recovers by itself and the same aggregates take their next events, without an append to
/// a new aggregate or anything else to set recovery off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_aggregates_go_on_after_the_disk_was_full() {
    const APPENDERS: usize = 8;
    const FULL_FOR: Duration = Duration::from_secs(15);
    // The node checks for space four times a second; a few seconds cover its restart. (Before
    // the fix it restarted on the supervisor's backoff, 6 to 10 s apart by then.)
    const RECOVERS_WITHIN: Duration = Duration::from_secs(5);
    // Default segment sizes: the Raft log reserves its space ahead, the event segments do not.
    let mount = Mount::tmpfs("24m");
    let data = mount.0.join("data");
    let mut node = Node::start(Options {
        data_dir: Some(data),
        ..Options::default()
    })
    .await;
    // Each appender owns one aggregate. It advances its sequence on a confirmation, and on a
    // sequence conflict to what the node says it expects (an earlier append whose outcome was
    // unknown was stored after all); it retries the same sequence after any other failure.
    let mut tasks = Vec::new();
    for a in 0..APPENDERS {
        let mut client = node.lazy_client();
        tasks.push(tokio::spawn(async move {
            let id = format!("agg-{a}");
            let mut next = 0i64;
            let mut confirmed = Vec::new();
            let mut claimed_expected = Vec::new();
            // Go on for a while after the first failure: the disk stays full meanwhile, long
            // enough for a node that crash-loops to back off for seconds.
            let mut full_since: Option<Instant> = None;
            let deadline = Instant::now() + Duration::from_secs(60);
            while full_since.is_none_or(|t| t.elapsed() < FULL_FOR) && Instant::now() < deadline {
                let mut e = event(&id, next, &format!("{id}-{next}"));
                e.payload.as_mut().unwrap().data = bytes::Bytes::from(vec![b'x'; 2000]);
                match append(&mut client, vec![e]).await {
                    Ok(()) => {
                        confirmed.push(next);
                        next += 1;
                    }
                    Err(status) => {
                        full_since.get_or_insert_with(Instant::now);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        if let Some(expected) = expected_of(&status) {
                            claimed_expected.push(expected);
                            next = expected;
                        } else {
                            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                        }
                    }
                }
            }
            (id, next, confirmed, claimed_expected)
        }));
    }
    let mut appenders = Vec::new();
    for task in tasks {
        appenders.push(task.await.unwrap());
    }
    let total: usize = appenders.iter().map(|(_, _, c, _)| c.len()).sum();
    assert!(
        total > 100,
        "stored {total} before the disk was full: {}",
        used(&mount.0)
    );
    eprintln!(
        "{total} appends confirmed before the disk was full:\n{}",
        used(&mount.0)
    );

    mount.resize("64m");
    let mut client = node.lazy_client();
    let space_back = Instant::now();
    let recovered_by = space_back + RECOVERS_WITHIN;
    for (id, next, confirmed, claimed_expected) in &mut appenders {
        loop {
            assert!(
                Instant::now() < recovered_by,
                "{id} takes no append {RECOVERS_WITHIN:?} after space returned"
            );
            let mut e = event(id, *next, &format!("{id}-{next}"));
            e.payload.as_mut().unwrap().data = bytes::Bytes::from(vec![b'x'; 2000]);
            match append(&mut client, vec![e]).await {
                Ok(()) => {
                    confirmed.push(*next);
                    *next += 1;
                    break;
                }
                Err(status) => match expected_of(&status) {
                    Some(expected) => {
                        claimed_expected.push(expected);
                        *next = expected;
                    }
                    None => tokio::time::sleep(Duration::from_millis(200)).await,
                },
            }
        }
    }
    eprintln!(
        "every aggregate took an append {:?} after space returned",
        space_back.elapsed()
    );
    // What the node stores matches everything it said.
    for (id, _, confirmed, claimed_expected) in &appenders {
        let stored: Vec<i64> = read_aggregate(&mut client, id)
            .await
            .iter()
            .map(|e| e.aggregate_sequence_number)
            .collect();
        assert_eq!(stored, (0..stored.len() as i64).collect::<Vec<_>>(), "{id}: gapless");
        for seq in confirmed {
            assert!(*seq < stored.len() as i64, "{id}: confirmed {seq} lost");
        }
        for expected in claimed_expected {
            assert!(
                *expected <= stored.len() as i64,
                "{id}: the node said it expected {expected}, counting events it never stored (it stores {})",
                stored.len()
            );
        }
    }
    node.stop();
}

/// The sequence a conflict (AXONIQ-2000) says the aggregate expects.
fn expected_of(status: &tonic::Status) -> Option<i64> {
    let message = status.message();
    if !message.contains("AXONIQ-2000") {
        return None;
    }
    message.rsplit("expected ").next()?.trim().parse().ok()
}
