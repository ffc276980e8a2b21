//! Where a cluster sends client applications (issue 12): `GetPlatformServer` names the node of
//! the context that serves the fewest of its clients (tags first), so applications that all
//! know only the first node spread over the three; nodes ask clients to reconnect when a node
//! joins (balancing) and while they are cut off from their context's majority.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use myelin_proto::axon::InstructionAck;
use myelin_proto::axon::control::platform_inbound_instruction::Request as Inbound;
use myelin_proto::axon::control::platform_outbound_instruction::Request as Outbound;
use myelin_proto::axon::control::platform_service_client::PlatformServiceClient;
use myelin_proto::axon::control::{
    ClientIdentification, EventProcessorInfo, PlatformInboundInstruction, PlatformOutboundInstruction,
};
use myelin_tests::cluster::{Cluster, index_of};
use myelin_tests::with_context;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CONTEXT: &str = "default";

/// A client application connected as Axon's connector connects: it asks the node it knows
/// (`first`) which server to use, connects there, and registers on its control stream. Asked to
/// reconnect (`RequestReconnect`), or when its stream ends, it does all that again, asking
/// `first` every 200 ms while a node turns it away. Registered, it reports one event processor
/// ([`PROCESSOR`]); it acknowledges every instruction, as Axon's connector does.
struct App {
    /// The node it is registered with now, `usize::MAX` while it looks for one.
    node: Arc<AtomicUsize>,
    /// How many times it was asked to reconnect.
    asked: Arc<AtomicUsize>,
    /// How many times it was told to pause its event processor.
    paused: Arc<AtomicUsize>,
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
    let paused = Arc::new(AtomicUsize::new(0));
    let (registered, first_registration) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(follow(
        cluster.nodes[first].url(),
        identification,
        (node.clone(), asked.clone(), paused.clone()),
        registered,
    ));
    let app = App {
        node,
        asked,
        paused,
        task,
    };
    let ok = tokio::time::timeout(Duration::from_secs(10), first_registration)
        .await
        .unwrap_or_else(|_| panic!("{client_id} registered within 10 s"))
        .expect("the app's task runs");
    assert!(ok, "registration of {client_id} refused");
    let i = app.node();
    assert!(i < cluster.nodes.len(), "{client_id} on node {i}");
    app
}

/// The event processor every test app reports.
const PROCESSOR: &str = "spread-processor";

/// The app's connection loop (see [`App`]).
async fn follow(
    first: String,
    identification: ClientIdentification,
    (node, asked, paused): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>),
    registered: tokio::sync::oneshot::Sender<bool>,
) {
    let mut registered = Some(registered);
    // The connection it was asked to leave: closed once the next one is registered, so that
    // its last acknowledgement is not cut off with it.
    let mut _previous: Option<Session> = None;
    loop {
        node.store(usize::MAX, Ordering::SeqCst);
        let Some((i, mut inbound, outbound)) = session(&first, &identification).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // Registered once the node acknowledges it; then it serves until told to go.
        while let Ok(Some(PlatformOutboundInstruction {
            request,
            instruction_id,
        })) = inbound.message().await
        {
            let mut leave = false;
            match request {
                Some(Outbound::Ack(ack)) if ack.instruction_id == "register" => {
                    if ack.success {
                        let report = EventProcessorInfo {
                            processor_name: PROCESSOR.to_owned(),
                            mode: "Tracking".to_owned(),
                            running: true,
                            ..Default::default()
                        };
                        tell(&outbound, Inbound::EventProcessorInfo(report)).await;
                        node.store(i, Ordering::SeqCst);
                        _previous = None;
                    }
                    if let Some(registered) = registered.take() {
                        let _ = registered.send(ack.success);
                    }
                }
                Some(Outbound::PauseEventProcessor(_)) => {
                    paused.fetch_add(1, Ordering::SeqCst);
                }
                Some(Outbound::RequestReconnect(_)) => {
                    asked.fetch_add(1, Ordering::SeqCst);
                    leave = true;
                }
                _ => {}
            }
            // Acknowledged once carried out (counted), as the connector does.
            if !instruction_id.is_empty() {
                let ack = InstructionAck {
                    instruction_id,
                    success: true,
                    ..Default::default()
                };
                tell(&outbound, Inbound::Ack(ack)).await;
            }
            if leave {
                break;
            }
        }
        _previous = Some((i, inbound, outbound));
    }
}

/// Sends the node one message on the control stream (a closed stream is the loop's to notice).
async fn tell(outbound: &mpsc::Sender<PlatformInboundInstruction>, request: Inbound) {
    let _ = outbound
        .send(PlatformInboundInstruction {
            request: Some(request),
            instruction_id: String::new(),
        })
        .await;
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

    let apps = thirty_apps(&cluster).await;
    let mut told = [0usize; 3];
    for app in &apps {
        told[app.node()] += 1;
    }
    eprintln!("GetPlatformServer sent the 30 applications to n1, n2, n3: {told:?}");
    for (i, n) in told.iter().enumerate() {
        assert!((8..=12).contains(n), "n{} got {n} of 30: {told:?}", i + 1);
    }
    // Every node lists the 30, each on the node it was sent to.
    for i in 0..3 {
        assert_eq!(
            listed_spread(&cluster, i, 3).await,
            told.to_vec(),
            "as n{} lists them",
            i + 1
        );
    }
}

/// How many applications (`app-*`) node `ask`'s `/v1/clients` says each of the first `n` nodes
/// serves.
async fn listed_spread(cluster: &Cluster, ask: usize, n: usize) -> Vec<usize> {
    let reply = cluster.http(ask, "GET", "/v1/clients?context=default", None).await;
    if reply.unreachable_nodes.is_some() {
        cluster.panic_with_log(ask, &format!("did not hear from {:?}", reply.unreachable_nodes));
    }
    let listed = reply.json();
    let mut counts = vec![0; n];
    for client in listed.as_array().expect("a list") {
        if client["clientId"].as_str().is_some_and(|id| id.starts_with("app-")) {
            let node = client["node"].as_str().and_then(index_of);
            let i = node.filter(|i| *i < n).unwrap_or_else(|| panic!("{client} on no node"));
            counts[i] += 1;
        }
    }
    counts
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
    // The operator sees a node's tags in /v1/public/me.
    let me = cluster.http(2, "GET", "/v1/public/me", None).await.json();
    assert_eq!(me["tags"], serde_json::json!({"region": "eu"}), "{me}");
    let me = cluster.http(0, "GET", "/v1/public/me", None).await.json();
    assert_eq!(me["tags"], serde_json::json!({}), "{me}");
}

/// 30 applications that know only n1, connecting in six waves of five at once.
async fn thirty_apps(cluster: &Cluster) -> Vec<App> {
    let mut apps = Vec::new();
    for wave in 0..6 {
        let ids: Vec<String> = (0..5).map(|k| format!("app-{wave}-{k}")).collect();
        let started: Vec<_> = ids.iter().map(|id| connect_app(cluster, 0, id)).collect();
        apps.extend(futures::future::join_all(started).await);
    }
    apps
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
    let apps = thirty_apps(&cluster).await;
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
    // Every node lists them where they are (a moved application's old connection may linger a
    // moment).
    for i in 0..4 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listed = listed_spread(&cluster, i, 4).await;
            if listed == four {
                break;
            }
            assert!(Instant::now() < deadline, "n{} lists {listed:?}, not {four:?}", i + 1);
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

/// Any node's admin shows and instructs the clients of every node (issue 12): `/v1/clients`
/// and `/v1/processors` on each of three nodes list all six applications with the node each is
/// connected to; pausing a processor from n1 reaches the instances on n2 and n3; a reconnect
/// sent from n1 reaches an application on another node. With n3 frozen, n1 still answers within
/// a few seconds, without n3's clients, and names n3 in `myelin-unreachable-nodes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_node_lists_and_instructs_the_clients_of_every_node() {
    let cluster = Cluster::start(3, &[]).await;
    store_default_on(&cluster, &["n2", "n3"]).await;
    spreading(&cluster).await;
    let mut apps = Vec::new();
    for k in 0..6 {
        apps.push(connect_app(&cluster, 0, &format!("app-{k}")).await);
    }
    let nodes: Vec<usize> = apps.iter().map(App::node).collect();
    assert!(
        (0..3).all(|i| nodes.contains(&i)),
        "the six applications are not on all three nodes: {nodes:?}"
    );
    // Every node lists every application, with its node (the reports may lag the registration).
    let expected: Vec<(String, String)> = apps
        .iter()
        .enumerate()
        .map(|(k, app)| (format!("app-{k}"), myelin_tests::cluster::node_name(app.node())))
        .collect();
    for path in ["/v1/clients?context=default", "/v1/processors?context=default"] {
        for i in 0..3 {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let reply = cluster.http(i, "GET", path, None).await;
                assert_eq!(reply.status, 200, "{reply:?}");
                let listed = reply.json();
                let mut seen: Vec<(String, String)> = listed
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|c| c["clientId"].as_str().is_some_and(|id| id.starts_with("app-")))
                    .map(|c| {
                        (
                            c["clientId"].as_str().unwrap().to_owned(),
                            c["node"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect();
                seen.sort();
                if seen == expected {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "n{} {path}: {seen:?}, not {expected:?}",
                    i + 1
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    // A processor paused from n1 is paused in every instance, wherever it is connected.
    let paused = cluster
        .http(
            0,
            "PATCH",
            &format!("/v1/components/spread-app/processors/{PROCESSOR}/pause?context=default"),
            None,
        )
        .await;
    assert_eq!(paused.status, 200, "{paused:?}");
    let result = paused.json();
    assert_eq!(result["result"], "SUCCESS", "{result}");
    assert_eq!(result["clients"].as_array().map(Vec::len), Some(6), "{result}");
    assert!(
        apps.iter().all(|a| a.paused.load(Ordering::SeqCst) == 1),
        "{:?}",
        apps.iter().map(|a| a.paused.load(Ordering::SeqCst)).collect::<Vec<_>>()
    );

    // A reconnect sent from n1 to an application on another node.
    let (k, elsewhere) = apps
        .iter()
        .enumerate()
        .find(|(_, a)| a.node() != 0)
        .expect("an application off n1");
    let reconnect = cluster
        .http(
            0,
            "PATCH",
            &format!("/v1/instructions?client=app-{k}&context=default"),
            None,
        )
        .await;
    assert_eq!(reconnect.status, 200, "{reconnect:?}");
    assert_eq!(elsewhere.asked.load(Ordering::SeqCst), 1);
    // An application no node has: AXONIQ-1300, after asking them all.
    let unknown = cluster
        .http(0, "PATCH", "/v1/instructions?client=nobody&context=default", None)
        .await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert!(unknown.body.contains("AXONIQ-1300"), "{unknown:?}");

    // n3 frozen: n1 answers without its clients, and says so.
    cluster.nodes[2].signal_all(nix::sys::signal::Signal::SIGSTOP);
    let asked = Instant::now();
    let reply = cluster.http(0, "GET", "/v1/clients?context=default", None).await;
    let took = asked.elapsed();
    cluster.nodes[2].signal_all(nix::sys::signal::Signal::SIGCONT);
    eprintln!(
        "n1 listed its clients with n3 frozen in {took:?}, unreachable: {:?}",
        reply.unreachable_nodes
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert_eq!(reply.unreachable_nodes.as_deref(), Some("n3"), "{reply:?}");
    let listed = reply.json();
    assert!(listed.as_array().unwrap().iter().all(|c| c["node"] != "n3"), "{listed}");
}
