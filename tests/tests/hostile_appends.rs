//! Hostile appends (issue 15, D2, D3, D6 and the small append defects): whatever a client sends
//! on `AppendEvent` and `AppendSnapshot`, it gets a clear error, nothing of a refused
//! transaction is stored, the router's memory stays bounded, and other clients' appends go on.
//! The limits are those of docs/limits.md.

use std::time::{Duration, Instant};

use myelin_proto::axon::event::event_store_client::EventStoreClient;
use myelin_proto::axon::event::{Event, GetLastTokenRequest};
use myelin_tests::{Node, Options, append, event, newest_snapshot, read_aggregate};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

fn error_code(status: &tonic::Status) -> &str {
    status
        .metadata()
        .get("axoniq-errorcode")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

async fn last_token(client: &mut EventStoreClient<Channel>) -> i64 {
    client
        .get_last_token(GetLastTokenRequest {})
        .await
        .unwrap()
        .into_inner()
        .token
}

/// A bystander's append and read work, each well within a hang detector's deadline.
async fn bystander_appends(node: &Node, id: &str) {
    let mut client = node.client().await;
    tokio::time::timeout(Duration::from_secs(10), async {
        append(&mut client, vec![event(id, 0, id)]).await.unwrap();
        assert_eq!(read_aggregate(&mut client, id).await.len(), 1);
    })
    .await
    .expect("the bystander's append and read hung");
}

/// D2: two million empty-ish events in one transaction (a few MB on the wire) were stored and
/// took the eventstore to 575 MB: an event now costs its bytes plus a fixed overhead, and a
/// transaction has a maximum number of events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_of_countless_tiny_events_is_refused() {
    let node = Node::start(Options::default()).await;
    let mut client = node.client().await;
    let before = last_token(&mut client).await;
    // Events of a few bytes each: under the byte limit if they counted only their bytes.
    let tiny = |i: i64| Event {
        message_identifier: format!("{i}"),
        ..Default::default()
    };
    let status = append(&mut client, (0..200_000).map(tiny).collect())
        .await
        .expect_err("200,000 events in one transaction");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        ["AXONIQ-2001", "AXONIQ-2002"].contains(&error_code(&status)),
        "{status:?}"
    );
    // Over the count alone: 40,000 tiny events fit the bytes (64 + 7 bytes each) but not the
    // default maximum of 32,768 events.
    let status = append(&mut client, (0..40_000).map(tiny).collect())
        .await
        .expect_err("40,000 events in one transaction");
    assert_eq!(error_code(&status), "AXONIQ-2002", "{status:?}");
    assert!(status.message().contains("32768"), "{status:?}");
    assert_eq!(last_token(&mut client).await, before, "nothing of it stored");
    // Within the count and the bytes: stored.
    append(&mut client, (0..30_000).map(tiny).collect()).await.unwrap();
    assert_eq!(last_token(&mut client).await, before + 30_000);
    let rss = node.rss_kib("eventstore").unwrap();
    eprintln!("eventstore RSS after 30,000-event transaction: {} MiB", rss / 1024);
    assert!(rss < 200 * 1024, "eventstore at {} MiB", rss / 1024);
}

/// D3: a transaction just under the client limit once exceeded the internal message limit,
/// failed with "outcome unknown" and ended the append stream every client shares. Every
/// transaction the limit admits now travels; the next one over it is refused cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_admitted_transaction_of_small_events_is_stored() {
    let node = Node::start(Options::default()).await;
    let mut client = node.client().await;
    // Events of about 102 encoded bytes, as in the trial; the limit is 4 MiB - 10,000 bytes,
    // each event counting 64 bytes more than its encoding. Take as many as fit exactly.
    let small = |i: i64| {
        let mut e = event("small-events", i, &format!("s{i:08}"));
        e.payload.as_mut().unwrap().data = bytes::Bytes::from_static(b"0123456789012345678901234");
        e.meta_data.clear();
        e
    };
    let limit = (4usize << 20) - 10_000;
    let mut cost = 0;
    let mut fits = 0i64;
    while cost + prost::Message::encoded_len(&small(fits)) + 64 <= limit {
        cost += prost::Message::encoded_len(&small(fits)) + 64;
        fits += 1;
    }
    eprintln!(
        "events of {} bytes: {fits} fit in one transaction",
        prost::Message::encoded_len(&small(fits))
    );
    append(&mut client, (0..fits).map(small).collect())
        .await
        .expect("the largest transaction the limit admits");
    assert_eq!(last_token(&mut client).await, fits - 1);
    let status = append(&mut client, (fits..2 * fits + 1).map(small).collect())
        .await
        .expect_err("one event more than fits");
    assert!(fits + 1 < 32_768, "refused for its bytes, not its count");
    assert_eq!(error_code(&status), "AXONIQ-2001", "{status:?}");
    // The trial's transaction: 41,000 events of about 102 bytes, within the old byte count, over
    // the internal message limit. Refused cleanly now (it once came back "outcome unknown").
    let trial = |i: i64| {
        let mut e = small(i);
        e.payload.as_mut().unwrap().data = bytes::Bytes::from_static(b"01234567890123456789012345678901");
        e
    };
    let status = append(&mut client, (fits..fits + 41_000).map(trial).collect())
        .await
        .expect_err("41,000 events of ~102 bytes");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // The shared append stream is intact: another client's append goes through at once.
    bystander_appends(&node, "after-d3").await;
    for process in ["router", "eventstore"] {
        let rss = node.rss_kib(process).unwrap();
        eprintln!("{process} RSS after the largest transactions: {} MiB", rss / 1024);
        assert!(rss < 200 * 1024, "{process} at {} MiB", rss / 1024);
    }
    assert_eq!(read_aggregate(&mut client, "small-events").await.len() as i64, fits);
}

/// D6: AppendEvent streams sent half-way and never half-closed held +900 MB in the router,
/// indefinitely. Now every event of an open transaction reserves its cost from one node-wide
/// budget (refused beyond it with AXONIQ-1900), and a transaction not completed in time is
/// refused and freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_transactions_are_bounded_and_time_out() {
    let node = Node::start(Options {
        env: vec![
            ("MYELIN_LIMITS_TRANSACTION_BUFFER".into(), "32MB".into()),
            ("MYELIN_LIMITS_TRANSACTION_TIMEOUT".into(), "3000".into()),
        ],
        ..Options::default()
    })
    .await;
    let client = node.client().await;
    let baseline = node.rss_kib("router").unwrap();
    // 40 streams on one connection, each sending 1 MiB of a transaction and then nothing:
    // 40 MiB, more than the 32 MiB budget.
    let payload = bytes::Bytes::from(vec![b'h'; 64 << 10]);
    let mut open = Vec::new();
    for s in 0..40 {
        let (tx, rx) = mpsc::channel(32);
        for i in 0..16 {
            let mut e = event(&format!("half-{s}"), i, &format!("h{s}-{i}"));
            e.payload.as_mut().unwrap().data = payload.clone();
            tx.send(e).await.unwrap();
        }
        let mut client = client.clone();
        let call = tokio::spawn(async move { client.append_event(ReceiverStream::new(rx)).await });
        open.push((tx, call));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = node.rss_kib("router").unwrap();
    eprintln!(
        "router RSS: {} MiB before, {} MiB with 40 half-sent transactions",
        baseline / 1024,
        held / 1024
    );
    assert!(
        held < baseline + 80 * 1024,
        "router grew from {} to {} MiB",
        baseline / 1024,
        held / 1024
    );
    // A bystander still appends (its events fit in what is left, or wait for the timeout).
    bystander_appends(&node, "bystander-d6").await;
    // Within the timeout every half-sent call has ended: those over the budget at once with
    // AXONIQ-1900, the others when their time ran out. None stored anything.
    let started = Instant::now();
    let mut over_budget = 0;
    let mut timed_out = 0;
    for (tx, call) in open {
        let status = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the half-sent call ended")
            .unwrap()
            .expect_err("a half-sent transaction is never stored");
        match status.code() {
            tonic::Code::ResourceExhausted => {
                assert_eq!(error_code(&status), "AXONIQ-1900", "{status:?}");
                over_budget += 1;
            }
            tonic::Code::DeadlineExceeded => timed_out += 1,
            other => panic!("unexpected {other:?}: {status:?}"),
        }
        drop(tx);
    }
    eprintln!(
        "{over_budget} refused over the budget, {timed_out} timed out, within {:?}",
        started.elapsed()
    );
    assert!(over_budget >= 1, "the budget was exceeded by some");
    assert!(timed_out >= 1, "the others timed out");
    let mut client = node.client().await;
    for s in 0..40 {
        assert!(read_aggregate(&mut client, &format!("half-{s}")).await.is_empty());
    }
    // The budget is free again: a large transaction goes through.
    let mut big = Vec::new();
    for i in 0..48 {
        let mut e = event("after-timeouts", i, &format!("a{i}"));
        e.payload.as_mut().unwrap().data = payload.clone();
        big.push(e);
    }
    append(&mut client, big).await.unwrap();
}

/// One connection may have at most `streams-per-connection` calls open: HTTP/2's
/// MAX_CONCURRENT_STREAMS, announced to the client, which queues further calls itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_may_open_a_bounded_number_of_streams() {
    let node = Node::start(Options {
        env: vec![("MYELIN_LIMITS_STREAMS_PER_CONNECTION".into(), "8".into())],
        ..Options::default()
    })
    .await;
    let client = node.client().await;
    let mut open = Vec::new();
    for s in 0..8 {
        let (tx, rx) = mpsc::channel(1);
        tx.send(event(&format!("open-{s}"), 0, &format!("o{s}"))).await.unwrap();
        let mut client = client.clone();
        open.push((
            tx,
            tokio::spawn(async move { client.append_event(ReceiverStream::new(rx)).await }),
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The ninth call on the same connection waits for a free stream ...
    let mut ninth = client.clone();
    let waiting = tokio::spawn(async move { ninth.get_last_token(GetLastTokenRequest {}).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a ninth stream was opened past the limit of 8");
    // ... while another connection is served at once.
    bystander_appends(&node, "other-connection").await;
    // Finishing one transaction frees a stream for it.
    let (tx, call) = open.remove(0);
    drop(tx);
    call.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting call ran once a stream was free")
        .unwrap()
        .unwrap();
}

/// The small append defects: an empty event, a snapshot at a negative sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_events_and_negative_snapshots_are_refused() {
    let node = Node::start(Options::default()).await;
    let mut client = node.client().await;
    let before = last_token(&mut client).await;
    let status = append(&mut client, vec![Event::default()])
        .await
        .expect_err("an empty event");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(last_token(&mut client).await, before);
    let mut snapshot = event("no-events-yet", -1, "snap");
    snapshot.snapshot = true;
    let status = client
        .append_snapshot(snapshot)
        .await
        .expect_err("a snapshot at sequence -1");
    assert_eq!(error_code(&status), "AXONIQ-2000", "{status:?}");
    assert!(newest_snapshot(&mut client, "no-events-yet").await.is_none());
}

/// A unary `AppendSnapshot` that carries two messages is refused whole (it once stored the first
/// and silently dropped the second), as grpc-java refuses it: INTERNAL, "Too many requests".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_snapshot_call_with_two_messages_is_refused() {
    let node = Node::start(Options::default()).await;
    let mut client = node.client().await;
    append(
        &mut client,
        vec![event("two-snaps", 0, "t0"), event("two-snaps", 1, "t1")],
    )
    .await
    .unwrap();
    let snapshot = |seq: i64| {
        let mut e = event("two-snaps", seq, &format!("snap{seq}"));
        e.snapshot = true;
        e
    };
    let mut grpc = tonic::client::Grpc::new(node.channel().await);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/io.axoniq.axonserver.grpc.event.EventStore/AppendSnapshot",
    );
    let codec = myelin_proto::encoded::ProstCodec::<Event, myelin_proto::axon::event::Confirmation>::default();
    let status = grpc
        .client_streaming(
            tonic::Request::new(tokio_stream::iter(vec![snapshot(0), snapshot(1)])),
            path,
            codec,
        )
        .await
        .expect_err("two messages on a unary call");
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("Too many requests"), "{status:?}");
    let stored = newest_snapshot(&mut client, "two-snaps").await;
    assert!(stored.is_none(), "nothing of the call stored: {stored:?}");
    // One message: stored.
    client.append_snapshot(snapshot(1)).await.unwrap();
}

/// D10: a connection is never dropped for the small DATA frames one call sent while the router
/// was not reading. h2 ends a connection (GOAWAY ENHANCE_YOUR_CALM, "too_many_data_frames")
/// whose unread small frames outweigh half its connection window; at hyper's 1 MiB, one stream
/// of ~150-byte events that the router read a little slower than a grpcio client sent them took
/// every call on the connection down. Here the router is stopped while a raw HTTP/2 client sends
/// a valid transaction as one DATA frame per event, so that on waking it finds a whole stream
/// window of small frames at once: the transaction is stored, the connection lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_window_of_small_frames_does_not_end_the_connection() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use prost::Message as _;

    let node = Node::start(Options::default()).await;
    let router = Pid::from_raw(node.child_pid("router").unwrap());
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", node.grpc_port))
        .await
        .unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://127.0.0.1:{}/io.axoniq.axonserver.grpc.event.EventStore/AppendEvent",
            node.grpc_port
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = h2.send_request(request, false).unwrap();
    // gRPC messages of ~100 bytes, one DATA frame each: 10,000 of them (about 1 MB, more than
    // the router's stream window, which the client fills while the router is stopped).
    let framed = |i: i64| {
        let mut e = event("small-frames", i, &format!("f{i:06}"));
        e.payload.as_mut().unwrap().data = bytes::Bytes::from_static(b"0123456789");
        e.meta_data.clear();
        let encoded = e.encode_to_vec();
        let mut frame = Vec::with_capacity(5 + encoded.len());
        frame.push(0);
        frame.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        frame.extend_from_slice(&encoded);
        bytes::Bytes::from(frame)
    };
    const EVENTS: i64 = 10_000;
    kill(router, Signal::SIGSTOP).unwrap();
    let sent = tokio::spawn(async move {
        for i in 0..EVENTS {
            body.reserve_capacity(128);
            let _ = futures::future::poll_fn(|cx| body.poll_capacity(cx)).await;
            body.send_data(framed(i), false).unwrap();
        }
        body.send_data(bytes::Bytes::new(), true).unwrap();
        body
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    kill(router, Signal::SIGCONT).unwrap();
    let _body = tokio::time::timeout(Duration::from_secs(20), sent)
        .await
        .expect("the client could send its transaction")
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), response)
        .await
        .expect("an answer")
        .expect("the connection was not dropped");
    let grpc_status = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let status = match grpc_status(response.headers()) {
        Some(status) => status,
        None => {
            let mut body = response.into_body();
            while let Some(chunk) = body.data().await {
                chunk.unwrap();
            }
            grpc_status(&body.trailers().await.unwrap().expect("trailers")).expect("grpc-status")
        }
    };
    assert_eq!(status, "0", "the transaction is stored");
    assert!(!connection.is_finished(), "the connection lives");
    let mut client = node.client().await;
    assert_eq!(read_aggregate(&mut client, "small-frames").await.len() as i64, EVENTS);
}
