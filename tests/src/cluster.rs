//! A test cluster as a value: N real nodes on their own loopback addresses (127.0.0.1,
//! 127.0.0.2, ...), each with its own data directory and ports, told where the others are.
//!
//! Two ways to use it:
//! - as operators do: [`Cluster::start_nodes`] starts standalone nodes, and the test joins them
//!   with `register-node` ([`Cluster::register`]) and places contexts through the admin API;
//! - playing admin's part, to test replication alone: [`Cluster::start`] gives each router its
//!   peers (`PeerDirectory`) and the tests give each eventstore its membership of a context
//!   (`StorageControl.JoinContext` / `AddMember`), over the nodes' own Unix sockets.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use myelin_proto::internal::peer_directory_client::PeerDirectoryClient;
use myelin_proto::internal::storage_control_client::StorageControlClient;
use myelin_proto::internal::{
    AddMemberRequest, GroupMember, GroupStatus, GroupStatusRequest, JoinContextRequest, PeerAddress, SetPeersRequest,
};
use tonic::transport::Channel;

use crate::http::Reply;
use crate::{Node, Options};

/// The events a node serves from its own replica of a context, as (token, encoded event).
pub type Replica = Vec<(i64, Vec<u8>)>;

pub struct Cluster {
    pub nodes: Vec<Node>,
}

/// The name of the `i`th node (0-based): `n1`, `n2`, ...
pub fn node_name(i: usize) -> String {
    format!("n{}", i + 1)
}

impl Cluster {
    /// Starts `n` nodes named n1..nN on 127.0.0.1..N, makes them one cluster (n2.. register
    /// with n1, serving no context, so that `_admin` knows every node and keeps every router's
    /// directory), and tells every router about the others at once.
    pub async fn start(n: usize, env: &[(&str, &str)]) -> Cluster {
        let mut cluster = Cluster { nodes: Vec::new() };
        for _ in 0..n {
            cluster.add_node(env).await;
        }
        cluster
    }

    /// Adds one more node: started, registered with n1 (serving no context), known to every
    /// router.
    pub async fn add_node(&mut self, env: &[(&str, &str)]) -> usize {
        let i = self.nodes.len();
        self.nodes.push(start_node(i, env).await);
        if i > 0 {
            let token = env
                .iter()
                .find(|(k, _)| *k == "AXONIQ_AXONSERVER_ACCESSCONTROL_ADMIN_TOKEN")
                .map(|(_, v)| *v);
            let reply = self
                .register_with(i, 0, serde_json::json!({"noContexts": true}), token)
                .await;
            assert_eq!(reply.status, 202, "register {}: {reply:?}", node_name(i));
            let count = i + 1;
            self.wait_for_with(i, "/v1/cluster", Duration::from_secs(60), "joined", token, |v| {
                v.as_array().is_some_and(|nodes| nodes.len() == count)
            })
            .await;
        }
        self.set_peers().await;
        i
    }

    /// Starts `n` standalone nodes named n1..nN on 127.0.0.1..N (each its own cluster of one,
    /// until the test joins them).
    pub async fn start_nodes(n: usize, env: &[(&str, &str)]) -> Cluster {
        let mut cluster = Cluster { nodes: Vec::new() };
        for _ in 0..n {
            cluster.nodes.push(start_node(cluster.nodes.len(), env).await);
        }
        cluster
    }

    /// Starts `n` nodes that form a cluster by themselves (`autocluster.first` names n1, which
    /// creates `contexts`; the others join it and serve them).
    pub async fn start_autocluster(n: usize, contexts: &str) -> Cluster {
        Cluster::start_autocluster_with(n, contexts, &[]).await
    }

    /// [`Cluster::start_autocluster`] with more settings for every node.
    pub async fn start_autocluster_with(n: usize, contexts: &str, more: &[(&str, &str)]) -> Cluster {
        let first_port = crate::free_port();
        let first = format!("127.0.0.1:{first_port}");
        let mut env = vec![
            ("AXONIQ_AXONSERVER_AUTOCLUSTER_FIRST", first.as_str()),
            ("AXONIQ_AXONSERVER_AUTOCLUSTER_CONTEXTS", contexts),
        ];
        env.extend_from_slice(more);
        let mut cluster = Cluster { nodes: Vec::new() };
        for i in 0..n {
            let port = (i == 0).then_some(first_port);
            cluster.nodes.push(start_node_at(i, &env, port).await);
        }
        cluster
    }

    /// An admin API call to node `i`.
    pub async fn http(&self, i: usize, method: &'static str, path: &str, body: Option<serde_json::Value>) -> Reply {
        self.http_with(i, method, path, body, None).await
    }

    /// An admin API call to node `i` carrying `token`.
    pub async fn http_with(
        &self,
        i: usize,
        method: &'static str,
        path: &str,
        body: Option<serde_json::Value>,
        token: Option<&str>,
    ) -> Reply {
        let node = &self.nodes[i];
        crate::http::request_at(
            &node.address().to_string(),
            node.http_port,
            method,
            path,
            body.map(|b| b.to_string()),
            token,
        )
        .await
    }

    /// `register-node` on node `i`, naming node `via` as the cluster to join.
    pub async fn register(&self, i: usize, via: usize, extra: serde_json::Value) -> Reply {
        self.register_with(i, via, extra, None).await
    }

    async fn register_with(&self, i: usize, via: usize, extra: serde_json::Value, token: Option<&str>) -> Reply {
        let mut body = serde_json::json!({
            "internalHostName": self.nodes[via].address().to_string(),
            "internalGrpcPort": self.nodes[via].internal_port,
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        self.http_with(i, "POST", "/v1/cluster", Some(body), token).await
    }

    /// Polls `check` on the answer of `GET path` on node `i` until it holds (a node whose admin
    /// is restarting answers nothing for a moment).
    pub async fn wait_for(
        &self,
        i: usize,
        path: &str,
        within: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_for_with(i, path, within, what, None, check).await
    }

    async fn wait_for_with(
        &self,
        i: usize,
        path: &str,
        within: Duration,
        what: &str,
        token: Option<&str>,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        loop {
            if self.nodes[i].admin_serving().await {
                let reply = self.http_with(i, "GET", path, None, token).await;
                if reply.status == 200 {
                    let value = reply.json();
                    if check(&value) {
                        return value;
                    }
                }
                last = reply.body;
            }
            if Instant::now() >= deadline {
                let tail = |text: String| {
                    let lines: Vec<&str> = text.lines().collect();
                    lines[lines.len().saturating_sub(60)..].join("\n")
                };
                panic!(
                    "{}: {what} did not happen within {within:?}; last answer to GET {path}: {last}\n--- its log:\n{}",
                    node_name(i),
                    tail(self.nodes[i].log_text())
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every event of `context` that node `i` serves from its own replica, as (token, encoded
    /// event), read with one tracking stream from token 0 to the last token. Panics, with the
    /// end of the node's log, when the node cannot say its last token.
    pub async fn replica(&self, i: usize, context: &str) -> Replica {
        match self.try_replica(i, context).await {
            Ok(replica) => replica,
            Err(e) => self.panic_with_log(i, &format!("reading the last token of {context}: {e:?}")),
        }
    }

    /// Panics with `what` and the last 80 lines of node `i`'s log.
    pub fn panic_with_log(&self, i: usize, what: &str) -> ! {
        let log = self.nodes[i].log_text();
        let lines: Vec<&str> = log.lines().collect();
        panic!(
            "{}: {what}\n--- its log:\n{}",
            node_name(i),
            lines[lines.len().saturating_sub(80)..].join("\n")
        );
    }

    /// [`Cluster::replica`], or the error the node gave for its last token: a node that has just
    /// restarted may not know its context's leader yet (AXONIQ-2100, UNAVAILABLE), as a client
    /// may see too; a test that allows for that asks again.
    pub async fn try_replica(&self, i: usize, context: &str) -> Result<Replica, tonic::Status> {
        use myelin_proto::axon::event::event_store_client::EventStoreClient;
        use myelin_proto::axon::event::{GetEventsRequest, GetLastTokenRequest};
        use prost::Message as _;
        use tokio_stream::StreamExt as _;
        let mut client = EventStoreClient::new(self.nodes[i].channel().await);
        let last = client
            .get_last_token(crate::with_context(GetLastTokenRequest {}, context))
            .await?
            .into_inner()
            .token;
        if last < 0 {
            return Ok(Vec::new());
        }
        let request = GetEventsRequest {
            tracking_token: 0,
            number_of_permits: last + 1,
            client_id: "replica-check".into(),
            component_name: "test".into(),
            processor: "check".into(),
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(request).await.unwrap();
        let mut stream = client
            .list_events(crate::with_context(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                context,
            ))
            .await
            .unwrap()
            .into_inner();
        let mut events = Vec::new();
        while (events.len() as i64) <= last {
            let Some(next) = stream.next().await else { break };
            let next = next.unwrap();
            events.push((next.token, next.event.unwrap().encode_to_vec()));
        }
        Ok(events)
    }

    /// Asserts that the replicas (node, events as [`Cluster::replica`] reads them) hold the same
    /// events under the same dense tokens, and that the nodes' segment files of `context` are
    /// byte-identical.
    pub fn assert_same_replicas(&self, context: &str, replicas: &[(usize, Replica)]) {
        let (first, reference) = &replicas[0];
        for (i, events) in &replicas[1..] {
            assert_eq!(
                events.len(),
                reference.len(),
                "{} vs {}",
                node_name(*i),
                node_name(*first)
            );
            for (a, b) in events.iter().zip(reference) {
                assert_eq!(
                    a,
                    b,
                    "token {} differs between {} and {}",
                    a.0,
                    node_name(*i),
                    node_name(*first)
                );
            }
        }
        let tokens: Vec<i64> = reference.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            tokens,
            (0..reference.len() as i64).collect::<Vec<_>>(),
            "tokens are dense"
        );
        let files: Vec<(usize, BTreeMap<String, Vec<u8>>)> = replicas
            .iter()
            .map(|(i, _)| (*i, segment_files(&self.nodes[*i].data, context)))
            .collect();
        for (i, f) in &files[1..] {
            assert_eq!(
                f.keys().collect::<Vec<_>>(),
                files[0].1.keys().collect::<Vec<_>>(),
                "segment names on {}",
                node_name(*i)
            );
            for (name, bytes) in f {
                assert!(
                    bytes == &files[0].1[name],
                    "segment {name} differs on {}",
                    node_name(*i)
                );
            }
        }
    }

    /// Gives every running router the directory of all nodes.
    pub async fn set_peers(&self) {
        let peers: Vec<PeerAddress> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| PeerAddress {
                node: node_name(i),
                internal_address: node.internal_address(),
                ..Default::default()
            })
            .collect();
        for node in &self.nodes {
            if node.supervisor_pid().is_none() {
                continue;
            }
            let mut directory = PeerDirectoryClient::new(socket_channel(&node.runtime_dir().join("router.sock")));
            directory
                .set_peers(SetPeersRequest {
                    peers: peers.clone(),
                    ..Default::default()
                })
                .await
                .expect("set peers");
        }
    }

    pub fn storage_control(&self, i: usize) -> StorageControlClient<Channel> {
        StorageControlClient::new(socket_channel(&self.nodes[i].runtime_dir().join("eventstore.sock")))
    }

    /// Creates `context` as a group whose first voters are the given nodes, node `i` being member
    /// `member_id(i)`.
    pub async fn create_context(&self, context: &str, on: &[usize]) {
        let members: Vec<GroupMember> = on
            .iter()
            .map(|&i| GroupMember {
                id: member_id(i),
                node: node_name(i),
                voter: true,
                matched_index: None,
            })
            .collect();
        for &i in on {
            self.storage_control(i)
                .join_context(JoinContextRequest {
                    name: context.to_owned(),
                    member_id: member_id(i),
                    initial_members: members.clone(),
                })
                .await
                .expect("join context");
        }
    }

    /// Adds node `i` to `context`'s running group (through its leader) and returns the status.
    pub async fn add_member(&self, context: &str, i: usize) -> GroupStatus {
        // Before the new member exists: it knows no leader until the leader reaches it.
        let leader = self.wait_leader(context, Duration::from_secs(10)).await;
        self.storage_control(i)
            .join_context(JoinContextRequest {
                name: context.to_owned(),
                member_id: member_id(i),
                initial_members: Vec::new(),
            })
            .await
            .expect("join context as a new member");
        self.storage_control(leader)
            .add_member(AddMemberRequest {
                context: context.to_owned(),
                member: Some(GroupMember {
                    id: member_id(i),
                    node: node_name(i),
                    voter: true,
                    matched_index: None,
                }),
            })
            .await
            .expect("add member")
            .into_inner()
    }

    /// Node `i`'s eventstore metrics, in the Prometheus text format.
    pub async fn metrics(&self, i: usize) -> String {
        self.storage_control(i)
            .metrics(myelin_proto::internal::MetricsRequest {})
            .await
            .expect("eventstore metrics")
            .into_inner()
            .text
    }

    pub async fn status(&self, i: usize, context: &str) -> Option<GroupStatus> {
        self.storage_control(i)
            .get_group_status(GroupStatusRequest {
                context: context.to_owned(),
            })
            .await
            .ok()
            .map(|s| s.into_inner())
    }

    /// Waits until the running nodes that store `context` agree on one leader; returns its node.
    pub async fn wait_leader(&self, context: &str, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let mut leaders = Vec::new();
            for (i, node) in self.nodes.iter().enumerate() {
                if node.supervisor_pid().is_none() {
                    continue;
                }
                if let Some(status) = self.status(i, context).await {
                    // The leader's node, by the name its member has in the group.
                    let node = status
                        .leader
                        .and_then(|id| status.members.iter().find(|m| m.id == id))
                        .map(|m| m.node.clone());
                    leaders.push(node);
                }
            }
            if let Some(Some(leader)) = leaders.first()
                && leaders.iter().all(|l| l.as_ref() == Some(leader))
                && let Some(i) = index_of(leader)
                && self.nodes[i].supervisor_pid().is_some()
            {
                return i;
            }
            assert!(Instant::now() < deadline, "no agreed leader for {context}: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts node `i` (0-based) on 127.0.0.(i+1), named `n(i+1)`.
async fn start_node(i: usize, env: &[(&str, &str)]) -> Node {
    start_node_at(i, env, None).await
}

async fn start_node_at(i: usize, env: &[(&str, &str)], internal_port: Option<u16>) -> Node {
    let mut options = Options {
        address: Some(Ipv4Addr::new(127, 0, 0, 1 + i as u8)),
        internal_port,
        ..Options::default()
    };
    options.env.push(("AXONIQ_AXONSERVER_NAME".into(), node_name(i)));
    // Other nodes reach it where it listens.
    options.env.push((
        "AXONIQ_AXONSERVER_HOSTNAME".into(),
        options.address.unwrap().to_string(),
    ));
    for (k, v) in env {
        options.env.push(((*k).into(), (*v).into()));
    }
    Node::start(options).await
}

/// Node `i`'s member id in every group of the cluster tests (never 1, the standalone id).
pub fn member_id(i: usize) -> u64 {
    101 + i as u64
}

/// The node (0-based) named `name` (`n1` is 0).
pub fn index_of(name: &str) -> Option<usize> {
    name.strip_prefix('n')?.parse::<usize>().ok()?.checked_sub(1)
}

/// The node (0-based) of a member id.
pub fn node_of(member: u64) -> usize {
    (member - 101) as usize
}

fn socket_channel(path: &std::path::Path) -> Channel {
    myelin_proto::local_socket::channel(path).expect("socket path")
}

/// The bytes of every event segment file of `context` in data directory `data`, by file name.
fn segment_files(data: &std::path::Path, context: &str) -> BTreeMap<String, Vec<u8>> {
    let dir = data.join(context).join("events");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".events"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}
