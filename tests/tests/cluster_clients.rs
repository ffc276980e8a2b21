//! Where a cluster sends client applications (issue 12): `GetPlatformServer` names the node of
//! the context that serves the fewest of its clients (tags first), so applications that all
//! know only the first node spread over the three; nodes ask clients to reconnect when a node
//! joins (balancing) and while they are cut off from their context's majority.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
/// (`first`) which server to use, connects there, and registers on its control stream. Asked to
/// reconnect (`RequestReconnect`), or when its stream ends, it does all that again, asking
/// `first` every 200 ms while a node turns it away.
struct App {
    /// The node it is registered with now, `usize::MAX` while it looks for one.
    node: Arc<AtomicUsize>,
    /// How many times it was asked to reconnect.
    asked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    fn node(&self) -> usize {
        self.node.load(Ordering::SeqCst)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
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
    let node = Arc::new(AtomicUsize::new(usize::MAX));
    let asked = Arc::new(AtomicUsize::new(0));
    let (registered, first_registration) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(follow(
        cluster.nodes[first].url(),
        identification,
        node.clone(),
        asked.clone(),
        registered,
    ));
    let app = App { node, asked, task };
    let ok = tokio::time::timeout(Duration::from_secs(10), first_registration)
        .await
        .unwrap_or_else(|_| panic!("{client_id} registered within 10 s"))
        .expect("the app's task runs");
    assert!(ok, "registration of {client_id} refused");
    let i = app.node();
    assert!(i < cluster.nodes.len(), "{client_id} on node {i}");
    app
}

/// The app's connection loop (see [`App`]).
async fn follow(
    first: String,
    identification: ClientIdentification,
    node: Arc<AtomicUsize>,
    asked: Arc<AtomicUsize>,
    registered: tokio::sync::oneshot::Sender<bool>,
) {
    let mut registered = Some(registered);
    loop {
        node.store(usize::MAX, Ordering::SeqCst);
        let Some((i, mut inbound, _outbound)) = session(&first, &identification).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // Registered once the node acknowledges it; then it serves until told to go.
        while let Ok(Some(PlatformOutboundInstruction { request, .. })) = inbound.message().await {
            match request {
                Some(Outbound::Ack(ack)) if ack.instruction_id == "register" => {
                    if ack.success {
                        node.store(i, Ordering::SeqCst);
                    }
                    if let Some(registered) = registered.take() {
                        let _ = registered.send(ack.success);
                    }
                }
                Some(Outbound::RequestReconnect(_)) => {
                    asked.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                _ => {}
            }
        }
    }
}

type Session = (
    usize,
    tonic::Streaming<PlatformOutboundInstruction>,
    mpsc::Sender<PlatformInboundInstruction>,
);

/// Asks `first` where to go, connects there and opens the control stream with a registration;
/// `None` when a node refuses or cannot be reached.
async fn session(first: &str, identification: &ClientIdentification) -> Option<Session> {
    let channel = |url: String| async move {
        tonic::transport::Channel::from_shared(url)
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .ok()
    };
    let info = PlatformServiceClient::new(channel(first.to_owned()).await?)
        .get_platform_server(with_context(identification.clone(), CONTEXT))
        .await
        .ok()?
        .into_inner();
    let primary = info.primary?;
    let url = if info.same_connection {
        first.to_owned()
    } else {
        format!("http://{}:{}", primary.host_name, primary.grpc_port)
    };
    let i = index_of(&primary.node_name)?;
    let mut client = PlatformServiceClient::new(channel(url).await?);
    let (outbound, rx) = mpsc::channel(8);
    outbound
        .send(PlatformInboundInstruction {
            request: Some(Inbound::Register(identification.clone())),
            instruction_id: "register".to_owned(),
        })
        .await
        .ok()?;
    let inbound = client
        .open_stream(with_context(ReceiverStream::new(rx), CONTEXT))
        .await
        .ok()?
        .into_inner();
    Some((i, inbound, outbound))
}

/// 30 applications that all know only n1 connect one after another, a few at once: each node
/// ends up serving 10 ± 2 of them (Axon Server's "fewest connections"), and each node's own
/// list of clients says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_clients_that_know_one_node_spread_over_three() {
    let cluster = Cluster::start(3, &[]).await;
    // default on all three nodes, as a cluster's contexts are.
    store_default_on(&cluster, &["n2", "n3"]).await;
    spreading(&cluster).await;

    let mut apps = Vec::new();
    for wave in 0..6 {
        let ids: Vec<String> = (0..5).map(|k| format!("app-{wave}-{k}")).collect();
        let started: Vec<_> = ids.iter().map(|id| connect_app(&cluster, 0, id)).collect();
        apps.extend(futures::future::join_all(started).await);
    }
    let mut told = [0usize; 3];
    for app in &apps {
        told[app.node()] += 1;
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
    store_default_on(&cluster, &["n2", "n3"]).await;
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
        apps.iter().all(|app| app.node() == 2),
        "{:?}",
        apps.iter().map(App::node).collect::<Vec<_>>()
    );
    // No node matches region=us: the fewest clients win, and n3 has six.
    let us = placed(&cluster, 0, "us-app", &[("region", "us")]).await;
    assert_ne!(us, 2, "a client whose tags match no node went to the busiest");
}

/// Waits until n1 sends a client of default to another node: each router knows the others
/// store it (until then n1 keeps every client).
async fn spreading(cluster: &Cluster) {
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
            return;
        }
        assert!(
            Instant::now() < deadline,
            "n1 never sends a client of default elsewhere"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Makes `nodes` (by name) store default beside n1.
async fn store_default_on(cluster: &Cluster, nodes: &[&str]) {
    for node in nodes {
        let created = cluster
            .http(0, "POST", &format!("/v1/context/default/{node}?role=PRIMARY"), None)
            .await;
        assert!(created.status < 300, "{created:?}");
    }
}

/// How many of `apps` each of `n` nodes serves; `None` while one of them looks for a node.
fn spread(apps: &[App], n: usize) -> Option<Vec<usize>> {
    let mut counts = vec![0; n];
    for app in apps {
        *counts.get_mut(app.node())? += 1;
    }
    Some(counts)
}

/// Balancing (Axon's `cluster.auto-balancing`, here every second after a 2 s delay): 30
/// applications spread over three nodes; a fourth node joins and takes default; the three ask
/// some of theirs to reconnect, and those land on the new node, until every node serves its
/// even share within ±20% (7.5: 6 to 9). Gradually: only the surplus moves, and every node
/// lists exactly the applications that say they are connected to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_spread_again_after_a_fourth_node_joins() {
    let env = [
        ("AXONIQ_AXONSERVER_CLUSTER_REBALANCE_INTERVAL", "1"),
        ("AXONIQ_AXONSERVER_CLUSTER_REBALANCE_DELAY", "2"),
    ];
    let mut cluster = Cluster::start(3, &env).await;
    store_default_on(&cluster, &["n2", "n3"]).await;
    spreading(&cluster).await;
    let mut apps = Vec::new();
    for wave in 0..6 {
        let ids: Vec<String> = (0..5).map(|k| format!("app-{wave}-{k}")).collect();
        let started: Vec<_> = ids.iter().map(|id| connect_app(&cluster, 0, id)).collect();
        apps.extend(futures::future::join_all(started).await);
    }
    let settled = |apps: &[App], n: usize, even: std::ops::RangeInclusive<usize>| {
        spread(apps, n).filter(|counts| counts.iter().all(|c| even.contains(c)))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let three = loop {
        if let Some(counts) = settled(&apps, 3, 8..=12) {
            break counts;
        }
        assert!(
            Instant::now() < deadline,
            "not spread over three: {:?}",
            spread(&apps, 3)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let asked_before: usize = apps.iter().map(|a| a.asked.load(Ordering::SeqCst)).sum();
    eprintln!("over three nodes: {three:?} ({asked_before} asked to reconnect on the way)");

    let joined = Instant::now();
    cluster.add_node(&env).await;
    store_default_on(&cluster, &["n4"]).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let four = loop {
        // Settled: even within ±20%, and the same a second later.
        if let Some(counts) = settled(&apps, 4, 6..=9) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if spread(&apps, 4).as_ref() == Some(&counts) {
                break counts;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not spread over four: {:?}",
            spread(&apps, 4)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let asked: usize = apps.iter().map(|a| a.asked.load(Ordering::SeqCst)).sum::<usize>() - asked_before;
    eprintln!(
        "over four nodes {:?} after n4 joined: {four:?}; {asked} applications asked to reconnect",
        joined.elapsed()
    );
    assert!(four[3] >= 6, "{four:?}");
    assert!(asked <= 12, "{asked} asked to move: more than the surplus");
    for (i, expected) in four.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listed = cluster.http(i, "GET", "/v1/clients?context=default", None).await.json();
            let count = listed.as_array().map_or(0, |clients| {
                clients
                    .iter()
                    .filter(|c| c["clientId"].as_str().is_some_and(|id| id.starts_with("app-")))
                    .count()
            });
            if count == *expected {
                break;
            }
            assert!(Instant::now() < deadline, "n{} lists {listed}, not {expected}", i + 1);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A node cut off from the majority of its context's nodes (here the other two are frozen)
/// asks its clients to reconnect and turns clients away with AXONIQ-1400 (UNAVAILABLE) while
/// it lasts; once the others answer again, it takes clients again and every application finds
/// a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_its_contexts_majority_sends_its_clients_away() {
    let cluster = Cluster::start(3, &[]).await;
    store_default_on(&cluster, &["n2", "n3"]).await;
    spreading(&cluster).await;
    let mut apps = Vec::new();
    for k in 0..6 {
        apps.push(connect_app(&cluster, 0, &format!("app-{k}")).await);
    }
    let on_n1: Vec<&App> = apps.iter().filter(|a| a.node() == 0).collect();
    assert!(!on_n1.is_empty(), "{:?}", spread(&apps, 3));

    for i in [1, 2] {
        cluster.nodes[i].signal_all(nix::sys::signal::Signal::SIGSTOP);
    }
    let frozen = Instant::now();
    let deadline = frozen + Duration::from_secs(30);
    let refused = loop {
        let answer = PlatformServiceClient::new(cluster.nodes[0].channel().await)
            .get_platform_server(with_context(
                ClientIdentification {
                    client_id: "late".into(),
                    ..Default::default()
                },
                CONTEXT,
            ))
            .await;
        if let Err(status) = answer {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "n1 still takes clients with n2 and n3 frozen"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "n1 turns clients away {:?} after the freeze: {refused:?}",
        frozen.elapsed()
    );
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused.metadata().get("axoniq-errorcode").and_then(|v| v.to_str().ok()),
        Some("AXONIQ-1400")
    );
    // Its own applications were asked to go, and find no node while n1 is alone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !on_n1
        .iter()
        .all(|a| a.asked.load(Ordering::SeqCst) >= 1 && a.node() == usize::MAX)
    {
        assert!(
            Instant::now() < deadline,
            "n1's applications were not sent away: asked {:?}, on {:?}",
            on_n1.iter().map(|a| a.asked.load(Ordering::SeqCst)).collect::<Vec<_>>(),
            on_n1.iter().map(|a| a.node()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for i in [1, 2] {
        cluster.nodes[i].signal_all(nix::sys::signal::Signal::SIGCONT);
    }
    let thawed = Instant::now();
    let deadline = thawed + Duration::from_secs(30);
    while spread(&apps, 3).is_none() {
        assert!(
            Instant::now() < deadline,
            "applications without a node after the thaw: {:?}",
            apps.iter().map(App::node).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "every application connected {:?} after the thaw: {:?}",
        thawed.elapsed(),
        spread(&apps, 3)
    );
}
