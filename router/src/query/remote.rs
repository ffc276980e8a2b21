//! Query handlers connected to the other nodes of the cluster (issue 12).
//!
//! Every router tells the others which query handlers are connected to it, in the same handler
//! sets that carry its command handlers (`command::remote` sends them; [`RemoteQueries::apply`]
//! takes the query part). Each handler of another node is a [`RemoteQueryHandler`] in this
//! node's registry, under an id of this node's: routing picks it as it picks a local handler, so
//! a query scatters to one handler per component over every node of the context.
//!
//! **The node that runs a query runs all of it.** Scatter, gather, deadlines, Axon's error rule,
//! a streaming query's permits and a subscription query's subscriber all stay on the node the
//! dispatcher is connected to, whatever node the handler is on. A message for a remote handler
//! opens (or continues) a *conversation* with it: one `PeerLink.QueryRelay` call per query (by its
//! request id) or per subscription query and handler (by its subscription id). The handler's node
//! only relays: what comes in on the call goes to the handler as the node's own messages would,
//! what the handler sends for that id goes back on the call, and the first answer says whether the
//! query reached the handler or waited for a permit past its deadline. So a streaming query's
//! permits are granted by the dispatcher's node from the dispatcher's own demand, and end to end
//! nothing waits anywhere beyond the bounded queues of each hop.
//!
//! Ending: the dispatcher's node closes its side of the call when the query ends there
//! (completed, cancelled, timed out, or abandoned while still queued) or when the handler's node
//! says it is over (the handler completed it, went away, or sent more than the call can take:
//! the handler is then told to cancel, and the dispatcher's node answers AXONIQ-1900); the
//! handler's node ends the call after that. Never the other way round: a stream one side ended
//! while the other still sends on it is reset by HTTP/2, and enough resets make the peer close
//! the whole connection, Raft traffic included. When the call fails (the node died, the link
//! broke), the handler counts as having completed the query, as a local handler that
//! disconnects does; when the node is lost from the peer links, its handlers leave this node's
//! registry with everything they held.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use myelin_proto::axon::query::query_provider_inbound::Request as Inbound;
use myelin_proto::axon::query::query_provider_outbound::Request as Outbound;
use myelin_proto::axon::query::subscription_query_request::Request as SubscriptionRequest;
use myelin_proto::axon::query::subscription_query_response::Response as Update;
use myelin_proto::axon::query::{
    QueryProviderInbound, QueryProviderOutbound, QueryRequest, QueryResponse, QuerySubscription,
    SubscriptionQueryRequest,
};
use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::peer_query_out::Kind as OutKind;
use myelin_proto::internal::{PeerQueryIn, PeerQueryOut, QueryDispatched, QueryEnded, QueryHandlerEntry};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::handler::{Destination, Dispatched, HandlerId, SendError, inbound};
use super::{ContextQueries, QueryRouter, lock};
use crate::peers::{Peers, RelayCall};

/// Messages of one conversation waiting for the link to the handler's node.
const CONVERSATION_QUEUE: usize = 64;
/// Handler messages of one conversation waiting for the link back to the dispatcher's node.
/// A streaming query's handler sends within its permits (a window of 16 beyond the
/// dispatcher's demand), so this only fills when a handler ignores them.
const RELAY_BUFFER: usize = 64;
/// How long the handler's node waits for the message that opens a conversation.
const FIRST_MESSAGE_WAIT: Duration = Duration::from_secs(10);
/// How long either side waits for the other to close its half of a finished conversation.
const FINISH_WAIT: Duration = Duration::from_secs(5);
/// The longest name or id a peer's conversation may carry.
const MAX_NAME: usize = 4_096;
/// The longest wait for a permit a peer's query may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What a conversation is about: a query (by request id) or a subscription query (by
/// subscription id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Query,
    Subscription,
}

/// A conversation another node has with a handler connected here: (kind, id, handler).
pub type RelayKey = (Kind, String, HandlerId);

/// The handler's node's end of a conversation.
pub struct Relayed {
    serial: u64,
    out: mpsc::Sender<Result<PeerQueryOut, Status>>,
    ending: Arc<Ending>,
}

/// How a conversation ends on the handler's node: shared by its task and the relaying of the
/// handler's messages.
#[derive(Default)]
pub struct Ending {
    /// Cancelled when the conversation is over here: the handler completed it or went away, or
    /// its answers overflowed the call.
    done: CancellationToken,
    /// The handler sent more than the call could take.
    overflowed: AtomicBool,
    /// The handler's completion went to the dispatcher's node.
    completed: AtomicBool,
}

/// One open conversation as its dispatching node holds it: its serial (so that an ending one
/// never forgets its successor) and the way to the handler's node.
type Outgoing = (u64, mpsc::Sender<PeerQueryIn>);

/// A query handler connected to another node, as this node's registry sees it.
pub struct RemoteQueryHandler {
    /// This node's id for it.
    id: HandlerId,
    node: String,
    /// Its id on its own node.
    remote_id: HandlerId,
    context: String,
    peers: Peers,
    queries: Weak<ContextQueries>,
    /// Open conversations: (kind, id) -> (serial, the way to the handler's node).
    conversations: Mutex<HashMap<(Kind, String), Outgoing>>,
    next_serial: AtomicU64,
    /// Cancelled when the handler leaves this node's view.
    closed: CancellationToken,
}

impl RemoteQueryHandler {
    /// Opens the conversation about `query`; the receiver learns whether it reached the handler.
    pub(super) fn send_query(
        self: &Arc<Self>,
        query: QueryRequest,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Dispatched>, SendError> {
        let (report, dispatched) = oneshot::channel();
        let key = (Kind::Query, query.message_identifier.clone());
        let wait = deadline.saturating_duration_since(Instant::now());
        self.open(key, inbound(Inbound::Query(query)), wait, Some(report))?;
        Ok(dispatched)
    }

    /// Carries a message for a query or subscription in conversation with the handler;
    /// a subscription's subscribe or initial-result request opens one.
    #[allow(deprecated)] // get_initial_result: deprecated by Axon, still sent by older clients
    pub(super) fn send_control(self: &Arc<Self>, message: QueryProviderInbound) -> Result<(), SendError> {
        let Some(request) = &message.request else { return Ok(()) };
        match request {
            Inbound::QueryFlowControl(flow) => {
                let id = flow
                    .query_reference
                    .as_ref()
                    .map(|r| r.request_id.clone())
                    .unwrap_or_default();
                self.tell((Kind::Query, id), message, false)
            }
            Inbound::QueryCancel(reference) => self.tell((Kind::Query, reference.request_id.clone()), message, true),
            Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest { request: Some(request) }) => match request {
                SubscriptionRequest::Subscribe(s) | SubscriptionRequest::GetInitialResult(s) => {
                    let key = (Kind::Subscription, s.subscription_identifier.clone());
                    if lock(&self.conversations).contains_key(&key) {
                        self.tell(key, message, false)
                    } else {
                        self.open(key, message, Duration::ZERO, None)
                    }
                }
                SubscriptionRequest::Unsubscribe(s) => {
                    self.tell((Kind::Subscription, s.subscription_identifier.clone()), message, true)
                }
                SubscriptionRequest::FlowControl(_) => Ok(()),
            },
            // Acks answer a local handler's instructions; queries come through `send_query`.
            _ => Ok(()),
        }
    }

    fn open(
        self: &Arc<Self>,
        key: (Kind, String),
        message: QueryProviderInbound,
        wait: Duration,
        report: Option<oneshot::Sender<Dispatched>>,
    ) -> Result<(), SendError> {
        if self.closed.is_cancelled() {
            return Err(SendError::Disconnected);
        }
        let first = PeerQueryIn {
            from_node: String::new(),
            context: self.context.clone(),
            handler: self.remote_id,
            timeout_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            message: Some(message),
        };
        let call = self
            .peers
            .query_relay(&self.node, first.encoded_len() as u64)
            .map_err(|why| {
                tracing::debug!(node = %self.node, %why, "query refused: the link to its handler's node is full");
                SendError::QueueFull
            })?;
        let (sender, outgoing) = mpsc::channel(CONVERSATION_QUEUE);
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        lock(&self.conversations).insert(key.clone(), (serial, sender));
        tokio::spawn(self.clone().converse(key, serial, call, first, outgoing, report));
        Ok(())
    }

    /// Sends a message on an open conversation (none open: it is over, nothing to say);
    /// `last` closes this side of it after the message.
    fn tell(&self, key: (Kind, String), message: QueryProviderInbound, last: bool) -> Result<(), SendError> {
        let mut conversations = lock(&self.conversations);
        let Some((_, sender)) = conversations.get(&key) else {
            return Ok(());
        };
        let sent = sender.try_send(PeerQueryIn {
            message: Some(message),
            ..Default::default()
        });
        if last {
            conversations.remove(&key);
        }
        sent.map_err(SendError::from)
    }

    /// Runs one conversation from this side: opens the call, then hands what the handler's node
    /// sends to this node's query routing until the conversation ends. This side closes its half
    /// first and then reads the call to its end, so that the handler's node ends a call nobody
    /// sends on any more (see `PeerQueryOut` in cluster.proto).
    async fn converse(
        self: Arc<Self>,
        key: (Kind, String),
        serial: u64,
        call: RelayCall,
        first: PeerQueryIn,
        outgoing: mpsc::Receiver<PeerQueryIn>,
        mut report: Option<oneshot::Sender<Dispatched>>,
    ) {
        let opened = tokio::select! {
            opened = call.open(first, ReceiverStream::new(outgoing)) => opened,
            () = self.closed.cancelled() => Err(Status::cancelled("the handler left")),
        };
        let (mut completed, mut overflow, mut failure) = (false, None, None);
        // Whether the call is over (or must be dropped) rather than to be read to its end.
        let mut over = true;
        let mut answers = match opened {
            Ok(answers) => Some(answers),
            Err(status) => {
                failure = Some(status);
                None
            }
        };
        if let Some(answers) = &mut answers {
            over = false;
            loop {
                let next = tokio::select! {
                    next = answers.message() => next,
                    () = self.closed.cancelled() => {
                        over = true;
                        break;
                    }
                    // The query ended here while it still waited for the handler's permit.
                    () = abandoned(&mut report) => {
                        tracing::debug!(node = %self.node, id = %key.1, "a query for a handler on another node was abandoned before it reached the handler");
                        break;
                    }
                };
                match next {
                    Ok(Some(PeerQueryOut {
                        kind: Some(OutKind::Dispatched(dispatched)),
                    })) => {
                        if let Some(report) = report.take() {
                            let _ = report.send(if dispatched.expired {
                                Dispatched::Expired {
                                    overdue: Duration::from_millis(dispatched.overdue_ms),
                                }
                            } else {
                                Dispatched::Sent
                            });
                        }
                        if dispatched.expired {
                            completed = true;
                            break;
                        }
                    }
                    Ok(Some(PeerQueryOut {
                        kind: Some(OutKind::Message(message)),
                    })) => {
                        // An answer can overtake the report that the query reached the handler:
                        // it says so as well.
                        if let Some(report) = report.take() {
                            let _ = report.send(Dispatched::Sent);
                        }
                        let ends = ends_conversation(message.request.as_ref());
                        completed |= ends;
                        self.relay(message).await;
                        if ends {
                            break;
                        }
                    }
                    Ok(Some(PeerQueryOut {
                        kind: Some(OutKind::Ended(ended)),
                    })) => {
                        if ended.overflowed {
                            overflow = Some(ended.reason);
                        }
                        break;
                    }
                    Ok(Some(PeerQueryOut { kind: None })) => {}
                    Ok(None) => {
                        over = true;
                        break;
                    }
                    Err(status) => {
                        failure = Some(status);
                        over = true;
                        break;
                    }
                }
            }
        }
        // Closes this side of the call (its messages end once the sender is dropped).
        {
            let mut conversations = lock(&self.conversations);
            if conversations.get(&key).is_some_and(|(s, _)| *s == serial) {
                conversations.remove(&key);
            }
        }
        if let Some(answers) = answers.as_mut().filter(|_| !over) {
            let rest = async { while let Ok(Some(_)) = answers.message().await {} };
            if tokio::time::timeout(FINISH_WAIT, rest).await.is_err() {
                tracing::debug!(node = %self.node, id = %key.1, "the handler's node did not end a finished query conversation");
            }
        }
        if let Some(status) = &failure {
            tracing::debug!(node = %self.node, id = %key.1, %status, "a conversation with a query handler on another node failed");
        }
        let (kind, id) = key;
        if kind == Kind::Query
            && !completed
            && let Some(queries) = self.queries.upgrade()
        {
            if let Some(reason) = overflow {
                let error = queries.error_response(&id, ErrorCode::TooManyRequests, reason);
                queries.relay_response(self.id, error).await;
            }
            // As a local handler that disconnects: it has nothing more for the query.
            queries.relay_complete(self.id, &id).await;
        }
    }

    /// What the handler sent, handed to this node's routing as if it came from a local stream.
    async fn relay(&self, message: QueryProviderOutbound) {
        let Some(queries) = self.queries.upgrade() else { return };
        match message.request {
            Some(Outbound::QueryResponse(response)) => queries.relay_response(self.id, response).await,
            Some(Outbound::QueryComplete(complete)) => queries.relay_complete(self.id, &complete.request_id).await,
            Some(Outbound::SubscriptionQueryResponse(response)) => {
                queries.relay_subscription_response(self.id, response).await;
            }
            _ => {}
        }
    }
}

/// Whether a handler's message ends its conversation: a query's completion, a subscription's
/// completion.
fn ends_conversation(message: Option<&Outbound>) -> bool {
    match message {
        Some(Outbound::QueryComplete(_)) => true,
        Some(Outbound::SubscriptionQueryResponse(response)) => matches!(
            response.response,
            Some(Update::Complete(_) | Update::CompleteExceptionally(_))
        ),
        _ => false,
    }
}

/// Resolves when the query's report is no longer awaited; never while there is none.
async fn abandoned(report: &mut Option<oneshot::Sender<Dispatched>>) {
    match report {
        Some(report) => report.closed().await,
        None => std::future::pending().await,
    }
}

/// What this node knows of one other node's query handlers.
#[derive(Default)]
struct NodeQueries {
    /// (context, id on that node) -> the handler.
    handlers: HashMap<(String, HandlerId), Arc<RemoteQueryHandler>>,
    /// (context, query name, id on that node) -> its subscription.
    subscriptions: HashMap<(String, String, HandlerId), Subscription>,
}

#[derive(Clone, PartialEq, Eq)]
struct Subscription {
    client_id: String,
    component: String,
    result_names: BTreeSet<String>,
}

/// The query handlers of the other nodes, and the conversations they hold with the handlers
/// connected here.
pub struct RemoteQueries {
    router: QueryRouter,
    peers: Peers,
    nodes: Mutex<HashMap<String, NodeQueries>>,
    next_serial: AtomicU64,
}

impl RemoteQueries {
    pub fn new(router: QueryRouter, peers: Peers) -> RemoteQueries {
        RemoteQueries {
            router,
            peers,
            nodes: Mutex::new(HashMap::new()),
            next_serial: AtomicU64::new(1),
        }
    }

    /// Changes whenever a query handler connected here subscribes, unsubscribes or goes.
    pub fn local_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.router.local_changes()
    }

    /// The subscriptions of the query handlers connected here, for this node's handler set.
    pub fn local_entries(&self) -> Vec<QueryHandlerEntry> {
        self.router
            .local_registrations()
            .into_iter()
            .map(|(context, query, handler, registration)| QueryHandlerEntry {
                context,
                query,
                handler,
                client_id: registration.client_id,
                component_name: registration.component,
                result_names: registration.result_names.into_iter().collect(),
            })
            .collect()
    }

    /// Whether `entries` are within what a handler set may hold.
    pub fn check(entries: &[QueryHandlerEntry], max_entries: usize) -> Result<(), Status> {
        if entries.len() > max_entries {
            return Err(Status::invalid_argument(format!(
                "a handler set of {} query subscriptions (at most {max_entries})",
                entries.len()
            )));
        }
        let too_long = entries.iter().any(|e| {
            e.result_names.len() > 64
                || [&e.context, &e.query, &e.client_id, &e.component_name]
                    .into_iter()
                    .chain(&e.result_names)
                    .any(|t| t.len() > MAX_NAME)
        });
        if too_long {
            return Err(Status::invalid_argument(format!(
                "a handler set with a query name longer than {MAX_NAME} bytes, or over 64 result names"
            )));
        }
        Ok(())
    }

    /// Replaces what this node knew of `node`'s query handlers. `restarted`: the router there
    /// restarted, so its handler ids name other handlers now.
    pub fn apply(&self, node: &str, restarted: bool, entries: Vec<QueryHandlerEntry>) {
        let mut nodes = lock(&self.nodes);
        let known = nodes.entry(node.to_owned()).or_default();
        if restarted {
            for handler in std::mem::take(&mut known.handlers).into_values() {
                self.gone(&handler);
            }
            known.subscriptions.clear();
        }
        let mut wanted: HashMap<(String, String, HandlerId), Subscription> = HashMap::new();
        for entry in entries {
            let subscription = wanted
                .entry((entry.context, entry.query, entry.handler))
                .or_insert_with(|| Subscription {
                    client_id: entry.client_id,
                    component: entry.component_name,
                    result_names: BTreeSet::new(),
                });
            subscription.result_names.extend(entry.result_names);
        }
        let mut handlers = HashMap::new();
        for ((context, _, remote_id), subscription) in &wanted {
            let key = (context.clone(), *remote_id);
            if handlers.contains_key(&key) {
                continue;
            }
            let handler = known.handlers.remove(&key).unwrap_or_else(|| {
                Arc::new(RemoteQueryHandler {
                    id: self.router.next_handler_id(),
                    node: node.to_owned(),
                    remote_id: *remote_id,
                    context: context.clone(),
                    peers: self.peers.clone(),
                    queries: Arc::downgrade(&self.router.context(context)),
                    conversations: Mutex::new(HashMap::new()),
                    next_serial: AtomicU64::new(0),
                    closed: CancellationToken::new(),
                })
            });
            tracing::trace!(%node, client = %subscription.client_id, "query handler of another node");
            handlers.insert(key, handler);
        }
        for (context, query, remote_id) in known.subscriptions.keys() {
            if !wanted.contains_key(&(context.clone(), query.clone(), *remote_id))
                && let Some(handler) = handlers.get(&(context.clone(), *remote_id))
            {
                self.router.context(context).unsubscribe_handler(handler.id, query);
            }
        }
        for handler in std::mem::take(&mut known.handlers).into_values() {
            self.gone(&handler);
        }
        for (key, subscription) in &wanted {
            if known.subscriptions.get(key) == Some(subscription) {
                continue;
            }
            let (context, query, remote_id) = key;
            let handler = handlers[&(context.clone(), *remote_id)].clone();
            let destination = Destination::Remote(handler.clone());
            let queries = self.router.context(context);
            let names: Vec<String> = if subscription.result_names.is_empty() {
                vec![String::new()]
            } else {
                subscription.result_names.iter().cloned().collect()
            };
            for result_name in names {
                let subscribe = QuerySubscription {
                    query: query.clone(),
                    result_name,
                    component_name: subscription.component.clone(),
                    client_id: subscription.client_id.clone(),
                    ..Default::default()
                };
                queries.subscribe_handler(handler.id, &destination, &subscribe);
            }
        }
        known.handlers = handlers;
        known.subscriptions = wanted;
    }

    /// Takes `node`'s query handlers out of this node's registry; the queries they held count
    /// as completed by them.
    pub fn drop_node(&self, node: &str) {
        let Some(gone) = lock(&self.nodes).remove(node) else {
            return;
        };
        if !gone.handlers.is_empty() {
            tracing::info!(%node, handlers = gone.handlers.len(), "the query handlers of another node are gone");
        }
        for handler in gone.handlers.into_values() {
            self.gone(&handler);
        }
    }

    fn gone(&self, handler: &Arc<RemoteQueryHandler>) {
        handler.closed.cancel();
        let queries = self.router.context(&handler.context);
        let id = handler.id;
        tokio::spawn(async move { queries.handler_gone(id).await });
    }

    /// A conversation another node opens with a handler connected here: checks its first
    /// message, then relays in both directions (see the module docs).
    #[allow(deprecated)] // get_initial_result: deprecated by Axon, still sent by older clients
    pub async fn receive(
        &self,
        mut incoming: Streaming<PeerQueryIn>,
    ) -> Result<ReceiverStream<Result<PeerQueryOut, Status>>, Status> {
        let first = tokio::time::timeout(FIRST_MESSAGE_WAIT, incoming.message())
            .await
            .map_err(|_| Status::deadline_exceeded("a query conversation that never said what it is about"))??
            .ok_or_else(|| Status::invalid_argument("an empty query conversation"))?;
        if first.context.is_empty() || first.context.len() > MAX_NAME || first.from_node.len() > MAX_NAME {
            return Err(Status::invalid_argument(
                "a query conversation without a context, or with a name too long",
            ));
        }
        let Some(request) = first.message.and_then(|m| m.request) else {
            return Err(Status::invalid_argument("a query conversation that carries no message"));
        };
        let (kind, id) = match &request {
            Inbound::Query(query) => (Kind::Query, query.message_identifier.clone()),
            Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest {
                request: Some(SubscriptionRequest::Subscribe(s) | SubscriptionRequest::GetInitialResult(s)),
            }) => (Kind::Subscription, s.subscription_identifier.clone()),
            _ => {
                return Err(Status::invalid_argument(
                    "a query conversation opens with a query or a subscription query",
                ));
            }
        };
        if id.is_empty() || id.len() > MAX_NAME {
            return Err(Status::invalid_argument(
                "a query conversation's id is empty or too long",
            ));
        }
        let queries = self.router.context(&first.context);
        let (out, answers) = mpsc::channel(RELAY_BUFFER);
        let conversation = Conversation {
            key: (kind, id, first.handler),
            serial: self.next_serial.fetch_add(1, Ordering::Relaxed),
            ending: Arc::default(),
            out,
        };
        let destination = {
            let mut state = queries.state();
            let destination = state
                .registry
                .destination(first.handler)
                .filter(Destination::is_local)
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "query handler {} is not connected to {} (any more)",
                        first.handler,
                        self.peers.node_name()
                    ))
                })?;
            if state.relayed.contains_key(&conversation.key) {
                return Err(Status::already_exists(format!(
                    "a conversation about {} with this handler is open already",
                    conversation.key.1
                )));
            }
            state.relayed.insert(
                conversation.key.clone(),
                Relayed {
                    serial: conversation.serial,
                    out: conversation.out.clone(),
                    ending: conversation.ending.clone(),
                },
            );
            destination
        };
        let wait = Duration::from_millis(first.timeout_ms).min(MAX_TIMEOUT);
        tokio::spawn(conversation.run(queries, destination, request, wait, incoming));
        Ok(ReceiverStream::new(answers))
    }
}

/// The handler's node's side of one conversation.
struct Conversation {
    key: RelayKey,
    serial: u64,
    ending: Arc<Ending>,
    out: mpsc::Sender<Result<PeerQueryOut, Status>>,
}

impl Conversation {
    async fn run(
        self,
        queries: Arc<ContextQueries>,
        destination: Destination,
        request: Inbound,
        wait: Duration,
        mut incoming: Streaming<PeerQueryIn>,
    ) {
        // What the handler has been told, so that an ending tells it only what it must hear.
        let mut reached = false;
        let mut stopped = false;
        let mut peer_left = false;
        // Whether the dispatcher's node was told the query expired (and so ends its side).
        let mut expired = false;
        let mut report = None;
        match request {
            Inbound::Query(query) => {
                let name = query.query.clone();
                match destination.send_query(query, Instant::now() + wait) {
                    Ok(dispatched) => report = Some(dispatched),
                    Err(error) => {
                        let refused = refusal(&queries, &self.key.1, &name, error);
                        let _ = self.out.try_send(Ok(message(Outbound::QueryResponse(refused))));
                        stopped = true;
                    }
                }
            }
            request => {
                stopped = destination.send_control(inbound(request)).is_err();
            }
        }
        while !stopped {
            tokio::select! {
                dispatched = async { report.as_mut().expect("guarded").await }, if report.is_some() => {
                    report = None;
                    let answer = match dispatched {
                        Ok(Dispatched::Sent) => {
                            reached = true;
                            QueryDispatched { expired: false, overdue_ms: 0 }
                        }
                        Ok(Dispatched::Expired { overdue }) => QueryDispatched {
                            expired: true,
                            overdue_ms: u64::try_from(overdue.as_millis()).unwrap_or(u64::MAX),
                        },
                        // The handler's queue went away with the handler.
                        Err(_) => break,
                    };
                    let ends = answer.expired;
                    if self.out.try_send(Ok(PeerQueryOut { kind: Some(OutKind::Dispatched(answer)) })).is_err() {
                        self.ending.overflowed.store(true, Ordering::Relaxed);
                        break;
                    }
                    if ends {
                        expired = true;
                        break;
                    }
                }
                next = incoming.message() => match next {
                    Ok(Some(PeerQueryIn { message: Some(message), .. })) => {
                        if !self.concerns(&message) {
                            tracing::debug!(id = %self.key.1, "a peer's message about another query in a conversation; ignored");
                            continue;
                        }
                        let last = matches!(
                            &message.request,
                            Some(Inbound::QueryCancel(_))
                                | Some(Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest {
                                    request: Some(SubscriptionRequest::Unsubscribe(_))
                                }))
                        );
                        if last && self.key.0 == Kind::Query && !reached {
                            // Still queued: dropping its report makes the queue skip it.
                            stopped = true;
                            continue;
                        }
                        let _ = destination.send_control(message);
                        stopped |= last;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        peer_left = true;
                        break;
                    }
                },
                () = self.ending.done.cancelled() => break,
            }
        }
        queries.forget_relay(&self.key, self.serial);
        let overflowed = self.ending.overflowed.load(Ordering::Relaxed);
        let completed = self.ending.completed.load(Ordering::Relaxed);
        let handler_gone = self.ending.done.is_cancelled() && !completed && !overflowed;
        // The handler still works on it for a node that no longer waits: tell it to stop.
        if (peer_left || overflowed) && !stopped && !handler_gone {
            let (kind, id, _) = &self.key;
            let stop = match kind {
                Kind::Query if reached => Some(super::dispatch::cancel(id)),
                Kind::Query => None,
                Kind::Subscription => Some(inbound(Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest {
                    request: Some(SubscriptionRequest::Unsubscribe(
                        myelin_proto::axon::query::SubscriptionQuery {
                            subscription_identifier: id.clone(),
                            ..Default::default()
                        },
                    )),
                }))),
            };
            if let Some(stop) = stop {
                let _ = destination.send_control(stop);
            }
        }
        if peer_left {
            return;
        }
        // The dispatcher's node closes its side once it knows the conversation is over: told so
        // unless the handler's completion or the expiry already said it.
        if !completed && !expired {
            let reason = if overflowed {
                format!(
                    "Query cancelled: its handler on {} sent more than the link to the dispatcher's node could take",
                    queries.node_name
                )
            } else {
                String::new()
            };
            let ended = PeerQueryOut {
                kind: Some(OutKind::Ended(QueryEnded { overflowed, reason })),
            };
            let _ = tokio::time::timeout(FINISH_WAIT, self.out.send(Ok(ended))).await;
        }
        let rest = async { while let Ok(Some(_)) = incoming.message().await {} };
        if tokio::time::timeout(FINISH_WAIT, rest).await.is_err() {
            tracing::debug!(id = %self.key.1, "the dispatcher's node did not close a finished query conversation");
        }
    }

    /// Whether a message from the peer is about this conversation's query or subscription.
    #[allow(deprecated)] // get_initial_result: deprecated by Axon, still sent by older clients
    fn concerns(&self, message: &QueryProviderInbound) -> bool {
        let id = &self.key.1;
        match &message.request {
            Some(Inbound::QueryFlowControl(flow)) => {
                self.key.0 == Kind::Query && flow.query_reference.as_ref().is_some_and(|r| &r.request_id == id)
            }
            Some(Inbound::QueryCancel(reference)) => self.key.0 == Kind::Query && &reference.request_id == id,
            Some(Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest {
                request:
                    Some(
                        SubscriptionRequest::Subscribe(s)
                        | SubscriptionRequest::GetInitialResult(s)
                        | SubscriptionRequest::Unsubscribe(s),
                    ),
            })) => self.key.0 == Kind::Subscription && &s.subscription_identifier == id,
            _ => false,
        }
    }
}

fn message(request: Outbound) -> PeerQueryOut {
    PeerQueryOut {
        kind: Some(OutKind::Message(QueryProviderOutbound {
            request: Some(request),
            instruction_id: String::new(),
        })),
    }
}

/// The answer to a query the handler's queue could not take, as the dispatcher's node would
/// give it for a local handler.
fn refusal(queries: &ContextQueries, id: &str, query: &str, error: SendError) -> QueryResponse {
    let message = match error {
        SendError::QueueFull => format!("Too many queries queued for a handler of {query}"),
        SendError::QueueBytesFull => {
            format!("Too many query bytes queued for a handler of {query} (myelin.limits.query-queue-bytes-per-client)")
        }
        SendError::NodeBytesFull => format!(
            "Too many query bytes queued on {} (myelin.limits.query-queue-bytes)",
            queries.node_name
        ),
        SendError::Disconnected => format!("The handler of {query} disconnected"),
    };
    queries.error_response(id, ErrorCode::TooManyRequests, message)
}

impl ContextQueries {
    /// Whether another node has a conversation with `handler` about subscription `id`.
    pub(super) fn relays(&self, handler: HandlerId, id: &str) -> bool {
        self.state()
            .relayed
            .contains_key(&(Kind::Subscription, id.to_owned(), handler))
    }

    /// Sends what a handler connected here sent for another node's query or subscription back
    /// to that node; false if no conversation is about it.
    pub(super) fn relay_to_peer(&self, handler: HandlerId, id: &str, answer: Outbound) -> bool {
        let kind = match answer {
            Outbound::SubscriptionQueryResponse(_) => Kind::Subscription,
            _ => Kind::Query,
        };
        let ends = ends_conversation(Some(&answer));
        let state = self.state();
        let Some(relayed) = state.relayed.get(&(kind, id.to_owned(), handler)) else {
            return false;
        };
        let ending = &relayed.ending;
        match relayed.out.try_send(Ok(message(answer))) {
            Ok(()) if ends => {
                ending.completed.store(true, Ordering::Relaxed);
                ending.done.cancel();
            }
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(query = %id, "a query handler sends more than the link to the dispatcher's node takes; ending that query");
                ending.overflowed.store(true, Ordering::Relaxed);
                ending.done.cancel();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => ending.done.cancel(),
        }
        true
    }

    /// A handler connected here went away: the conversations about it are over.
    pub(super) fn relays_lost_handler(&self, handler: HandlerId) {
        for ((_, _, relayed_handler), relayed) in &self.state().relayed {
            if *relayed_handler == handler {
                relayed.ending.done.cancel();
            }
        }
    }

    fn forget_relay(&self, key: &RelayKey, serial: u64) {
        let mut state = self.state();
        if state.relayed.get(key).is_some_and(|r| r.serial == serial) {
            state.relayed.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::LinkBounds;

    fn remote() -> RemoteQueries {
        RemoteQueries::new(
            QueryRouter::new("n1"),
            Peers::new("n1".into(), None, LinkBounds::default()),
        )
    }

    fn entry(context: &str, query: &str, handler: u64, component: &str) -> QueryHandlerEntry {
        QueryHandlerEntry {
            context: context.into(),
            query: query.into(),
            handler,
            client_id: format!("{component}-{handler}"),
            component_name: component.into(),
            result_names: vec!["java.lang.String".into()],
        }
    }

    /// (query, component, remote?) of every registration in `context`, sorted.
    fn routed(remote: &RemoteQueries, context: &str) -> Vec<(String, String, bool)> {
        let queries = remote.router.context(context);
        let state = queries.state();
        let mut all: Vec<_> = state
            .registry
            .registrations()
            .into_iter()
            .map(|(query, id, r)| {
                let local = state.registry.destination(id).is_some_and(|d| d.is_local());
                (query, r.component, !local)
            })
            .collect();
        all.sort();
        all
    }

    #[tokio::test]
    async fn a_nodes_query_handlers_follow_its_sets_and_leave_with_it() {
        let remote = remote();
        remote.apply(
            "n2",
            true,
            vec![entry("default", "A", 7, "app"), entry("default", "B", 7, "app")],
        );
        assert_eq!(
            routed(&remote, "default"),
            [("A".into(), "app".into(), true), ("B".into(), "app".into(), true)]
        );
        // Remote handlers are not this node's to publish.
        assert!(remote.local_entries().is_empty());
        let first_id = remote.router.context("default").state().registry.pick("A")[0].0;

        // The handler dropped B; the same handler keeps its id here.
        remote.apply("n2", false, vec![entry("default", "A", 7, "app")]);
        assert_eq!(routed(&remote, "default"), [("A".into(), "app".into(), true)]);
        assert_eq!(
            remote.router.context("default").state().registry.pick("A")[0].0,
            first_id
        );

        // Restarted: handler 7 there is another handler now, with another id here.
        remote.apply("n2", true, vec![entry("default", "A", 7, "other")]);
        tokio::task::yield_now().await;
        let picked = remote.router.context("default").state().registry.pick("A");
        assert_eq!(picked.len(), 1);
        assert_ne!(picked[0].0, first_id);

        remote.drop_node("n2");
        // `handler_gone` runs on its own task.
        for _ in 0..100 {
            if routed(&remote, "default").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(routed(&remote, "default").is_empty());
    }

    #[test]
    fn oversized_query_entries_are_refused() {
        let mut long = entry("default", "A", 1, "app");
        long.query = "x".repeat(MAX_NAME + 1);
        assert!(RemoteQueries::check(&[long], 10).is_err());
        let mut names = entry("default", "A", 1, "app");
        names.result_names = (0..65).map(|n| n.to_string()).collect();
        assert!(RemoteQueries::check(&[names], 10).is_err());
        let many: Vec<_> = (0..11).map(|n| entry("default", "A", n, "app")).collect();
        assert!(RemoteQueries::check(&many, 10).is_err());
        assert!(RemoteQueries::check(&many[..10], 10).is_ok());
    }

    /// A handler that sends more than the conversation's buffer takes ends the conversation
    /// (marked overflowed) instead of growing memory; a completion ends it too.
    #[tokio::test]
    async fn a_relayed_conversation_is_bounded_and_ends_on_completion() {
        let queries = QueryRouter::new("n1").context("default");
        let (out, mut answers) = mpsc::channel(2);
        let ending = Arc::new(Ending::default());
        let key = (Kind::Query, "q1".to_owned(), 5);
        queries.state().relayed.insert(
            key.clone(),
            Relayed {
                serial: 1,
                out,
                ending: ending.clone(),
            },
        );
        let response = |n: u32| {
            Outbound::QueryResponse(QueryResponse {
                message_identifier: format!("r{n}"),
                request_identifier: "q1".into(),
                ..Default::default()
            })
        };
        // Not this handler's conversation, or not a query of any: not relayed.
        assert!(!queries.relay_to_peer(6, "q1", response(0)));
        assert!(!queries.relay_to_peer(5, "q2", response(0)));
        assert!(queries.relay_to_peer(5, "q1", response(1)));
        assert!(queries.relay_to_peer(5, "q1", response(2)));
        assert!(!ending.done.is_cancelled());
        assert!(queries.relay_to_peer(5, "q1", response(3)));
        assert!(ending.done.is_cancelled() && ending.overflowed.load(Ordering::Relaxed));
        assert!(!ending.completed.load(Ordering::Relaxed));
        assert!(answers.recv().await.is_some());

        let (out, _answers) = mpsc::channel(8);
        let ending = Arc::new(Ending::default());
        queries.state().relayed.insert(
            key.clone(),
            Relayed {
                serial: 2,
                out,
                ending: ending.clone(),
            },
        );
        let complete = Outbound::QueryComplete(myelin_proto::axon::query::QueryComplete {
            message_id: "c".into(),
            request_id: "q1".into(),
        });
        assert!(queries.relay_to_peer(5, "q1", complete));
        assert!(ending.done.is_cancelled() && ending.completed.load(Ordering::Relaxed));
        // Only the conversation's own serial forgets it.
        queries.forget_relay(&key, 1);
        assert!(queries.state().relayed.contains_key(&key));
        queries.forget_relay(&key, 2);
        assert!(!queries.state().relayed.contains_key(&key));
    }
}
