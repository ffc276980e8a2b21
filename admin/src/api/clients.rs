//! Connected client applications, the event processors they report, their command and query
//! handlers, and the instructions an operator sends them (Axon's processor operations and
//! reconnect). All of it comes from the router over `RouterControl`; instructions go to the
//! clients' control streams and the answer here waits for the clients' acknowledgements. In a
//! cluster the router asks the other nodes too, so any node's admin shows and instructs the
//! clients connected to every node (issue 12); a node that does not answer within 3 s is named
//! in the `myelin-unreachable-nodes` header rather than waited for.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use myelin_proto::DEFAULT_CONTEXT;
use myelin_proto::axon::control::platform_outbound_instruction::Request as Instruction;
use myelin_proto::axon::control::{
    EventProcessorReference, EventProcessorSegmentReference, PlatformOutboundInstruction, RequestReconnect,
};
use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::{
    ListClientsRequest, ListHandlersRequest, ListProcessorsRequest, ProcessorReport, SendInstructionRequest,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::{ApiError, AppState, Params, PathParams, check_name, clip, existing_context};

const MAX_NAME: usize = 512;
/// How long an instruction waits for the clients' answers (Axon's `instruction.result.timeout`).
const INSTRUCTION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ContextFilter {
    /// Only this context; default: every context.
    #[param(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")]
    pub context: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct ProcessorTarget {
    /// The context; default `default`.
    #[param(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")]
    pub context: Option<String>,
    /// Only instances using this token store.
    #[param(min_length = 1, max_length = 512, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$")]
    pub token_store_identifier: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReconnectTarget {
    /// The client's id, as it registered.
    #[param(min_length = 1, max_length = 512, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$")]
    pub client: String,
    /// The client's context; default `default`.
    #[param(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")]
    pub context: Option<String>,
}

/// A connected client application (one control stream).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientJson {
    pub context: String,
    pub client_id: String,
    pub client_stream_id: String,
    pub component_name: String,
    pub version: String,
    pub tags: BTreeMap<String, String>,
    /// Unix time in milliseconds.
    pub connected_at: i64,
    /// Unix time in milliseconds of the client's latest heartbeat; absent when it sent none (heartbeats
    /// off on either side, or an older client).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<i64>,
    /// The node of the cluster the client is connected to.
    pub node: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SegmentJson {
    pub segment_id: i32,
    pub caught_up: bool,
    pub replaying: bool,
    /// The segment's size as a fraction: 4 is one quarter.
    pub one_part_of: i32,
    pub token_position: i64,
    pub error_state: String,
}

/// One client's latest report on one event processor.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessorJson {
    pub context: String,
    pub client_id: String,
    pub component_name: String,
    pub processor_name: String,
    pub mode: String,
    pub running: bool,
    pub error: bool,
    pub active_threads: i32,
    pub available_threads: i32,
    pub token_store_identifier: String,
    pub is_streaming_processor: bool,
    pub load_balancing_strategy_name: String,
    pub segments: Vec<SegmentJson>,
    /// Unix time in milliseconds of the report.
    pub reported_at: i64,
    /// The node of the cluster the reporting client is connected to.
    pub node: String,
}

/// A command or query handler registration.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HandlerJson {
    pub context: String,
    /// `command` or `query`.
    pub kind: String,
    pub name: String,
    /// Query result type; empty for commands.
    pub result_name: String,
    pub client_id: String,
    pub component_name: String,
    pub load_factor: i32,
}

/// The outcome of an instruction.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstructionResultJson {
    /// `SUCCESS`: every client it went to carried it out.
    pub result: String,
    /// The clients it went to.
    pub clients: Vec<String>,
}

/// The header that names the nodes of the cluster whose part of a listing is missing (they did
/// not answer in time); absent when every node answered.
pub const UNREACHABLE_NODES: &str = "myelin-unreachable-nodes";

fn unreachable_header(nodes: &[String]) -> axum::http::HeaderMap {
    let mut headers = axum::http::HeaderMap::new();
    if !nodes.is_empty() {
        tracing::warn!(nodes = ?nodes, "a listing misses the clients of nodes that did not answer");
        if let Ok(value) = axum::http::HeaderValue::from_str(&nodes.join(",")) {
            headers.insert(UNREACHABLE_NODES, value);
        }
    }
    headers
}

/// Connected client applications, on every node of the cluster.
#[utoipa::path(get, path = "/v1/clients", operation_id = "listClients", tag = "clients", params(ContextFilter),
    responses(
        (status = 200, description = "OK: the clients of every node that answered", body = Vec<ClientJson>,
            headers(("myelin-unreachable-nodes" = String, description = "Nodes whose clients are missing (did not answer within 3 s), comma-separated"))),
        (status = 400, description = "Invalid context name", body = ErrorBody),
        (status = 404, description = "No such context", body = ErrorBody),
    ))]
pub async fn clients(
    State(state): State<AppState>,
    Params(filter): Params<ContextFilter>,
) -> Result<(axum::http::HeaderMap, Json<Vec<ClientJson>>), ApiError> {
    let context = existing_context(&state, filter.context.as_deref()).await?;
    let answer = state
        .router_control()?
        .list_clients(ListClientsRequest {
            context: context.unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(|s| ApiError::from_status("the router", s))?
        .into_inner();
    Ok((
        unreachable_header(&answer.unreachable_nodes),
        Json(
            answer
                .clients
                .into_iter()
                .map(|c| ClientJson {
                    context: c.context,
                    client_id: c.client_id,
                    client_stream_id: c.client_stream_id,
                    component_name: c.component_name,
                    version: c.version,
                    tags: c.tags.into_iter().collect(),
                    connected_at: c.connected_at_millis,
                    last_heartbeat: (c.last_heartbeat_millis > 0).then_some(c.last_heartbeat_millis),
                    node: c.node,
                })
                .collect(),
        ),
    ))
}

/// The processor reports of every node's clients, and the nodes that did not answer.
async fn reports(state: &AppState, context: String) -> Result<(Vec<ProcessorReport>, Vec<String>), ApiError> {
    let answer = state
        .router_control()?
        .list_processors(ListProcessorsRequest {
            context,
            ..Default::default()
        })
        .await
        .map_err(|s| ApiError::from_status("the router", s))?
        .into_inner();
    Ok((answer.processors, answer.unreachable_nodes))
}

fn processor_json(report: ProcessorReport) -> ProcessorJson {
    let info = report.info.unwrap_or_default();
    ProcessorJson {
        context: report.context,
        client_id: report.client_id,
        component_name: report.component_name,
        processor_name: info.processor_name,
        mode: info.mode,
        running: info.running,
        error: info.error,
        active_threads: info.active_threads,
        available_threads: info.available_threads,
        token_store_identifier: info.token_store_identifier,
        is_streaming_processor: info.is_streaming_processor,
        load_balancing_strategy_name: info.load_balancing_strategy_name,
        segments: info
            .segment_status
            .into_iter()
            .map(|s| SegmentJson {
                segment_id: s.segment_id,
                caught_up: s.caught_up,
                replaying: s.replaying,
                one_part_of: s.one_part_of,
                token_position: s.token_position,
                error_state: s.error_state,
            })
            .collect(),
        reported_at: report.reported_at_millis,
        node: report.node,
    }
}

/// Event processors, as the clients connected to every node of the cluster last reported them.
#[utoipa::path(get, path = "/v1/processors", operation_id = "listProcessors", tag = "clients", params(ContextFilter),
    responses(
        (status = 200, description = "OK: the reports of every node that answered", body = Vec<ProcessorJson>,
            headers(("myelin-unreachable-nodes" = String, description = "Nodes whose clients' reports are missing, comma-separated"))),
        (status = 400, description = "Invalid context name", body = ErrorBody),
        (status = 404, description = "No such context", body = ErrorBody),
    ))]
pub async fn processors(
    State(state): State<AppState>,
    Params(filter): Params<ContextFilter>,
) -> Result<(axum::http::HeaderMap, Json<Vec<ProcessorJson>>), ApiError> {
    let context = existing_context(&state, filter.context.as_deref()).await?;
    let (reports, unreachable) = reports(&state, context.unwrap_or_default()).await?;
    Ok((
        unreachable_header(&unreachable),
        Json(reports.into_iter().map(processor_json).collect()),
    ))
}

/// Command and query handler registrations.
#[utoipa::path(get, path = "/v1/handlers", operation_id = "listHandlers", tag = "clients", params(ContextFilter),
    responses(
        (status = 200, description = "OK", body = Vec<HandlerJson>),
        (status = 400, description = "Invalid context name", body = ErrorBody),
        (status = 404, description = "No such context", body = ErrorBody),
    ))]
pub async fn handlers(
    State(state): State<AppState>,
    Params(filter): Params<ContextFilter>,
) -> Result<Json<Vec<HandlerJson>>, ApiError> {
    let context = existing_context(&state, filter.context.as_deref()).await?;
    let handlers = state
        .router_control()?
        .list_handlers(ListHandlersRequest {
            context: context.unwrap_or_default(),
        })
        .await
        .map_err(|s| ApiError::from_status("the router", s))?
        .into_inner()
        .handlers;
    Ok(Json(
        handlers
            .into_iter()
            .map(|h| HandlerJson {
                context: h.context,
                kind: h.kind,
                name: h.name,
                result_name: h.result_name,
                client_id: h.client_id,
                component_name: h.component_name,
                load_factor: h.load_factor,
            })
            .collect(),
    ))
}

/// Sends one instruction to one client and turns a refusal into an error.
async fn send(state: &AppState, context: &str, client_id: &str, instruction: Instruction) -> Result<(), ApiError> {
    let mut call = tonic::Request::new(SendInstructionRequest {
        context: context.to_owned(),
        client_id: client_id.to_owned(),
        instruction: Some(PlatformOutboundInstruction {
            request: Some(instruction),
            instruction_id: String::new(),
        }),
        timeout_millis: INSTRUCTION_TIMEOUT.as_millis() as u32,
        this_node_only: false,
    });
    call.set_timeout(INSTRUCTION_TIMEOUT + Duration::from_secs(5));
    let answer = state
        .router_control()?
        .send_instruction(call)
        .await
        .map_err(|s| ApiError::from_status("the router", s))?
        .into_inner();
    if answer.success {
        return Ok(());
    }
    let code = ErrorCode::parse(&answer.error_code);
    let message = format!("client {client_id}: {}", answer.message);
    Err(if code == ErrorCode::Other {
        ApiError::with_status(axum::http::StatusCode::BAD_GATEWAY, code, message)
    } else {
        ApiError::new(code, message)
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Pause,
    Start,
    Split,
    Merge,
}

/// Runs a processor operation on the clients of `component` that run `processor`.
async fn processor_operation(
    state: &AppState,
    component: &str,
    processor: &str,
    target: ProcessorTarget,
    operation: Operation,
) -> Result<Json<InstructionResultJson>, ApiError> {
    check_name("component name", component, MAX_NAME)?;
    check_name("processor name", processor, MAX_NAME)?;
    if let Some(store) = &target.token_store_identifier {
        check_name("token store identifier", store, MAX_NAME)?;
    }
    let context = target.context.unwrap_or_else(|| DEFAULT_CONTEXT.to_owned());
    existing_context(state, Some(&context)).await?;
    let (reports, unreachable) = reports(state, context.clone()).await?;
    if !unreachable.is_empty() {
        tracing::warn!(nodes = ?unreachable, %processor, "processor operation without the clients of nodes that did not answer");
    }
    let matching: Vec<ProcessorReport> = reports
        .into_iter()
        .filter(|r| {
            let info = r.info.as_ref();
            r.component_name == component
                && info.is_some_and(|i| i.processor_name == processor)
                && target
                    .token_store_identifier
                    .as_ref()
                    .is_none_or(|t| info.is_some_and(|i| &i.token_store_identifier == t))
        })
        .collect();
    if matching.is_empty() {
        return Err(ApiError::new(
            ErrorCode::EventProcessorNotFound,
            format!(
                "no client of component {} in context {context} runs processor {}",
                clip(component),
                clip(processor)
            ),
        ));
    }
    let reference = || EventProcessorReference {
        processor_name: processor.to_owned(),
    };
    let mut clients: Vec<String> = Vec::new();
    match operation {
        Operation::Pause | Operation::Start => {
            for report in &matching {
                if clients.contains(&report.client_id) {
                    continue;
                }
                let instruction = if operation == Operation::Pause {
                    Instruction::PauseEventProcessor(reference())
                } else {
                    Instruction::StartEventProcessor(reference())
                };
                send(state, &context, &report.client_id, instruction).await?;
                clients.push(report.client_id.clone());
            }
        }
        Operation::Split | Operation::Merge => {
            // Split the largest segment; merge the smallest (with its sibling, client-side).
            let segments = matching.iter().flat_map(|r| {
                r.info
                    .iter()
                    .flat_map(|i| i.segment_status.iter())
                    .filter(|s| s.one_part_of > 0)
                    .map(move |s| (r.client_id.as_str(), s.segment_id, s.one_part_of))
            });
            let chosen = if operation == Operation::Split {
                segments.min_by_key(|(_, _, part)| *part)
            } else {
                segments
                    .filter(|(_, _, part)| *part > 1)
                    .max_by_key(|(_, _, part)| *part)
            };
            let Some((client, segment, _)) = chosen else {
                return Err(ApiError::bad_request(format!(
                    "processor {} has no claimed segment to {}",
                    clip(processor),
                    if operation == Operation::Split {
                        "split"
                    } else {
                        "merge"
                    }
                )));
            };
            let reference = EventProcessorSegmentReference {
                processor_name: processor.to_owned(),
                segment_identifier: segment,
            };
            let instruction = if operation == Operation::Split {
                Instruction::SplitEventProcessorSegment(reference)
            } else {
                Instruction::MergeEventProcessorSegment(reference)
            };
            send(state, &context, client, instruction).await?;
            clients.push(client.to_owned());
        }
    }
    Ok(Json(InstructionResultJson {
        result: "SUCCESS".into(),
        clients,
    }))
}

/// Pauses an event processor in every instance of the component that runs it.
#[utoipa::path(patch, path = "/v1/components/{component}/processors/{processor}/pause", operation_id = "pauseProcessor", tag = "clients",
    params(("component" = String, Path, max_length = 512, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"),
        ("processor" = String, Path, max_length = 512, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"), ProcessorTarget),
    responses(
        (status = 200, description = "OK", body = InstructionResultJson),
        (status = 400, description = "Invalid parameters", body = ErrorBody),
        (status = 404, description = "No such context, processor (AXONIQ-2800) or client", body = ErrorBody),
    ))]
pub async fn pause(
    State(state): State<AppState>,
    PathParams((component, processor)): PathParams<(String, String)>,
    Params(target): Params<ProcessorTarget>,
) -> Result<Json<InstructionResultJson>, ApiError> {
    processor_operation(&state, &component, &processor, target, Operation::Pause).await
}

/// Starts an event processor in every instance of the component that runs it.
#[utoipa::path(patch, path = "/v1/components/{component}/processors/{processor}/start", operation_id = "startProcessor", tag = "clients",
    params(("component" = String, Path, max_length = 512, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"),
        ("processor" = String, Path, max_length = 512, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"), ProcessorTarget),
    responses(
        (status = 200, description = "OK", body = InstructionResultJson),
        (status = 400, description = "Invalid parameters", body = ErrorBody),
        (status = 404, description = "No such context, processor (AXONIQ-2800) or client", body = ErrorBody),
    ))]
pub async fn start(
    State(state): State<AppState>,
    PathParams((component, processor)): PathParams<(String, String)>,
    Params(target): Params<ProcessorTarget>,
) -> Result<Json<InstructionResultJson>, ApiError> {
    processor_operation(&state, &component, &processor, target, Operation::Start).await
}

/// Splits the processor's largest segment in two.
#[utoipa::path(patch, path = "/v1/components/{component}/processors/{processor}/segments/split", operation_id = "splitSegment", tag = "clients",
    params(("component" = String, Path, max_length = 512, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"),
        ("processor" = String, Path, max_length = 512, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"), ProcessorTarget),
    responses(
        (status = 200, description = "OK", body = InstructionResultJson),
        (status = 400, description = "Invalid parameters, or no segment to split", body = ErrorBody),
        (status = 404, description = "No such context, processor (AXONIQ-2800) or client", body = ErrorBody),
    ))]
pub async fn split(
    State(state): State<AppState>,
    PathParams((component, processor)): PathParams<(String, String)>,
    Params(target): Params<ProcessorTarget>,
) -> Result<Json<InstructionResultJson>, ApiError> {
    processor_operation(&state, &component, &processor, target, Operation::Split).await
}

/// Merges the processor's smallest segment with its sibling.
#[utoipa::path(patch, path = "/v1/components/{component}/processors/{processor}/segments/merge", operation_id = "mergeSegment", tag = "clients",
    params(("component" = String, Path, max_length = 512, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"),
        ("processor" = String, Path, max_length = 512, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"), ProcessorTarget),
    responses(
        (status = 200, description = "OK", body = InstructionResultJson),
        (status = 400, description = "Invalid parameters, or nothing to merge", body = ErrorBody),
        (status = 404, description = "No such context, processor (AXONIQ-2800) or client", body = ErrorBody),
    ))]
pub async fn merge(
    State(state): State<AppState>,
    PathParams((component, processor)): PathParams<(String, String)>,
    Params(target): Params<ProcessorTarget>,
) -> Result<Json<InstructionResultJson>, ApiError> {
    processor_operation(&state, &component, &processor, target, Operation::Merge).await
}

/// Asks a client to reconnect (it asks again which node to use).
#[utoipa::path(patch, path = "/v1/instructions", operation_id = "reconnectClient", tag = "clients", params(ReconnectTarget),
    responses(
        (status = 200, description = "OK", body = InstructionResultJson),
        (status = 400, description = "Invalid parameters", body = ErrorBody),
        (status = 404, description = "No such context or client (AXONIQ-1300)", body = ErrorBody),
    ))]
pub async fn reconnect(
    State(state): State<AppState>,
    Params(target): Params<ReconnectTarget>,
) -> Result<Json<InstructionResultJson>, ApiError> {
    check_name("client id", &target.client, MAX_NAME)?;
    let context = target.context.unwrap_or_else(|| DEFAULT_CONTEXT.to_owned());
    existing_context(&state, Some(&context)).await?;
    send(
        &state,
        &context,
        &target.client,
        Instruction::RequestReconnect(RequestReconnect {}),
    )
    .await?;
    Ok(Json(InstructionResultJson {
        result: "SUCCESS".into(),
        clients: vec![target.client],
    }))
}
