//! Query routing between separate client applications (each its own gRPC connection) through a
//! real node: scatter-gather, no handler, timeouts, handlers that vanish, permits, duplicate ids,
//! subscription queries, streaming queries (demand-driven permits, cancels, floods) and the
//! TIMEOUT of queries that waited for permits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use myelin_proto::axon::query::query_provider_inbound::Request as Inbound;
use myelin_proto::axon::query::query_provider_outbound::Request as Outbound;
use myelin_proto::axon::query::subscription_query_request::Request as SubRequest;
use myelin_proto::axon::query::subscription_query_response::Response as SubResponse;
use myelin_proto::axon::query::{
    QueryProviderOutbound, QueryRequest, QueryResponse, QuerySubscription, QueryUpdate, QueryUpdateComplete,
    SubscriptionQueryRequest, SubscriptionQueryResponse,
};
use myelin_proto::axon::{ProcessingKey, SerializedObject};
use myelin_tests::query_apps::*;
use myelin_tests::{Node, Options};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scatter_gather_gets_one_response_per_component() {
    let node = Node::start(Options::default()).await;
    let a1 = Handler::connect(&node, "inventory", &["CountStock"], 100).await;
    let a2 = Handler::connect(&node, "inventory", &["CountStock"], 100).await;
    let b = Handler::connect(&node, "warehouse", &["CountStock"], 100).await;
    let _serving = [a1.serve("1"), a2.serve("2"), b.serve("1")];

    let mut inventory_instances = Vec::new();
    for round in 0..4 {
        let request = query(&format!("q{round}"), "CountStock", None);
        let responses = dispatch(&node, request.clone()).await;
        let mut texts: Vec<String> = responses.iter().map(text).collect();
        texts.sort();
        assert_eq!(texts.len(), 2, "one response per component: {texts:?}");
        assert!(texts[0].starts_with("inventory:"), "{texts:?}");
        assert_eq!(texts[1], "warehouse:1");
        inventory_instances.push(texts[0].clone());
        for response in &responses {
            assert!(response.error_code.is_empty(), "{response:?}");
            assert_eq!(response.request_identifier, request.message_identifier);
            assert_eq!(response.meta_data, request.meta_data, "metadata relayed unchanged");
        }
    }
    // Round-robin among the two instances of one component.
    assert_eq!(
        inventory_instances,
        ["inventory:1", "inventory:2", "inventory:1", "inventory:2"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_handler_is_an_in_band_axoniq_5000() {
    let node = Node::start(Options::default()).await;
    let responses = dispatch(&node, query("lonely", "NobodyAnswers", None)).await;
    assert_eq!(responses.len(), 1, "{responses:?}");
    let response = &responses[0];
    assert_eq!(response.error_code, "AXONIQ-5000");
    assert_eq!(response.request_identifier, "lonely");
    let error = response.error_message.as_ref().unwrap();
    assert_eq!(error.message, "No handler for query: NobodyAnswers");
    assert_eq!(error.error_code, "AXONIQ-5000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_never_completes_times_out_with_axoniq_5006() {
    let node = Node::start(Options::default()).await;
    let mut silent = Handler::connect(&node, "silent", &["Slow"], 10).await;
    let started = Instant::now();
    let dispatcher = tokio::spawn(dispatch_at(node.url(), query("slow-1", "Slow", Some(500))));
    let received = silent.next_query().await;
    assert_eq!(received.message_identifier, "slow-1");
    let responses = tokio::time::timeout(WAIT, dispatcher).await.unwrap().unwrap();
    let elapsed = started.elapsed();
    assert_eq!(responses.len(), 1, "{responses:?}");
    assert_eq!(responses[0].error_code, "AXONIQ-5006");
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    // The handler is told to stop working on it.
    match silent.next().await.request {
        Some(Inbound::QueryCancel(reference)) => assert_eq!(reference.request_id, "slow-1"),
        other => panic!("expected query_cancel, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_disconnecting_mid_query_does_not_hang_it() {
    let node = Node::start(Options::default()).await;
    let mut doomed = Handler::connect(&node, "doomed", &["Fragile"], 10).await;
    let survivor = Handler::connect(&node, "survivor", &["Fragile"], 10).await;
    let _serving = survivor.serve("1");
    let url = node.url();
    // Default timeout (300 s): only the handler leaving can end this query.
    let dispatcher = tokio::spawn(dispatch_at(url, query("fragile-1", "Fragile", None)));
    let received = doomed.next_query().await;
    assert_eq!(received.message_identifier, "fragile-1");
    drop(doomed); // the whole application goes away: stream and connection
    let responses = tokio::time::timeout(WAIT, dispatcher)
        .await
        .expect("the query hung after its handler left")
        .unwrap();
    assert_eq!(responses.iter().map(text).collect::<Vec<_>>(), ["survivor:1"]);

    // Later queries go to the survivor only and still complete.
    let responses = dispatch(&node, query("fragile-2", "Fragile", None)).await;
    assert_eq!(responses.iter().map(text).collect::<Vec<_>>(), ["survivor:1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_wait_for_the_handlers_permits() {
    let node = Node::start(Options::default()).await;
    let mut handler = Handler::connect(&node, "frugal", &["Counted"], 1).await;
    let mut dispatchers = Vec::new();
    for i in 0..3 {
        let url = node.url();
        dispatchers.push(tokio::spawn(dispatch_at(
            url,
            query(&format!("counted-{i}"), "Counted", None),
        )));
    }
    let first = handler.next_query().await;
    handler.quiet(Duration::from_millis(400)).await;
    handler.grant(2).await;
    let second = handler.next_query().await;
    let third = handler.next_query().await;
    handler.quiet(Duration::from_millis(200)).await;
    for query in [&first, &second, &third] {
        handler.answer(query, b"ok").await;
        handler.complete(query).await;
    }
    for dispatcher in dispatchers {
        let responses = tokio::time::timeout(WAIT, dispatcher).await.unwrap().unwrap();
        assert_eq!(responses.iter().map(text).collect::<Vec<_>>(), ["ok"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_subscribe_is_nacked_and_the_stream_stays_up() {
    let node = Node::start(Options::default()).await;
    let mut handler = Handler::connect(&node, "careless", &[], 10).await;
    let ack = handler.subscribe("").await;
    assert!(!ack.success);
    assert_eq!(ack.error.unwrap().error_code, "AXONIQ-1002");
    assert!(handler.subscribe("Fine").await.success);
    // A response and a completion for a query it never got are ignored.
    let stranger = query("never-sent", "Fine", None);
    handler.answer(&stranger, b"stray").await;
    handler.complete(&stranger).await;
    // An unknown kind of message is refused, the stream stays up.
    handler
        .tx
        .send(QueryProviderOutbound {
            request: None,
            instruction_id: "empty".into(),
        })
        .await
        .unwrap();
    match handler.next().await.request {
        Some(Inbound::Ack(ack)) => assert!(!ack.success && ack.instruction_id == "empty", "{ack:?}"),
        other => panic!("expected an ack, got {other:?}"),
    }
    let _serving = handler.serve("1");
    let responses = dispatch(&node, query("fine-1", "Fine", None)).await;
    assert_eq!(responses.iter().map(text).collect::<Vec<_>>(), ["careless:1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_query_id_in_flight_is_axoniq_5007() {
    let node = Node::start(Options::default()).await;
    let mut handler = Handler::connect(&node, "holder", &["Held"], 10).await;
    let url = node.url();
    let first = tokio::spawn(dispatch_at(url, query("same-id", "Held", None)));
    let held = handler.next_query().await;
    let duplicate = dispatch(&node, query("same-id", "Held", None)).await;
    assert_eq!(duplicate.len(), 1);
    assert_eq!(duplicate[0].error_code, "AXONIQ-5007");
    handler.answer(&held, b"first").await;
    handler.complete(&held).await;
    let responses = tokio::time::timeout(WAIT, first).await.unwrap().unwrap();
    assert_eq!(responses.iter().map(text).collect::<Vec<_>>(), ["first"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(deprecated)] // get_initial_result
async fn subscription_query_gets_initial_result_then_updates_within_permits() {
    let node = Node::start(Options::default()).await;
    let mut handler = Handler::connect(&node, "prices", &["WatchPrice"], 10).await;

    let (tx, rx) = mpsc::channel(16);
    let mut updates = client(&node)
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

    let respond = |response: SubResponse| SubscriptionQueryResponse {
        message_identifier: "m".into(),
        subscription_identifier: "sub-1".into(),
        response: Some(response),
    };
    let mut got_initial_request = false;
    let mut got_subscribe = false;
    while !(got_initial_request && got_subscribe) {
        match handler.next().await.request {
            Some(Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest { request })) => match request {
                Some(SubRequest::Subscribe(s)) => {
                    assert_eq!(s.subscription_identifier, "sub-1");
                    got_subscribe = true;
                }
                Some(SubRequest::GetInitialResult(s)) => {
                    assert_eq!(s.subscription_identifier, "sub-1");
                    got_initial_request = true;
                }
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }
    let initial = QueryResponse {
        message_identifier: "initial".into(),
        payload: payload(b"price=10"),
        request_identifier: "sub-1-query".into(),
        ..Default::default()
    };
    handler
        .send(
            Outbound::SubscriptionQueryResponse(respond(SubResponse::InitialResult(initial))),
            "",
        )
        .await;
    for price in 11..=14 {
        let update = QueryUpdate {
            message_identifier: format!("u{price}"),
            payload: payload(format!("price={price}").as_bytes()),
            ..Default::default()
        };
        handler
            .send(
                Outbound::SubscriptionQueryResponse(respond(SubResponse::Update(update))),
                "",
            )
            .await;
    }
    let complete = QueryUpdateComplete {
        client_id: "prices-client".into(),
        component_name: "prices".into(),
    };
    handler
        .send(
            Outbound::SubscriptionQueryResponse(respond(SubResponse::Complete(complete))),
            "",
        )
        .await;

    let mut next = async || {
        tokio::time::timeout(WAIT, updates.message())
            .await
            .expect("subscriber waited too long")
            .unwrap()
            .expect("subscription ended")
    };
    let data = |response: &SubscriptionQueryResponse| match &response.response {
        Some(SubResponse::InitialResult(r)) => {
            format!("initial {}", String::from_utf8_lossy(&r.payload.as_ref().unwrap().data))
        }
        Some(SubResponse::Update(u)) => {
            format!("update {}", String::from_utf8_lossy(&u.payload.as_ref().unwrap().data))
        }
        Some(SubResponse::Complete(_)) => "complete".to_owned(),
        other => format!("{other:?}"),
    };
    assert_eq!(data(&next().await), "initial price=10");
    assert_eq!(data(&next().await), "update price=11");
    assert_eq!(data(&next().await), "update price=12");
    // Two permits used: the rest waits.
    let early = tokio::time::timeout(Duration::from_millis(400), updates.message()).await;
    assert!(early.is_err(), "an update arrived without a permit: {early:?}");
    send(SubRequest::FlowControl(subscription_query("sub-1", 5))).await;
    let mut next = async || {
        tokio::time::timeout(WAIT, updates.message())
            .await
            .expect("subscriber waited too long")
            .unwrap()
            .expect("subscription ended")
    };
    assert_eq!(data(&next().await), "update price=13");
    assert_eq!(data(&next().await), "update price=14");
    assert_eq!(data(&next().await), "complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_leaving_unsubscribes_its_handlers() {
    let node = Node::start(Options::default()).await;
    let mut first = Handler::connect(&node, "prices", &["WatchPrice"], 10).await;
    let (tx, rx) = mpsc::channel(16);
    let _updates = client(&node)
        .await
        .subscription(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(SubscriptionQueryRequest {
        request: Some(SubRequest::Subscribe(subscription_query("sub-2", 0))),
    })
    .await
    .unwrap();
    assert!(matches!(
        first.next().await.request,
        Some(Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest {
            request: Some(SubRequest::Subscribe(_))
        }))
    ));
    // A handler that subscribes later joins the open subscription.
    let mut late = Handler::connect(&node, "prices-replica", &[], 10).await;
    late.next_instruction += 1;
    let subscription = QuerySubscription {
        message_id: "late".into(),
        query: "WatchPrice".into(),
        component_name: "prices-replica".into(),
        ..Default::default()
    };
    late.send(Outbound::Subscribe(subscription), "late-1").await;
    let mut saw_subscribe = false;
    for _ in 0..2 {
        if let Some(Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest {
            request: Some(SubRequest::Subscribe(s)),
        })) = late.next().await.request
        {
            assert_eq!(s.subscription_identifier, "sub-2");
            saw_subscribe = true;
        }
    }
    assert!(saw_subscribe);
    drop(tx); // the subscriber half-closes
    for handler in [&mut first, &mut late] {
        match handler.next().await.request {
            Some(Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest {
                request: Some(SubRequest::Unsubscribe(s)),
            })) => assert_eq!(s.subscription_identifier, "sub-2"),
            other => panic!("expected unsubscribe, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_query_without_handler_fails_with_axoniq_5000() {
    let node = Node::start(Options::default()).await;
    let (tx, rx) = mpsc::channel(4);
    let mut updates = client(&node)
        .await
        .subscription(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(SubscriptionQueryRequest {
        request: Some(SubRequest::Subscribe(subscription_query("sub-none", 10))),
    })
    .await
    .unwrap();
    let status = tokio::time::timeout(WAIT, updates.message())
        .await
        .unwrap()
        .expect_err("no handler must fail the call");
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(status.metadata().get("axoniq-errorcode").unwrap(), "AXONIQ-5000");
}

// ---------------------------------------------------------------------------------------------
// Streaming queries and queue deadlines.

/// Responses big enough that HTTP/2's flow-control windows hold only a few of them.
const BIG: usize = 16 * 1024;
/// How far the node may let a handler's permits run ahead of what the dispatcher read: the
/// router's own window (16 responses) plus what tonic and HTTP/2 buffer for 16 KiB responses in
/// 64 KiB windows (a few responses; 24 is generous). Without demand-driven permits the handler
/// of `streaming_query_follows_the_dispatchers_demand` would get all 100 at once.
const AHEAD: u64 = 16 + 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_query_follows_the_dispatchers_demand() {
    const TOTAL: u64 = 100;
    let node = Node::start(Options::default()).await;
    let mut streamer = Handler::connect(&node, "streamer", &["Numbers"], 10).await;
    let mut bystander = Handler::connect(&node, "bystander", &["Numbers"], 10).await;

    let mut responses = small_window_client(&node)
        .await
        .query(streaming_query("numbers-1", "Numbers", Some(60_000)))
        .await
        .unwrap()
        .into_inner();

    // Both components get the query, marked as streamed by the server.
    let received = streamer.next_query().await;
    assert_eq!(flag(&received, ProcessingKey::ServerSupportsStreaming), [true]);
    let seen = bystander.next_query().await;
    assert_eq!(seen.message_identifier, "numbers-1");

    // The streamer answers within its permits only, and notes how far the permits ran ahead of
    // what the dispatcher had read.
    let read = Arc::new(AtomicU64::new(0));
    let streaming = {
        let read = read.clone();
        tokio::spawn(async move {
            let mut seen = StreamedBy::default();
            while seen.sent < TOTAL {
                match streamer.next().await.request {
                    Some(Inbound::QueryFlowControl(flow)) => {
                        assert_eq!(flow.query_reference.unwrap().request_id, "numbers-1");
                        assert!(flow.permits > 0, "{}", flow.permits);
                        seen.granted += flow.permits as u64;
                        let ahead = seen.granted.saturating_sub(read.load(Ordering::SeqCst));
                        seen.most_ahead = seen.most_ahead.max(ahead);
                    }
                    other => panic!("unexpected message for the streamer: {other:?}"),
                }
                while seen.sent < seen.granted.min(TOTAL) {
                    let response = numbered(&received, seen.sent, BIG);
                    streamer.send(Outbound::QueryResponse(response), "").await;
                    seen.sent += 1;
                }
            }
            streamer.complete(&received).await;
            // Grants already on their way may still come; nothing else (no query_cancel).
            while let Ok(message) = tokio::time::timeout(Duration::from_millis(300), streamer.rx.message()).await {
                let message = message.unwrap().expect("the streamer's stream ended");
                assert!(
                    matches!(message.request, Some(Inbound::QueryFlowControl(_))),
                    "after completion: {message:?}"
                );
            }
            seen
        })
    };

    // The bystander is cancelled once the streamer answered.
    bystander.expect_cancel("numbers-1").await;

    let mut numbers = Vec::new();
    for _ in 0..5 {
        numbers.push(number_of(&next_response(&mut responses).await.unwrap()));
        read.fetch_add(1, Ordering::SeqCst);
    }
    // The dispatcher stops reading for a while: the handler is not asked for everything.
    tokio::time::sleep(Duration::from_millis(800)).await;
    while let Some(response) = next_response(&mut responses).await {
        assert!(response.error_code.is_empty(), "{response:?}");
        numbers.push(number_of(&response));
        read.fetch_add(1, Ordering::SeqCst);
    }
    assert_eq!(numbers, (0..TOTAL).collect::<Vec<_>>(), "all responses, in order");

    let seen = tokio::time::timeout(WAIT, streaming).await.unwrap().unwrap();
    assert_eq!(seen.sent, TOTAL);
    assert!(seen.granted >= TOTAL, "{seen:?}");
    assert!(
        seen.most_ahead <= AHEAD,
        "permits ran {} ahead of what the dispatcher read: {seen:?}",
        seen.most_ahead
    );
    bystander.quiet(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_cancel_reaches_the_streaming_handler() {
    let node = Node::start(Options::default()).await;
    let mut handler = Handler::connect(&node, "endless", &["Ticks"], 10).await;
    let mut responses = client(&node)
        .await
        .query(streaming_query("ticks-1", "Ticks", None))
        .await
        .unwrap()
        .into_inner();
    let received = handler.next_query().await;
    handler.answer(&received, b"tick").await;
    assert_eq!(text(&next_response(&mut responses).await.unwrap()), "tick");
    drop(responses); // the dispatcher cancels its call
    handler.expect_cancel("ticks-1").await;

    // The handler still serves.
    let _serving = handler.serve("1");
    let answers = dispatch(&node, query("ticks-2", "Ticks", None)).await;
    assert_eq!(answers.iter().map(text).collect::<Vec<_>>(), ["endless:1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_handler_that_floods_is_stopped_and_the_node_carries_on() {
    let node = Node::start(Options::default()).await;
    let mut flood = Handler::connect(&node, "flood", &["Flood"], 10).await;
    let mut responses = small_window_client(&node)
        .await
        .query(streaming_query("flood-1", "Flood", None))
        .await
        .unwrap()
        .into_inner();
    let received = flood.next_query().await;
    // Far more than it was granted, without waiting for permits.
    for n in 0..300 {
        flood
            .send(Outbound::QueryResponse(numbered(&received, n, BIG)), "")
            .await;
    }
    flood.expect_cancel("flood-1").await;

    let mut numbers = Vec::new();
    let last = loop {
        let response = next_response(&mut responses).await.expect("an error before the end");
        if !response.error_code.is_empty() {
            break response;
        }
        numbers.push(number_of(&response));
    };
    assert_eq!(last.error_code, "AXONIQ-1900", "{last:?}");
    assert!(next_response(&mut responses).await.is_none());
    assert!(numbers.len() < 300, "{} responses relayed", numbers.len());
    assert_eq!(
        numbers,
        (0..numbers.len() as u64).collect::<Vec<_>>(),
        "in order until the end"
    );

    // The same handler (its stream is still up) and the node serve the next query.
    flood.quiet(Duration::from_millis(200)).await;
    let _serving = flood.serve("1");
    let answers = dispatch(&node, query("flood-2", "Flood", None)).await;
    assert_eq!(answers.iter().map(text).collect::<Vec<_>>(), ["flood:1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_that_waited_for_permits_carries_the_time_it_has_left() {
    let node = Node::start(Options::default()).await;
    let mut handler = Handler::connect(&node, "busy", &["Patient"], 0).await;
    // Connected beforehand, so the query reaches the node at once and then waits there.
    let dispatcher = client(&node).await;
    let dispatcher = tokio::spawn(dispatch_on(dispatcher, query("patient-1", "Patient", Some(5_000))));
    handler.quiet(Duration::from_millis(500)).await; // no permit: it waits in the node
    handler.grant(1).await;
    let waited = handler.next_query().await;
    let left = timeouts(&waited);
    assert_eq!(left.len(), 1, "one TIMEOUT instruction: {left:?}");
    assert!(
        left[0] > 0 && left[0] <= 4_800,
        "TIMEOUT after about 500 ms in the queue: {left:?}"
    );
    assert_eq!(flag(&waited, ProcessingKey::ServerSupportsStreaming), [false]);
    handler.answer(&waited, b"late but fine").await;
    handler.complete(&waited).await;
    let answers = tokio::time::timeout(WAIT, dispatcher).await.unwrap().unwrap();
    assert_eq!(answers.iter().map(text).collect::<Vec<_>>(), ["late but fine"]);

    // With a permit waiting for it, the query goes out at once with (up to the node's
    // scheduling, well under the 100 ms allowed here) the dispatcher's own TIMEOUT. The ack of
    // a later instruction on the same stream shows the node has taken the permit.
    handler.grant(1).await;
    assert!(handler.subscribe("Unrelated").await.success);
    let dispatcher = tokio::spawn(dispatch_at(node.url(), query("patient-2", "Patient", Some(5_000))));
    let prompt = handler.next_query().await;
    let left = timeouts(&prompt);
    assert!(left.len() == 1 && left[0] > 4_900, "{left:?}");
    handler.complete(&prompt).await;
    tokio::time::timeout(WAIT, dispatcher).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_queued_past_its_deadline_fails_with_axoniq_5006_and_is_never_sent() {
    let node = Node::start(Options::default()).await;
    let mut handler = Handler::connect(&node, "stuck", &["Stuck"], 0).await;

    // Streaming: no overall deadline, but the wait for a permit is bounded by TIMEOUT.
    let started = Instant::now();
    let mut responses = client(&node)
        .await
        .query(streaming_query("stuck-1", "Stuck", Some(300)))
        .await
        .unwrap()
        .into_inner();
    let expired = next_response(&mut responses).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(expired.error_code, "AXONIQ-5006", "{expired:?}");
    assert_eq!(expired.request_identifier, "stuck-1");
    let message = expired.error_message.unwrap().message;
    assert!(message.starts_with("Timeout for message: stuck-1 - "), "{message}");
    assert!(next_response(&mut responses).await.is_none());

    // Plain: the query ends at its deadline too.
    let plain = dispatch(&node, query("stuck-2", "Stuck", Some(300))).await;
    assert_eq!(
        plain.iter().map(|r| r.error_code.as_str()).collect::<Vec<_>>(),
        ["AXONIQ-5006"]
    );

    // Permits come too late: neither query is delivered, the next one is.
    handler.grant(5).await;
    handler.quiet(Duration::from_millis(300)).await;
    let _serving = handler.serve("1");
    let answers = dispatch(&node, query("stuck-3", "Stuck", None)).await;
    assert_eq!(answers.iter().map(text).collect::<Vec<_>>(), ["stuck:1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_are_matched_by_query_name_not_result_type() {
    let node = Node::start(Options::default()).await;
    let mut listy = Handler::connect(&node, "listy", &[], 10).await;
    assert!(listy.subscribe_as("Typed", "java.util.List").await.success);
    let mut stringy = Handler::connect(&node, "stringy", &[], 10).await;
    assert!(stringy.subscribe_as("Typed", "java.lang.String").await.success);
    let _serving = [listy.serve("1"), stringy.serve("1")];
    #[allow(deprecated)]
    let typed = QueryRequest {
        response_type: Some(SerializedObject {
            r#type: "java.lang.String".into(),
            ..Default::default()
        }),
        ..query("typed-1", "Typed", None)
    };
    let mut texts: Vec<String> = dispatch(&node, typed).await.iter().map(text).collect();
    texts.sort();
    assert_eq!(texts, ["listy:1", "stringy:1"]);
}
