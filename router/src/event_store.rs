//! The client-facing `EventStore` service: relays each call to the eventstore process over its
//! Unix socket, naming the client's context.
//!
//! The event reads are served by `event_reads`, which relays them as bytes; the generated
//! server over this relay handles every other call.
//!
//! An append is buffered here until the client half-closes its stream, and only then sent on as
//! a whole: a client stream that breaks mid-transaction never reaches the eventstore, so
//! nothing of it can be stored.

use std::pin::Pin;

use futures::Stream;
use myelin_proto::axon::event::event_store_server::EventStore;
use myelin_proto::axon::event::{
    Confirmation, ConfirmationWithConsistencyMarker, Event, EventWithToken, GetAggregateEventsRequest,
    GetAggregateSnapshotsRequest, GetEventsRequest, GetFirstTokenRequest, GetLastTokenRequest, GetTokenAtRequest,
    QueryEventsRequest, QueryEventsResponse, ReadHighestSequenceNrRequest, ReadHighestSequenceNrResponse,
    TrackingToken,
};
use myelin_proto::errors::{ErrorCode, relay};
use myelin_proto::internal::event_storage_client::EventStorageClient;
use prost::Message;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::context::client_context;

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct EventStoreRelay {
    pub storage: EventStorageClient<Channel>,
    pub appends: crate::append_pipe::AppendPipe,
    /// The bounds on an AppendEvent call's transaction (see `transaction`).
    pub transactions: crate::transaction::TransactionLimits,
}

/// Builds the internal request for `message`, naming the context.
pub(crate) fn internal<T>(context: &str, message: T) -> Result<Request<T>, Status> {
    let mut request = Request::new(message);
    let value = context
        .parse()
        .map_err(|_| ErrorCode::InvalidContextName.status(format!("invalid context name {context:?}")))?;
    request.metadata_mut().insert(myelin_proto::CONTEXT_KEY, value);
    Ok(request)
}

pub(crate) fn relayed(status: Status) -> Status {
    if status.code() == tonic::Code::Unavailable
        && status.metadata().get(myelin_proto::errors::ERROR_CODE_KEY).is_none()
    {
        return Status::unavailable(format!(
            "the event store of this node is not available: {}",
            status.message()
        ));
    }
    relay(status)
}

fn served_by_event_reads() -> Status {
    Status::internal("event reads are served by event_reads::EventStoreService, not by the relay")
}

#[tonic::async_trait]
impl EventStore for EventStoreRelay {
    #[tracing::instrument(skip_all, fields(context))]
    async fn append_event(
        &self,
        request: Request<Streaming<Event>>,
    ) -> Result<Response<ConfirmationWithConsistencyMarker>, Status> {
        let context = client_context(&request)?;
        tracing::Span::current().record("context", context.as_str());
        let mut stream = request.into_inner();
        let transaction = self.transactions.collect(&mut stream).await?;
        // hyper reports a client's RST_STREAM(NO_ERROR) -- what a cancelling client may send --
        // as the end of the body, just like a half-close. Yield once: hyper then checks the
        // stream for a reset and drops this call if there was one, so a cancelled transaction
        // is never committed.
        tokio::task::yield_now().await;
        if !transaction.events.is_empty() {
            self.appends
                .append(&context, transaction.events, false)
                .await
                .map_err(relayed)?;
        }
        Ok(Response::new(ConfirmationWithConsistencyMarker {
            success: true,
            consistency_marker: None,
        }))
    }

    #[tracing::instrument(skip_all, fields(context))]
    async fn append_snapshot(&self, request: Request<Event>) -> Result<Response<Confirmation>, Status> {
        let context = client_context(&request)?;
        tracing::Span::current().record("context", context.as_str());
        let encoded = bytes::Bytes::from(request.into_inner().encode_to_vec());
        self.appends
            .append(&context, vec![encoded], true)
            .await
            .map_err(relayed)?;
        Ok(Response::new(Confirmation { success: true }))
    }

    // The three reads never reach the relay: `event_reads::EventStoreService` answers their
    // paths before it hands a call to the generated server.

    type ListAggregateEventsStream = Boxed<Event>;

    async fn list_aggregate_events(
        &self,
        _request: Request<GetAggregateEventsRequest>,
    ) -> Result<Response<Self::ListAggregateEventsStream>, Status> {
        Err(served_by_event_reads())
    }

    type ListAggregateSnapshotsStream = Boxed<Event>;

    async fn list_aggregate_snapshots(
        &self,
        _request: Request<GetAggregateSnapshotsRequest>,
    ) -> Result<Response<Self::ListAggregateSnapshotsStream>, Status> {
        Err(served_by_event_reads())
    }

    type ListEventsStream = Boxed<EventWithToken>;

    async fn list_events(
        &self,
        _request: Request<Streaming<GetEventsRequest>>,
    ) -> Result<Response<Self::ListEventsStream>, Status> {
        Err(served_by_event_reads())
    }

    async fn read_highest_sequence_nr(
        &self,
        request: Request<ReadHighestSequenceNrRequest>,
    ) -> Result<Response<ReadHighestSequenceNrResponse>, Status> {
        let context = client_context(&request)?;
        let request = internal(&context, request.into_inner())?;
        self.storage
            .clone()
            .read_highest_sequence_nr(request)
            .await
            .map_err(relayed)
    }

    type QueryEventsStream = Boxed<QueryEventsResponse>;

    async fn query_events(
        &self,
        _request: Request<Streaming<QueryEventsRequest>>,
    ) -> Result<Response<Self::QueryEventsStream>, Status> {
        Err(Status::unimplemented(
            "QueryEvents (ad-hoc queries over the event store) is not supported by this server yet",
        ))
    }

    async fn get_first_token(&self, request: Request<GetFirstTokenRequest>) -> Result<Response<TrackingToken>, Status> {
        let context = client_context(&request)?;
        let request = internal(&context, request.into_inner())?;
        self.storage.clone().get_first_token(request).await.map_err(relayed)
    }

    async fn get_last_token(&self, request: Request<GetLastTokenRequest>) -> Result<Response<TrackingToken>, Status> {
        let context = client_context(&request)?;
        let request = internal(&context, request.into_inner())?;
        self.storage.clone().get_last_token(request).await.map_err(relayed)
    }

    async fn get_token_at(&self, request: Request<GetTokenAtRequest>) -> Result<Response<TrackingToken>, Status> {
        let context = client_context(&request)?;
        let request = internal(&context, request.into_inner())?;
        self.storage.clone().get_token_at(request).await.map_err(relayed)
    }
}
