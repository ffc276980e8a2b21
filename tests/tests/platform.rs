//! The control stream (`PlatformService.OpenStream`) through the real node: registration,
//! heartbeats both ways, the inactivity timeout that disconnects a silent client together with
//! its command and query handlers, and instruction acknowledgements. The node runs with the
//! default heartbeat settings (500 ms interval, 5000 ms timeout).

use std::time::{Duration, Instant};

use myelin_proto::axon::InstructionAck;
use myelin_proto::axon::command::command_provider_inbound::Request as CommandInbound;
use myelin_proto::axon::command::{Command, CommandSubscription};
use myelin_proto::axon::control::platform_inbound_instruction::Request as Inbound;
use myelin_proto::axon::control::platform_outbound_instruction::Request as Outbound;
use myelin_proto::axon::control::platform_service_client::PlatformServiceClient;
use myelin_proto::axon::control::{
    ClientIdentification, EventProcessorInfo, Heartbeat, PlatformInboundInstruction, PlatformOutboundInstruction,
    SubscribeTopologyChanges,
};
use myelin_proto::axon::query::query_provider_outbound::Request as QueryOutbound;
use myelin_proto::axon::query::query_service_client::QueryServiceClient;
use myelin_proto::axon::query::{QueryProviderOutbound, QuerySubscription};
use myelin_tests::handlers::{CommandHandler, command_handler};
use myelin_tests::{Node, Options, with_context};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// What the client sees on its control stream.
#[derive(Debug)]
enum Seen {
    Message(PlatformOutboundInstruction),
    /// The stream ended: `None` cleanly, else with this error.
    End(Option<tonic::Status>),
}

/// A client application's control stream.
struct Control {
    outbound: mpsc::Sender<PlatformInboundInstruction>,
    seen: mpsc::UnboundedReceiver<(Instant, Seen)>,
}

impl Control {
    async fn open(node: &Node, context: &str) -> Control {
        let mut client = PlatformServiceClient::new(node.channel().await);
        let (outbound, rx) = mpsc::channel(64);
        let mut inbound = client
            .open_stream(with_context(ReceiverStream::new(rx), context))
            .await
            .unwrap()
            .into_inner();
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _client = client;
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        let _ = tx.send((Instant::now(), Seen::Message(message)));
                    }
                    Ok(None) => {
                        let _ = tx.send((Instant::now(), Seen::End(None)));
                        return;
                    }
                    Err(status) => {
                        let _ = tx.send((Instant::now(), Seen::End(Some(status))));
                        return;
                    }
                }
            }
        });
        Control { outbound, seen }
    }

    async fn send(&self, request: Option<Inbound>, instruction_id: &str) {
        self.outbound
            .send(PlatformInboundInstruction {
                request,
                instruction_id: instruction_id.to_owned(),
            })
            .await
            .unwrap();
    }

    async fn register(&mut self, client_id: &str, version: &str) {
        let identification = ClientIdentification {
            client_id: client_id.to_owned(),
            component_name: format!("{client_id}-app"),
            tags: [("zone".to_owned(), "a".to_owned())].into(),
            version: version.to_owned(),
        };
        self.send(Some(Inbound::Register(identification)), "register").await;
        let ack = self.ack("register").await;
        assert!(ack.success, "{ack:?}");
    }

    /// The ack for `instruction_id` (heartbeats before it are skipped).
    async fn ack(&mut self, instruction_id: &str) -> InstructionAck {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some((_, Seen::Message(message)))) => match message.request {
                    Some(Outbound::Ack(ack)) if ack.instruction_id == instruction_id => return ack,
                    Some(Outbound::Heartbeat(_)) => {}
                    other => panic!("unexpected {other:?} while waiting for ack {instruction_id}"),
                },
                other => panic!("no ack for {instruction_id}: {other:?}"),
            }
        }
    }

    /// Heartbeats received within `window`; panics if anything else arrives.
    async fn heartbeats_within(&mut self, window: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + window;
        let mut count = 0;
        while let Ok(seen) = tokio::time::timeout_at(deadline, self.seen.recv()).await {
            match seen {
                Some((
                    _,
                    Seen::Message(PlatformOutboundInstruction {
                        request: Some(Outbound::Heartbeat(_)),
                        ..
                    }),
                )) => count += 1,
                other => panic!("expected only heartbeats, got {other:?}"),
            }
        }
        count
    }

    /// Waits for the end of the stream, skipping heartbeats; returns when and how it ended.
    async fn end(&mut self, within: Duration) -> (Instant, Option<tonic::Status>) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some((at, Seen::End(status)))) => return (at, status),
                Ok(Some((_, Seen::Message(_)))) => {}
                other => panic!("the control stream did not end in time: {other:?}"),
            }
        }
    }
}

fn heartbeat() -> Option<Inbound> {
    Some(Inbound::Heartbeat(Heartbeat {}))
}

#[tokio::test]
async fn registered_clients_in_two_contexts_get_heartbeats_at_the_interval() {
    let node = Node::start(Options::default()).await;
    let mut a = Control::open(&node, "ctx-a").await;
    let mut b = Control::open(&node, "ctx-b").await;
    let mut unregistered = Control::open(&node, "ctx-a").await;
    a.register("client-a", "4.6.0").await;
    b.register("client-b", "5.0.0").await;
    let window = Duration::from_millis(1600);
    let (in_a, in_b, in_unregistered) = tokio::join!(
        a.heartbeats_within(window),
        b.heartbeats_within(window),
        unregistered.heartbeats_within(window)
    );
    assert!((2..=4).contains(&in_a), "client-a got {in_a} heartbeats in {window:?}");
    assert!((2..=4).contains(&in_b), "client-b got {in_b} heartbeats in {window:?}");
    assert_eq!(in_unregistered, 0, "heartbeats before register");
}

#[tokio::test]
async fn a_silent_client_is_disconnected_with_its_handlers() {
    let node = Node::start(Options::default()).await;
    let context = "hb";
    let client_id = "silent-client";
    let mut control = Control::open(&node, context).await;
    control.register(client_id, "4.6.0").await;

    // Its command handler (no auto reply, so a dispatched command stays pending on it).
    let CommandHandler {
        client: mut commands,
        outbound: handler_tx,
        inbound: mut handler,
    } = command_handler(
        &node,
        context,
        CommandSubscription {
            message_id: "sub-1".into(),
            command: "Cmd".into(),
            component_name: "silent-app".into(),
            client_id: client_id.into(),
            load_factor: 100,
        },
        10,
    )
    .await;

    // Its query handler.
    let mut queries = QueryServiceClient::new(node.channel().await);
    let (query_tx, query_rx) = mpsc::channel(16);
    query_tx
        .send(QueryProviderOutbound {
            request: Some(QueryOutbound::Subscribe(QuerySubscription {
                message_id: "qsub-1".into(),
                query: "Q".into(),
                result_name: "R".into(),
                component_name: "silent-app".into(),
                client_id: client_id.into(),
            })),
            instruction_id: String::new(),
        })
        .await
        .unwrap();
    let mut query_handler = queries
        .open_stream(with_context(ReceiverStream::new(query_rx), context))
        .await
        .unwrap()
        .into_inner();

    // A command that the handler receives and never answers.
    let dispatcher = commands.clone();
    let pending = tokio::spawn(async move {
        let mut dispatcher = dispatcher;
        let command = Command {
            message_identifier: "pending-1".into(),
            name: "Cmd".into(),
            ..Default::default()
        };
        dispatcher
            .dispatch(with_context(command, "hb"))
            .await
            .unwrap()
            .into_inner()
    });
    let received = tokio::time::timeout(Duration::from_secs(5), handler.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(received.request, Some(CommandInbound::Command(c)) if c.message_identifier == "pending-1"));

    // Two heartbeats, then silence.
    control.send(heartbeat(), "").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    control.send(heartbeat(), "").await;
    let silent_since = Instant::now();

    let (ended_at, status) = control.end(Duration::from_secs(10)).await;
    let silent_for = ended_at - silent_since;
    assert!(
        silent_for >= Duration::from_millis(4900) && silent_for <= Duration::from_millis(7000),
        "disconnected after {silent_for:?} of silence"
    );
    let status = status.expect("the control stream ends with an error");
    assert!(
        status
            .message()
            .contains(&format!("Platform stream inactivity for {client_id}.")),
        "{status:?}"
    );

    // The command pending on the handler fails fast; the handler is gone.
    let response = tokio::time::timeout(Duration::from_secs(3), pending)
        .await
        .expect("the pending command failed fast")
        .unwrap();
    assert_eq!(response.error_code, "AXONIQ-4001", "{response:?}");
    let after = commands
        .dispatch(with_context(
            Command {
                message_identifier: "after-1".into(),
                name: "Cmd".into(),
                ..Default::default()
            },
            context,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.error_code, "AXONIQ-4000", "{after:?}");

    // Both handler streams were closed with an error naming the control stream.
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match handler.message().await {
                Ok(Some(_)) => {}
                other => return other,
            }
        }
    })
    .await
    .unwrap();
    let command_status = ended.expect_err("the command stream ends with an error");
    assert!(
        command_status
            .message()
            .contains("Command stream inactivity for silent-client."),
        "{command_status:?}"
    );
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match query_handler.message().await {
                Ok(Some(_)) => {}
                other => return other,
            }
        }
    })
    .await
    .unwrap();
    let query_status = ended.expect_err("the query stream ends with an error");
    assert!(
        query_status
            .message()
            .contains("Query stream inactivity for silent-client."),
        "{query_status:?}"
    );
    drop((handler_tx, query_tx));
}

#[tokio::test]
async fn a_client_that_never_heartbeats_is_not_timed_out() {
    let node = Node::start(Options::default()).await;
    let mut control = Control::open(&node, "default").await;
    control.register("old-client", "4.1.0").await;
    let heartbeats = control.heartbeats_within(Duration::from_secs(7)).await;
    assert!(heartbeats >= 10, "only {heartbeats} heartbeats in 7 s");
    control
        .send(
            Some(Inbound::EventProcessorInfo(EventProcessorInfo {
                processor_name: "p".into(),
                ..Default::default()
            })),
            "still-there",
        )
        .await;
    assert!(control.ack("still-there").await.success);
}

#[tokio::test]
async fn instructions_are_acknowledged_and_unsupported_ones_fail() {
    let node = Node::start(Options::default()).await;
    let mut control = Control::open(&node, "default").await;

    // Before register: acknowledged, ignored.
    control.send(heartbeat(), "early-heartbeat").await;
    assert!(control.ack("early-heartbeat").await.success);
    // No message at all is no instruction we know, registered or not.
    control.send(None, "empty").await;
    let ack = control.ack("empty").await;
    assert!(!ack.success);
    let error = ack.error.expect("a failed ack carries an error");
    assert_eq!(error.error_code, "AXONIQ-1002");
    assert_eq!(error.details, ["Unsupported instruction"]);
    assert!(!error.location.is_empty());

    control.register("acks-client", "4.6.0").await;
    control
        .send(
            Some(Inbound::SubscribeTopologyChanges(SubscribeTopologyChanges::default())),
            "topology",
        )
        .await;
    let ack = control.ack("topology").await;
    assert!(!ack.success);
    assert_eq!(ack.error.unwrap().error_code, "AXONIQ-1002");
    control.send(None, "garbage").await;
    assert!(!control.ack("garbage").await.success);

    // An ack for an instruction the node never sent is accepted.
    control
        .send(
            Some(Inbound::Ack(InstructionAck {
                instruction_id: "never-sent".into(),
                success: true,
                error: None,
            })),
            "client-ack",
        )
        .await;
    assert!(control.ack("client-ack").await.success);
    control.send(heartbeat(), "hb-1").await;
    assert!(control.ack("hb-1").await.success);
    // No instruction id, no ack; the stream stays up and keeps heartbeating.
    control.send(heartbeat(), "").await;
    let heartbeats = control.heartbeats_within(Duration::from_millis(1100)).await;
    assert!(heartbeats >= 1, "{heartbeats}");
}
