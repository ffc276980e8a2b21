//! The internal storage API (`myelin.internal.EventStorage`), served on the eventstore's Unix
//! socket to the router. Handlers decode, call the context, encode — nothing else.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use myelin_proto::axon::event::{
    Confirmation, Event, GetAggregateEventsRequest, GetAggregateSnapshotsRequest, GetEventsRequest,
    GetFirstTokenRequest, GetLastTokenRequest, GetTokenAtRequest, ReadHighestSequenceNrRequest,
    ReadHighestSequenceNrResponse, TrackingToken,
};
use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::event_storage_server::EventStorage;
use myelin_proto::internal::{AppendRequest, AppendResponse, EncodedEvents, EncodedEventsWithToken};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::append::{AppendError, Work};
use crate::command::EventRecord;
use crate::command::{Outcome, Transaction};
use crate::context::{Context, Contexts};
use crate::segment::{AggregateEvents, AggregateSnapshots, Kind, StoreError};
use crate::stored::{StoredContext, event_facts, record_of};
use crate::tracking;

type EventStream = Pin<Box<dyn Stream<Item = Result<EncodedEvents, Status>> + Send>>;

/// An aggregate read is answered in chunks of about this many bytes, one message each. Large
/// enough that a typical aggregate (well under a thousand events) is one read and one message
/// and that longer reads spend little per message; small enough that a read nobody reads
/// (holding a queued chunk and the message in the transport) costs about 1 MiB.
const CHUNK_BYTES: usize = 256 << 10;

pub struct Service {
    pub contexts: Arc<Contexts>,
    /// Largest transaction (sum of encoded events) one AppendEvent call may carry.
    pub max_transaction_bytes: usize,
    /// How much of a blacklist one tracking stream keeps.
    pub blacklist: tracking::BlacklistBound,
}

/// The context a call is for, from the `myelin-context` metadata the router sets.
pub(crate) fn context_of<T>(contexts: &Contexts, request: &Request<T>) -> Result<Arc<Context>, Status> {
    let name = request
        .metadata()
        .get(myelin_proto::CONTEXT_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(myelin_proto::DEFAULT_CONTEXT);
    contexts
        .get(name)
        .ok_or_else(|| ErrorCode::ContextNotFound.status(format!("{name}: context not found")))
}

pub fn storage_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "storage read failed");
    ErrorCode::DatafileReadError.status(e)
}

pub(crate) fn append_status(context: &str, e: AppendError) -> Status {
    match e {
        AppendError::NotLeader => ErrorCode::NoLeaderAvailable.status(format!("No leader for {context}")),
        AppendError::Unknown(why) => Status::unavailable(format!("the outcome of the append is unknown: {why}")),
        AppendError::Closed => Status::unavailable("the event store is shutting down"),
        // The eventstore stops and recovers (space::wait_for_room); until then it is not
        // available, and this append's outcome is unknown.
        AppendError::Storage(e) => Status::unavailable(format!(
            "the event store could not write ({e}) and is recovering; the outcome of the append is unknown"
        )),
    }
}

fn outcome_status(outcome: Outcome) -> Result<i64, Status> {
    match outcome {
        Outcome::Stored { first_token, .. } => Ok(first_token),
        Outcome::InvalidSequence {
            aggregate_id,
            got,
            expected,
        } => Err(ErrorCode::InvalidSequence.status(format!(
            "Invalid sequence number {got} for aggregate {aggregate_id}, expected {expected}"
        ))),
        Outcome::SnapshotAheadOfEvents {
            aggregate_id,
            highest,
            snapshot,
        } => Err(ErrorCode::InvalidSequence.status(format!(
            "Invalid sequence number while storing snapshot. Highest aggregate {aggregate_id} sequence number: \
             {highest}, snapshot sequence {snapshot}."
        ))),
        other @ (Outcome::Scheduled | Outcome::TooManyScheduled { .. } | Outcome::NotPending) => {
            Err(Status::internal(format!("unexpected outcome of an append: {other:?}")))
        }
    }
}

/// An event that names an aggregate type takes part in sequence checks and must name its
/// aggregate. Events without a type are stored as sent (as Axon Server does), but an event
/// must hold something: an empty one (no identifier, no payload) is refused.
pub(crate) fn check_event(event: &Event) -> Result<(), Status> {
    if *event == Event::default() {
        return Err(Status::invalid_argument(
            "an event must not be empty: it needs at least a message identifier",
        ));
    }
    if event.aggregate_identifier.is_empty() && !event.aggregate_type.is_empty() {
        return Err(Status::invalid_argument(format!(
            "event {} has aggregate type {:?} but no aggregate identifier",
            event.message_identifier, event.aggregate_type
        )));
    }
    Ok(())
}

/// A snapshot belongs to an aggregate and stands for its state at a sequence number, which is
/// never negative (an aggregate's first event is 0).
fn check_snapshot(aggregate_id: &str, sequence: i64) -> Result<(), Status> {
    if aggregate_id.is_empty() {
        return Err(Status::invalid_argument("a snapshot must name its aggregate"));
    }
    if sequence < 0 {
        return Err(ErrorCode::InvalidSequence.status(format!(
            "Invalid sequence number {sequence} for snapshot of aggregate {aggregate_id}: sequence numbers start at 0"
        )));
    }
    Ok(())
}

/// A record for an event received already encoded: its bytes are stored as they are.
fn record_of_bytes(bytes: bytes::Bytes, kind: Kind) -> Result<EventRecord, Status> {
    let event =
        Event::decode(bytes.clone()).map_err(|e| Status::invalid_argument(format!("event does not decode: {e}")))?;
    check_event(&event)?;
    let (aggregate_id, sequence, indexed) = event_facts(&event, kind);
    Ok(EventRecord {
        aggregate_id,
        sequence,
        indexed,
        encoded: bytes,
    })
}

/// Stores one request of the `Appends` stream.
async fn store_request(
    contexts: &Contexts,
    max_transaction_bytes: usize,
    request: AppendRequest,
) -> Result<(), Status> {
    let name = if request.context.is_empty() {
        myelin_proto::DEFAULT_CONTEXT
    } else {
        request.context.as_str()
    };
    let context = contexts
        .get(name)
        .ok_or_else(|| ErrorCode::ContextNotFound.status(format!("{name}: context not found")))?;
    let work = if request.snapshot {
        let [bytes] = <[bytes::Bytes; 1]>::try_from(request.events)
            .map_err(|_| Status::invalid_argument("a snapshot request carries exactly one event"))?;
        let record = record_of_bytes(bytes, Kind::Snapshots)?;
        check_snapshot(&record.aggregate_id, record.sequence)?;
        Work::Snapshot(record)
    } else {
        let size = myelin_proto::limits::transaction_cost(request.events.iter().map(|e| e.len()));
        if size > max_transaction_bytes {
            return Err(ErrorCode::PayloadTooLarge.status(format!(
                "transaction exceeds the maximum size of {max_transaction_bytes} bytes"
            )));
        }
        if request.events.is_empty() {
            return Ok(());
        }
        let events = request
            .events
            .into_iter()
            .map(|b| record_of_bytes(b, Kind::Events))
            .collect::<Result<Vec<_>, _>>()?;
        Work::Events(Transaction { events })
    };
    let outcome = crate::forward::append(&context, work)
        .await
        .map_err(|e| append_status(&context.name, e))?;
    outcome_status(outcome).map(|_| ())
}

fn response_of(id: u64, result: Result<(), Status>) -> AppendResponse {
    match result {
        Ok(()) => AppendResponse {
            id,
            code: 0,
            message: String::new(),
            error_code: String::new(),
        },
        Err(status) => AppendResponse {
            id,
            code: status.code() as i32,
            message: status.message().to_owned(),
            error_code: status
                .metadata()
                .get(myelin_proto::errors::ERROR_CODE_KEY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
        },
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, StoreError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("read task failed: {e}")))?
        .map_err(storage_status)
}

/// A stored snapshot as a read sends it: flagged as a snapshot.
fn snapshot(bytes: bytes::Bytes) -> Result<bytes::Bytes, Status> {
    myelin_proto::encoded::as_snapshot(bytes)
        .map_err(|e| ErrorCode::DatafileReadError.status(format!("stored snapshot: {e}")))
}

/// A read in chunks: its cursor, and how to read the next chunk from it.
trait ChunkedRead: Send + 'static {
    /// The next message of about `CHUNK_BYTES`; `None` at the end. Blocking file I/O.
    fn next(&mut self) -> Result<Option<EncodedEvents>, Status>;
    /// Whether the read is over (the next chunk would be `None`), when it can tell.
    fn is_done(&self) -> bool;
}

async fn read_chunk<R: ChunkedRead>(mut read: R) -> Result<(Option<EncodedEvents>, R), Status> {
    tokio::task::spawn_blocking(move || read.next().map(|message| (message, read)))
        .await
        .map_err(|e| Status::internal(format!("read task failed: {e}")))?
}

/// Answers an aggregate read chunk by chunk, so that what a read holds does not grow with the
/// aggregate. The first chunk is read before answering; a read that fits in it (the common case)
/// is one read and one message, with no task and no queue. Otherwise a task reads the rest one
/// chunk ahead of the transport: it takes a slot in a queue of one before it reads, so a client
/// that does not read holds at most that queued chunk and the message the transport is sending.
async fn chunked<R: ChunkedRead>(read: R) -> Result<Response<EventStream>, Status> {
    let (first, read) = read_chunk(read).await?;
    let Some(first) = first else {
        return Ok(Response::new(Box::pin(tokio_stream::empty())));
    };
    let first = tokio_stream::once(Ok(first));
    if read.is_done() {
        return Ok(Response::new(Box::pin(first)));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut read = read;
        // Ends when the client is gone (no slot), at the end, or after an error.
        while let Ok(slot) = tx.reserve().await {
            match read_chunk(read).await {
                Ok((Some(message), rest)) => {
                    slot.send(Ok(message));
                    read = rest;
                }
                Ok((None, _)) => return,
                Err(status) => {
                    slot.send(Err(status));
                    return;
                }
            }
        }
    });
    Ok(Response::new(Box::pin(tokio_stream::StreamExt::chain(
        first,
        ReceiverStream::new(rx),
    ))))
}

/// `ListAggregateEvents`: the newest snapshot in range (when allowed), then the events after it.
struct AggregateRead {
    stored: Arc<StoredContext>,
    aggregate_id: String,
    /// Sequences requested.
    initial: i64,
    upper: i64,
    allow_snapshots: bool,
    /// The events' cursor, made by the first chunk (after the snapshot lookup).
    events: Option<AggregateEvents>,
}

impl ChunkedRead for AggregateRead {
    fn next(&mut self) -> Result<Option<EncodedEvents>, Status> {
        let mut message = EncodedEvents::default();
        let mut budget = CHUNK_BYTES;
        if self.events.is_none() {
            let mut from = self.initial;
            if self.allow_snapshots {
                let snapshots = &self.stored.snapshots;
                let mut newest = snapshots.aggregate_snapshots(&self.aggregate_id, self.initial..=self.upper, 1);
                if let Some((seq, bytes)) = newest.next_chunk(snapshots, CHUNK_BYTES).map_err(storage_status)?.pop() {
                    budget = budget.saturating_sub(bytes.len());
                    message.events.push(snapshot(bytes)?);
                    from = seq.saturating_add(1);
                }
            }
            self.events = Some(
                self.stored
                    .events
                    .aggregate_events(&self.aggregate_id, from..=self.upper),
            );
        }
        let events = self.events.as_mut().expect("made above");
        let chunk = events
            .next_chunk(&self.stored.events, budget.max(1))
            .map_err(storage_status)?;
        message.events.extend(chunk.into_iter().map(|(_, bytes)| bytes));
        Ok((!message.events.is_empty()).then_some(message))
    }

    fn is_done(&self) -> bool {
        self.events.as_ref().is_some_and(AggregateEvents::is_done)
    }
}

/// `ListAggregateSnapshots`: highest sequence first, up to the number of results asked for.
struct SnapshotsRead {
    stored: Arc<StoredContext>,
    snapshots: AggregateSnapshots,
}

impl ChunkedRead for SnapshotsRead {
    fn next(&mut self) -> Result<Option<EncodedEvents>, Status> {
        let chunk = self
            .snapshots
            .next_chunk(&self.stored.snapshots, CHUNK_BYTES)
            .map_err(storage_status)?;
        if chunk.is_empty() {
            return Ok(None);
        }
        let events = chunk
            .into_iter()
            .map(|(_, bytes)| snapshot(bytes))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(EncodedEvents { events }))
    }

    fn is_done(&self) -> bool {
        self.snapshots.is_done()
    }
}

#[tonic::async_trait]
impl EventStorage for Service {
    #[tracing::instrument(skip_all, fields(context))]
    async fn append_event(&self, request: Request<Streaming<Event>>) -> Result<Response<Confirmation>, Status> {
        let context = context_of(&self.contexts, &request)?;
        tracing::Span::current().record("context", context.name.as_str());
        let mut stream = request.into_inner();
        let mut tx = Transaction::default();
        let mut bytes = 0usize;
        // The transaction is whatever arrives before the client half-closes; a broken stream
        // returns here with an error and nothing of it is stored.
        while let Some(event) = stream.message().await? {
            check_event(&event)?;
            let record = record_of(&event, Kind::Events);
            bytes += myelin_proto::limits::event_cost(record.encoded.len());
            if bytes > self.max_transaction_bytes {
                return Err(ErrorCode::PayloadTooLarge.status(format!(
                    "transaction exceeds the maximum size of {} bytes",
                    self.max_transaction_bytes
                )));
            }
            tx.events.push(record);
        }
        if tx.events.is_empty() {
            return Ok(Response::new(Confirmation { success: true }));
        }
        let outcome = crate::forward::append(&context, Work::Events(tx))
            .await
            .map_err(|e| append_status(&context.name, e))?;
        outcome_status(outcome)?;
        Ok(Response::new(Confirmation { success: true }))
    }

    #[tracing::instrument(skip_all, fields(context))]
    async fn append_snapshot(&self, request: Request<Event>) -> Result<Response<Confirmation>, Status> {
        let context = context_of(&self.contexts, &request)?;
        tracing::Span::current().record("context", context.name.as_str());
        let event = request.into_inner();
        check_snapshot(&event.aggregate_identifier, event.aggregate_sequence_number)?;
        check_event(&event)?;
        let outcome = crate::forward::append(&context, Work::Snapshot(record_of(&event, Kind::Snapshots)))
            .await
            .map_err(|e| append_status(&context.name, e))?;
        outcome_status(outcome)?;
        Ok(Response::new(Confirmation { success: true }))
    }

    type AppendsStream = ReceiverStream<Result<AppendResponse, Status>>;

    async fn appends(
        &self,
        request: Request<Streaming<AppendRequest>>,
    ) -> Result<Response<Self::AppendsStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let contexts = self.contexts.clone();
        let max = self.max_transaction_bytes;
        tokio::spawn(async move {
            // Each request is appended on its own task so that they can share batches.
            while let Ok(Some(request)) = requests.message().await {
                let tx = tx.clone();
                let contexts = contexts.clone();
                tokio::spawn(async move {
                    let id = request.id;
                    let result = store_request(&contexts, max, request).await;
                    let _ = tx.send(Ok(response_of(id, result))).await;
                });
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ListAggregateEventsStream = EventStream;

    #[tracing::instrument(skip_all, fields(context, aggregate))]
    async fn list_aggregate_events(
        &self,
        request: Request<GetAggregateEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let context = context_of(&self.contexts, &request)?;
        // Every event committed before this call is in what it reads.
        crate::forward::read_barrier(&context)
            .await
            .map_err(|e| append_status(&context.name, e))?;
        let req = request.into_inner();
        tracing::Span::current().record("aggregate", req.aggregate_id.as_str());
        let upper = if req.max_sequence > 0 {
            req.max_sequence
        } else {
            i64::MAX
        };
        chunked(AggregateRead {
            stored: context.stored.clone(),
            aggregate_id: req.aggregate_id,
            initial: req.initial_sequence,
            upper,
            allow_snapshots: req.allow_snapshots,
            events: None,
        })
        .await
    }

    type ListAggregateSnapshotsStream = EventStream;

    #[tracing::instrument(skip_all, fields(context, aggregate))]
    async fn list_aggregate_snapshots(
        &self,
        request: Request<GetAggregateSnapshotsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let context = context_of(&self.contexts, &request)?;
        // Every event committed before this call is in what it reads.
        crate::forward::read_barrier(&context)
            .await
            .map_err(|e| append_status(&context.name, e))?;
        let req = request.into_inner();
        tracing::Span::current().record("aggregate", req.aggregate_id.as_str());
        // The upper bound is exclusive as in Axon Server, and 0 means unbounded.
        let upper = if req.max_sequence > 0 {
            req.max_sequence - 1
        } else {
            i64::MAX
        };
        let limit = if req.max_results > 0 {
            req.max_results as usize
        } else {
            usize::MAX
        };
        // Highest sequence first (the newest of equal ones first); opening the cursor only
        // looks at the bloom filters and the open segment's index.
        let snapshots =
            context
                .stored
                .snapshots
                .aggregate_snapshots(&req.aggregate_id, req.initial_sequence..=upper, limit);
        chunked(SnapshotsRead {
            stored: context.stored.clone(),
            snapshots,
        })
        .await
    }

    type ListEventsStream = ReceiverStream<Result<EncodedEventsWithToken, Status>>;

    async fn list_events(
        &self,
        request: Request<Streaming<GetEventsRequest>>,
    ) -> Result<Response<Self::ListEventsStream>, Status> {
        let context = context_of(&self.contexts, &request)?;
        let mut requests = request.into_inner();
        let first = tracking::first_request(&mut requests).await?;
        // A follower serves the stream from its own replica as it applies entries. Asked to read
        // from the leader, it first waits until it has applied everything the leader had
        // committed when the stream started: the same events, in the same order, as the leader
        // would send.
        if first.force_read_from_leader {
            crate::forward::read_barrier(&context)
                .await
                .map_err(|e| append_status(&context.name, e))?;
        }
        let rx = tracking::start(context, first, requests, self.blacklist)?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn read_highest_sequence_nr(
        &self,
        request: Request<ReadHighestSequenceNrRequest>,
    ) -> Result<Response<ReadHighestSequenceNrResponse>, Status> {
        let context = context_of(&self.contexts, &request)?;
        // Every event committed before this call is in what it reads.
        crate::forward::read_barrier(&context)
            .await
            .map_err(|e| append_status(&context.name, e))?;
        let id = request.into_inner().aggregate_id;
        let stored = context.stored.clone();
        let last = blocking(move || stored.events.last_sequence(&id)).await?;
        Ok(Response::new(ReadHighestSequenceNrResponse {
            to_sequence_nr: last.unwrap_or(-1),
        }))
    }

    async fn get_first_token(&self, request: Request<GetFirstTokenRequest>) -> Result<Response<TrackingToken>, Status> {
        let context = context_of(&self.contexts, &request)?;
        // Tokens too: on a follower, a client that was just told its append is stored must
        // find it behind the last token, wherever it asks.
        crate::forward::read_barrier(&context)
            .await
            .map_err(|e| append_status(&context.name, e))?;
        Ok(Response::new(TrackingToken {
            token: context.stored.events.first_token(),
        }))
    }

    async fn get_last_token(&self, request: Request<GetLastTokenRequest>) -> Result<Response<TrackingToken>, Status> {
        let context = context_of(&self.contexts, &request)?;
        crate::forward::read_barrier(&context)
            .await
            .map_err(|e| append_status(&context.name, e))?;
        Ok(Response::new(TrackingToken {
            token: context.stored.events.next_token() - 1,
        }))
    }

    async fn get_token_at(&self, request: Request<GetTokenAtRequest>) -> Result<Response<TrackingToken>, Status> {
        let context = context_of(&self.contexts, &request)?;
        crate::forward::read_barrier(&context)
            .await
            .map_err(|e| append_status(&context.name, e))?;
        let instant = request.into_inner().instant;
        let stored = context.stored.clone();
        let found = blocking(move || tracking::token_at(&stored.events, instant)).await?;
        crate::metrics::context(&context.name)
            .token_at_records_read
            .increment(u64::from(found.records_read));
        Ok(Response::new(TrackingToken { token: found.token }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::EntryRef;
    use crate::stored::Limits;
    use myelin_proto::axon::SerializedObject;

    fn event(aggregate: &str, sequence: i64, size: usize) -> Event {
        Event {
            message_identifier: format!("{aggregate}-{sequence}-{size}"),
            aggregate_identifier: aggregate.to_owned(),
            aggregate_sequence_number: sequence,
            aggregate_type: "Test".to_owned(),
            payload: Some(SerializedObject {
                r#type: "T".to_owned(),
                revision: String::new(),
                data: bytes::Bytes::from(vec![b'x'; size]),
            }),
            ..Default::default()
        }
    }

    fn ids(messages: &[EncodedEvents]) -> Vec<String> {
        messages
            .iter()
            .flat_map(|m| &m.events)
            .map(|bytes| Event::decode(bytes.clone()).unwrap().message_identifier)
            .collect()
    }

    /// `ListAggregateEvents` chunk by chunk: the newest snapshot in range, then the events
    /// after it, across segments and chunks, the same as the whole read gives; each message
    /// about a chunk.
    #[test]
    fn aggregate_reads_give_the_newest_snapshot_then_the_events_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            event_segment_size: 300 << 10,
            snapshot_segment_size: 300 << 10,
        };
        let stored = Arc::new(StoredContext::open("test", dir.path(), limits).unwrap());
        let mut index = 0;
        let mut entry = || {
            index += 1;
            EntryRef {
                term: 1,
                leader: 1,
                index,
            }
        };
        for seq in 0..40 {
            // Events of 1 byte to 100 KiB, with another aggregate in between.
            let size = [1, 100 << 10, 3000, 60 << 10][seq as usize % 4];
            let events = vec![
                record_of(&event("a", seq, size), Kind::Events),
                record_of(&event("b", seq, 10), Kind::Events),
            ];
            stored
                .apply(
                    entry(),
                    &crate::command::Command::AppendEvents(vec![Transaction { events }]),
                )
                .unwrap();
            if seq % 9 == 5 {
                let snapshot = record_of(&event("a", seq, 50 << 10), Kind::Snapshots);
                stored
                    .apply(entry(), &crate::command::Command::AppendSnapshots(vec![snapshot]))
                    .unwrap();
            }
        }
        assert!(stored.events.closed_segments().len() > 3);
        let read = |initial: i64, upper: i64, allow_snapshots: bool| {
            let mut read = AggregateRead {
                stored: stored.clone(),
                aggregate_id: "a".into(),
                initial,
                upper,
                allow_snapshots,
                events: None,
            };
            let mut messages = Vec::new();
            while let Some(message) = read.next().unwrap() {
                messages.push(message);
            }
            assert!(read.is_done());
            messages
        };
        let names = |range: std::ops::Range<i64>| -> Vec<String> {
            range
                .map(|s| format!("a-{s}-{}", [1, 100 << 10, 3000, 60 << 10][s as usize % 4]))
                .collect()
        };
        // Without snapshots: every event, in messages of about a chunk.
        let all = read(0, i64::MAX, false);
        assert_eq!(ids(&all), names(0..40));
        assert!(all.len() > 5);
        for message in &all {
            let bytes: Vec<usize> = message.events.iter().map(|e| e.len()).collect();
            assert!(
                bytes[..bytes.len() - 1].iter().sum::<usize>() < CHUNK_BYTES,
                "{bytes:?}"
            );
        }
        // With snapshots: the newest one (sequence 32), then 33 on.
        let mut expected = vec![format!("a-32-{}", 50 << 10)];
        expected.extend(names(33..40));
        assert_eq!(ids(&read(0, i64::MAX, true)), expected);
        // Bounded above: the newest snapshot at or below the bound (23), events to the bound.
        let mut expected = vec![format!("a-23-{}", 50 << 10)];
        expected.extend(names(24..31));
        assert_eq!(ids(&read(0, 30, true)), expected);
        // A snapshot at the bound leaves no events; a range below every snapshot has none.
        assert_eq!(ids(&read(0, 23, true)), vec![format!("a-23-{}", 50 << 10)]);
        assert_eq!(ids(&read(0, 4, true)), names(0..5));
        assert!(read(100, i64::MAX, true).is_empty());
    }
}
