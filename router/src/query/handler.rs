//! How a message reaches a query handler.
//!
//! The registry only knows handlers by [`HandlerId`] and a [`Destination`]; what stands behind a
//! destination is this module's business. A handler connected to this node by an `OpenStream`
//! call is a [`LocalHandler`]; a handler connected to another node of the cluster is a
//! [`RemoteQueryHandler`], which carries the same messages over the peer link (see
//! [`super::remote`]). Routing, gathering and flow control treat both alike.
//!
//! A local handler has two queues in front of its gRPC stream: queries, sent only while the
//! handler has granted permits (Axon's flow control) and bounded at [`QUERY_QUEUE`]; and control
//! messages (acks, cancels, per-query flow control, subscription-query requests), sent without
//! permits. One task writes both to the stream, so a control message queued after a query was
//! reported [`Dispatched::Sent`] reaches the handler after that query.
//!
//! The query queue is bounded in queries (Axon's `query-queue-capacity-per-client`) and in bytes:
//! each queued query holds a charge of the handler's budget
//! (`myelin.limits.query-queue-bytes-per-client`) and one of the node's
//! (`myelin.limits.query-queue-bytes`), both the size of the encoded query. They ride with the
//! query through the stream's outbound channel and return when tonic takes it for the wire (or
//! when it is dropped unsent), so a handler that neither grants permits nor reads its stream
//! holds at most its budget. A query that does not fit is refused at once ([`SendError`]).
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

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use prost::Message as _;

use myelin_proto::axon::query::query_provider_inbound::Request as Inbound;
use myelin_proto::axon::query::{QueryProviderInbound, QueryRequest};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tonic::Status;

use super::remote::RemoteQueryHandler;
use crate::handler_limits::{Budget, Charge};

/// Queries waiting for a handler's permits (Axon Server's queue size), unless configured.
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
    /// Its queue holds as many bytes as one handler's may.
    QueueBytesFull,
    /// The queries queued for all handlers hold as many bytes as the node allows.
    NodeBytesFull,
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
    /// The handler's and the node's bytes, held until the stream takes the query.
    charges: [Charge; 2],
}

/// How a message reaches a handler.
#[derive(Clone)]
pub enum Destination {
    Local(LocalHandler),
    Remote(Arc<RemoteQueryHandler>),
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
        match self {
            Destination::Local(local) => {
                let size = query.encoded_len();
                let client = local.bytes.try_charge(size).ok_or(SendError::QueueBytesFull)?;
                let node = local.node_bytes.try_charge(size).ok_or(SendError::NodeBytesFull)?;
                let queued = Queued {
                    query,
                    enqueued: Instant::now(),
                    deadline,
                    report,
                    charges: [client, node],
                };
                local.queries.try_send(queued).map_err(SendError::from)?
            }
            Destination::Remote(remote) => return remote.send_query(query, deadline),
        }
        Ok(dispatched)
    }

    /// Whether the handler is connected to this node.
    pub fn is_local(&self) -> bool {
        matches!(self, Destination::Local(_))
    }

    /// Sends a message that needs no permit. It holds its bytes of the handler's and the node's
    /// query budgets until tonic takes it, as a query does: a subscription query's request
    /// carries a whole query, and a handler that does not read must not hold its queue's
    /// count of them in memory.
    pub fn send_control(&self, message: QueryProviderInbound) -> Result<(), SendError> {
        match self {
            Destination::Local(local) => {
                let size = message.encoded_len();
                let client = local.bytes.try_charge(size).ok_or(SendError::QueueBytesFull)?;
                let node = local.node_bytes.try_charge(size).ok_or(SendError::NodeBytesFull)?;
                let outgoing = Outgoing {
                    message: Ok(message),
                    _held: Some([client, node]),
                };
                local.control.try_send(outgoing).map_err(SendError::from)
            }
            Destination::Remote(remote) => remote.send_control(message),
        }
    }
}

pub fn inbound(request: Inbound) -> QueryProviderInbound {
    QueryProviderInbound {
        request: Some(request),
        instruction_id: String::new(),
    }
}

/// A message to the handler, with the bytes a query holds until tonic takes it.
struct Outgoing {
    message: Result<QueryProviderInbound, Status>,
    _held: Option<[Charge; 2]>,
}

impl Outgoing {
    fn plain(message: Result<QueryProviderInbound, Status>) -> Outgoing {
        Outgoing { message, _held: None }
    }
}

/// What tonic writes to a local handler's stream. Taking a message returns the bytes it held.
pub struct Messages(mpsc::Receiver<Outgoing>);

impl Messages {
    pub async fn recv(&mut self) -> Option<Result<QueryProviderInbound, Status>> {
        self.0.recv().await.map(|outgoing| outgoing.message)
    }

    pub fn try_recv(&mut self) -> Result<Result<QueryProviderInbound, Status>, mpsc::error::TryRecvError> {
        self.0.try_recv().map(|outgoing| outgoing.message)
    }
}

impl Stream for Messages {
    type Item = Result<QueryProviderInbound, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|next| next.map(|outgoing| outgoing.message))
    }
}

/// Ends a local handler's stream with an error (or sends it a message) ahead of its queues.
#[derive(Clone)]
pub struct Errors(mpsc::Sender<Outgoing>);

impl Errors {
    pub fn try_send(&self, message: Result<QueryProviderInbound, Status>) -> Result<(), SendError> {
        self.0.try_send(Outgoing::plain(message)).map_err(SendError::from)
    }

    pub async fn send(&self, message: Result<QueryProviderInbound, Status>) -> Result<(), SendError> {
        self.0
            .send(Outgoing::plain(message))
            .await
            .map_err(|_| SendError::Disconnected)
    }
}

/// The stream tonic writes to a local handler, and a way to end it with an error.
pub struct HandlerStream {
    pub errors: Errors,
    pub messages: Messages,
}

/// A handler connected to this node.
#[derive(Clone)]
pub struct LocalHandler {
    queries: mpsc::Sender<Queued>,
    control: mpsc::Sender<Outgoing>,
    permits: Arc<Permits>,
    /// This handler's query bytes (`query-queue-bytes-per-client`).
    bytes: Budget,
    /// The node's query bytes (`query-queue-bytes`), shared by every handler.
    node_bytes: Budget,
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
    /// A handler with Axon's queue capacity and no byte bounds (for tests).
    pub fn start() -> (LocalHandler, Arc<Permits>, HandlerStream) {
        LocalHandler::start_bounded(QUERY_QUEUE, Budget::new(usize::MAX), Budget::new(usize::MAX))
    }

    /// Creates the handler's queues (at most `capacity` queries, holding at most what `bytes`
    /// and the node's `node_bytes` allow) and the task that writes them to its stream; returns
    /// the handler, its permits (for the stream reader), and the stream for tonic.
    pub fn start_bounded(
        capacity: usize,
        bytes: Budget,
        node_bytes: Budget,
    ) -> (LocalHandler, Arc<Permits>, HandlerStream) {
        let (queries, queries_rx) = mpsc::channel(capacity);
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (out, out_rx) = mpsc::channel(STREAM_BUFFER);
        let permits = Arc::new(Permits::default());
        tokio::spawn(pump(queries_rx, control_rx, permits.clone(), out.clone()));
        (
            LocalHandler {
                queries,
                control,
                permits: permits.clone(),
                bytes,
                node_bytes,
            },
            permits,
            HandlerStream {
                errors: Errors(out),
                messages: Messages(out_rx),
            },
        )
    }

    /// Bytes of queries queued for this handler and not yet taken by its stream.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.used()
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
    mut control: mpsc::Receiver<Outgoing>,
    permits: Arc<Permits>,
    out: mpsc::Sender<Outgoing>,
) {
    loop {
        let have_permit = permits.available() > 0;
        let message = tokio::select! {
            biased;
            message = control.recv() => message,
            queued = queries.recv(), if have_permit => match queued {
                Some(queued) => {
                    let Some((query, report, charges)) = take(queued) else { continue };
                    permits.available.fetch_sub(1, Ordering::AcqRel);
                    let outgoing = Outgoing { message: Ok(inbound(Inbound::Query(query))), _held: Some(charges) };
                    if out.send(outgoing).await.is_err() {
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
        if out.send(message).await.is_err() {
            return;
        }
    }
}

/// Decides about a query taken from the queue: `None` if it is not to be sent (reported if
/// expired), else the query to send (with an adjusted TIMEOUT if it waited), its report and its
/// charges.
fn take(queued: Queued) -> Option<(QueryRequest, oneshot::Sender<Dispatched>, [Charge; 2])> {
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
    Some((query, queued.report, queued.charges))
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

    async fn quiet(out: &mut Messages) {
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

    /// Both byte budgets bound the queue; a query holds its bytes until the stream's reader
    /// takes it, and returns them when it is dropped unsent.
    #[tokio::test]
    async fn control_messages_hold_their_bytes_until_taken() {
        use myelin_proto::axon::query::{SubscriptionQuery, SubscriptionQueryRequest};
        let subscribe = |n: usize| {
            inbound(Inbound::SubscriptionQueryRequest(SubscriptionQueryRequest {
                request: Some(
                    myelin_proto::axon::query::subscription_query_request::Request::Subscribe(SubscriptionQuery {
                        subscription_identifier: format!("s{n}"),
                        query_request: Some(QueryRequest {
                            payload: Some(myelin_proto::axon::SerializedObject {
                                data: vec![1u8; 1_000].into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                ),
            }))
        };
        let size = subscribe(0).encoded_len();
        let node = Budget::new(10 * size);
        let (handler, _permits, stream) = LocalHandler::start_bounded(100, Budget::new(2 * size), node.clone());
        let mut out = stream.messages;
        let (local, handler) = (handler.clone(), Destination::Local(handler));
        handler.send_control(subscribe(0)).unwrap();
        handler.send_control(subscribe(1)).unwrap();
        assert_eq!(
            handler.send_control(subscribe(2)).unwrap_err(),
            SendError::QueueBytesFull
        );
        assert_eq!((local.queued_bytes(), node.used()), (2 * size, 2 * size));
        assert!(out.recv().await.is_some());
        assert_eq!(local.queued_bytes(), size, "taken: its bytes are back");
        handler.send_control(subscribe(3)).unwrap();
    }

    #[tokio::test]
    async fn queued_bytes_are_bounded_per_handler_and_per_node() {
        let query = |n: usize| QueryRequest {
            message_identifier: format!("q{n}"),
            payload: Some(myelin_proto::axon::SerializedObject {
                data: vec![1u8; 1_000].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let size = query(0).encoded_len();
        let node = Budget::new(3 * size);
        let (a, permits, stream) = LocalHandler::start_bounded(100, Budget::new(2 * size), node.clone());
        let mut out = stream.messages;
        let (b, _, _b_stream) = LocalHandler::start_bounded(100, Budget::new(10 * size), node.clone());
        let (a_handler, a) = (a.clone(), Destination::Local(a));
        let b = Destination::Local(b);
        let _q0 = a.send_query(query(0), later()).unwrap();
        let q1 = a.send_query(query(1), later()).unwrap();
        assert_eq!(a.send_query(query(2), later()).unwrap_err(), SendError::QueueBytesFull);
        let _q3 = b.send_query(query(3), later()).unwrap();
        assert_eq!(b.send_query(query(4), later()).unwrap_err(), SendError::NodeBytesFull);
        assert_eq!((a_handler.queued_bytes(), node.used()), (2 * size, 3 * size));

        // Sent but not yet taken from the stream: still held. Taken: returned.
        permits.grant(1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(node.used(), 3 * size);
        assert!(out.recv().await.is_some());
        assert_eq!((a_handler.queued_bytes(), node.used()), (size, 2 * size));
        // An abandoned query is dropped unsent when its turn comes, and returns its bytes.
        drop(q1);
        permits.grant(1);
        quiet(&mut out).await;
        assert_eq!((a_handler.queued_bytes(), node.used()), (0, size));
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
