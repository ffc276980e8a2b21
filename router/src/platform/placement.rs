//! Which nodes store each context, as admin last told the router (`PeerDirectory.SetPeers`):
//! what `GetPlatformServer` answers a client with.
//!
//! A client asks any node which server to use for its context. This node answers with itself
//! when it stores the context, or when no other node is known to (a standalone node, or a
//! directory not pushed yet): the client keeps its connection. Otherwise it names a node that
//! stores the context, preferring nodes whose peer link is up, and always the same one for the
//! same client id while the choice stays the same, so that the clients of a context spread over
//! its nodes and a reconnecting client lands where it was.

use std::collections::BTreeSet;
use std::sync::RwLock;

use myelin_proto::axon::control::NodeInfo;
use myelin_proto::internal::PeerAddress;

/// Another node of the cluster, as clients reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Server {
    info: NodeInfo,
    contexts: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct Known {
    local: BTreeSet<String>,
    others: Vec<Server>,
}

#[derive(Debug, Default)]
pub struct Placement {
    known: RwLock<Known>,
}

impl Placement {
    /// Replaces what is known: the contexts this node stores, and the other nodes.
    pub fn set(&self, local: &[String], peers: &[PeerAddress]) {
        let others = peers
            .iter()
            .filter(|p| p.grpc_port != 0 && !p.host_name.is_empty())
            .map(|p| Server {
                info: NodeInfo {
                    host_name: p.host_name.clone(),
                    grpc_port: i32::try_from(p.grpc_port).unwrap_or(0),
                    http_port: i32::try_from(p.http_port).unwrap_or(0),
                    version: 0,
                    node_name: p.node.clone(),
                },
                contexts: p.contexts.iter().cloned().collect(),
            })
            .collect();
        *self.known.write().expect("placement") = Known {
            local: local.iter().cloned().collect(),
            others,
        };
    }

    /// The node a client of `context` should use, or `None` for this node. `connected` says
    /// whether this node's link to a node (by name) is up.
    pub fn server_for(&self, context: &str, client_id: &str, connected: impl Fn(&str) -> bool) -> Option<NodeInfo> {
        let known = self.known.read().expect("placement");
        if known.local.contains(context) {
            return None;
        }
        let storing: Vec<&Server> = known.others.iter().filter(|s| s.contexts.contains(context)).collect();
        let reachable: Vec<&Server> = storing
            .iter()
            .copied()
            .filter(|s| connected(&s.info.node_name))
            .collect();
        let choices = if reachable.is_empty() { storing } else { reachable };
        if choices.is_empty() {
            return None;
        }
        let pick = fnv1a(client_id.as_bytes()) % choices.len() as u64;
        Some(choices[pick as usize].info.clone())
    }
}

/// A hash that is the same in every process and version (unlike std's `DefaultHasher`), so
/// every node sends a client to the same server.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(node: &str, port: u32, contexts: &[&str]) -> PeerAddress {
        PeerAddress {
            node: node.into(),
            internal_address: format!("127.0.0.1:{}", port + 100),
            host_name: format!("{node}.example"),
            grpc_port: port,
            http_port: port + 1,
            contexts: contexts.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    #[test]
    fn a_node_that_stores_the_context_or_knows_no_other_keeps_the_client() {
        let placement = Placement::default();
        assert_eq!(
            placement.server_for("default", "c1", |_| true),
            None,
            "nothing known yet"
        );
        placement.set(&["default".into()], &[peer("n2", 9000, &["default", "orders"])]);
        assert_eq!(placement.server_for("default", "c1", |_| true), None);
        assert_eq!(placement.server_for("unknown", "c1", |_| true), None);
    }

    #[test]
    fn a_client_of_a_context_stored_elsewhere_is_sent_to_a_node_that_stores_it() {
        let placement = Placement::default();
        placement.set(
            &["default".into()],
            &[
                peer("n2", 9000, &["orders"]),
                peer("n3", 9100, &["orders"]),
                peer("n4", 9200, &["default"]),
            ],
        );
        let mut seen = BTreeSet::new();
        for client in 0..40 {
            let id = format!("client-{client}");
            let server = placement.server_for("orders", &id, |_| true).unwrap();
            assert!(["n2", "n3"].contains(&server.node_name.as_str()), "{server:?}");
            assert_eq!(server.host_name, format!("{}.example", server.node_name));
            // The same client, the same answer.
            assert_eq!(placement.server_for("orders", &id, |_| true), Some(server.clone()));
            seen.insert(server.node_name);
        }
        assert_eq!(seen.len(), 2, "clients spread over both nodes");
        // A node whose link is down is not chosen while another is up.
        for client in 0..10 {
            let server = placement
                .server_for("orders", &format!("c{client}"), |n| n != "n2")
                .unwrap();
            assert_eq!(server.node_name, "n3");
        }
        // With every link down, still a node that stores it (better than one that does not).
        let server = placement.server_for("orders", "c", |_| false).unwrap();
        assert!(["n2", "n3"].contains(&server.node_name.as_str()));
    }
}
