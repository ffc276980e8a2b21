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
//! Admission: a query in flight holds one of the node's [`MAX_IN_FLIGHT`] places and its id's
//! bytes of the node's query budget (`myelin.limits.query-queue-bytes`) until its gather ends;
//! without them it fails at once with AXONIQ-1900. Each response holds its encoded size of the
//! same budget from the moment its handler's stream delivers it until the dispatcher's
//! transport takes it; a response the budget cannot take ends its query with AXONIQ-1900.
//!
//! Axon's rule for errors: a response carrying an error is held back; a later good response
//! discards it; one still held when the last handler completes is sent just before completion.
//!
//! Every forwarded query carries SERVER_SUPPORTS_STREAMING: true when the dispatcher asked for a
//! streaming query (CLIENT_SUPPORTS_STREAMING=true), else false (whatever the dispatcher put
//! there), as Axon Server does.
//!
//! Deadlines. The TIMEOUT processing instruction (else [`DEFAULT_TIMEOUT`]) bounds how long the
//! query may wait in a handler's queue for a permit; one still queued then is dropped unsent and
//! counts as that handler answering AXONIQ-5006 "Timeout for message: ...". A query that reached
//! its handler and waited in the queue 10 ms or more carries the time it has left as its TIMEOUT
//! (see [`super::handler`]). A plain query also ends at that deadline, with AXONIQ-5006 and
//! `query_cancel` to the handlers that have it. A streaming query does not: like Axon Server,
//! which leaves streaming queries out of its timeout sweep, it runs until its handler completes,
//! the dispatcher cancels, or the handler goes away — its pace is the dispatcher's.
//!
//! Streaming queries. The first handler to send a good response is the one streamed; the others
//! get `query_cancel` (or, if still queued, are never sent the query). Handlers get
//! `query_flow_control` permits for the query only after it was written to their stream, so
//! they never see permits for a query they do not know. The permits follow the dispatcher's
//! demand: the router grants [`STREAM_WINDOW`] responses ahead of what the dispatcher's gRPC
//! transport has taken from the response stream (see [`super::demand`]), topping up in steps of
//! [`STREAM_REFILL`]. So at
//! most [`STREAM_WINDOW`] responses wait in the router for a slow dispatcher, however many the
//! handler has. A handler that sends more than it was granted overflows that bound: the query
//! ends with AXONIQ-1900 and `query_cancel` to the handler; nothing else is affected. A
//! dispatcher that cancels its call makes the router send `query_cancel` to the handler.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use myelin_proto::axon::query::query_provider_inbound::Request as Inbound;
use myelin_proto::axon::query::query_provider_outbound::Request as Outbound;
use myelin_proto::axon::query::{QueryComplete, QueryFlowControl, QueryReference, QueryRequest, QueryResponse};
use myelin_proto::errors::ErrorCode;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ContextQueries;
use super::demand::{self, Demand, Relayed, ResponseStream};
use super::handler::{Destination, Dispatched, HandlerId, SendError, inbound};
use super::instructions::{forwarded, timeout_of, wants_streaming};
use crate::handler_limits::Charge;

/// Deadline of a query that names none (Axon's `default-query-timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Queries in flight on this node at most (as for commands); beyond: AXONIQ-1900.
pub const MAX_IN_FLIGHT: usize = 100_000;
/// What a query in flight costs besides its id: its entry, gather task and channels.
const IN_FLIGHT_OVERHEAD: usize = 1_024;
/// Handler messages waiting for a query's gather task.
const GATHER_BUFFER: usize = 64;
/// Responses waiting for the dispatcher to read them.
const CLIENT_BUFFER: usize = 16;
/// Responses of a streaming query a handler may send beyond what the dispatcher has taken: the
/// most the router ever holds for one streaming query.
pub const STREAM_WINDOW: u64 = CLIENT_BUFFER as u64;
/// Permits are topped up once this many are due (fewer, larger flow-control messages; never
/// a stall: while they are not due, at least half a window of responses waits for the dispatcher).
pub const STREAM_REFILL: u64 = STREAM_WINDOW / 2;

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
        tracing::warn!("query responses pile up faster than they are relayed; ending that query");
        overflow.cancel();
    }
}

enum Gathered {
    /// A response with its bytes of the node's query budget.
    Response(HandlerId, Box<QueryResponse>, Charge),
    /// A response arrived that the node's query budget could not take.
    OverBudget,
    /// The handler sent `query_complete`, or disconnected.
    Done(HandlerId),
}

enum End {
    Completed,
    TimedOut,
    Cancelled,
    /// Responses came faster than they could be passed on; the text says whose fault it is.
    Overflowed(&'static str),
}

const SLOW_DISPATCHER: &str = "Query cancelled: its responses were not read fast enough";
const FLOODING_HANDLER: &str = "Query cancelled: its handler sent more responses than it was granted permits for";
const DEAF_HANDLER: &str = "Query cancelled: its handler does not read its stream";
const OVER_BUDGET: &str =
    "Query cancelled: this node holds its maximum of query bytes (myelin.limits.query-queue-bytes)";

/// One handler a query was routed to.
struct Target {
    destination: Destination,
    stage: Stage,
    /// Permits granted to it for this query (streaming queries only).
    granted: u64,
}

enum Stage {
    /// In the handler's queue; the receiver learns when it is sent or expires.
    Queued(oneshot::Receiver<Dispatched>),
    /// On the handler's stream.
    Sent,
    /// Completed, disconnected, expired, or cancelled by the router: nothing more expected.
    Done,
}

/// What woke the gather task.
enum Step {
    Event(Option<Gathered>),
    Dispatch(HandlerId, Option<Dispatched>),
    DispatchDeadline,
    Deadline,
    Demand,
    DispatcherGone,
    Overflowed,
}

impl ContextQueries {
    /// Routes `request` and returns the stream of its responses for the dispatcher.
    pub fn query(self: &Arc<Self>, request: QueryRequest) -> ResponseStream {
        let (out, out_rx) = mpsc::channel(CLIENT_BUFFER);
        let streaming = wants_streaming(&request);
        let demand = streaming.then(|| Arc::new(Demand::default()));
        let stream = ResponseStream::new(out_rx, demand.clone());
        let id = request.message_identifier.clone();
        let started = Instant::now();
        let timeout = timeout_of(&request);
        let (events, events_rx) = mpsc::channel(GATHER_BUFFER);
        let overflow = CancellationToken::new();
        // A query in flight holds one unit of the node's count and its id's bytes until it ends.
        let admission = match (
            self.in_flight.try_charge(1),
            self.bytes.try_charge(id.len() + IN_FLIGHT_OVERHEAD),
        ) {
            (Some(count), Some(bytes)) => Ok([count, bytes]),
            (None, _) => Err("Too many queries in flight on this node".to_owned()),
            (_, None) => {
                Err("Too many query bytes in flight on this node (myelin.limits.query-queue-bytes)".to_owned())
            }
        };
        let chosen = {
            let mut state = self.state();
            if let Err(message) = &admission {
                Err((ErrorCode::TooManyRequests, message.clone()))
            } else if state.in_flight.contains_key(&id) {
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
                let _ = out.try_send((Ok(response), None));
                return stream;
            }
        };
        self.metrics.started();
        if streaming {
            self.metrics.streamed();
        }

        let query_name = request.query.clone();
        let forwarded = forwarded(request, streaming);
        let mut targets = HashMap::new();
        let mut held = None;
        for (handler, destination) in chosen {
            match destination.send_query(forwarded.clone(), started + timeout) {
                Ok(dispatched) => {
                    let stage = Stage::Queued(dispatched);
                    targets.insert(
                        handler,
                        Target {
                            destination,
                            stage,
                            granted: 0,
                        },
                    );
                }
                Err(SendError::QueueFull) => {
                    held = Some(self.error_response(
                        &id,
                        ErrorCode::TooManyRequests,
                        format!("Too many queries queued for a handler of {query_name}"),
                    ));
                }
                Err(SendError::QueueBytesFull) => {
                    held = Some(self.error_response(
                        &id,
                        ErrorCode::TooManyRequests,
                        format!(
                            "Too many query bytes queued for a handler of {query_name} \
                             (myelin.limits.query-queue-bytes-per-client)"
                        ),
                    ));
                }
                Err(SendError::NodeBytesFull) => {
                    held = Some(self.error_response(
                        &id,
                        ErrorCode::TooManyRequests,
                        "Too many query bytes queued on this node (myelin.limits.query-queue-bytes)".to_owned(),
                    ));
                }
                // It left between being picked and now: counts as completed.
                Err(SendError::Disconnected) => {}
            }
        }
        let gather = Gather {
            _admission: admission.expect("admitted, or it returned above"),
            context: self.clone(),
            id,
            targets,
            held,
            out,
            overflow,
            started,
            timeout,
            demand,
            chosen: None,
        };
        tokio::spawn(gather.run(events_rx));
        stream
    }

    /// A handler's response to a query it was sent; others are ignored.
    pub(super) async fn relay_response(&self, handler: HandlerId, response: QueryResponse) {
        let events = self.gatherer(handler, &response.request_identifier);
        match events {
            Some((events, overflow)) => {
                // Held from here until the dispatcher's transport takes it: responses a slow
                // dispatcher leaves waiting are bounded in bytes, not only in number.
                let message = match self.bytes.try_charge(response.encoded_len()) {
                    Some(charge) => Gathered::Response(handler, Box::new(response), charge),
                    None => Gathered::OverBudget,
                };
                hand_over(&events, &overflow, message);
            }
            None => {
                let id = response.request_identifier.clone();
                if !self.relay_to_peer(handler, &id, Outbound::QueryResponse(response)) {
                    tracing::debug!(request_id = %id, "response for no query of this handler");
                }
            }
        }
    }

    /// A handler's `query_complete`.
    pub(super) async fn relay_complete(&self, handler: HandlerId, request_id: &str) {
        if let Some((events, overflow)) = self.gatherer(handler, request_id) {
            hand_over(&events, &overflow, Gathered::Done(handler));
        } else {
            let complete = QueryComplete {
                message_id: super::unique_id(),
                request_id: request_id.to_owned(),
            };
            self.relay_to_peer(handler, request_id, Outbound::QueryComplete(complete));
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

    pub(super) fn error_response(&self, request_id: &str, code: ErrorCode, message: String) -> QueryResponse {
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
    /// The query's share of the node's count and bytes, returned when the gather ends.
    _admission: [Charge; 2],
    context: Arc<ContextQueries>,
    id: String,
    targets: HashMap<HandlerId, Target>,
    held: Option<QueryResponse>,
    out: mpsc::Sender<Relayed>,
    overflow: CancellationToken,
    started: Instant,
    timeout: Duration,
    /// Set for a streaming query: the dispatcher's demand.
    demand: Option<Arc<Demand>>,
    /// The handler whose responses a streaming query streams, once one answered.
    chosen: Option<HandlerId>,
}

impl Gather {
    async fn run(mut self, mut events: mpsc::Receiver<Gathered>) {
        let deadline = self.started + self.timeout;
        let streaming = self.demand.is_some();
        let demand = self.demand.clone();
        let end = loop {
            if self.targets.values().all(|target| matches!(target.stage, Stage::Done)) {
                break End::Completed;
            }
            let queued = self
                .targets
                .values()
                .any(|target| matches!(target.stage, Stage::Queued(_)));
            let step = tokio::select! {
                event = events.recv() => Step::Event(event),
                (handler, dispatched) = next_dispatch(&mut self.targets), if queued => Step::Dispatch(handler, dispatched),
                () = tokio::time::sleep_until(deadline), if streaming && queued => Step::DispatchDeadline,
                () = tokio::time::sleep_until(deadline), if !streaming => Step::Deadline,
                () = demand::changed(demand.as_deref()), if streaming => Step::Demand,
                () = self.out.closed() => Step::DispatcherGone,
                () = self.overflow.cancelled() => Step::Overflowed,
            };
            let outcome = match step {
                Step::Event(Some(Gathered::Response(handler, response, charge))) => {
                    self.on_response(handler, *response, charge, deadline).await
                }
                Step::Event(Some(Gathered::OverBudget)) => Err(End::Overflowed(OVER_BUDGET)),
                Step::Event(Some(Gathered::Done(handler))) => {
                    self.finish(handler);
                    Ok(())
                }
                Step::Event(None) => Err(End::Completed),
                Step::Dispatch(handler, Some(Dispatched::Sent)) => self.reached(handler),
                Step::Dispatch(handler, Some(Dispatched::Expired { overdue })) => {
                    self.expired(handler, overdue);
                    Ok(())
                }
                // The handler's queue went away with the handler.
                Step::Dispatch(handler, None) => {
                    self.finish(handler);
                    Ok(())
                }
                Step::DispatchDeadline => {
                    let overdue = Instant::now().saturating_duration_since(deadline);
                    let queued: Vec<HandlerId> = self
                        .targets
                        .iter()
                        .filter(|(_, target)| matches!(target.stage, Stage::Queued(_)))
                        .map(|(handler, _)| *handler)
                        .collect();
                    for handler in queued {
                        self.expired(handler, overdue);
                    }
                    Ok(())
                }
                Step::Deadline => Err(End::TimedOut),
                Step::Demand => self.top_up(),
                Step::DispatcherGone => Err(End::Cancelled),
                Step::Overflowed => Err(End::Overflowed(if streaming {
                    FLOODING_HANDLER
                } else {
                    SLOW_DISPATCHER
                })),
            };
            if let Err(end) = outcome {
                break end;
            }
        };
        self.end(end).await;
    }

    /// A response from one of the query's handlers.
    async fn on_response(
        &mut self,
        handler: HandlerId,
        response: QueryResponse,
        charge: Charge,
        deadline: Instant,
    ) -> Result<(), End> {
        self.reached(handler)?;
        let Some(target) = self.targets.get(&handler) else {
            return Ok(());
        };
        // A handler that completed, or was told to stop, has nothing more to say.
        if matches!(target.stage, Stage::Done) {
            return Ok(());
        }
        if !response.error_code.is_empty() {
            self.held = Some(response);
            return Ok(());
        }
        self.held = None;
        if self.demand.is_none() {
            // The deadline and an overflow still count while the dispatcher is slow.
            return tokio::select! {
                sent = self.out.send((Ok(response), Some(charge))) => if sent.is_err() { Err(End::Cancelled) } else { Ok(()) },
                () = tokio::time::sleep_until(deadline) => Err(End::TimedOut),
                () = self.overflow.cancelled() => Err(End::Overflowed(SLOW_DISPATCHER)),
            };
        }
        if self.chosen.is_none() {
            self.chosen = Some(handler);
            self.stop_all_but(handler);
        }
        // Within its permits a handler always finds room: see STREAM_WINDOW.
        match self.out.try_send((Ok(response), Some(charge))) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(query = %self.id, "a streaming query's handler ignores its permits; ending that query");
                Err(End::Overflowed(FLOODING_HANDLER))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(End::Cancelled),
        }
    }

    /// The query is on `handler`'s stream (its report may still be on its way when the
    /// handler's answer arrives): a streaming query's handler gets its first permits now.
    fn reached(&mut self, handler: HandlerId) -> Result<(), End> {
        if let Some(target) = self.targets.get_mut(&handler)
            && matches!(target.stage, Stage::Queued(_))
        {
            target.stage = Stage::Sent;
            return self.top_up();
        }
        Ok(())
    }

    fn finish(&mut self, handler: HandlerId) {
        if let Some(target) = self.targets.get_mut(&handler) {
            target.stage = Stage::Done;
        }
    }

    /// `handler` never got the query: it waited for a permit past its deadline.
    fn expired(&mut self, handler: HandlerId, overdue: Duration) {
        self.finish(handler);
        let left = -i64::try_from(overdue.as_millis()).unwrap_or(i64::MAX);
        let message = format!("Timeout for message: {} - {left}ms", self.id);
        self.held = Some(self.context.error_response(&self.id, ErrorCode::QueryTimeout, message));
    }

    /// Streaming: the first handler to answer is the one; the others stop (or never start).
    fn stop_all_but(&mut self, chosen: HandlerId) {
        for (handler, target) in &mut self.targets {
            if *handler == chosen {
                continue;
            }
            if matches!(target.stage, Stage::Sent) {
                let _ = target.destination.send_control(cancel(&self.id));
            }
            // Dropping a queued query's report makes its handler's queue skip it.
            target.stage = Stage::Done;
        }
    }

    /// Streaming: grants every handler that has the query (only the chosen one, once there is
    /// one) permits up to STREAM_WINDOW beyond what the dispatcher has taken.
    fn top_up(&mut self) -> Result<(), End> {
        let Some(demand) = &self.demand else {
            return Ok(());
        };
        let due_total = STREAM_WINDOW.saturating_add(demand.taken());
        for (handler, target) in &mut self.targets {
            if !matches!(target.stage, Stage::Sent) || self.chosen.is_some_and(|chosen| chosen != *handler) {
                continue;
            }
            let due = due_total.saturating_sub(target.granted);
            if due == 0 || (target.granted > 0 && due < STREAM_REFILL) {
                continue;
            }
            match target.destination.send_control(flow_control(&self.id, due)) {
                Ok(()) => target.granted = due_total,
                Err(SendError::QueueFull | SendError::QueueBytesFull | SendError::NodeBytesFull) => {
                    return Err(End::Overflowed(DEAF_HANDLER));
                }
                // It is leaving; its departure completes it.
                Err(SendError::Disconnected) => {}
            }
        }
        Ok(())
    }

    async fn end(mut self, end: End) {
        self.context.state().in_flight.remove(&self.id);
        if !matches!(end, End::Completed) {
            // Queued ones are skipped by their queues once the reports drop with `self`.
            for target in self
                .targets
                .values()
                .filter(|target| matches!(target.stage, Stage::Sent))
            {
                let _ = target.destination.send_control(cancel(&self.id));
            }
        }
        let last = match end {
            End::Completed => self.held.take(),
            End::TimedOut => Some(self.context.error_response(
                &self.id,
                ErrorCode::QueryTimeout,
                format!("Query cancelled due to timeout after {} ms", self.timeout.as_millis()),
            )),
            End::Overflowed(reason) => Some(self.context.error_response(
                &self.id,
                ErrorCode::TooManyRequests,
                reason.to_owned(),
            )),
            End::Cancelled => None,
        };
        let metrics = &self.context.metrics;
        if let Some(last) = &last {
            if !last.error_code.is_empty() {
                metrics.failed();
            }
            if last.error_code == ErrorCode::QueryTimeout.code() {
                metrics.timed_out();
            }
        }
        if let Some(last) = last {
            // A dispatcher that does not read at all must not keep this task forever.
            let _ = tokio::time::timeout(Duration::from_secs(10), self.out.send((Ok(last), None))).await;
        }
        metrics.finished(self.started.elapsed());
    }
}

/// Resolves when a queued query of one of the targets was sent, expired, or lost its queue.
fn next_dispatch(
    targets: &mut HashMap<HandlerId, Target>,
) -> impl Future<Output = (HandlerId, Option<Dispatched>)> + '_ {
    futures::future::poll_fn(move |cx| {
        for (handler, target) in targets.iter_mut() {
            if let Stage::Queued(report) = &mut target.stage
                && let Poll::Ready(result) = Pin::new(report).poll(cx)
            {
                return Poll::Ready((*handler, result.ok()));
            }
        }
        Poll::Pending
    })
}

pub(super) fn cancel(request_id: &str) -> myelin_proto::axon::query::QueryProviderInbound {
    inbound(Inbound::QueryCancel(QueryReference {
        request_id: request_id.to_owned(),
    }))
}

fn flow_control(request_id: &str, permits: u64) -> myelin_proto::axon::query::QueryProviderInbound {
    inbound(Inbound::QueryFlowControl(QueryFlowControl {
        query_reference: Some(QueryReference {
            request_id: request_id.to_owned(),
        }),
        permits: i64::try_from(permits).unwrap_or(i64::MAX),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::QueryRouter;
    use crate::query::handler::{HandlerStream, LocalHandler, Permits};
    use crate::query::instructions::forwarded;
    use myelin_proto::axon::SerializedObject;
    use myelin_proto::axon::query::{QueryProviderInbound, QuerySubscription};
    use myelin_proto::axon::{MetaDataValue, ProcessingInstruction, ProcessingKey, meta_data_value};

    const WAIT: Duration = Duration::from_secs(5);

    fn instructions(timeout_ms: Option<i64>, streaming: bool) -> Vec<ProcessingInstruction> {
        let mut all: Vec<ProcessingInstruction> = timeout_ms
            .map(|ms| ProcessingInstruction {
                key: ProcessingKey::Timeout as i32,
                value: Some(MetaDataValue {
                    data: Some(meta_data_value::Data::NumberValue(ms)),
                }),
            })
            .into_iter()
            .collect();
        if streaming {
            all.push(ProcessingInstruction {
                key: ProcessingKey::ClientSupportsStreaming as i32,
                value: Some(MetaDataValue {
                    data: Some(meta_data_value::Data::BooleanValue(true)),
                }),
            });
        }
        all
    }

    fn request(id: &str, timeout_ms: Option<i64>) -> QueryRequest {
        QueryRequest {
            message_identifier: id.into(),
            query: "q".into(),
            processing_instructions: instructions(timeout_ms, false),
            ..Default::default()
        }
    }

    fn streaming_request(id: &str, timeout_ms: Option<i64>) -> QueryRequest {
        QueryRequest {
            processing_instructions: instructions(timeout_ms, true),
            ..request(id, None)
        }
    }

    /// Handler `id` of query "q" in `component`, with `permits`.
    fn handler(
        context: &ContextQueries,
        id: HandlerId,
        component: &str,
        permits: i64,
    ) -> (Destination, HandlerStream, Arc<Permits>) {
        let (local, granted, stream) = LocalHandler::start();
        let destination = Destination::Local(local);
        let subscription = QuerySubscription {
            query: "q".into(),
            component_name: component.into(),
            result_name: format!("{component}.Result"),
            ..Default::default()
        };
        context.subscribe_handler(id, &destination, &subscription);
        granted.grant(permits);
        (destination, stream, granted)
    }

    /// Handler 7 of query "q" in component "c", with 10 permits.
    fn handler_7(context: &ContextQueries) -> (Destination, HandlerStream) {
        let (destination, stream, _) = handler(context, 7, "c", 10);
        (destination, stream)
    }

    async fn next(stream: &mut HandlerStream) -> Inbound {
        tokio::time::timeout(WAIT, stream.messages.recv())
            .await
            .expect("the handler waited too long")
            .expect("handler stream ended")
            .unwrap()
            .request
            .expect("an empty message")
    }

    async fn next_query(stream: &mut HandlerStream) -> QueryRequest {
        match next(stream).await {
            Inbound::Query(query) => query,
            other => panic!("expected a query, got {other:?}"),
        }
    }

    async fn quiet(stream: &mut HandlerStream) {
        let nothing = tokio::time::timeout(Duration::from_millis(100), stream.messages.recv()).await;
        assert!(nothing.is_err(), "unexpected message to the handler: {nothing:?}");
    }

    fn flag(query: &QueryRequest, key: ProcessingKey) -> Vec<bool> {
        query
            .processing_instructions
            .iter()
            .filter(|i| i.key == key as i32)
            .filter_map(|i| match i.value.as_ref()?.data.as_ref()? {
                meta_data_value::Data::BooleanValue(b) => Some(*b),
                _ => None,
            })
            .collect()
    }

    fn response(request_id: &str, n: u32) -> QueryResponse {
        QueryResponse {
            request_identifier: request_id.into(),
            message_identifier: format!("r{n}"),
            payload: Some(SerializedObject {
                r#type: "n".into(),
                revision: String::new(),
                data: n.to_string().into_bytes().into(),
            }),
            ..Default::default()
        }
    }

    fn number(response: &QueryResponse) -> u32 {
        String::from_utf8(response.payload.as_ref().unwrap().data.to_vec())
            .unwrap()
            .parse()
            .unwrap()
    }

    async fn take(responses: &mut ResponseStream) -> QueryResponse {
        tokio::time::timeout(WAIT, responses.recv())
            .await
            .expect("the dispatcher waited too long")
            .expect("the query ended")
            .unwrap()
    }

    /// Reads the response stream to its end; returns the last message.
    async fn last(mut responses: ResponseStream) -> QueryResponse {
        let mut last = None;
        while let Some(item) = tokio::time::timeout(WAIT, responses.recv()).await.unwrap() {
            last = Some(item.unwrap());
        }
        last.expect("no response at all")
    }

    #[tokio::test]
    async fn routes_gathers_and_counts() {
        let context = QueryRouter::new("node").context("default");
        let mut none = context.query(request("a", None));
        assert_eq!(none.recv().await.unwrap().unwrap().error_code, "AXONIQ-5000");
        assert!(none.recv().await.is_none());

        let (_destination, mut stream) = handler_7(&context);
        let mut responses = context.query(request("b", None));
        let sent = next_query(&mut stream).await;
        assert_eq!(sent.message_identifier, "b");
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
        next_query(&mut stream).await;
        context
            .relay_response(7, context.error_response("c", ErrorCode::Other, "late".into()))
            .await;
        context.relay_complete(7, "c").await;
        assert_eq!(responses.recv().await.unwrap().unwrap().error_code, "AXONIQ-0001");
        assert!(responses.recv().await.is_none());

        let metrics = context.metrics.snapshot();
        assert_eq!((metrics.routed, metrics.completed, metrics.in_flight), (2, 2, 0));
        assert_eq!((metrics.failed, metrics.streaming), (2, 0));
        assert!(context.state().in_flight.is_empty());
    }

    /// The node's count of queries in flight: one beyond it fails at once with AXONIQ-1900,
    /// and the unit returns when a query ends.
    #[tokio::test]
    async fn queries_in_flight_are_bounded() {
        let context = QueryRouter::new("node").with_max_in_flight(1).context("default");
        let (_destination, mut stream) = handler_7(&context);
        let mut first = context.query(request("first", Some(60_000)));
        next_query(&mut stream).await;
        let mut refused = context.query(request("second", Some(60_000)));
        let answer = refused.recv().await.unwrap().unwrap();
        assert_eq!(answer.error_code, "AXONIQ-1900");
        assert_eq!(
            answer.error_message.unwrap().message,
            "Too many queries in flight on this node"
        );
        context.relay_complete(7, "first").await;
        assert!(tokio::time::timeout(WAIT, first.recv()).await.unwrap().is_none());
        // Ended: its unit is back.
        let _third = context.query(request("third", Some(60_000)));
        assert_eq!(next_query(&mut stream).await.message_identifier, "third");
    }

    /// A dispatcher that does not read never stalls the handler's stream: relaying stays
    /// immediate, and the query ends with AXONIQ-1900, cancelled at its handler.
    #[tokio::test]
    async fn a_dispatcher_that_does_not_read_does_not_stall_the_handler() {
        let context = QueryRouter::new("node").context("default");
        let (_destination, mut stream) = handler_7(&context);
        let responses = context.query(request("slow", Some(60_000)));
        next_query(&mut stream).await;
        // Far more than the buffers hold; each relay must return at once.
        for n in 0..(GATHER_BUFFER + CLIENT_BUFFER) as u32 * 4 {
            tokio::time::timeout(
                Duration::from_millis(500),
                context.relay_response(7, response("slow", n)),
            )
            .await
            .expect("relaying a response never waits for the dispatcher");
        }
        // The handler is told to stop, and the dispatcher finally sees why its query ended.
        match next(&mut stream).await {
            Inbound::QueryCancel(reference) => assert_eq!(reference.request_id, "slow"),
            other => panic!("expected query_cancel, got {other:?}"),
        }
        let last = last(responses).await;
        assert_eq!(last.error_code, "AXONIQ-1900");
        assert_eq!(last.error_message.unwrap().message, SLOW_DISPATCHER);
        assert!(context.state().in_flight.is_empty());
    }

    /// Responses waiting for a dispatcher hold their bytes of the node's query budget until
    /// the dispatcher takes them; one the budget cannot take ends the query with AXONIQ-1900
    /// and cancels it at its handler.
    #[tokio::test]
    async fn responses_waiting_for_the_dispatcher_are_bounded_in_bytes() {
        let limits = crate::handler_limits::HandlerLimits {
            query_queue_bytes: 64 << 10,
            ..Default::default()
        };
        let router = QueryRouter::new("node").with_limits(limits);
        let context = router.context("default");
        let (_destination, mut stream) = handler_7(&context);
        let mut responses = context.query(request("big", Some(60_000)));
        next_query(&mut stream).await;
        let held = router.queued_bytes();
        let mut big = response("big", 1);
        big.payload.as_mut().unwrap().data = vec![b'7'; 20 << 10].into();
        context.relay_response(7, big.clone()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            router.queued_bytes() >= held + (20 << 10),
            "a waiting response holds its bytes"
        );
        assert_eq!(take(&mut responses).await.payload, big.payload);
        assert_eq!(router.queued_bytes(), held, "taken: its bytes are back");
        // Four more of 20 KiB while the dispatcher reads nothing: the fourth does not fit.
        for _ in 0..4 {
            context.relay_response(7, big.clone()).await;
        }
        match next(&mut stream).await {
            Inbound::QueryCancel(reference) => assert_eq!(reference.request_id, "big"),
            other => panic!("expected query_cancel, got {other:?}"),
        }
        let last = last(responses).await;
        assert_eq!(last.error_code, "AXONIQ-1900");
        assert_eq!(last.error_message.unwrap().message, OVER_BUDGET);
        assert_eq!(router.queued_bytes(), 0, "nothing is held once the query ended");
    }

    /// Handlers of a plain query hear that the server does not stream it, whatever the
    /// dispatcher claimed about the server.
    #[tokio::test]
    async fn plain_queries_say_the_server_does_not_stream() {
        let context = QueryRouter::new("node").context("default");
        let (_destination, mut stream) = handler_7(&context);
        let claimed = forwarded(request("plain", Some(1_000)), true);
        let _responses = context.query(claimed);
        let sent = next_query(&mut stream).await;
        assert_eq!(flag(&sent, ProcessingKey::ServerSupportsStreaming), [false]);
        assert!(!wants_streaming(&sent));
    }

    /// The heart of streaming: first answer wins, the other handler is cancelled, permits follow
    /// what the dispatcher takes and never run more than STREAM_WINDOW ahead of it, responses
    /// arrive in order, and the query completes with the handler.
    #[tokio::test]
    async fn a_streaming_query_follows_the_dispatchers_demand() {
        let context = QueryRouter::new("node").context("default");
        let (_a, mut first, _) = handler(&context, 7, "first", 10);
        let (_b, mut second, _) = handler(&context, 8, "second", 10);
        let mut responses = context.query(streaming_request("s", None));

        // Both get the query, then (never before it) their first permits.
        let mut granted = HashMap::new();
        for (id, stream) in [(7, &mut first), (8, &mut second)] {
            let query = next_query(stream).await;
            assert_eq!(flag(&query, ProcessingKey::ServerSupportsStreaming), [true]);
            match next(stream).await {
                Inbound::QueryFlowControl(flow) => {
                    assert_eq!(flow.query_reference.unwrap().request_id, "s");
                    granted.insert(id, flow.permits as u64);
                }
                other => panic!("expected query_flow_control, got {other:?}"),
            }
        }
        assert_eq!(granted[&7], STREAM_WINDOW);

        // The first to answer is streamed; the other is cancelled.
        let mut sent = 0u32;
        while u64::from(sent) < granted[&7] {
            context.relay_response(7, response("s", sent)).await;
            sent += 1;
        }
        match next(&mut second).await {
            Inbound::QueryCancel(reference) => assert_eq!(reference.request_id, "s"),
            other => panic!("expected query_cancel, got {other:?}"),
        }
        // Answers of the cancelled handler are not relayed.
        context.relay_response(8, response("s", 999)).await;

        // Nothing taken yet: no more permits.
        quiet(&mut first).await;
        let total = 100u32;
        let mut taken = 0u32;
        let grant = |message: QueryProviderInbound, granted: &mut u64| {
            let Some(Inbound::QueryFlowControl(flow)) = message.request else {
                panic!("expected query_flow_control, got {message:?}")
            };
            assert!(flow.permits as u64 >= STREAM_REFILL, "{flow:?}");
            *granted += flow.permits as u64;
        };
        while taken < total {
            if sent == taken {
                // Nothing left to take: a grant must be on its way.
                let message = tokio::time::timeout(WAIT, first.messages.recv()).await.unwrap();
                grant(message.unwrap().unwrap(), granted.get_mut(&7).unwrap());
            } else {
                let got = take(&mut responses).await;
                assert_eq!(number(&got), taken, "responses in order");
                taken += 1;
            }
            while let Ok(message) = first.messages.try_recv() {
                grant(message.unwrap(), granted.get_mut(&7).unwrap());
            }
            // Permits arrive in steps; never more than a window ahead of what was taken.
            assert!(
                granted[&7] <= u64::from(taken) + STREAM_WINDOW,
                "{granted:?} after {taken}"
            );
            while sent < total && u64::from(sent) < granted[&7] {
                context.relay_response(7, response("s", sent)).await;
                sent += 1;
            }
        }
        context.relay_complete(7, "s").await;
        assert!(tokio::time::timeout(WAIT, responses.recv()).await.unwrap().is_none());
        quiet(&mut second).await;

        let metrics = context.metrics.snapshot();
        assert_eq!((metrics.routed, metrics.streaming, metrics.completed), (1, 1, 1));
        assert_eq!((metrics.failed, metrics.in_flight), (0, 0));
        assert!(context.state().in_flight.is_empty());
    }

    /// A streaming handler that ignores its permits fills the window: the query ends with
    /// AXONIQ-1900 and the handler is cancelled; the next query is served normally.
    #[tokio::test]
    async fn a_streaming_handler_that_floods_is_stopped() {
        let context = QueryRouter::new("node").context("default");
        let (_a, mut stream, _) = handler(&context, 7, "c", 10);
        let responses = context.query(streaming_request("flood", None));
        next_query(&mut stream).await;
        assert!(matches!(next(&mut stream).await, Inbound::QueryFlowControl(_)));
        for n in 0..(STREAM_WINDOW as u32 + 1) {
            context.relay_response(7, response("flood", n)).await;
        }
        match next(&mut stream).await {
            Inbound::QueryCancel(reference) => assert_eq!(reference.request_id, "flood"),
            other => panic!("expected query_cancel, got {other:?}"),
        }
        let last = last(responses).await;
        assert_eq!(last.error_code, "AXONIQ-1900");
        assert_eq!(last.error_message.unwrap().message, FLOODING_HANDLER);
        assert_eq!(context.metrics.snapshot().failed, 1);

        let mut responses = context.query(request("after", None));
        next_query(&mut stream).await;
        context.relay_response(7, response("after", 1)).await;
        context.relay_complete(7, "after").await;
        assert_eq!(number(&take(&mut responses).await), 1);
    }

    /// The dispatcher going away cancels the query at its handler.
    #[tokio::test]
    async fn a_dispatcher_cancel_reaches_the_streaming_handler() {
        let context = QueryRouter::new("node").context("default");
        let (_a, mut stream, _) = handler(&context, 7, "c", 10);
        let mut responses = context.query(streaming_request("bye", None));
        next_query(&mut stream).await;
        assert!(matches!(next(&mut stream).await, Inbound::QueryFlowControl(_)));
        context.relay_response(7, response("bye", 0)).await;
        take(&mut responses).await;
        drop(responses);
        match next(&mut stream).await {
            Inbound::QueryCancel(reference) => assert_eq!(reference.request_id, "bye"),
            other => panic!("expected query_cancel, got {other:?}"),
        }
        assert!(context.state().in_flight.is_empty());
    }

    /// A streaming query has no overall deadline once its handler has it, but one that waits
    /// for permits past its TIMEOUT fails with AXONIQ-5006 and is never sent.
    #[tokio::test]
    async fn streaming_deadlines_bound_the_queue_only() {
        let context = QueryRouter::new("node").context("default");
        let (_a, mut stream, permits) = handler(&context, 7, "c", 1);
        let mut running = context.query(streaming_request("running", Some(100)));
        next_query(&mut stream).await;
        assert!(matches!(next(&mut stream).await, Inbound::QueryFlowControl(_)));
        let queued = context.query(streaming_request("queued", Some(100)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let expired = last(queued).await;
        assert_eq!(expired.error_code, "AXONIQ-5006");
        let message = expired.error_message.unwrap().message;
        assert!(message.starts_with("Timeout for message: queued - "), "{message}");
        permits.grant(5);
        quiet(&mut stream).await; // the expired query is never sent

        // The running one still streams, past its TIMEOUT.
        context.relay_response(7, response("running", 0)).await;
        assert_eq!(number(&take(&mut running).await), 0);
        context.relay_complete(7, "running").await;
        assert!(tokio::time::timeout(WAIT, running.recv()).await.unwrap().is_none());
        assert_eq!(context.metrics.snapshot().timed_out, 1);
    }

    /// Result names do not filter: a query expecting one response type reaches handlers that
    /// subscribed with others (the handling application chooses; Axon Server does the same).
    #[tokio::test]
    async fn the_expected_response_type_does_not_filter_handlers() {
        let context = QueryRouter::new("node").context("default");
        let (_a, mut first, _) = handler(&context, 7, "first", 10);
        let (_b, mut second, _) = handler(&context, 8, "second", 10);
        #[allow(deprecated)]
        let typed = QueryRequest {
            response_type: Some(SerializedObject {
                r#type: "first.Result".into(),
                ..Default::default()
            }),
            ..request("typed", None)
        };
        let _responses = context.query(typed);
        assert_eq!(next_query(&mut first).await.message_identifier, "typed");
        assert_eq!(next_query(&mut second).await.message_identifier, "typed");
        assert_eq!(
            context
                .state()
                .registry
                .result_names("q")
                .into_iter()
                .collect::<Vec<_>>(),
            ["first.Result", "second.Result"]
        );
    }
}
