//! `PlatformService`: tells clients which node to use, and keeps their control stream.
//!
//! This is the part Axon clients need in order to connect: `GetPlatformServer` answers with this
//! node (`same_connection`), and `OpenStream` acknowledges instructions and answers heartbeats.
//! Client registration tracking, heartbeat timeouts and processor instructions arrive with the
//! messaging work (issue #3).

use std::pin::Pin;

use futures::Stream;
use myelin_proto::axon::InstructionAck;
use myelin_proto::axon::control::platform_inbound_instruction::Request as Inbound;
use myelin_proto::axon::control::platform_outbound_instruction::Request as Outbound;
use myelin_proto::axon::control::platform_service_server::PlatformService;
use myelin_proto::axon::control::{
    ClientIdentification, Heartbeat, NodeInfo, PlatformInboundInstruction, PlatformInfo, PlatformOutboundInstruction,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone)]
pub struct Platform {
    pub node: NodeInfo,
}

#[tonic::async_trait]
impl PlatformService for Platform {
    async fn get_platform_server(
        &self,
        request: Request<ClientIdentification>,
    ) -> Result<Response<PlatformInfo>, Status> {
        let client = request.into_inner();
        tracing::debug!(client_id = %client.client_id, component = %client.component_name, "platform server asked");
        Ok(Response::new(PlatformInfo {
            primary: Some(self.node.clone()),
            same_connection: true,
        }))
    }

    type OpenStreamStream = Pin<Box<dyn Stream<Item = Result<PlatformOutboundInstruction, Status>> + Send>>;

    async fn open_stream(
        &self,
        request: Request<Streaming<PlatformInboundInstruction>>,
    ) -> Result<Response<Self::OpenStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(instruction)) = inbound.message().await {
                let mut replies = Vec::new();
                if let Some(Inbound::Register(client)) = &instruction.request {
                    tracing::info!(client_id = %client.client_id, component = %client.component_name, "client registered");
                }
                if let Some(Inbound::Heartbeat(_)) = &instruction.request {
                    replies.push(outbound(Outbound::Heartbeat(Heartbeat {})));
                }
                if !instruction.instruction_id.is_empty() {
                    replies.push(outbound(Outbound::Ack(InstructionAck {
                        instruction_id: instruction.instruction_id.clone(),
                        success: true,
                        error: None,
                    })));
                }
                for reply in replies {
                    if tx.send(Ok(reply)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn outbound(request: Outbound) -> PlatformOutboundInstruction {
    PlatformOutboundInstruction {
        request: Some(request),
        instruction_id: String::new(),
    }
}
