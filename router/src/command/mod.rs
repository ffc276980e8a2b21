//! `CommandService`: command handlers connect with `OpenStream`, senders call `Dispatch`.
//!
//! The layers, so that routing across nodes can be added without a rewrite:
//! - [`registry`]: who handles what, per context and command name, with a consistent-hash ring
//!   weighted by load factor. It sees handlers only as [`registry::HandlerLink`]s.
//! - [`handler`]: how a command reaches a handler connected here (a bounded queue drained while
//!   the handler has permits). A handler on another node will be another `HandlerLink`.
//! - [`dispatch`]: commands in flight, matched to responses by id; every way a command can fail
//!   (no handler, duplicate id, full queue, lost handler, timeout) ends in an in-band error.
//! - this file: the gRPC service; it decodes, calls the layers above and encodes.

pub mod dispatch;
pub mod handler;
pub mod metrics;
pub mod registry;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
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
use crate::platform::Disconnects;
use dispatch::Dispatcher;
use handler::LocalHandler;
use registry::HandlerLink;

/// Messages buffered towards one handler stream (commands are further bounded by permits).
const OUTBOUND_BUFFER: usize = 64;

/// The gRPC service.
#[derive(Clone)]
pub struct Commands {
    dispatcher: Arc<Dispatcher>,
    node_name: String,
    disconnects: Disconnects,
}

impl Commands {
    pub fn new(node_name: String, default_timeout: Duration) -> Commands {
        Commands {
            dispatcher: Arc::new(Dispatcher::new(default_timeout)),
            node_name,
            disconnects: Disconnects::new(),
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
        let link = Arc::new(LocalHandler::new(handler::QUEUE_CAPACITY));
        let pump = tokio::spawn({
            let link = link.clone();
            let tx = tx.clone();
            async move { link.pump(tx).await }
        });
        let dispatcher = self.dispatcher.clone();
        let node_name = self.node_name.clone();
        let mut disconnects = self.disconnects.listen();
        tokio::spawn(async move {
            let stream = HandlerStream {
                context,
                link,
                dispatcher,
                node_name,
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
                        let _ = tx.try_send(Err(status));
                        break;
                    }
                };
                match message {
                    Ok(Some(message)) => {
                        if let Some(ack) = stream.on_message(message)
                            && tx.send(Ok(ack)).await.is_err()
                        {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(error = %status, "command handler stream failed");
                        let _ = tx.try_send(Err(crate::limits::client_stream_error(status)));
                        break;
                    }
                }
            }
            let unsent = stream.link.close();
            stream.dispatcher.handler_closed(stream.link.as_ref(), unsent);
            let _ = pump.await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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
}

impl HandlerStream {
    /// Applies one message from the handler; returns the acknowledgement to send, if any.
    fn on_message(&self, message: CommandProviderOutbound) -> Option<CommandProviderInbound> {
        let outcome = match message.request {
            Some(Outbound::Subscribe(subscription)) => {
                if subscription.command.is_empty() {
                    Err("subscription without a command name")
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
                self.dispatcher
                    .registry()
                    .unsubscribe(&self.context, &subscription.command, self.link.id());
                Ok(())
            }
            Some(Outbound::FlowControl(flow)) => {
                self.link.bind_client(&flow.client_id);
                if flow.permits < 0 {
                    Err("negative permits")
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
            None => Err("Unsupported instruction"),
        };
        if let Err(reason) = outcome {
            tracing::warn!(client_id = %self.link.client_id(), reason, "command handler message rejected");
        }
        if message.instruction_id.is_empty() {
            return None;
        }
        let error = outcome.err().map(|reason| ErrorMessage {
            message: reason.to_owned(),
            location: self.node_name.clone(),
            details: vec!["Unsupported instruction".to_owned()],
            error_code: ErrorCode::UnsupportedInstruction.code().to_owned(),
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
