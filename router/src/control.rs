//! `RouterControl`: what admin asks the router over its Unix socket — the connected client
//! applications and their event-processor reports, the command and query handler
//! registrations, instructions to a client, closing a deleted context, and the metrics text.
//!
//! Like every gRPC service here it only decodes, calls the layer that owns the work (platform,
//! command registry, query router, metrics exporter) and encodes. Bad input (an empty client id,
//! an instruction that is not for clients, an invalid context name, a timeout above
//! [`instruction::MAX_TIMEOUT`]) is INVALID_ARGUMENT and changes nothing; an instruction's own
//! outcome (unknown client, timeout, the client's failure) is an answer, not an error.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::router_control_server::RouterControl;
use myelin_proto::internal::{
    CloseContextRequest, CloseContextResponse, ConnectedClient, HandlerRegistration, ListClientsRequest,
    ListClientsResponse, ListHandlersRequest, ListHandlersResponse, ListProcessorsRequest, ListProcessorsResponse,
    MetricsRequest, MetricsText, ProcessorReport, SendInstructionRequest, SendInstructionResponse,
};
use tonic::{Request, Response, Status};

use crate::command::dispatch::Dispatcher;
use crate::metrics::Exporter;
use crate::peers::Peers;
use crate::platform::{Platform, instruction};
use crate::query::QueryRouter;

/// How long `CloseContext` waits for the closed streams to leave the registries.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// How long a listing waits for another node's part: a node that does not answer in time is
/// named in the answer, not waited for.
const PEER_LIST_TIMEOUT: Duration = Duration::from_secs(3);
/// How much longer than the instruction's own timeout a node asked to deliver it is waited for.
const PEER_INSTRUCTION_MARGIN: Duration = Duration::from_secs(2);

pub struct Control {
    pub node_name: String,
    pub platform: Platform,
    pub commands: Arc<Dispatcher>,
    pub queries: QueryRouter,
    pub exporter: Exporter,
    /// The other nodes, asked for their clients unless a request is for this node only.
    pub peers: Peers,
}

/// `None` for an empty filter, else the validated context name.
fn context_filter(context: &str) -> Result<Option<&str>, Status> {
    if context.is_empty() {
        return Ok(None);
    }
    valid_context(context).map(Some)
}

fn valid_context(context: &str) -> Result<&str, Status> {
    if context.len() > 64 || !context.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(ErrorCode::InvalidContextName.status(format!("invalid context name {context:?}")));
    }
    Ok(context)
}

/// One query handler subscription, flattened from the query router's answer.
struct QueryRegistration {
    context: String,
    query: String,
    handler: u64,
    client_id: String,
    component: String,
    result_names: BTreeSet<String>,
}

fn query_registrations(queries: &QueryRouter) -> Vec<QueryRegistration> {
    queries
        .registrations()
        .into_iter()
        .map(|(context, query, handler, r)| QueryRegistration {
            context,
            query,
            handler,
            client_id: r.client_id,
            component: r.component,
            result_names: r.result_names,
        })
        .collect()
}

fn unix_millis(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Control {
    /// Handler streams of `context` that are registered now: command handler links and query
    /// handler streams, by their ids.
    fn handler_streams(&self, context: &str) -> (BTreeSet<u64>, BTreeSet<u64>) {
        let commands = self
            .commands
            .registry()
            .registrations(Some(context))
            .into_iter()
            .map(|r| r.handler)
            .collect();
        let queries = query_registrations(&self.queries)
            .into_iter()
            .filter(|r| r.context == context)
            .map(|r| r.handler)
            .collect();
        (commands, queries)
    }

    fn control_streams(&self, context: &str) -> usize {
        self.platform
            .clients()
            .count_per_context()
            .get(context)
            .copied()
            .unwrap_or(0)
    }
}

#[tonic::async_trait]
impl RouterControl for Control {
    async fn list_clients(
        &self,
        request: Request<ListClientsRequest>,
    ) -> Result<Response<ListClientsResponse>, Status> {
        let request = request.into_inner();
        let filter = context_filter(&request.context)?;
        let mut clients: Vec<ConnectedClient> = self
            .platform
            .clients()
            .snapshot()
            .into_iter()
            .filter(|c| filter.is_none_or(|wanted| wanted == c.context))
            .map(|c| ConnectedClient {
                context: c.context,
                client_id: c.client_id,
                client_stream_id: c.client_stream_id,
                component_name: c.component_name,
                version: c.version,
                tags: c.tags.into_iter().collect(),
                connected_at_millis: unix_millis(c.connected_since),
                last_heartbeat_millis: c.last_heartbeat.map_or(0, unix_millis),
                node: self.node_name.clone(),
            })
            .collect();
        let mut unreachable_nodes = Vec::new();
        if !request.this_node_only {
            let question = ListClientsRequest {
                this_node_only: true,
                ..request
            };
            let (answers, silent) = self
                .peers
                .ask_all(question, PEER_LIST_TIMEOUT, |mut link, q| async move {
                    link.list_clients(q).await
                })
                .await;
            for (node, answer) in answers {
                clients.extend(answer.clients.into_iter().map(|c| ConnectedClient {
                    node: node.clone(),
                    ..c
                }));
            }
            unreachable_nodes = silent;
            clients.sort_by(|a, b| {
                (&a.context, &a.client_id, &a.client_stream_id).cmp(&(&b.context, &b.client_id, &b.client_stream_id))
            });
        }
        Ok(Response::new(ListClientsResponse {
            clients,
            unreachable_nodes,
        }))
    }

    async fn list_processors(
        &self,
        request: Request<ListProcessorsRequest>,
    ) -> Result<Response<ListProcessorsResponse>, Status> {
        let request = request.into_inner();
        let filter = context_filter(&request.context)?;
        let mut processors: Vec<ProcessorReport> = self
            .platform
            .clients()
            .snapshot()
            .into_iter()
            .filter(|c| filter.is_none_or(|wanted| wanted == c.context))
            .flat_map(|c| {
                c.processors.into_iter().map(move |report| ProcessorReport {
                    context: c.context.clone(),
                    client_id: c.client_id.clone(),
                    component_name: c.component_name.clone(),
                    info: Some(report.info),
                    reported_at_millis: unix_millis(report.reported_at),
                    node: self.node_name.clone(),
                })
            })
            .collect();
        let mut unreachable_nodes = Vec::new();
        if !request.this_node_only {
            let question = ListProcessorsRequest {
                this_node_only: true,
                ..request
            };
            let (answers, silent) = self
                .peers
                .ask_all(question, PEER_LIST_TIMEOUT, |mut link, q| async move {
                    link.list_processors(q).await
                })
                .await;
            for (node, answer) in answers {
                processors.extend(answer.processors.into_iter().map(|p| ProcessorReport {
                    node: node.clone(),
                    ..p
                }));
            }
            unreachable_nodes = silent;
            processors.sort_by(|a, b| {
                let name = |p: &ProcessorReport| p.info.as_ref().map(|i| i.processor_name.clone());
                (&a.context, &a.client_id, name(a)).cmp(&(&b.context, &b.client_id, name(b)))
            });
        }
        Ok(Response::new(ListProcessorsResponse {
            processors,
            unreachable_nodes,
        }))
    }

    #[tracing::instrument(skip_all, fields(context, client_id))]
    async fn send_instruction(
        &self,
        request: Request<SendInstructionRequest>,
    ) -> Result<Response<SendInstructionResponse>, Status> {
        let request = request.into_inner();
        let context = match request.context.as_str() {
            "" => myelin_proto::DEFAULT_CONTEXT,
            name => valid_context(name)?,
        };
        let span = tracing::Span::current();
        span.record("context", context);
        span.record("client_id", request.client_id.as_str());
        if request.client_id.is_empty() {
            return Err(Status::invalid_argument("the instruction names no client id"));
        }
        let Some(instruction) = request.instruction else {
            return Err(Status::invalid_argument("no instruction to send"));
        };
        match &instruction.request {
            Some(kind) if instruction::sendable(kind) => {}
            Some(_) => {
                return Err(Status::invalid_argument(
                    "this kind of instruction is not sent to clients",
                ));
            }
            None => return Err(Status::invalid_argument("the instruction is empty")),
        }
        let timeout = match request.timeout_millis {
            0 => instruction::DEFAULT_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        if timeout > instruction::MAX_TIMEOUT {
            return Err(Status::invalid_argument(format!(
                "timeout_millis may be at most {}",
                instruction::MAX_TIMEOUT.as_millis()
            )));
        }
        let mut outcome = self
            .platform
            .send_instruction(context, &request.client_id, instruction.clone(), timeout)
            .await;
        // Not connected here: the node it is connected to delivers it.
        if !request.this_node_only && outcome.error_code == ErrorCode::NoSuchApplication.code() {
            let question = SendInstructionRequest {
                context: context.to_owned(),
                client_id: request.client_id.clone(),
                instruction: Some(instruction),
                timeout_millis: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
                this_node_only: true,
            };
            let (answers, _) = self
                .peers
                .ask_all(question, timeout + PEER_INSTRUCTION_MARGIN, |mut link, q| async move {
                    link.send_instruction(q).await
                })
                .await;
            // A node that has the client decides: its success first, else its failure.
            let mut found: Vec<(String, SendInstructionResponse)> = answers
                .into_iter()
                .filter(|(_, a)| a.error_code != ErrorCode::NoSuchApplication.code())
                .collect();
            found.sort_by_key(|(_, a)| !a.success);
            if let Some((node, answer)) = found.into_iter().next() {
                tracing::info!(%node, success = answer.success, "instruction delivered by the client's node");
                outcome = instruction::Outcome {
                    success: answer.success,
                    error_code: answer.error_code,
                    message: answer.message,
                };
            }
        }
        if !outcome.success {
            tracing::info!(code = %outcome.error_code, message = %outcome.message, "instruction failed");
        }
        Ok(Response::new(SendInstructionResponse {
            success: outcome.success,
            error_code: outcome.error_code,
            message: outcome.message,
        }))
    }

    #[tracing::instrument(skip_all, fields(context))]
    async fn close_context(
        &self,
        request: Request<CloseContextRequest>,
    ) -> Result<Response<CloseContextResponse>, Status> {
        let request = request.into_inner();
        if request.context.is_empty() {
            return Err(ErrorCode::InvalidContextName.status("no context named"));
        }
        let context = valid_context(&request.context)?;
        tracing::Span::current().record("context", context);
        let (commands, queries) = self.handler_streams(context);
        let control = self.platform.close_context(context);
        // The streams end on their own tasks; wait (bounded) until they have left the
        // registries, so that the caller sees the context empty when this returns.
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        loop {
            let (c, q) = self.handler_streams(context);
            let left = self.control_streams(context) + c.len() + q.len();
            if left == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(left, "some streams of the context had not ended yet");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let closed = control + commands.len() + queries.len();
        Ok(Response::new(CloseContextResponse {
            closed_streams: u32::try_from(closed).unwrap_or(u32::MAX),
        }))
    }

    async fn list_handlers(
        &self,
        request: Request<ListHandlersRequest>,
    ) -> Result<Response<ListHandlersResponse>, Status> {
        let request = request.into_inner();
        let filter = context_filter(&request.context)?;
        let mut handlers: Vec<HandlerRegistration> = self
            .commands
            .registry()
            .registrations(filter)
            .into_iter()
            .map(|r| HandlerRegistration {
                context: r.context,
                kind: "command".to_owned(),
                name: r.command,
                result_name: String::new(),
                client_id: r.client_id,
                component_name: r.component_name,
                load_factor: r.load_factor,
            })
            .collect();
        let mut queries: Vec<HandlerRegistration> = query_registrations(&self.queries)
            .into_iter()
            .filter(|r| filter.is_none_or(|wanted| wanted == r.context))
            .flat_map(|r| {
                let names: Vec<String> = if r.result_names.is_empty() {
                    vec![String::new()]
                } else {
                    r.result_names.into_iter().collect()
                };
                names.into_iter().map(move |result_name| HandlerRegistration {
                    context: r.context.clone(),
                    kind: "query".to_owned(),
                    name: r.query.clone(),
                    result_name,
                    client_id: r.client_id.clone(),
                    component_name: r.component.clone(),
                    load_factor: 0,
                })
            })
            .collect();
        queries.sort_by(|a, b| {
            (&a.context, &a.name, &a.client_id, &a.result_name).cmp(&(
                &b.context,
                &b.name,
                &b.client_id,
                &b.result_name,
            ))
        });
        handlers.extend(queries);
        Ok(Response::new(ListHandlersResponse { handlers }))
    }

    async fn metrics(&self, _: Request<MetricsRequest>) -> Result<Response<MetricsText>, Status> {
        Ok(Response::new(MetricsText {
            text: self.exporter.render(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_names_are_checked() {
        assert_eq!(context_filter("").unwrap(), None);
        assert_eq!(context_filter("orders-1").unwrap(), Some("orders-1"));
        let bad = context_filter("a b").unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(valid_context(&"x".repeat(65)).is_err());
    }
}
