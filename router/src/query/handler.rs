//! How a message reaches a query handler.
//!
//! The registry only knows handlers by [`HandlerId`] and a [`Destination`]; what stands behind a
//! destination is this module's business. Today the only kind is a handler connected to this
//! node by an `OpenStream` call ([`LocalHandler`]); a handler on another node of the cluster will
//! be a second variant that forwards over the node-to-node connection.
//!
//! A local handler has two queues in front of its gRPC stream: queries, sent only while the
//! handler has granted permits (Axon's flow control) and bounded at [`QUERY_QUEUE`]; and control
//! messages (acks, cancels, per-query flow control, subscription-query requests), sent without
//! permits. One task writes both to the stream, so a control message queued after a query was
//! reported [`Dispatched::Sent`] reaches the handler after that query.
//!
//! Every queued query comes with a report channel that says what became of it
//! ([`Dispatched`]). When the query is taken from the queue:
//! - nobody listens to the report any more (its query ended meanwhile): it is dropped unsent and
//!   uses no permit;
//! - its deadline passed: it is dropped unsent and reported [`Dispatched::Expired`] (the caller
//!   answers AXONIQ-5006, as Axon Server does);
//! - else it is sent; if it waited [`REQUEUE_ADJUST`] or longer, its TIMEOUT processing
//!   instruction is rewritten to the time it has left (Axon Server does the same), so the handler
//!   does not work on it longer than its dispatcher waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use std::time::Duration;

use myelin_proto::axon::query::query_provider_inbound::Request as Inbound;
use myelin_proto::axon::query::{QueryProviderInbound, QueryRequest};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tonic::Status;

/// Queries waiting for a handler's permits (Axon Server's queue size).
pub const QUERY_QUEUE: usize = 10_000;
/// A query that waited this long for a permit is sent with its TIMEOUT set to the time it has
/// left (Axon Server's threshold).
pub const REQUEUE_ADJUST: Duration = Duration::from_millis(10);
/// Control messages waiting to be written to a handler's stream.
const CONTROL_QUEUE: usize = 1_024;
/// Messages between the pump and tonic's writer.
const STREAM_BUFFER: usize = 16;

/// Identifies one handler stream on this node for as long as the router runs.
pub type HandlerId = u64;

/// Why a message could not be handed to a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// Its queue is full: the handler is slower than its dispatchers.
    QueueFull,
    /// The handler is gone.
    Disconnected,
}

impl<T> From<mpsc::error::TrySendError<T>> for SendError {
    fn from(error: mpsc::error::TrySendError<T>) -> SendError {
        match error {
            mpsc::error::TrySendError::Full(_) => SendError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => SendError::Disconnected,
        }
    }
}

/// What became of a query handed to a handler's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatched {
    /// It was written to the handler's stream.
    Sent,
    /// Its deadline passed while it waited for a permit; it was not sent.
    Expired { overdue: Duration },
}

/// A query waiting for a permit.
struct Queued {
    query: QueryRequest,
    enqueued: Instant,
    deadline: Instant,
    report: oneshot::Sender<Dispatched>,
}

/// How a message reaches a handler.
#[derive(Clone)]
pub enum Destination {
    Local(LocalHandler),
}

impl Destination {
    /// Queues a query; it is sent when the handler has a permit for it, unless its `deadline`
    /// passed or the returned receiver was dropped by then. The receiver learns which.
    pub fn send_query(
        &self,
        query: QueryRequest,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Dispatched>, SendError> {
        let (report, dispatched) = oneshot::channel();
        let queued = Queued {
            query,
            enqueued: Instant::now(),
            deadline,
            report,
        };
        match self {
            Destination::Local(local) => local.queries.try_send(queued).map_err(SendError::from)?,
        }
        Ok(dispatched)
    }

    /// Sends a message that needs no permit.
    pub fn send_control(&self, message: QueryProviderInbound) -> Result<(), SendError> {
        match self {
            Destination::Local(local) => local.control.try_send(message).map_err(SendError::from),
        }
    }
}

pub fn inbound(request: Inbound) -> QueryProviderInbound {
    QueryProviderInbound {
        request: Some(request),
        instruction_id: String::new(),
    }
}

/// The stream tonic writes to a local handler, and a way to end it with an error.
pub struct HandlerStream {
    pub errors: mpsc::Sender<Result<QueryProviderInbound, Status>>,
    pub messages: mpsc::Receiver<Result<QueryProviderInbound, Status>>,
}

/// A handler connected to this node.
#[derive(Clone)]
pub struct LocalHandler {
    queries: mpsc::Sender<Queued>,
    control: mpsc::Sender<QueryProviderInbound>,
    permits: Arc<Permits>,
}

/// Permits granted by the handler and not yet used.
#[derive(Default)]
pub struct Permits {
    available: AtomicI64,
    granted: Notify,
}

impl Permits {
    /// Adds permits; flow control is additive, and an absurd grant saturates instead of wrapping.
    pub fn grant(&self, permits: i64) {
        if permits <= 0 {
            return;
        }
        let _ = self
            .available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_add(permits)));
        self.granted.notify_one();
    }

    pub fn available(&self) -> i64 {
        self.available.load(Ordering::Acquire)
    }
}

impl LocalHandler {
    /// Creates the handler's queues and the task that writes them to its stream; returns the
    /// handler, its permits (for the stream reader), and the stream for tonic.
    pub fn start() -> (LocalHandler, Arc<Permits>, HandlerStream) {
        let (queries, queries_rx) = mpsc::channel(QUERY_QUEUE);
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (out, out_rx) = mpsc::channel(STREAM_BUFFER);
        let permits = Arc::new(Permits::default());
        tokio::spawn(pump(queries_rx, control_rx, permits.clone(), out.clone()));
        (
            LocalHandler {
                queries,
                control,
                permits: permits.clone(),
            },
            permits,
            HandlerStream {
                errors: out.clone(),
                messages: out_rx,
            },
        )
    }

    /// Permits the handler has granted and not used (for tests and metrics).
    pub fn permits(&self) -> i64 {
        self.permits.available()
    }
}

/// Writes control messages at once and queries one per permit, until the handler's stream or
/// the handler's queues close.
async fn pump(
    mut queries: mpsc::Receiver<Queued>,
    mut control: mpsc::Receiver<QueryProviderInbound>,
    permits: Arc<Permits>,
    out: mpsc::Sender<Result<QueryProviderInbound, Status>>,
) {
    loop {
        let have_permit = permits.available() > 0;
        let message = tokio::select! {
            biased;
            message = control.recv() => message,
            queued = queries.recv(), if have_permit => match queued {
                Some(queued) => {
                    let Some((query, report)) = take(queued) else { continue };
                    permits.available.fetch_sub(1, Ordering::AcqRel);
                    if out.send(Ok(inbound(Inbound::Query(query)))).await.is_err() {
                        return;
                    }
                    // After the write: what the caller queues next comes after the query.
                    let _ = report.send(Dispatched::Sent);
                    continue;
                }
                None => None,
            },
            // notify_one keeps a wake-up given before we wait, so a grant is never missed.
            () = permits.granted.notified(), if !have_permit => continue,
            () = out.closed() => return,
        };
        let Some(message) = message else { return };
        if out.send(Ok(message)).await.is_err() {
            return;
        }
    }
}

/// Decides about a query taken from the queue: `None` if it is not to be sent (reported if
/// expired), else the query to send (with an adjusted TIMEOUT if it waited) and its report.
fn take(queued: Queued) -> Option<(QueryRequest, oneshot::Sender<Dispatched>)> {
    if queued.report.is_closed() {
        return None;
    }
    let now = Instant::now();
    if now >= queued.deadline {
        let _ = queued.report.send(Dispatched::Expired {
            overdue: now - queued.deadline,
        });
        return None;
    }
    let mut query = queued.query;
    if now - queued.enqueued >= REQUEUE_ADJUST {
        super::instructions::set_timeout(&mut query, queued.deadline - now);
    }
    Some((query, queued.report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::instructions::set_timeout;
    use myelin_proto::axon::{ProcessingKey, meta_data_value};

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn with_timeout(ms: i64) -> QueryRequest {
        let mut query = QueryRequest {
            message_identifier: "q".into(),
            ..Default::default()
        };
        set_timeout(&mut query, Duration::from_millis(ms as u64));
        query
    }

    fn timeout_of(query: &QueryRequest) -> Vec<i64> {
        query
            .processing_instructions
            .iter()
            .filter(|i| i.key == ProcessingKey::Timeout as i32)
            .filter_map(|i| match i.value.as_ref()?.data.as_ref()? {
                meta_data_value::Data::NumberValue(ms) => Some(*ms),
                _ => None,
            })
            .collect()
    }

    async fn quiet(out: &mut mpsc::Receiver<Result<QueryProviderInbound, Status>>) {
        let nothing = tokio::time::timeout(Duration::from_millis(50), out.recv()).await;
        assert!(nothing.is_err(), "unexpected message: {nothing:?}");
    }

    #[tokio::test]
    async fn expired_queries_are_reported_and_dropped_unsent() {
        let (handler, permits, stream) = LocalHandler::start();
        let mut out = stream.messages;
        let destination = Destination::Local(handler);
        let expired = destination.send_query(QueryRequest::default(), Instant::now()).unwrap();
        let live = destination.send_query(QueryRequest::default(), later()).unwrap();
        permits.grant(2);
        assert!(out.recv().await.is_some());
        assert!(matches!(expired.await, Ok(Dispatched::Expired { .. })));
        assert_eq!(live.await, Ok(Dispatched::Sent));
        quiet(&mut out).await;
        assert_eq!(permits.available(), 1, "an expired query used a permit");
    }

    #[tokio::test]
    async fn abandoned_queries_are_not_sent_and_use_no_permit() {
        let (handler, permits, stream) = LocalHandler::start();
        let mut out = stream.messages;
        let destination = Destination::Local(handler);
        drop(destination.send_query(QueryRequest::default(), later()).unwrap());
        let kept = destination.send_query(with_timeout(5), later()).unwrap();
        permits.grant(1);
        let sent = out.recv().await.unwrap().unwrap();
        assert!(matches!(sent.request, Some(Inbound::Query(q)) if q.message_identifier == "q"));
        assert_eq!(kept.await, Ok(Dispatched::Sent));
        assert_eq!(permits.available(), 0);
    }

    #[tokio::test]
    async fn queries_wait_for_permits_control_does_not() {
        let (handler, permits, stream) = LocalHandler::start();
        let mut out = stream.messages;
        let destination = Destination::Local(handler);
        let _first = destination.send_query(QueryRequest::default(), later()).unwrap();
        let _second = destination.send_query(QueryRequest::default(), later()).unwrap();
        destination
            .send_control(inbound(Inbound::Ack(Default::default())))
            .unwrap();
        let first = out.recv().await.unwrap().unwrap();
        assert!(matches!(first.request, Some(Inbound::Ack(_))));
        quiet(&mut out).await;
        permits.grant(1);
        let query = out.recv().await.unwrap().unwrap();
        assert!(matches!(query.request, Some(Inbound::Query(_))));
        quiet(&mut out).await;
        permits.grant(5);
        assert!(out.recv().await.is_some());
        assert_eq!(permits.available(), 4);
    }

    /// A query sent at once keeps its TIMEOUT; one that waited 10 ms or more for a permit gets
    /// the time it has left instead (and only one TIMEOUT instruction). The clock is paused, so
    /// "at once" does not depend on how busy the machine is.
    #[tokio::test(start_paused = true)]
    async fn a_query_that_waited_carries_the_time_it_has_left() {
        let (handler, permits, stream) = LocalHandler::start();
        let mut out = stream.messages;
        let destination = Destination::Local(handler);
        permits.grant(1);
        let deadline = Instant::now() + Duration::from_millis(5_000);
        let _prompt = destination.send_query(with_timeout(5_000), deadline).unwrap();
        let Some(Inbound::Query(prompt)) = out.recv().await.unwrap().unwrap().request else {
            panic!("expected a query")
        };
        assert_eq!(timeout_of(&prompt), [5_000]);

        let deadline = Instant::now() + Duration::from_millis(5_000);
        let _waiting = destination.send_query(with_timeout(5_000), deadline).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        permits.grant(1);
        let Some(Inbound::Query(waited)) = out.recv().await.unwrap().unwrap().request else {
            panic!("expected a query")
        };
        let left = timeout_of(&waited);
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left, [4_800]);
    }

    #[test]
    fn permits_saturate_and_ignore_non_positive_grants() {
        let permits = Permits::default();
        permits.grant(i64::MAX);
        permits.grant(i64::MAX);
        assert_eq!(permits.available(), i64::MAX);
        let permits = Permits::default();
        permits.grant(-5);
        permits.grant(0);
        assert_eq!(permits.available(), 0);
    }
}
