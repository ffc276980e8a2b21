//! The dispatcher's side of a query: the stream of its responses, and for a streaming query the
//! demand that stream shows.
//!
//! gRPC has no per-message demand signal on a server stream; what the server sees is its
//! transport taking messages: tonic polls the response stream for the next message only when
//! HTTP/2 flow control lets it send (the client's window has room), and the client's window opens
//! as its application reads. So counting what tonic takes from [`ResponseStream`] measures the
//! dispatcher's demand, delayed by a bounded amount of transport buffering. [`Demand`] keeps that
//! count and wakes the query's gather task when it grows; Axon Server turns the same signal
//! (grpc-java's readiness) into `query_flow_control` permits.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use myelin_proto::axon::query::QueryResponse;
use tokio::sync::{Notify, mpsc};
use tonic::Status;

use crate::handler_limits::Charge;

/// The responses of one query, as the dispatcher's transport takes them.
/// A response on its way to the dispatcher, holding its bytes of the node's query budget
/// (`myelin.limits.query-queue-bytes`) until the dispatcher's transport takes it.
pub type Relayed = (Result<QueryResponse, Status>, Option<Charge>);

pub struct ResponseStream {
    responses: mpsc::Receiver<Relayed>,
    /// For a streaming query: what the transport took, which is the dispatcher's demand.
    demand: Option<Arc<Demand>>,
}

/// How many responses of one streaming query the dispatcher's transport has taken.
#[derive(Default)]
pub struct Demand {
    taken: AtomicU64,
    changed: Notify,
}

impl Demand {
    pub fn taken(&self) -> u64 {
        self.taken.load(Ordering::Acquire)
    }
}

impl Stream for ResponseStream {
    type Item = Result<QueryResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let polled = this.responses.poll_recv(cx);
        if let (Poll::Ready(Some(_)), Some(demand)) = (&polled, &this.demand) {
            demand.taken.fetch_add(1, Ordering::AcqRel);
            // notify_one keeps the wake-up if the gather task is not waiting right now.
            demand.changed.notify_one();
        }
        // Taken: its charge returns to the budget.
        polled.map(|relayed| relayed.map(|(response, _charge)| response))
    }
}

impl ResponseStream {
    /// The stream of `responses`; `demand`, for a streaming query, counts what is taken.
    pub fn new(responses: mpsc::Receiver<Relayed>, demand: Option<Arc<Demand>>) -> Self {
        ResponseStream { responses, demand }
    }

    /// The next response (counted as taken, like the transport's reads).
    pub async fn recv(&mut self) -> Option<Result<QueryResponse, Status>> {
        futures::StreamExt::next(self).await
    }
}

/// Resolves when the dispatcher took another response (never, without a demand).
pub async fn changed(demand: Option<&Demand>) {
    match demand {
        Some(demand) => demand.changed.notified().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn taking_a_response_counts_and_wakes() {
        let (tx, rx) = mpsc::channel(4);
        let demand = Arc::new(Demand::default());
        let mut stream = ResponseStream::new(rx, Some(demand.clone()));
        tx.send((Ok(QueryResponse::default()), None)).await.unwrap();
        tx.send((Ok(QueryResponse::default()), None)).await.unwrap();
        assert_eq!(demand.taken(), 0, "sending is not taking");
        stream.recv().await.unwrap().unwrap();
        // A wake-up given while nobody waited is kept for the next wait.
        tokio::time::timeout(Duration::from_secs(1), changed(Some(&demand)))
            .await
            .expect("taking wakes the gather task");
        stream.recv().await.unwrap().unwrap();
        assert_eq!(demand.taken(), 2);
        drop(tx);
        assert!(stream.recv().await.is_none());
        assert_eq!(demand.taken(), 2, "the end is not a response");
        let never = tokio::time::timeout(Duration::from_millis(20), changed(None)).await;
        assert!(never.is_err());
    }
}
