//! Command routing through the real node: handler applications and a dispatcher, each on its own
//! gRPC connection (as separate client applications would be), against `CommandService`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use myelin_proto::axon::command::command_provider_inbound::Request as Inbound;
use myelin_proto::axon::command::command_provider_outbound::Request as Outbound;
use myelin_proto::axon::command::command_service_client::CommandServiceClient;
use myelin_proto::axon::command::{Command, CommandProviderOutbound, CommandResponse, CommandSubscription};
use myelin_proto::axon::meta_data_value::Data;
use myelin_proto::axon::{
    FlowControl, InstructionAck, MetaDataValue, ProcessingInstruction, ProcessingKey, SerializedObject,
};
use myelin_tests::{Node, Options};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

async fn connect(node: &Node) -> CommandServiceClient<Channel> {
    let channel = Channel::from_shared(node.url()).unwrap().connect().await.unwrap();
    CommandServiceClient::new(channel)
}

/// A command handler application: its own connection and `OpenStream`.
struct Handler {
    client_id: String,
    outbound: mpsc::Sender<CommandProviderOutbound>,
    /// Commands received (the handler answers them itself when `auto_reply`).
    received: mpsc::UnboundedReceiver<Command>,
    acks: mpsc::UnboundedReceiver<InstructionAck>,
    reader: JoinHandle<()>,
}

impl Handler {
    async fn start(
        node: &Node,
        context: &str,
        client_id: &str,
        names: &[&str],
        load_factor: i32,
        permits: i64,
        auto_reply: bool,
    ) -> Handler {
        let mut client = connect(node).await;
        let (outbound, rx) = mpsc::channel(1024);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("axoniq-context", context.parse().unwrap());
        for name in names {
            outbound
                .send(subscribe(client_id, name, load_factor, ""))
                .await
                .unwrap();
        }
        outbound.send(flow(client_id, permits)).await.unwrap();
        let mut inbound = client.open_stream(request).await.unwrap().into_inner();
        let (seen, received) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let replies = outbound.clone();
        let me = client_id.to_owned();
        let reader = tokio::spawn(async move {
            let _client = client; // the connection lives as long as the handler
            while let Some(Ok(message)) = inbound.next().await {
                match message.request {
                    Some(Inbound::Command(command)) => {
                        if auto_reply {
                            let _ = replies.send(respond(&command, &me)).await;
                        }
                        let _ = seen.send(command);
                    }
                    Some(Inbound::Ack(ack)) => {
                        let _ = ack_tx.send(ack);
                    }
                    None => {}
                }
            }
        });
        // Subscriptions are in once a later instruction is acknowledged (messages are in order).
        let handler = Handler {
            client_id: client_id.to_owned(),
            outbound,
            received,
            acks,
            reader,
        };
        handler.sync().await
    }

    async fn sync(mut self) -> Handler {
        let id = format!("sync-{}", rand::random::<u64>());
        self.outbound.send(flow_with_id(&self.client_id, 0, &id)).await.unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(10), self.acks.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack.instruction_id, id);
        assert!(ack.success);
        self
    }

    async fn next_command(&mut self, within: Duration) -> Option<Command> {
        tokio::time::timeout(within, self.received.recv()).await.ok().flatten()
    }

    async fn reply(&self, command: &Command) {
        self.outbound.send(respond(command, &self.client_id)).await.unwrap();
    }

    async fn grant(&self, permits: i64) {
        self.outbound.send(flow(&self.client_id, permits)).await.unwrap();
    }

    /// The application dies: its stream and connection go away without goodbye.
    fn kill(self) {
        self.reader.abort();
    }
}

fn subscribe(client_id: &str, name: &str, load_factor: i32, instruction_id: &str) -> CommandProviderOutbound {
    CommandProviderOutbound {
        request: Some(Outbound::Subscribe(CommandSubscription {
            message_id: format!("sub-{name}"),
            command: name.to_owned(),
            component_name: "handler-app".to_owned(),
            client_id: client_id.to_owned(),
            load_factor,
        })),
        instruction_id: instruction_id.to_owned(),
    }
}

fn flow(client_id: &str, permits: i64) -> CommandProviderOutbound {
    flow_with_id(client_id, permits, "")
}

fn flow_with_id(client_id: &str, permits: i64, instruction_id: &str) -> CommandProviderOutbound {
    CommandProviderOutbound {
        request: Some(Outbound::FlowControl(FlowControl {
            client_id: client_id.to_owned(),
            permits,
        })),
        instruction_id: instruction_id.to_owned(),
    }
}

/// The handler's answer: the command's payload echoed, and who handled it in the metadata.
fn respond(command: &Command, client_id: &str) -> CommandProviderOutbound {
    CommandProviderOutbound {
        request: Some(Outbound::CommandResponse(CommandResponse {
            message_identifier: format!("resp-{}", command.message_identifier),
            request_identifier: command.message_identifier.clone(),
            payload: command.payload.clone(),
            meta_data: HashMap::from([("handled-by".to_owned(), text(client_id))]),
            ..Default::default()
        })),
        instruction_id: String::new(),
    }
}

fn text(value: &str) -> MetaDataValue {
    MetaDataValue {
        data: Some(Data::TextValue(value.to_owned())),
    }
}

fn command(name: &str, id: &str, routing_key: Option<&str>) -> Command {
    let mut processing_instructions = Vec::new();
    if let Some(key) = routing_key {
        processing_instructions.push(ProcessingInstruction {
            key: ProcessingKey::RoutingKey as i32,
            value: Some(text(key)),
        });
    }
    Command {
        message_identifier: id.to_owned(),
        name: name.to_owned(),
        timestamp: 1,
        payload: Some(SerializedObject {
            r#type: "Payload".to_owned(),
            revision: "1".to_owned(),
            data: id.as_bytes().to_vec().into(),
        }),
        meta_data: HashMap::from([("trace".to_owned(), text(id))]),
        processing_instructions,
        client_id: "dispatcher".to_owned(),
        component_name: "dispatcher-app".to_owned(),
    }
}

fn handled_by(response: &CommandResponse) -> String {
    assert_eq!(response.error_code, "", "unexpected error: {response:?}");
    match response.meta_data.get("handled-by").and_then(|v| v.data.as_ref()) {
        Some(Data::TextValue(client)) => client.clone(),
        other => panic!("no handled-by in {other:?}"),
    }
}

async fn dispatch(client: &CommandServiceClient<Channel>, command: Command) -> CommandResponse {
    client
        .clone()
        .dispatch(command)
        .await
        .expect("Dispatch returns OK, errors are in-band")
        .into_inner()
}

fn id() -> String {
    format!("cmd-{}", rand::random::<u64>())
}

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
