//! Hostile command and query clients against a real node (issue #15, trials D7 and D9, scaled
//! down): each does its worst in a bounded loop, the node refuses with a clear error, a
//! bystander's command round trip stays fast, and the router's resident memory stays under a
//! stated bound while it happens.
//!
//! The limits are configured small (through the environment, as an operator could) so that each
//! scenario proves the mechanism in a few seconds; docs/limits.md lists the defaults.

use std::time::{Duration, Instant};

use futures::StreamExt;
use myelin_proto::axon::command::command_provider_inbound::Request as CommandInbound;
use myelin_proto::axon::command::command_provider_outbound::Request as CommandOutbound;
use myelin_proto::axon::command::command_service_client::CommandServiceClient;
use myelin_proto::axon::command::{Command, CommandProviderOutbound, CommandResponse, CommandSubscription};
use myelin_proto::axon::query::query_provider_inbound::Request as QueryInbound;
use myelin_proto::axon::query::query_provider_outbound::Request as QueryOutbound;
use myelin_proto::axon::query::query_service_client::QueryServiceClient;
use myelin_proto::axon::query::{QueryProviderOutbound, QueryRequest, QuerySubscription};
use myelin_proto::axon::{MetaDataValue, ProcessingInstruction, ProcessingKey, SerializedObject, meta_data_value};
use myelin_tests::handlers::{CommandHandler, command_handler};
use myelin_tests::{Node, Options};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const KIB: usize = 1024;
const MIB: u64 = 1024;

async fn node(limits: &[(&str, &str)]) -> Node {
    Node::start(Options {
        env: limits.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Options::default()
    })
    .await
}

fn router_rss_mib(node: &Node) -> u64 {
    node.rss_kib("router").expect("the router runs") / MIB
}

/// The router's peak resident memory while a scenario runs: sampled every 50 ms until stopped
/// (at most 30 s).
struct PeakRss {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl PeakRss {
    fn start(node: &Node) -> PeakRss {
        use std::sync::atomic::Ordering;
        let pid = node.child_pid("router").expect("the router runs");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut peak = 0;
                for _ in 0..600 {
                    peak = peak.max(myelin_tests::rss_kib(pid).unwrap_or(0) / MIB);
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                peak
            }
        });
        PeakRss { stop, task }
    }

    async fn peak(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.task.await.unwrap()
    }
}

fn timeout_instruction(ms: i64) -> ProcessingInstruction {
    ProcessingInstruction {
        key: ProcessingKey::Timeout as i32,
        value: Some(MetaDataValue {
            data: Some(meta_data_value::Data::NumberValue(ms)),
        }),
    }
}

fn command(id: &str, name: &str, payload_bytes: usize, timeout_ms: i64) -> Command {
    Command {
        message_identifier: id.to_owned(),
        name: name.to_owned(),
        payload: Some(SerializedObject {
            r#type: "bytes".to_owned(),
            revision: String::new(),
            data: vec![0x5a; payload_bytes].into(),
        }),
        processing_instructions: vec![timeout_instruction(timeout_ms)],
        client_id: "dispatcher".to_owned(),
        component_name: "dispatcher-app".to_owned(),
        ..Default::default()
    }
}

/// A well-behaved application: a handler of `Bystander` that answers at once, and a dispatcher
/// on a connection of its own.
struct Bystander {
    dispatcher: CommandServiceClient<Channel>,
    _handler: tokio::task::JoinHandle<()>,
}

impl Bystander {
    async fn start(node: &Node) -> Bystander {
        let subscription = CommandSubscription {
            message_id: "bystander-sub".to_owned(),
            command: "Bystander".to_owned(),
            client_id: "bystander".to_owned(),
            component_name: "bystander-app".to_owned(),
            load_factor: 100,
        };
        let CommandHandler {
            client,
            outbound,
            mut inbound,
        } = command_handler(node, "default", subscription, 1_000_000).await;
        // Answers every command until the stream ends (when the node or the test goes away).
        let handler = tokio::spawn(async move {
            let _client = client;
            while let Some(Ok(message)) = inbound.next().await {
                if let Some(CommandInbound::Command(command)) = message.request {
                    let response = CommandResponse {
                        message_identifier: format!("{}-ok", command.message_identifier),
                        request_identifier: command.message_identifier,
                        ..Default::default()
                    };
                    let reply = CommandProviderOutbound {
                        request: Some(CommandOutbound::CommandResponse(response)),
                        instruction_id: String::new(),
                    };
                    if outbound.send(reply).await.is_err() {
                        break;
                    }
                }
            }
        });
        Bystander {
            dispatcher: CommandServiceClient::new(node.channel().await),
            _handler: handler,
        }
    }

    /// `rounds` command round trips one after the other; returns the slowest and the median.
    async fn round_trips(&mut self, rounds: usize) -> (Duration, Duration) {
        let mut took = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let started = Instant::now();
            let response = tokio::time::timeout(
                Duration::from_secs(5),
                self.dispatcher
                    .dispatch(command(&format!("bystander-{i}-{}", unique()), "Bystander", 100, 5_000)),
            )
            .await
            .expect("the bystander's command was answered within 5 s")
            .unwrap()
            .into_inner();
            assert!(response.error_code.is_empty(), "{response:?}");
            took.push(started.elapsed());
        }
        took.sort();
        (took[took.len() - 1], took[took.len() / 2])
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The bystander's latency while a hostile client holds what it can: answered, and fast. On a
/// quiet machine a round trip takes about a millisecond; the bounds leave room for a busy CI.
async fn assert_bystander_unharmed(bystander: &mut Bystander) -> (Duration, Duration) {
    let (slowest, median) = bystander.round_trips(20).await;
    assert!(median < Duration::from_millis(100), "median round trip {median:?}");
    assert!(slowest < Duration::from_secs(1), "slowest round trip {slowest:?}");
    (slowest, median)
}

/// D7, scaled down: a handler that grants permits but never reads its stream nor answers, and
/// 600 commands of 256 KiB (150 MiB) dispatched to it. Before the fix the router kept them all
/// (it bounded the count, 10,000, not the bytes). Now its queue holds at most 8 MiB
/// (`myelin.limits.command-queue-bytes-per-client`) and every command beyond that fails at once
/// with AXONIQ-1900.
///
/// The proof is the count refused at once (none before the fix). The router's RSS is a sanity
/// bound: it grows by less than 140 MiB. Beside the 8 MiB queue it holds the commands still being
/// received (up to streams × message size per connection: the connection window bounds only what
/// is unread) and allocator slack, which vary with the machine and its load: 33 to 53 MiB seen
/// here, 80 MiB on CI, 96 MiB here while three builds ran. Before the fix the router kept every
/// command (+150 MiB seen).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_that_never_answers_holds_a_bounded_queue() {
    let node = node(&[
        ("MYELIN_LIMITS_COMMAND_QUEUE_BYTES_PER_CLIENT", "8MB"),
        ("MYELIN_LIMITS_COMMAND_QUEUE_BYTES", "32MB"),
    ])
    .await;
    let mut bystander = Bystander::start(&node).await;
    bystander.round_trips(5).await; // warm up
    let before = router_rss_mib(&node);

    // The hostile handler: permits galore, then it never reads nor answers.
    let hostile = command_handler(
        &node,
        "default",
        CommandSubscription {
            message_id: "hostile-sub".to_owned(),
            command: "Hostile".to_owned(),
            client_id: "hostile".to_owned(),
            component_name: "hostile-app".to_owned(),
            load_factor: 100,
        },
        1_000_000,
    )
    .await;

    // The hostile dispatcher: 600 commands of 256 KiB over 6 connections, all at once. Commands the node accepts stay unanswered until their 4 s TIMEOUT; the client
    // gives up on its own call after 6 s, so the loop ends whatever the node does.
    const COMMANDS: usize = 600;
    let mut dispatchers = Vec::new();
    for _ in 0..6 {
        dispatchers.push(CommandServiceClient::new(node.channel().await));
    }
    let started = Instant::now();
    let outcomes = futures::stream::iter(0..COMMANDS)
        .map(|i| {
            let mut client = dispatchers[i % dispatchers.len()].clone();
            async move {
                let call = client.dispatch(command(&format!("hostile-{i}"), "Hostile", 256 * KIB, 4_000));
                match tokio::time::timeout(Duration::from_secs(6), call).await {
                    Ok(Ok(response)) => Some(response.into_inner()),
                    Ok(Err(status)) => panic!("dispatch failed at the transport: {status}"),
                    Err(_) => None,
                }
            }
        })
        .buffer_unordered(COMMANDS);
    // Sample the router while the commands arrive, and check the bystander in the middle of it.
    let sampler = PeakRss::start(&node);
    // The bystander's round trips run while the hostile commands are queued or arriving.
    let (outcomes, (during, (slowest, median))) =
        tokio::join!(outcomes.collect::<Vec<Option<CommandResponse>>>(), async {
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            let during = router_rss_mib(&node);
            (during, assert_bystander_unharmed(&mut bystander).await)
        });
    let refused: Vec<&CommandResponse> = outcomes
        .iter()
        .flatten()
        .filter(|r| r.error_code == "AXONIQ-1900")
        .collect();
    let peak = sampler.peak().await.max(during);
    eprintln!(
        "D7: {} of {COMMANDS} refused in {:?}; router RSS {before} MiB before, peak {peak} MiB; \
         bystander median {median:?}, slowest {slowest:?}",
        refused.len(),
        started.elapsed()
    );

    assert!(peak < before + 140, "router RSS grew from {before} MiB to {peak} MiB");
    // 8 MiB hold about 32 of them; every other one is refused at once, with a clear error.
    assert!(refused.len() >= COMMANDS - 64, "only {} refused", refused.len());
    let message = &refused[0].error_message.as_ref().unwrap().message;
    assert!(
        message.contains("myelin.limits.command-queue-bytes"),
        "unclear error: {message}"
    );
    drop(hostile);
}

/// A command handler stream that subscribes `names` command names of `name_bytes` bytes each
/// (instruction ids on every subscribe), reading the acks as they come; returns how many were
/// acknowledged with success and the first refusal.
async fn subscribe_many(node: &Node, names: usize, name_bytes: usize) -> (usize, Option<String>, CommandHandlerStream) {
    let mut client = CommandServiceClient::new(node.channel().await);
    let (tx, rx) = mpsc::channel(1024);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("axoniq-context", "default".parse().unwrap());
    let mut inbound = client.open_stream(request).await.unwrap().into_inner();
    let sender = tokio::spawn({
        let tx = tx.clone();
        async move {
            for i in 0..names {
                let name = format!("com.example.hostile.Command{i:08}");
                let name = format!("{name}{}", "x".repeat(name_bytes.saturating_sub(name.len())));
                let subscribe = CommandProviderOutbound {
                    request: Some(CommandOutbound::Subscribe(CommandSubscription {
                        message_id: format!("s{i}"),
                        command: name,
                        client_id: "hostile".to_owned(),
                        component_name: "hostile-app".to_owned(),
                        load_factor: 100,
                    })),
                    instruction_id: format!("s{i}"),
                };
                if tx.send(subscribe).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut accepted = 0;
    let mut refusal = None;
    for _ in 0..names {
        let message = tokio::time::timeout(Duration::from_secs(20), inbound.next())
            .await
            .expect("every subscribe is acknowledged")
            .expect("the stream stays open")
            .unwrap();
        match message.request {
            Some(CommandInbound::Ack(ack)) if ack.success => accepted += 1,
            Some(CommandInbound::Ack(ack)) => {
                refusal.get_or_insert_with(|| {
                    let error = ack.error.unwrap_or_default();
                    format!("{} {}", error.error_code, error.message)
                });
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    sender.await.unwrap();
    (
        accepted,
        refusal,
        CommandHandlerStream {
            _client: client,
            _tx: tx,
            _inbound: inbound,
        },
    )
}

/// Keeps a handler stream open.
struct CommandHandlerStream {
    _client: CommandServiceClient<Channel>,
    _tx: mpsc::Sender<CommandProviderOutbound>,
    _inbound: tonic::Streaming<myelin_proto::axon::command::CommandProviderInbound>,
}

/// D9, scaled down: one command stream subscribes 30,000 command names of 300 bytes. Before the
/// fix the router took them all (about 40 bytes of hash ring per point, 100 points a name:
/// well over 100 MiB) and `GET /v1/handlers` answered 500 (the listing outgrew the 4 MiB
/// default of the internal call). Now the stream may subscribe 12,000 names
/// (`myelin.limits.command-subscriptions-per-stream`); every subscribe beyond is acknowledged
/// with `success: false`, AXONIQ-1900 and the key's name, and changes nothing. The listing of
/// what remains (about 5 MiB, more than the old limit) answers 200.
///
/// Bound: the router's RSS grows by less than 64 MiB (12,000 accepted names cost about 25 MiB
/// by the router's own accounting, see `subscription_cost`, plus the listing's transient
/// buffers: about 40 MiB seen); before the fix it grew by about 120 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_subscribes_without_end_is_capped_and_the_listing_still_answers() {
    const NAMES: usize = 30_000;
    const CAP: usize = 12_000;
    let node = node(&[("MYELIN_LIMITS_COMMAND_SUBSCRIPTIONS_PER_STREAM", "12000")]).await;
    let mut bystander = Bystander::start(&node).await;
    bystander.round_trips(5).await;
    let before = router_rss_mib(&node);

    let started = Instant::now();
    let sampler = PeakRss::start(&node);
    let (accepted, refusal, _hostile) = subscribe_many(&node, NAMES, 300).await;
    let subscribed_in = started.elapsed();
    let (slowest, median) = assert_bystander_unharmed(&mut bystander).await;

    let listing = myelin_tests::http::request(node.http_port, "GET", "/v1/handlers", None, None).await;
    let peak = sampler.peak().await.max(router_rss_mib(&node));
    eprintln!(
        "D9: {accepted} of {NAMES} subscribes accepted in {subscribed_in:?}; router RSS {before} MiB before, \
         peak {peak} MiB; /v1/handlers {} ({} bytes); bystander median {median:?}, slowest {slowest:?}",
        listing.status,
        listing.body.len()
    );
    assert!(peak < before + 64, "router RSS grew from {before} MiB to {peak} MiB");
    assert_eq!(listing.status, 200, "{}", &listing.body[..listing.body.len().min(500)]);
    assert_eq!(accepted, CAP, "first refusal: {refusal:?}");
    let refusal = refusal.expect("subscribes beyond the cap are refused");
    assert!(
        refusal.starts_with("AXONIQ-1900") && refusal.contains("myelin.limits.command-subscriptions-per-stream"),
        "unclear refusal: {refusal}"
    );
    let handlers = listing.json();
    let handlers = handlers.as_array().unwrap();
    assert_eq!(handlers.len(), CAP + 1, "the capped stream's names and the bystander's");
}

/// The query side of D7: a query handler that grants no permits, and 300 queries of 256 KiB
/// (75 MiB) for it. Its queue holds at most 8 MiB (`myelin.limits.query-queue-bytes-per-client`);
/// the queries beyond fail at once with AXONIQ-1900. A subscribe beyond
/// `myelin.limits.query-subscriptions-per-stream` is refused on the stream the same way.
///
/// The proof is the count refused at once (none before the fix). The router's RSS is a sanity
/// bound: it grows by less than 80 MiB (25 to 57 MiB seen; queries still being received count, see
/// the command test); before the fix it kept all 75 MiB (+86 MiB seen).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_query_handler_without_permits_holds_a_bounded_queue() {
    let node = node(&[
        ("MYELIN_LIMITS_QUERY_QUEUE_BYTES_PER_CLIENT", "8MB"),
        ("MYELIN_LIMITS_QUERY_SUBSCRIPTIONS_PER_STREAM", "2"),
    ])
    .await;
    let mut bystander = Bystander::start(&node).await;
    bystander.round_trips(5).await;
    let before = router_rss_mib(&node);

    // The hostile handler: subscribes (one too many) and never grants a permit.
    let (tx, rx) = mpsc::channel(16);
    let mut handler_client = QueryServiceClient::new(node.channel().await);
    let mut inbound = handler_client
        .open_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut acks = Vec::new();
    for (i, name) in ["HostileQuery", "Other"].into_iter().enumerate() {
        acks.push(query_subscribe(&tx, &mut inbound, i, name).await);
    }
    assert!(acks.iter().all(|ack| ack.success), "{acks:?}");

    const QUERIES: usize = 300;
    let mut dispatchers = Vec::new();
    for _ in 0..3 {
        dispatchers.push(QueryServiceClient::new(node.channel().await));
    }
    let outcomes = futures::stream::iter(0..QUERIES)
        .map(|i| {
            let mut client = dispatchers[i % dispatchers.len()].clone();
            async move {
                let request = QueryRequest {
                    message_identifier: format!("hq-{i}"),
                    query: "HostileQuery".to_owned(),
                    payload: Some(SerializedObject {
                        r#type: "bytes".to_owned(),
                        revision: String::new(),
                        data: vec![0x5a; 256 * KIB].into(),
                    }),
                    processing_instructions: vec![timeout_instruction(4_000)],
                    ..Default::default()
                };
                let first = async {
                    let mut responses = client.query(request).await.unwrap().into_inner();
                    responses.next().await
                };
                match tokio::time::timeout(Duration::from_secs(6), first).await {
                    Ok(Some(Ok(response))) => response.error_code,
                    Ok(other) => format!("{other:?}"),
                    Err(_) => "no answer".to_owned(),
                }
            }
        })
        .buffer_unordered(QUERIES);
    let sampler = PeakRss::start(&node);
    let (codes, (during, (slowest, median))) = tokio::join!(outcomes.collect::<Vec<String>>(), async {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let during = router_rss_mib(&node);
        (during, assert_bystander_unharmed(&mut bystander).await)
    });
    let refused = codes.iter().filter(|c| *c == "AXONIQ-1900").count();
    let peak = sampler.peak().await.max(during);
    eprintln!(
        "queries: {refused} of {QUERIES} refused; router RSS {before} MiB before, peak {peak} MiB; \
         bystander median {median:?}, slowest {slowest:?}"
    );
    assert!(peak < before + 80, "router RSS grew from {before} MiB to {peak} MiB");
    assert!(refused >= QUERIES - 40, "only {refused} refused: {:?}", &codes[..5]);

    // One name too many for the stream: refused on it, clearly, and nothing changes.
    let ack = query_subscribe(&tx, &mut inbound, 2, "OneTooMany").await;
    assert!(!ack.success, "{ack:?}");
    let refused = ack.error.unwrap_or_default();
    assert_eq!(refused.error_code, "AXONIQ-1900");
    assert!(
        refused.message.contains("myelin.limits.query-subscriptions-per-stream"),
        "{refused:?}"
    );
    let listing = myelin_tests::http::request(node.http_port, "GET", "/v1/handlers", None, None).await;
    assert_eq!(listing.status, 200);
    assert!(!listing.body.contains("OneTooMany"), "{}", listing.body);
    drop((tx, inbound));
}

/// Subscribes `name` on a query handler stream with instruction id `q{i}` and returns the ack.
async fn query_subscribe(
    tx: &mpsc::Sender<QueryProviderOutbound>,
    inbound: &mut tonic::Streaming<myelin_proto::axon::query::QueryProviderInbound>,
    i: usize,
    name: &str,
) -> myelin_proto::axon::InstructionAck {
    tx.send(QueryProviderOutbound {
        request: Some(QueryOutbound::Subscribe(QuerySubscription {
            message_id: format!("q{i}"),
            query: name.to_owned(),
            result_name: "bytes".to_owned(),
            component_name: "hostile-app".to_owned(),
            client_id: "hostile".to_owned(),
        })),
        instruction_id: format!("q{i}"),
    })
    .await
    .unwrap();
    let message = tokio::time::timeout(Duration::from_secs(5), inbound.next())
        .await
        .expect("the subscribe is acknowledged")
        .unwrap()
        .unwrap();
    match message.request {
        Some(QueryInbound::Ack(ack)) => ack,
        other => panic!("expected an ack, got {other:?}"),
    }
}
