//! Isolation between clients (issue 15, D1): clients that open event reads and never consume
//! them must not delay any other client's calls.
//!
//! Before the fix every read and append of the node shared one router → eventstore HTTP/2
//! connection whose flow-control window three unread streams filled: every event-store call of
//! every client then hung until they disconnected. Here three hostile clients, each on its own
//! connection, open a read with a million permits and never read (then twelve more); ten others
//! open a read of a large aggregate and never read it. A bystander then appends, reads its
//! aggregate, tracks from token 0, and asks for the last token, each within a deadline that only
//! a hang misses. The node's memory must stay bounded meanwhile.

use std::time::{Duration, Instant};

use myelin_proto::axon::event::{GetAggregateEventsRequest, GetEventsRequest, GetLastTokenRequest};
use myelin_tests::{Node, Options, append, event, read_aggregate};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A call that takes longer than this has hung behind the hostile streams (the bystander's calls
/// take milliseconds; this is a hang detector, not a speed target).
const HANG: Duration = Duration::from_secs(10);

/// Resident memory each process may reach during a scenario, in KiB. The unread streams pin at
/// most their flow-control windows (see docs/limits.md), a few MiB each, over a baseline of
/// about 30 MiB.
const RSS_BOUND_KIB: u64 = 200 * 1024;

/// Fills the store with `events` events of `aggregate`, `per_tx` per transaction.
async fn fill(node: &Node, aggregate: &str, events: i64, per_tx: i64) {
    let mut client = node.client().await;
    let mut seq = 0;
    while seq < events {
        let batch = (seq..(seq + per_tx).min(events))
            .map(|s| event(aggregate, s, &format!("{aggregate}-{s}")))
            .collect();
        append(&mut client, batch).await.unwrap();
        seq += per_tx;
    }
}

/// What the hostile clients hold open: their channels and unread responses.
struct Hostile {
    _held: Vec<Box<dyn std::any::Any + Send>>,
}

/// Opens `n` tracking streams from token 0 with a million permits each and never reads them.
async fn unread_tracking_streams(node: &Node, n: usize) -> Hostile {
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    for i in 0..n {
        let mut client = node.client().await;
        let (tx, rx) = mpsc::channel(1);
        tx.send(GetEventsRequest {
            tracking_token: 0,
            number_of_permits: 1_000_000,
            client_id: format!("hostile-{i}"),
            component_name: "hostile".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let response = client.list_events(ReceiverStream::new(rx)).await.unwrap();
        held.push(Box::new((client, tx, response)));
    }
    Hostile { _held: held }
}

/// Opens `n` reads of `aggregate` and never reads them.
async fn unread_aggregate_reads(node: &Node, aggregate: &str, n: usize) -> Hostile {
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    for _ in 0..n {
        let mut client = node.client().await;
        let response = client
            .list_aggregate_events(GetAggregateEventsRequest {
                aggregate_id: aggregate.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
        held.push(Box::new((client, response)));
    }
    Hostile { _held: held }
}

/// Runs `call` within [`HANG`], naming what hung.
async fn within<T>(what: &str, call: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = tokio::time::timeout(HANG, call)
        .await
        .unwrap_or_else(|_| panic!("{what} hung for {HANG:?} behind the unread streams"));
    (out, started.elapsed())
}

/// A bystander on its own connection: appends, reads its aggregate, tracks, asks the last token.
/// Returns the slowest call's duration.
async fn bystander(node: &Node, round: i64) -> Duration {
    let mut client = node.client().await;
    let id = format!("bystander-{round}");
    let mut slowest = Duration::ZERO;
    for s in 0..5 {
        let (result, took) = within(
            "an append",
            append(&mut client, vec![event(&id, s, &format!("{id}-{s}"))]),
        )
        .await;
        result.unwrap();
        slowest = slowest.max(took);
    }
    let (events, took) = within("an aggregate read", read_aggregate(&mut client, &id)).await;
    assert_eq!(events.len(), 5);
    slowest = slowest.max(took);
    let (last, took) = within("GetLastToken", client.get_last_token(GetLastTokenRequest {})).await;
    assert!(last.unwrap().into_inner().token > 0);
    slowest = slowest.max(took);
    // A tracking read of its own: ten events from token 0 arrive.
    let (_, took) = within("a tracking read", async {
        let (tx, rx) = mpsc::channel(1);
        tx.send(GetEventsRequest {
            tracking_token: 0,
            number_of_permits: 10,
            client_id: id.clone(),
            component_name: "bystander".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut stream = client.list_events(ReceiverStream::new(rx)).await.unwrap().into_inner();
        for expected in 0..10 {
            let item = stream.message().await.unwrap().expect("an event");
            assert_eq!(item.token, expected);
        }
    })
    .await;
    slowest.max(took)
}

fn assert_rss(node: &Node, during: &str) {
    for process in ["router", "eventstore"] {
        let rss = node.rss_kib(process).expect("process running");
        eprintln!("{during}: {process} RSS {} MiB", rss / 1024);
        assert!(
            rss < RSS_BOUND_KIB,
            "{during}: {process} at {} MiB, over the bound of {} MiB",
            rss / 1024,
            RSS_BOUND_KIB / 1024
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_tracking_streams_delay_no_other_client() {
    let node = Node::start(Options::default()).await;
    // ~14 MB of events: more than every flow-control window between client and eventstore.
    fill(&node, "filler", 60_000, 2_000).await;
    let before = bystander(&node, 0).await;
    let hostile = unread_tracking_streams(&node, 3).await;
    // Let the unread streams fill every buffer they can.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for round in 1..=3 {
        let slowest = bystander(&node, round).await;
        eprintln!("bystander round {round}: slowest call {slowest:?} (before the hostile streams: {before:?})");
    }
    assert_rss(&node, "three unread tracking streams");
    // More of them, up to what one hostile client may open, still delay no one.
    let more = unread_tracking_streams(&node, 12).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    bystander(&node, 10).await;
    assert_rss(&node, "fifteen unread tracking streams");
    drop((hostile, more));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_aggregate_reads_delay_no_other_client() {
    let node = Node::start(Options::default()).await;
    // One large aggregate (~7 MB), read by ten clients that never consume.
    fill(&node, "large", 30_000, 2_000).await;
    let hostile = unread_aggregate_reads(&node, "large", 10).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for round in 1..=3 {
        let slowest = bystander(&node, round).await;
        eprintln!("bystander round {round}: slowest call {slowest:?}");
    }
    assert_rss(&node, "ten unread aggregate reads");
    drop(hostile);
}

/// The event reads open at once on the node are bounded: one more is refused at once with
/// AXONIQ-1900 (never queued behind the unread ones), appends go on, and a slot freed by a
/// client that leaves serves the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_reads_beyond_the_node_limit_are_refused_at_once() {
    let node = Node::start(Options {
        env: vec![("MYELIN_LIMITS_EVENT_READS".into(), "4".into())],
        ..Options::default()
    })
    .await;
    fill(&node, "filler", 10_000, 2_000).await;
    let hostile = unread_tracking_streams(&node, 4).await;
    let mut client = node.client().await;
    let (refused, _) = within(
        "a read over the limit",
        client.list_aggregate_events(GetAggregateEventsRequest {
            aggregate_id: "filler".into(),
            ..Default::default()
        }),
    )
    .await;
    let status = refused.expect_err("a fifth read while four are open");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("AXONIQ-1900"), "{status:?}");
    let (appended, _) = within("an append", append(&mut client, vec![event("still", 0, "still-0")])).await;
    appended.unwrap();
    drop(hostile);
    // The hostile streams' slots come free as the router sees their clients gone.
    let deadline = Instant::now() + HANG;
    loop {
        match client
            .list_aggregate_events(GetAggregateEventsRequest {
                aggregate_id: "still".into(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => break,
            Err(status) if status.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("read after the hostile clients left: {status:?}"),
        }
    }
}

/// Client connections open at once are bounded: one more is closed at once (its call fails as
/// on any closed connection), the open ones go on, and a connection that closes frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_and_places_come_back() {
    let node = Node::start(Options {
        env: vec![("MYELIN_LIMITS_CONNECTIONS".into(), "3".into())],
        ..Options::default()
    })
    .await;
    // Let the harness's readiness probes' connections close.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut client = node.client().await;
        client.get_last_token(GetLastTokenRequest {}).await.unwrap();
        open.push(client);
    }
    let refused = async {
        let mut client = node.lazy_client();
        client.get_last_token(GetLastTokenRequest {}).await
    };
    let (refused, _) = within("a call on a fourth connection", refused).await;
    // Failed as on any connection closed under it (tonic says UNAVAILABLE, CANCELLED or UNKNOWN
    // depending on when it notices).
    let status = refused.expect_err("a fourth connection");
    eprintln!("a call on a fourth connection: {status:?}");
    for client in &mut open {
        client.get_last_token(GetLastTokenRequest {}).await.unwrap();
    }
    drop(open.pop());
    let deadline = Instant::now() + HANG;
    loop {
        let mut client = node.lazy_client();
        match client.get_last_token(GetLastTokenRequest {}).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("no place came back: {status:?}"),
        }
    }
    assert!(node.log_text().contains("refusing client connections"));
}
