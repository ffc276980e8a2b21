//! Instructions the node sends a client application over its control stream (pause or start an
//! event processor, split or merge a segment, release a segment, report a processor, reconnect),
//! and the client's answers.
//!
//! An instruction gets a fresh random id and goes to every control stream the client has in the
//! context. The first answer from one of those streams that carries the id decides the outcome:
//! an `ack` (what axonserver-connector clients send once the work is done, failed or not) or a
//! `result` (what older Axon Framework clients send for split and merge). No answer within the
//! timeout (Axon's `instruction.result.timeout`, 10 s) is INSTRUCTION_RESULT_TIMEOUT.
//! `RequestReconnect` is the exception: Axon's connector does not acknowledge it, it leaves (its
//! Java suite measured it), so that one succeeds once it is on the client's streams.
//!
//! Memory is bounded whatever clients do: at most [`MAX_PENDING`] instructions wait at a time,
//! and a waiting instruction is forgotten when its caller stops waiting (answer, timeout, or the
//! caller going away), so a client that never answers leaves nothing behind. Answers for unknown
//! ids, or from a stream the instruction was not sent to, are ignored.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use myelin_proto::axon::control::PlatformOutboundInstruction;
use myelin_proto::axon::control::platform_outbound_instruction::Request as Outbound;
use myelin_proto::axon::{ErrorMessage, InstructionAck, InstructionResult};
use myelin_proto::errors::ErrorCode;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::clients::Clients;

/// How long the node waits for a client's answer when the caller names no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait a caller may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Instructions waiting for an answer at most; beyond, sending fails at once with AXONIQ-1900.
pub const MAX_PENDING: usize = 1_024;

/// A client's answer to an instruction.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Ack(InstructionAck),
    Result(InstructionResult),
}

/// How an instruction ended, as RouterControl reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub success: bool,
    /// `AXONIQ-xxxx` when it failed.
    pub error_code: String,
    pub message: String,
}

impl Outcome {
    fn success(message: impl Into<String>) -> Outcome {
        Outcome {
            success: true,
            error_code: String::new(),
            message: message.into(),
        }
    }

    fn failed(code: ErrorCode, message: impl Into<String>) -> Outcome {
        Outcome {
            success: false,
            error_code: code.code().to_owned(),
            message: message.into(),
        }
    }

    fn of(answer: Answer) -> Outcome {
        let (success, error) = match answer {
            Answer::Ack(ack) => (ack.success, ack.error),
            Answer::Result(result) => (result.success, result.error),
        };
        if success {
            return Outcome::success("the client carried out the instruction");
        }
        let ErrorMessage {
            message, error_code, ..
        } = error.unwrap_or_default();
        Outcome {
            success: false,
            error_code: if error_code.is_empty() {
                ErrorCode::InstructionExecutionError.code().to_owned()
            } else {
                error_code
            },
            message: if message.is_empty() {
                "the client reported a failure without a reason".to_owned()
            } else {
                message
            },
        }
    }
}

/// Whether a caller may send this kind of instruction (the others belong to the stream itself).
pub fn sendable(request: &Outbound) -> bool {
    matches!(
        request,
        Outbound::RequestReconnect(_)
            | Outbound::PauseEventProcessor(_)
            | Outbound::StartEventProcessor(_)
            | Outbound::ReleaseSegment(_)
            | Outbound::RequestEventProcessorInfo(_)
            | Outbound::SplitEventProcessorSegment(_)
            | Outbound::MergeEventProcessorSegment(_)
    )
}

struct Waiting {
    /// The control streams the instruction went to; only they may answer it.
    streams: Vec<String>,
    answer: oneshot::Sender<Answer>,
}

/// The instructions of this node that wait for an answer, by instruction id.
#[derive(Default)]
pub struct Instructions {
    pending: Mutex<HashMap<String, Waiting>>,
}

impl Instructions {
    fn pending(&self) -> MutexGuard<'_, HashMap<String, Waiting>> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An answer that arrived on the control stream `client_stream_id`; false if nobody waits
    /// for it (unknown id, already answered, timed out, or not sent to that stream).
    pub fn settle(&self, client_stream_id: &str, instruction_id: &str, answer: Answer) -> bool {
        let waiting = {
            let mut pending = self.pending();
            match pending.get(instruction_id) {
                Some(waiting) if waiting.streams.iter().any(|s| s == client_stream_id) => {
                    pending.remove(instruction_id)
                }
                _ => None,
            }
        };
        match waiting {
            Some(waiting) => waiting.answer.send(answer).is_ok(),
            None => false,
        }
    }

    /// How many instructions wait for an answer now.
    pub fn waiting(&self) -> usize {
        self.pending().len()
    }

    /// Sends `instruction` to every control stream of `client_id` in `context` and waits for
    /// the first answer, at most `timeout`.
    pub async fn send(
        &self,
        clients: &Clients,
        context: &str,
        client_id: &str,
        mut instruction: PlatformOutboundInstruction,
        timeout: Duration,
    ) -> Outcome {
        let targets = clients.outboxes(context, client_id);
        if targets.is_empty() {
            return Outcome::failed(
                ErrorCode::NoSuchApplication,
                format!("no client {client_id} is connected to context {context}"),
            );
        }
        let id = crate::query::unique_id();
        instruction.instruction_id = id.clone();
        let (reply, answer) = oneshot::channel();
        {
            let mut pending = self.pending();
            if pending.len() >= MAX_PENDING {
                return Outcome::failed(ErrorCode::TooManyRequests, "too many instructions wait for an answer");
            }
            pending.insert(
                id.clone(),
                Waiting {
                    streams: targets.iter().map(|(stream, _)| stream.clone()).collect(),
                    answer: reply,
                },
            );
        }
        let _forget = Forget {
            instructions: self,
            id: &id,
        };
        let deadline = Instant::now() + timeout;
        let mut delivered = 0usize;
        for (stream, outbox) in &targets {
            // The queue is bounded: a client that does not read makes this wait, never grow.
            match tokio::time::timeout_at(deadline, outbox.send(Ok(instruction.clone()))).await {
                Ok(Ok(())) => delivered += 1,
                Ok(Err(_)) => {
                    tracing::debug!(client_stream_id = %stream, "control stream closed before the instruction")
                }
                Err(_) => tracing::debug!(client_stream_id = %stream, "control stream not reading"),
            }
        }
        if delivered == 0 && Instant::now() < deadline {
            return Outcome::failed(
                ErrorCode::NoSuchApplication,
                format!("client {client_id} disconnected from context {context}"),
            );
        }
        tracing::info!(%client_id, %context, instruction_id = %id, streams = delivered, "instruction sent to client");
        if delivered > 0 && matches!(instruction.request, Some(Outbound::RequestReconnect(_))) {
            return Outcome::success("the client was asked to reconnect");
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(answer)) => Outcome::of(answer),
            // The entry is removed only by `settle` (which sends) or by `_forget` (later).
            Ok(Err(_)) => Outcome::failed(ErrorCode::Other, "the instruction was dropped without an answer"),
            Err(_) => Outcome::failed(
                ErrorCode::InstructionResultTimeout,
                format!(
                    "client {client_id} did not answer instruction {id} within {} ms",
                    timeout.as_millis()
                ),
            ),
        }
    }
}

/// Forgets a waiting instruction however the wait ends, including the caller going away.
struct Forget<'a> {
    instructions: &'a Instructions,
    id: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.instructions.pending().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use myelin_proto::axon::control::{ClientIdentification, EventProcessorReference};
    use tokio::sync::mpsc;

    fn pause() -> PlatformOutboundInstruction {
        PlatformOutboundInstruction {
            request: Some(Outbound::PauseEventProcessor(EventProcessorReference {
                processor_name: "p".into(),
            })),
            instruction_id: String::new(),
        }
    }

    fn register(clients: &Clients, context: &str, id: &str) -> (String, super::super::stream::OutboxReceiver) {
        let (tx, rx) = mpsc::channel(4);
        let client = ClientIdentification {
            client_id: id.into(),
            ..Default::default()
        };
        (clients.register(context, &client, tx), rx)
    }

    fn ack(id: &str, success: bool, error: Option<ErrorMessage>) -> Answer {
        Answer::Ack(InstructionAck {
            instruction_id: id.into(),
            success,
            error,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_request_succeeds_once_delivered_without_an_answer() {
        let clients = Arc::new(Clients::default());
        let instructions = Instructions::default();
        let (_stream, mut rx) = register(&clients, "c", "app");
        let reconnect = PlatformOutboundInstruction {
            request: Some(Outbound::RequestReconnect(Default::default())),
            instruction_id: String::new(),
        };
        let outcome = instructions
            .send(&clients, "c", "app", reconnect.clone(), DEFAULT_TIMEOUT)
            .await;
        assert!(outcome.success, "{outcome:?}");
        assert!(matches!(
            rx.recv().await.unwrap().unwrap().request,
            Some(Outbound::RequestReconnect(_))
        ));
        assert_eq!(instructions.waiting(), 0);
        let outcome = instructions
            .send(&clients, "c", "nobody", reconnect, DEFAULT_TIMEOUT)
            .await;
        assert_eq!(outcome.error_code, "AXONIQ-1300");
    }

    #[tokio::test(start_paused = true)]
    async fn answers_timeouts_and_strangers() {
        let clients = Arc::new(Clients::default());
        let instructions = Arc::new(Instructions::default());
        let (stream, mut rx) = register(&clients, "c", "app");
        let (other_stream, _other_rx) = register(&clients, "c", "other-app");

        // Unknown client.
        let outcome = instructions
            .send(&clients, "c", "nobody", pause(), DEFAULT_TIMEOUT)
            .await;
        assert_eq!((outcome.success, outcome.error_code.as_str()), (false, "AXONIQ-1300"));
        let outcome = instructions.send(&clients, "d", "app", pause(), DEFAULT_TIMEOUT).await;
        assert_eq!(outcome.error_code, "AXONIQ-1300");

        // Acknowledged; a stranger's answer and a wrong id do not count.
        let call = tokio::spawn({
            let (clients, instructions) = (clients.clone(), instructions.clone());
            async move { instructions.send(&clients, "c", "app", pause(), DEFAULT_TIMEOUT).await }
        });
        let sent = rx.recv().await.unwrap().unwrap();
        assert!(matches!(sent.request, Some(Outbound::PauseEventProcessor(_))));
        let id = sent.instruction_id.clone();
        assert_eq!(id.len(), 36);
        assert!(!instructions.settle(&other_stream, &id, ack(&id, true, None)));
        assert!(!instructions.settle(&stream, "wrong", ack("wrong", true, None)));
        assert!(instructions.settle(&stream, &id, ack(&id, true, None)));
        assert!(
            !instructions.settle(&stream, &id, ack(&id, true, None)),
            "answered twice"
        );
        assert!(call.await.unwrap().success);
        assert_eq!(instructions.waiting(), 0);

        // A failed result carries the client's code; without one it is AXONIQ-1003.
        let call = tokio::spawn({
            let (clients, instructions) = (clients.clone(), instructions.clone());
            async move { instructions.send(&clients, "c", "app", pause(), DEFAULT_TIMEOUT).await }
        });
        let id = rx.recv().await.unwrap().unwrap().instruction_id;
        let failed = Answer::Result(InstructionResult {
            instruction_id: id.clone(),
            success: false,
            error: Some(ErrorMessage {
                message: "cannot split".into(),
                ..Default::default()
            }),
        });
        assert!(instructions.settle(&stream, &id, failed));
        let outcome = call.await.unwrap();
        assert_eq!(
            (outcome.success, outcome.error_code.as_str(), outcome.message.as_str()),
            (false, "AXONIQ-1003", "cannot split")
        );

        // No answer: the timeout code, and nothing is left waiting.
        let call = tokio::spawn({
            let (clients, instructions) = (clients.clone(), instructions.clone());
            async move {
                instructions
                    .send(&clients, "c", "app", pause(), Duration::from_millis(500))
                    .await
            }
        });
        let id = rx.recv().await.unwrap().unwrap().instruction_id;
        assert_eq!(instructions.waiting(), 1);
        tokio::time::advance(Duration::from_millis(501)).await;
        let outcome = call.await.unwrap();
        assert_eq!((outcome.success, outcome.error_code.as_str()), (false, "AXONIQ-1004"));
        assert_eq!(instructions.waiting(), 0);
        assert!(!instructions.settle(&stream, &id, ack(&id, true, None)), "late answer");
    }

    #[tokio::test(start_paused = true)]
    async fn every_stream_of_the_client_gets_it_and_the_first_answer_decides() {
        let clients = Arc::new(Clients::default());
        let instructions = Arc::new(Instructions::default());
        let (old, mut old_rx) = register(&clients, "c", "app");
        let (_new, mut new_rx) = register(&clients, "c", "app");
        let call = tokio::spawn({
            let (clients, instructions) = (clients.clone(), instructions.clone());
            async move { instructions.send(&clients, "c", "app", pause(), DEFAULT_TIMEOUT).await }
        });
        let id = old_rx.recv().await.unwrap().unwrap().instruction_id;
        assert_eq!(new_rx.recv().await.unwrap().unwrap().instruction_id, id);
        let error = ErrorMessage {
            message: "Unknown processor".into(),
            error_code: "AXONIQ-1003".into(),
            ..Default::default()
        };
        assert!(instructions.settle(&old, &id, ack(&id, false, Some(error))));
        let outcome = call.await.unwrap();
        assert_eq!(
            (outcome.success, outcome.message.as_str()),
            (false, "Unknown processor")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_instructions_are_bounded_and_a_closed_stream_fails_fast() {
        let clients = Arc::new(Clients::default());
        let instructions = Arc::new(Instructions::default());
        let (_stream, rx) = register(&clients, "c", "app");
        drop(rx);
        let outcome = instructions.send(&clients, "c", "app", pause(), DEFAULT_TIMEOUT).await;
        assert_eq!((outcome.success, outcome.error_code.as_str()), (false, "AXONIQ-1300"));
        assert_eq!(instructions.waiting(), 0);

        for i in 0..MAX_PENDING {
            let (reply, _) = oneshot::channel();
            instructions.pending().insert(
                format!("fake-{i}"),
                Waiting {
                    streams: Vec::new(),
                    answer: reply,
                },
            );
        }
        let (_live, _live_rx) = register(&clients, "c", "live");
        let outcome = instructions.send(&clients, "c", "live", pause(), DEFAULT_TIMEOUT).await;
        assert_eq!(outcome.error_code, "AXONIQ-1900");
    }

    #[test]
    fn only_instructions_for_clients_are_sendable() {
        assert!(sendable(&Outbound::RequestReconnect(Default::default())));
        assert!(sendable(&Outbound::MergeEventProcessorSegment(Default::default())));
        assert!(!sendable(&Outbound::Heartbeat(Default::default())));
        assert!(!sendable(&Outbound::Ack(Default::default())));
    }
}
