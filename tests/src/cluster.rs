//! A test cluster as a value: N real nodes on their own loopback addresses (127.0.0.1,
//! 127.0.0.2, ...), each with its own data directory and ports, told where the others are.
//!
//! Until the `_admin` group decides membership, the cluster tests play admin's part: they give
//! each router its peers (`PeerDirectory`) and each eventstore its membership of a context
//! (`StorageControl.JoinContext` / `AddMember`), over the nodes' own Unix sockets.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use myelin_proto::internal::peer_directory_client::PeerDirectoryClient;
use myelin_proto::internal::storage_control_client::StorageControlClient;
use myelin_proto::internal::{
    AddMemberRequest, GroupMember, GroupStatus, GroupStatusRequest, JoinContextRequest, PeerAddress, SetPeersRequest,
};
use tonic::transport::Channel;

use crate::{Node, Options};

pub struct Cluster {
    pub nodes: Vec<Node>,
}

/// The name of the `i`th node (0-based): `n1`, `n2`, ...
pub fn node_name(i: usize) -> String {
    format!("n{}", i + 1)
}

impl Cluster {
    /// Starts `n` nodes named n1..nN on 127.0.0.1..N and tells every router about the others.
    pub async fn start(n: usize, env: &[(&str, &str)]) -> Cluster {
        let mut cluster = Cluster { nodes: Vec::new() };
        for _ in 0..n {
            cluster.nodes.push(start_node(cluster.nodes.len(), env).await);
        }
        cluster.set_peers().await;
        cluster
    }

    /// Adds one more node (started, and known to every router).
    pub async fn add_node(&mut self, env: &[(&str, &str)]) -> usize {
        let i = self.nodes.len();
        self.nodes.push(start_node(i, env).await);
        self.set_peers().await;
        i
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
            })
            .collect();
        for node in &self.nodes {
            if node.supervisor_pid().is_none() {
                continue;
            }
            let mut directory = PeerDirectoryClient::new(socket_channel(&node.runtime_dir().join("router.sock")));
            directory
                .set_peers(SetPeersRequest { peers: peers.clone() })
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
                    leaders.push(status.leader);
                }
            }
            if let Some(Some(leader)) = leaders.first()
                && leaders.iter().all(|l| *l == Some(*leader))
            {
                let i = node_of(*leader);
                if self.nodes[i].supervisor_pid().is_some() {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader for {context}: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts node `i` (0-based) on 127.0.0.(i+1), named `n(i+1)`.
async fn start_node(i: usize, env: &[(&str, &str)]) -> Node {
    let mut options = Options {
        address: Some(Ipv4Addr::new(127, 0, 0, 1 + i as u8)),
        ..Options::default()
    };
    options.env.push(("AXONIQ_AXONSERVER_NAME".into(), node_name(i)));
    for (k, v) in env {
        options.env.push(((*k).into(), (*v).into()));
    }
    Node::start(options).await
}

/// Node `i`'s member id in every group of the cluster tests (never 1, the standalone id).
pub fn member_id(i: usize) -> u64 {
    101 + i as u64
}

/// The node (0-based) of a member id.
pub fn node_of(member: u64) -> usize {
    (member - 101) as usize
}

fn socket_channel(path: &std::path::Path) -> Channel {
    myelin_proto::local_socket::channel(path).expect("socket path")
}
