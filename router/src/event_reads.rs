//! The client API's event reads (`ListEvents`, `ListAggregateEvents`, `ListAggregateSnapshots`),
//! relayed as bytes: no event is decoded or re-encoded in the router.
//!
//! The eventstore answers these calls with its stored events in batches
//! (`myelin.internal.EncodedEvents*`); every element goes on to the client as one message of the
//! Axon method, wire-identical to what Axon Server sends: an `EncodedEventWithToken` encodes to
//! the bytes of an `EventWithToken`, and an aggregate read's elements are encoded `Event`s
//! written as they are (`myelin_proto::encoded`).
//!
//! [`EventStoreService`] is the `io.axoniq.axonserver.grpc.event.EventStore` service the client
//! server mounts: it answers these three paths itself (and `AppendSnapshot`, to hold it to one
//! message) and hands every other call to the generated server over [`EventStoreRelay`]. It sits behind the same layers as any service
//! (access control and metrics go by the path and the gRPC frames, not by message types), and
//! keeps the relay's behaviour: the client's context, later permit grants flowing on to the
//! eventstore, and error statuses relayed with their AXONIQ codes.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use futures::future::{BoxFuture, Either};
use futures::{Stream, StreamExt};
use myelin_proto::axon::event::event_store_server::EventStore as _;
use myelin_proto::axon::event::event_store_server::{EventStoreServer, SERVICE_NAME};
use myelin_proto::axon::event::{
    Confirmation, Event, GetAggregateEventsRequest, GetAggregateSnapshotsRequest, GetEventsRequest,
};
use myelin_proto::encoded::{EncodedCodec, ProstCodec};
use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::event_storage_client::EventStorageClient;
use myelin_proto::internal::{EncodedEventWithToken, EncodedEvents};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::server::Grpc;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::context::client_context;
use crate::event_store::{EventStoreRelay, internal, relayed};

const LIST_EVENTS: &str = "/io.axoniq.axonserver.grpc.event.EventStore/ListEvents";
const LIST_AGGREGATE_EVENTS: &str = "/io.axoniq.axonserver.grpc.event.EventStore/ListAggregateEvents";
const LIST_AGGREGATE_SNAPSHOTS: &str = "/io.axoniq.axonserver.grpc.event.EventStore/ListAggregateSnapshots";
const APPEND_SNAPSHOT: &str = "/io.axoniq.axonserver.grpc.event.EventStore/AppendSnapshot";

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The client-facing `EventStore` service: event reads relayed as bytes, the rest by the relay.
#[derive(Clone)]
pub struct EventStoreService {
    storage: EventStorageClient<Channel>,
    /// The relay itself, for the one unary call answered here (`AppendSnapshot`).
    direct: EventStoreRelay,
    relay: EventStoreServer<EventStoreRelay>,
    max_decoding_message_size: usize,
    reads: ReadSlots,
}

impl EventStoreService {
    /// `max_decoding_message_size` limits client messages, as on the generated server;
    /// `max_reads` bounds the event reads open at once on the node.
    pub fn new(relay: EventStoreRelay, max_decoding_message_size: usize, max_reads: usize) -> EventStoreService {
        EventStoreService {
            storage: relay.storage.clone(),
            direct: relay.clone(),
            relay: EventStoreServer::new(relay)
                .max_decoding_message_size(max_decoding_message_size)
                .max_encoding_message_size(usize::MAX),
            max_decoding_message_size,
            reads: ReadSlots::new(max_reads),
        }
    }
}

/// The event reads (tracking and aggregate) open at once on the node, bounded.
///
/// A read whose client stopped consuming pins up to its flow-control windows on the way (the
/// internal stream's window here, the eventstore's queue for it: about 1 MiB in all, see
/// docs/limits.md), so their number is bounded; a read beyond it is refused at once with
/// RESOURCE_EXHAUSTED (AXONIQ-1900), never queued behind the others.
#[derive(Clone)]
struct ReadSlots {
    slots: Arc<Semaphore>,
    max: usize,
}

impl ReadSlots {
    fn new(max: usize) -> ReadSlots {
        ReadSlots {
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
        }
    }

    fn take(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            ErrorCode::TooManyRequests.status(format!(
                "this node already serves {} event reads at once, its maximum (myelin.limits.event-reads); try again",
                self.max
            ))
        })
    }
}

/// `stream`, holding `slot` until it is dropped.
fn holding<T: Send + 'static>(slot: OwnedSemaphorePermit, stream: Boxed<T>) -> Boxed<T> {
    Box::pin(stream.map(move |item| {
        let _held = &slot;
        item
    }))
}

impl tonic::server::NamedService for EventStoreService {
    const NAME: &'static str = SERVICE_NAME;
}

impl tower::Service<http::Request<Body>> for EventStoreService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let storage = self.storage.clone();
        let limits = (Some(self.max_decoding_message_size), Some(usize::MAX));
        let reads = self.reads.clone();
        match request.uri().path() {
            LIST_EVENTS => Box::pin(async move {
                let codec = ProstCodec::<EncodedEventWithToken, GetEventsRequest>::default();
                let mut grpc = Grpc::new(codec).apply_max_message_size_config(limits.0, limits.1);
                let method = tower::service_fn(move |r| list_events(storage.clone(), reads.clone(), r));
                Ok(grpc.streaming(method, request).await)
            }),
            LIST_AGGREGATE_EVENTS => Box::pin(async move {
                let codec = EncodedCodec::<GetAggregateEventsRequest>::default();
                let mut grpc = Grpc::new(codec).apply_max_message_size_config(limits.0, limits.1);
                let method = tower::service_fn(move |r| list_aggregate_events(storage.clone(), reads.clone(), r));
                Ok(grpc.server_streaming(method, request).await)
            }),
            LIST_AGGREGATE_SNAPSHOTS => Box::pin(async move {
                let codec = EncodedCodec::<GetAggregateSnapshotsRequest>::default();
                let mut grpc = Grpc::new(codec).apply_max_message_size_config(limits.0, limits.1);
                let method = tower::service_fn(move |r| list_aggregate_snapshots(storage.clone(), reads.clone(), r));
                Ok(grpc.server_streaming(method, request).await)
            }),
            APPEND_SNAPSHOT => {
                let relay = self.direct.clone();
                Box::pin(async move {
                    let codec = ProstCodec::<Confirmation, Event>::default();
                    let mut grpc = Grpc::new(codec).apply_max_message_size_config(limits.0, limits.1);
                    let method = tower::service_fn(move |r| exactly_one_snapshot(relay.clone(), r));
                    Ok(grpc.client_streaming(method, request).await)
                })
            }
            _ => self.relay.call(request),
        }
    }
}

/// `AppendSnapshot` is unary: it carries exactly one snapshot. tonic's unary handling reads the
/// first message and ignores any after it, which silently dropped a second snapshot; the call is
/// read as a stream here and refused, storing nothing, when it holds more or less than one
/// message, as grpc-java (Axon Server) refuses it: INTERNAL, "Too many requests".
async fn exactly_one_snapshot(
    relay: EventStoreRelay,
    request: Request<Streaming<Event>>,
) -> Result<Response<Confirmation>, Status> {
    let (metadata, extensions, mut stream) = request.into_parts();
    let first = stream
        .message()
        .await
        .map_err(crate::limits::client_stream_error)?
        .ok_or_else(|| Status::internal("Half-closed without a request: AppendSnapshot carries one snapshot"))?;
    if stream
        .message()
        .await
        .map_err(crate::limits::client_stream_error)?
        .is_some()
    {
        return Err(Status::internal(
            "Too many requests: AppendSnapshot carries exactly one snapshot; nothing was stored",
        ));
    }
    relay
        .append_snapshot(Request::from_parts(metadata, extensions, first))
        .await
}

/// Each batch of the eventstore's stream as its elements, one client message each; an error
/// ends the stream as the relay reports it.
fn elements<M, T: Send + 'static>(stream: Streaming<M>, split: fn(M) -> Vec<T>) -> Boxed<T>
where
    M: Send + 'static,
{
    Box::pin(stream.flat_map(move |batch| match batch {
        Ok(batch) => Either::Left(futures::stream::iter(split(batch).into_iter().map(Ok))),
        Err(status) => Either::Right(futures::stream::once(futures::future::ready(Err(relayed(status))))),
    }))
}

#[tracing::instrument(skip_all, fields(context))]
async fn list_events(
    storage: EventStorageClient<Channel>,
    reads: ReadSlots,
    request: Request<Streaming<GetEventsRequest>>,
) -> Result<Response<Boxed<EncodedEventWithToken>>, Status> {
    let context = client_context(&request)?;
    tracing::Span::current().record("context", context.as_str());
    let mut inbound = request.into_inner();
    // The first request names the start; one that does not decode is the client's error and is
    // answered as such (the eventstore would only see a stream without a first request).
    let first = inbound
        .message()
        .await
        .map_err(crate::limits::client_stream_error)?
        .ok_or_else(|| Status::invalid_argument("ListEvents needs a first request"))?;
    let slot = reads.take()?;
    // Later permit grants flow on as they come; a client error ends the request stream, which
    // ends the tracker like a half-close.
    let requests = futures::stream::once(futures::future::ready(first)).chain(
        inbound
            .take_while(|r| futures::future::ready(r.is_ok()))
            .filter_map(|r| futures::future::ready(r.ok())),
    );
    let request = internal(&context, requests)?;
    let stream = storage
        .clone()
        .list_events(request)
        .await
        .map_err(relayed)?
        .into_inner();
    Ok(Response::new(holding(slot, elements(stream, |batch| batch.events))))
}

/// An aggregate read (events or snapshots): names the context, makes the internal `call` and
/// relays the elements of its batches.
async fn aggregate_read<R, F, Fut>(
    reads: ReadSlots,
    request: Request<R>,
    call: F,
) -> Result<Response<Boxed<Bytes>>, Status>
where
    F: FnOnce(Request<R>) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Streaming<EncodedEvents>>, Status>>,
{
    let context = client_context(&request)?;
    tracing::Span::current().record("context", context.as_str());
    let slot = reads.take()?;
    let request = internal(&context, request.into_inner())?;
    let stream = call(request).await.map_err(relayed)?.into_inner();
    Ok(Response::new(holding(slot, elements(stream, |batch| batch.events))))
}

#[tracing::instrument(skip_all, fields(context))]
async fn list_aggregate_events(
    mut storage: EventStorageClient<Channel>,
    reads: ReadSlots,
    request: Request<GetAggregateEventsRequest>,
) -> Result<Response<Boxed<Bytes>>, Status> {
    aggregate_read(reads, request, |request| async move {
        storage.list_aggregate_events(request).await
    })
    .await
}

#[tracing::instrument(skip_all, fields(context))]
async fn list_aggregate_snapshots(
    mut storage: EventStorageClient<Channel>,
    reads: ReadSlots,
    request: Request<GetAggregateSnapshotsRequest>,
) -> Result<Response<Boxed<Bytes>>, Status> {
    aggregate_read(reads, request, |request| async move {
        storage.list_aggregate_snapshots(request).await
    })
    .await
}
