//! Query routing: Axon's `QueryService` for the clients connected to this node.
//!
//! Handler applications open a stream (`OpenStream`), subscribe query names and grant permits;
//! dispatchers send a query (`Query`) and get a stream of responses back, or open a subscription
//! query (`Subscription`) and get an initial result and then updates.
//!
//! The layers, per context ([`ContextQueries`]):
//! - [`registry`]: who handles what (query name -> handlers, grouped by component);
//! - [`handler`]: how a message reaches a handler ([`handler::Destination`]: a local stream with
//!   a permit-gated bounded queue, or a handler on another node);
//! - [`remote`]: the handlers of the other nodes of the cluster, and the conversations this node
//!   relays between them and its own handlers;
//! - [`dispatch`]: queries in flight by id — scatter to one handler per component, gather their
//!   responses until each handler completed, the deadline passed, or the dispatcher went away;
//! - [`demand`]: the dispatcher's response stream, and what it shows of the dispatcher's demand;
//! - [`instructions`]: the processing instructions read from queries and written onto them;
//! - [`subscription`]: subscription queries by id, their handlers and their subscriber;
//! - [`service`]: the gRPC service, which only decodes, calls and encodes.
//!
//! What follows Axon Server, and where:
//! - matching: by query name only; the `result_name` a handler subscribes with is recorded for
//!   display and the query's `response_type` is not consulted ([`registry`]);
//! - streaming queries (CLIENT_SUPPORTS_STREAMING=true): forwarded with
//!   SERVER_SUPPORTS_STREAMING=true (false for every other query), the first handler to answer
//!   is streamed and the others get `query_cancel`, per-query `query_flow_control` permits follow
//!   the dispatcher's gRPC demand, and a dispatcher's cancel becomes `query_cancel` ([`dispatch`]);
//! - deadlines: TIMEOUT bounds the wait for a handler's permit (AXONIQ-5006 "Timeout for
//!   message"), a query that waited 10 ms or more is forwarded with the time it has left as its
//!   TIMEOUT ([`handler`]), and plain queries (not streaming ones) also end at their deadline.
//!
//! Invariants: every query in flight ends (all handlers complete, a handler disconnects, the
//! deadline of a plain query, a cancel, or an overflow) and is then removed; a state lock is never
//! held across an await (the routing state of a context is one `std::sync::Mutex`, and sends
//! under it are `try_send`); every queue is bounded, and a streaming query holds at most
//! [`dispatch::STREAM_WINDOW`] responses for its dispatcher.

pub mod demand;
pub mod dispatch;
pub mod handler;
pub mod instructions;
pub mod metrics;
pub mod registry;
pub mod remote;
pub mod service;
pub mod subscription;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use myelin_proto::axon::ErrorMessage;
use myelin_proto::errors::ErrorCode;

use crate::handler_limits::{Budget, HandlerLimits};

pub use metrics::{QueryMetrics, QueryMetricsSnapshot};

/// The query routing of this node: one [`ContextQueries`] per context that has been used.
#[derive(Clone)]
pub struct QueryRouter {
    inner: Arc<RouterInner>,
}

struct RouterInner {
    node_name: String,
    contexts: Mutex<HashMap<String, Arc<ContextQueries>>>,
    next_handler: AtomicU64,
    limits: HandlerLimits,
    /// Bytes of queries queued for all handlers (`myelin.limits.query-queue-bytes`).
    queued_bytes: Budget,
    /// Queries in flight on the node, one unit each (at most [`dispatch::MAX_IN_FLIGHT`]).
    in_flight: Budget,
    /// Counts the changes to the handlers connected here (what the other nodes must be told).
    local_changes: tokio::sync::watch::Sender<u64>,
}

impl QueryRouter {
    pub fn new(node_name: impl Into<String>) -> QueryRouter {
        let limits = HandlerLimits::default();
        QueryRouter {
            inner: Arc::new(RouterInner {
                node_name: node_name.into(),
                contexts: Mutex::new(HashMap::new()),
                next_handler: AtomicU64::new(1),
                queued_bytes: Budget::new(limits.query_queue_bytes),
                in_flight: Budget::new(dispatch::MAX_IN_FLIGHT),
                limits,
                local_changes: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    /// A router that admits at most `queries` queries in flight at a time (for tests).
    #[cfg(test)]
    pub(crate) fn with_max_in_flight(mut self, queries: usize) -> QueryRouter {
        Arc::get_mut(&mut self.inner).expect("not shared yet").in_flight = Budget::new(queries);
        self
    }

    /// Sets the query queue and subscription limits; only before the router is shared.
    pub fn with_limits(mut self, limits: HandlerLimits) -> QueryRouter {
        let inner = Arc::get_mut(&mut self.inner).expect("limits are set before the router is shared");
        inner.queued_bytes = Budget::new(limits.query_queue_bytes);
        inner.limits = limits;
        self
    }

    pub fn limits(&self) -> &HandlerLimits {
        &self.inner.limits
    }

    /// Starts a local handler's queues within the configured limits.
    pub fn start_handler(&self) -> (handler::LocalHandler, Arc<handler::Permits>, handler::HandlerStream) {
        let limits = &self.inner.limits;
        handler::LocalHandler::start_bounded(
            limits.query_queue_capacity,
            Budget::new(limits.query_queue_bytes_per_client),
            self.inner.queued_bytes.clone(),
        )
    }

    /// Bytes of queries queued for all handlers now.
    pub fn queued_bytes(&self) -> usize {
        self.inner.queued_bytes.used()
    }

    /// The routing state of `context`, created on first use.
    pub fn context(&self, context: &str) -> Arc<ContextQueries> {
        let mut contexts = lock(&self.inner.contexts);
        contexts
            .entry(context.to_owned())
            .or_insert_with(|| {
                Arc::new(ContextQueries {
                    node_name: self.inner.node_name.clone(),
                    state: Mutex::new(State::default()),
                    metrics: QueryMetrics::default(),
                    in_flight: self.inner.in_flight.clone(),
                    bytes: self.inner.queued_bytes.clone(),
                    local_changes: self.inner.local_changes.clone(),
                })
            })
            .clone()
    }

    /// Counters of every context that has seen query traffic.
    pub fn metrics(&self) -> Vec<(String, QueryMetricsSnapshot)> {
        let contexts = lock(&self.inner.contexts);
        contexts
            .iter()
            .map(|(name, context)| (name.clone(), context.metrics.snapshot()))
            .collect()
    }

    /// Every handler subscription of every context: (context, query name, handler,
    /// registration), for the admin API.
    pub fn registrations(&self) -> Vec<(String, String, handler::HandlerId, registry::Registration)> {
        self.registrations_where(|_| true)
    }

    /// The subscriptions of the handlers connected to this node (what the other nodes are told).
    pub fn local_registrations(&self) -> Vec<(String, String, handler::HandlerId, registry::Registration)> {
        self.registrations_where(handler::Destination::is_local)
    }

    fn registrations_where(
        &self,
        keep: impl Fn(&handler::Destination) -> bool,
    ) -> Vec<(String, String, handler::HandlerId, registry::Registration)> {
        let contexts: Vec<(String, Arc<ContextQueries>)> = lock(&self.inner.contexts)
            .iter()
            .map(|(name, context)| (name.clone(), context.clone()))
            .collect();
        let mut all = Vec::new();
        for (name, context) in contexts {
            let state = context.state();
            all.extend(
                state
                    .registry
                    .registrations()
                    .into_iter()
                    .filter(|(_, id, _)| state.registry.destination(*id).is_some_and(|d| keep(&d)))
                    .map(|(query, id, r)| (name.clone(), query, id, r)),
            );
        }
        all
    }

    /// Changes whenever a handler connected here subscribes, unsubscribes or goes.
    pub fn local_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.local_changes.subscribe()
    }

    pub(crate) fn next_handler_id(&self) -> handler::HandlerId {
        self.inner.next_handler.fetch_add(1, Ordering::Relaxed)
    }
}

/// The query routing of one context.
pub struct ContextQueries {
    node_name: String,
    state: Mutex<State>,
    pub metrics: QueryMetrics,
    /// The node's count of queries in flight, shared by every context.
    in_flight: Budget,
    /// The node's query bytes (`myelin.limits.query-queue-bytes`): a query in flight holds its
    /// id's bytes of it, its queued copies their encoded size.
    bytes: Budget,
    local_changes: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    registry: registry::Registry,
    in_flight: HashMap<String, dispatch::InFlight>,
    subscriptions: HashMap<String, subscription::ActiveSubscription>,
    /// Conversations of other nodes with the handlers connected here.
    relayed: HashMap<remote::RelayKey, remote::Relayed>,
}

impl ContextQueries {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// An error as Axon Server reports it in-band: code, message, this node as location.
    fn error(&self, code: ErrorCode, message: impl Into<String>) -> ErrorMessage {
        ErrorMessage {
            message: message.into(),
            location: self.node_name.clone(),
            details: Vec::new(),
            error_code: code.code().to_owned(),
        }
    }
}

/// Locks a mutex; a panic elsewhere while it was held does not poison routing for everyone.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A fresh message identifier in UUID text form (random, as Axon Server's are).
pub fn unique_id() -> String {
    use std::hash::BuildHasher;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let high = std::hash::RandomState::new().hash_one(n);
    let low = std::hash::RandomState::new().hash_one(high ^ n);
    let hex = format!("{high:016x}{low:016x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

impl ContextQueries {
    /// A handler stream subscribed a query: route it there, and let it join the open
    /// subscription queries for it.
    pub fn subscribe_handler(
        &self,
        handler: handler::HandlerId,
        destination: &handler::Destination,
        subscription: &myelin_proto::axon::query::QuerySubscription,
    ) {
        let registration = registry::Registration {
            component: subscription.component_name.clone(),
            client_id: subscription.client_id.clone(),
            result_names: std::iter::once(subscription.result_name.clone())
                .filter(|name| !name.is_empty())
                .collect(),
        };
        let added = self
            .state()
            .registry
            .subscribe(handler, destination, &subscription.query, registration);
        if destination.is_local() {
            self.local_changed();
        }
        if added {
            self.join_subscriptions(handler, destination, &subscription.query);
        }
    }

    pub fn unsubscribe_handler(&self, handler: handler::HandlerId, query: &str) {
        let local = {
            let mut state = self.state();
            let local = state.registry.destination(handler).is_some_and(|d| d.is_local());
            state.registry.unsubscribe(handler, query);
            local
        };
        if local {
            self.local_changed();
        }
    }

    /// A handler stream ended: it is no longer routed to, and the queries it had count as
    /// completed by it.
    pub async fn handler_gone(&self, handler: handler::HandlerId) {
        let local = {
            let mut state = self.state();
            let local = state.registry.destination(handler).is_some_and(|d| d.is_local());
            state.registry.remove(handler);
            local
        };
        if local {
            self.local_changed();
        }
        self.subscriptions_lost_handler(handler);
        self.relays_lost_handler(handler);
        self.queries_lost_handler(handler).await;
    }

    fn local_changed(&self) {
        self.local_changes.send_modify(|n| *n += 1);
    }
}
