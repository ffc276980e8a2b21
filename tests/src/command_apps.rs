//! Command handler and dispatcher applications for multi-process tests: each on its own gRPC
//! connection to a node, as separate client applications would be.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use myelin_proto::axon::command::command_provider_inbound::Request as Inbound;
use myelin_proto::axon::command::command_provider_outbound::Request as Outbound;
use myelin_proto::axon::command::command_service_client::CommandServiceClient;
use myelin_proto::axon::command::{Command, CommandProviderOutbound, CommandResponse, CommandSubscription};
use myelin_proto::axon::meta_data_value::Data;
use myelin_proto::axon::{
    FlowControl, InstructionAck, MetaDataValue, ProcessingInstruction, ProcessingKey, SerializedObject,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::Node;

pub async fn connect(node: &Node) -> CommandServiceClient<Channel> {
    let channel = Channel::from_shared(node.url()).unwrap().connect().await.unwrap();
    CommandServiceClient::new(channel)
}

/// A command handler application: its own connection and `OpenStream`.
pub struct Handler {
    pub client_id: String,
    pub outbound: mpsc::Sender<CommandProviderOutbound>,
    /// Commands received (the handler answers them itself when `auto_reply`).
    received: mpsc::UnboundedReceiver<Command>,
    pub acks: mpsc::UnboundedReceiver<InstructionAck>,
    reader: JoinHandle<()>,
}

impl Handler {
    pub async fn start(
        node: &Node,
        context: &str,
        client_id: &str,
        names: &[&str],
        load_factor: i32,
        permits: i64,
        auto_reply: bool,
    ) -> Handler {
        let mut client = connect(node).await;
        let (outbound, rx) = mpsc::channel(1024);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("axoniq-context", context.parse().unwrap());
        for name in names {
            outbound
                .send(subscribe(client_id, name, load_factor, ""))
                .await
                .unwrap();
        }
        outbound.send(flow(client_id, permits)).await.unwrap();
        let mut inbound = client.open_stream(request).await.unwrap().into_inner();
        let (seen, received) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let replies = outbound.clone();
        let me = client_id.to_owned();
        let reader = tokio::spawn(async move {
            let _client = client; // the connection lives as long as the handler
            while let Some(Ok(message)) = inbound.next().await {
                match message.request {
                    Some(Inbound::Command(command)) => {
                        if auto_reply {
                            let _ = replies.send(respond(&command, &me)).await;
                        }
                        let _ = seen.send(command);
                    }
                    Some(Inbound::Ack(ack)) => {
                        let _ = ack_tx.send(ack);
                    }
                    None => {}
                }
            }
        });
        // Subscriptions are in once a later instruction is acknowledged (messages are in order).
        let handler = Handler {
            client_id: client_id.to_owned(),
            outbound,
            received,
            acks,
            reader,
        };
        handler.sync().await
    }

    pub async fn sync(mut self) -> Handler {
        let id = format!("sync-{}", rand::random::<u64>());
        self.outbound.send(flow_with_id(&self.client_id, 0, &id)).await.unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(10), self.acks.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack.instruction_id, id);
        assert!(ack.success);
        self
    }

    pub async fn next_command(&mut self, within: Duration) -> Option<Command> {
        tokio::time::timeout(within, self.received.recv()).await.ok().flatten()
    }

    pub async fn reply(&self, command: &Command) {
        self.outbound.send(respond(command, &self.client_id)).await.unwrap();
    }

    pub async fn grant(&self, permits: i64) {
        self.outbound.send(flow(&self.client_id, permits)).await.unwrap();
    }

    /// The application dies: its stream and connection go away without goodbye.
    pub fn kill(self) {
        self.reader.abort();
    }
}

pub fn subscribe(client_id: &str, name: &str, load_factor: i32, instruction_id: &str) -> CommandProviderOutbound {
    CommandProviderOutbound {
        request: Some(Outbound::Subscribe(CommandSubscription {
            message_id: format!("sub-{name}"),
            command: name.to_owned(),
            component_name: "handler-app".to_owned(),
            client_id: client_id.to_owned(),
            load_factor,
        })),
        instruction_id: instruction_id.to_owned(),
    }
}

pub fn flow(client_id: &str, permits: i64) -> CommandProviderOutbound {
    flow_with_id(client_id, permits, "")
}

pub fn flow_with_id(client_id: &str, permits: i64, instruction_id: &str) -> CommandProviderOutbound {
    CommandProviderOutbound {
        request: Some(Outbound::FlowControl(FlowControl {
            client_id: client_id.to_owned(),
            permits,
        })),
        instruction_id: instruction_id.to_owned(),
    }
}

/// The handler's answer: the command's payload echoed, and who handled it in the metadata.
pub fn respond(command: &Command, client_id: &str) -> CommandProviderOutbound {
    CommandProviderOutbound {
        request: Some(Outbound::CommandResponse(CommandResponse {
            message_identifier: format!("resp-{}", command.message_identifier),
            request_identifier: command.message_identifier.clone(),
            payload: command.payload.clone(),
            meta_data: HashMap::from([("handled-by".to_owned(), text(client_id))]),
            ..Default::default()
        })),
        instruction_id: String::new(),
    }
}

pub fn text(value: &str) -> MetaDataValue {
    MetaDataValue {
        data: Some(Data::TextValue(value.to_owned())),
    }
}

pub fn command(name: &str, id: &str, routing_key: Option<&str>) -> Command {
    let mut processing_instructions = Vec::new();
    if let Some(key) = routing_key {
        processing_instructions.push(ProcessingInstruction {
            key: ProcessingKey::RoutingKey as i32,
            value: Some(text(key)),
        });
    }
    Command {
        message_identifier: id.to_owned(),
        name: name.to_owned(),
        timestamp: 1,
        payload: Some(SerializedObject {
            r#type: "Payload".to_owned(),
            revision: "1".to_owned(),
            data: id.as_bytes().to_vec().into(),
        }),
        meta_data: HashMap::from([("trace".to_owned(), text(id))]),
        processing_instructions,
        client_id: "dispatcher".to_owned(),
        component_name: "dispatcher-app".to_owned(),
    }
}

pub fn handled_by(response: &CommandResponse) -> String {
    assert_eq!(response.error_code, "", "unexpected error: {response:?}");
    match response.meta_data.get("handled-by").and_then(|v| v.data.as_ref()) {
        Some(Data::TextValue(client)) => client.clone(),
        other => panic!("no handled-by in {other:?}"),
    }
}

pub async fn dispatch(client: &CommandServiceClient<Channel>, command: Command) -> CommandResponse {
    client
        .clone()
        .dispatch(command)
        .await
        .expect("Dispatch returns OK, errors are in-band")
        .into_inner()
}

pub fn id() -> String {
    format!("cmd-{}", rand::random::<u64>())
}
