//! Command handlers connected to the other nodes of the cluster (issue 12), and the handler sets
//! every node sends the others.
//!
//! The set a node sends also holds its query handlers (`query::remote` takes them) and says how
//! many client applications it serves per context (`platform::placement` sends new clients to
//! the node with the fewest).
//!
//! Every router tells every other one which command handlers are connected to it: the whole
//! set, soon after each change (a burst of subscriptions goes as one set) and every
//! [`PUBLISH_PERIOD`] in any case. A receiver replaces what it knew of the sender's handlers, so a
//! lost, late or repeated set heals with the next one; a set carries (epoch, version), and one
//! older than the last taken from that node is ignored. Each handler of another node is a
//! [`RemoteHandler`] in this node's registry, on the rings under the key its own node gives it
//! (`node/id`): every node's rings are the same, so a routing key reaches the same handler
//! wherever the command was dispatched.
//!
//! A command for a remote handler goes over the peer link (`PeerLink.Command`); its response
//! comes back as the call's answer, and the sender's dispatcher completes the command as it
//! would for a local handler. What is on its way is bounded by the link's bounds (a full link
//! refuses at once: AXONIQ-1900, as a full handler queue does). A node's handlers leave this
//! node's rings when its ping goes unanswered, when it leaves the directory, or when no set came
//! from it for [`EXPIRY`]; the commands they held fail at once with AXONIQ-4001, as when a local
//! handler disconnects, and later commands go to the handlers that remain.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use myelin_proto::axon::command::CommandResponse;
use myelin_proto::internal::{CommandHandlerEntry, HandlerSet, PeerCommand};
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::dispatch::{Dispatcher, connection_lost};
use super::handler::{next_id, ring_key};
use super::registry::{HandlerId, HandlerLink, LinkError, Routed};
use crate::peers::Peers;
use crate::query::remote::RemoteQueries;

/// How often each node sends its handler set even when nothing changed.
const PUBLISH_PERIOD: Duration = Duration::from_secs(2);
/// How long a node's handlers stay on this node's rings without a set from it: three periods
/// and a half, so that one lost or late set costs nothing.
const EXPIRY: Duration = Duration::from_millis(7_000);
/// How long a change waits for the ones right behind it (an application subscribing to its
/// commands one by one) before the set goes out.
const SETTLE: Duration = Duration::from_millis(20);
/// What one set may hold: subscriptions, and the length of each name in it.
const MAX_ENTRIES: usize = 100_000;
const MAX_NAME: usize = 4_096;
/// How long the peer link may take beyond the command's own timeout (the receiving node
/// answers a timeout itself; this only bounds a link that stopped answering).
const LINK_MARGIN: Duration = Duration::from_secs(1);
/// The longest timeout a peer's command may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A command handler connected to another node, as this node's registry sees it.
pub struct RemoteHandler {
    id: HandlerId,
    node: String,
    /// The handler's id on its own node.
    remote_id: HandlerId,
    context: String,
    ring_key: String,
    client_id: String,
    component_name: String,
    peers: Peers,
    dispatcher: Weak<Dispatcher>,
    /// Cancelled when the handler leaves this node's view: its commands were answered then.
    closed: CancellationToken,
}

impl HandlerLink for RemoteHandler {
    fn id(&self) -> HandlerId {
        self.id
    }

    fn ring_key(&self) -> &str {
        &self.ring_key
    }

    fn client_id(&self) -> String {
        self.client_id.clone()
    }

    fn component_name(&self) -> String {
        self.component_name.clone()
    }

    fn remote_node(&self) -> Option<&str> {
        Some(&self.node)
    }

    fn send(&self, routed: Routed) -> Result<(), LinkError> {
        if self.closed.is_cancelled() {
            return Err(LinkError::Closed);
        }
        let Some(dispatcher) = self.dispatcher.upgrade() else {
            return Err(LinkError::Closed);
        };
        let Routed { command, charge } = routed;
        let call = self
            .peers
            .command_call(&self.node, command.encoded_len() as u64)
            .map_err(|why| {
                tracing::debug!(node = %self.node, %why, "command refused: the link to its handler's node is full");
                LinkError::QueueFull
            })?;
        let timeout = dispatcher.timeout_of(&command);
        let request_id = command.message_identifier.clone();
        let message = PeerCommand {
            from_node: String::new(),
            context: self.context.clone(),
            handler: self.remote_id,
            command: Some(command),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let (id, client_id, node, closed) = (self.id, self.client_id.clone(), self.node.clone(), self.closed.clone());
        tokio::spawn(async move {
            // The command holds its bytes of the node's budget until it is answered.
            let _charge = charge;
            let answer = tokio::select! {
                answer = call.send(message, timeout + LINK_MARGIN) => answer,
                // Gone from the view: `handler_closed` answered the command already.
                () = closed.cancelled() => return,
            };
            let response = answer.unwrap_or_else(|status| {
                tracing::debug!(%node, request = %request_id, error = %status, "a command sent to another node got no answer");
                connection_lost(&client_id, &request_id)
            });
            dispatcher.respond(id, response);
        });
        Ok(())
    }
}

/// What this node knows of one other node's handlers.
struct NodeHandlers {
    epoch: u64,
    version: u64,
    heard: Instant,
    /// (context, id on that node) -> the handler.
    links: HashMap<(String, HandlerId), Arc<RemoteHandler>>,
    /// (context, command, id on that node, load factor).
    subscriptions: HashSet<(String, String, HandlerId, i32)>,
}

/// The handlers of the other nodes, and the commands they send to the handlers connected here.
pub struct RemoteHandlers {
    peers: Peers,
    dispatcher: Arc<Dispatcher>,
    /// This router's start (Unix ms): a restarted router's sets replace the old ones.
    epoch: u64,
    version: AtomicU64,
    nodes: Mutex<HashMap<String, NodeHandlers>>,
    /// The clients connected here, and where the others' counts go (absent in unit tests).
    platform: Option<(Arc<crate::platform::Clients>, Arc<crate::platform::Placement>)>,
    /// The query handlers: this node's go out with its set, the others' come in with theirs.
    queries: Option<Arc<RemoteQueries>>,
}

impl RemoteHandlers {
    pub fn new(peers: Peers, dispatcher: Arc<Dispatcher>) -> RemoteHandlers {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        RemoteHandlers {
            peers,
            dispatcher,
            epoch,
            version: AtomicU64::new(0),
            nodes: Mutex::new(HashMap::new()),
            platform: None,
            queries: None,
        }
    }

    /// Sends this node's query handlers with its command handlers, and hands the other nodes'
    /// query handlers to `queries`.
    pub fn with_queries(mut self, queries: Arc<RemoteQueries>) -> RemoteHandlers {
        self.queries = Some(queries);
        self
    }

    /// Sends the count of this node's clients with its handlers, and hands the other nodes'
    /// counts to `placement`.
    pub fn with_platform(
        mut self,
        clients: Arc<crate::platform::Clients>,
        placement: Arc<crate::platform::Placement>,
    ) -> RemoteHandlers {
        self.platform = Some((clients, placement));
        self
    }

    /// Sends this node's handlers to the others and drops the handlers of nodes found down,
    /// until the process ends.
    pub fn start(self: &Arc<Self>) -> [tokio::task::JoinHandle<()>; 2] {
        let publisher = tokio::spawn(self.clone().publish());
        let watcher = tokio::spawn(self.clone().watch_nodes());
        [publisher, watcher]
    }

    /// This node's handler set, numbered.
    fn local_set(&self) -> HandlerSet {
        let handlers = self
            .dispatcher
            .registry()
            .local_registrations()
            .into_iter()
            .map(|r| CommandHandlerEntry {
                context: r.context,
                command: r.command,
                handler: r.handler,
                client_id: r.client_id,
                component_name: r.component_name,
                load_factor: r.load_factor,
            })
            .collect();
        let clients = self.platform.as_ref().map_or_else(HashMap::new, |(clients, _)| {
            clients
                .count_per_context()
                .into_iter()
                .map(|(context, n)| (context, u32::try_from(n).unwrap_or(u32::MAX)))
                .collect()
        });
        let query_handlers = self.queries.as_ref().map_or_else(Vec::new, |q| q.local_entries());
        let tags = self.platform.as_ref().map_or_else(HashMap::new, |(_, placement)| {
            placement.local_tags().into_iter().collect()
        });
        HandlerSet {
            from_node: self.peers.node_name().to_owned(),
            epoch: self.epoch,
            version: self.version.fetch_add(1, Ordering::Relaxed) + 1,
            handlers,
            clients,
            query_handlers,
            tags,
        }
    }

    async fn publish(self: Arc<Self>) {
        let mut changes = self.dispatcher.registry().local_changes();
        let mut query_changes = self.queries.as_ref().map(|q| q.local_changes());
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep(SETTLE).await;
                }
                changed = async { query_changes.as_mut().expect("guarded").changed().await }, if query_changes.is_some() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep(SETTLE).await;
                }
                () = tokio::time::sleep(PUBLISH_PERIOD) => {}
            }
            changes.borrow_and_update();
            if let Some(query_changes) = &mut query_changes {
                query_changes.borrow_and_update();
            }
            let set = self.local_set();
            let sends = self.peers.names().into_iter().map(|node| {
                let set = set.clone();
                let peers = self.peers.clone();
                async move {
                    if let Err(status) = peers.send_handlers(&node, set).await {
                        tracing::debug!(%node, error = %status, "command handler set not delivered");
                    }
                }
            });
            futures::future::join_all(sends).await;
        }
    }

    async fn watch_nodes(self: Arc<Self>) {
        let mut lost = self.peers.lost_nodes();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                node = lost.recv() => match node {
                    Ok(node) => self.drop_node(&node, "it does not answer (or left the cluster)"),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    let quiet: Vec<String> = self
                        .nodes
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|(_, n)| n.heard.elapsed() > EXPIRY)
                        .map(|(node, _)| node.clone())
                        .collect();
                    for node in quiet {
                        self.drop_node(&node, "no handler set came from it");
                    }
                }
            }
        }
    }

    /// Takes `node`'s handlers off this node's rings; the commands they held fail.
    fn drop_node(&self, node: &str, why: &str) {
        if let Some((_, placement)) = &self.platform {
            placement.forget_clients(node);
        }
        if let Some(queries) = &self.queries {
            queries.drop_node(node);
        }
        let mut nodes = self.nodes.lock().unwrap();
        let Some(gone) = nodes.remove(node) else { return };
        if !gone.links.is_empty() {
            tracing::info!(%node, handlers = gone.links.len(), "the command handlers of another node are gone: {why}");
        }
        for link in gone.links.into_values() {
            link.closed.cancel();
            self.dispatcher.handler_closed(link.as_ref(), Vec::new());
        }
    }

    /// A handler set from another node: replaces what this node knew of that node's handlers.
    pub fn apply(&self, set: HandlerSet) -> Result<(), Status> {
        check(&set, self.peers.node_name())?;
        let registry = self.dispatcher.registry();
        // Held throughout, so that two sets from one node never interleave their changes.
        let mut nodes = self.nodes.lock().unwrap();
        let known = nodes.entry(set.from_node.clone()).or_insert_with(|| NodeHandlers {
            epoch: 0,
            version: 0,
            heard: Instant::now(),
            links: HashMap::new(),
            subscriptions: HashSet::new(),
        });
        if (set.epoch, set.version) <= (known.epoch, known.version) {
            // (An older set's client counts are older too.)
            if set.epoch == known.epoch {
                known.heard = Instant::now();
            }
            return Ok(());
        }
        let restarted = set.epoch != known.epoch;
        let mut old_links = if !restarted {
            std::mem::take(&mut known.links)
        } else {
            // The router there restarted: its handler ids name other handlers now.
            for link in std::mem::take(&mut known.links).into_values() {
                link.closed.cancel();
                self.dispatcher.handler_closed(link.as_ref(), Vec::new());
            }
            known.subscriptions.clear();
            HashMap::new()
        };
        let mut links = HashMap::new();
        let mut subscriptions = HashSet::new();
        for entry in set.handlers {
            let key = (entry.context.clone(), entry.handler);
            if !links.contains_key(&key) {
                let link = old_links.remove(&key).unwrap_or_else(|| {
                    Arc::new(RemoteHandler {
                        id: next_id(),
                        node: set.from_node.clone(),
                        remote_id: entry.handler,
                        context: entry.context.clone(),
                        ring_key: ring_key(&set.from_node, entry.handler),
                        client_id: entry.client_id.clone(),
                        component_name: entry.component_name.clone(),
                        peers: self.peers.clone(),
                        dispatcher: Arc::downgrade(&self.dispatcher),
                        closed: CancellationToken::new(),
                    })
                });
                links.insert(key.clone(), link);
            }
            subscriptions.insert((entry.context, entry.command, entry.handler, entry.load_factor));
        }
        for (context, command, handler, _) in known.subscriptions.difference(&subscriptions) {
            if let Some(link) = links.get(&(context.clone(), *handler)) {
                registry.unsubscribe(context, command, link.id());
            }
        }
        for link in old_links.into_values() {
            link.closed.cancel();
            self.dispatcher.handler_closed(link.as_ref(), Vec::new());
        }
        for (context, command, handler, load_factor) in subscriptions.difference(&known.subscriptions) {
            let link: Arc<dyn HandlerLink> = links[&(context.clone(), *handler)].clone();
            registry.subscribe(context, command, link, *load_factor);
        }
        if let Some((_, placement)) = &self.platform {
            placement.set_clients(&set.from_node, set.clients);
            placement.set_tags(&set.from_node, set.tags.into_iter().collect());
        }
        if let Some(queries) = &self.queries {
            queries.apply(&set.from_node, restarted, set.query_handlers);
        }
        known.epoch = set.epoch;
        known.version = set.version;
        known.heard = Instant::now();
        known.links = links;
        known.subscriptions = subscriptions;
        Ok(())
    }

    /// A command another node routed to a handler connected here.
    pub async fn receive(&self, message: PeerCommand) -> Result<CommandResponse, Status> {
        let command = message
            .command
            .ok_or_else(|| Status::invalid_argument("a peer command without its command"))?;
        if message.context.len() > MAX_NAME {
            return Err(Status::invalid_argument("a peer command's context name is too long"));
        }
        let timeout = Duration::from_millis(message.timeout_ms).clamp(Duration::from_millis(1), MAX_TIMEOUT);
        Ok(self
            .dispatcher
            .dispatch_to(&message.context, message.handler, command, timeout)
            .await)
    }
}

/// A set this node can take: from another node, within the bounds.
fn check(set: &HandlerSet, me: &str) -> Result<(), Status> {
    if set.from_node.is_empty() || set.from_node == me {
        return Err(Status::invalid_argument(format!(
            "a command handler set from {:?}, which is not another node",
            set.from_node
        )));
    }
    RemoteQueries::check(&set.query_handlers, MAX_ENTRIES)?;
    if set.handlers.len() > MAX_ENTRIES {
        return Err(Status::invalid_argument(format!(
            "a command handler set of {} subscriptions (at most {MAX_ENTRIES})",
            set.handlers.len()
        )));
    }
    let too_long = set.handlers.iter().any(|h| {
        [&h.context, &h.command, &h.client_id, &h.component_name]
            .iter()
            .any(|t| t.len() > MAX_NAME)
    });
    let too_long = too_long || set.clients.len() > MAX_ENTRIES || set.clients.keys().any(|c| c.len() > MAX_NAME);
    let too_long = too_long
        || set.tags.len() > crate::platform::placement::MAX_TAGS
        || set.tags.iter().any(|(k, v)| k.len() > MAX_NAME || v.len() > MAX_NAME);
    if too_long || set.from_node.len() > MAX_NAME {
        return Err(Status::invalid_argument(format!(
            "a command handler set with a name longer than {MAX_NAME} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use myelin_proto::axon::command::Command;

    fn remote() -> RemoteHandlers {
        let peers = Peers::new("n1".into(), None, crate::peers::LinkBounds::default());
        RemoteHandlers::new(peers, Arc::new(Dispatcher::new(Duration::from_secs(1), usize::MAX)))
    }

    fn entry(context: &str, command: &str, handler: u64, load_factor: i32) -> CommandHandlerEntry {
        CommandHandlerEntry {
            context: context.into(),
            command: command.into(),
            handler,
            client_id: format!("client-{handler}"),
            component_name: "app".into(),
            load_factor,
        }
    }

    fn set(node: &str, epoch: u64, version: u64, handlers: Vec<CommandHandlerEntry>) -> HandlerSet {
        HandlerSet {
            from_node: node.into(),
            epoch,
            version,
            handlers,
            clients: HashMap::new(),
            query_handlers: Vec::new(),
            tags: HashMap::new(),
        }
    }

    fn picked(remote: &RemoteHandlers, context: &str, name: &str, key: &str) -> Option<String> {
        remote
            .dispatcher
            .registry()
            .select(context, name, key)
            .map(|l| l.ring_key().to_owned())
    }

    #[tokio::test]
    async fn a_set_replaces_the_last_and_older_ones_are_ignored() {
        let remote = remote();
        remote
            .apply(set(
                "n2",
                5,
                1,
                vec![entry("default", "A", 7, 100), entry("default", "B", 7, 100)],
            ))
            .unwrap();
        assert_eq!(picked(&remote, "default", "A", "k").as_deref(), Some("n2/7"));
        assert_eq!(picked(&remote, "default", "B", "k").as_deref(), Some("n2/7"));
        // The handler dropped B.
        remote
            .apply(set("n2", 5, 2, vec![entry("default", "A", 7, 100)]))
            .unwrap();
        assert_eq!(picked(&remote, "default", "B", "k"), None);
        // A late set changes nothing.
        remote
            .apply(set("n2", 5, 1, vec![entry("default", "B", 7, 100)]))
            .unwrap();
        assert_eq!(picked(&remote, "default", "B", "k"), None);
        assert_eq!(picked(&remote, "default", "A", "k").as_deref(), Some("n2/7"));
        // Remote handlers are not this node's to publish.
        assert!(remote.dispatcher.registry().local_registrations().is_empty());
    }

    #[tokio::test]
    async fn a_restarted_node_and_a_lost_node_leave_no_handler_behind() {
        let remote = remote();
        remote
            .apply(set("n2", 5, 9, vec![entry("default", "A", 7, 100)]))
            .unwrap();
        // Restarted: a new epoch, version 1, and handler id 7 is another handler now.
        remote
            .apply(set("n2", 6, 1, vec![entry("default", "A", 3, 100)]))
            .unwrap();
        assert_eq!(picked(&remote, "default", "A", "k").as_deref(), Some("n2/3"));
        assert_eq!(remote.dispatcher.registry().handler_count("default", "A"), 1);
        remote.drop_node("n2", "test");
        assert_eq!(picked(&remote, "default", "A", "k"), None);
    }

    #[tokio::test]
    async fn the_same_handlers_give_the_same_ring_on_every_node() {
        // n1 sees n2's and n3's handlers; so does any other node: the keys pick the same ones.
        let a = remote();
        let b = RemoteHandlers::new(
            Peers::new("n4".into(), None, crate::peers::LinkBounds::default()),
            Arc::new(Dispatcher::new(Duration::from_secs(1), usize::MAX)),
        );
        for r in [&a, &b] {
            r.apply(set("n2", 1, 1, vec![entry("default", "A", 7, 100)])).unwrap();
            r.apply(set("n3", 1, 1, vec![entry("default", "A", 7, 50)])).unwrap();
        }
        for k in 0..200 {
            let key = format!("key-{k}");
            assert_eq!(picked(&a, "default", "A", &key), picked(&b, "default", "A", &key));
        }
    }

    #[tokio::test]
    async fn bad_sets_are_refused_and_change_nothing() {
        let remote = remote();
        assert!(
            remote
                .apply(set("n1", 1, 1, vec![entry("default", "A", 7, 100)]))
                .is_err()
        );
        assert!(
            remote
                .apply(set("", 1, 1, vec![entry("default", "A", 7, 100)]))
                .is_err()
        );
        let long = "x".repeat(MAX_NAME + 1);
        assert!(
            remote
                .apply(set("n2", 1, 1, vec![entry("default", &long, 7, 100)]))
                .is_err()
        );
        assert_eq!(picked(&remote, "default", "A", "k"), None);
        let command = Command {
            message_identifier: "c1".into(),
            name: "A".into(),
            ..Default::default()
        };
        let none = PeerCommand {
            from_node: "n2".into(),
            context: "default".into(),
            handler: 1,
            command: None,
            timeout_ms: 10,
        };
        assert!(remote.receive(none).await.is_err());
        // A command for a handler that is not here: the in-band "no handler" error.
        let answer = remote
            .receive(PeerCommand {
                from_node: "n2".into(),
                context: "default".into(),
                handler: 1,
                command: Some(command),
                timeout_ms: 10,
            })
            .await
            .unwrap();
        assert_eq!(answer.error_code, "AXONIQ-4000");
    }
}
