//! `null-server`: a gRPC server that speaks the same client API as a node but does no work at
//! all — an append is confirmed as soon as its stream ends (nothing stored, no fsync), a
//! command or query is answered at once by the server itself (no handler, no routing).
//!
//! Why: on a 2-core machine the load generator shares the CPU with the server, and a gRPC call
//! over HTTP/2 has a price of its own on both sides. Running a workload against this server
//! measures that floor: the most round trips/s any server with this API could reach here with
//! this client. A target above the floor cannot be met on this machine by server work alone.

use std::net::SocketAddr;
use std::pin::Pin;

use futures::Stream;
use myelin_proto::axon::SerializedObject;
use myelin_proto::axon::command::command_service_server::{CommandService, CommandServiceServer};
use myelin_proto::axon::command::{Command, CommandProviderInbound, CommandProviderOutbound, CommandResponse};
use myelin_proto::axon::event::event_store_server::{EventStore, EventStoreServer};
use myelin_proto::axon::event::{
    Confirmation, ConfirmationWithConsistencyMarker, Event, EventWithToken, GetAggregateEventsRequest,
    GetAggregateSnapshotsRequest, GetEventsRequest, GetFirstTokenRequest, GetLastTokenRequest, GetTokenAtRequest,
    QueryEventsRequest, QueryEventsResponse, ReadHighestSequenceNrRequest, ReadHighestSequenceNrResponse,
    TrackingToken,
};
use myelin_proto::axon::query::query_service_server::{QueryService, QueryServiceServer};
use myelin_proto::axon::query::{
    QueryProviderInbound, QueryProviderOutbound, QueryRequest, QueryResponse, SubscriptionQueryRequest,
    SubscriptionQueryResponse,
};
use tonic::{Request, Response, Status, Streaming};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address to serve the client API on.
    #[arg(long, default_value = "127.0.0.1:8124")]
    pub listen: SocketAddr,
    /// Bytes of payload in each command and query response.
    #[arg(long, default_value_t = 16)]
    pub response_bytes: usize,
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn not_here<T>() -> Result<T, Status> {
    Err(Status::unimplemented(
        "the null server only confirms appends and answers dispatches",
    ))
}

#[derive(Clone)]
struct Null {
    payload: SerializedObject,
}

#[tonic::async_trait]
impl EventStore for Null {
    async fn append_event(
        &self,
        request: Request<Streaming<Event>>,
    ) -> Result<Response<ConfirmationWithConsistencyMarker>, Status> {
        let mut events = request.into_inner();
        // Decoded like a real server must, then dropped.
        while events.message().await?.is_some() {}
        Ok(Response::new(ConfirmationWithConsistencyMarker {
            success: true,
            consistency_marker: None,
        }))
    }

    async fn append_snapshot(&self, _: Request<Event>) -> Result<Response<Confirmation>, Status> {
        Ok(Response::new(Confirmation { success: true }))
    }

    type ListAggregateEventsStream = Boxed<Event>;
    async fn list_aggregate_events(
        &self,
        _: Request<GetAggregateEventsRequest>,
    ) -> Result<Response<Self::ListAggregateEventsStream>, Status> {
        not_here()
    }

    type ListAggregateSnapshotsStream = Boxed<Event>;
    async fn list_aggregate_snapshots(
        &self,
        _: Request<GetAggregateSnapshotsRequest>,
    ) -> Result<Response<Self::ListAggregateSnapshotsStream>, Status> {
        not_here()
    }

    type ListEventsStream = Boxed<EventWithToken>;
    async fn list_events(
        &self,
        _: Request<Streaming<GetEventsRequest>>,
    ) -> Result<Response<Self::ListEventsStream>, Status> {
        not_here()
    }

    async fn read_highest_sequence_nr(
        &self,
        _: Request<ReadHighestSequenceNrRequest>,
    ) -> Result<Response<ReadHighestSequenceNrResponse>, Status> {
        // Every aggregate is new: the hot-aggregate appends of a workload start from scratch.
        Ok(Response::new(ReadHighestSequenceNrResponse { to_sequence_nr: -1 }))
    }

    type QueryEventsStream = Boxed<QueryEventsResponse>;
    async fn query_events(
        &self,
        _: Request<Streaming<QueryEventsRequest>>,
    ) -> Result<Response<Self::QueryEventsStream>, Status> {
        not_here()
    }

    async fn get_first_token(&self, _: Request<GetFirstTokenRequest>) -> Result<Response<TrackingToken>, Status> {
        Ok(Response::new(TrackingToken { token: 0 }))
    }

    async fn get_last_token(&self, _: Request<GetLastTokenRequest>) -> Result<Response<TrackingToken>, Status> {
        Ok(Response::new(TrackingToken { token: -1 }))
    }

    async fn get_token_at(&self, _: Request<GetTokenAtRequest>) -> Result<Response<TrackingToken>, Status> {
        Ok(Response::new(TrackingToken { token: 0 }))
    }
}

#[tonic::async_trait]
impl CommandService for Null {
    type OpenStreamStream = Boxed<CommandProviderInbound>;
    async fn open_stream(
        &self,
        _: Request<Streaming<CommandProviderOutbound>>,
    ) -> Result<Response<Self::OpenStreamStream>, Status> {
        not_here()
    }

    async fn dispatch(&self, request: Request<Command>) -> Result<Response<CommandResponse>, Status> {
        let command = request.into_inner();
        Ok(Response::new(CommandResponse {
            message_identifier: String::new(),
            request_identifier: command.message_identifier,
            payload: Some(self.payload.clone()),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl QueryService for Null {
    type OpenStreamStream = Boxed<QueryProviderInbound>;
    async fn open_stream(
        &self,
        _: Request<Streaming<QueryProviderOutbound>>,
    ) -> Result<Response<Self::OpenStreamStream>, Status> {
        not_here()
    }

    type QueryStream = Boxed<QueryResponse>;
    async fn query(&self, request: Request<QueryRequest>) -> Result<Response<Self::QueryStream>, Status> {
        let query = request.into_inner();
        let response = QueryResponse {
            request_identifier: query.message_identifier,
            payload: Some(self.payload.clone()),
            ..Default::default()
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(response)]))))
    }

    type SubscriptionStream = Boxed<SubscriptionQueryResponse>;
    async fn subscription(
        &self,
        _: Request<Streaming<SubscriptionQueryRequest>>,
    ) -> Result<Response<Self::SubscriptionStream>, Status> {
        not_here()
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let null = Null {
        payload: SerializedObject {
            r#type: "NullResponse".to_owned(),
            revision: String::new(),
            data: vec![b'n'; args.response_bytes].into(),
        },
    };
    eprintln!("null server on {} (answers without doing any work)", args.listen);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(EventStoreServer::new(null.clone()))
        .add_service(CommandServiceServer::new(null.clone()))
        .add_service(QueryServiceServer::new(null))
        .serve_with_shutdown(args.listen, crate::common::stop_signal(None))
        .await?;
    Ok(())
}
