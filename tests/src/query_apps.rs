//! Query applications for the multi-process tests: handler applications with their own
//! connection and `OpenStream` call, dispatchers, and the queries they send.

use std::collections::HashMap;
use std::time::Duration;

use myelin_proto::axon::query::query_provider_inbound::Request as Inbound;
use myelin_proto::axon::query::query_provider_outbound::Request as Outbound;
use myelin_proto::axon::query::query_service_client::QueryServiceClient;
use myelin_proto::axon::query::{
    QueryComplete, QueryProviderInbound, QueryProviderOutbound, QueryRequest, QueryResponse, QuerySubscription,
    SubscriptionQuery,
};
use myelin_proto::axon::{
    FlowControl, InstructionAck, MetaDataValue, ProcessingInstruction, ProcessingKey, SerializedObject, meta_data_value,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::Node;

/// How long a test waits for a message it expects.
pub const WAIT: Duration = Duration::from_secs(10);

/// A new connection, as a separate application would have.
pub async fn client(node: &Node) -> QueryServiceClient<Channel> {
    let channel = Channel::from_shared(node.url()).unwrap().connect().await.unwrap();
    QueryServiceClient::new(channel)
}

pub fn payload(data: &[u8]) -> Option<SerializedObject> {
    Some(SerializedObject {
        r#type: "java.lang.String".into(),
        revision: "1".into(),
        data: bytes::Bytes::copy_from_slice(data),
    })
}

pub fn query(id: &str, name: &str, timeout_ms: Option<i64>) -> QueryRequest {
    let mut meta_data = HashMap::new();
    meta_data.insert(
        "trace".to_owned(),
        MetaDataValue {
            data: Some(meta_data_value::Data::TextValue(format!("trace-{id}"))),
        },
    );
    QueryRequest {
        message_identifier: id.into(),
        query: name.into(),
        payload: payload(id.as_bytes()),
        meta_data,
        processing_instructions: timeout_ms
            .map(|ms| ProcessingInstruction {
                key: ProcessingKey::Timeout as i32,
                value: Some(MetaDataValue {
                    data: Some(meta_data_value::Data::NumberValue(ms)),
                }),
            })
            .into_iter()
            .collect(),
        client_id: "dispatcher".into(),
        component_name: "dispatcher-app".into(),
        ..Default::default()
    }
}

/// A query handler application: its own connection and `OpenStream` call.
pub struct Handler {
    pub component: String,
    pub tx: mpsc::Sender<QueryProviderOutbound>,
    pub rx: Streaming<QueryProviderInbound>,
    pub next_instruction: u32,
}

impl Handler {
    pub async fn connect(node: &Node, component: &str, queries: &[&str], permits: i64) -> Handler {
        let (tx, out) = mpsc::channel(64);
        let rx = client(node)
            .await
            .open_stream(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        let mut handler = Handler {
            component: component.into(),
            tx,
            rx,
            next_instruction: 0,
        };
        for query in queries {
            let ack = handler.subscribe(query).await;
            assert!(ack.success, "{ack:?}");
        }
        if permits > 0 {
            handler.grant(permits).await;
        }
        handler
    }

    pub async fn send(&self, request: Outbound, instruction_id: &str) {
        self.tx
            .send(QueryProviderOutbound {
                request: Some(request),
                instruction_id: instruction_id.into(),
            })
            .await
            .unwrap();
    }

    /// Subscribes and waits for the node's ack.
    pub async fn subscribe(&mut self, query: &str) -> InstructionAck {
        self.subscribe_as(query, "java.lang.String").await
    }

    /// Subscribes, naming the result type the handler produces, and waits for the ack.
    pub async fn subscribe_as(&mut self, query: &str, result_name: &str) -> InstructionAck {
        self.next_instruction += 1;
        let instruction = format!("{}-{}", self.component, self.next_instruction);
        let subscription = QuerySubscription {
            message_id: instruction.clone(),
            query: query.into(),
            result_name: result_name.into(),
            component_name: self.component.clone(),
            client_id: format!("{}-client", self.component),
        };
        self.send(Outbound::Subscribe(subscription), &instruction).await;
        match self.next().await.request {
            Some(Inbound::Ack(ack)) => {
                assert_eq!(ack.instruction_id, instruction);
                ack
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    pub async fn grant(&self, permits: i64) {
        let flow = FlowControl {
            client_id: format!("{}-client", self.component),
            permits,
        };
        self.send(Outbound::FlowControl(flow), "").await;
    }

    pub async fn next(&mut self) -> QueryProviderInbound {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("handler waited too long")
            .unwrap()
            .expect("handler stream ended")
    }

    pub async fn next_query(&mut self) -> QueryRequest {
        match self.next().await.request {
            Some(Inbound::Query(query)) => query,
            other => panic!("expected a query, got {other:?}"),
        }
    }

    /// Nothing arrives within `within`.
    pub async fn quiet(&mut self, within: Duration) {
        if let Ok(message) = tokio::time::timeout(within, self.rx.message()).await {
            panic!("unexpected message for {}: {message:?}", self.component);
        }
    }

    pub async fn answer(&self, query: &QueryRequest, data: &[u8]) {
        let response = QueryResponse {
            message_identifier: format!("{}-{}", self.component, query.message_identifier),
            payload: payload(data),
            meta_data: query.meta_data.clone(),
            request_identifier: query.message_identifier.clone(),
            ..Default::default()
        };
        self.send(Outbound::QueryResponse(response), "").await;
    }

    pub async fn complete(&self, query: &QueryRequest) {
        let complete = QueryComplete {
            message_id: format!("done-{}", query.message_identifier),
            request_id: query.message_identifier.clone(),
        };
        self.send(Outbound::QueryComplete(complete), "").await;
    }

    /// Answers every query with `<component>:<instance>` and completes it.
    pub fn serve(mut self, instance: &'static str) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Ok(Some(message)) = self.rx.message().await {
                if let Some(Inbound::Query(query)) = message.request {
                    self.answer(&query, format!("{}:{instance}", self.component).as_bytes())
                        .await;
                    self.complete(&query).await;
                }
            }
        })
    }
}

/// Runs a query to its end and returns every response.
pub async fn dispatch(node: &Node, request: QueryRequest) -> Vec<QueryResponse> {
    dispatch_at(node.url(), request).await
}

/// [`dispatch`] from a node's address, for a dispatcher running in its own task.
pub async fn dispatch_at(url: String, request: QueryRequest) -> Vec<QueryResponse> {
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    dispatch_on(QueryServiceClient::new(channel), request).await
}

/// [`dispatch`] on a connection made beforehand.
pub async fn dispatch_on(mut client: QueryServiceClient<Channel>, request: QueryRequest) -> Vec<QueryResponse> {
    let mut stream = client.query(request).await.unwrap().into_inner();
    let mut responses = Vec::new();
    loop {
        let next = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("query stream did not complete");
        match next.expect("query stream failed") {
            Some(response) => responses.push(response),
            None => return responses,
        }
    }
}

pub fn text(response: &QueryResponse) -> String {
    String::from_utf8(response.payload.clone().unwrap_or_default().data.to_vec()).unwrap()
}

pub fn subscription_query(id: &str, permits: i64) -> SubscriptionQuery {
    SubscriptionQuery {
        subscription_identifier: id.into(),
        number_of_permits: permits,
        query_request: Some(query(&format!("{id}-query"), "WatchPrice", None)),
        ..Default::default()
    }
}

pub fn instruction(key: ProcessingKey, data: meta_data_value::Data) -> ProcessingInstruction {
    ProcessingInstruction {
        key: key as i32,
        value: Some(MetaDataValue { data: Some(data) }),
    }
}

pub fn streaming_query(id: &str, name: &str, timeout_ms: Option<i64>) -> QueryRequest {
    let mut request = query(id, name, timeout_ms);
    request.processing_instructions.push(instruction(
        ProcessingKey::ClientSupportsStreaming,
        meta_data_value::Data::BooleanValue(true),
    ));
    request
}

pub fn flag(query: &QueryRequest, key: ProcessingKey) -> Vec<bool> {
    query
        .processing_instructions
        .iter()
        .filter(|i| i.key == key as i32)
        .filter_map(|i| match i.value.as_ref()?.data.as_ref()? {
            meta_data_value::Data::BooleanValue(b) => Some(*b),
            _ => None,
        })
        .collect()
}

pub fn timeouts(query: &QueryRequest) -> Vec<i64> {
    query
        .processing_instructions
        .iter()
        .filter(|i| i.key == ProcessingKey::Timeout as i32)
        .filter_map(|i| match i.value.as_ref()?.data.as_ref()? {
            meta_data_value::Data::NumberValue(ms) => Some(*ms),
            _ => None,
        })
        .collect()
}

/// Response `n` of a streamed result: its number, padded to `size` bytes.
pub fn numbered(query: &QueryRequest, n: u64, size: usize) -> QueryResponse {
    let mut data = n.to_be_bytes().to_vec();
    data.resize(size.max(8), b'.');
    QueryResponse {
        message_identifier: format!("{}-{n}", query.message_identifier),
        payload: Some(SerializedObject {
            r#type: "java.lang.Long".into(),
            revision: String::new(),
            data: data.into(),
        }),
        request_identifier: query.message_identifier.clone(),
        ..Default::default()
    }
}

pub fn number_of(response: &QueryResponse) -> u64 {
    let data = &response.payload.as_ref().expect("a payload").data;
    u64::from_be_bytes(data[..8].try_into().unwrap())
}

/// A dispatcher connection whose HTTP/2 windows are small (64 KiB), like a client that takes
/// responses one by one.
pub async fn small_window_client(node: &Node) -> QueryServiceClient<Channel> {
    let channel = Channel::from_shared(node.url())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    QueryServiceClient::new(channel)
}

pub async fn next_response(stream: &mut Streaming<QueryResponse>) -> Option<QueryResponse> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the dispatcher waited too long")
        .expect("query stream failed")
}

impl Handler {
    /// Skips per-query flow control until the next other message.
    pub async fn next_but_flow_control(&mut self) -> QueryProviderInbound {
        loop {
            let message = self.next().await;
            if !matches!(message.request, Some(Inbound::QueryFlowControl(_))) {
                return message;
            }
        }
    }

    pub async fn expect_cancel(&mut self, request_id: &str) {
        match self.next_but_flow_control().await.request {
            Some(Inbound::QueryCancel(reference)) => assert_eq!(reference.request_id, request_id),
            other => panic!("expected query_cancel for {request_id}, got {other:?}"),
        }
    }
}

/// What a permit-respecting streaming handler saw.
#[derive(Debug, Default)]
pub struct StreamedBy {
    pub granted: u64,
    pub sent: u64,
    /// Largest (granted - read by the dispatcher) seen when a grant arrived.
    pub most_ahead: u64,
}
