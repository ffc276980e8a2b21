//! Queries across the nodes of a cluster (issue 12): query handler applications and dispatchers
//! connected to different nodes of a three-node cluster on 127.0.0.1–3. One message bus per
//! context: scatter-gather reaches one handler per component on every node; a streaming query's
//! permits follow the dispatcher's demand across the link; a subscription query's initial result
//! and updates come from a handler on another node; cancels, timeouts and a dead node end what
//! they must on both sides.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use myelin_proto::axon::ProcessingKey;
use myelin_proto::axon::query::query_provider_inbound::Request as Inbound;
use myelin_proto::axon::query::query_provider_outbound::Request as Outbound;
use myelin_proto::axon::query::subscription_query_request::Request as SubRequest;
use myelin_proto::axon::query::subscription_query_response::Response as SubResponse;
use myelin_proto::axon::query::{
    QueryResponse, QueryUpdate, QueryUpdateComplete, SubscriptionQueryRequest, SubscriptionQueryResponse,
};
use myelin_tests::Node;
use myelin_tests::cluster::Cluster;
use myelin_tests::query_apps::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// How long a new handler takes at most to be known on every node: its node sends its handler
/// set about 20 ms after a change, and again every 2 s.
const PROPAGATION: Duration = Duration::from_secs(3);

/// Dispatches `name` on `node` until `n` components answer; their answers, sorted.
async fn until_answered_by(node: &Node, name: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut round = 0;
    loop {
        round += 1;
        let request = query(&format!("{name}-{}-{round}", node.address()), name, Some(5_000));
        let responses = dispatch(node, request.clone()).await;
        let mut texts: Vec<String> = responses.iter().filter(|r| r.error_code.is_empty()).map(text).collect();
        texts.sort();
        if texts.len() == n {
            for response in &responses {
                assert_eq!(response.request_identifier, request.message_identifier);
                assert_eq!(response.meta_data, request.meta_data, "metadata relayed unchanged");
            }
            return texts;
        }
        assert!(
            texts.len() < n && Instant::now() < deadline,
            "{} of {n} components answered {name} on {}: {responses:?}",
            texts.len(),
            node.address()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scatter-gather over three components on three nodes, from every node; a handler on another
/// node that does not answer in time gets the dispatcher's AXONIQ-5006 and is told to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scatter_gather_reaches_one_handler_per_component_on_every_node() {
    let cluster = Cluster::start(3, &[]).await;
    let components = ["billing", "inventory", "warehouse"];
    let mut serving = Vec::new();
    for (i, component) in components.iter().enumerate() {
        let handler = Handler::connect(&cluster.nodes[i], component, &["CountStock"], 1_000).await;
        serving.push(handler.serve(["n1", "n2", "n3"][i]));
    }
    for i in 0..3 {
        let started = Instant::now();
        let texts = until_answered_by(&cluster.nodes[i], "CountStock", 3).await;
        eprintln!(
            "n{} gathers from all three nodes {:?} after the handlers subscribed",
            i + 1,
            started.elapsed()
        );
        assert_eq!(texts, ["billing:n1", "inventory:n2", "warehouse:n3"]);
    }

    // A handler on n3 that never answers: the query dispatched on n1 times out there.
    let mut silent = Handler::connect(&cluster.nodes[2], "silent", &["Slow"], 100).await;
    tokio::time::sleep(PROPAGATION).await;
    let started = Instant::now();
    let responses = dispatch(&cluster.nodes[0], query("slow-1", "Slow", Some(500))).await;
    let elapsed = started.elapsed();
    assert_eq!(responses.len(), 1, "{responses:?}");
    assert_eq!(responses[0].error_code, "AXONIQ-5006", "{responses:?}");
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    assert_eq!(silent.next_query().await.message_identifier, "slow-1");
    silent.expect_cancel("slow-1").await;
}

/// A streaming query dispatched on n1 to a handler on n2: the handler's permits follow what the
/// dispatcher reads, across the link; the other component's handler, on n3, is cancelled once
/// the first answered; a dispatcher's cancel reaches the handler on the other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streaming_query_follows_the_dispatchers_demand_across_nodes() {
    const TOTAL: u64 = 100;
    /// As on one node (see queries.rs): the router's window of 16 plus what HTTP/2 buffers.
    const AHEAD: u64 = 16 + 24;
    const BIG: usize = 16 * 1024;
    let cluster = Cluster::start(3, &[]).await;
    let mut streamer = Handler::connect(&cluster.nodes[1], "streamer", &["Numbers"], 10).await;
    let mut bystander = Handler::connect(&cluster.nodes[2], "bystander", &["Numbers"], 10).await;
    tokio::time::sleep(PROPAGATION).await;

    let mut responses = small_window_client(&cluster.nodes[0])
        .await
        .query(streaming_query("numbers-1", "Numbers", Some(60_000)))
        .await
        .unwrap()
        .into_inner();
    let received = streamer.next_query().await;
    assert_eq!(flag(&received, ProcessingKey::ServerSupportsStreaming), [true]);
    assert_eq!(bystander.next_query().await.message_identifier, "numbers-1");

    let read = Arc::new(AtomicU64::new(0));
    let streaming = {
        let read = read.clone();
        tokio::spawn(async move {
            let mut seen = StreamedBy::default();
            while seen.sent < TOTAL {
                match streamer.next().await.request {
                    Some(Inbound::QueryFlowControl(flow)) => {
                        assert_eq!(flow.query_reference.unwrap().request_id, "numbers-1");
                        seen.granted += flow.permits as u64;
                        let ahead = seen.granted.saturating_sub(read.load(Ordering::SeqCst));
                        seen.most_ahead = seen.most_ahead.max(ahead);
                    }
                    other => panic!("unexpected message for the streamer: {other:?}"),
                }
                while seen.sent < seen.granted.min(TOTAL) {
                    streamer
                        .send(Outbound::QueryResponse(numbered(&received, seen.sent, BIG)), "")
                        .await;
                    seen.sent += 1;
                }
            }
            streamer.complete(&received).await;
            (seen, streamer)
        })
    };
    bystander.expect_cancel("numbers-1").await;

    let mut numbers = Vec::new();
    for _ in 0..5 {
        numbers.push(number_of(&next_response(&mut responses).await.unwrap()));
        read.fetch_add(1, Ordering::SeqCst);
    }
    // The dispatcher stops reading for a while: the handler on n2 is not asked for everything.
    tokio::time::sleep(Duration::from_millis(800)).await;
    while let Some(response) = next_response(&mut responses).await {
        assert!(response.error_code.is_empty(), "{response:?}");
        numbers.push(number_of(&response));
        read.fetch_add(1, Ordering::SeqCst);
    }
    assert_eq!(numbers, (0..TOTAL).collect::<Vec<_>>(), "all responses, in order");
    let (seen, mut streamer) = tokio::time::timeout(WAIT, streaming).await.unwrap().unwrap();
    assert_eq!(seen.sent, TOTAL);
    assert!(
        seen.most_ahead <= AHEAD,
        "permits ran {} ahead of what the dispatcher read: {seen:?}",
        seen.most_ahead
    );

    // The dispatcher on n1 cancels mid-stream: the handler on n2 is told.
    let mut responses = small_window_client(&cluster.nodes[0])
        .await
        .query(streaming_query("numbers-2", "Numbers", Some(60_000)))
        .await
        .unwrap()
        .into_inner();
    let received = streamer.next_query().await;
    assert_eq!(received.message_identifier, "numbers-2");
    assert_eq!(bystander.next_query().await.message_identifier, "numbers-2");
    streamer
        .send(Outbound::QueryResponse(numbered(&received, 0, 8)), "")
        .await;
    assert_eq!(number_of(&next_response(&mut responses).await.unwrap()), 0);
    drop(responses);
    streamer.expect_cancel("numbers-2").await;
}

/// A subscription query opened on n1 whose handler is on n3: the initial result and the updates
/// cross the link within the subscriber's permits, the handler's completion ends it; a
/// subscriber that leaves makes the node tell the handler on n3 to unsubscribe.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[allow(deprecated)] // get_initial_result
async fn a_subscription_query_gets_its_updates_from_a_handler_on_another_node() {
    let cluster = Cluster::start(3, &[]).await;
    let mut handler = Handler::connect(&cluster.nodes[2], "prices", &["WatchPrice"], 10).await;
    tokio::time::sleep(PROPAGATION).await;

    let (tx, rx) = mpsc::channel(16);
    let mut updates = client(&cluster.nodes[0])
        .await
        .subscription(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let send = |request: SubRequest| {
        let tx = tx.clone();
        async move {
            tx.send(SubscriptionQueryRequest { request: Some(request) })
                .await
                .unwrap()
        }
    };
    send(SubRequest::Subscribe(subscription_query("sub-1", 0))).await;
    send(SubRequest::FlowControl(subscription_query("sub-1", 2))).await;
    send(SubRequest::GetInitialResult(subscription_query("sub-1", 0))).await;
    let (mut subscribed, mut asked) = (false, false);
    while !(subscribed && asked) {
        match handler.next().await.request {
            Some(Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest { request })) => match request {
                Some(SubRequest::Subscribe(s)) if s.subscription_identifier == "sub-1" => subscribed = true,
                Some(SubRequest::GetInitialResult(s)) if s.subscription_identifier == "sub-1" => asked = true,
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }
    let respond = |response: SubResponse| {
        Outbound::SubscriptionQueryResponse(SubscriptionQueryResponse {
            message_identifier: "m".into(),
            subscription_identifier: "sub-1".into(),
            response: Some(response),
        })
    };
    let initial = QueryResponse {
        message_identifier: "initial".into(),
        payload: payload(b"price=10"),
        request_identifier: "sub-1-query".into(),
        ..Default::default()
    };
    handler.send(respond(SubResponse::InitialResult(initial)), "").await;
    for price in 11..=14 {
        let update = QueryUpdate {
            message_identifier: format!("u{price}"),
            payload: payload(format!("price={price}").as_bytes()),
            ..Default::default()
        };
        handler.send(respond(SubResponse::Update(update)), "").await;
    }
    let complete = QueryUpdateComplete {
        client_id: "prices-client".into(),
        component_name: "prices".into(),
    };
    handler.send(respond(SubResponse::Complete(complete)), "").await;

    assert_eq!(
        next_updates(&mut updates, 3).await,
        ["initial price=10", "update price=11", "update price=12"]
    );
    let early = tokio::time::timeout(Duration::from_millis(400), updates.message()).await;
    assert!(early.is_err(), "an update arrived without a permit: {early:?}");
    send(SubRequest::FlowControl(subscription_query("sub-1", 5))).await;
    assert_eq!(
        next_updates(&mut updates, 3).await,
        ["update price=13", "update price=14", "complete"]
    );

    // A second subscription; the subscriber's application goes away: n3's handler hears it.
    send(SubRequest::Subscribe(subscription_query("sub-2", 0))).await;
    match handler.next().await.request {
        Some(Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest {
            request: Some(SubRequest::Subscribe(s)),
        })) => assert_eq!(s.subscription_identifier, "sub-2"),
        other => panic!("expected the subscribe of sub-2, got {other:?}"),
    }
    drop(tx);
    drop(updates);
    match handler.next().await.request {
        Some(Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest {
            request: Some(SubRequest::Unsubscribe(s)),
        })) => assert_eq!(s.subscription_identifier, "sub-2"),
        other => panic!("expected the unsubscribe of sub-2, got {other:?}"),
    }
}

/// The next `n` messages of a subscription query, each as "initial DATA", "update DATA" or
/// "complete".
async fn next_updates(updates: &mut tonic::Streaming<SubscriptionQueryResponse>, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..n {
        let next = tokio::time::timeout(WAIT, updates.message())
            .await
            .expect("the subscriber waited too long")
            .unwrap()
            .expect("the subscription ended");
        let payload = |p: &Option<myelin_proto::axon::SerializedObject>| {
            String::from_utf8_lossy(&p.as_ref().unwrap().data).into_owned()
        };
        got.push(match &next.response {
            Some(SubResponse::InitialResult(r)) => format!("initial {}", payload(&r.payload)),
            Some(SubResponse::Update(u)) => format!("update {}", payload(&u.payload)),
            Some(SubResponse::Complete(_)) => "complete".to_owned(),
            other => format!("{other:?}"),
        });
    }
    got
}

/// The node of a handler that holds a query dies: the query does not hang, it completes with
/// the other component's answer, and later queries reach the handlers that remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_node_killed_mid_query_does_not_hang_it() {
    let mut cluster = Cluster::start(3, &[]).await;
    let mut doomed = Handler::connect(&cluster.nodes[1], "doomed", &["Fragile"], 10).await;
    let survivor = Handler::connect(&cluster.nodes[2], "survivor", &["Fragile"], 10).await;
    let _serving = survivor.serve("n3");
    tokio::time::sleep(PROPAGATION).await;

    // Default timeout (300 s): only the handler's node going away can end this query.
    let url = cluster.nodes[0].url();
    let dispatcher = tokio::spawn(dispatch_at(url, query("fragile-1", "Fragile", None)));
    assert_eq!(doomed.next_query().await.message_identifier, "fragile-1");
    let killed_at = Instant::now();
    cluster.nodes[1].crash();
    let responses = tokio::time::timeout(Duration::from_secs(15), dispatcher)
        .await
        .expect("the query hung after its handler's node died")
        .unwrap();
    eprintln!(
        "the query ended {:?} after the handler's node died",
        killed_at.elapsed()
    );
    assert_eq!(responses.iter().map(text).collect::<Vec<_>>(), ["survivor:n3"]);
    let responses = dispatch(&cluster.nodes[0], query("fragile-2", "Fragile", None)).await;
    assert_eq!(responses.iter().map(text).collect::<Vec<_>>(), ["survivor:n3"]);
}
