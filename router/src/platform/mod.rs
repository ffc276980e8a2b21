//! `PlatformService`: tells clients which node to use, and keeps their control stream.
//!
//! - `GetPlatformServer` answers with the node that stores the client's context and serves the
//!   fewest of its clients, this node (`same_connection`) on a tie or when no other node stores
//!   it ([`placement`]).
//! - `OpenStream` is a client application's control channel ([`stream`]): it registers the
//!   client in the context's list of connected applications ([`clients`]), exchanges heartbeats,
//!   keeps the client's event-processor reports and acknowledges instructions.
//! - A client that stops heartbeating is disconnected: its control stream ends with an error and
//!   a [`disconnect::Disconnect`] ends its command and query handler streams, whose own
//!   end-of-stream handling unsubscribes the handlers and fails the commands they held.
//! - The node sends a client instructions (pause a processor, split a segment, ...) over that
//!   stream and waits for its answer ([`instruction`]); admin asks for them through the
//!   router's control service.
//! - Deleting a context ends every stream of it with CONTEXT_NOT_FOUND ([`Platform::close_context`]).
//! - The node asks clients to reconnect elsewhere when it serves more than its share of a
//!   context's clients, and turns them away while it reaches no majority of the context's
//!   nodes ([`balance`]).

pub mod balance;
pub mod clients;
pub mod disconnect;
pub mod instruction;
pub mod placement;
pub mod stream;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use myelin_proto::axon::control::platform_service_server::PlatformService;
use myelin_proto::axon::control::{
    ClientIdentification, NodeInfo, PlatformInboundInstruction, PlatformInfo, PlatformOutboundInstruction,
};
use myelin_proto::errors::ErrorCode;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::context::client_context;
pub use balance::{Balancing, Isolation};
pub use clients::{ClientSnapshot, Clients, ProcessorReport};
pub use disconnect::{Disconnect, Disconnects};
pub use instruction::{Instructions, Outcome};
pub use placement::Placement;
pub use stream::Heartbeats;

/// The gRPC service.
#[derive(Clone)]
pub struct Platform {
    node: NodeInfo,
    shared: stream::Shared,
    placement: Arc<Placement>,
    isolation: Arc<Isolation>,
    peers: crate::peers::Peers,
}

impl Platform {
    /// `disconnects` is shared with the command and query services.
    /// `peers` says which other nodes are reachable when a client is sent to one of them.
    pub fn new(
        node: NodeInfo,
        heartbeats: Heartbeats,
        disconnects: Disconnects,
        peers: crate::peers::Peers,
    ) -> Platform {
        Platform {
            shared: stream::Shared {
                node_name: node.node_name.clone(),
                clients: Arc::new(Clients::default()),
                instructions: Arc::new(Instructions::default()),
                disconnects,
                heartbeats,
            },
            node,
            placement: Arc::new(Placement::default()),
            isolation: Arc::new(Isolation::default()),
            peers,
        }
    }

    /// Starts the task that balances this node's clients and turns them away while the node is
    /// cut off from a context's majority ([`balance`]).
    pub fn keep_balanced(&self, settings: Balancing) -> tokio::task::JoinHandle<()> {
        balance::Balancer {
            settings,
            clients: self.shared.clients.clone(),
            placement: self.placement.clone(),
            isolation: self.isolation.clone(),
            peers: self.peers.clone(),
        }
        .spawn()
    }

    /// Fails when this node turns clients of `context` away (it reaches no majority of the
    /// nodes that store it): UNAVAILABLE, so Axon's connector tries its next server at once.
    fn check_not_isolated(&self, context: &str) -> Result<(), Status> {
        if self.isolation.refuses(context) {
            return Err(ErrorCode::NoAxonServerForContext.status(format!(
                "node {} reaches no majority of the nodes that store {context}: connect to another node",
                self.node.node_name
            )));
        }
        Ok(())
    }

    /// Where contexts are stored, as admin tells the router (`PeerDirectory`).
    pub fn placement(&self) -> &Arc<Placement> {
        &self.placement
    }

    /// The connected client applications (for the admin API).
    pub fn clients(&self) -> &Arc<Clients> {
        &self.shared.clients
    }

    /// Sends an instruction to every control stream of `client_id` in `context` and waits at
    /// most `timeout` for the client's answer.
    pub async fn send_instruction(
        &self,
        context: &str,
        client_id: &str,
        instruction: PlatformOutboundInstruction,
        timeout: Duration,
    ) -> Outcome {
        self.shared
            .instructions
            .send(&self.shared.clients, context, client_id, instruction, timeout)
            .await
    }

    /// Ends every control, command and query stream of `context` with CONTEXT_NOT_FOUND; their
    /// own end-of-stream handling then removes the clients and their handlers. Returns how many
    /// registered control streams the context had.
    pub fn close_context(&self, context: &str) -> usize {
        let control_streams = self
            .shared
            .clients
            .count_per_context()
            .get(context)
            .copied()
            .unwrap_or(0);
        tracing::info!(%context, control_streams, "closing every client stream of the context");
        self.shared.disconnects.publish(Disconnect::context_deleted(context));
        control_streams
    }
}

#[tonic::async_trait]
impl PlatformService for Platform {
    async fn get_platform_server(
        &self,
        request: Request<ClientIdentification>,
    ) -> Result<Response<PlatformInfo>, Status> {
        let context = client_context(&request)?;
        self.check_not_isolated(&context)?;
        let client = request.into_inner();
        let here = self
            .shared
            .clients
            .count_per_context()
            .get(&context)
            .copied()
            .unwrap_or(0);
        let elsewhere = self.placement.server_for(
            &context,
            &client.client_id,
            &client.tags,
            |node| self.peers.is_connected(node),
            here,
            |client_id| !self.shared.clients.outboxes(&context, client_id).is_empty(),
        );
        tracing::debug!(
            client_id = %client.client_id,
            component = %client.component_name,
            %context,
            sent_to = elsewhere.as_ref().map(|n| n.node_name.as_str()),
            "platform server asked"
        );
        Ok(Response::new(match elsewhere {
            Some(node) => PlatformInfo {
                primary: Some(node),
                same_connection: false,
            },
            None => PlatformInfo {
                primary: Some(self.node.clone()),
                same_connection: true,
            },
        }))
    }

    type OpenStreamStream = Pin<Box<dyn Stream<Item = Result<PlatformOutboundInstruction, Status>> + Send>>;

    async fn open_stream(
        &self,
        request: Request<Streaming<PlatformInboundInstruction>>,
    ) -> Result<Response<Self::OpenStreamStream>, Status> {
        let context = client_context(&request)?;
        self.check_not_isolated(&context)?;
        let (outbox, rx) = mpsc::channel(stream::OUTBOUND_BUFFER);
        stream::spawn(self.shared.clone(), context, request.into_inner(), outbox);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
