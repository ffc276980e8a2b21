//! Appends travel to the eventstore over one long-lived stream (`Appends`), tagged with ids,
//! instead of one internal call each: the hottest path pays for one message, not for an HTTP/2
//! stream with its headers and wake-ups.
//!
//! If the stream breaks (the eventstore restarts), every append waiting on it fails with
//! UNAVAILABLE — its outcome is unknown, as for any lost connection — and the next append opens
//! a new stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use myelin_proto::errors::ERROR_CODE_KEY;
use myelin_proto::internal::event_storage_client::EventStorageClient;
use myelin_proto::internal::{AppendRequest, AppendResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<(), Status>>>>>;

struct Stream {
    requests: mpsc::Sender<AppendRequest>,
    waiters: Waiters,
}

#[derive(Clone)]
pub struct AppendPipe {
    client: EventStorageClient<Channel>,
    stream: Arc<tokio::sync::Mutex<Option<Arc<Stream>>>>,
    next_id: Arc<AtomicU64>,
}

fn lost() -> Status {
    Status::unavailable("the connection to the event store was lost; the outcome of the append is unknown")
}

fn status_of(response: AppendResponse) -> Result<(), Status> {
    if response.code == 0 {
        return Ok(());
    }
    let mut metadata = MetadataMap::new();
    if let Ok(value) = MetadataValue::try_from(response.error_code.as_str())
        && !response.error_code.is_empty()
    {
        metadata.insert(ERROR_CODE_KEY, value);
    }
    Err(Status::with_metadata(
        Code::from(response.code),
        response.message,
        metadata,
    ))
}

impl AppendPipe {
    pub fn new(client: EventStorageClient<Channel>) -> AppendPipe {
        AppendPipe {
            client,
            stream: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Stores a transaction (or one snapshot) in `context` and returns its outcome.
    pub async fn append(&self, context: &str, events: Vec<Bytes>, snapshot: bool) -> Result<(), Status> {
        let stream = self.open().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        stream.waiters.lock().expect("waiters lock").insert(id, tx);
        let request = AppendRequest {
            id,
            context: context.to_owned(),
            events,
            snapshot,
        };
        if stream.requests.send(request).await.is_err() {
            stream.waiters.lock().expect("waiters lock").remove(&id);
            self.forget(&stream).await;
            // Not sent: nothing can have been stored.
            return Err(Status::unavailable("the event store is not available"));
        }
        rx.await.unwrap_or_else(|_| Err(lost()))
    }

    async fn forget(&self, broken: &Arc<Stream>) {
        let mut current = self.stream.lock().await;
        if current.as_ref().is_some_and(|s| Arc::ptr_eq(s, broken)) {
            *current = None;
        }
    }

    async fn open(&self) -> Result<Arc<Stream>, Status> {
        let mut current = self.stream.lock().await;
        if let Some(stream) = current.as_ref()
            && !stream.requests.is_closed()
        {
            return Ok(stream.clone());
        }
        let (requests, rx) = mpsc::channel(4096);
        let mut responses = self
            .client
            .clone()
            .appends(ReceiverStream::new(rx))
            .await
            .map_err(|e| Status::unavailable(format!("the event store is not available: {}", e.message())))?
            .into_inner();
        let waiters: Waiters = Arc::default();
        let stream = Arc::new(Stream {
            requests,
            waiters: waiters.clone(),
        });
        *current = Some(stream.clone());
        let pipe = self.clone();
        let weak = Arc::downgrade(&stream);
        tokio::spawn(async move {
            while let Ok(Some(response)) = responses.message().await {
                let waiter = waiters.lock().expect("waiters lock").remove(&response.id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(status_of(response));
                }
            }
            tracing::warn!("append stream to the event store ended");
            if let Some(stream) = weak.upgrade() {
                pipe.forget(&stream).await;
            }
            // Dropping the senders fails every waiter with "outcome unknown".
            waiters.lock().expect("waiters lock").clear();
        });
        Ok(stream)
    }
}
