//! Handler streams as a client application opens them in tests: subscribe, grant permits, and
//! wait for the node's acknowledgement, so a test starts from a handler the node has registered.

use std::time::Duration;

use myelin_proto::axon::FlowControl;
use myelin_proto::axon::command::command_provider_inbound::Request as CommandInbound;
use myelin_proto::axon::command::command_provider_outbound::Request as CommandOutbound;
use myelin_proto::axon::command::command_service_client::CommandServiceClient;
use myelin_proto::axon::command::{CommandProviderInbound, CommandProviderOutbound, CommandSubscription};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::{Node, with_context};

/// An open command handler stream: the client it runs on (kept for dispatching and to keep the
/// connection), its outbound side and what the node sends it.
pub struct CommandHandler {
    pub client: CommandServiceClient<Channel>,
    pub outbound: mpsc::Sender<CommandProviderOutbound>,
    pub inbound: Streaming<CommandProviderInbound>,
}

/// Opens a command handler stream in `context`, sends `subscription` and `permits` (as
/// `subscription.client_id`), and asserts that the node acknowledges the subscription
/// successfully within 5 s.
pub async fn command_handler(
    node: &Node,
    context: &str,
    subscription: CommandSubscription,
    permits: i64,
) -> CommandHandler {
    let mut client = CommandServiceClient::new(node.channel().await);
    let (outbound, rx) = mpsc::channel(64);
    let client_id = subscription.client_id.clone();
    outbound
        .send(CommandProviderOutbound {
            request: Some(CommandOutbound::Subscribe(subscription)),
            instruction_id: String::new(),
        })
        .await
        .unwrap();
    outbound
        .send(CommandProviderOutbound {
            request: Some(CommandOutbound::FlowControl(FlowControl { client_id, permits })),
            instruction_id: "permits".into(),
        })
        .await
        .unwrap();
    let mut inbound = client
        .open_stream(with_context(ReceiverStream::new(rx), context))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(first.request, Some(CommandInbound::Ack(ref ack)) if ack.success),
        "{first:?}"
    );
    CommandHandler {
        client,
        outbound,
        inbound,
    }
}
