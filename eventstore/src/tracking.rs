//! Tracking streams (`ListEvents`): events in token order from a client's token, sent only
//! against permits the client grants, then tailing new events as they are committed.
//!
//! Flow control is Axon's: the first request names the start token (inclusive) and the initial
//! permits; later requests add permits and blacklist payload types. One event sent consumes one
//! permit; at zero permits nothing is sent. Blacklisted events are skipped without consuming
//! permits, but after `BLACKLIST_SEND_AFTER` skips in a row one is sent anyway so the client's
//! token advances. A client that stays at zero permits for `PERMITS_TIMEOUT` is disconnected.
//! Memory per stream is bounded by the read batch and the outgoing queue, whatever the client
//! does.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use myelin_proto::axon::event::{Event, EventWithToken, GetEventsRequest};
use myelin_proto::errors::ErrorCode;
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::context::Context;
use crate::segment::{SegmentStore, StoreError};

const READ_BATCH: usize = 1024;
const READ_BYTES: usize = 1 << 20;
const OUT_QUEUE: usize = 256;
const BLACKLIST_SEND_AFTER: u32 = 1000;
const PERMITS_TIMEOUT: Duration = Duration::from_secs(120);
/// Permits beyond this are not counted (a client sending huge grants must not overflow).
const MAX_PERMITS: i64 = 1 << 40;

type Out = mpsc::Sender<Result<EventWithToken, Status>>;

/// Reads the first request, checks it, and starts the stream's task.
pub async fn start(
    context: Arc<Context>,
    mut requests: Streaming<GetEventsRequest>,
) -> Result<mpsc::Receiver<Result<EventWithToken, Status>>, Status> {
    let first = requests
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("ListEvents needs a first request"))?;
    let first_token = context.stored.events.first_token();
    if first.tracking_token < first_token {
        return Err(ErrorCode::Other.status(format!(
            "{}: token {} before start of event store",
            context.name, first.tracking_token
        )));
    }
    let (tx, rx) = mpsc::channel(OUT_QUEUE);
    let span = tracing::info_span!("list_events", context = %context.name, client = %first.client_id);
    tokio::spawn(tracing::Instrument::instrument(run(context, first, requests, tx), span));
    Ok(rx)
}

struct Tracker {
    next: i64,
    permits: i64,
    blacklist: HashSet<(String, String)>,
    skipped_in_a_row: u32,
}

impl Tracker {
    fn grant(&mut self, request: &GetEventsRequest) {
        self.permits = (self.permits + request.number_of_permits.max(0)).min(MAX_PERMITS);
        for p in &request.blacklist {
            self.blacklist.insert((p.r#type.clone(), p.revision.clone()));
        }
    }
}

async fn run(context: Arc<Context>, first: GetEventsRequest, mut requests: Streaming<GetEventsRequest>, out: Out) {
    let mut tracker = Tracker {
        next: first.tracking_token,
        permits: 0,
        blacklist: HashSet::new(),
        skipped_in_a_row: 0,
    };
    tracker.grant(&first);
    let mut visible = context.stored.events.subscribe();
    let closed = context.closed.clone();
    loop {
        if closed.is_cancelled() {
            // The context was deleted.
            let _ = out.send(Err(context_gone(&context))).await;
            return;
        }
        if tracker.permits == 0 {
            // Wait for permits (or the client's end, or the context's).
            let message = tokio::select! {
                _ = closed.cancelled() => continue,
                message = tokio::time::timeout(PERMITS_TIMEOUT, requests.message()) => message,
            };
            match message {
                Ok(Ok(Some(request))) => tracker.grant(&request),
                Ok(Ok(None)) | Ok(Err(_)) => return,
                Err(_) => {
                    let _ = out
                        .send(Err(ErrorCode::Other.status(format!(
                            "{}: Timeout waiting for permits from client {}",
                            context.name, first.client_id
                        ))))
                        .await;
                    return;
                }
            }
            continue;
        }
        let want = tracker.permits.min(READ_BATCH as i64) as usize;
        let stored = context.stored.clone();
        let from = tracker.next;
        let batch = tokio::task::spawn_blocking(move || stored.events.read_from(from, want, READ_BYTES)).await;
        let batch = match batch {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => {
                let _ = out.send(Err(read_error(e))).await;
                return;
            }
            Err(e) => {
                let _ = out.send(Err(Status::internal(format!("read task failed: {e}")))).await;
                return;
            }
        };
        if batch.is_empty() {
            // Caught up: wait for new events, more requests, or the client's end.
            tokio::select! {
                _ = closed.cancelled() => {}
                changed = visible.changed() => if changed.is_err() { return },
                message = requests.message() => match message {
                    Ok(Some(request)) => tracker.grant(&request),
                    // Half-close: the client is done; Axon completes the stream normally.
                    Ok(None) => return,
                    Err(_) => return,
                },
                _ = out.closed() => return,
            }
            continue;
        }
        for (token, bytes) in batch {
            let event = match Event::decode(bytes) {
                Ok(event) => event,
                Err(e) => {
                    let _ = out
                        .send(Err(
                            ErrorCode::DatafileReadError.status(format!("event {token} does not decode: {e}"))
                        ))
                        .await;
                    return;
                }
            };
            tracker.next = token + 1;
            if !tracker.blacklist.is_empty() && tracker.skipped_in_a_row < BLACKLIST_SEND_AFTER {
                let payload = event.payload.as_ref();
                let key = (
                    payload.map(|p| p.r#type.clone()).unwrap_or_default(),
                    payload.map(|p| p.revision.clone()).unwrap_or_default(),
                );
                if tracker.blacklist.contains(&key) {
                    tracker.skipped_in_a_row += 1;
                    continue;
                }
            }
            tracker.skipped_in_a_row = 0;
            tracker.permits -= 1;
            if out
                .send(Ok(EventWithToken {
                    token,
                    event: Some(event),
                }))
                .await
                .is_err()
            {
                return;
            }
        }
        // Pick up permit grants that arrived meanwhile without blocking.
        loop {
            match futures::FutureExt::now_or_never(requests.message()) {
                Some(Ok(Some(request))) => tracker.grant(&request),
                // Half-close: the client is done; Axon completes the stream normally.
                Some(Ok(None)) | Some(Err(_)) => return,
                None => break,
            }
        }
    }
}

fn context_gone(context: &Context) -> Status {
    ErrorCode::ContextNotFound.status(format!("{}: context not found", context.name))
}

fn read_error(e: StoreError) -> Status {
    crate::service::storage_status(e)
}

/// The first token whose event has a timestamp at or after `instant` (ms); the next token when
/// every event is older; -1 for an empty store (as Axon Server answers).
pub fn token_at(store: &SegmentStore, instant: i64) -> Result<i64, StoreError> {
    let next = store.next_token();
    if next == store.first_token() {
        return Ok(-1);
    }
    // Timestamps are the clients' and need not be monotonic, so scan in token order.
    let mut from = store.first_token();
    loop {
        let batch = store.read_from(from, 4096, 8 << 20)?;
        let Some((last, _)) = batch.last() else {
            return Ok(next);
        };
        from = last + 1;
        for (token, bytes) in batch {
            if let Ok(event) = Event::decode(bytes)
                && event.timestamp >= instant
            {
                return Ok(token);
            }
        }
    }
}
