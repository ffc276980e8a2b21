//! Axon's `QueryService` over gRPC: decodes, calls the context's routing, encodes.
//!
//! It also keeps each handler stream's subscriptions within
//! `myelin.limits.query-subscriptions-per-stream` (distinct query name and result name pairs, as
//! Axon Framework subscribes one per handler method) and `subscription-bytes-per-stream`: a
//! subscribe beyond them is refused on that stream (a failed ack, AXONIQ-1900) and changes
//! nothing.

use std::pin::Pin;

use futures::Stream;
use myelin_proto::axon::InstructionAck;
use myelin_proto::axon::query::query_provider_inbound::Request as Inbound;
use myelin_proto::axon::query::query_provider_outbound::Request as Outbound;
use myelin_proto::axon::query::query_service_server::QueryService;
use myelin_proto::axon::query::{
    QueryProviderInbound, QueryProviderOutbound, QueryRequest, QueryResponse, SubscriptionQueryRequest,
    SubscriptionQueryResponse,
};
use myelin_proto::errors::ErrorCode;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::handler::{Destination, inbound};
use super::{ContextQueries, QueryRouter};
use crate::context::client_context;
use crate::handler_limits::{StreamSubscriptions, subscription_cost};
use crate::platform::Disconnects;

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct QueryEndpoint {
    pub router: QueryRouter,
    /// Ends a client's handler streams when its control stream gives up on it.
    pub disconnects: Disconnects,
}

#[tonic::async_trait]
impl QueryService for QueryEndpoint {
    type OpenStreamStream = Boxed<QueryProviderInbound>;

    #[tracing::instrument(skip_all, fields(context))]
    async fn open_stream(
        &self,
        request: Request<Streaming<QueryProviderOutbound>>,
    ) -> Result<Response<Self::OpenStreamStream>, Status> {
        let context = client_context(&request)?;
        tracing::Span::current().record("context", context.as_str());
        let queries = self.router.context(&context);
        let id = self.router.next_handler_id();
        let (local, permits, stream) = self.router.start_handler();
        let limits = self.router.limits();
        let mut subscriptions = StreamSubscriptions::new(
            limits.query_subscriptions_per_stream,
            limits.subscription_bytes_per_stream,
        );
        let destination = Destination::Local(local);
        let mut messages = request.into_inner();
        let errors = stream.errors;
        let mut disconnects = self.disconnects.listen();
        tokio::spawn(async move {
            // The client this stream serves: the first client id its messages name.
            let mut client_id = String::new();
            loop {
                let message = tokio::select! {
                    message = messages.message() => message,
                    disconnect = disconnects.next() => {
                        if !disconnect.concerns(&context, &client_id) {
                            continue;
                        }
                        let status = disconnect.status("Query");
                        tracing::info!(%client_id, "{}", status.message());
                        let _ = errors.try_send(Err(status));
                        break;
                    }
                };
                match message {
                    Ok(Some(message)) => {
                        if client_id.is_empty() {
                            client_id = named_client(&message).to_owned();
                        }
                        let instruction_id = message.instruction_id.clone();
                        let outcome = handle(&queries, id, &destination, &permits, &mut subscriptions, message).await;
                        match &outcome {
                            // Logged once per stream, however often a client keeps trying.
                            Err((ErrorCode::TooManyRequests, error)) if subscriptions.refused() == 1 => {
                                tracing::warn!(%client_id, %error, "query handler subscription refused");
                            }
                            Err((_, error)) => tracing::debug!(%error, "bad message on a query handler stream"),
                            Ok(()) => {}
                        }
                        if !instruction_id.is_empty() {
                            let ack = ack(&queries, instruction_id, outcome);
                            let _ = destination.send_control(ack);
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        let _ = errors.send(Err(crate::limits::client_stream_error(status))).await;
                        break;
                    }
                }
            }
            queries.handler_gone(id).await;
        });
        Ok(Response::new(Box::pin(stream.messages)))
    }

    type QueryStream = Boxed<QueryResponse>;

    #[tracing::instrument(skip_all, fields(context, query))]
    async fn query(&self, request: Request<QueryRequest>) -> Result<Response<Self::QueryStream>, Status> {
        let context = client_context(&request)?;
        tracing::Span::current().record("context", context.as_str());
        tracing::Span::current().record("query", request.get_ref().query.as_str());
        let responses = self.router.context(&context).query(request.into_inner());
        Ok(Response::new(Box::pin(responses)))
    }

    type SubscriptionStream = Boxed<SubscriptionQueryResponse>;

    async fn subscription(
        &self,
        request: Request<Streaming<SubscriptionQueryRequest>>,
    ) -> Result<Response<Self::SubscriptionStream>, Status> {
        let context = client_context(&request)?;
        let updates = self.router.context(&context).subscription(request.into_inner());
        Ok(Response::new(Box::pin(ReceiverStream::new(updates))))
    }
}

/// The client id a handler's message names, if any.
fn named_client(message: &QueryProviderOutbound) -> &str {
    match &message.request {
        Some(Outbound::Subscribe(subscription)) => &subscription.client_id,
        Some(Outbound::FlowControl(flow)) => &flow.client_id,
        _ => "",
    }
}

/// Why a handler's message was not acted on: the code and text of the failed ack.
type Refusal = (ErrorCode, String);

fn unsupported(reason: &str) -> Refusal {
    (ErrorCode::UnsupportedInstruction, reason.to_owned())
}

/// The limit a query stream's subscription count is refused by.
const SUBSCRIPTIONS_KEY: &str = "myelin.limits.query-subscriptions-per-stream";

/// How a stream's subscription is keyed for its limits: query name and result name.
fn subscription_key(query: &str, result_name: &str) -> String {
    format!("{query}\u{0}{result_name}")
}

/// Acts on one message from a handler; an error is a message the node cannot act on.
async fn handle(
    queries: &ContextQueries,
    id: super::handler::HandlerId,
    destination: &Destination,
    permits: &super::handler::Permits,
    subscriptions: &mut StreamSubscriptions,
    message: QueryProviderOutbound,
) -> Result<(), Refusal> {
    match message.request {
        Some(Outbound::Subscribe(subscription)) => {
            if subscription.query.is_empty() {
                return Err(unsupported("subscribe names no query"));
            }
            let key = subscription_key(&subscription.query, &subscription.result_name);
            let cost = subscription_cost(
                &[
                    &subscription.query,
                    &subscription.result_name,
                    &subscription.component_name,
                    &subscription.client_id,
                ],
                0,
            );
            subscriptions.admit(&key, cost, SUBSCRIPTIONS_KEY).map_err(|refused| {
                (
                    ErrorCode::TooManyRequests,
                    format!("Subscription to {} refused: {refused}", subscription.query),
                )
            })?;
            queries.subscribe_handler(id, destination, &subscription);
        }
        Some(Outbound::Unsubscribe(subscription)) => {
            if subscription.query.is_empty() {
                return Err(unsupported("unsubscribe names no query"));
            }
            // The registry forgets the handler for the whole query name: so do the limits.
            let prefix = subscription_key(&subscription.query, "");
            subscriptions.remove_where(|key| key.starts_with(&prefix));
            queries.unsubscribe_handler(id, &subscription.query);
        }
        Some(Outbound::FlowControl(flow)) => permits.grant(flow.permits),
        Some(Outbound::QueryResponse(response)) => queries.relay_response(id, response).await,
        Some(Outbound::QueryComplete(complete)) => queries.relay_complete(id, &complete.request_id).await,
        Some(Outbound::SubscriptionQueryResponse(response)) => {
            queries.relay_subscription_response(id, response).await;
        }
        Some(Outbound::Ack(_)) => {}
        None => return Err(unsupported("Unsupported instruction")),
    }
    Ok(())
}

fn ack(queries: &ContextQueries, instruction_id: String, outcome: Result<(), Refusal>) -> QueryProviderInbound {
    let error = outcome.err().map(|(code, message)| {
        let mut error = queries.error(code, message);
        if code == ErrorCode::UnsupportedInstruction {
            error.details.push("Unsupported instruction".to_owned());
        }
        error
    });
    inbound(Inbound::Ack(InstructionAck {
        instruction_id,
        success: error.is_none(),
        error,
    }))
}
