//! Where a cluster sends client applications (issue 12): `GetPlatformServer` names the node of
//! the context that serves the fewest of its clients, so applications that all know only the
//! first node spread over the three.

use std::time::{Duration, Instant};

use myelin_proto::axon::control::platform_inbound_instruction::Request as Inbound;
use myelin_proto::axon::control::platform_outbound_instruction::Request as Outbound;
use myelin_proto::axon::control::platform_service_client::PlatformServiceClient;
use myelin_proto::axon::control::{ClientIdentification, PlatformInboundInstruction, PlatformOutboundInstruction};
use myelin_tests::cluster::{Cluster, index_of};
use myelin_tests::with_context;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CONTEXT: &str = "default";

/// A client application connected as Axon's connector connects: it asks the node it knows
/// (`first`) which server to use, connects there, and registers on its control stream.
struct App {
    node: usize,
    _outbound: mpsc::Sender<PlatformInboundInstruction>,
    _reader: tokio::task::JoinHandle<()>,
}

async fn connect_app(cluster: &Cluster, first: usize, client_id: &str) -> App {
    connect_tagged_app(cluster, first, client_id, &[]).await
}

/// [`connect_app`] for an application with tags (Axon's `axon.axonserver.tags.*` of a client).
async fn connect_tagged_app(cluster: &Cluster, first: usize, client_id: &str, tags: &[(&str, &str)]) -> App {
    let identification = ClientIdentification {
        client_id: client_id.to_owned(),
        component_name: "spread-app".to_owned(),
        tags: tags.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    };
    let info = PlatformServiceClient::new(cluster.nodes[first].channel().await)
        .get_platform_server(with_context(identification.clone(), CONTEXT))
        .await
        .expect("GetPlatformServer")
        .into_inner();
    let primary = info.primary.expect("a server");
    let node = if info.same_connection {
        first
    } else {
        index_of(&primary.node_name).expect("a node of the cluster")
    };
    assert_eq!(
        primary.grpc_port,
        i32::from(cluster.nodes[node].grpc_port),
        "{primary:?}"
    );
    let mut client = PlatformServiceClient::new(cluster.nodes[node].channel().await);
    let (outbound, rx) = mpsc::channel(8);
    outbound
        .send(PlatformInboundInstruction {
            request: Some(Inbound::Register(identification)),
            instruction_id: "register".to_owned(),
        })
        .await
        .unwrap();
    let mut inbound = client
        .open_stream(with_context(ReceiverStream::new(rx), CONTEXT))
        .await
        .expect("the control stream")
        .into_inner();
    // Registered once the node acknowledges it.
    let (registered, is_registered) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let _client = client;
        let mut registered = Some(registered);
        while let Ok(Some(PlatformOutboundInstruction { request, .. })) = inbound.message().await {
            if let Some(Outbound::Ack(ack)) = request
                && ack.instruction_id == "register"
                && let Some(registered) = registered.take()
            {
                let _ = registered.send(ack.success);
            }
        }
    });
    let ok = tokio::time::timeout(Duration::from_secs(10), is_registered)
        .await
        .expect("registered within 10 s")
        .unwrap();
    assert!(ok, "registration of {client_id} refused");
    App {
        node,
        _outbound: outbound,
        _reader: reader,
    }
}

/// 30 applications that all know only n1 connect one after another, a few at once: each node
/// ends up serving 10 ± 2 of them (Axon Server's "fewest connections"), and each node's own
/// list of clients says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_clients_that_know_one_node_spread_over_three() {
    let cluster = Cluster::start(3, &[]).await;
    // default on all three nodes, as a cluster's contexts are.
    let created = cluster
        .http(0, "POST", "/v1/context/default/n2?role=PRIMARY", None)
        .await;
    assert!(created.status < 300, "{created:?}");
    let created = cluster
        .http(0, "POST", "/v1/context/default/n3?role=PRIMARY", None)
        .await;
    assert!(created.status < 300, "{created:?}");
    // Until each router knows that the three store default, n1 keeps every client.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let probe = PlatformServiceClient::new(cluster.nodes[0].channel().await)
            .get_platform_server(with_context(
                ClientIdentification {
                    client_id: "probe".into(),
                    ..Default::default()
                },
                CONTEXT,
            ))
            .await
            .unwrap()
            .into_inner();
        if !probe.same_connection {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n1 never sends a client of default elsewhere"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut apps = Vec::new();
    for wave in 0..6 {
        let ids: Vec<String> = (0..5).map(|k| format!("app-{wave}-{k}")).collect();
        let started: Vec<_> = ids.iter().map(|id| connect_app(&cluster, 0, id)).collect();
        apps.extend(futures::future::join_all(started).await);
    }
    let mut told = [0usize; 3];
    for app in &apps {
        told[app.node] += 1;
    }
    eprintln!("GetPlatformServer sent the 30 applications to n1, n2, n3: {told:?}");
    for (i, n) in told.iter().enumerate() {
        assert!((8..=12).contains(n), "n{} got {n} of 30: {told:?}", i + 1);
    }
    for (i, expected) in told.iter().enumerate() {
        let listed = cluster.http(i, "GET", "/v1/clients?context=default", None).await.json();
        let empty = Vec::new();
        let count = listed
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .filter(|c| c["clientId"].as_str().is_some_and(|id| id.starts_with("app-")))
            .count();
        assert_eq!(count, *expected, "n{} lists {listed}", i + 1);
    }
}

/// Where `GetPlatformServer` on node `i` sends a client with `tags` (its node index).
async fn placed(cluster: &Cluster, i: usize, client_id: &str, tags: &[(&str, &str)]) -> usize {
    let info = PlatformServiceClient::new(cluster.nodes[i].channel().await)
        .get_platform_server(with_context(
            ClientIdentification {
                client_id: client_id.into(),
                tags: tags.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                ..Default::default()
            },
            CONTEXT,
        ))
        .await
        .unwrap()
        .into_inner();
    if info.same_connection {
        i
    } else {
        index_of(&info.primary.unwrap().node_name).unwrap()
    }
}

/// n3 is tagged `region=eu` (`axoniq.axonserver.tags.region`): applications tagged
/// `region=eu` that know only n1 all go to n3, however many it already serves; an application
/// whose tags match no node is placed by load as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_go_to_the_node_whose_tags_match_theirs() {
    let mut cluster = Cluster::start(2, &[]).await;
    cluster.add_node(&[("AXONIQ_AXONSERVER_TAGS_REGION", "eu")]).await;
    for node in ["n2", "n3"] {
        let created = cluster
            .http(0, "POST", &format!("/v1/context/default/{node}?role=PRIMARY"), None)
            .await;
        assert!(created.status < 300, "{created:?}");
    }
    // n1 learns n3's tags with its handler set (every 2 s), once it knows n3 stores default:
    // then five probes in a row go to n3 (by load alone, the second would go elsewhere).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut probe = 0;
    loop {
        let mut in_a_row = 0;
        while in_a_row < 5 {
            probe += 1;
            if placed(&cluster, 0, &format!("probe-{probe}"), &[("region", "eu")]).await != 2 {
                break;
            }
            in_a_row += 1;
        }
        if in_a_row == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n1 never sends clients tagged region=eu to n3"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut apps = Vec::new();
    for k in 0..6 {
        apps.push(connect_tagged_app(&cluster, 0, &format!("eu-app-{k}"), &[("region", "eu")]).await);
    }
    assert!(
        apps.iter().all(|app| app.node == 2),
        "{:?}",
        apps.iter().map(|a| a.node).collect::<Vec<_>>()
    );
    // No node matches region=us: the fewest clients win, and n3 has six.
    let us = placed(&cluster, 0, "us-app", &[("region", "us")]).await;
    assert_ne!(us, 2, "a client whose tags match no node went to the busiest");
}
