//! `query-handler` and `query-dispatch`: point-to-point query round trips through the router's
//! QueryService (one handler component), the handler being a separate application (process).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use myelin_proto::axon::query::query_provider_inbound::Request as Inbound;
use myelin_proto::axon::query::query_provider_outbound::Request as Outbound;
use myelin_proto::axon::query::query_service_client::QueryServiceClient;
use myelin_proto::axon::query::{QueryComplete, QueryProviderOutbound, QueryRequest, QueryResponse, QuerySubscription};
use myelin_proto::axon::{FlowControl, SerializedObject};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::common::{self, Common, Permits};
use crate::roundtrip::{self, Load};

/// The error code of a query that found no handler.
const NO_HANDLER: &str = "AXONIQ-5000";

#[derive(clap::Args, Debug, Clone)]
pub struct HandlerArgs {
    #[command(flatten)]
    pub common: Common,
    /// Query name the handlers subscribe to.
    #[arg(long, default_value = "BenchQuery")]
    pub query: String,
    /// Result name of the subscription.
    #[arg(long, default_value = "io.myelin.bench.Result")]
    pub result_name: String,
    /// Component (application) name of the handlers: one component, so a query goes to one of them.
    #[arg(long, default_value = "bench-query-handler")]
    pub component: String,
    /// Permits each stream grants first; the used ones are granted again once half are used.
    #[arg(long, default_value_t = 5000)]
    pub permits: i64,
    /// Handler streams, each on its own connection with its own client id.
    #[arg(long, default_value_t = 1)]
    pub handlers: usize,
    /// Payload size of each response in bytes.
    #[arg(long, default_value_t = 200)]
    pub response_bytes: usize,
    /// Stop after this many seconds (default: run until SIGTERM/SIGINT).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Create this file once every stream is subscribed (the server acknowledged).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DispatchArgs {
    #[command(flatten)]
    pub common: Common,
    /// Query name to send.
    #[arg(long, default_value = "BenchQuery")]
    pub query: String,
    #[command(flatten)]
    pub load: Load,
}

fn out(request: Outbound, instruction_id: String) -> QueryProviderOutbound {
    QueryProviderOutbound {
        request: Some(request),
        instruction_id,
    }
}

/// Opens one handler stream; returns when the server acknowledged its subscription, with the
/// task that serves it (ends with an error when the stream ends).
async fn start_handler(
    args: &HandlerArgs,
    index: usize,
    handled: Arc<AtomicU64>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let channel = common::channel(&args.common.server).await?;
    let mut client = QueryServiceClient::new(channel);
    let client_id = format!("bench-query-handler-{}-{index}", std::process::id());
    let (tx, rx) = mpsc::channel::<QueryProviderOutbound>(4096);
    tx.send(out(
        Outbound::Subscribe(QuerySubscription {
            message_id: format!("{client_id}-sub"),
            query: args.query.clone(),
            result_name: args.result_name.clone(),
            component_name: args.component.clone(),
            client_id: client_id.clone(),
        }),
        String::new(),
    ))
    .await?;
    let ready_id = format!("{client_id}-ready");
    tx.send(out(
        Outbound::FlowControl(FlowControl {
            client_id: client_id.clone(),
            permits: args.permits,
        }),
        ready_id.clone(),
    ))
    .await?;
    let mut inbound = client
        .open_stream(common::request(&args.common.context, ReceiverStream::new(rx)))
        .await?
        .into_inner();
    let deadline = Duration::from_secs(30);
    let ack = tokio::time::timeout(deadline, async {
        while let Some(message) = inbound.next().await {
            if let Some(Inbound::Ack(ack)) = message?.request
                && ack.instruction_id == ready_id
            {
                return Ok::<_, anyhow::Error>(ack);
            }
        }
        anyhow::bail!("stream ended before the subscription was acknowledged")
    })
    .await
    .map_err(|_| anyhow::anyhow!("no acknowledgement of the subscription within {deadline:?}"))??;
    anyhow::ensure!(ack.success, "subscription refused: {:?}", ack.error);

    let data = common::payload(args.response_bytes);
    let permits = args.permits;
    let result_name = args.result_name.clone();
    Ok(tokio::spawn(async move {
        let _client = client; // the connection lives as long as the stream
        let mut permits = Permits::new(permits);
        let mut n = 0u64;
        while let Some(message) = inbound.next().await {
            let Some(Inbound::Query(query)) = message?.request else {
                continue;
            };
            n += 1;
            let response = QueryResponse {
                message_identifier: format!("{client_id}-r{n}"),
                request_identifier: query.message_identifier.clone(),
                payload: Some(SerializedObject {
                    r#type: result_name.clone(),
                    revision: String::new(),
                    data: data.clone(),
                }),
                ..Default::default()
            };
            tx.send(out(Outbound::QueryResponse(response), String::new())).await?;
            let complete = QueryComplete {
                message_id: format!("{client_id}-c{n}"),
                request_id: query.message_identifier,
            };
            tx.send(out(Outbound::QueryComplete(complete), String::new())).await?;
            if let Some(grant) = permits.take() {
                let flow = FlowControl {
                    client_id: client_id.clone(),
                    permits: grant,
                };
                tx.send(out(Outbound::FlowControl(flow), String::new())).await?;
            }
            handled.fetch_add(1, Ordering::Relaxed);
        }
        anyhow::bail!("handler stream {client_id} ended by the server")
    }))
}

pub async fn run_handler(args: HandlerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.handlers > 0, "--handlers must be > 0");
    let handled = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.handlers {
        tasks.push(start_handler(&args, i, handled.clone()).await?);
    }
    let ready_ms = start.elapsed().as_secs_f64() * 1000.0;
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{}\n", std::process::id()))?;
    }
    eprintln!(
        "query-handler: {} stream(s) subscribed to '{}' in {ready_ms:.0} ms",
        args.handlers, args.query
    );
    let failed = futures::future::select_all(tasks.iter_mut());
    let error = tokio::select! {
        _ = common::stop_signal(args.duration) => None,
        (r, _, _) = failed => Some(match r {
            Ok(Ok(())) => "handler task ended".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        }),
    };
    let seconds = start.elapsed().as_secs_f64();
    let count = handled.load(Ordering::Relaxed);
    let mut fields = serde_json::Map::new();
    fields.insert("name".into(), json!(args.query));
    fields.insert("handlers".into(), json!(args.handlers));
    fields.insert("permits".into(), json!(args.permits));
    fields.insert("handled".into(), json!(count));
    fields.insert("seconds".into(), json!((seconds * 100.0).round() / 100.0));
    fields.insert("error".into(), json!(error));
    let summary = format!("query-handler: handled {count} queries in {seconds:.1} s");
    common::emit(&args.common, "query-handler", fields, &summary);
    match error {
        Some(e) => anyhow::bail!(e),
        None => Ok(()),
    }
}

/// One query: every response must be free of an error and at least one must arrive.
async fn query_once(
    mut client: QueryServiceClient<Channel>,
    context: String,
    query: QueryRequest,
) -> Result<(), String> {
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let mut stream = client
        .query(common::request(&context, query))
        .await
        .map_err(status)?
        .into_inner();
    let mut responses = 0;
    while let Some(response) = stream.next().await {
        let response = response.map_err(status)?;
        if !response.error_code.is_empty() {
            let message = response.error_message.map(|m| m.message).unwrap_or_default();
            return Err(format!("{}: {message}", response.error_code));
        }
        responses += 1;
    }
    if responses == 0 {
        return Err("query completed without a response".to_owned());
    }
    Ok(())
}

pub async fn run_dispatch(args: DispatchArgs) -> anyhow::Result<()> {
    let load = &args.load;
    anyhow::ensure!(
        load.in_flight > 0 && load.connections > 0,
        "in-flight and connections must be > 0"
    );
    let mut clients = Vec::new();
    for _ in 0..load.connections {
        clients.push(QueryServiceClient::new(common::channel(&args.common.server).await?));
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let data = common::payload(load.payload_bytes);
    let make = {
        let name = args.query.clone();
        let run_id = run_id.clone();
        move |i: usize, n: u64| QueryRequest {
            message_identifier: format!("{run_id}-{i}-{n}"),
            query: name.clone(),
            timestamp: common::now_millis(),
            payload: Some(SerializedObject {
                r#type: "io.myelin.bench.FindSomething".to_owned(),
                revision: String::new(),
                data: data.clone(),
            }),
            client_id: format!("bench-query-dispatcher-{run_id}"),
            component_name: "bench-query-dispatcher".to_owned(),
            ..Default::default()
        }
    };

    roundtrip::dispatcher(
        &args.common,
        load,
        "query-dispatch",
        &args.query,
        NO_HANDLER,
        clients,
        make,
        query_once,
    )
    .await
}
