//! Command routing through the real node: handler applications and a dispatcher, each on its own
//! gRPC connection (as separate client applications would be), against `CommandService`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use myelin_proto::axon::command::command_provider_outbound::Request as Outbound;
use myelin_proto::axon::command::{CommandProviderOutbound, CommandResponse};
use myelin_proto::axon::meta_data_value::Data;
use myelin_proto::axon::{MetaDataValue, ProcessingInstruction, ProcessingKey};
use myelin_tests::command_apps::{Handler, command, connect, dispatch, handled_by, id, subscribe};
use myelin_tests::{Node, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_handler_is_an_in_band_error_and_contexts_are_separate() {
    let node = Node::start(Options::default()).await;
    let _other = Handler::start(&node, "other", "other-app", &["Nope"], 0, 10, true).await;
    let dispatcher = connect(&node).await;
    let id = id();
    let response = dispatch(&dispatcher, command("Nope", &id, None)).await;
    assert_eq!(response.error_code, "AXONIQ-4000");
    assert_eq!(response.request_identifier, id);
    let error = response.error_message.unwrap();
    assert_eq!(error.message, "No Handler for command: Nope");
    assert_eq!(error.error_code, "AXONIQ-4000");
    assert_eq!(error.location, "AxonServer");

    // The handler in context `other` serves dispatches that name `other`.
    let mut request = tonic::Request::new(command("Nope", &self::id(), None));
    request
        .metadata_mut()
        .insert("axoniq-context", "other".parse().unwrap());
    let response = dispatcher.clone().dispatch(request).await.unwrap().into_inner();
    assert_eq!(handled_by(&response), "other-app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_stickiness_and_spread_by_load_factor() {
    let node = Node::start(Options::default()).await;
    let _light = Handler::start(&node, "default", "light", &["Order"], 100, 1_000_000, true).await;
    let _heavy = Handler::start(&node, "default", "heavy", &["Order"], 300, 1_000_000, true).await;
    let bystander = Handler::start(&node, "default", "bystander", &["Other"], 100, 1_000_000, true).await;
    let dispatcher = connect(&node).await;

    // Round trip: payload and metadata arrive unchanged, the response comes back unchanged.
    let sent = command("Order", "round-trip-1", Some("order-1"));
    let response = dispatch(&dispatcher, sent.clone()).await;
    assert_eq!(response.request_identifier, "round-trip-1");
    assert_eq!(response.payload, sent.payload);
    assert_eq!(response.message_identifier, "resp-round-trip-1");
    let first_owner = handled_by(&response);

    let keys: Vec<String> = (0..2000).map(|i| format!("order-{i}")).collect();
    let run = |keys: Vec<String>| {
        let dispatcher = dispatcher.clone();
        async move {
            futures::stream::iter(keys)
                .map(|key| {
                    let dispatcher = dispatcher.clone();
                    async move {
                        let response = dispatch(&dispatcher, command("Order", &id(), Some(&key))).await;
                        (key, handled_by(&response))
                    }
                })
                .buffer_unordered(64)
                .collect::<HashMap<String, String>>()
                .await
        }
    };
    let first = run(keys.clone()).await;
    let again = run(keys.clone()).await;
    assert_eq!(first, again, "the same routing key must reach the same handler");
    assert_eq!(first["order-1"], first_owner);
    let heavy_share = first.values().filter(|h| *h == "heavy").count() as f64 / first.len() as f64;
    assert!(first.values().all(|h| h == "heavy" || h == "light"));
    assert!(
        (0.6..=0.9).contains(&heavy_share),
        "load factor 300 vs 100 got a share of {heavy_share}"
    );

    // The handler of another command name saw none of them.
    let mut bystander = bystander;
    assert!(bystander.next_command(Duration::from_millis(100)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_bound_what_a_handler_receives() {
    let node = Node::start(Options::default()).await;
    let mut handler = Handler::start(&node, "default", "slow", &["Job"], 0, 2, false).await;
    let dispatcher = connect(&node).await;
    let calls: Vec<_> = (0..5)
        .map(|i| {
            let dispatcher = dispatcher.clone();
            tokio::spawn(async move { dispatch(&dispatcher, command("Job", &format!("job-{i}-{}", id()), None)).await })
        })
        .collect();
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(
            handler
                .next_command(Duration::from_secs(5))
                .await
                .expect("a command within the permits"),
        );
    }
    assert!(
        handler.next_command(Duration::from_millis(500)).await.is_none(),
        "sent a third command with 2 permits"
    );
    handler.grant(1).await;
    got.push(
        handler
            .next_command(Duration::from_secs(5))
            .await
            .expect("the granted third command"),
    );
    assert!(
        handler.next_command(Duration::from_millis(300)).await.is_none(),
        "sent beyond the granted permit"
    );
    handler.grant(10).await;
    for _ in 0..2 {
        got.push(handler.next_command(Duration::from_secs(5)).await.unwrap());
    }
    for command in &got {
        handler.reply(command).await;
    }
    for call in calls {
        assert_eq!(handled_by(&call.await.unwrap()), "slow");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_handler_fails_its_commands_fast_and_survivors_take_over() {
    let node = Node::start(Options::default()).await;
    // The victim takes 3 commands and never answers; more of its share wait in its queue.
    let mut victim = Handler::start(&node, "default", "victim", &["Ship"], 100, 3, false).await;
    let _survivor = Handler::start(&node, "default", "survivor", &["Ship"], 100, 1_000_000, true).await;
    let dispatcher = connect(&node).await;
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let dispatcher = dispatcher.clone();
            let id = format!("ship-{i}-{}", id());
            tokio::spawn(async move {
                let response = dispatch(&dispatcher, command("Ship", &id, Some(&format!("parcel-{i}")))).await;
                (id, response, Instant::now())
            })
        })
        .collect();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            victim
                .next_command(Duration::from_secs(10))
                .await
                .expect("victim gets commands")
                .message_identifier,
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // the others are answered or queued
    let killed_at = Instant::now();
    victim.kill();
    let mut lost = 0;
    for call in calls {
        let (id, response, done) = call.await.unwrap();
        if held.contains(&id) {
            assert_eq!(response.error_code, "AXONIQ-4001", "{response:?}");
            assert_eq!(response.request_identifier, id);
            assert_eq!(
                response.error_message.unwrap().message,
                "Connection lost while executing command on: victim"
            );
            assert!(done.duration_since(killed_at) < Duration::from_secs(5), "failed fast");
            lost += 1;
        } else {
            // Answered by the survivor, including the victim's queued-but-unsent share.
            assert_eq!(handled_by(&response), "survivor");
        }
    }
    assert_eq!(lost, 3);
    for i in 0..40 {
        let response = dispatch(&dispatcher, command("Ship", &id(), Some(&format!("parcel-{i}")))).await;
        assert_eq!(handled_by(&response), "survivor");
    }
}

/// A client asked to reconnect drops its only handler and subscribes again on its new
/// connection a moment later: a command sent in between waits for it (up to 3 s after the
/// handler left) and is answered by the returning handler, not failed with "no handler". Once
/// the window has passed with no handler back, a command fails with AXONIQ-4000 as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_waits_for_its_handler_to_come_back_from_a_reconnect() {
    let node = Node::start(Options::default()).await;
    let dispatcher = connect(&node).await;
    let first = Handler::start(&node, "default", "returning", &["Hold"], 100, 100, true).await;
    assert_eq!(
        handled_by(&dispatch(&dispatcher, command("Hold", &id(), None)).await),
        "returning"
    );
    first.kill();
    // The node has seen the handler go once a command no longer reaches it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    let waiting = tokio::spawn({
        let dispatcher = dispatcher.clone();
        async move { dispatch(&dispatcher, command("Hold", &id(), None)).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _back = Handler::start(&node, "default", "returning-again", &["Hold"], 100, 100, true).await;
    let response = waiting.await.unwrap();
    eprintln!("held {:?} until the handler came back: {response:?}", sent.elapsed());
    assert_eq!(handled_by(&response), "returning-again", "{response:?}");

    // Gone for longer than the window: no handler, after the window.
    let gone = Handler::start(&node, "default", "leaving", &["Gone"], 100, 100, true).await;
    gone.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    let response = dispatch(&dispatcher, command("Gone", &id(), None)).await;
    let waited = sent.elapsed();
    eprintln!("no handler after {waited:?}");
    assert_eq!(response.error_code, "AXONIQ-4000", "{response:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    let response = dispatch(&dispatcher, command("Gone", &id(), None)).await;
    assert_eq!(response.error_code, "AXONIQ-4000", "{response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_duplicates_and_bad_input() {
    let node = Node::start(Options::default()).await;
    let mut handler = Handler::start(&node, "default", "mute", &["Mute"], 0, 100, false).await;
    let dispatcher = connect(&node).await;

    // TIMEOUT instruction (ms): no answer in time is AXONIQ-4002.
    let mut timed = command("Mute", "timed-1", None);
    timed.processing_instructions.push(ProcessingInstruction {
        key: ProcessingKey::Timeout as i32,
        value: Some(MetaDataValue {
            data: Some(Data::NumberValue(300)),
        }),
    });
    let started = Instant::now();
    let response = dispatch(&dispatcher, timed).await;
    assert_eq!(response.error_code, "AXONIQ-4002");
    assert_eq!(
        response.error_message.unwrap().message,
        "Cancelled by AxonServer due to timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let late = handler.next_command(Duration::from_secs(1)).await.unwrap();
    handler.reply(&late).await; // a late answer is ignored

    // A second dispatch with an id still in flight is AXONIQ-4005.
    let first = tokio::spawn({
        let dispatcher = dispatcher.clone();
        async move { dispatch(&dispatcher, command("Mute", "dup-1", None)).await }
    });
    let held = handler.next_command(Duration::from_secs(5)).await.unwrap();
    let duplicate = dispatch(&dispatcher, command("Mute", "dup-1", None)).await;
    assert_eq!(duplicate.error_code, "AXONIQ-4005");
    assert_eq!(duplicate.error_message.unwrap().message, "command id dup-1 duplicated");
    handler.reply(&held).await;
    assert_eq!(handled_by(&first.await.unwrap()), "mute");

    // Bad messages on the handler stream: failed acks, the stream and the node go on.
    handler
        .outbound
        .send(subscribe("mute", "", 0, "bad-sub"))
        .await
        .unwrap();
    handler
        .outbound
        .send(CommandProviderOutbound {
            request: None,
            instruction_id: "empty".to_owned(),
        })
        .await
        .unwrap();
    handler
        .outbound
        .send(CommandProviderOutbound {
            request: Some(Outbound::CommandResponse(CommandResponse {
                request_identifier: "never-sent".to_owned(),
                ..Default::default()
            })),
            instruction_id: "stray".to_owned(),
        })
        .await
        .unwrap();
    handler
        .outbound
        .send(subscribe("mute", "Loud", 0, "good-sub"))
        .await
        .unwrap();
    let mut acks = Vec::new();
    for _ in 0..4 {
        acks.push(
            tokio::time::timeout(Duration::from_secs(5), handler.acks.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(
        acks.iter().map(|a| a.instruction_id.as_str()).collect::<Vec<_>>(),
        ["bad-sub", "empty", "stray", "good-sub"]
    );
    assert_eq!(
        acks.iter().map(|a| a.success).collect::<Vec<_>>(),
        [false, false, true, true]
    );
    for ack in &acks[..2] {
        assert_eq!(ack.error.as_ref().unwrap().error_code, "AXONIQ-1002");
    }
    let call = tokio::spawn({
        let dispatcher = dispatcher.clone();
        async move { dispatch(&dispatcher, command("Loud", "loud-1", None)).await }
    });
    let loud = handler.next_command(Duration::from_secs(5)).await.unwrap();
    assert_eq!(loud.name, "Loud");
    handler.reply(&loud).await;
    assert_eq!(handled_by(&call.await.unwrap()), "mute");
}
