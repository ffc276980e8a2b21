//! Building a cluster as an operator does, through the admin API of real nodes on their own
//! loopback addresses: `init-cluster`, `register-node` twice (once through a follower), the
//! configuration replicated to every node, contexts placed across the nodes, membership changes,
//! `unregister-node`, and the refusals (AXONIQ-2306, 2307, 2310, 2500, 2501, 2502).

use std::time::Duration;

use myelin_proto::axon::control::ClientIdentification;
use myelin_proto::axon::control::platform_service_client::PlatformServiceClient;
use myelin_tests::cluster::{Cluster, index_of, node_name};
use myelin_tests::{Node, Options, append, event, with_context};
use serde_json::{Value, json};

const JOIN: Duration = Duration::from_secs(60);

fn names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

fn context<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array().unwrap().iter().find(|c| c["context"] == name)
}

fn members(context: &Value) -> Vec<String> {
    let mut members: Vec<String> = context["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}[{}]", r["node"].as_str().unwrap(), r["role"].as_str().unwrap()))
        .collect();
    members.sort();
    members
}

/// The voters of `context`'s group as node `i`'s event store sees it, by node name.
async fn voters(cluster: &Cluster, i: usize, context: &str) -> Vec<String> {
    let Some(status) = cluster.status(i, context).await else {
        return Vec::new();
    };
    let mut voters: Vec<String> = status
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.node.clone())
        .collect();
    voters.sort();
    voters
}

async fn wait_voters(cluster: &Cluster, i: usize, context: &str, expected: &[&str]) {
    let deadline = std::time::Instant::now() + JOIN;
    loop {
        let now = voters(cluster, i, context).await;
        if now == expected {
            return;
        }
        if std::time::Instant::now() >= deadline {
            for (k, node) in cluster.nodes.iter().enumerate() {
                let log = node.log_text();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("member"))
                    .collect();
                eprintln!(
                    "--- {} ---\n{}",
                    node_name(k),
                    lines[lines.len().saturating_sub(25)..].join("\n")
                );
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{context} on {}: voters {now:?}, expected {expected:?}",
            node_name(i)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_is_built_with_init_cluster_and_register_node() {
    let cluster = Cluster::start_nodes(3, &[]).await;
    let all = ["n1", "n2", "n3"];

    // Axon's documented sequence: init-cluster on the first node succeeds on a standalone node.
    let init = cluster.http(0, "POST", "/v1/context/init", None).await;
    assert_eq!(init.status, 200, "{init:?}");

    // n2 joins through n1; n3 through n2 (a follower: the join is passed to the leader).
    let joined = cluster.register(1, 0, json!({})).await;
    assert_eq!(joined.status, 202, "{joined:?}");
    cluster
        .wait_for(1, "/v1/cluster", JOIN, "n2 sees two nodes", |v| {
            names(v) == ["n1", "n2"]
        })
        .await;
    let joined = cluster.register(2, 1, json!({})).await;
    assert_eq!(joined.status, 202, "{joined:?}");
    for i in 0..3 {
        cluster
            .wait_for(i, "/v1/cluster", JOIN, "every node sees three", |v| names(v) == all)
            .await;
    }

    // `_admin` has three voters, and `default` (the context every new node joins by default)
    // is stored on all three, one leader for both.
    let contexts = cluster
        .wait_for(
            0,
            "/v1/public/context",
            JOIN,
            "_admin and default on three nodes",
            |v| {
                context(v, "_admin").is_some_and(|c| members(c).len() == 3 && c["leader"].is_string())
                    && context(v, "default").is_some_and(|c| members(c).len() == 3)
            },
        )
        .await;
    assert_eq!(
        members(context(&contexts, "default").unwrap()),
        ["n1[PRIMARY]", "n2[PRIMARY]", "n3[PRIMARY]"]
    );
    wait_voters(&cluster, 0, "default", &all).await;
    let leader = cluster.wait_leader("default", JOIN).await;
    let listed = cluster
        .wait_for(leader, "/v1/public/context", JOIN, "default's leader listed", |v| {
            context(v, "default").is_some_and(|c| c["leader"] == node_name(leader))
        })
        .await;
    println!("contexts: {listed}");

    // Every node lists every node as connected.
    for i in 0..3 {
        cluster
            .wait_for(i, "/v1/public", JOIN, "every link up", |v| {
                names(v) == all && v.as_array().unwrap().iter().all(|n| n["connected"] == true)
            })
            .await;
    }

    // Each node's health shows its view of the cluster: links up, a leader for each group.
    for i in 0..3 {
        let health = cluster
            .wait_for(i, "/actuator/health", JOIN, "the cluster in health", |v| {
                v["components"]["cluster"]["status"] == "UP"
            })
            .await;
        let view = &health["components"]["cluster"]["details"];
        let others: Vec<&String> = view["connected"].as_object().unwrap().keys().collect();
        assert_eq!(others.len(), 2, "{health}");
        assert!(view["leaders"]["_admin"].is_string(), "{health}");
        assert!(view["leaders"]["default"].is_string(), "{health}");
    }

    // A change made on any node (here n3, a follower of _admin) reaches every node.
    let app = cluster
        .http(
            2,
            "POST",
            "/v1/applications",
            Some(json!({"name": "billing", "roles": [{"context": "default", "roles": ["READ_EVENTS"]}]})),
        )
        .await;
    assert_eq!(app.status, 200, "{app:?}");
    for i in 0..3 {
        cluster
            .wait_for(i, "/v1/public/applications", JOIN, "the application everywhere", |v| {
                v.as_array().unwrap().iter().any(|a| a["name"] == "billing")
            })
            .await;
    }

    // A context created on n2 with members on every node is stored on each, and takes appends
    // through any member.
    let created = cluster
        .http(
            1,
            "POST",
            "/v1/context",
            Some(json!({"context": "orders", "nodes": ["n1", "n2", "n3"]})),
        )
        .await;
    assert_eq!(created.status, 200, "{created:?}");
    for i in 0..3 {
        wait_voters(&cluster, i, "orders", &all).await;
    }
    let orders_leader = cluster.wait_leader("orders", JOIN).await;
    let follower = (orders_leader + 1) % 3;
    let mut client = cluster.nodes[follower].client().await;
    let events = vec![event("order-1", 0, "a"), event("order-1", 1, "b")];
    client
        .append_event(with_context(tokio_stream::iter(events), "orders"))
        .await
        .unwrap_or_else(|e| panic!("append to orders through {}: {e}", node_name(follower)));

    // Refusals, with the cluster unharmed.
    cluster
        .http(1, "POST", "/v1/context/init", None)
        .await
        .assert_error(406, "AXONIQ-2306");
    cluster.register(2, 0, json!({})).await.assert_error(406, "AXONIQ-2306");
    // The only PRIMARY of a context cannot leave it.
    let solo = cluster
        .http(
            0,
            "POST",
            "/v1/context",
            Some(json!({"context": "solo", "nodes": ["n1"]})),
        )
        .await;
    assert_eq!(solo.status, 200, "{solo:?}");
    cluster
        .http(0, "DELETE", "/v1/context/solo/n1", None)
        .await
        .assert_error(400, "AXONIQ-2310");
    cluster
        .http(0, "DELETE", "/v1/context/solo/n2", None)
        .await
        .assert_error(400, "AXONIQ-2307");
    // A client of solo that asks n2 which server to use is sent to n1, the node that stores it;
    // a client of default stays on n2.
    let platform = |context: &'static str| {
        let node = &cluster.nodes[1];
        async move {
            let mut client = PlatformServiceClient::new(node.channel().await);
            client
                .get_platform_server(with_context(
                    ClientIdentification {
                        client_id: "client-1".into(),
                        component_name: "test".into(),
                        ..Default::default()
                    },
                    context,
                ))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let deadline = std::time::Instant::now() + JOIN;
    let sent = loop {
        let info = platform("solo").await;
        if !info.same_connection {
            break info;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "n2 keeps a client of solo: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let n1 = sent.primary.unwrap();
    assert_eq!(
        (n1.node_name.as_str(), n1.host_name.as_str(), n1.grpc_port),
        ("n1", "127.0.0.1", i32::from(cluster.nodes[0].grpc_port))
    );
    let stays = platform("default").await;
    assert!(stays.same_connection, "{stays:?}");
    assert_eq!(stays.primary.unwrap().node_name, "n2");

    // A node removed from a context gives its copy up; added again, it gets a new member id
    // (never the old one) and catches up.
    let before = cluster.status(2, "orders").await.unwrap().member_id;
    let removed = cluster.http(0, "DELETE", "/v1/context/orders/n3", None).await;
    assert_eq!(removed.status, 202, "{removed:?}");
    // (n3 may have led orders: ask a node that stays.)
    wait_voters(&cluster, 0, "orders", &["n1", "n2"]).await;
    wait_gone(&cluster, 2, "orders").await;
    let added = cluster
        .http(1, "POST", "/v1/context/orders/n3?role=PRIMARY", None)
        .await;
    assert_eq!(added.status, 202, "{added:?}");
    wait_voters(&cluster, 2, "orders", &all).await;
    let after = cluster.status(2, "orders").await.unwrap().member_id;
    assert_ne!(before, after, "a member that comes back without its data gets a new id");
    // With --preserve-event-store the copy is set aside on the node, not removed.
    let removed = cluster
        .http(0, "DELETE", "/v1/context/orders/n3?preserveEventStore=true", None)
        .await;
    assert_eq!(removed.status, 202, "{removed:?}");
    wait_gone(&cluster, 2, "orders").await;
    let preserved = cluster.nodes[2].data.join(".preserved");
    let kept = std::fs::read_dir(&preserved)
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains("orders"))
        })
        .unwrap_or(false);
    assert!(kept, "n3's copy of orders set aside under {}", preserved.display());

    // Unregistering n3: the others forget it, _admin has two voters, default two members.
    let gone = cluster.http(0, "DELETE", "/v1/cluster/n3", None).await;
    assert_eq!(gone.status, 200, "{gone:?}");
    for i in 0..2 {
        cluster
            .wait_for(i, "/v1/cluster", JOIN, "n3 forgotten", |v| names(v) == ["n1", "n2"])
            .await;
    }
    wait_voters(&cluster, 0, "default", &["n1", "n2"]).await;
    cluster
        .http(0, "DELETE", "/v1/cluster/n3", None)
        .await
        .assert_error(404, "AXONIQ-1301");
    // The cluster still takes changes.
    let later = cluster
        .http(
            1,
            "POST",
            "/v1/context",
            Some(json!({"context": "later", "nodes": ["n1", "n2"]})),
        )
        .await;
    assert_eq!(later.status, 200, "{later:?}");
    wait_voters(&cluster, 0, "later", &["n1", "n2"]).await;
}

async fn wait_gone(cluster: &Cluster, i: usize, context: &str) {
    let deadline = std::time::Instant::now() + JOIN;
    while cluster.status(i, context).await.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} still holds {context}",
            node_name(i)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_node_refuses_what_would_harm_a_cluster() {
    let cluster = Cluster::start_nodes(2, &[]).await;
    let joined = cluster.register(1, 0, json!({"noContexts": true})).await;
    assert_eq!(joined.status, 202, "{joined:?}");
    cluster
        .wait_for(1, "/v1/cluster", JOIN, "n2 joined", |v| names(v) == ["n1", "n2"])
        .await;

    // A node of the same name as a member (here a fresh n2 on another address).
    let twin = Node::start(Options {
        address: Some(std::net::Ipv4Addr::new(127, 0, 0, 5)),
        env: vec![
            ("AXONIQ_AXONSERVER_NAME".into(), "n2".into()),
            ("AXONIQ_AXONSERVER_HOSTNAME".into(), "127.0.0.5".into()),
        ],
        ..Options::default()
    })
    .await;
    let body = json!({"internalHostName": "127.0.0.1", "internalGrpcPort": cluster.nodes[0].internal_port});
    let call = |node: &Node, body: Value| {
        let host = node.address().to_string();
        let port = node.http_port;
        async move { myelin_tests::http::request_at(&host, port, "POST", "/v1/cluster", Some(body.to_string()), None).await }
    };
    call(&twin, body.clone()).await.assert_error(400, "AXONIQ-2500");
    // An unknown host and a closed port.
    call(
        &twin,
        json!({"internalHostName": "no-such-host.invalid", "internalGrpcPort": 8224}),
    )
    .await
    .assert_error(400, "AXONIQ-2501");
    call(&twin, json!({"internalHostName": "127.0.0.1", "internalGrpcPort": 1}))
        .await
        .assert_error(400, "AXONIQ-2501");
    // Bad input.
    call(&twin, json!({"internalHostName": ""}))
        .await
        .assert_error(400, "AXONIQ-0001");
    call(
        &twin,
        json!({"internalHostName": "127.0.0.1", "context": "default", "noContexts": true}),
    )
    .await
    .assert_error(400, "AXONIQ-0001");

    // A node that holds events never joins.
    let holder = Node::start(Options {
        address: Some(std::net::Ipv4Addr::new(127, 0, 0, 6)),
        env: vec![
            ("AXONIQ_AXONSERVER_NAME".into(), "n6".into()),
            ("AXONIQ_AXONSERVER_HOSTNAME".into(), "127.0.0.6".into()),
        ],
        ..Options::default()
    })
    .await;
    let mut client = holder.client().await;
    append(&mut client, vec![event("a-1", 0, "x")]).await.unwrap();
    let refused = call(&holder, body.clone()).await;
    refused.assert_error(400, "AXONIQ-2502");
    assert!(refused.body.contains("default"), "{refused:?}");
    // It still serves its own events, and the cluster still has two nodes.
    assert_eq!(myelin_tests::read_all(&mut client).await.len(), 1);
    for i in 0..2 {
        cluster
            .wait_for(i, "/v1/cluster", JOIN, "still two nodes", |v| names(v) == ["n1", "n2"])
            .await;
    }
}

/// The first node also creates contexts of its own at start (`myelin.contexts`): many, so that
/// its event store is still opening them when admin serves. Autoclustering waits until the
/// control DB knows them: before, `default` looked missing, was configured again under a member
/// id its event store never held, and was never replicated (no leader in `GET /v1/public/context`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn autocluster_replicates_the_contexts_the_first_node_was_still_opening() {
    let spare: Vec<String> = (1..=24).map(|i| format!("spare{i}")).collect();
    let own = format!("default,{}", spare.join(","));
    let cluster = Cluster::start_autocluster_with(3, "default,spare1", &[("MYELIN_CONTEXTS", own.as_str())]).await;
    let all = ["n1", "n2", "n3"];
    for context in ["default", "spare1"] {
        for i in 0..3 {
            wait_voters(&cluster, i, context, &all).await;
        }
    }
    for i in 0..3 {
        cluster
            .wait_for(i, "/v1/public/context", JOIN, "default with a leader", |v| {
                context(v, "default").is_some_and(|c| c["leader"].is_string() && members(c).len() == 3)
            })
            .await;
    }
}

/// Unregistering the node that leads `_admin`, through another node: the leader hands `_admin`
/// over by leaving it, and the other two elect a leader of their own. Changes asked for at once,
/// while it hands over, wait for the next leader (the node they are asked on no longer reaches the
/// unregistered one). Before, the leader stopped campaigning but went on leading, and every change
/// failed with 503 "not a known peer"; then, for the moment of the hand-over, changes still did.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unregistering_the_admin_leader_hands_admin_over() {
    let cluster = Cluster::start_autocluster(3, "default").await;
    let all = ["n1", "n2", "n3"];
    for i in 0..3 {
        wait_voters(&cluster, i, "default", &all).await;
    }
    let listed = cluster
        .wait_for(0, "/v1/public/context", JOIN, "_admin with a leader", |v| {
            context(v, "_admin").is_some_and(|c| members(c).len() == 3 && c["leader"].is_string())
        })
        .await;
    let leader = context(&listed, "_admin").unwrap()["leader"]
        .as_str()
        .unwrap()
        .to_owned();
    let gone_index = index_of(&leader).unwrap();
    let via = (gone_index + 1) % 3;
    let gone = cluster
        .http(via, "DELETE", &format!("/v1/cluster/{leader}"), None)
        .await;
    assert_eq!(gone.status, 200, "{gone:?}");
    // At once: what the next leader answers.
    let app = cluster
        .http(
            via,
            "POST",
            "/v1/applications",
            Some(json!({"name": "after", "roles": [{"context": "default", "roles": ["READ_EVENTS"]}]})),
        )
        .await;
    assert_eq!(app.status, 200, "{app:?}");
    cluster
        .http(via, "DELETE", &format!("/v1/cluster/{leader}"), None)
        .await
        .assert_error(404, "AXONIQ-1301");
    for i in (0..3).filter(|i| *i != gone_index) {
        cluster
            .wait_for(i, "/v1/public/context", JOIN, "_admin led by a node that stays", |v| {
                context(v, "_admin")
                    .is_some_and(|c| members(c).len() == 2 && c["leader"].as_str().is_some_and(|l| l != leader))
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_form_a_cluster_by_themselves_with_autocluster() {
    let cluster = Cluster::start_autocluster(3, "default,orders").await;
    let all = ["n1", "n2", "n3"];
    for i in 0..3 {
        cluster
            .wait_for(i, "/v1/cluster", JOIN, "every node sees three", |v| names(v) == all)
            .await;
    }
    let contexts = cluster
        .wait_for(2, "/v1/public/context", JOIN, "both contexts on three nodes", |v| {
            ["default", "orders"]
                .iter()
                .all(|c| context(v, c).is_some_and(|c| members(c).len() == 3))
        })
        .await;
    println!("contexts: {contexts}");
    for context in ["default", "orders"] {
        for i in 0..3 {
            wait_voters(&cluster, i, context, &all).await;
        }
    }
    // The cluster takes appends through every node.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut client = node.client().await;
        let events = vec![event(&format!("auto-{i}"), 0, &format!("auto-{i}"))];
        client
            .append_event(with_context(tokio_stream::iter(events), "orders"))
            .await
            .unwrap_or_else(|e| panic!("append through {}: {e}", node_name(i)));
    }
}

/// Two operators change a context's members at once, through different nodes: both changes are
/// carried out, one after the other (`_admin` orders them). The same change twice at once is
/// made once; the other is refused. A node that comes back with an empty data directory under
/// its old name is a stranger: the cluster goes on without it and refuses its name (AXONIQ-2500)
/// until the operator unregisters the old node; registered again, it gets new member ids (never
/// the old ones) and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_and_two_operators_at_once_leave_the_cluster_whole() {
    let mut cluster = Cluster::start_nodes(3, &[]).await;
    let all = ["n1", "n2", "n3"];
    for i in 1..3 {
        let joined = cluster.register(i, 0, json!({})).await;
        assert_eq!(joined.status, 202, "{joined:?}");
        cluster
            .wait_for(i, "/v1/cluster", JOIN, "joined", |v| names(v).len() == i + 1)
            .await;
    }
    let created = cluster
        .http(
            0,
            "POST",
            "/v1/context",
            Some(json!({"context": "orders", "nodes": ["n1", "n2"]})),
        )
        .await;
    assert_eq!(created.status, 200, "{created:?}");
    wait_voters(&cluster, 0, "orders", &["n1", "n2"]).await;

    // One operator adds n3 to orders through n1 while another removes n2 through n3.
    let (added, removed) = tokio::join!(
        cluster.http(0, "POST", "/v1/context/orders/n3", None),
        cluster.http(2, "DELETE", "/v1/context/orders/n2", None),
    );
    assert_eq!((added.status, removed.status), (202, 202), "{added:?} {removed:?}");
    wait_voters(&cluster, 0, "orders", &["n1", "n3"]).await;
    wait_voters(&cluster, 2, "orders", &["n1", "n3"]).await;
    wait_gone(&cluster, 1, "orders").await;
    // Both add n2 back at once: one is carried out, the other refused.
    let (first, second) = tokio::join!(
        cluster.http(0, "POST", "/v1/context/orders/n2", None),
        cluster.http(1, "POST", "/v1/context/orders/n2", None),
    );
    let mut statuses = [first.status, second.status];
    statuses.sort();
    assert_eq!(statuses, [202, 400], "{first:?} {second:?}");
    let refused = if first.status == 400 { &first } else { &second };
    assert!(refused.body.contains("already a member"), "{refused:?}");
    wait_voters(&cluster, 0, "orders", &all).await;

    // n2 loses its data directory and comes back under its name: a standalone node of its own.
    let old_member = cluster.status(1, "default").await.unwrap().member_id;
    cluster.nodes[1].crash();
    std::fs::remove_dir_all(&cluster.nodes[1].data).unwrap();
    std::fs::create_dir_all(&cluster.nodes[1].data).unwrap();
    cluster.nodes[1].launch().await;
    cluster
        .wait_for(1, "/v1/cluster", JOIN, "n2 on its own", |v| names(v) == ["n2"])
        .await;
    // The cluster still confirms (n1 and n3 are a majority of default and of orders), and the
    // stranger holds none of it.
    let mut client = cluster.nodes[0].client().await;
    append(&mut client, vec![event("kept-1", 0, "k0"), event("kept-1", 1, "k1")])
        .await
        .expect("the majority confirms without n2");
    let orders = vec![event("order-9", 0, "o0")];
    client
        .append_event(with_context(tokio_stream::iter(orders), "orders"))
        .await
        .expect("orders confirms without n2");
    let mut stranger = cluster.nodes[1].client().await;
    assert!(myelin_tests::read_all(&mut stranger).await.is_empty());
    // Its name is taken until the operator unregisters the old n2.
    cluster.register(1, 0, json!({})).await.assert_error(400, "AXONIQ-2500");
    let gone = cluster.http(2, "DELETE", "/v1/cluster/n2", None).await;
    assert_eq!(gone.status, 200, "{gone:?}");
    wait_voters(&cluster, 0, "default", &["n1", "n3"]).await;
    wait_voters(&cluster, 0, "orders", &["n1", "n3"]).await;
    // Registered again: new member ids, and the events it lost are back.
    let joined = cluster.register(1, 0, json!({})).await;
    assert_eq!(joined.status, 202, "{joined:?}");
    for i in 0..3 {
        cluster
            .wait_for(i, "/v1/cluster", JOIN, "three nodes again", |v| names(v) == all)
            .await;
    }
    wait_voters(&cluster, 1, "default", &all).await;
    let new_member = cluster.status(1, "default").await.unwrap().member_id;
    assert_ne!(
        old_member, new_member,
        "a node back without its data gets a new member id"
    );
    let deadline = std::time::Instant::now() + JOIN;
    loop {
        let events = cluster.replica(1, "default").await;
        if events.len() == 2 && events == cluster.replica(0, "default").await {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "n2 holds {} events", events.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // As a new node does by default, it joined every context.
    wait_voters(&cluster, 1, "orders", &all).await;
}
