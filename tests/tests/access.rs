//! Access control on a real node: tokens checked on gRPC (router) and HTTP (admin), roles per
//! context from applications registered over HTTP, changes reaching the router at once, and the
//! rules staying in force while admin is down.

use std::time::{Duration, Instant};

use myelin_proto::axon::event::event_store_client::EventStoreClient;
use myelin_proto::axon::event::{Event, GetLastTokenRequest};
use myelin_tests::http::{Reply, request};
use myelin_tests::{Node, Options, event};
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const ADMIN_TOKEN: &str = "admin-secret-for-tests";

async fn start() -> Node {
    let node = Node::start(Options {
        env: vec![
            ("AXONIQ_AXONSERVER_ACCESSCONTROL_ENABLED".into(), "true".into()),
            ("AXONIQ_AXONSERVER_ACCESSCONTROL_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ],
        ..Options::default()
    })
    .await;
    // Admin answers (and refuses without a token) once it is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while request(node.http_port, "GET", "/actuator/health", None, None)
        .await
        .status
        != 200
    {
        assert!(Instant::now() < deadline, "admin not up; log:\n{}", node.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("axoniq-access-token", token.parse().unwrap());
    }
    request
}

async fn last_token(client: &mut EventStoreClient<Channel>, token: Option<&str>) -> Result<i64, Status> {
    client
        .get_last_token(with_token(GetLastTokenRequest {}, token))
        .await
        .map(|r| r.into_inner().token)
}

async fn append(client: &mut EventStoreClient<Channel>, events: Vec<Event>, token: Option<&str>) -> Result<(), Status> {
    client
        .append_event(with_token(tokio_stream::iter(events), token))
        .await
        .map(|_| ())
}

fn assert_refused(result: Result<impl std::fmt::Debug, Status>, code: Code, axon_code: &str) {
    let status = result.expect_err("the call should have been refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(
        status.metadata().get("axoniq-errorcode").and_then(|v| v.to_str().ok()),
        Some(axon_code),
        "{status:?}"
    );
    assert!(status.message().contains(axon_code), "{status:?}");
}

async fn register(node: &Node, name: &str, context: &str, roles: &[&str]) -> String {
    let body = json!({ "name": name, "roles": [{ "context": context, "roles": roles }] });
    let reply = request(
        node.http_port,
        "POST",
        "/v1/applications",
        Some(body.to_string()),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.json()["token"].as_str().expect("token shown once").to_owned()
}

/// Polls until `check` holds: rule changes reach the router asynchronously (within milliseconds).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "{what} did not happen within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the router lets `token` read: a newly registered token reaches it asynchronously.
async fn reaches_the_router(what: &str, client: &EventStoreClient<Channel>, token: &str) {
    eventually(&format!("{what} reaching the router"), || {
        let mut client = client.clone();
        let token = token.to_owned();
        async move { last_token(&mut client, Some(&token)).await.is_ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_need_a_token_that_grants_the_operation_in_the_context() {
    let node = start().await;
    let mut client = node.client().await;

    assert_refused(
        last_token(&mut client, None).await,
        Code::Unauthenticated,
        "AXONIQ-1000",
    );
    assert_refused(
        last_token(&mut client, Some("not-a-token")).await,
        Code::Unauthenticated,
        "AXONIQ-1001",
    );
    assert_refused(
        append(&mut client, vec![event("a-1", 0, "e-0")], None).await,
        Code::Unauthenticated,
        "AXONIQ-1000",
    );
    // The admin token does everything.
    append(&mut client, vec![event("a-1", 0, "e-0")], Some(ADMIN_TOKEN))
        .await
        .unwrap();
    assert_eq!(last_token(&mut client, Some(ADMIN_TOKEN)).await.unwrap(), 0);

    // A reader may read in its context only, and may not append.
    let reader = register(&node, "reporting", "default", &["READ_EVENTS"]).await;
    reaches_the_router("the reader's token", &client, &reader).await;
    assert_refused(
        append(&mut client, vec![event("a-1", 1, "e-1")], Some(&reader)).await,
        Code::PermissionDenied,
        "AXONIQ-1001",
    );
    // A refused append stored nothing.
    assert_eq!(last_token(&mut client, Some(&reader)).await.unwrap(), 0);

    // A writer appends; its grant is for `default` only.
    let writer = register(&node, "billing", "default", &["PUBLISH_EVENTS"]).await;
    eventually("the writer's token reaching the router", || {
        let mut client = client.clone();
        let writer = writer.clone();
        async move {
            append(&mut client, vec![event("w-1", 0, "w-0")], Some(&writer))
                .await
                .is_ok()
        }
    })
    .await;
    assert_eq!(last_token(&mut client, Some(&reader)).await.unwrap(), 1);
    let mut other_context = node.client().await;
    let mut in_orders = with_token(GetLastTokenRequest {}, Some(&writer));
    in_orders
        .metadata_mut()
        .insert("axoniq-context", "orders".parse().unwrap());
    let refused = other_context.get_last_token(in_orders).await;
    assert_refused(refused, Code::PermissionDenied, "AXONIQ-1001");

    // Deleting the application revokes its token.
    let reply = request(
        node.http_port,
        "DELETE",
        "/v1/applications/reporting",
        None,
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    eventually("the deleted application's token being refused", || {
        let mut client = client.clone();
        let reader = reader.clone();
        async move {
            last_token(&mut client, Some(&reader))
                .await
                .is_err_and(|s| s.code() == Code::Unauthenticated)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_calls_need_a_token_and_health_stays_open() {
    let node = start().await;
    let port = node.http_port;
    let get = |path: &'static str, token: Option<&'static str>| request(port, "GET", path, None, token);

    get("/v1/public/context", None).await.assert_error(401, "AXONIQ-1000");
    get("/v1/public/context", Some("wrong"))
        .await
        .assert_error(401, "AXONIQ-1001");
    let ok: Reply = get("/v1/public/context", Some(ADMIN_TOKEN)).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    // The token may also come as a query parameter (for browsers).
    let reply = request(
        port,
        "GET",
        &format!("/v1/public?AxonIQ-Access-Token={ADMIN_TOKEN}"),
        None,
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(get("/actuator/health", None).await.status, 200);
    assert_eq!(get("/v3/api-docs", None).await.status, 200);

    // A client application's token does not administer the node, and a refused create changes
    // nothing.
    let app = register(&node, "orders-app", "default", &["USE_CONTEXT"]).await;
    let body = json!({ "context": "sneaky" }).to_string();
    let reply = request(port, "POST", "/v1/context", Some(body), Some(&app)).await;
    reply.assert_error(403, "AXONIQ-1001");
    let contexts = get("/v1/public/context", Some(ADMIN_TOKEN)).await.body;
    assert!(!contexts.contains("sneaky"), "{contexts}");
    // But it may look at its own context's processors.
    let reply = request(port, "GET", "/v1/processors?context=default", None, Some(&app)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_router_keeps_enforcing_the_last_rules_while_admin_is_down() {
    let node = start().await;
    let mut client = node.client().await;
    let reader = register(&node, "reporting", "default", &["READ_EVENTS"]).await;
    reaches_the_router("the reader's token", &client, &reader).await;

    // Stop admin and keep it stopped long enough to check (the supervisor restarts it later).
    let admin = node.child_pid("admin").expect("admin pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(admin), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let during = async {
        assert!(last_token(&mut client, Some(&reader)).await.is_ok());
        assert_refused(
            last_token(&mut client, None).await,
            Code::Unauthenticated,
            "AXONIQ-1000",
        );
    };
    tokio::time::timeout(Duration::from_secs(10), during)
        .await
        .expect("router answered");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(admin), nix::sys::signal::Signal::SIGCONT).unwrap();
}

/// Scheduling, rescheduling and cancelling a scheduled event need the right to append events
/// (issue 14), as in Axon Server: a reader is refused, a writer is not.
#[tokio::test(flavor = "multi_thread")]
async fn the_event_scheduler_needs_the_right_to_append_events() {
    use myelin_proto::axon::event::event_scheduler_client::EventSchedulerClient;
    use myelin_proto::axon::event::{CancelScheduledEventRequest, RescheduleEventRequest, ScheduleEventRequest};
    let node = start().await;
    let client = node.client().await;
    let mut scheduler = EventSchedulerClient::new(node.channel().await);
    let request = || ScheduleEventRequest {
        instant: i64::MAX,
        event: Some(Event {
            message_identifier: "later".into(),
            ..Default::default()
        }),
    };
    assert_refused(
        scheduler.schedule_event(with_token(request(), None)).await,
        Code::Unauthenticated,
        "AXONIQ-1000",
    );
    let reader = register(&node, "reporting", "default", &["READ_EVENTS"]).await;
    reaches_the_router("the reader's token", &client, &reader).await;
    assert_refused(
        scheduler.schedule_event(with_token(request(), Some(&reader))).await,
        Code::PermissionDenied,
        "AXONIQ-1001",
    );
    assert_refused(
        scheduler
            .reschedule_event(with_token(RescheduleEventRequest::default(), Some(&reader)))
            .await,
        Code::PermissionDenied,
        "AXONIQ-1001",
    );
    assert_refused(
        scheduler
            .cancel_scheduled_event(with_token(CancelScheduledEventRequest::default(), Some(&reader)))
            .await,
        Code::PermissionDenied,
        "AXONIQ-1001",
    );
    let writer = register(&node, "billing", "default", &["PUBLISH_EVENTS"]).await;
    let scheduled = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    eventually("the writer's token reaching the router", || {
        let mut scheduler = scheduler.clone();
        let writer = writer.clone();
        let request = request();
        let scheduled = scheduled.clone();
        async move {
            match scheduler.schedule_event(with_token(request, Some(&writer))).await {
                Ok(reply) => {
                    *scheduled.lock().unwrap() = reply.into_inner().token;
                    true
                }
                Err(_) => false,
            }
        }
    })
    .await;
    let token = scheduled.lock().unwrap().clone();
    assert!(!token.is_empty());
    let ack = scheduler
        .cancel_scheduled_event(with_token(CancelScheduledEventRequest { token }, Some(&writer)))
        .await
        .unwrap()
        .into_inner();
    assert!(ack.success);
}
