//! Links to the other nodes of the cluster: the only place that opens a connection to another
//! node. Raft and (later) forwarding and routing only say "send this to node N for group G".
//!
//! What holds (the rule of docs/decisions/0008-client-isolation.md, between nodes):
//! - One HTTP/2 connection per peer carries every group's messages, each message its own stream.
//!   The connection's flow-control window is HTTP/2's maximum, so only a stream's own window can
//!   stop it: a group whose member on the peer reads slowly never stalls another group.
//! - What is on its way to a peer is bounded, in bytes per peer and in messages per group and
//!   peer (Raft's own messages, and separately the requests members make of their leader for
//!   clients; heartbeats only in bytes, see [`LinkBounds`]). A message beyond a bound is refused
//!   at once as not delivered (openraft retries it after its backoff), never queued: a stalled
//!   peer costs a bounded amount of memory, and a stalled group never takes another's place.
//! - The directory of peers (node name -> internal address) is data given by admin, from the
//!   cluster configuration; a link is opened lazily and re-established by the HTTP/2 client when
//!   its connection drops.
//! - Admin's calls to other nodes' admins (`AdminCall`: a change forwarded to the `_admin`
//!   leader, a node asking to join) take the same links, under the same bounds (as group
//!   [`ADMIN_CALLS`]); a call to a node not yet in the directory (the cluster a joining node was
//!   pointed at) opens a link of its own for that one call.
//! - When access control is on, every call carries the cluster's internal token, and an incoming
//!   call without the right one is refused (and logged, at most once a second).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use myelin_proto::axon::command::CommandResponse;
use myelin_proto::internal::admin_call::Target;
use myelin_proto::internal::admin_inbox_client::AdminInboxClient;
use myelin_proto::internal::admin_relay_server::AdminRelay;
use myelin_proto::internal::peer_directory_server::PeerDirectory;
use myelin_proto::internal::peer_link_client::PeerLinkClient;
use myelin_proto::internal::peer_link_server::PeerLink;
use myelin_proto::internal::raft_inbox_client::RaftInboxClient;
use myelin_proto::internal::raft_relay_server::RaftRelay;
use myelin_proto::internal::router_control_server::RouterControl;
use myelin_proto::internal::{
    AdminAnswer, AdminCall, HandlerSet, HandlerSetAck, ListClientsRequest, ListClientsResponse, ListPeersRequest,
    ListPeersResponse, ListProcessorsRequest, ListProcessorsResponse, PeerCommand, PeerQueryIn, PeerQueryOut,
    PeerStatus, PingAnswer, PingRequest, RaftAnswer, RaftMessage, RaftRpc, SendInstructionRequest,
    SendInstructionResponse, SetPeersRequest, SetPeersResponse,
};
use myelin_raft_relay::{lost, not_delivered};
use prost::Message as _;
use std::sync::{Mutex, RwLock};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Metadata key of the internal token on node-to-node calls.
pub const INTERNAL_TOKEN_KEY: &str = "myelin-internal-token";

/// The `_admin` group lives in admin; every other group is a context in the eventstore.
pub const ADMIN_GROUP: &str = "_admin";
/// The name admin calls are counted under in a link's per-group bound.
pub const ADMIN_CALLS: &str = "_admin-calls";
/// How often each link is pinged, and how long a ping may take.
const PING_PERIOD: Duration = Duration::from_secs(2);
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an admin call may take (a join waits for a committed `_admin` entry).
const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The name commands routed to handlers on a peer are counted under in a link's bounds.
pub const COMMANDS: &str = "_commands";
/// The name conversations with query handlers on a peer are counted under in a link's bounds.
pub const QUERIES: &str = "_queries";
/// How long a peer may take to take a handler set.
const HANDLER_SET_TIMEOUT: Duration = Duration::from_secs(2);

/// Bounds on what may be on its way to one peer.
#[derive(Debug, Clone, Copy)]
pub struct LinkBounds {
    /// Bytes of messages on their way to one peer.
    pub bytes_per_peer: u64,
    /// Raft messages of one group that carry entries or snapshot chunks, or ask for votes, on
    /// their way to one peer. openraft has at most one AppendEntries and a few votes or snapshot
    /// chunks out per member, so this bound only bites on a fault. Heartbeats (AppendEntries
    /// without entries) are not counted here, only in the bytes: openraft sends one to every
    /// voter for each linearizable read on the leader, and a heartbeat refused for a count would
    /// look like a lost leader to the follower (the bench saw elections under 64 readers).
    pub messages_per_group: u32,
    /// Requests of one group's members to its leader on behalf of clients (forwarded appends,
    /// read indexes) on their way to one peer: as many as clients make, up to this.
    pub requests_per_group: u32,
}

impl Default for LinkBounds {
    fn default() -> Self {
        LinkBounds {
            bytes_per_peer: 256 << 20,
            messages_per_group: 16,
            requests_per_group: 4096,
        }
    }
}

/// What a message is counted against on its link besides the bytes: (counter, bound), or none.
fn lane(message: &RaftMessage, bounds: &LinkBounds) -> Option<(String, u32)> {
    match RaftRpc::try_from(message.rpc).unwrap_or(RaftRpc::Unspecified) {
        RaftRpc::AppendEntries if message.entries.is_empty() => None,
        RaftRpc::ForwardAppend | RaftRpc::ReadIndex => {
            Some((format!("{} (requests)", message.group), bounds.requests_per_group))
        }
        _ => Some((message.group.clone(), bounds.messages_per_group)),
    }
}

/// HTTP/2 windows of the peer links: the connection's is the maximum (see the module docs); a
/// stream's is large enough that one AppendEntries batch crosses a fast link in one round trip.
const PEER_STREAM_WINDOW: u32 = 4 << 20;
const PEER_CONNECTION_WINDOW: u32 = (1 << 31) - 1;

struct Link {
    address: String,
    client: PeerLinkClient<Channel>,
    bytes_in_flight: AtomicU64,
    per_group: Mutex<HashMap<String, u32>>,
    /// Whether the last call on the link got through.
    connected: AtomicBool,
    /// Whether the last ping was answered (only pings change it: the peer's liveness).
    ping_up: AtomicBool,
}

/// The links of this node to every other node.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<PeersInner>,
}

struct PeersInner {
    node_name: String,
    token: Option<String>,
    bounds: LinkBounds,
    links: RwLock<BTreeMap<String, Arc<Link>>>,
    /// The nodes found down (a ping not answered after one that was) or no longer peers.
    lost: tokio::sync::broadcast::Sender<String>,
}

/// Gives back a message's share of its link's bounds when the message is answered or dropped.
struct Charge {
    link: Arc<Link>,
    /// The per-group counter the message was counted against, if any.
    counter: Option<String>,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.link.bytes_in_flight.fetch_sub(self.bytes, Ordering::Relaxed);
        let Some(counter) = &self.counter else { return };
        let mut groups = self.link.per_group.lock().expect("peer link groups");
        if let Some(count) = groups.get_mut(counter) {
            *count -= 1;
            if *count == 0 {
                groups.remove(counter);
            }
        }
    }
}

impl Peers {
    pub fn new(node_name: String, token: Option<String>, bounds: LinkBounds) -> Peers {
        Peers {
            inner: Arc::new(PeersInner {
                node_name,
                token,
                bounds,
                links: RwLock::new(BTreeMap::new()),
                lost: tokio::sync::broadcast::Sender::new(64),
            }),
        }
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.inner.node_name
    }

    /// The names of the other nodes.
    pub fn names(&self) -> Vec<String> {
        self.inner.links.read().expect("peer links").keys().cloned().collect()
    }

    /// Names each node found down (its ping not answered where the one before was) or removed
    /// from the directory, as it happens. A receiver that falls behind misses names: it must
    /// also expire what it holds of a node that went quiet.
    pub fn lost_nodes(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.inner.lost.subscribe()
    }

    /// Replaces the directory. Links whose address is unchanged are kept as they are.
    pub fn set(&self, peers: Vec<(String, String)>) -> Result<(), Status> {
        let mut next = BTreeMap::new();
        let current = self.inner.links.read().expect("peer links").clone();
        for (node, address) in peers {
            if node == self.inner.node_name {
                continue;
            }
            let link = match current.get(&node) {
                Some(link) if link.address == address => link.clone(),
                _ => Arc::new(open_link(&address)?),
            };
            next.insert(node, link);
        }
        let removed: Vec<String> = current.keys().filter(|n| !next.contains_key(*n)).cloned().collect();
        let added: Vec<(String, Arc<Link>)> = next
            .iter()
            .filter(|(node, link)| current.get(*node).is_none_or(|old| !Arc::ptr_eq(old, link)))
            .map(|(node, link)| (node.clone(), link.clone()))
            .collect();
        *self.inner.links.write().expect("peer links") = next;
        // A new link is pinged at once, not at the next period: placement, balancing and the
        // majority check read whether it is up.
        if !added.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            let peers = self.clone();
            tokio::spawn(async move {
                futures::future::join_all(added.into_iter().map(|(node, link)| peers.ping(node, link))).await;
            });
        }
        for node in removed {
            let _ = self.inner.lost.send(node);
        }
        Ok(())
    }

    pub fn status(&self) -> Vec<PeerStatus> {
        self.inner
            .links
            .read()
            .expect("peer links")
            .iter()
            .map(|(node, link)| PeerStatus {
                node: node.clone(),
                internal_address: link.address.clone(),
                connected: link.connected.load(Ordering::Relaxed),
                bytes_in_flight: link.bytes_in_flight.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Whether the link to `node` is up (its last ping was answered).
    pub fn is_connected(&self, node: &str) -> bool {
        self.link(node)
            .is_some_and(|link| link.connected.load(Ordering::Relaxed))
    }

    fn link(&self, node: &str) -> Option<Arc<Link>> {
        self.inner.links.read().expect("peer links").get(node).cloned()
    }

    /// Sends a message to the node it names and returns that node's answer; what cannot be
    /// sent now is answered as not delivered at once.
    pub async fn send(&self, mut message: RaftMessage) -> RaftAnswer {
        let Some(link) = self.link(&message.to_node) else {
            return not_delivered(format!(
                "node {:?} is not a known peer of {}",
                message.to_node, self.inner.node_name
            ));
        };
        let bytes = message.encoded_len() as u64;
        let lane = lane(&message, &self.inner.bounds);
        let _charge = match self.charge(&link, lane, &message.to_node, bytes) {
            Ok(charge) => charge,
            Err(answer) => return answer,
        };
        message.from_node.clone_from(&self.inner.node_name);
        let mut request = Request::new(message);
        authorize(self.inner.token.as_deref(), &mut request);
        match link.client.clone().raft(request).await {
            Ok(answer) => {
                link.connected.store(true, Ordering::Relaxed);
                answer.into_inner()
            }
            Err(status) => {
                let why = format!("link to {}: {}", link.address, status.message());
                if status.code() == tonic::Code::Unavailable {
                    link.connected.store(false, Ordering::Relaxed);
                }
                // A connection that could not be made carried nothing: the message was not
                // delivered. Any other failure may have come after the peer acted on it.
                if never_connected(&status) {
                    not_delivered(why)
                } else {
                    lost(why)
                }
            }
        }
    }

    /// Pings every peer once (a link's `connected` flag follows the answer).
    pub async fn ping_all(&self) {
        let links: Vec<(String, Arc<Link>)> = self
            .inner
            .links
            .read()
            .expect("peer links")
            .iter()
            .map(|(node, link)| (node.clone(), link.clone()))
            .collect();
        let pings = links.into_iter().map(|(node, link)| self.ping(node, link));
        futures::future::join_all(pings).await;
    }

    /// Pings one peer; the link's `connected` flag follows the answer.
    async fn ping(&self, node: String, link: Arc<Link>) {
        let mut request = Request::new(PingRequest {});
        request.set_timeout(PING_TIMEOUT);
        authorize(self.inner.token.as_deref(), &mut request);
        let up = tokio::time::timeout(PING_TIMEOUT, link.client.clone().ping(request))
            .await
            .is_ok_and(|answer| answer.is_ok());
        link.connected.store(up, Ordering::Relaxed);
        if link.ping_up.swap(up, Ordering::Relaxed) && !up {
            tracing::warn!(node = %node, address = %link.address, "peer does not answer its ping: taken as down");
            let _ = self.inner.lost.send(node);
        }
    }

    /// Pings the peers every [`PING_PERIOD`] until the process ends.
    pub fn keep_pinging(&self) -> tokio::task::JoinHandle<()> {
        let peers = self.clone();
        tokio::spawn(async move {
            loop {
                peers.ping_all().await;
                tokio::time::sleep(PING_PERIOD).await;
            }
        })
    }

    /// Sends an admin call to the node it names (or to the address it names) and returns that
    /// admin's answer; the remote's error status comes back as it was given.
    pub async fn call_admin(&self, mut call: AdminCall) -> Result<AdminAnswer, Status> {
        let link = match &call.target {
            Some(Target::Node(node)) => self.link(node).ok_or_else(|| {
                Status::unavailable(format!("node {node:?} is not a known peer of {}", self.inner.node_name))
            })?,
            Some(Target::Address(address)) => Arc::new(open_link(address)?),
            None => return Err(Status::invalid_argument("an admin call names no node")),
        };
        let bytes = call.encoded_len() as u64;
        let _charge = self
            .charge(
                &link,
                Some((ADMIN_CALLS.to_owned(), self.inner.bounds.messages_per_group)),
                &link.address,
                bytes,
            )
            .map_err(|answer| Status::resource_exhausted(format!("{:?}", answer.outcome)))?;
        call.from_node.clone_from(&self.inner.node_name);
        let mut request = Request::new(call);
        request.set_timeout(ADMIN_CALL_TIMEOUT);
        authorize(self.inner.token.as_deref(), &mut request);
        match link.client.clone().admin(request).await {
            Ok(answer) => Ok(answer.into_inner()),
            Err(status) if never_connected(&status) => Err(Status::unavailable(format!(
                "cannot reach {}: {}",
                link.address,
                status.message()
            ))),
            Err(status) => Err(myelin_proto::errors::relay(status)),
        }
    }

    /// Takes room on the link to `node` for a command of `bytes` (counted as [`COMMANDS`]), at
    /// once or not at all: a full link refuses, it never queues.
    pub fn command_call(&self, node: &str, bytes: u64) -> Result<CommandCall, String> {
        let link = self
            .link(node)
            .ok_or_else(|| format!("node {node:?} is not a known peer of {}", self.inner.node_name))?;
        let lane = Some((COMMANDS.to_owned(), self.inner.bounds.requests_per_group));
        let charge = self
            .charge(&link, lane, node, bytes)
            .map_err(|answer| format!("{:?}", answer.outcome))?;
        Ok(CommandCall {
            link,
            _charge: charge,
            from_node: self.inner.node_name.clone(),
            token: self.inner.token.clone(),
        })
    }

    /// Takes room on the link to `node` for a conversation with a query handler there (counted
    /// as [`QUERIES`], its first message's `bytes`), at once or not at all; the room is held
    /// until the conversation ends.
    pub fn query_relay(&self, node: &str, bytes: u64) -> Result<RelayCall, String> {
        let link = self
            .link(node)
            .ok_or_else(|| format!("node {node:?} is not a known peer of {}", self.inner.node_name))?;
        let lane = Some((QUERIES.to_owned(), self.inner.bounds.requests_per_group));
        let charge = self
            .charge(&link, lane, node, bytes)
            .map_err(|answer| format!("{:?}", answer.outcome))?;
        Ok(RelayCall {
            link,
            charge,
            from_node: self.inner.node_name.clone(),
            token: self.inner.token.clone(),
        })
    }

    /// Asks every other node the same question at once (what admin shows of the cluster), each
    /// call bounded by `timeout`: the answers by node, and the nodes that gave none (link down,
    /// error, or too slow), so a dead node delays the answer by `timeout` at most.
    pub async fn ask_all<Q, A, F, Fut>(&self, question: Q, timeout: Duration, ask: F) -> (Vec<(String, A)>, Vec<String>)
    where
        Q: Clone,
        F: Fn(PeerLinkClient<Channel>, Request<Q>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<A>, Status>>,
    {
        let links: Vec<(String, Arc<Link>)> = self
            .inner
            .links
            .read()
            .expect("peer links")
            .iter()
            .map(|(node, link)| (node.clone(), link.clone()))
            .collect();
        // Every link is asked, up or not: a link only known to be up after its next ping (a
        // node just added) answers, and one that is down fails fast or within `timeout`.
        let calls = links.into_iter().map(|(node, link)| {
            let mut request = Request::new(question.clone());
            request.set_timeout(timeout);
            authorize(self.inner.token.as_deref(), &mut request);
            let call = ask(link.client.clone(), request);
            async move {
                match tokio::time::timeout(timeout, call).await {
                    Ok(Ok(answer)) => (node, Some(answer.into_inner())),
                    Ok(Err(status)) => {
                        tracing::warn!(%node, %status, "a peer did not answer");
                        (node, None)
                    }
                    Err(_) => {
                        tracing::warn!(%node, "a peer did not answer in time");
                        (node, None)
                    }
                }
            }
        });
        let mut answered = Vec::new();
        let mut silent = Vec::new();
        for (node, answer) in futures::future::join_all(calls).await {
            match answer {
                Some(answer) => answered.push((node, answer)),
                None => silent.push(node),
            }
        }
        (answered, silent)
    }

    /// Sends this node's command and query handlers to `node`.
    pub async fn send_handlers(&self, node: &str, set: HandlerSet) -> Result<(), Status> {
        let link = self
            .link(node)
            .ok_or_else(|| Status::unavailable(format!("node {node:?} is not a known peer")))?;
        let bytes = set.encoded_len() as u64;
        let _charge = self
            .charge(&link, None, node, bytes)
            .map_err(|answer| Status::resource_exhausted(format!("{:?}", answer.outcome)))?;
        let mut request = Request::new(set);
        request.set_timeout(HANDLER_SET_TIMEOUT);
        authorize(self.inner.token.as_deref(), &mut request);
        link.client.clone().handlers(request).await.map(|_| ())
    }

    fn charge(
        &self,
        link: &Arc<Link>,
        lane: Option<(String, u32)>,
        to_node: &str,
        bytes: u64,
    ) -> Result<Charge, RaftAnswer> {
        let bounds = self.inner.bounds;
        if let Some((counter, bound)) = &lane {
            let mut groups = link.per_group.lock().expect("peer link groups");
            let count = groups.entry(counter.clone()).or_insert(0);
            if *count >= *bound {
                return Err(not_delivered(format!(
                    "{count} messages of {counter} already on their way to {to_node}"
                )));
            }
            *count += 1;
        }
        let before = link.bytes_in_flight.fetch_add(bytes, Ordering::Relaxed);
        // From here on, dropping the charge gives back both the message and its bytes.
        let charge = Charge {
            link: link.clone(),
            counter: lane.map(|(counter, _)| counter),
            bytes,
        };
        if before + bytes > bounds.bytes_per_peer && before > 0 {
            return Err(not_delivered(format!(
                "the link to {to_node} holds {before} bytes already (at most {} on their way to one peer)",
                bounds.bytes_per_peer
            )));
        }
        Ok(charge)
    }
}

/// Adds the cluster's internal token, if there is one, to a call to another node.
fn authorize<T>(token: Option<&str>, request: &mut Request<T>) {
    if let Some(token) = token
        && let Ok(value) = token.parse()
    {
        request.metadata_mut().insert(INTERNAL_TOKEN_KEY, value);
    }
}

/// Whether a failed call never had a connection to go out on: tonic reports a failed connect as
/// UNAVAILABLE carrying the connector's error, which we recognise by its text.
fn never_connected(status: &Status) -> bool {
    use std::error::Error as _;
    const CONNECT_FAILED: [&str; 3] = ["tcp connect error", "error trying to connect", "Connection refused"];
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut texts = vec![status.message().to_owned()];
    let mut source = status.source();
    while let Some(error) = source {
        texts.push(error.to_string());
        source = error.source();
    }
    texts.iter().any(|t| CONNECT_FAILED.iter().any(|c| t.contains(c)))
}

/// Room taken on a link for one command (see [`Peers::command_call`]); sending it gives the
/// room back once answered.
pub struct CommandCall {
    link: Arc<Link>,
    _charge: Charge,
    from_node: String,
    token: Option<String>,
}

impl CommandCall {
    /// Sends the command and returns the peer's answer; `Err` when none came within
    /// `timeout` or the link failed.
    pub async fn send(self, mut command: PeerCommand, timeout: Duration) -> Result<CommandResponse, Status> {
        command.from_node.clone_from(&self.from_node);
        let mut request = Request::new(command);
        request.set_timeout(timeout);
        authorize(self.token.as_deref(), &mut request);
        self.link.client.clone().command(request).await.map(|r| r.into_inner())
    }
}

/// Room taken on a link for one conversation with a query handler on the peer (see
/// [`Peers::query_relay`]).
pub struct RelayCall {
    link: Arc<Link>,
    charge: Charge,
    from_node: String,
    token: Option<String>,
}

impl RelayCall {
    /// Opens the conversation with `first`, then what `rest` yields; returns the peer's answers,
    /// which hold the room on the link until they are dropped.
    pub async fn open(
        self,
        mut first: PeerQueryIn,
        rest: impl futures::Stream<Item = PeerQueryIn> + Send + 'static,
    ) -> Result<RelayAnswers, Status> {
        use futures::StreamExt as _;
        first.from_node.clone_from(&self.from_node);
        let mut request = Request::new(futures::stream::once(std::future::ready(first)).chain(rest));
        authorize(self.token.as_deref(), &mut request);
        let answers = self.link.client.clone().query_relay(request).await?.into_inner();
        Ok(RelayAnswers {
            answers,
            _charge: self.charge,
        })
    }
}

/// The answers of a conversation with a query handler on a peer.
pub struct RelayAnswers {
    answers: tonic::Streaming<PeerQueryOut>,
    _charge: Charge,
}

impl RelayAnswers {
    pub async fn message(&mut self) -> Result<Option<PeerQueryOut>, Status> {
        self.answers.message().await
    }
}

fn open_link(address: &str) -> Result<Link, Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| Status::invalid_argument(format!("peer address {address:?}: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(PEER_STREAM_WINDOW))
        .initial_connection_window_size(Some(PEER_CONNECTION_WINDOW));
    let client = PeerLinkClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    Ok(Link {
        address: address.to_owned(),
        client,
        bytes_in_flight: AtomicU64::new(0),
        per_group: Mutex::new(HashMap::new()),
        connected: AtomicBool::new(false),
        ping_up: AtomicBool::new(false),
    })
}

/// `RaftRelay` on the router's socket: the local eventstore's and admin's way out.
pub struct Relay {
    pub peers: Peers,
}

#[tonic::async_trait]
impl RaftRelay for Relay {
    #[tracing::instrument(level = "trace", skip_all, fields(group = %request.get_ref().group, to = %request.get_ref().to_node))]
    async fn send(&self, request: Request<RaftMessage>) -> Result<Response<RaftAnswer>, Status> {
        Ok(Response::new(self.peers.send(request.into_inner()).await))
    }
}

/// `AdminRelay` on the router's socket: the local admin's calls to other nodes' admins.
pub struct AdminCalls {
    pub peers: Peers,
}

#[tonic::async_trait]
impl AdminRelay for AdminCalls {
    #[tracing::instrument(level = "debug", skip_all, fields(kind = request.get_ref().kind))]
    async fn call(&self, request: Request<AdminCall>) -> Result<Response<AdminAnswer>, Status> {
        self.peers.call_admin(request.into_inner()).await.map(Response::new)
    }
}

/// `PeerDirectory` on the router's socket: admin tells where the other nodes are.
pub struct Directory {
    pub peers: Peers,
    /// Where contexts are stored, for `GetPlatformServer`.
    pub placement: Arc<crate::platform::Placement>,
}

#[tonic::async_trait]
impl PeerDirectory for Directory {
    async fn set_peers(&self, request: Request<SetPeersRequest>) -> Result<Response<SetPeersResponse>, Status> {
        let request = request.into_inner();
        let peers = request
            .peers
            .iter()
            .map(|p| (p.node.clone(), p.internal_address.clone()))
            .collect();
        self.peers.set(peers)?;
        self.placement.set(&request.local_contexts, &request.peers);
        Ok(Response::new(SetPeersResponse {}))
    }

    async fn list_peers(&self, _: Request<ListPeersRequest>) -> Result<Response<ListPeersResponse>, Status> {
        Ok(Response::new(ListPeersResponse {
            peers: self.peers.status(),
        }))
    }
}

/// `PeerLink` on the internal port: messages from other nodes, handed to the local process that
/// hosts their group.
pub struct Inbound {
    pub node_name: String,
    pub token: Option<String>,
    pub eventstore: RaftInboxClient<Channel>,
    pub admin: Option<RaftInboxClient<Channel>>,
    pub admin_calls: Option<AdminInboxClient<Channel>>,
    /// Command handlers of the other nodes, and commands for the handlers connected here.
    pub commands: Arc<crate::command::remote::RemoteHandlers>,
    /// Conversations of the other nodes with the query handlers connected here.
    pub queries: Arc<crate::query::remote::RemoteQueries>,
    /// What admin asks of this node's clients, for an admin on another node.
    pub control: Arc<crate::control::Control>,
    /// Unix second of the last refusal logged.
    pub last_refusal_logged: AtomicU64,
}

impl Inbound {
    fn check_token<T>(&self, request: &Request<T>, from: &str) -> Result<(), Status> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        let given = request.metadata().get(INTERNAL_TOKEN_KEY).and_then(|v| v.to_str().ok());
        if given.is_some_and(|given| constant_time_eq(given.as_bytes(), expected.as_bytes())) {
            return Ok(());
        }
        let remote = request.remote_addr();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.last_refusal_logged.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(from_node = %from, ?remote, "refused a node-to-node call: wrong or missing internal token");
        }
        Err(Status::permission_denied(
            "[AXONIQ-1000] this node-to-node call carries no valid internal token (accesscontrol.internal-token)",
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tonic::async_trait]
impl PeerLink for Inbound {
    #[tracing::instrument(level = "trace", skip_all, fields(group = %request.get_ref().group, from = %request.get_ref().from_node))]
    async fn raft(&self, request: Request<RaftMessage>) -> Result<Response<RaftAnswer>, Status> {
        self.check_token(&request, &request.get_ref().from_node)?;
        let message = request.into_inner();
        if message.to_node != self.node_name {
            return Ok(Response::new(not_delivered(format!(
                "this is node {}, not {}",
                self.node_name, message.to_node
            ))));
        }
        let inbox = if message.group == ADMIN_GROUP {
            match &self.admin {
                Some(admin) => admin.clone(),
                None => return Ok(Response::new(not_delivered("no admin on this node"))),
            }
        } else {
            self.eventstore.clone()
        };
        let answer = match inbox.clone().deliver(message).await {
            Ok(answer) => answer.into_inner(),
            Err(status) => lost(format!("{}: {}", self.node_name, status.message())),
        };
        Ok(Response::new(answer))
    }

    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingAnswer>, Status> {
        self.check_token(&request, "")?;
        Ok(Response::new(PingAnswer {
            node: self.node_name.clone(),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(kind = request.get_ref().kind, from = %request.get_ref().from_node))]
    async fn admin(&self, request: Request<AdminCall>) -> Result<Response<AdminAnswer>, Status> {
        self.check_token(&request, &request.get_ref().from_node)?;
        let Some(admin) = &self.admin_calls else {
            return Err(Status::unavailable(format!("no admin runs on {}", self.node_name)));
        };
        let mut call = request.into_inner();
        // The address the caller dialled is this node, whatever it was called.
        call.target = Some(Target::Node(self.node_name.clone()));
        admin.clone().call(call).await.map_err(myelin_proto::errors::relay)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(from = %request.get_ref().from_node))]
    async fn handlers(&self, request: Request<HandlerSet>) -> Result<Response<HandlerSetAck>, Status> {
        self.check_token(&request, &request.get_ref().from_node)?;
        self.commands.apply(request.into_inner())?;
        Ok(Response::new(HandlerSetAck {}))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(from = %request.get_ref().from_node, context = %request.get_ref().context))]
    async fn command(&self, request: Request<PeerCommand>) -> Result<Response<CommandResponse>, Status> {
        self.check_token(&request, &request.get_ref().from_node)?;
        Ok(Response::new(self.commands.receive(request.into_inner()).await?))
    }

    type QueryRelayStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<PeerQueryOut, Status>> + Send>>;

    #[tracing::instrument(level = "debug", skip_all)]
    async fn query_relay(
        &self,
        request: Request<tonic::Streaming<PeerQueryIn>>,
    ) -> Result<Response<Self::QueryRelayStream>, Status> {
        self.check_token(&request, "")?;
        let answers = self.queries.receive(request.into_inner()).await?;
        Ok(Response::new(Box::pin(answers)))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_clients(
        &self,
        request: Request<ListClientsRequest>,
    ) -> Result<Response<ListClientsResponse>, Status> {
        self.check_token(&request, "")?;
        let mut request = request.into_inner();
        request.this_node_only = true;
        RouterControl::list_clients(&*self.control, Request::new(request)).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_processors(
        &self,
        request: Request<ListProcessorsRequest>,
    ) -> Result<Response<ListProcessorsResponse>, Status> {
        self.check_token(&request, "")?;
        let mut request = request.into_inner();
        request.this_node_only = true;
        RouterControl::list_processors(&*self.control, Request::new(request)).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn send_instruction(
        &self,
        request: Request<SendInstructionRequest>,
    ) -> Result<Response<SendInstructionResponse>, Status> {
        self.check_token(&request, "")?;
        let mut request = request.into_inner();
        request.this_node_only = true;
        RouterControl::send_instruction(&*self.control, Request::new(request)).await
    }
}

/// A client of admin's `AdminInbox` on its Unix socket.
pub fn admin_inbox(socket: &std::path::Path) -> std::io::Result<AdminInboxClient<Channel>> {
    Ok(AdminInboxClient::new(myelin_proto::local_socket::channel(socket)?))
}

/// A client of a local process's `RaftInbox`, without message size limits (the sender's router
/// already bounded what it sends).
pub fn inbox(socket: &std::path::Path) -> std::io::Result<RaftInboxClient<Channel>> {
    Ok(RaftInboxClient::new(myelin_proto::local_socket::channel(socket)?)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(rpc: RaftRpc, entries: usize) -> RaftMessage {
        RaftMessage {
            group: "orders".into(),
            rpc: rpc as i32,
            entries: vec![bytes::Bytes::from_static(b"e"); entries],
            ..Default::default()
        }
    }

    #[test]
    fn raft_traffic_requests_and_heartbeats_count_against_their_own_bounds() {
        let bounds = LinkBounds::default();
        let raft = Some(("orders".to_owned(), bounds.messages_per_group));
        assert_eq!(lane(&message(RaftRpc::AppendEntries, 3), &bounds), raft);
        assert_eq!(lane(&message(RaftRpc::Vote, 0), &bounds), raft);
        assert_eq!(lane(&message(RaftRpc::InstallSnapshot, 1), &bounds), raft);
        // A heartbeat is never refused for a count: only its bytes are bounded.
        assert_eq!(lane(&message(RaftRpc::AppendEntries, 0), &bounds), None);
        let requests = Some(("orders (requests)".to_owned(), bounds.requests_per_group));
        assert_eq!(lane(&message(RaftRpc::ForwardAppend, 1), &bounds), requests);
        assert_eq!(lane(&message(RaftRpc::ReadIndex, 0), &bounds), requests);
    }
}
