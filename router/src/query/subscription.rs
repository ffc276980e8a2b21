//! Subscription queries: an initial result, then updates pushed by handlers.
//!
//! A subscription is forwarded to every handler of its query, also to handlers that subscribe
//! to the query later; an initial result is asked of one handler per component. What handlers
//! send back is relayed to the subscriber by subscription id. Updates reach the subscriber only
//! against its permits (`flow_control`); while it has none they wait in a buffer of at most
//! [`MAX_BUFFERED`] messages per call, and a subscriber that lets it overflow loses the call
//! with RESOURCE_EXHAUSTED (AXONIQ-1900) instead of growing the node's memory. When the call
//! ends, or the client unsubscribes, its handlers are told to unsubscribe.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use myelin_proto::axon::query::query_provider_inbound::Request as Inbound;
use myelin_proto::axon::query::query_provider_outbound::Request as Outbound;
use myelin_proto::axon::query::subscription_query_request::Request as ClientRequest;
use myelin_proto::axon::query::subscription_query_response::Response as Update;
use myelin_proto::axon::query::{
    QueryProviderInbound, QueryResponse, SubscriptionQuery, SubscriptionQueryRequest, SubscriptionQueryResponse,
};
use myelin_proto::errors::ErrorCode;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::ContextQueries;
use super::handler::{Destination, HandlerId, inbound};

/// Messages held for one subscriber call while it has no permits.
pub const MAX_BUFFERED: usize = 10_000;
/// Handler messages on their way to a subscriber call's task.
const SUBSCRIBER_EVENTS: usize = 256;
/// Messages waiting for the subscriber to read them.
const CLIENT_BUFFER: usize = 16;

pub type UpdateStream = mpsc::Receiver<Result<SubscriptionQueryResponse, Status>>;

/// A subscription query open on some subscriber call.
pub struct ActiveSubscription {
    query: String,
    request: SubscriptionQuery,
    subscriber: mpsc::Sender<SubscriptionQueryResponse>,
    handlers: HashSet<HandlerId>,
}

fn to_handler(request: ClientRequest) -> QueryProviderInbound {
    inbound(Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest {
        request: Some(request),
    }))
}

impl ContextQueries {
    /// Serves one `Subscription` call.
    pub fn subscription(self: &Arc<Self>, requests: Streaming<SubscriptionQueryRequest>) -> UpdateStream {
        let (out, out_rx) = mpsc::channel(CLIENT_BUFFER);
        tokio::spawn(Session::new(self.clone(), out).run(requests));
        out_rx
    }

    /// Opens a subscription on every handler of its query.
    fn open_subscription(
        &self,
        request: SubscriptionQuery,
        subscriber: mpsc::Sender<SubscriptionQueryResponse>,
    ) -> Result<(), Status> {
        let query = request
            .query_request
            .as_ref()
            .map(|q| q.query.clone())
            .unwrap_or_default();
        if query.is_empty() {
            return Err(Status::invalid_argument("a subscription query needs a query name"));
        }
        let id = request.subscription_identifier.clone();
        let mut state = self.state();
        if state.subscriptions.contains_key(&id) {
            return Err(ErrorCode::QueryDuplicated.status(format!("Subscription query {id} already present")));
        }
        let handlers = state.registry.all(&query);
        if handlers.is_empty() {
            return Err(ErrorCode::NoHandlerForQuery.status(format!("No handler for query: {query}")));
        }
        let mut reached = HashSet::new();
        for (handler, destination) in handlers {
            if destination
                .send_control(to_handler(ClientRequest::Subscribe(request.clone())))
                .is_ok()
            {
                reached.insert(handler);
            }
        }
        state.subscriptions.insert(
            id,
            ActiveSubscription {
                query,
                request,
                subscriber,
                handlers: reached,
            },
        );
        Ok(())
    }

    /// Asks one handler per component for the initial result; false if there is none.
    // `get_initial_result` is deprecated in Axon's API but still sent by older clients.
    #[allow(deprecated)]
    fn ask_initial_result(&self, request: &SubscriptionQuery) -> bool {
        let query = request
            .query_request
            .as_ref()
            .map(|q| q.query.as_str())
            .unwrap_or_default();
        let chosen = self.state().registry.pick(query);
        let mut asked = false;
        for (_, destination) in chosen {
            asked |= destination
                .send_control(to_handler(ClientRequest::GetInitialResult(request.clone())))
                .is_ok();
        }
        asked
    }

    /// Ends a subscription and tells its handlers.
    fn close_subscription(&self, id: &str) {
        let mut state = self.state();
        let Some(subscription) = state.subscriptions.remove(id) else {
            return;
        };
        for handler in &subscription.handlers {
            if let Some(destination) = state.registry.destination(*handler) {
                let _ = destination.send_control(to_handler(ClientRequest::Unsubscribe(subscription.request.clone())));
            }
        }
    }

    /// A handler began answering `query`: it joins the subscriptions already open for it.
    pub(super) fn join_subscriptions(&self, handler: HandlerId, destination: &Destination, query: &str) {
        let mut state = self.state();
        for subscription in state.subscriptions.values_mut().filter(|s| s.query == query) {
            let subscribe = to_handler(ClientRequest::Subscribe(subscription.request.clone()));
            if destination.send_control(subscribe).is_ok() {
                subscription.handlers.insert(handler);
            }
        }
    }

    pub(super) fn subscriptions_lost_handler(&self, handler: HandlerId) {
        for subscription in self.state().subscriptions.values_mut() {
            subscription.handlers.remove(&handler);
        }
    }

    /// Relays what a handler sent for a subscription; a handler sending for a subscription that
    /// is not open is told to unsubscribe.
    pub(super) async fn relay_subscription_response(&self, handler: HandlerId, response: SubscriptionQueryResponse) {
        let id = response.subscription_identifier.clone();
        if !self.state().subscriptions.contains_key(&id) && self.relays(handler, &id) {
            // A subscription another node opened on this handler: its answers go back there.
            self.relay_to_peer(handler, &id, Outbound::SubscriptionQueryResponse(response));
            return;
        }
        let ends = matches!(
            response.response,
            Some(Update::Complete(_) | Update::CompleteExceptionally(_))
        );
        let subscriber = {
            let mut state = self.state();
            let subscriber = state.subscriptions.get(&id).map(|s| s.subscriber.clone());
            if subscriber.is_some() && ends {
                state.subscriptions.remove(&id);
            }
            if subscriber.is_none()
                && let Some(destination) = state.registry.destination(handler)
            {
                let request = SubscriptionQuery {
                    subscription_identifier: id.clone(),
                    ..Default::default()
                };
                let _ = destination.send_control(to_handler(ClientRequest::Unsubscribe(request)));
            }
            subscriber
        };
        if let Some(subscriber) = subscriber {
            let _ = subscriber.send(response).await;
        }
    }
}

/// One `Subscription` call.
struct Session {
    context: Arc<ContextQueries>,
    out: mpsc::Sender<Result<SubscriptionQueryResponse, Status>>,
    events: mpsc::Sender<SubscriptionQueryResponse>,
    /// Subscriptions opened by this call and not yet closed.
    open: HashSet<String>,
    buffer: VecDeque<SubscriptionQueryResponse>,
    permits: i64,
}

impl Session {
    fn new(context: Arc<ContextQueries>, out: mpsc::Sender<Result<SubscriptionQueryResponse, Status>>) -> Session {
        let (events, _) = mpsc::channel(1);
        Session {
            context,
            out,
            events,
            open: HashSet::new(),
            buffer: VecDeque::new(),
            permits: 0,
        }
    }

    async fn run(mut self, mut requests: Streaming<SubscriptionQueryRequest>) {
        let (events, mut events_rx) = mpsc::channel(SUBSCRIBER_EVENTS);
        self.events = events;
        let out = self.out.clone();
        let failure = loop {
            // Updates need a permit each; initial results and completions only keep their order.
            let deliverable = self
                .buffer
                .front()
                .is_some_and(|r| self.permits > 0 || !matches!(r.response, Some(Update::Update(_))));
            tokio::select! {
                request = requests.message() => match request {
                    Ok(Some(request)) => {
                        if let Err(status) = self.on_request(request) {
                            break Some(status);
                        }
                    }
                    Ok(None) => break None,
                    Err(status) => {
                        tracing::debug!(%status, "subscription query call broke");
                        break None;
                    }
                },
                event = events_rx.recv() => {
                    let Some(event) = event else { break None };
                    if self.buffer.len() >= MAX_BUFFERED {
                        break Some(ErrorCode::TooManyRequests.status(format!(
                            "subscriber fell more than {MAX_BUFFERED} messages behind; subscription dropped"
                        )));
                    }
                    self.buffer.push_back(event);
                }
                permit = out.reserve(), if deliverable => {
                    let Ok(permit) = permit else { break None };
                    let Some(next) = self.buffer.pop_front() else { continue };
                    match &next.response {
                        Some(Update::Update(_)) => self.permits -= 1,
                        Some(Update::Complete(_) | Update::CompleteExceptionally(_)) => {
                            self.open.remove(&next.subscription_identifier);
                        }
                        _ => {}
                    }
                    permit.send(Ok(next));
                }
                () = out.closed() => break None,
            }
        };
        for id in std::mem::take(&mut self.open) {
            self.context.close_subscription(&id);
        }
        if let Some(status) = failure {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.out.send(Err(status))).await;
        }
    }

    #[allow(deprecated)] // get_initial_result, still sent by older clients
    fn on_request(&mut self, request: SubscriptionQueryRequest) -> Result<(), Status> {
        match request.request {
            Some(ClientRequest::Subscribe(subscribe)) => {
                let id = subscribe.subscription_identifier.clone();
                if id.is_empty() {
                    return Err(Status::invalid_argument(
                        "a subscription query needs a subscription_identifier",
                    ));
                }
                self.context.open_subscription(subscribe, self.events.clone())?;
                self.open.insert(id);
            }
            Some(ClientRequest::GetInitialResult(request)) => {
                if !self.context.ask_initial_result(&request) {
                    let query = request
                        .query_request
                        .as_ref()
                        .map(|q| q.query.as_str())
                        .unwrap_or_default();
                    let request_id = request
                        .query_request
                        .as_ref()
                        .map(|q| q.message_identifier.clone())
                        .unwrap_or_default();
                    let code = ErrorCode::NoHandlerForQuery;
                    let error = QueryResponse {
                        message_identifier: super::unique_id(),
                        error_code: code.code().to_owned(),
                        error_message: Some(self.context.error(code, format!("No handler for query: {query}"))),
                        request_identifier: request_id,
                        ..Default::default()
                    };
                    self.push(SubscriptionQueryResponse {
                        message_identifier: super::unique_id(),
                        subscription_identifier: request.subscription_identifier,
                        response: Some(Update::InitialResult(error)),
                    })?;
                }
            }
            Some(ClientRequest::FlowControl(flow)) => {
                self.permits = self.permits.saturating_add(flow.number_of_permits.max(0));
            }
            Some(ClientRequest::Unsubscribe(request)) => {
                if self.open.remove(&request.subscription_identifier) {
                    self.context.close_subscription(&request.subscription_identifier);
                }
            }
            None => return Err(ErrorCode::UnsupportedInstruction.status("Unsupported instruction")),
        }
        Ok(())
    }

    fn push(&mut self, response: SubscriptionQueryResponse) -> Result<(), Status> {
        if self.buffer.len() >= MAX_BUFFERED {
            return Err(ErrorCode::TooManyRequests.status("subscriber too far behind"));
        }
        self.buffer.push_back(response);
        Ok(())
    }
}
