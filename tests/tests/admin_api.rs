//! The admin REST API over real HTTP against a real node: contexts created and deleted over HTTP
//! and used over gRPC in between, bad requests answered 4xx with a JSON body (and nothing
//! changed), applications whose token is shown once and stored only hashed, connected clients
//! and processor instructions reaching a real control stream, health and metrics.

use std::time::{Duration, Instant};

use myelin_proto::axon::InstructionAck;
use myelin_proto::axon::control::platform_inbound_instruction::Request as Inbound;
use myelin_proto::axon::control::platform_outbound_instruction::Request as Outbound;
use myelin_proto::axon::control::platform_service_client::PlatformServiceClient;
use myelin_proto::axon::control::{
    ClientIdentification, EventProcessorInfo, PlatformInboundInstruction, PlatformOutboundInstruction,
    event_processor_info::SegmentStatus,
};
use myelin_proto::axon::event::event_store_client::EventStoreClient;
use myelin_proto::axon::event::{GetAggregateEventsRequest, GetEventsRequest, GetLastTokenRequest};
use myelin_tests::http::Reply;
use myelin_tests::{Node, Options, event, with_context};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

async fn http(port: u16, method: &'static str, path: &str, body: Option<String>) -> Reply {
    myelin_tests::http::request(port, method, path, body, None).await
}

async fn get(node: &Node, path: &str) -> Reply {
    http(node.http_port, "GET", path, None).await
}

async fn post(node: &Node, path: &str, body: Value) -> Reply {
    http(node.http_port, "POST", path, Some(body.to_string())).await
}

async fn delete(node: &Node, path: &str) -> Reply {
    http(node.http_port, "DELETE", path, None).await
}

async fn context_names(node: &Node) -> Vec<String> {
    let reply = get(node, "/v1/public/context").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["context"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until admin answers and has recorded the event store's contexts.
async fn admin_ready(node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let url = format!("http://127.0.0.1:{}/v1/public/context", node.http_port);
        let ok = tokio::task::spawn_blocking(move || {
            ureq::get(&url)
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
        })
        .await
        .unwrap();
        if ok.is_some_and(|body| body.contains("\"default\"")) {
            return;
        }
        assert!(Instant::now() < deadline, "admin not ready; log:\n{}", node.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start() -> Node {
    let node = Node::start(Options::default()).await;
    admin_ready(&node).await;
    node
}

async fn event_store(node: &Node) -> EventStoreClient<Channel> {
    node.client().await
}

fn assert_context_not_found(status: &tonic::Status, context: &str) {
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert_eq!(
        status.metadata().get("axoniq-errorcode").and_then(|v| v.to_str().ok()),
        Some("AXONIQ-1302"),
        "{status:?}"
    );
    assert!(status.message().contains(context), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_created_over_http_serves_grpc_until_deleted() {
    let mut node = start().await;
    assert_eq!(context_names(&node).await, ["_admin", "default"]);

    let created = post(
        &node,
        "/v1/context",
        json!({"context": "orders", "metaData": {"team": "a"}}),
    )
    .await;
    assert_eq!(created.status, 200, "{created:?}");
    let me = get(&node, "/v1/public/me").await.json();
    let this_node = me["name"].as_str().unwrap().to_owned();
    assert_eq!(created.json()["roles"], json!([{"node": this_node, "role": "PRIMARY"}]));
    assert!(node.data.join("orders").is_dir());

    // Events in the new context over gRPC, separate from `default`.
    let mut client = event_store(&node).await;
    let events = vec![event("o-1", 0, "e0"), event("o-1", 1, "e1"), event("o-1", 2, "e2")];
    client
        .append_event(with_context(tokio_stream::iter(events), "orders"))
        .await
        .unwrap();
    let last = client
        .get_last_token(with_context(GetLastTokenRequest {}, "orders"))
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(last, 2);
    let default_last = client
        .get_last_token(GetLastTokenRequest {})
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(default_last, -1, "the default context saw none of it");
    let mut aggregate = client
        .list_aggregate_events(with_context(
            GetAggregateEventsRequest {
                aggregate_id: "o-1".into(),
                ..Default::default()
            },
            "orders",
        ))
        .await
        .unwrap()
        .into_inner();
    let mut sequences = Vec::new();
    while let Some(e) = aggregate.message().await.unwrap() {
        sequences.push(e.aggregate_sequence_number);
    }
    assert_eq!(sequences, [0, 1, 2]);

    let details = get(&node, "/v1/context/orders").await;
    assert_eq!(details.status, 200, "{details:?}");
    let details = details.json();
    assert_eq!(details["eventStore"]["lastToken"], 2, "{details}");
    assert_eq!(details["eventStore"]["firstToken"], 0, "{details}");
    assert_eq!(details["metaData"], json!({"team": "a"}));

    // A tracking stream that is open, caught up and waiting when the context goes.
    let (requests, rx) = mpsc::channel(4);
    requests
        .send(GetEventsRequest {
            tracking_token: 0,
            number_of_permits: 100,
            client_id: "tracker".into(),
            component_name: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut tracker = client
        .list_events(with_context(ReceiverStream::new(rx), "orders"))
        .await
        .unwrap()
        .into_inner();
    for token in 0..3 {
        assert_eq!(tracker.message().await.unwrap().unwrap().token, token);
    }

    let deleted = delete(&node, "/v1/context/orders").await;
    assert_eq!(deleted.status, 200, "{deleted:?}");
    assert_eq!(
        deleted.json(),
        json!({"context": "orders", "preservedEventStore": false})
    );

    let ended = tokio::time::timeout(Duration::from_secs(10), tracker.message())
        .await
        .expect("the tracking stream ends");
    assert_context_not_found(&ended.expect_err("ends with an error"), "orders");
    drop(requests);

    let status = client
        .get_last_token(with_context(GetLastTokenRequest {}, "orders"))
        .await
        .unwrap_err();
    assert_context_not_found(&status, "orders");
    let status = client
        .append_event(with_context(tokio_stream::iter(vec![event("o-2", 0, "x")]), "orders"))
        .await
        .unwrap_err();
    assert_context_not_found(&status, "orders");
    assert!(!node.data.join("orders").exists(), "the storage directory is gone");
    let leftovers: Vec<String> = std::fs::read_dir(&node.data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("orders"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    get(&node, "/v1/context/orders").await.assert_error(404, "AXONIQ-1302");
    delete(&node, "/v1/context/orders")
        .await
        .assert_error(404, "AXONIQ-1302");
    assert_eq!(context_names(&node).await, ["_admin", "default"]);

    // Created again, it starts empty; and it survives a restart, while a deleted one stays gone.
    assert_eq!(
        post(&node, "/v1/context", json!({"context": "orders"})).await.status,
        200
    );
    assert_eq!(post(&node, "/v1/context", json!({"context": "gone"})).await.status, 200);
    assert_eq!(delete(&node, "/v1/context/gone").await.status, 200);
    let last = client
        .get_last_token(with_context(GetLastTokenRequest {}, "orders"))
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(last, -1);
    node.stop();
    node.launch().await;
    admin_ready(&node).await;
    assert_eq!(context_names(&node).await, ["_admin", "default", "orders"]);
    let mut client = event_store(&node).await;
    assert_context_not_found(
        &client
            .get_last_token(with_context(GetLastTokenRequest {}, "gone"))
            .await
            .unwrap_err(),
        "gone",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_with_preserve_keeps_the_files_aside() {
    let node = start().await;
    assert_eq!(post(&node, "/v1/context", json!({"context": "keep"})).await.status, 200);
    let mut client = event_store(&node).await;
    client
        .append_event(with_context(tokio_stream::iter(vec![event("k", 0, "k0")]), "keep"))
        .await
        .unwrap();
    let deleted = delete(&node, "/v1/context/keep?preserveEventStore=true").await;
    assert_eq!(deleted.status, 200, "{deleted:?}");
    assert_eq!(deleted.json()["preservedEventStore"], true);
    assert!(!node.data.join("keep").exists());
    let preserved: Vec<_> = std::fs::read_dir(node.data.join(".preserved"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(preserved.len(), 1, "{preserved:?}");
    assert!(preserved[0].join("events").is_dir(), "{preserved:?}");
    assert!(!context_names(&node).await.contains(&"keep".to_owned()));
    delete(&node, "/v1/context/keep?preserveEventStore=maybe")
        .await
        .assert_error(400, "AXONIQ-0001");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_4xx_with_json_and_change_nothing() {
    let node = start().await;
    let port = node.http_port;
    let before = context_names(&node).await;

    post(&node, "/v1/context", json!({"context": "default"}))
        .await
        .assert_error(400, "AXONIQ-1304");
    for name in ["a/b", "", ".hidden", "sp ace", &"x".repeat(65), "_mine", "_admin"] {
        post(&node, "/v1/context", json!({"context": name}))
            .await
            .assert_error(400, "AXONIQ-2308");
    }
    delete(&node, "/v1/context/_admin")
        .await
        .assert_error(403, "AXONIQ-2304");
    delete(&node, "/v1/context/a%20b")
        .await
        .assert_error(400, "AXONIQ-2308");
    post(
        &node,
        "/v1/context",
        json!({"context": "c1", "roles": [{"node": "no-such-node", "role": "PRIMARY"}]}),
    )
    .await
    .assert_error(404, "AXONIQ-1301");
    let me = get(&node, "/v1/public/me").await.json();
    let this_node = me["name"].as_str().unwrap();
    post(
        &node,
        "/v1/context",
        json!({"context": "c1", "roles": [{"node": this_node, "role": "CAPTAIN"}]}),
    )
    .await
    .assert_error(400, "AXONIQ-2510");
    post(&node, "/v1/context", json!({"context": "c1", "colour": "red"}))
        .await
        .assert_error(400, "AXONIQ-0001");
    post(&node, "/v1/context", json!({"context": 42}))
        .await
        .assert_error(400, "AXONIQ-0001");
    http(port, "POST", "/v1/context", Some("{not json".into()))
        .await
        .assert_error(400, "AXONIQ-0001");
    http(port, "POST-TEXT", "/v1/context", Some("{\"context\":\"c1\"}".into()))
        .await
        .assert_error(415, "AXONIQ-0001");
    let huge = json!({"context": "c1", "metaData": {"k": "v".repeat(100_000)}});
    post(&node, "/v1/context", huge).await.assert_error(413, "AXONIQ-0001");
    let many: serde_json::Map<String, Value> = (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    post(&node, "/v1/context", json!({"context": "c1", "metaData": many}))
        .await
        .assert_error(400, "AXONIQ-2311");
    http(port, "PATCH", "/v1/context", None)
        .await
        .assert_error(405, "AXONIQ-0001");
    get(&node, "/v1/no/such/thing").await.assert_error(404, "AXONIQ-0001");
    get(&node, "/v1/context/nope").await.assert_error(404, "AXONIQ-1302");
    get(&node, "/v1/clients?context=a%2Fb")
        .await
        .assert_error(400, "AXONIQ-2308");
    get(&node, "/v1/processors?context=nope")
        .await
        .assert_error(404, "AXONIQ-1302");
    http(port, "PATCH", "/v1/instructions", None)
        .await
        .assert_error(400, "AXONIQ-0001");

    assert_eq!(context_names(&node).await, before, "nothing changed");
    assert!(!node.data.join("c1").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_token_is_shown_once_and_stored_hashed() {
    let node = start().await;
    let created = post(
        &node,
        "/v1/applications",
        json!({"name": "billing", "description": "Billing service",
               "roles": [{"context": "default", "roles": ["READ_EVENTS", "publish_events"]},
                         {"context": "*", "roles": ["MONITOR"]}]}),
    )
    .await;
    assert_eq!(created.status, 200, "{created:?}");
    let created = created.json();
    assert_eq!(created["name"], "billing");
    let token = created["token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 64, "32 random bytes, hex");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));

    let listed = get(&node, "/v1/public/applications").await;
    assert_eq!(listed.status, 200);
    assert!(
        !listed.body.contains(&token),
        "a listing never shows a token: {listed:?}"
    );
    let listed = listed.json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["tokenPrefix"], &token[..8]);
    assert_eq!(listed[0]["description"], "Billing service");
    assert_eq!(
        listed[0]["roles"],
        json!([{"context": "*", "roles": ["MONITOR"]},
               {"context": "default", "roles": ["PUBLISH_EVENTS", "READ_EVENTS"]}])
    );
    // The control DB file (and its WAL) holds no copy of the token.
    let control_db_dir = node.data.join("_admin");
    for entry in std::fs::read_dir(&control_db_dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "token stored in clear"
        );
    }

    post(&node, "/v1/applications", json!({"name": "billing"}))
        .await
        .assert_error(400, "AXONIQ-0001");
    post(
        &node,
        "/v1/applications",
        json!({"name": "other", "roles": [{"context": "default", "roles": ["SUPERUSER"]}]}),
    )
    .await
    .assert_error(400, "AXONIQ-2510");
    post(
        &node,
        "/v1/applications",
        json!({"name": "other", "roles": [{"context": "nope", "roles": ["READ"]}]}),
    )
    .await
    .assert_error(404, "AXONIQ-1302");
    post(&node, "/v1/applications", json!({"name": "bad name"}))
        .await
        .assert_error(400, "AXONIQ-0001");
    post(&node, "/v1/applications", json!({"name": "short", "token": "abc"}))
        .await
        .assert_error(400, "AXONIQ-0001");
    let own = post(
        &node,
        "/v1/applications",
        json!({"name": "own", "token": "my-own-token-0123456789"}),
    )
    .await;
    assert_eq!(own.json()["token"], "my-own-token-0123456789");
    post(
        &node,
        "/v1/applications",
        json!({"name": "copycat", "token": "my-own-token-0123456789"}),
    )
    .await
    .assert_error(400, "AXONIQ-0001");

    assert_eq!(
        delete(&node, "/v1/applications/billing").await.json(),
        json!({"name": "billing"})
    );
    delete(&node, "/v1/applications/billing")
        .await
        .assert_error(404, "AXONIQ-1300");
    let names: Vec<Value> = get(&node, "/v1/public/applications")
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].clone())
        .collect();
    assert_eq!(names, [json!("own")]);
}

/// A client application's control stream that acknowledges every instruction it gets.
async fn client_app(
    node: &Node,
    client_id: &str,
) -> (
    mpsc::Sender<PlatformInboundInstruction>,
    mpsc::UnboundedReceiver<Outbound>,
) {
    let channel = node.channel().await;
    let mut platform = PlatformServiceClient::new(channel);
    let (outbound, rx) = mpsc::channel(16);
    let mut inbound = platform
        .open_stream(with_context(ReceiverStream::new(rx), "default"))
        .await
        .unwrap()
        .into_inner();
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let acks = outbound.clone();
    tokio::spawn(async move {
        let _platform = platform;
        while let Ok(Some(PlatformOutboundInstruction {
            request: Some(request),
            instruction_id,
        })) = inbound.message().await
        {
            if matches!(request, Outbound::Heartbeat(_) | Outbound::Ack(_)) {
                continue;
            }
            if !instruction_id.is_empty() {
                let ack = InstructionAck {
                    instruction_id,
                    success: true,
                    error: None,
                };
                let _ = acks
                    .send(PlatformInboundInstruction {
                        request: Some(Inbound::Ack(ack)),
                        instruction_id: String::new(),
                    })
                    .await;
            }
            let _ = seen_tx.send(request);
        }
    });
    let register = ClientIdentification {
        client_id: client_id.to_owned(),
        component_name: "shop".to_owned(),
        tags: Default::default(),
        version: "4.6.0".to_owned(),
    };
    outbound
        .send(PlatformInboundInstruction {
            request: Some(Inbound::Register(register)),
            instruction_id: String::new(),
        })
        .await
        .unwrap();
    (outbound, seen)
}

async fn poll_json(node: &Node, path: &str, until: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = get(node, path).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let value = reply.json();
        if until(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{path}: {value}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_processors_and_instructions_reach_a_connected_client() {
    let node = start().await;
    let (outbound, mut seen) = client_app(&node, "shop-1").await;
    let clients = poll_json(&node, "/v1/clients?context=default", |v| {
        v.as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    assert_eq!(clients[0]["clientId"], "shop-1");
    assert_eq!(clients[0]["componentName"], "shop");
    assert_eq!(clients[0]["context"], "default");

    let info = EventProcessorInfo {
        processor_name: "orders-projection".into(),
        mode: "Pooled".into(),
        running: true,
        is_streaming_processor: true,
        segment_status: vec![
            SegmentStatus {
                segment_id: 0,
                one_part_of: 2,
                ..Default::default()
            },
            SegmentStatus {
                segment_id: 1,
                one_part_of: 4,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    outbound
        .send(PlatformInboundInstruction {
            request: Some(Inbound::EventProcessorInfo(info)),
            instruction_id: String::new(),
        })
        .await
        .unwrap();
    let processors = poll_json(&node, "/v1/processors?context=default", |v| {
        v.as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    assert_eq!(processors[0]["processorName"], "orders-projection");
    assert_eq!(processors[0]["segments"].as_array().unwrap().len(), 2);

    let port = node.http_port;
    let base = "/v1/components/shop/processors/orders-projection";
    let paused = http(port, "PATCH", &format!("{base}/pause?context=default"), None).await;
    assert_eq!(paused.status, 200, "{paused:?}");
    assert_eq!(paused.json(), json!({"result": "SUCCESS", "clients": ["shop-1"]}));
    let split = http(port, "PATCH", &format!("{base}/segments/split"), None).await;
    assert_eq!(split.status, 200, "{split:?}");
    let merge = http(port, "PATCH", &format!("{base}/segments/merge"), None).await;
    assert_eq!(merge.status, 200, "{merge:?}");
    let reconnect = http(port, "PATCH", "/v1/instructions?client=shop-1&context=default", None).await;
    assert_eq!(reconnect.status, 200, "{reconnect:?}");
    let mut got = Vec::new();
    while got.len() < 4 {
        let instruction = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .expect("instructions arrive")
            .unwrap();
        got.push(instruction);
    }
    assert!(matches!(&got[0], Outbound::PauseEventProcessor(p) if p.processor_name == "orders-projection"));
    // The largest segment (one half) is split, the smallest (one quarter) merged.
    assert!(
        matches!(&got[1], Outbound::SplitEventProcessorSegment(s) if s.segment_identifier == 0),
        "{got:?}"
    );
    assert!(
        matches!(&got[2], Outbound::MergeEventProcessorSegment(s) if s.segment_identifier == 1),
        "{got:?}"
    );
    assert!(matches!(&got[3], Outbound::RequestReconnect(_)), "{got:?}");

    http(port, "PATCH", "/v1/components/shop/processors/nope/start", None)
        .await
        .assert_error(404, "AXONIQ-2800");
    http(port, "PATCH", "/v1/instructions?client=nobody", None)
        .await
        .assert_error(404, "AXONIQ-1300");
    let handlers = get(&node, "/v1/handlers").await;
    assert_eq!(handlers.status, 200, "{handlers:?}");
    assert!(handlers.json().is_array());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_api_description_answer() {
    let node = start().await;
    let health = get(&node, "/actuator/health").await;
    assert_eq!(health.status, 200, "{health:?}");
    let health = health.json();
    assert_eq!(health["status"], "UP", "{health}");
    assert_eq!(health["components"]["eventStore"]["status"], "UP");
    assert_eq!(
        health["components"]["eventStore"]["details"]["default"]["lastEvent"],
        -1
    );
    assert_eq!(health["components"]["router"]["status"], "UP");
    assert!(health["components"]["diskSpace"]["details"]["free"].as_u64().unwrap() > 0);

    let metrics = get(&node, "/actuator/prometheus").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.content_type.starts_with("text/plain"), "{metrics:?}");
    assert!(
        metrics
            .body
            .contains("myelin_admin_http_requests_total{method=\"GET\",route=\"/actuator/health\",status=\"200\"} 1"),
        "{}",
        metrics.body
    );

    let api = get(&node, "/v3/api-docs").await;
    assert_eq!(api.status, 200);
    let api = api.json();
    assert!(api["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/context",
        "/v1/public/context",
        "/v1/applications",
        "/actuator/health",
    ] {
        assert!(api["paths"].get(path).is_some(), "{path}");
    }
    let redirect = get(&node, "/swagger-ui.html").await;
    assert!((300..400).contains(&redirect.status), "{redirect:?}");
    assert_eq!(redirect.location.as_deref(), Some("/swagger-ui/"));
    let ui = get(&node, "/swagger-ui/").await;
    assert_eq!(ui.status, 200);
    assert!(ui.body.contains("swagger"), "{}", &ui.body[..ui.body.len().min(200)]);

    // A stopped event store makes the node DOWN (503); it is UP again once it answers.
    let eventstore = nix::unistd::Pid::from_raw(node.child_pid("eventstore").unwrap());
    nix::sys::signal::kill(eventstore, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let down = get(&node, "/actuator/health").await;
    nix::sys::signal::kill(eventstore, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(down.status, 503, "{down:?}");
    assert_eq!(down.json()["status"], "DOWN");
    assert_eq!(down.json()["components"]["eventStore"]["status"], "DOWN");
    poll_json(&node, "/actuator/health", |v| v["status"] == "UP").await;
}

/// Issue 16, defect 6: a deleted context's series stayed in `/actuator/prometheus` for the life
/// of the router and event store processes. Now a scrape shows only contexts the node has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_contexts_metrics_are_dropped() {
    let node = start().await;
    let created = post(&node, "/v1/context", json!({"context": "orders"})).await;
    assert_eq!(created.status, 200, "{created:?}");
    let mut client = event_store(&node).await;
    client
        .append_event(with_context(tokio_stream::iter(vec![event("o-1", 0, "e0")]), "orders"))
        .await
        .unwrap();
    let orders = "context=\"orders\"";
    let scrape = get(&node, "/actuator/prometheus").await;
    assert!(scrape.body.contains(orders), "no series of orders: {}", scrape.body);
    assert!(scrape.body.contains("context=\"default\""), "{}", scrape.body);

    let deleted = delete(&node, "/v1/context/orders").await;
    assert_eq!(deleted.status, 200, "{deleted:?}");
    let scrape = get(&node, "/actuator/prometheus").await;
    let left: Vec<&str> = scrape.body.lines().filter(|l| l.contains(orders)).collect();
    assert!(left.is_empty(), "series of the deleted context:\n{}", left.join("\n"));
    assert!(scrape.body.contains("context=\"default\""), "{}", scrape.body);
}
