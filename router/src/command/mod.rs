//! `CommandService`: command handlers connect with `OpenStream`, senders call `Dispatch`.
//!
//! The layers, so that routing across nodes can be added without a rewrite:
//! - [`registry`]: who handles what, per context and command name, with a consistent-hash ring
//!   weighted by load factor. It sees handlers only as [`registry::HandlerLink`]s.
//! - [`handler`]: how a command reaches a handler connected here (a bounded queue drained while
//!   the handler has permits); [`remote`]: a handler connected to another node of the cluster,
//!   reached over the peer link.
//! - [`dispatch`]: commands in flight, matched to responses by id; every way a command can fail
//!   (no handler, duplicate id, full queue, lost handler, timeout) ends in an in-band error.
//! - this file: the gRPC service; it decodes, calls the layers above and encodes. It also keeps
//!   each handler stream's subscriptions within `myelin.limits.command-subscriptions-per-stream`
//!   and `subscription-bytes-per-stream`: a subscribe beyond them is refused on that stream
//!   (a failed ack, AXONIQ-1900) and changes nothing.

pub mod dispatch;
pub mod handler;
pub mod metrics;
pub mod registry;
pub mod remote;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use myelin_proto::axon::command::command_provider_inbound::Request as Inbound;
use myelin_proto::axon::command::command_provider_outbound::Request as Outbound;
use myelin_proto::axon::command::command_service_server::CommandService;
use myelin_proto::axon::command::{Command, CommandProviderInbound, CommandProviderOutbound, CommandResponse};
use myelin_proto::axon::{ErrorMessage, InstructionAck};
use myelin_proto::errors::ErrorCode;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::context::client_context;
use crate::handler_limits::{HandlerLimits, StreamSubscriptions, subscription_cost};
use crate::platform::Disconnects;
use dispatch::Dispatcher;
use handler::{LocalHandler, Outgoing};
use registry::HandlerLink;

/// The limit a command stream's subscription count is refused by.
const SUBSCRIPTIONS_KEY: &str = "myelin.limits.command-subscriptions-per-stream";

/// Messages buffered towards one handler stream (commands are further bounded by permits).
const OUTBOUND_BUFFER: usize = 64;

/// The gRPC service.
#[derive(Clone)]
pub struct Commands {
    dispatcher: Arc<Dispatcher>,
    node_name: String,
    disconnects: Disconnects,
    limits: HandlerLimits,
}

impl Commands {
    pub fn new(node_name: String, default_timeout: Duration, limits: HandlerLimits) -> Commands {
        Commands {
            dispatcher: Arc::new(Dispatcher::new(default_timeout, limits.command_queue_bytes)),
            node_name,
            disconnects: Disconnects::new(),
            limits,
        }
    }

    /// Ends a client's handler streams when its control stream gives up on it.
    pub fn with_disconnects(mut self, disconnects: Disconnects) -> Commands {
        self.disconnects = disconnects;
        self
    }

    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }
}

#[tonic::async_trait]
impl CommandService for Commands {
    type OpenStreamStream = Pin<Box<dyn Stream<Item = Result<CommandProviderInbound, Status>> + Send>>;

    async fn open_stream(
        &self,
        request: Request<Streaming<CommandProviderOutbound>>,
    ) -> Result<Response<Self::OpenStreamStream>, Status> {
        let context = client_context(&request)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let link = Arc::new(LocalHandler::new(
            &self.node_name,
            self.limits.command_queue_capacity,
            self.limits.command_queue_bytes_per_client,
        ));
        let subscriptions = StreamSubscriptions::new(
            self.limits.command_subscriptions_per_stream,
            self.limits.subscription_bytes_per_stream,
        );
        let pump = tokio::spawn({
            let link = link.clone();
            let tx = tx.clone();
            async move { link.pump(tx).await }
        });
        let dispatcher = self.dispatcher.clone();
        let node_name = self.node_name.clone();
        let mut disconnects = self.disconnects.listen();
        tokio::spawn(async move {
            let mut stream = HandlerStream {
                context,
                link,
                dispatcher,
                node_name,
                subscriptions,
            };
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    disconnect = disconnects.next() => {
                        if !disconnect.concerns(&stream.context, &stream.link.client_id()) {
                            continue;
                        }
                        let status = disconnect.status("Command");
                        tracing::info!(client_id = %stream.link.client_id(), "{}", status.message());
                        let _ = tx.try_send(Outgoing::plain(Err(status)));
                        break;
                    }
                };
                match message {
                    Ok(Some(message)) => {
                        if let Some(ack) = stream.on_message(message)
                            && tx.send(Outgoing::plain(Ok(ack))).await.is_err()
                        {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(error = %status, "command handler stream failed");
                        let _ = tx.try_send(Outgoing::plain(Err(crate::limits::client_stream_error(status))));
                        break;
                    }
                }
            }
            let unsent = stream.link.close();
            stream.dispatcher.handler_closed(stream.link.as_ref(), unsent);
            let _ = pump.await;
        });
        // Taking a message for the wire returns the bytes it held.
        let messages = ReceiverStream::new(rx).map(|outgoing: Outgoing| outgoing.message);
        Ok(Response::new(Box::pin(messages)))
    }

    async fn dispatch(&self, request: Request<Command>) -> Result<Response<CommandResponse>, Status> {
        let context = client_context(&request)?;
        let response = self.dispatcher.dispatch(&context, request.into_inner()).await;
        Ok(Response::new(response))
    }
}

/// The server side of one handler's `OpenStream`.
struct HandlerStream {
    context: String,
    link: Arc<LocalHandler>,
    dispatcher: Arc<Dispatcher>,
    node_name: String,
    subscriptions: StreamSubscriptions,
}

/// Why a handler's message was not acted on: the code and text of the failed ack.
type Refusal = (ErrorCode, String);

fn unsupported(reason: &str) -> Refusal {
    (ErrorCode::UnsupportedInstruction, reason.to_owned())
}

impl HandlerStream {
    /// Applies one message from the handler; returns the acknowledgement to send, if any.
    fn on_message(&mut self, message: CommandProviderOutbound) -> Option<CommandProviderInbound> {
        let outcome = match message.request {
            Some(Outbound::Subscribe(subscription)) => {
                let points = registry::effective_load_factor(subscription.load_factor) as usize;
                let cost = subscription_cost(&[&subscription.command, &self.context], points);
                if subscription.command.is_empty() {
                    Err(unsupported("subscription without a command name"))
                } else if let Err(refused) = self.subscriptions.admit(&subscription.command, cost, SUBSCRIPTIONS_KEY) {
                    Err((
                        ErrorCode::TooManyRequests,
                        format!("Subscription to {} refused: {refused}", subscription.command),
                    ))
                } else {
                    self.link.bind_client(&subscription.client_id);
                    self.link.bind_component(&subscription.component_name);
                    let link: Arc<dyn HandlerLink> = self.link.clone();
                    self.dispatcher.registry().subscribe(
                        &self.context,
                        &subscription.command,
                        link,
                        subscription.load_factor,
                    );
                    tracing::debug!(client_id = %subscription.client_id, command = %subscription.command, "command handler subscribed");
                    Ok(())
                }
            }
            Some(Outbound::Unsubscribe(subscription)) => {
                self.subscriptions.remove(&subscription.command);
                self.dispatcher
                    .registry()
                    .unsubscribe(&self.context, &subscription.command, self.link.id());
                Ok(())
            }
            Some(Outbound::FlowControl(flow)) => {
                self.link.bind_client(&flow.client_id);
                if flow.permits < 0 {
                    Err(unsupported("negative permits"))
                } else {
                    self.link.grant(flow.permits);
                    Ok(())
                }
            }
            Some(Outbound::CommandResponse(response)) => {
                self.dispatcher.respond(self.link.id(), response);
                Ok(())
            }
            Some(Outbound::Ack(_)) => Ok(()),
            None => Err(unsupported("Unsupported instruction")),
        };
        match &outcome {
            // A stream that keeps subscribing beyond its limits is logged once, not per subscribe.
            Err((ErrorCode::TooManyRequests, reason)) if self.subscriptions.refused() > 1 => {
                tracing::debug!(client_id = %self.link.client_id(), %reason, "command subscription refused");
            }
            Err((_, reason)) => {
                tracing::warn!(client_id = %self.link.client_id(), %reason, "command handler message rejected");
            }
            Ok(()) => {}
        }
        if message.instruction_id.is_empty() {
            return None;
        }
        let error = outcome.err().map(|(code, reason)| ErrorMessage {
            details: match code {
                ErrorCode::UnsupportedInstruction => vec!["Unsupported instruction".to_owned()],
                _ => Vec::new(),
            },
            message: reason,
            location: self.node_name.clone(),
            error_code: code.code().to_owned(),
        });
        Some(CommandProviderInbound {
            request: Some(Inbound::Ack(InstructionAck {
                instruction_id: message.instruction_id,
                success: error.is_none(),
                error,
            })),
            instruction_id: String::new(),
        })
    }
}
