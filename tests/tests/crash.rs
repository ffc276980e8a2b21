//! Crash safety: many concurrent appenders, `kill -9` of every process of the node at a random
//! moment, restart, and a history check — every confirmed event is there exactly once, tokens
//! are dense, aggregate sequences gapless, transactions whole, and rejected appends absent.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use myelin_proto::axon::event::ReadHighestSequenceNrRequest;
use myelin_tests::history::{Op, Outcome, check};
use myelin_tests::{Node, Options, append, event, read_aggregate, read_all};
use rand::Rng;
use tokio::sync::Mutex;

fn small_segments() -> Options {
    Options {
        env: vec![
            ("AXONIQ_AXONSERVER_EVENT_SEGMENT_SIZE".into(), "64KB".into()),
            ("AXONIQ_AXONSERVER_SNAPSHOT_SEGMENT_SIZE".into(), "64KB".into()),
        ],
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirmed_events_survive_kill_9_of_the_whole_node() {
    let mut node = Node::start(small_segments()).await;
    let history: Arc<Mutex<Vec<Op>>> = Arc::default();
    let mut rng = rand::rng();
    const ROUNDS: usize = 4;
    const WRITERS: usize = 16;
    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let mut client = node.lazy_client();
            let history = history.clone();
            tasks.push(tokio::spawn(async move {
                // Writers 0 and 1 compete for one hot aggregate; the others own theirs.
                let aggregate = if writer < 2 {
                    format!("hot-{round}")
                } else {
                    format!("agg-{round}-{writer}")
                };
                let mut next = 0i64;
                for op in 0.. {
                    if writer < 2 {
                        match client
                            .read_highest_sequence_nr(ReadHighestSequenceNrRequest {
                                aggregate_id: aggregate.clone(),
                                from_sequence_nr: 0,
                            })
                            .await
                        {
                            Ok(r) => next = r.into_inner().to_sequence_nr + 1,
                            Err(_) => return,
                        }
                    }
                    let size = 1 + op % 3;
                    let ids: Vec<String> = (0..size).map(|i| format!("{aggregate}/{writer}/{op}/{i}")).collect();
                    let events = ids
                        .iter()
                        .enumerate()
                        .map(|(i, id)| event(&aggregate, next + i as i64, id))
                        .collect();
                    let outcome = match append(&mut client, events).await {
                        Ok(()) => {
                            next += size as i64;
                            Outcome::Ok
                        }
                        Err(status) if status.code() == tonic::Code::OutOfRange => {
                            assert!(status.message().starts_with("[AXONIQ-2000] Invalid sequence number"));
                            Outcome::Rejected
                        }
                        Err(_) => Outcome::Indefinite,
                    };
                    let stop = outcome == Outcome::Indefinite;
                    history.lock().await.push(Op { ids, outcome });
                    if stop {
                        return;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        node.crash();
        for task in tasks {
            task.await.unwrap();
        }
        node.launch().await;
        check(&node, &history.lock().await).await;
    }
    let ops = history.lock().await;
    let confirmed = ops.iter().filter(|o| o.outcome == Outcome::Ok).count();
    let rejected = ops.iter().filter(|o| o.outcome == Outcome::Rejected).count();
    assert!(confirmed > 100, "the appenders got work done: {confirmed} confirmed");
    eprintln!(
        "{ROUNDS} crashes: {confirmed} confirmed, {rejected} rejected, {} indefinite",
        ops.len() - confirmed - rejected
    );
}

/// Killing only the eventstore child: the supervisor restarts it and nothing confirmed is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventstore_child_killed_is_restarted_without_loss() {
    let mut node = Node::start(small_segments()).await;
    let mut client = node.client().await;
    for i in 0..50 {
        append(&mut client, vec![event("survivor", i, &format!("s{i}"))])
            .await
            .unwrap();
    }
    let pid = node.child_pid("eventstore").expect("eventstore pid file");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    myelin_tests::wait_gone(pid, Duration::from_secs(10));
    node.wait_ready(Duration::from_secs(30)).await;
    let new_pid = node.child_pid("eventstore").expect("eventstore pid file");
    assert_ne!(pid, new_pid, "a new eventstore process serves");
    let mut client = node.client().await;
    let events = read_aggregate(&mut client, "survivor").await;
    assert_eq!(events.len(), 50);
    append(&mut client, vec![event("survivor", 50, "s50")]).await.unwrap();
    let ids: HashSet<String> = read_all(&mut client)
        .await
        .into_iter()
        .map(|(_, e)| e.message_identifier)
        .collect();
    assert_eq!(ids.len(), 51);
    assert!(node.log_text().contains("eventstore"), "the restart is logged");
}
