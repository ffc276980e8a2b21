//! Queries in flight: scatter a query to one handler per component, gather their responses.
//!
//! A query is registered by its id under the same lock that picks its handlers, so a handler
//! that leaves is either not picked or is seen leaving (and then counts as completed). The
//! gather task owns everything else about the query: which handlers are still pending, the
//! error response held back, the deadline. It removes the query when it ends, whatever the
//! reason, so nothing stays in flight.
//!
//! A handler's stream never waits for a dispatcher: its messages are handed to the gather task
//! without blocking, and a query whose dispatcher reads so slowly that they pile up beyond
//! `GATHER_BUFFER` is ended with AXONIQ-1900 (and cancelled at its handlers) instead of stalling
//! every other query on those handler streams.
//!
//! Axon's rule for errors: a response carrying an error is held back; a later good response
//! discards it; one still held when the last handler completes is sent just before completion.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use myelin_proto::axon::query::query_provider_inbound::Request as Inbound;
use myelin_proto::axon::query::{QueryReference, QueryRequest, QueryResponse};
use myelin_proto::axon::{ProcessingKey, meta_data_value};
use myelin_proto::errors::ErrorCode;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::ContextQueries;
use super::handler::{Destination, HandlerId, SendError, inbound};

/// Deadline of a query that names none (Axon's `default-query-timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Handler messages waiting for a query's gather task.
const GATHER_BUFFER: usize = 64;
/// Responses waiting for the dispatcher to read them.
const CLIENT_BUFFER: usize = 16;

pub type ResponseStream = mpsc::Receiver<Result<QueryResponse, Status>>;

/// A query waiting for its handlers.
pub struct InFlight {
    events: mpsc::Sender<Gathered>,
    targets: Vec<HandlerId>,
    /// Cancelled when the gather task could not keep up with the handlers' messages.
    overflow: CancellationToken,
}

/// Hands a handler's message to a query's gather task without waiting.
fn hand_over(events: &mpsc::Sender<Gathered>, overflow: &CancellationToken, message: Gathered) {
    if let Err(mpsc::error::TrySendError::Full(_)) = events.try_send(message) {
        tracing::warn!("a dispatcher does not read its query responses; ending that query");
        overflow.cancel();
    }
}

enum Gathered {
    Response(Box<QueryResponse>),
    /// The handler sent `query_complete`, or disconnected.
    Done(HandlerId),
}

enum End {
    Completed,
    TimedOut,
    Cancelled,
    Overflowed,
}

impl ContextQueries {
    /// Routes `request` and returns the stream of its responses for the dispatcher.
    pub fn query(self: &Arc<Self>, request: QueryRequest) -> ResponseStream {
        let (out, out_rx) = mpsc::channel(CLIENT_BUFFER);
        let id = request.message_identifier.clone();
        let started = Instant::now();
        let timeout = timeout_of(&request);
        let (events, events_rx) = mpsc::channel(GATHER_BUFFER);
        let overflow = CancellationToken::new();
        let chosen = {
            let mut state = self.state();
            if state.in_flight.contains_key(&id) {
                Err((
                    ErrorCode::QueryDuplicated,
                    "Query with supplied ID already present".to_owned(),
                ))
            } else {
                let chosen = state.registry.pick(&request.query);
                if chosen.is_empty() {
                    Err((
                        ErrorCode::NoHandlerForQuery,
                        format!("No handler for query: {}", request.query),
                    ))
                } else {
                    let targets = chosen.iter().map(|(handler, _)| *handler).collect();
                    state.in_flight.insert(
                        id.clone(),
                        InFlight {
                            events,
                            targets,
                            overflow: overflow.clone(),
                        },
                    );
                    Ok(chosen)
                }
            }
        };
        let chosen = match chosen {
            Ok(chosen) => chosen,
            Err((code, message)) => {
                self.metrics.failed();
                let response = self.error_response(&id, code, message);
                // A fresh channel has room for one message.
                let _ = out.try_send(Ok(response));
                return out_rx;
            }
        };
        self.metrics.started();

        let mut pending = HashMap::new();
        let mut held = None;
        for (handler, destination) in chosen {
            match destination.send_query(request.clone(), started + timeout) {
                Ok(()) => {
                    pending.insert(handler, destination);
                }
                Err(SendError::QueueFull) => {
                    held = Some(self.error_response(
                        &id,
                        ErrorCode::TooManyRequests,
                        format!("Too many queries queued for a handler of {}", request.query),
                    ));
                }
                // It left between being picked and now: counts as completed.
                Err(SendError::Disconnected) => {}
            }
        }
        let context = self.clone();
        tokio::spawn(async move {
            let gather = Gather {
                context,
                id,
                pending,
                held,
                out,
                overflow,
            };
            gather.run(events_rx, started, timeout).await;
        });
        out_rx
    }

    /// A handler's response to a query it was sent; others are ignored.
    pub(super) async fn relay_response(&self, handler: HandlerId, response: QueryResponse) {
        let events = self.gatherer(handler, &response.request_identifier);
        match events {
            Some((events, overflow)) => hand_over(&events, &overflow, Gathered::Response(Box::new(response))),
            None => tracing::debug!(request_id = %response.request_identifier, "response for no query of this handler"),
        }
    }

    /// A handler's `query_complete`.
    pub(super) async fn relay_complete(&self, handler: HandlerId, request_id: &str) {
        if let Some((events, overflow)) = self.gatherer(handler, request_id) {
            hand_over(&events, &overflow, Gathered::Done(handler));
        }
    }

    /// Completes, for `handler`, every query it was sent.
    pub(super) async fn queries_lost_handler(&self, handler: HandlerId) {
        let waiting: Vec<_> = {
            let state = self.state();
            state
                .in_flight
                .values()
                .filter(|query| query.targets.contains(&handler))
                .map(|query| (query.events.clone(), query.overflow.clone()))
                .collect()
        };
        for (events, overflow) in waiting {
            hand_over(&events, &overflow, Gathered::Done(handler));
        }
    }

    fn gatherer(&self, handler: HandlerId, request_id: &str) -> Option<(mpsc::Sender<Gathered>, CancellationToken)> {
        let state = self.state();
        state
            .in_flight
            .get(request_id)
            .filter(|query| query.targets.contains(&handler))
            .map(|query| (query.events.clone(), query.overflow.clone()))
    }

    fn error_response(&self, request_id: &str, code: ErrorCode, message: String) -> QueryResponse {
        QueryResponse {
            message_identifier: super::unique_id(),
            error_code: code.code().to_owned(),
            error_message: Some(self.error(code, message)),
            request_identifier: request_id.to_owned(),
            ..Default::default()
        }
    }
}

struct Gather {
    context: Arc<ContextQueries>,
    id: String,
    pending: HashMap<HandlerId, Destination>,
    held: Option<QueryResponse>,
    out: mpsc::Sender<Result<QueryResponse, Status>>,
    overflow: CancellationToken,
}

impl Gather {
    async fn run(mut self, mut events: mpsc::Receiver<Gathered>, started: Instant, timeout: Duration) {
        let deadline = started + timeout;
        let mut done = HashSet::new();
        let end = loop {
            if self.pending.keys().all(|handler| done.contains(handler)) {
                break End::Completed;
            }
            tokio::select! {
                event = events.recv() => match event {
                    Some(Gathered::Response(response)) if !response.error_code.is_empty() => {
                        self.held = Some(*response);
                    }
                    Some(Gathered::Response(response)) => {
                        self.held = None;
                        // The deadline and an overflow still count while the dispatcher is slow.
                        tokio::select! {
                            sent = self.out.send(Ok(*response)) => if sent.is_err() { break End::Cancelled },
                            () = tokio::time::sleep_until(deadline) => break End::TimedOut,
                            () = self.overflow.cancelled() => break End::Overflowed,
                        }
                    }
                    Some(Gathered::Done(handler)) => {
                        done.insert(handler);
                    }
                    None => break End::Completed,
                },
                () = tokio::time::sleep_until(deadline) => break End::TimedOut,
                () = self.out.closed() => break End::Cancelled,
                () = self.overflow.cancelled() => break End::Overflowed,
            }
        };
        self.context.state().in_flight.remove(&self.id);
        let unfinished = self.pending.iter().filter(|(handler, _)| !done.contains(*handler));
        let cancel = !matches!(end, End::Completed);
        if cancel {
            for (_, destination) in unfinished {
                let reference = QueryReference {
                    request_id: self.id.clone(),
                };
                let _ = destination.send_control(inbound(Inbound::QueryCancel(reference)));
            }
        }
        let last = match end {
            End::Completed => self.held.take(),
            End::TimedOut => {
                self.context.metrics.timed_out();
                Some(self.context.error_response(
                    &self.id,
                    ErrorCode::QueryTimeout,
                    format!("Query cancelled due to timeout after {} ms", timeout.as_millis()),
                ))
            }
            End::Overflowed => Some(self.context.error_response(
                &self.id,
                ErrorCode::TooManyRequests,
                "Query cancelled: its responses were not read fast enough".to_owned(),
            )),
            End::Cancelled => None,
        };
        if last.as_ref().is_some_and(|response| !response.error_code.is_empty()) {
            self.context.metrics.failed();
        }
        if let Some(last) = last {
            // A dispatcher that does not read at all must not keep this task forever.
            let _ = tokio::time::timeout(Duration::from_secs(10), self.out.send(Ok(last))).await;
        }
        self.context.metrics.finished(started.elapsed());
    }
}

/// The query's TIMEOUT processing instruction (ms), else [`DEFAULT_TIMEOUT`].
fn timeout_of(request: &QueryRequest) -> Duration {
    request
        .processing_instructions
        .iter()
        .filter(|instruction| instruction.key == ProcessingKey::Timeout as i32)
        .find_map(|instruction| match instruction.value.as_ref()?.data.as_ref()? {
            meta_data_value::Data::NumberValue(ms) => u64::try_from(*ms).ok(),
            meta_data_value::Data::TextValue(ms) => ms.parse().ok(),
            _ => None,
        })
        .map_or(DEFAULT_TIMEOUT, Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::QueryRouter;
    use crate::query::handler::LocalHandler;
    use myelin_proto::axon::query::QuerySubscription;

    fn request(id: &str, timeout_ms: Option<i64>) -> QueryRequest {
        QueryRequest {
            message_identifier: id.into(),
            query: "q".into(),
            processing_instructions: timeout_ms
                .map(|ms| myelin_proto::axon::ProcessingInstruction {
                    key: ProcessingKey::Timeout as i32,
                    value: Some(myelin_proto::axon::MetaDataValue {
                        data: Some(meta_data_value::Data::NumberValue(ms)),
                    }),
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    /// Handler 7 of query "q" in component "c", with 10 permits.
    fn handler_7(context: &ContextQueries) -> (Destination, crate::query::handler::HandlerStream) {
        let (local, permits, stream) = LocalHandler::start();
        let destination = Destination::Local(local);
        let subscription = QuerySubscription {
            query: "q".into(),
            component_name: "c".into(),
            ..Default::default()
        };
        context.subscribe_handler(7, &destination, &subscription);
        permits.grant(10);
        (destination, stream)
    }

    #[tokio::test]
    async fn routes_gathers_and_counts() {
        let context = QueryRouter::new("node").context("default");
        let mut none = context.query(request("a", None));
        assert_eq!(none.recv().await.unwrap().unwrap().error_code, "AXONIQ-5000");
        assert!(none.recv().await.is_none());

        let (_destination, mut stream) = handler_7(&context);
        let mut responses = context.query(request("b", None));
        let sent = stream.messages.recv().await.unwrap().unwrap();
        assert!(matches!(sent.request, Some(Inbound::Query(q)) if q.message_identifier == "b"));
        // An error first, then a good response: the error is discarded.
        let error = context.error_response("b", ErrorCode::Other, "oops".into());
        context.relay_response(7, error).await;
        let good = QueryResponse {
            request_identifier: "b".into(),
            message_identifier: "r".into(),
            ..Default::default()
        };
        context.relay_response(8, good.clone()).await; // not this handler's query: ignored
        context.relay_response(7, good.clone()).await;
        context.relay_complete(7, "b").await;
        assert_eq!(responses.recv().await.unwrap().unwrap(), good);
        assert!(responses.recv().await.is_none());

        // An error still held when the last handler completes comes just before completion.
        let mut responses = context.query(request("c", Some(60_000)));
        stream.messages.recv().await.unwrap().unwrap();
        context
            .relay_response(7, context.error_response("c", ErrorCode::Other, "late".into()))
            .await;
        context.relay_complete(7, "c").await;
        assert_eq!(responses.recv().await.unwrap().unwrap().error_code, "AXONIQ-0001");
        assert!(responses.recv().await.is_none());

        let metrics = context.metrics.snapshot();
        assert_eq!((metrics.routed, metrics.completed, metrics.in_flight), (2, 2, 0));
        assert_eq!(metrics.failed, 2);
        assert!(context.state().in_flight.is_empty());
    }

    /// A dispatcher that does not read never stalls the handler's stream: relaying stays
    /// immediate, and the query ends with AXONIQ-1900, cancelled at its handler.
    #[tokio::test]
    async fn a_dispatcher_that_does_not_read_does_not_stall_the_handler() {
        let context = QueryRouter::new("node").context("default");
        let (_destination, mut stream) = handler_7(&context);
        let mut responses = context.query(request("slow", Some(60_000)));
        stream.messages.recv().await.unwrap().unwrap();
        let response = QueryResponse {
            request_identifier: "slow".into(),
            message_identifier: "r".into(),
            ..Default::default()
        };
        // Far more than the buffers hold; each relay must return at once.
        for _ in 0..(GATHER_BUFFER + CLIENT_BUFFER) * 4 {
            tokio::time::timeout(Duration::from_millis(500), context.relay_response(7, response.clone()))
                .await
                .expect("relaying a response never waits for the dispatcher");
        }
        // The handler is told to stop, and the dispatcher finally sees why its query ended.
        let cancel = tokio::time::timeout(Duration::from_secs(5), stream.messages.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(cancel.request, Some(Inbound::QueryCancel(r)) if r.request_id == "slow"));
        let mut last = None;
        while let Some(item) = responses.recv().await {
            last = Some(item.unwrap());
        }
        assert_eq!(last.unwrap().error_code, "AXONIQ-1900");
        assert!(context.state().in_flight.is_empty());
    }

    #[test]
    fn timeout_comes_from_the_instruction() {
        assert_eq!(timeout_of(&request("x", None)), DEFAULT_TIMEOUT);
        assert_eq!(timeout_of(&request("x", Some(500))), Duration::from_millis(500));
    }
}
