//! The router's internal control API (`RouterControl`, on its Unix socket in the runtime
//! directory) and the eventstore's `StorageControl.Metrics`, through the real node: connected
//! clients and their processor reports, instructions a test client answers (or does not),
//! handler registrations, closing a deleted context, and Prometheus counters that follow real
//! traffic.

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use myelin_proto::axon::command::command_provider_inbound::Request as CommandInbound;
use myelin_proto::axon::command::command_provider_outbound::Request as CommandOutbound;
use myelin_proto::axon::command::command_service_client::CommandServiceClient;
use myelin_proto::axon::command::{Command, CommandProviderOutbound, CommandResponse, CommandSubscription};
use myelin_proto::axon::control::platform_inbound_instruction::Request as Inbound;
use myelin_proto::axon::control::platform_outbound_instruction::Request as Outbound;
use myelin_proto::axon::control::platform_service_client::PlatformServiceClient;
use myelin_proto::axon::control::{
    ClientIdentification, EventProcessorInfo, EventProcessorReference, EventProcessorSegmentReference,
    PlatformInboundInstruction, PlatformOutboundInstruction,
};
use myelin_proto::axon::query::query_provider_inbound::Request as QueryInbound;
use myelin_proto::axon::query::query_provider_outbound::Request as QueryOutbound;
use myelin_proto::axon::query::query_service_client::QueryServiceClient;
use myelin_proto::axon::query::{QueryProviderOutbound, QuerySubscription};
use myelin_proto::axon::{ErrorMessage, FlowControl, InstructionAck, InstructionResult};
use myelin_proto::internal::router_control_client::RouterControlClient;
use myelin_proto::internal::storage_control_client::StorageControlClient;
use myelin_proto::internal::{
    CloseContextRequest, ListClientsRequest, ListHandlersRequest, ListProcessorsRequest, MetricsRequest,
    SendInstructionRequest, SendInstructionResponse,
};
use myelin_tests::handlers::{self, CommandHandler};
use myelin_tests::{Node, Options, event, with_context};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

async fn unix_channel(path: std::path::PathBuf) -> Channel {
    Endpoint::from_shared(format!("unix://{}", path.display()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn router_control(node: &Node) -> RouterControlClient<Channel> {
    RouterControlClient::new(unix_channel(node.runtime_dir().join("router.sock")).await)
}

async fn storage_control(node: &Node) -> StorageControlClient<Channel> {
    StorageControlClient::new(unix_channel(node.runtime_dir().join("eventstore.sock")).await)
}

/// How the test client answers the node's instructions.
#[derive(Clone, Copy)]
enum Answer {
    AckSuccess,
    FailedResult,
    Never,
}

/// A client application's control stream that registers and answers instructions by kind.
struct Client {
    outbound: mpsc::Sender<PlatformInboundInstruction>,
    /// Instructions the client received (heartbeats left out), and how its stream ended.
    seen: mpsc::UnboundedReceiver<Result<PlatformOutboundInstruction, Option<tonic::Status>>>,
}

impl Client {
    async fn connect(node: &Node, context: &str, client_id: &str, component: &str) -> Client {
        let mut platform = PlatformServiceClient::new(node.channel().await);
        let (outbound, rx) = mpsc::channel(64);
        let mut inbound = platform
            .open_stream(with_context(ReceiverStream::new(rx), context))
            .await
            .unwrap()
            .into_inner();
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let answers = outbound.clone();
        tokio::spawn(async move {
            let _platform = platform;
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        let answer = match &message.request {
                            Some(Outbound::Heartbeat(_)) => continue,
                            Some(Outbound::PauseEventProcessor(_)) | Some(Outbound::StartEventProcessor(_)) => {
                                Answer::AckSuccess
                            }
                            Some(Outbound::SplitEventProcessorSegment(_)) => Answer::FailedResult,
                            _ => Answer::Never,
                        };
                        let id = message.instruction_id.clone();
                        let reply = match answer {
                            Answer::AckSuccess => Some(Inbound::Ack(InstructionAck {
                                instruction_id: id,
                                success: true,
                                error: None,
                            })),
                            Answer::FailedResult => Some(Inbound::Result(InstructionResult {
                                instruction_id: id,
                                success: false,
                                error: Some(ErrorMessage {
                                    message: "segment 0 is not claimed here".into(),
                                    location: "test-client".into(),
                                    details: Vec::new(),
                                    error_code: "AXONIQ-1003".into(),
                                }),
                            })),
                            Answer::Never => None,
                        };
                        if let Some(reply) = reply {
                            let _ = answers
                                .send(PlatformInboundInstruction {
                                    request: Some(reply),
                                    instruction_id: String::new(),
                                })
                                .await;
                        }
                        let _ = seen_tx.send(Ok(message));
                    }
                    Ok(None) => {
                        let _ = seen_tx.send(Err(None));
                        return;
                    }
                    Err(status) => {
                        let _ = seen_tx.send(Err(Some(status)));
                        return;
                    }
                }
            }
        });
        let mut client = Client { outbound, seen };
        let identification = ClientIdentification {
            client_id: client_id.to_owned(),
            component_name: component.to_owned(),
            tags: [("zone".to_owned(), "a".to_owned())].into(),
            version: "4.6.0".to_owned(),
        };
        client.send(Inbound::Register(identification), "register").await;
        client
    }

    /// Sends a message with an instruction id and waits for the node's ack of it.
    async fn send(&mut self, request: Inbound, instruction_id: &str) {
        self.outbound
            .send(PlatformInboundInstruction {
                request: Some(request),
                instruction_id: instruction_id.to_owned(),
            })
            .await
            .unwrap();
        loop {
            let seen = tokio::time::timeout(Duration::from_secs(5), self.seen.recv())
                .await
                .expect("an ack in time")
                .expect("stream open");
            match seen {
                Ok(PlatformOutboundInstruction {
                    request: Some(Outbound::Ack(ack)),
                    ..
                }) if ack.instruction_id == instruction_id => {
                    assert!(ack.success, "{ack:?}");
                    return;
                }
                Ok(_) => {}
                Err(end) => panic!("the control stream ended: {end:?}"),
            }
        }
    }

    /// How the stream ended (instructions before the end are skipped).
    async fn end(&mut self) -> Option<tonic::Status> {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.seen.recv()).await {
                Ok(Some(Err(end))) => return end,
                Ok(Some(Ok(_))) => {}
                other => panic!("the control stream did not end: {other:?}"),
            }
        }
    }
}

fn pause(processor: &str) -> PlatformOutboundInstruction {
    PlatformOutboundInstruction {
        request: Some(Outbound::PauseEventProcessor(EventProcessorReference {
            processor_name: processor.to_owned(),
        })),
        instruction_id: String::new(),
    }
}

fn segment(kind: fn(EventProcessorSegmentReference) -> Outbound) -> PlatformOutboundInstruction {
    PlatformOutboundInstruction {
        request: Some(kind(EventProcessorSegmentReference {
            processor_name: "orders-processor".to_owned(),
            segment_identifier: 0,
        })),
        instruction_id: String::new(),
    }
}

async fn send_instruction(
    control: &mut RouterControlClient<Channel>,
    context: &str,
    client_id: &str,
    instruction: PlatformOutboundInstruction,
    timeout_millis: u32,
) -> SendInstructionResponse {
    control
        .send_instruction(SendInstructionRequest {
            context: context.to_owned(),
            client_id: client_id.to_owned(),
            instruction: Some(instruction),
            timeout_millis,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn unix_millis_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn clients_processors_and_instructions_over_the_router_socket() {
    let node = Node::start(Options::default()).await;
    let mut control = router_control(&node).await;
    let before = unix_millis_now();
    let mut client = Client::connect(&node, "ctl", "app-1", "orders-app").await;
    client
        .send(
            Inbound::EventProcessorInfo(EventProcessorInfo {
                processor_name: "orders-processor".into(),
                mode: "Tracking".into(),
                active_threads: 2,
                ..Default::default()
            }),
            "info-1",
        )
        .await;
    let after = unix_millis_now();

    let clients = control
        .list_clients(ListClientsRequest {
            context: "ctl".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .clients;
    assert_eq!(clients.len(), 1, "{clients:?}");
    let listed = &clients[0];
    assert_eq!(
        (
            listed.context.as_str(),
            listed.client_id.as_str(),
            listed.component_name.as_str(),
            listed.version.as_str()
        ),
        ("ctl", "app-1", "orders-app", "4.6.0")
    );
    assert!(listed.client_stream_id.starts_with("app-1."), "{listed:?}");
    assert_eq!(listed.tags.get("zone").map(String::as_str), Some("a"));
    assert!((before..=after).contains(&listed.connected_at_millis), "{listed:?}");
    assert_eq!(listed.last_heartbeat_millis, 0, "no heartbeat yet: {listed:?}");
    let everywhere = control
        .list_clients(ListClientsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(everywhere.clients.iter().any(|c| c.client_id == "app-1"));
    let elsewhere = control
        .list_clients(ListClientsRequest {
            context: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(elsewhere.clients.is_empty());
    let bad = control
        .list_clients(ListClientsRequest {
            context: "no spaces".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let processors = control
        .list_processors(ListProcessorsRequest {
            context: "ctl".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .processors;
    assert_eq!(processors.len(), 1, "{processors:?}");
    let report = &processors[0];
    assert_eq!(
        (report.client_id.as_str(), report.component_name.as_str()),
        ("app-1", "orders-app")
    );
    let info = report.info.as_ref().unwrap();
    assert_eq!(
        (info.processor_name.as_str(), info.active_threads),
        ("orders-processor", 2)
    );
    assert!((before..=after).contains(&report.reported_at_millis));

    // Pause: the client acknowledges, the instruction succeeds.
    let paused = send_instruction(&mut control, "ctl", "app-1", pause("orders-processor"), 0).await;
    assert!(paused.success, "{paused:?}");
    let received = loop {
        match client.seen.recv().await.unwrap().unwrap() {
            PlatformOutboundInstruction {
                request: Some(Outbound::PauseEventProcessor(reference)),
                instruction_id,
            } => break (reference.processor_name, instruction_id),
            _ => continue,
        }
    };
    assert_eq!(received.0, "orders-processor");
    assert_eq!(received.1.len(), 36, "the router sets a fresh instruction id");

    // Split: the client reports a failed result.
    let split = send_instruction(
        &mut control,
        "ctl",
        "app-1",
        segment(Outbound::SplitEventProcessorSegment),
        0,
    )
    .await;
    assert!(!split.success, "{split:?}");
    assert_eq!(split.error_code, "AXONIQ-1003");
    assert_eq!(split.message, "segment 0 is not claimed here");

    // Merge: the client never answers.
    let started = std::time::Instant::now();
    let merge = send_instruction(
        &mut control,
        "ctl",
        "app-1",
        segment(Outbound::MergeEventProcessorSegment),
        800,
    )
    .await;
    assert!(!merge.success, "{merge:?}");
    assert_eq!(merge.error_code, "AXONIQ-1004");
    assert!(started.elapsed() >= Duration::from_millis(800));

    // Nobody of that id, or not in that context.
    let unknown = send_instruction(&mut control, "ctl", "app-2", pause("p"), 0).await;
    assert_eq!((unknown.success, unknown.error_code.as_str()), (false, "AXONIQ-1300"));
    let wrong_context = send_instruction(&mut control, "default", "app-1", pause("p"), 0).await;
    assert_eq!(wrong_context.error_code, "AXONIQ-1300");

    // Bad requests change nothing.
    for request in [
        SendInstructionRequest {
            context: "ctl".into(),
            client_id: "app-1".into(),
            instruction: None,
            timeout_millis: 0,
            ..Default::default()
        },
        SendInstructionRequest {
            context: "ctl".into(),
            client_id: String::new(),
            instruction: Some(pause("p")),
            timeout_millis: 0,
            ..Default::default()
        },
        SendInstructionRequest {
            context: "ctl".into(),
            client_id: "app-1".into(),
            instruction: Some(PlatformOutboundInstruction {
                request: Some(Outbound::Heartbeat(Default::default())),
                instruction_id: String::new(),
            }),
            timeout_millis: 0,
            ..Default::default()
        },
        SendInstructionRequest {
            context: "ctl".into(),
            client_id: "app-1".into(),
            instruction: Some(pause("p")),
            timeout_millis: u32::MAX,
            ..Default::default()
        },
    ] {
        let status = control.send_instruction(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }

    // The client is still there and still answers.
    let again = send_instruction(&mut control, "ctl", "app-1", pause("orders-processor"), 0).await;
    assert!(again.success, "{again:?}");

    // A heartbeat shows in the listing (last: from now on the router expects more of them).
    let sent = unix_millis_now();
    client.send(Inbound::Heartbeat(Default::default()), "heartbeat-1").await;
    let beat = control
        .list_clients(ListClientsRequest {
            context: "ctl".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .clients;
    assert!(
        (sent..=unix_millis_now()).contains(&beat[0].last_heartbeat_millis),
        "{beat:?}"
    );
}

/// A command handler stream that answers every command: its outbound side, and its reader,
/// which ends with the error the stream ended with (if any).
async fn command_handler(
    node: &Node,
    context: &str,
    client_id: &str,
    command: &str,
) -> (
    mpsc::Sender<CommandProviderOutbound>,
    tokio::task::JoinHandle<Option<tonic::Status>>,
) {
    let CommandHandler {
        client: commands,
        outbound: tx,
        mut inbound,
    } = handlers::command_handler(
        node,
        context,
        CommandSubscription {
            message_id: format!("sub-{command}"),
            command: command.into(),
            component_name: format!("{client_id}-app"),
            client_id: client_id.into(),
            load_factor: 100,
        },
        1000,
    )
    .await;
    let replies = tx.clone();
    let reader = tokio::spawn(async move {
        let _commands = commands;
        loop {
            let message = match inbound.next().await {
                Some(Ok(message)) => message,
                Some(Err(status)) => return Some(status),
                None => return None,
            };
            if let Some(CommandInbound::Command(command)) = message.request {
                let response = CommandResponse {
                    message_identifier: format!("{}-reply", command.message_identifier),
                    request_identifier: command.message_identifier.clone(),
                    ..Default::default()
                };
                let _ = replies
                    .send(CommandProviderOutbound {
                        request: Some(CommandOutbound::CommandResponse(response)),
                        instruction_id: String::new(),
                    })
                    .await;
            }
        }
    });
    (tx, reader)
}

fn command(id: &str, name: &str) -> Command {
    Command {
        message_identifier: id.into(),
        name: name.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn handlers_are_listed_and_closing_a_context_ends_its_streams() {
    let node = Node::start(Options::default()).await;
    let mut control = router_control(&node).await;
    let mut client = Client::connect(&node, "doomed", "app-9", "doomed-app").await;
    let _survivor = Client::connect(&node, "kept", "app-8", "kept-app").await;
    let (_handler, handler_reader) = command_handler(&node, "doomed", "app-9", "DoomedCommand").await;

    let mut queries = QueryServiceClient::new(node.channel().await);
    let (query_tx, query_rx) = mpsc::channel(16);
    query_tx
        .send(QueryProviderOutbound {
            request: Some(QueryOutbound::Subscribe(QuerySubscription {
                message_id: "qsub".into(),
                query: "DoomedQuery".into(),
                result_name: "java.lang.String".into(),
                component_name: "doomed-app".into(),
                client_id: "app-9".into(),
            })),
            instruction_id: String::new(),
        })
        .await
        .unwrap();
    query_tx
        .send(QueryProviderOutbound {
            request: Some(QueryOutbound::FlowControl(FlowControl {
                client_id: "app-9".into(),
                permits: 10,
            })),
            instruction_id: "q-permits".into(),
        })
        .await
        .unwrap();
    let mut query_stream = queries
        .open_stream(with_context(ReceiverStream::new(query_rx), "doomed"))
        .await
        .unwrap()
        .into_inner();
    let ack = tokio::time::timeout(Duration::from_secs(5), query_stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(ack.request, Some(QueryInbound::Ack(ref a)) if a.success),
        "{ack:?}"
    );

    let handlers = control
        .list_handlers(ListHandlersRequest {
            context: "doomed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .handlers;
    let summary: Vec<(&str, &str, &str, &str, &str, i32)> = handlers
        .iter()
        .map(|h| {
            (
                h.kind.as_str(),
                h.name.as_str(),
                h.result_name.as_str(),
                h.client_id.as_str(),
                h.component_name.as_str(),
                h.load_factor,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("command", "DoomedCommand", "", "app-9", "app-9-app", 100),
            ("query", "DoomedQuery", "java.lang.String", "app-9", "doomed-app", 0),
        ]
    );

    let closed = control
        .close_context(CloseContextRequest {
            context: "doomed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.closed_streams, 3, "control, command and query stream");

    let status = client.end().await.expect("the control stream ends with an error");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("[AXONIQ-1302] context doomed was deleted"),
        "{status:?}"
    );
    let query_end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match query_stream.message().await {
                Ok(Some(_)) => {}
                other => return other,
            }
        }
    })
    .await
    .unwrap();
    let command_status = tokio::time::timeout(Duration::from_secs(5), handler_reader)
        .await
        .unwrap()
        .unwrap()
        .expect("the command stream ends with an error");
    assert_eq!(command_status.code(), tonic::Code::NotFound, "{command_status:?}");
    assert!(
        command_status
            .message()
            .contains("[AXONIQ-1302] context doomed was deleted")
    );
    let query_status = query_end.expect_err("the query stream ends with an error");
    assert_eq!(query_status.code(), tonic::Code::NotFound, "{query_status:?}");
    assert!(
        query_status.message().contains("context doomed was deleted"),
        "{query_status:?}"
    );

    // Nothing of the context is left; the other context is untouched.
    let left = control
        .list_clients(ListClientsRequest {
            context: "doomed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(left.clients.is_empty(), "{left:?}");
    let handlers = control
        .list_handlers(ListHandlersRequest {
            context: "doomed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(handlers.handlers.is_empty(), "{handlers:?}");
    let kept = control
        .list_clients(ListClientsRequest {
            context: "kept".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.clients.len(), 1);
    let mut dispatcher = CommandServiceClient::new(node.channel().await);
    let response = dispatcher
        .dispatch(with_context(command("after-close", "DoomedCommand"), "doomed"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.error_code, "AXONIQ-4000", "{response:?}");

    let bad = control
        .close_context(CloseContextRequest { context: String::new() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    drop(query_tx);
}

/// The value of a sample in Prometheus text; 0 when the series does not exist yet.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find_map(|(series, value)| {
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
            let series_labels = series_labels.trim_end_matches('}');
            let wanted = series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
            if wanted { value.parse().ok() } else { None }
        })
        .unwrap_or(0.0)
}

async fn router_metrics(control: &mut RouterControlClient<Channel>) -> String {
    control.metrics(MetricsRequest {}).await.unwrap().into_inner().text
}

#[tokio::test]
async fn metrics_follow_real_traffic() {
    let node = Node::start(Options::default()).await;
    let mut control = router_control(&node).await;
    let mut storage = storage_control(&node).await;
    let before = router_metrics(&mut control).await;
    let store_before = storage.metrics(MetricsRequest {}).await.unwrap().into_inner().text;

    // Two appends of 3 and 2 events, one rejected append, one aggregate read.
    let mut events = node.client().await;
    myelin_tests::append(
        &mut events,
        (0..3).map(|i| event("agg-m", i, &format!("m{i}"))).collect(),
    )
    .await
    .unwrap();
    myelin_tests::append(
        &mut events,
        (3..5).map(|i| event("agg-m", i, &format!("m{i}"))).collect(),
    )
    .await
    .unwrap();
    myelin_tests::append(&mut events, vec![event("agg-m", 1, "dup")])
        .await
        .expect_err("a sequence conflict");
    assert_eq!(myelin_tests::read_aggregate(&mut events, "agg-m").await.len(), 5);

    // Four commands answered by a handler, one without a handler.
    let _handler = command_handler(&node, "metered", "app-m", "MeteredCommand").await;
    let _client = Client::connect(&node, "metered", "app-m", "metered-app").await;
    let mut dispatcher = CommandServiceClient::new(node.channel().await);
    for i in 0..4 {
        let response = dispatcher
            .dispatch(with_context(command(&format!("c{i}"), "MeteredCommand"), "metered"))
            .await
            .unwrap()
            .into_inner();
        assert!(response.error_code.is_empty(), "{response:?}");
    }
    let response = dispatcher
        .dispatch(with_context(command("lost", "NobodyHandlesThis"), "metered"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.error_code, "AXONIQ-4000");

    let after = router_metrics(&mut control).await;
    let delta = |name: &str, labels: &[(&str, &str)]| sample(&after, name, labels) - sample(&before, name, labels);
    let default = ("context", "default");
    assert_eq!(delta("myelin_events_appended_total", &[default]), 5.0, "{after}");
    assert_eq!(
        delta(
            "myelin_event_calls_total",
            &[default, ("call", "append_events"), ("outcome", "ok")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            "myelin_event_calls_total",
            &[default, ("call", "append_events"), ("outcome", "error")]
        ),
        1.0
    );
    assert_eq!(
        delta("myelin_append_duration_seconds_count", &[default, ("kind", "events")]),
        3.0
    );
    assert_eq!(
        delta("myelin_events_read_total", &[default, ("call", "read_aggregate")]),
        5.0
    );
    let metered = ("context", "metered");
    assert_eq!(delta("myelin_commands_total", &[metered, ("outcome", "success")]), 4.0);
    assert_eq!(delta("myelin_commands_total", &[metered, ("outcome", "error")]), 1.0);
    assert_eq!(delta("myelin_commands_routed_total", &[metered]), 4.0);
    assert_eq!(sample(&after, "myelin_commands_in_flight", &[metered]), 0.0);
    assert_eq!(delta("myelin_command_duration_seconds_count", &[metered]), 5.0);
    assert_eq!(
        delta("myelin_command_duration_seconds_bucket", &[metered, ("le", "+Inf")]),
        5.0
    );
    assert!(
        after.contains("# TYPE myelin_command_duration_seconds histogram"),
        "{after}"
    );
    assert_eq!(sample(&after, "myelin_clients_connected", &[metered]), 1.0);

    // The eventstore's own view: events stored, and where the context stands.
    let store_after = storage.metrics(MetricsRequest {}).await.unwrap().into_inner().text;
    let stored = sample(&store_after, "myelin_eventstore_events_stored_total", &[default])
        - sample(&store_before, "myelin_eventstore_events_stored_total", &[default]);
    assert_eq!(stored, 5.0, "{store_after}");
    assert!(
        sample(&store_after, "myelin_eventstore_batches_total", &[default])
            > sample(&store_before, "myelin_eventstore_batches_total", &[default])
    );
    assert_eq!(sample(&store_after, "myelin_eventstore_last_token", &[default]), 4.0);
    assert!(sample(&store_after, "myelin_eventstore_applied_index", &[default]) > 0.0);
    assert_eq!(
        sample(
            &store_after,
            "myelin_eventstore_segments",
            &[default, ("kind", "events")]
        ),
        1.0
    );
    assert!(
        sample(
            &store_after,
            "myelin_eventstore_segment_bytes",
            &[default, ("kind", "events")]
        ) > 0.0
    );
    assert!(store_after.contains("# TYPE myelin_eventstore_batch_duration_seconds histogram"));
}
