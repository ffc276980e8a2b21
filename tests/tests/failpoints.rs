//! Crash points: the eventstore aborts at one named persistence step (see
//! `eventstore/src/crash.rs`) while clients append; the supervisor restarts it, and the history
//! check must hold — every confirmed event there once, nothing rejected stored, no transaction in
//! part, tokens dense, sequences gapless.
//!
//! Needs a `myelin` built with the `failpoints` feature, named by `$MYELIN_FAILPOINTS_BIN` (the
//! test command builds one into its own target directory, so release binaries never carry crash
//! points). Without it the test fails and says how to build one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use myelin_tests::history::{Op, Outcome, check};
use myelin_tests::{Node, Options, append, event};
use tokio::sync::Mutex;

/// Each point, and on which hit to crash there.
const POINTS: &[(&str, u64)] = &[
    ("log-after-write", 40),
    ("log-after-sync", 40),
    ("segment-after-write", 40),
    ("roll-after-sync", 2),
    ("roll-after-index", 2),
    ("roll-after-create", 2),
    ("snapshot-after-sync", 1),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_at_every_crash_point_keeps_promises() {
    let binary = std::env::var("MYELIN_FAILPOINTS_BIN").expect(
        "MYELIN_FAILPOINTS_BIN must name a myelin built with `--features failpoints` \
         (scripts/test builds target/failpoints/release/myelin)",
    );
    for (point, hit) in POINTS {
        let armed = tempfile::NamedTempFile::new().unwrap().into_temp_path().keep().unwrap();
        std::fs::write(&armed, format!("{point} {hit}")).unwrap();
        let mut node = Node::start(Options {
            env: vec![
                ("MYELIN_CRASH_FILE".into(), armed.display().to_string()),
                ("AXONIQ_AXONSERVER_EVENT_SEGMENT_SIZE".into(), "16KB".into()),
            ],
            binary: Some(binary.clone().into()),
            ..Options::default()
        })
        .await;
        let pid = node.child_pid("eventstore").unwrap();
        let history: Arc<Mutex<Vec<Op>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..8)
            .map(|w| {
                tokio::spawn(writer(
                    node.lazy_client(),
                    format!("{point}-{w}"),
                    stop.clone(),
                    history.clone(),
                ))
            })
            .collect();
        // Wait for the crash (the armed file disappears), then for the restarted eventstore.
        let deadline = Instant::now() + Duration::from_secs(60);
        while armed.exists() {
            assert!(Instant::now() < deadline, "crash point {point} never reached");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        node.wait_ready(Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.await.unwrap();
        }
        assert_ne!(
            node.child_pid("eventstore"),
            Some(pid),
            "{point}: the eventstore was restarted"
        );
        let ops = history.lock().await;
        let confirmed = ops.iter().filter(|o| o.outcome == Outcome::Ok).count();
        assert!(confirmed > 0, "{point}: appends were confirmed");
        assert!(
            node.log_text().contains(&format!("crash point {point} reached")),
            "{point}: the crash came from the point"
        );
        check(&node, &ops).await;
        eprintln!("{point}: {confirmed} confirmed of {} appends", ops.len());
    }
}

/// Appends to its own aggregates until stopped. After an append with no answer it cannot know
/// the aggregate's next sequence, so it moves on to a new aggregate.
async fn writer(
    mut client: myelin_proto::axon::event::event_store_client::EventStoreClient<tonic::transport::Channel>,
    prefix: String,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<Op>>>,
) {
    let mut aggregate = 0;
    let mut next = 0i64;
    let mut op = 0;
    while !stop.load(Ordering::SeqCst) {
        let id = format!("{prefix}-{aggregate}");
        let size = 1 + op % 3;
        let ids: Vec<String> = (0..size).map(|i| format!("{id}/{op}/{i}")).collect();
        let events = ids
            .iter()
            .enumerate()
            .map(|(i, m)| event(&id, next + i as i64, m))
            .collect();
        op += 1;
        let outcome = match append(&mut client, events).await {
            Ok(()) => {
                next += size as i64;
                Outcome::Ok
            }
            Err(status) if status.code() == tonic::Code::OutOfRange => Outcome::Rejected,
            Err(_) => {
                aggregate += 1;
                next = 0;
                tokio::time::sleep(Duration::from_millis(20)).await;
                Outcome::Indefinite
            }
        };
        history.lock().await.push(Op { ids, outcome });
    }
}
