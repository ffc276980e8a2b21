//! How a message reaches a query handler.
//!
//! The registry only knows handlers by [`HandlerId`] and a [`Destination`]; what stands behind a
//! destination is this module's business. Today the only kind is a handler connected to this
//! node by an `OpenStream` call ([`LocalHandler`]); a handler on another node of the cluster will
//! be a second variant that forwards over the node-to-node connection.
//!
//! A local handler has two queues in front of its gRPC stream: queries, sent only while the
//! handler has granted permits (Axon's flow control) and bounded at [`QUERY_QUEUE`]; and control
//! messages (acks, cancels, subscription-query requests), sent without permits.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use myelin_proto::axon::query::query_provider_inbound::Request as Inbound;
use myelin_proto::axon::query::{QueryProviderInbound, QueryRequest};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tonic::Status;

/// Queries waiting for a handler's permits (Axon Server's queue size).
pub const QUERY_QUEUE: usize = 10_000;
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

/// A query waiting for a permit.
struct Queued {
    message: QueryProviderInbound,
    deadline: Instant,
}

/// How a message reaches a handler.
#[derive(Clone)]
pub enum Destination {
    Local(LocalHandler),
}

impl Destination {
    /// Queues a query; it is sent when the handler has a permit for it.
    /// A query still queued at `deadline` is dropped unsent: its dispatcher has had its answer.
    pub fn send_query(&self, query: QueryRequest, deadline: Instant) -> Result<(), SendError> {
        match self {
            Destination::Local(local) => local
                .queries
                .try_send(Queued {
                    message: inbound(Inbound::Query(query)),
                    deadline,
                })
                .map_err(SendError::from),
        }
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
                Some(queued) if queued.deadline <= Instant::now() => continue,
                Some(queued) => {
                    permits.available.fetch_sub(1, Ordering::AcqRel);
                    Some(queued.message)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn later() -> Instant {
        Instant::now() + std::time::Duration::from_secs(60)
    }

    #[tokio::test]
    async fn expired_queries_are_dropped_unsent() {
        let (handler, permits, stream) = LocalHandler::start();
        let mut out = stream.messages;
        let destination = Destination::Local(handler);
        destination.send_query(QueryRequest::default(), Instant::now()).unwrap();
        destination.send_query(QueryRequest::default(), later()).unwrap();
        permits.grant(2);
        assert!(out.recv().await.is_some());
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(50), out.recv()).await;
        assert!(nothing.is_err(), "an expired query was sent");
        assert_eq!(permits.available(), 1, "an expired query used a permit");
    }

    #[tokio::test]
    async fn queries_wait_for_permits_control_does_not() {
        let (handler, permits, stream) = LocalHandler::start();
        let mut out = stream.messages;
        let destination = Destination::Local(handler);
        destination.send_query(QueryRequest::default(), later()).unwrap();
        destination.send_query(QueryRequest::default(), later()).unwrap();
        destination
            .send_control(inbound(Inbound::Ack(Default::default())))
            .unwrap();
        let first = out.recv().await.unwrap().unwrap();
        assert!(matches!(first.request, Some(Inbound::Ack(_))));
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(50), out.recv()).await;
        assert!(nothing.is_err(), "a query was sent without a permit");
        permits.grant(1);
        let query = out.recv().await.unwrap().unwrap();
        assert!(matches!(query.request, Some(Inbound::Query(_))));
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(50), out.recv()).await;
        assert!(nothing.is_err(), "more queries than permits");
        permits.grant(5);
        assert!(out.recv().await.is_some());
        assert_eq!(permits.available(), 4);
    }
}
