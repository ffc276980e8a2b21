//! Commands across the nodes of a cluster (issue 12): handler applications and dispatchers
//! connected to different nodes of a three-node cluster on 127.0.0.1–3, as separate client
//! applications would be. One message bus per context: a command dispatched on any node reaches
//! the handler its routing key names, wherever that handler is connected.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use myelin_proto::axon::command::CommandResponse;
use myelin_tests::cluster::Cluster;
use myelin_tests::command_apps::{Handler, command, connect, dispatch, handled_by, id};

const CONTEXT: &str = "default";

/// Dispatches `name` with routing key `key` on node `i` until a handler answers (the other
/// nodes learn of a new handler within a couple of seconds); the answer.
async fn dispatch_until_handled(cluster: &Cluster, i: usize, name: &str, key: &str) -> CommandResponse {
    let dispatcher = connect(&cluster.nodes[i]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let response = dispatch(&dispatcher, command(name, &id(), Some(key))).await;
        if response.error_code.is_empty() {
            return response;
        }
        assert!(
            response.error_code == "AXONIQ-4000" && Instant::now() < deadline,
            "dispatching {name} on n{}: {response:?}",
            i + 1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Which handler each key reaches when dispatched on node `i`, 64 in flight.
async fn owners(cluster: &Cluster, i: usize, name: &str, keys: &[String]) -> HashMap<String, String> {
    let dispatcher = connect(&cluster.nodes[i]).await;
    futures::stream::iter(keys.to_vec())
        .map(|key| {
            let dispatcher = dispatcher.clone();
            async move {
                let response = dispatch(&dispatcher, command(name, &id(), Some(&key))).await;
                (key, handled_by(&response))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

/// A dispatcher on n1 reaches handlers on n2 and n3; the same routing key reaches the same
/// handler from every node, and load factors share the keys across nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_reach_handlers_on_other_nodes_with_the_same_ring_everywhere() {
    let cluster = Cluster::start(3, &[]).await;
    let _light = Handler::start(
        &cluster.nodes[1],
        CONTEXT,
        "light-on-n2",
        &["Order"],
        100,
        1_000_000,
        true,
    )
    .await;

    // Round trip across nodes: payload and metadata arrive, the response comes back unchanged.
    let started = Instant::now();
    let response = dispatch_until_handled(&cluster, 0, "Order", "order-0").await;
    eprintln!(
        "n1 routes to a handler on n2 {:?} after it subscribed",
        started.elapsed()
    );
    assert_eq!(handled_by(&response), "light-on-n2");
    let sent = command("Order", "round-trip-1", Some("order-1"));
    let response = dispatch(&connect(&cluster.nodes[0]).await, sent.clone()).await;
    assert_eq!(response.request_identifier, "round-trip-1");
    assert_eq!(response.message_identifier, "resp-round-trip-1");
    assert_eq!(response.payload, sent.payload);

    // A heavier handler on n3; wait until every node routes some key to it.
    let _heavy = Handler::start(
        &cluster.nodes[2],
        CONTEXT,
        "heavy-on-n3",
        &["Order"],
        300,
        1_000_000,
        true,
    )
    .await;
    let keys: Vec<String> = (0..600).map(|k| format!("order-{k}")).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    for i in 0..3 {
        while !owners(&cluster, i, "Order", &keys[..20])
            .await
            .values()
            .any(|h| h == "heavy-on-n3")
        {
            assert!(
                Instant::now() < deadline,
                "n{} never routes to the handler on n3",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let from_n1 = owners(&cluster, 0, "Order", &keys).await;
    let from_n2 = owners(&cluster, 1, "Order", &keys).await;
    let from_n3 = owners(&cluster, 2, "Order", &keys).await;
    assert_eq!(from_n1, from_n2, "n1 and n2 route the same keys to different handlers");
    assert_eq!(from_n1, from_n3, "n1 and n3 route the same keys to different handlers");
    let heavy = from_n1.values().filter(|h| *h == "heavy-on-n3").count() as f64 / keys.len() as f64;
    eprintln!("the handler of load factor 300 on n3 took {heavy:.2} of the keys");
    assert!((0.6..=0.9).contains(&heavy), "load factor 300 against 100 took {heavy}");
}

/// The node of a handler dies with commands in flight: they fail fast with AXONIQ-4001 (as when
/// a local handler disconnects), and later commands reach the surviving handler on n3.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_node_killed_mid_flight_fails_its_commands_fast() {
    let mut cluster = Cluster::start(3, &[]).await;
    let mut victim = Handler::start(&cluster.nodes[1], CONTEXT, "victim-on-n2", &["Ship"], 100, 3, false).await;
    let _survivor = Handler::start(
        &cluster.nodes[2],
        CONTEXT,
        "survivor-on-n3",
        &["Ship"],
        100,
        1_000_000,
        true,
    )
    .await;
    let keys: Vec<String> = (0..40).map(|k| format!("parcel-{k}")).collect();
    // Until n1 knows both handlers, commands go to the survivor only (or to none).
    let deadline = Instant::now() + Duration::from_secs(15);
    let dispatcher = connect(&cluster.nodes[0]).await;
    loop {
        let response = dispatch(&dispatcher, command("Ship", &id(), Some("probe"))).await;
        if response.error_code.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{response:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // both handler sets have reached n1

    let calls: Vec<_> = keys
        .iter()
        .map(|key| {
            let dispatcher = dispatcher.clone();
            let id = format!("ship-{key}-{}", id());
            let key = key.clone();
            tokio::spawn(async move {
                let response = dispatch(&dispatcher, command("Ship", &id, Some(&key))).await;
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
                .expect("the victim on n2 gets commands from n1")
                .message_identifier,
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    cluster.nodes[1].crash();
    let (mut lost, mut survived) = (0, 0);
    for call in calls {
        let (id, response, done) = call.await.unwrap();
        if response.error_code.is_empty() {
            assert_eq!(handled_by(&response), "survivor-on-n3");
            assert!(!held.contains(&id));
            survived += 1;
            continue;
        }
        // The victim's share: held by it or queued on its node, gone with the node.
        assert_eq!(response.error_code, "AXONIQ-4001", "{response:?}");
        assert_eq!(response.request_identifier, id);
        assert!(
            done.duration_since(killed_at) < Duration::from_secs(5),
            "a command held on the killed node failed after {:?}",
            done.duration_since(killed_at)
        );
        lost += 1;
    }
    eprintln!("{lost} commands failed with the node, {survived} answered by the survivor");
    assert!(lost >= 3, "the 3 held commands must fail");
    for id in &held {
        assert!(!id.is_empty());
    }

    // Once n1 has dropped n2's handler, every key reaches the survivor.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = futures::future::join_all(
            keys.iter()
                .map(|key| dispatch(&dispatcher, command("Ship", &id(), Some(key)))),
        )
        .await;
        if all.iter().all(|r| r.error_code.is_empty()) {
            assert!(all.iter().all(|r| handled_by(r) == "survivor-on-n3"));
            break;
        }
        assert!(
            all.iter()
                .all(|r| r.error_code.is_empty() || r.error_code == "AXONIQ-4001"),
            "{:?}",
            all.iter().find(|r| !r.error_code.is_empty())
        );
        assert!(Instant::now() < deadline, "n1 still routes to the dead node's handler");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "every key reaches the survivor {:?} after the kill",
        killed_at.elapsed()
    );
}
