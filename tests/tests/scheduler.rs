//! Axon's EventScheduler against real nodes (issue 14): schedule, reschedule and cancel; a
//! scheduled event is appended once, at its instant or just after, as an ordinary event of the
//! context; schedules survive a node restart and a leader change, and a follower forwards them
//! to the leader.

use std::time::{Duration, Instant};

use myelin_proto::axon::SerializedObject;
use myelin_proto::axon::event::event_scheduler_client::EventSchedulerClient;
use myelin_proto::axon::event::{
    CancelScheduledEventRequest, Event, RescheduleEventRequest, ScheduleEventRequest, ScheduleToken,
};
use myelin_tests::cluster::{Cluster, node_name};
use myelin_tests::{Node, Options, read_all, with_context};
use tonic::transport::Channel;

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// An event of no aggregate, as Axon Framework schedules them.
fn scheduled(id: &str) -> Event {
    Event {
        message_identifier: id.to_owned(),
        timestamp: now_millis(),
        payload: Some(SerializedObject {
            r#type: "Reminder".to_owned(),
            revision: String::new(),
            data: bytes::Bytes::from(format!("<reminder>{id}</reminder>")),
        }),
        ..Default::default()
    }
}

async fn schedule(client: &mut EventSchedulerClient<Channel>, id: &str, instant: i64) -> String {
    client
        .schedule_event(ScheduleEventRequest {
            instant,
            event: Some(scheduled(id)),
        })
        .await
        .unwrap_or_else(|e| panic!("schedule {id}: {e}"))
        .into_inner()
        .token
}

async fn cancel(client: &mut EventSchedulerClient<Channel>, token: &str) {
    let ack = client
        .cancel_scheduled_event(CancelScheduledEventRequest { token: token.into() })
        .await
        .unwrap_or_else(|e| panic!("cancel {token}: {e}"))
        .into_inner();
    assert!(ack.success, "{ack:?}");
}

/// How often each message identifier is in node's `default` context.
async fn published(node: &Node) -> Vec<String> {
    let mut client = node.client().await;
    read_all(&mut client)
        .await
        .into_iter()
        .map(|(_, e)| e.message_identifier)
        .collect()
}

fn count(ids: &[String], id: &str) -> usize {
    ids.iter().filter(|i| *i == id).count()
}

/// Waits until `id` is published (by `read`), and returns when it was seen.
async fn wait_published<F, Fut>(read: F, id: &str, within: Duration) -> Instant
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    let deadline = Instant::now() + within;
    loop {
        if count(&read().await, id) > 0 {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{id} not published within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_reschedule_and_cancel_publish_each_event_once_at_its_time() {
    let node = Node::start(Options::default()).await;
    let mut client = EventSchedulerClient::new(node.channel().await);
    let start = now_millis();
    let at = start + 1_500;
    let kept = schedule(&mut client, "kept", at).await;
    let moved = schedule(&mut client, "moved", at).await;
    let cancelled = schedule(&mut client, "cancelled", at).await;
    assert!(!kept.is_empty() && kept != moved && moved != cancelled);
    let ScheduleToken { token: rescheduled } = client
        .reschedule_event(RescheduleEventRequest {
            token: moved.clone(),
            instant: at + 1_000,
            event: Some(scheduled("moved-later")),
        })
        .await
        .unwrap()
        .into_inner();
    cancel(&mut client, &cancelled).await;
    // Axon answers success for a token it does not know, and for none at all.
    cancel(&mut client, "no-such-token").await;
    cancel(&mut client, "").await;
    // A reschedule naming no token (or an unknown one) is a plain schedule.
    let fresh = client
        .reschedule_event(RescheduleEventRequest {
            token: String::new(),
            instant: at,
            event: Some(scheduled("fresh")),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert!(!fresh.is_empty());

    // Nothing before its time.
    assert!(published(&node).await.is_empty(), "published early");

    let seen = wait_published(|| published(&node), "kept", Duration::from_secs(10)).await;
    assert!(now_millis() >= at, "published before its instant");
    let _ = seen;
    let ids = published(&node).await;
    assert_eq!(
        count(&ids, "moved-later"),
        0,
        "the rescheduled event is not due yet: {ids:?}"
    );
    wait_published(|| published(&node), "moved-later", Duration::from_secs(10)).await;
    assert!(now_millis() >= at + 1_000);

    // Cancelling an event already published succeeds and changes nothing.
    cancel(&mut client, &kept).await;
    cancel(&mut client, &rescheduled).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let ids = published(&node).await;
    assert_eq!(count(&ids, "kept"), 1, "{ids:?}");
    assert_eq!(count(&ids, "fresh"), 1, "{ids:?}");
    assert_eq!(count(&ids, "moved-later"), 1, "{ids:?}");
    assert_eq!(count(&ids, "moved"), 0, "{ids:?}");
    assert_eq!(count(&ids, "cancelled"), 0, "{ids:?}");
    assert_eq!(ids.len(), 3, "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schedules_are_refused_as_appends_are() {
    let node = Node::start(Options::default()).await;
    let mut client = EventSchedulerClient::new(node.channel().await);
    let code = |status: &tonic::Status| {
        status
            .metadata()
            .get("axoniq-errorcode")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let missing = client
        .schedule_event(ScheduleEventRequest {
            instant: 0,
            event: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument, "{missing:?}");
    let aggregate = client
        .schedule_event(ScheduleEventRequest {
            instant: 0,
            event: Some(Event {
                aggregate_identifier: "a".into(),
                aggregate_type: "T".into(),
                ..scheduled("with-aggregate")
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(aggregate.code(), tonic::Code::InvalidArgument, "{aggregate:?}");
    // Larger than one transaction may be, below the message limit of the client port.
    let mut big = scheduled("big");
    big.payload.as_mut().unwrap().data = bytes::Bytes::from(vec![b'x'; (4 << 20) - 5_000]);
    let too_large = client
        .schedule_event(ScheduleEventRequest {
            instant: 0,
            event: Some(big),
        })
        .await
        .unwrap_err();
    assert_eq!(too_large.code(), tonic::Code::InvalidArgument, "{too_large:?}");
    assert_eq!(code(&too_large).as_deref(), Some("AXONIQ-2001"), "{too_large:?}");
    let unknown_context = client
        .schedule_event(with_context(
            ScheduleEventRequest {
                instant: 0,
                event: Some(scheduled("nowhere")),
            },
            "no-such-context",
        ))
        .await
        .unwrap_err();
    assert_eq!(
        code(&unknown_context).as_deref(),
        Some("AXONIQ-1302"),
        "{unknown_context:?}"
    );
    // None of them was kept: an event due at once would be published by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(published(&node).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_survives_a_node_restart_and_is_published_once() {
    let mut node = Node::start(Options::default()).await;
    let mut client = EventSchedulerClient::new(node.channel().await);
    let at = now_millis() + 2_500;
    schedule(&mut client, "after-restart", at).await;
    let cancelled = schedule(&mut client, "cancelled-before-restart", at).await;
    cancel(&mut client, &cancelled).await;
    drop(client);
    node.stop();
    // Down over the due time.
    let wait = at + 1_000 - now_millis();
    assert!(wait > 0, "the node took too long to stop");
    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    node.launch().await;
    wait_published(|| published(&node), "after-restart", Duration::from_secs(15)).await;
    // Another restart after the publish: it is not published again.
    node.stop();
    node.launch().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let ids = published(&node).await;
    assert_eq!(count(&ids, "after-restart"), 1, "{ids:?}");
    assert_eq!(count(&ids, "cancelled-before-restart"), 0, "{ids:?}");
}

/// Three nodes: a schedule made through a follower is committed by the leader; the leader's
/// node is killed before the event is due, and the new leader publishes it, once, on every
/// replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_schedules_and_a_new_leader_publishes_them_once() {
    const CONTEXT: &str = "reminders";
    let mut cluster = Cluster::start(3, &[]).await;
    cluster.create_context(CONTEXT, &[0, 1, 2]).await;
    let leader = cluster.wait_leader(CONTEXT, Duration::from_secs(15)).await;
    let follower = (leader + 1) % 3;
    let mut client = EventSchedulerClient::new(cluster.nodes[follower].channel().await);
    let at = now_millis() + 3_000;
    let mut tokens = Vec::new();
    for id in ["r1", "r2", "r3"] {
        let token = client
            .schedule_event(with_context(
                ScheduleEventRequest {
                    instant: at,
                    event: Some(scheduled(id)),
                },
                CONTEXT,
            ))
            .await
            .unwrap_or_else(|e| panic!("schedule {id} through {}: {e}", node_name(follower)))
            .into_inner()
            .token;
        tokens.push(token);
    }
    client
        .cancel_scheduled_event(with_context(
            CancelScheduledEventRequest {
                token: tokens[2].clone(),
            },
            CONTEXT,
        ))
        .await
        .unwrap();
    cluster.nodes[leader].crash();
    let next = cluster.wait_leader(CONTEXT, Duration::from_secs(15)).await;
    assert_ne!(next, leader);
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let replicas = futures::future::join_all(survivors.iter().map(|i| cluster.replica(*i, CONTEXT))).await;
        if replicas.iter().all(|r| r.len() >= 2) {
            let replica = &replicas[0];
            let ids: Vec<String> = replica
                .iter()
                .map(|(_, bytes)| {
                    use prost::Message;
                    Event::decode(bytes.as_slice()).unwrap().message_identifier
                })
                .collect();
            assert!(now_millis() >= at);
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            let again = cluster.replica(survivors[0], CONTEXT).await;
            assert_eq!(again.len(), 2, "published again: {ids:?}");
            assert_eq!(count(&ids, "r1"), 1, "{ids:?}");
            assert_eq!(count(&ids, "r2"), 1, "{ids:?}");
            assert_eq!(count(&ids, "r3"), 0, "{ids:?}");
            cluster.assert_same_replicas(
                CONTEXT,
                &futures::future::join_all(
                    survivors
                        .iter()
                        .map(|i| async { (*i, cluster.replica(*i, CONTEXT).await) }),
                )
                .await,
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not published on every survivor: {:?}",
            replicas.iter().map(|r| r.len()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
