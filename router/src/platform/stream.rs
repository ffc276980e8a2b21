//! One client's control stream (`PlatformService.OpenStream`).
//!
//! The stream is one task reading the client's messages next to a ticker. Every inbound message
//! with an `instruction_id` is acknowledged, before `register` too (those are otherwise ignored).
//! Once registered, the ticker sends the client a heartbeat every interval and checks its
//! liveness: a client that has sent at least one heartbeat and then stays silent longer than the
//! timeout is given up on — its control stream ends with an error and a [`Disconnect`] ends its
//! command and query handler streams. Clients that never heartbeat (older ones) are not timed out.
//! The client's answers to the node's own instructions go to [`Instructions`]. A deleted context
//! ends the stream with CONTEXT_NOT_FOUND. The outbound queue is bounded: heartbeats are dropped,
//! not queued, when the client is not reading.

use std::sync::Arc;
use std::time::Duration;

use myelin_proto::axon::control::platform_inbound_instruction::Request as Inbound;
use myelin_proto::axon::control::platform_outbound_instruction::Request as Outbound;
use myelin_proto::axon::control::{Heartbeat, PlatformInboundInstruction, PlatformOutboundInstruction};
use myelin_proto::axon::{ErrorMessage, InstructionAck};
use myelin_proto::errors::ErrorCode;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::clients::Clients;
use super::disconnect::{Disconnect, Disconnects, Reason};
use super::instruction::{Answer, Instructions};

/// Messages buffered towards one client's control stream.
pub const OUTBOUND_BUFFER: usize = 32;

/// Heartbeat settings (Axon's `heartbeat.enabled`, `client-heartbeat-frequency`,
/// `client-heartbeat-timeout`).
#[derive(Debug, Clone, Copy)]
pub struct Heartbeats {
    pub enabled: bool,
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Heartbeats {
    fn default() -> Self {
        Heartbeats {
            enabled: true,
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(5000),
        }
    }
}

pub type Outbox = mpsc::Sender<Result<PlatformOutboundInstruction, Status>>;
pub type OutboxReceiver = mpsc::Receiver<Result<PlatformOutboundInstruction, Status>>;

/// What a control stream shares with the rest of the node.
#[derive(Clone)]
pub struct Shared {
    pub node_name: String,
    pub clients: Arc<Clients>,
    pub instructions: Arc<Instructions>,
    pub disconnects: Disconnects,
    pub heartbeats: Heartbeats,
}

struct Registration {
    client_id: String,
    client_stream_id: String,
}

/// The state of one control stream.
struct ControlStream {
    shared: Shared,
    context: String,
    registration: Option<Registration>,
    /// When the client was last heard from (any message); `None` until its first heartbeat,
    /// which is what arms the inactivity timeout.
    heard_since_heartbeat: Option<Instant>,
    /// This stream's own outbound queue, handed to the registry so instructions can reach it.
    outbox: Outbox,
}

/// Serves the stream until the client ends it, goes away or is timed out.
pub fn spawn(shared: Shared, context: String, inbound: Streaming<PlatformInboundInstruction>, outbox: Outbox) {
    let span = tracing::info_span!("control_stream", %context, client_stream_id = tracing::field::Empty);
    let stream = ControlStream {
        shared,
        context,
        registration: None,
        heard_since_heartbeat: None,
        outbox: outbox.clone(),
    };
    tokio::spawn(stream.run(inbound, outbox).instrument(span));
}

impl ControlStream {
    async fn run(mut self, mut inbound: Streaming<PlatformInboundInstruction>, outbox: Outbox) {
        let heartbeats = self.shared.heartbeats;
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeats.interval, heartbeats.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut disconnects = self.shared.disconnects.listen();
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        if let Some(ack) = self.on_message(message)
                            && outbox.send(Ok(ack)).await.is_err()
                        {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(error = %status, "control stream failed");
                        break;
                    }
                },
                _ = ticker.tick(), if heartbeats.enabled => {
                    if self.timed_out(&outbox).await {
                        break;
                    }
                }
                disconnect = disconnects.next() => {
                    // A client's inactivity is this stream's own business (see `timed_out`);
                    // only a deleted context ends it from outside.
                    if disconnect.reason == Reason::ContextDeleted && disconnect.context == self.context {
                        tracing::info!("control stream closed: context deleted");
                        let _ = tokio::time::timeout(Duration::from_secs(1), outbox.send(Err(disconnect.status("Platform")))).await;
                        break;
                    }
                }
                () = outbox.closed() => break,
            }
        }
        if let Some(registration) = &self.registration {
            self.shared.clients.remove(&registration.client_stream_id);
            tracing::info!(client_id = %registration.client_id, "client deregistered");
        }
    }

    /// Applies one message; returns the ack to send, if it carries an instruction id.
    fn on_message(&mut self, message: PlatformInboundInstruction) -> Option<PlatformOutboundInstruction> {
        if self.heard_since_heartbeat.is_some() || matches!(message.request, Some(Inbound::Heartbeat(_))) {
            self.heard_since_heartbeat = Some(Instant::now());
        }
        let outcome = match message.request {
            Some(Inbound::Register(client)) => self.register(client),
            // Before `register` everything else is acknowledged but ignored.
            Some(Inbound::Heartbeat(_)) if !self.shared.heartbeats.enabled => Err("Heartbeats are disabled"),
            Some(_) if self.registration.is_none() => Ok(()),
            Some(Inbound::Heartbeat(_)) => {
                self.with_registration(|clients, id| clients.heartbeat(id));
                Ok(())
            }
            Some(Inbound::EventProcessorInfo(info)) => {
                let mut kept = true;
                self.with_registration(|clients, id| kept = clients.processor_info(id, info));
                if kept {
                    Ok(())
                } else {
                    Err("event processor report refused: too large, or too many processors")
                }
            }
            Some(Inbound::Ack(ack)) => {
                self.answer(ack.instruction_id.clone(), Answer::Ack(ack));
                Ok(())
            }
            Some(Inbound::Result(result)) => {
                self.answer(result.instruction_id.clone(), Answer::Result(result));
                Ok(())
            }
            Some(Inbound::SubscribeTopologyChanges(_)) | Some(Inbound::UnsubscribeTopologyChanges(_)) | None => {
                Err("Unsupported instruction")
            }
        };
        if let Err(reason) = outcome {
            tracing::debug!(reason, "control message rejected");
        }
        if message.instruction_id.is_empty() {
            return None;
        }
        let error = outcome.err().map(|reason| ErrorMessage {
            message: reason.to_owned(),
            location: self.shared.node_name.clone(),
            details: vec!["Unsupported instruction".to_owned()],
            error_code: ErrorCode::UnsupportedInstruction.code().to_owned(),
        });
        Some(outbound(Outbound::Ack(InstructionAck {
            instruction_id: message.instruction_id,
            success: error.is_none(),
            error,
        })))
    }

    fn register(&mut self, client: myelin_proto::axon::control::ClientIdentification) -> Result<(), &'static str> {
        if client.client_id.is_empty() {
            return Err("register without a client id");
        }
        if let Some(registration) = &self.registration {
            return if registration.client_id == client.client_id {
                Ok(())
            } else {
                Err("stream already registered for another client id")
            };
        }
        let client_stream_id = self
            .shared
            .clients
            .register(&self.context, &client, self.outbox.clone());
        tracing::Span::current().record("client_stream_id", client_stream_id.as_str());
        tracing::info!(client_id = %client.client_id, component = %client.component_name, version = %client.version, "client registered");
        self.registration = Some(Registration {
            client_id: client.client_id,
            client_stream_id,
        });
        Ok(())
    }

    fn with_registration(&self, update: impl FnOnce(&Clients, &str)) {
        if let Some(registration) = &self.registration {
            update(&self.shared.clients, &registration.client_stream_id);
        }
    }

    /// The client's answer to an instruction of the node.
    fn answer(&self, instruction_id: String, answer: Answer) {
        let Some(registration) = &self.registration else {
            return;
        };
        if !self
            .shared
            .instructions
            .settle(&registration.client_stream_id, &instruction_id, answer)
        {
            tracing::debug!(%instruction_id, "client answered an instruction nobody waits for");
        }
    }

    /// One tick: heartbeat the client and check that it is alive; true if it was given up on.
    async fn timed_out(&mut self, outbox: &Outbox) -> bool {
        let Some(registration) = &self.registration else {
            return false;
        };
        let silent = self
            .heard_since_heartbeat
            .is_some_and(|at| at.elapsed() > self.shared.heartbeats.timeout);
        if !silent {
            // A client that is not reading misses heartbeats rather than growing the queue.
            let _ = outbox.try_send(Ok(outbound(Outbound::Heartbeat(Heartbeat {}))));
            return false;
        }
        let disconnect = Disconnect::inactive(&self.context, &registration.client_id, &registration.client_stream_id);
        let status = disconnect.status("Platform");
        tracing::warn!(client_id = %registration.client_id, "{}", status.message());
        self.shared.disconnects.publish(disconnect);
        let _ = tokio::time::timeout(Duration::from_secs(1), outbox.send(Err(status))).await;
        true
    }
}

pub fn outbound(request: Outbound) -> PlatformOutboundInstruction {
    PlatformOutboundInstruction {
        request: Some(request),
        instruction_id: String::new(),
    }
}
