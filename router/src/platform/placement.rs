//! Which nodes store each context, as admin last told the router (`PeerDirectory.SetPeers`),
//! and how many clients each serves: what `GetPlatformServer` answers a client with.
//!
//! A client asks any node which server to use for its context. The answer is the node, among
//! those that store the context (this one included) and whose peer link is up, whose tags
//! (`axoniq.axonserver.tags.*`) match most of the client's tags, and among those the one that
//! serves the fewest client applications of that context, as Axon Server chooses: so the
//! clients of a context spread over its nodes (issue 12), and a client tagged `region=eu` goes
//! to a node tagged `region=eu` when one serves its context. This node answers with itself (the
//! client keeps its connection) when it is that node, on a tie, or when no other node is known
//! to store the context (a standalone node, or a directory not pushed yet). The other nodes'
//! tags come with their handler sets.
//!
//! The other nodes' counts come with their handler sets (`command::remote`, every 2 s). A burst
//! of clients asking before the next counts arrive must not all go to the same node, so each
//! answer also counts for [`ASSIGNED_FOR`] against the node it named.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use myelin_proto::axon::control::NodeInfo;
use myelin_proto::internal::PeerAddress;

/// How long a client sent to a node counts against it before that node's own count (which
/// then includes the client) has come back: longer than the counts' period.
const ASSIGNED_FOR: Duration = Duration::from_secs(5);

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
struct Loads {
    /// node -> context -> client applications it reported.
    reported: HashMap<String, HashMap<String, u32>>,
    /// Clients sent to a node (this one: `""`) lately: when, for which context, which client.
    assigned: HashMap<String, VecDeque<(Instant, String, String)>>,
}

impl Loads {
    /// The clients `node` serves, counting those sent to it lately; `registered` says whether
    /// a client has registered here (then this node's own count has it already).
    fn load(&self, node: &str, context: &str, now: Instant, registered: &dyn Fn(&str) -> bool) -> usize {
        let reported = self
            .reported
            .get(node)
            .and_then(|c| c.get(context))
            .map_or(0, |n| *n as usize);
        let assigned = self.assigned.get(node).map_or(0, |a| {
            a.iter()
                .filter(|(at, c, client)| {
                    c == context && now.duration_since(*at) < ASSIGNED_FOR && !(node.is_empty() && registered(client))
                })
                .count()
        });
        reported + assigned
    }

    fn assign(&mut self, node: &str, context: &str, client_id: &str, now: Instant) {
        let assigned = self.assigned.entry(node.to_owned()).or_default();
        while assigned
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) >= ASSIGNED_FOR)
        {
            assigned.pop_front();
        }
        assigned.push_back((now, context.to_owned(), client_id.to_owned()));
    }
}

/// Node tags: a node's value per tag name.
pub type Tags = BTreeMap<String, String>;

/// The most tags a node may have (`axoniq.axonserver.tags.*`).
pub const MAX_TAGS: usize = 64;

#[derive(Debug, Default)]
pub struct Placement {
    known: RwLock<Known>,
    loads: Mutex<Loads>,
    /// This node's tags, and the others' as they last said.
    tags: RwLock<(Tags, HashMap<String, Tags>)>,
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

    /// The client applications another node serves, by context, as it last said.
    pub fn set_clients(&self, node: &str, clients: HashMap<String, u32>) {
        let mut loads = self.loads.lock().expect("placement loads");
        loads.reported.insert(node.to_owned(), clients);
        // Its count now includes the clients sent to it before it counted.
        loads.assigned.remove(node);
    }

    /// Forgets what a node that left (or went quiet) said.
    pub fn forget_clients(&self, node: &str) {
        let mut loads = self.loads.lock().expect("placement loads");
        loads.reported.remove(node);
        loads.assigned.remove(node);
        self.tags.write().expect("placement tags").1.remove(node);
    }

    /// This node's tags (from its configuration).
    pub fn set_local_tags(&self, tags: Tags) {
        self.tags.write().expect("placement tags").0 = tags;
    }

    pub fn local_tags(&self) -> Tags {
        self.tags.read().expect("placement tags").0.clone()
    }

    /// Another node's tags, as it last said.
    pub fn set_tags(&self, node: &str, tags: Tags) {
        self.tags
            .write()
            .expect("placement tags")
            .1
            .insert(node.to_owned(), tags);
    }

    /// The node a client of `context` with `client_tags` should use, or `None` for this node.
    /// `connected` says whether this node's link to a node (by name) is up; `here` is how many
    /// client applications of `context` this node serves, and `registered` whether a client (by
    /// id) is one of them. The answer counts against the node it names for a while.
    pub fn server_for(
        &self,
        context: &str,
        client_id: &str,
        client_tags: &HashMap<String, String>,
        connected: impl Fn(&str) -> bool,
        here: usize,
        registered: impl Fn(&str) -> bool,
    ) -> Option<NodeInfo> {
        self.choose(context, client_id, client_tags, &connected, here, &registered, true)
    }

    /// Whether a client connected here would be sent to another node if it asked now, as if it
    /// had left this node (`here` counts it): the balancer asks only those to reconnect, so a
    /// client whose tags match this node best stays, and so does one that would only swap
    /// places (one more there than here).
    pub fn better_elsewhere(
        &self,
        context: &str,
        client_id: &str,
        client_tags: &HashMap<String, String>,
        connected: impl Fn(&str) -> bool,
        here: usize,
        registered: impl Fn(&str) -> bool,
    ) -> bool {
        let without = here.saturating_sub(1);
        self.choose(context, client_id, client_tags, &connected, without, &registered, false)
            .is_some()
    }

    /// How many of its `here` clients of `context` this node serves beyond its share: more than
    /// the even share (rounded up) of the clients of every node that stores the context, is
    /// reachable and has said how many it serves. Zero while any such node has not said yet, or
    /// when the lightest node serves only one fewer (a move would only swap places). Nodes
    /// decide this each on its own, so each only sheds what is above the rounded-up share:
    /// together they never push the lightest node above it.
    pub fn surplus(&self, context: &str, here: usize, connected: impl Fn(&str) -> bool) -> usize {
        let known = self.known.read().expect("placement");
        if !known.local.contains(context) {
            return 0;
        }
        let now = Instant::now();
        let loads = self.loads.lock().expect("placement loads");
        let mut others = Vec::new();
        for server in known.others.iter().filter(|s| s.contexts.contains(context)) {
            let name = server.info.node_name.as_str();
            if !connected(name) {
                continue;
            }
            if !loads.reported.contains_key(name) {
                return 0;
            }
            others.push(loads.load(name, context, now, &|_| false));
        }
        let Some(lightest) = others.iter().min().copied() else {
            return 0;
        };
        let total = here + others.iter().sum::<usize>();
        let share = total.div_ceil(others.len() + 1);
        if here < lightest + 2 {
            return 0;
        }
        here.saturating_sub(share)
    }

    /// Whether this node reaches a majority of the nodes that store `context`, itself included
    /// (its peer links are up to them). A node that does not store the context, or knows no
    /// other node that does, stands alone and reaches it.
    pub fn reaches_majority(&self, context: &str, connected: impl Fn(&str) -> bool) -> bool {
        let known = self.known.read().expect("placement");
        if !known.local.contains(context) {
            return true;
        }
        let storing: Vec<&Server> = known.others.iter().filter(|s| s.contexts.contains(context)).collect();
        let reachable = 1 + storing.iter().filter(|s| connected(&s.info.node_name)).count();
        2 * reachable > storing.len() + 1
    }

    /// The other nodes that store `context` and are reachable, by name, in order.
    pub fn reachable_storing(&self, context: &str, connected: impl Fn(&str) -> bool) -> Vec<String> {
        let known = self.known.read().expect("placement");
        let mut nodes: Vec<String> = known
            .others
            .iter()
            .filter(|s| s.contexts.contains(context) && connected(&s.info.node_name))
            .map(|s| s.info.node_name.clone())
            .collect();
        nodes.sort();
        nodes
    }

    /// The contexts this node stores.
    pub fn local_contexts(&self) -> Vec<String> {
        self.known.read().expect("placement").local.iter().cloned().collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn choose(
        &self,
        context: &str,
        client_id: &str,
        client_tags: &HashMap<String, String>,
        connected: &dyn Fn(&str) -> bool,
        here: usize,
        registered: &dyn Fn(&str) -> bool,
        assign: bool,
    ) -> Option<NodeInfo> {
        let known = self.known.read().expect("placement");
        let stored_here = known.local.contains(context);
        let storing: Vec<&Server> = known.others.iter().filter(|s| s.contexts.contains(context)).collect();
        let reachable: Vec<&Server> = storing
            .iter()
            .copied()
            .filter(|s| connected(&s.info.node_name))
            .collect();
        let others = if reachable.is_empty() && !stored_here {
            storing
        } else {
            reachable
        };
        if others.is_empty() {
            return None;
        }
        let now = Instant::now();
        let tags = self.tags.read().expect("placement tags");
        // How many of the client's tags a node has (with the same value): more is better.
        let unmatched = |node_tags: Option<&Tags>| {
            let matched = client_tags
                .iter()
                .filter(|(name, value)| node_tags.and_then(|t| t.get(*name)) == Some(*value))
                .count();
            client_tags.len() - matched
        };
        let mut loads = self.loads.lock().expect("placement loads");
        // (tags not matched, load, not this node, tie-break by client), the smallest wins: on a
        // tie this node, else the same node for the same client.
        type Rank = (usize, usize, bool, u64);
        let mut best: Option<(Rank, Option<&Server>)> = stored_here.then(|| {
            let load = here + loads.load("", context, now, registered);
            ((unmatched(Some(&tags.0)), load, false, 0), None)
        });
        for server in others {
            let name = &server.info.node_name;
            let rank = (
                unmatched(tags.1.get(name)),
                loads.load(name, context, now, registered),
                true,
                fnv1a(format!("{client_id}@{name}").as_bytes()),
            );
            if best.as_ref().is_none_or(|(b, _)| rank < *b) {
                best = Some((rank, Some(server)));
            }
        }
        let chosen = best.and_then(|(_, server)| server);
        if assign {
            let name = chosen.map_or("", |s| s.info.node_name.as_str());
            loads.assign(name, context, client_id, now);
        }
        chosen.map(|s| s.info.clone())
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

    fn none() -> HashMap<String, String> {
        HashMap::new()
    }

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
    fn a_node_that_knows_no_other_storing_node_keeps_the_client() {
        let placement = Placement::default();
        assert_eq!(
            placement.server_for("default", "c1", &none(), |_| true, 0, |_| false),
            None,
            "nothing known yet"
        );
        placement.set(&["default".into()], &[peer("n2", 9000, &["orders"])]);
        assert_eq!(
            placement.server_for("default", "c1", &none(), |_| true, 5, |_| false),
            None
        );
        assert_eq!(
            placement.server_for("unknown", "c1", &none(), |_| true, 0, |_| false),
            None
        );
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
            let server = placement
                .server_for("orders", &format!("client-{client}"), &none(), |_| true, 0, |_| false)
                .unwrap();
            assert!(["n2", "n3"].contains(&server.node_name.as_str()), "{server:?}");
            assert_eq!(server.host_name, format!("{}.example", server.node_name));
            seen.insert(server.node_name);
        }
        assert_eq!(seen.len(), 2, "clients spread over both nodes");
        // A node whose link is down is not chosen while another is up.
        for client in 0..10 {
            let server = placement
                .server_for("orders", &format!("c{client}"), &none(), |n| n != "n2", 0, |_| false)
                .unwrap();
            assert_eq!(server.node_name, "n3");
        }
        // With every link down, still a node that stores it (better than one that does not).
        let server = placement
            .server_for("orders", "c", &none(), |_| false, 0, |_| false)
            .unwrap();
        assert!(["n2", "n3"].contains(&server.node_name.as_str()));
    }

    #[test]
    fn clients_go_to_the_node_with_the_fewest_and_a_burst_spreads_evenly() {
        let placement = Placement::default();
        placement.set(
            &["default".into()],
            &[peer("n2", 9000, &["default"]), peer("n3", 9100, &["default"])],
        );
        // Equal: this node keeps the client.
        assert_eq!(
            placement.server_for("default", "c0", &none(), |_| true, 0, |_| false),
            None
        );
        // n2 and n3 say they serve 10 and 4; this node serves 7 (and was just given c0).
        placement.set_clients("n2", HashMap::from([("default".to_owned(), 10)]));
        placement.set_clients("n3", HashMap::from([("default".to_owned(), 4)]));
        let mut counts: HashMap<String, usize> = HashMap::new();
        for client in 0..30 {
            let to = placement
                .server_for("default", &format!("c{client}"), &none(), |_| true, 7, |_| false)
                .map_or("n1".to_owned(), |s| s.node_name);
            *counts.entry(to).or_default() += 1;
        }
        // Filled up from the bottom: 4+x = 8+y = 10+z with x+y+z = 30 (this node had 7 + c0).
        let total = |n: &str, start: usize| start + counts.get(n).copied().unwrap_or(0);
        let (n1, n2, n3) = (total("n1", 8), total("n2", 10), total("n3", 4));
        assert!(
            n1.abs_diff(n2) <= 1 && n2.abs_diff(n3) <= 1 && n1.abs_diff(n3) <= 1,
            "{counts:?}"
        );
        // A node gone from the cluster no longer counts; unreachable ones are not chosen.
        placement.forget_clients("n2");
        let server = placement
            .server_for("default", "late", &none(), |n| n != "n3", 1_000, |_| false)
            .unwrap();
        assert_eq!(server.node_name, "n2");
    }

    #[test]
    fn the_node_that_matches_most_of_the_clients_tags_wins_over_a_lighter_one() {
        let placement = Placement::default();
        placement.set(
            &["default".into()],
            &[peer("n2", 9000, &["default"]), peer("n3", 9100, &["default"])],
        );
        placement.set_local_tags(Tags::from([("region".into(), "us".into())]));
        placement.set_tags(
            "n2",
            Tags::from([("region".into(), "eu".into()), ("disk".into(), "ssd".into())]),
        );
        placement.set_tags("n3", Tags::from([("region".into(), "eu".into())]));
        placement.set_clients("n2", HashMap::from([("default".to_owned(), 50)]));
        let client = |tags: &[(&str, &str)]| -> HashMap<String, String> {
            tags.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        let to = |tags: &HashMap<String, String>, id: &str| {
            placement
                .server_for("default", id, tags, |_| true, 0, |_| false)
                .map_or("n1".to_owned(), |s| s.node_name)
        };
        // Both tags match on n2 only: n2, however loaded.
        let eu_ssd = client(&[("region", "eu"), ("disk", "ssd")]);
        assert_eq!(to(&eu_ssd, "a"), "n2");
        // region=eu matches n2 and n3: the lighter one, n3.
        let eu = client(&[("region", "eu")]);
        assert_eq!(to(&eu, "b"), "n3");
        // This node's own tag.
        assert_eq!(to(&client(&[("region", "us")]), "c"), "n1");
        // No node matches: the load decides, as without tags.
        assert_eq!(to(&client(&[("region", "ap")]), "d"), "n1");
        // A node gone takes its tags with it.
        placement.forget_clients("n3");
        assert_eq!(to(&eu, "e"), "n2");
    }

    #[test]
    fn a_node_sheds_only_what_is_above_its_rounded_up_share_and_only_to_a_lighter_node() {
        let placement = Placement::default();
        placement.set(
            &["default".into()],
            &[
                peer("n2", 9000, &["default"]),
                peer("n3", 9100, &["default"]),
                peer("n4", 9200, &["default"]),
            ],
        );
        let all = |_: &str| true;
        // n4 has not said how many it serves: nobody moves yet.
        placement.set_clients("n2", HashMap::from([("default".to_owned(), 10)]));
        placement.set_clients("n3", HashMap::from([("default".to_owned(), 10)]));
        assert_eq!(placement.surplus("default", 10, all), 0);
        // n4 joined with none: 30 over four nodes is 7.5, rounded up 8; this node sheds 2.
        placement.set_clients("n4", HashMap::new());
        assert_eq!(placement.surplus("default", 10, all), 2);
        assert!(placement.better_elsewhere("default", "c1", &none(), all, 10, |_| true));
        // Once at the share, nothing more; nor when the lightest has only one fewer.
        placement.set_clients("n4", HashMap::from([("default".to_owned(), 6)]));
        assert_eq!(placement.surplus("default", 8, all), 0);
        placement.set_clients("n2", HashMap::from([("default".to_owned(), 7)]));
        placement.set_clients("n3", HashMap::from([("default".to_owned(), 7)]));
        placement.set_clients("n4", HashMap::from([("default".to_owned(), 7)]));
        assert_eq!(placement.surplus("default", 8, all), 0);
        assert!(!placement.better_elsewhere("default", "c1", &none(), all, 8, |_| true));
        // An unreachable node does not count, and a context stored elsewhere only is not ours.
        placement.set_clients("n4", HashMap::new());
        assert_eq!(placement.surplus("default", 9, |n| n != "n4"), 1);
        assert_eq!(placement.surplus("orders", 9, all), 0);
        // Asking where a client would go does not count it against that node.
        for _ in 0..20 {
            assert!(placement.better_elsewhere("default", "c1", &none(), all, 9, |_| true));
        }
        assert_eq!(placement.surplus("default", 9, all), 3, "n4 still counted as empty");
    }

    #[test]
    fn a_client_whose_tags_match_this_node_best_is_not_moved() {
        let placement = Placement::default();
        placement.set(&["default".into()], &[peer("n2", 9000, &["default"])]);
        placement.set_local_tags(Tags::from([("region".into(), "eu".into())]));
        placement.set_clients("n2", HashMap::new());
        let eu: HashMap<String, String> = HashMap::from([("region".into(), "eu".into())]);
        assert!(!placement.better_elsewhere("default", "c1", &eu, |_| true, 10, |_| true));
        assert!(placement.better_elsewhere("default", "c2", &none(), |_| true, 10, |_| true));
    }

    #[test]
    fn a_node_reaches_a_majority_when_more_than_half_the_storing_nodes_are_linked() {
        let placement = Placement::default();
        // Alone: always.
        assert!(placement.reaches_majority("default", |_| false));
        placement.set(
            &["default".into()],
            &[
                peer("n2", 9000, &["default"]),
                peer("n3", 9100, &["default"]),
                peer("n4", 9200, &["orders"]),
            ],
        );
        assert!(placement.reaches_majority("default", |_| true));
        assert!(placement.reaches_majority("default", |n| n == "n2"), "two of three");
        assert!(!placement.reaches_majority("default", |n| n == "n4"), "one of three");
        // Two nodes: both are needed.
        placement.set(&["default".into()], &[peer("n2", 9000, &["default"])]);
        assert!(!placement.reaches_majority("default", |_| false));
        // A context this node does not store is not its to refuse.
        assert!(placement.reaches_majority("orders", |_| false));
    }
}
