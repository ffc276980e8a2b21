//! The leader killed under load (issue 11): sixteen appenders, spread over the three nodes of a
//! cluster formed by `autocluster`, append transactions of one to three events (their own
//! aggregates, and a few hot aggregates they all contend for) while the node leading the
//! context is killed with SIGKILL at a random moment, five times, and brought back each time.
//!
//! Each attempt is recorded with what its client was told:
//! - confirmed: the append returned a token;
//! - rejected: a definite refusal, nothing stored (AXONIQ-2000 sequence conflict, AXONIQ-2100
//!   no leader), or a call that never left the client (its node is down: no connection);
//! - indefinite: anything else (the node was killed under the call, "outcome unknown"): it may
//!   or may not be stored, but never in part.
//!
//! A history checker then reads every replica and proves: the replicas hold the same events
//! under the same tokens and byte-identical segment files; every confirmed transaction is there
//! exactly once and whole, no rejected one is, and an indefinite one is there whole or not at
//! all; no event was stored that no client sent; every aggregate's sequence is gapless.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use myelin_proto::axon::event::event_store_client::EventStoreClient;
use myelin_proto::axon::event::{Event, ReadHighestSequenceNrRequest};
use myelin_tests::cluster::{Cluster, Replica, node_name};
use myelin_tests::{event, with_context};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

const CONTEXT: &str = "history";
const NODES: usize = 3;
const APPENDERS: usize = 16;
/// Aggregates every appender contends for (reads the highest sequence, then appends after it).
const HOT: usize = 4;
const ROUNDS: usize = 5;
/// An append that takes longer than this counts as a hang: with the leader gone, a client must
/// hear within the election timeout (plus forwarding), never wait on.
const HANG: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Confirmed,
    Rejected,
    Indefinite,
}

/// One append as its client saw it.
#[derive(Debug)]
struct Attempt {
    /// The transaction's id, the prefix of its events' message ids (`<id>/<k>/<size>`).
    id: String,
    aggregate: String,
    first_sequence: i64,
    size: usize,
    node: usize,
    verdict: Verdict,
    told: String,
}

fn verdict(result: &Result<(), tonic::Status>) -> Verdict {
    let Err(status) = result else {
        return Verdict::Confirmed;
    };
    let code = status.metadata().get("axoniq-errorcode").and_then(|v| v.to_str().ok());
    match code {
        Some("AXONIQ-2000") | Some("AXONIQ-2100") => Verdict::Rejected,
        // The client could not connect to its (killed) node: the call was never sent.
        _ if status.message().contains("tcp connect error") => Verdict::Rejected,
        _ => Verdict::Indefinite,
    }
}

/// What one appender does until `stop`: returns every attempt with its verdict.
async fn appender(
    k: usize,
    node: usize,
    mut client: EventStoreClient<Channel>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (Vec<Attempt>, usize) {
    let mut rng = StdRng::seed_from_u64(seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut attempts = Vec::new();
    let mut hangs = 0;
    // Its own aggregate, and the sequence it continues at. After an indefinite outcome the next
    // sequence is unknown: it moves on to a new aggregate.
    let mut generation = 0;
    let mut next = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let hot = rng.random_range(0..3) == 0;
        let (aggregate, first_sequence) = if hot {
            let aggregate = format!("hot-{}", rng.random_range(0..HOT));
            let highest = client
                .read_highest_sequence_nr(with_context(
                    ReadHighestSequenceNrRequest {
                        aggregate_id: aggregate.clone(),
                        ..Default::default()
                    },
                    CONTEXT,
                ))
                .await;
            match highest {
                Ok(h) => (aggregate, h.into_inner().to_sequence_nr + 1),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        } else {
            (format!("w{k}-{generation}"), next)
        };
        let size = rng.random_range(1..=3);
        let id = format!("w{k}-t{}", attempts.len());
        let events: Vec<Event> = (0..size)
            .map(|s| event(&aggregate, first_sequence + s as i64, &format!("{id}/{s}/{size}")))
            .collect();
        let started = Instant::now();
        let call = client.append_event(with_context(tokio_stream::iter(events), CONTEXT));
        let result = match tokio::time::timeout(HANG, call).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => {
                hangs += 1;
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer in {:?}",
                    started.elapsed()
                )))
            }
        };
        let verdict = verdict(&result);
        if !hot {
            match verdict {
                Verdict::Confirmed => next += size as i64,
                Verdict::Rejected => {}
                Verdict::Indefinite => {
                    generation += 1;
                    next = 0;
                }
            }
        }
        attempts.push(Attempt {
            id,
            aggregate,
            first_sequence,
            size,
            node,
            verdict,
            told: result
                .err()
                .map(|e| format!("{:?} {}", e.code(), e.message()))
                .unwrap_or_default(),
        });
        if verdict != Verdict::Confirmed {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (attempts, hangs)
}

/// An event as the checker reads it back.
struct Stored {
    token: i64,
    aggregate: String,
    sequence: i64,
    transaction: String,
    position: usize,
    size: usize,
}

fn parse(token: i64, bytes: &[u8]) -> Stored {
    let event = Event::decode(bytes).expect("a stored event decodes");
    let parts: Vec<&str> = event.message_identifier.split('/').collect();
    assert_eq!(parts.len(), 3, "token {token}: an event no appender sent: {event:?}");
    Stored {
        token,
        aggregate: event.aggregate_identifier,
        sequence: event.aggregate_sequence_number,
        transaction: parts[0].to_owned(),
        position: parts[1].parse().expect("position"),
        size: parts[2].parse().expect("size"),
    }
}

/// Waits until every node serves the same number of events, and that number stays put.
async fn settled_replicas(cluster: &Cluster, within: Duration) -> Vec<(usize, Replica)> {
    let deadline = Instant::now() + within;
    let mut previous = Vec::new();
    loop {
        let mut replicas = Vec::new();
        for i in 0..NODES {
            // A node relaunched a moment ago may not know the leader yet: not settled.
            match cluster.try_replica(i, CONTEXT).await {
                Ok(replica) => replicas.push((i, replica)),
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    eprintln!("{}: not ready to read yet: {}", node_name(i), e.message());
                }
                Err(e) => cluster.panic_with_log(i, &format!("reading the last token: {e:?}")),
            }
        }
        if replicas.len() < NODES {
            previous.clear();
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let counts: Vec<usize> = replicas.iter().map(|(_, r)| r.len()).collect();
        if counts.iter().all(|c| *c == counts[0]) && counts == previous {
            return replicas;
        }
        assert!(Instant::now() < deadline, "replicas do not settle: {counts:?}");
        previous = counts;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_killed_under_load_loses_nothing_confirmed() {
    let seed: u64 = std::env::var("MYELIN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (MYELIN_TEST_SEED={seed} repeats this run's choices)");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut cluster = Cluster::start_autocluster(NODES, CONTEXT).await;
    // Every node a voter of the context, and one leader all agree on.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let leader = cluster.wait_leader(CONTEXT, Duration::from_secs(60)).await;
        let voters = cluster
            .status(leader, CONTEXT)
            .await
            .map(|s| s.members.iter().filter(|m| m.voter).count());
        if voters == Some(NODES) {
            break;
        }
        assert!(Instant::now() < deadline, "{CONTEXT} has {voters:?} voters");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let appenders: Vec<_> = (0..APPENDERS)
        .map(|k| {
            let node = k % NODES;
            let client = cluster.nodes[node].lazy_client();
            tokio::spawn(appender(k, node, client, seed, stop.clone()))
        })
        .collect();

    for round in 1..=ROUNDS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2_500))).await;
        let leader = cluster.wait_leader(CONTEXT, Duration::from_secs(30)).await;
        cluster.nodes[leader].crash();
        let killed = Instant::now();
        let next = cluster.wait_leader(CONTEXT, Duration::from_secs(30)).await;
        eprintln!(
            "round {round}: killed {} (leader); {} leads after {:?}",
            node_name(leader),
            node_name(next),
            killed.elapsed()
        );
        // The load goes on against two nodes for a while, then the killed node comes back.
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
        cluster.nodes[leader].launch().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut attempts = Vec::new();
    let mut hangs = 0;
    for task in appenders {
        let (mine, hung) = task.await.expect("appender");
        attempts.extend(mine);
        hangs += hung;
    }

    // Every node back, one leader, every replica complete.
    cluster.wait_leader(CONTEXT, Duration::from_secs(30)).await;
    let replicas = settled_replicas(&cluster, Duration::from_secs(60)).await;
    cluster.assert_same_replicas(CONTEXT, &replicas);
    let stored: Vec<Stored> = replicas[0].1.iter().map(|(t, b)| parse(*t, b)).collect();

    let count = |v: Verdict| attempts.iter().filter(|a| a.verdict == v).count();
    let (confirmed, rejected, indefinite) = (
        count(Verdict::Confirmed),
        count(Verdict::Rejected),
        count(Verdict::Indefinite),
    );
    let mut transactions: HashMap<&str, Vec<&Stored>> = HashMap::new();
    for event in &stored {
        transactions.entry(event.transaction.as_str()).or_default().push(event);
    }
    let mut indefinite_stored = 0;
    for attempt in &attempts {
        let found = transactions.get(attempt.id.as_str());
        match (attempt.verdict, found) {
            (Verdict::Confirmed, None) => panic!("confirmed, then lost: {attempt:?}"),
            (Verdict::Rejected, Some(_)) => panic!("rejected, yet stored: {attempt:?}"),
            (Verdict::Indefinite, Some(_)) => indefinite_stored += 1,
            _ => {}
        }
        if let Some(events) = found {
            // Whole, once, in one run of tokens, as sent.
            assert_eq!(events.len(), attempt.size, "stored in part or twice: {attempt:?}");
            for (k, e) in events.iter().enumerate() {
                assert_eq!((e.position, e.size), (k, attempt.size), "{attempt:?}");
                assert_eq!(e.token, events[0].token + k as i64, "not contiguous: {attempt:?}");
                assert_eq!(e.aggregate, attempt.aggregate, "{attempt:?}");
                assert_eq!(e.sequence, attempt.first_sequence + k as i64, "{attempt:?}");
            }
        }
    }
    let sent: std::collections::HashSet<&str> = attempts.iter().map(|a| a.id.as_str()).collect();
    for id in transactions.keys() {
        assert!(sent.contains(id), "stored, but no appender sent it: {id}");
    }
    // Every aggregate's events, in token order, are numbered 0, 1, 2, ...
    let mut sequences: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for e in &stored {
        sequences.entry(e.aggregate.as_str()).or_default().push(e.sequence);
    }
    for (aggregate, seqs) in &sequences {
        assert!(
            seqs.iter().enumerate().all(|(i, s)| *s == i as i64),
            "{aggregate} has a gap or a repeat: {seqs:?}"
        );
    }

    let told: BTreeMap<String, usize> =
        attempts
            .iter()
            .filter(|a| a.verdict == Verdict::Indefinite)
            .fold(BTreeMap::new(), |mut m, a| {
                *m.entry(a.told.chars().take(90).collect()).or_default() += 1;
                m
            });
    eprintln!(
        "history: {} attempts over {ROUNDS} leader kills: {confirmed} confirmed, {rejected} rejected, \
         {indefinite} indefinite ({indefinite_stored} of them stored, whole); {} events on each of \
         {NODES} replicas, {} aggregates; indefinite answers: {told:?}",
        attempts.len(),
        stored.len(),
        sequences.len()
    );
    let by_node: Vec<usize> = (0..NODES)
        .map(|n| {
            attempts
                .iter()
                .filter(|a| a.node == n && a.verdict == Verdict::Confirmed)
                .count()
        })
        .collect();
    eprintln!("confirmed through n1..n{NODES}: {by_node:?}");
    assert_eq!(hangs, 0, "appends that got no answer within {HANG:?}");
    assert!(
        confirmed >= 100,
        "too little load to prove anything: {confirmed} confirmed"
    );
    assert!(
        by_node.iter().all(|c| *c > 0),
        "some node confirmed nothing: {by_node:?}"
    );
}
