//! Commands in flight: routing a `Dispatch` to a handler, matching the response, and failing it
//! when no answer can come (no handler, full queue, lost connection, timeout).
//!
//! Every failure is answered in-band, as Axon Server does: the `Dispatch` call returns OK with a
//! `CommandResponse` carrying the `AXONIQ-xxxx` code, an `ErrorMessage` and `request_identifier` =
//! the command's id. A pending command is owned by exactly one entry of the pending table; whoever
//! removes the entry (the response, the lost connection, the timeout, or the caller going away)
//! decides the outcome, so a command is answered at most once.
//!
//! Memory: a command holds bytes of the node's command budget
//! (`myelin.limits.command-queue-bytes`) from the moment it is dispatched: its encoded size
//! until its handler's stream takes it, and its pending entry (id and context) until it is
//! answered. A command that does not fit fails at once with AXONIQ-1900, like a full queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use myelin_proto::axon::command::{Command, CommandResponse};
use myelin_proto::axon::meta_data_value::Data;
use myelin_proto::axon::{ErrorMessage, ProcessingKey};
use myelin_proto::errors::ErrorCode;
use prost::Message as _;
use tokio::sync::oneshot;

use super::metrics::{CommandMetrics, Metrics};
use super::registry::{HandlerId, HandlerLink, LinkError, Registry, Routed};
use crate::handler_limits::{Budget, Charge};

/// The `location` Axon Server puts in the error messages of in-band routing errors.
pub const ERROR_LOCATION: &str = "AxonServer";
/// Commands in flight on this node at most (Axon's pending-command cache); beyond: AXONIQ-1900.
pub const MAX_PENDING: usize = 100_000;
/// What a pending entry costs besides its id and context (map slot, channel, bookkeeping).
const PENDING_OVERHEAD: usize = 160;

struct Pending {
    /// Distinguishes this dispatch from a later one that reuses the message id.
    seq: u64,
    context: String,
    handler: HandlerId,
    reply: oneshot::Sender<CommandResponse>,
    /// The entry's own bytes of the node's budget.
    _charge: Charge,
}

/// Routes commands and tracks them until answered.
pub struct Dispatcher {
    registry: Registry,
    pending: Mutex<HashMap<String, Pending>>,
    metrics: Metrics,
    default_timeout: Duration,
    next_seq: AtomicU64,
    /// The node's command budget (`myelin.limits.command-queue-bytes`).
    bytes: Budget,
}

impl Dispatcher {
    /// A dispatcher whose commands may hold at most `max_bytes` at a time.
    pub fn new(default_timeout: Duration, max_bytes: usize) -> Dispatcher {
        Dispatcher {
            registry: Registry::default(),
            pending: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            default_timeout,
            next_seq: AtomicU64::new(1),
            bytes: Budget::new(max_bytes),
        }
    }

    /// Bytes the node's commands hold now.
    pub fn held_bytes(&self) -> usize {
        self.bytes.used()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// How long a command without a TIMEOUT instruction may take.
    pub fn timeout_of(&self, command: &Command) -> Duration {
        command_timeout(command).unwrap_or(self.default_timeout)
    }

    /// Routes `command` in `context` and waits for its response (or the in-band error).
    pub async fn dispatch(&self, context: &str, command: Command) -> CommandResponse {
        let timeout = self.timeout_of(&command);
        self.dispatch_via(context, command, Target::Ring, timeout).await
    }

    /// A command another node routed to handler `handler` of this node (`remote`). If that
    /// handler is gone, the command goes to the handler this node's ring picks for it when that
    /// handler is connected here; never on to a third node (the sender's view was stale: it
    /// hears the answer and the new handler set soon after).
    pub async fn dispatch_to(
        &self,
        context: &str,
        handler: HandlerId,
        command: Command,
        timeout: Duration,
    ) -> CommandResponse {
        self.dispatch_via(context, command, Target::Handler(handler), timeout)
            .await
    }

    async fn dispatch_via(
        &self,
        context: &str,
        mut command: Command,
        target: Target,
        timeout: Duration,
    ) -> CommandResponse {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        if command.message_identifier.is_empty() {
            command.message_identifier = format!("myelin-command-{seq}");
        }
        let id = command.message_identifier.clone();
        let metrics = self.metrics.context(context);
        let mut guard = InFlight::start(self, &id, seq, metrics.clone());

        let (reply, answer) = oneshot::channel();
        let routed = {
            let mut pending = self.pending.lock().unwrap();
            if pending.contains_key(&id) {
                drop(pending);
                guard.owned = false;
                return error_response(ErrorCode::CommandDuplicated, format!("command id {id} duplicated"), &id);
            }
            if pending.len() >= MAX_PENDING {
                drop(pending);
                guard.owned = false;
                return error_response(ErrorCode::TooManyRequests, "Too many commands in flight", &id);
            }
            let size = command.encoded_len();
            let entry = id.len() + context.len() + PENDING_OVERHEAD;
            let (Some(charge), Some(entry_charge)) = (self.bytes.try_charge(size), self.bytes.try_charge(entry)) else {
                drop(pending);
                guard.owned = false;
                tracing::debug!(request = %id, size, held = self.bytes.used(), "command refused: node command budget full");
                return error_response(
                    ErrorCode::TooManyRequests,
                    format!(
                        "Too many command bytes in flight: the command ({size} bytes) does not fit in the \
                         {} bytes of myelin.limits.command-queue-bytes",
                        self.bytes.limit()
                    ),
                    &id,
                );
            };
            pending.insert(
                id.clone(),
                Pending {
                    seq,
                    context: context.to_owned(),
                    handler: 0,
                    reply,
                    _charge: entry_charge,
                },
            );
            Routed { command, charge }
        };
        let deadline = tokio::time::Instant::now() + timeout;
        if matches!(target, Target::Ring) {
            self.await_returning_handler(context, &routed.command, deadline).await;
        }
        if let Err(response) = self.route(context, routed, target) {
            return *response;
        }
        metrics.routed();
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(response)) => {
                guard.failed = !response.error_code.is_empty();
                response
            }
            // The entry was dropped without an answer: only on a bug; say so rather than hang.
            Ok(Err(_)) => error_response(ErrorCode::Other, "command dropped without an answer", &id),
            Err(_) => {
                // The guard removes the entry; a late response is then ignored.
                error_response(ErrorCode::CommandTimeout, "Cancelled by AxonServer due to timeout", &id)
            }
        }
    }

    /// Waits, at most until `deadline` and [`super::registry::RETURN_WINDOW`] after it left, while the
    /// command has no handler but its last one disconnected lately: a client asked to
    /// reconnect subscribes again on its new connection a moment later, and the command then
    /// goes to it instead of failing with "no handler". Returns at once otherwise.
    async fn await_returning_handler(&self, context: &str, command: &Command, deadline: tokio::time::Instant) {
        let key = routing_key(command);
        let mut subscriptions = self.registry.subscriptions();
        let mut held = false;
        while self.registry.select(context, &command.name, key).is_none()
            && self.registry.recently_orphaned(context, &command.name)
        {
            held = true;
            let wait = tokio::time::Instant::now() + Duration::from_millis(100);
            // Woken by a subscription, or every 100 ms to see whether the window closed.
            if tokio::time::timeout_at(wait.min(deadline), subscriptions.changed())
                .await
                .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                break;
            }
        }
        if held {
            tracing::debug!(command = %command.name, %context, "command held while its handler reconnected");
        }
    }

    /// Hands a pending command to a handler. On failure the in-band error is returned and the
    /// pending entry is left to the caller, who holds (or owns) its reply.
    fn route(&self, context: &str, routed: Routed, target: Target) -> Result<(), Box<CommandResponse>> {
        let command = &routed.command;
        let id = command.message_identifier.clone();
        let link = match target {
            Target::Ring => self.registry.select(context, &command.name, routing_key(command)),
            Target::Handler(handler) => self
                .registry
                .link(context, &command.name, handler)
                .or_else(|| self.registry.select(context, &command.name, routing_key(command)))
                .filter(|link| link.remote_node().is_none()),
        };
        let Some(link) = link else {
            return Err(Box::new(error_response(
                ErrorCode::NoHandlerForCommand,
                format!("No Handler for command: {}", command.name),
                &id,
            )));
        };
        // Assign before sending so a fast response finds its entry.
        if let Some(entry) = self.pending.lock().unwrap().get_mut(&id) {
            entry.handler = link.id();
        }
        match link.send(routed) {
            Ok(()) => Ok(()),
            Err(LinkError::QueueFull) => Err(Box::new(error_response(
                ErrorCode::TooManyRequests,
                format!("Failed to add request to queue {}", link.client_id()),
                &id,
            ))),
            Err(LinkError::QueueBytesFull) => Err(Box::new(error_response(
                ErrorCode::TooManyRequests,
                format!(
                    "Failed to add request to queue {}: its queued commands reach \
                     myelin.limits.command-queue-bytes-per-client",
                    link.client_id()
                ),
                &id,
            ))),
            Err(LinkError::Closed) => Err(Box::new(connection_lost(&link.client_id(), &id))),
        }
    }

    /// A handler's response: completes the dispatch it answers. Responses nobody waits for, or
    /// from a handler that was not sent that command, are ignored.
    pub fn respond(&self, handler: HandlerId, response: CommandResponse) {
        let id = response.request_identifier.clone();
        let entry = {
            let mut pending = self.pending.lock().unwrap();
            match pending.get(&id) {
                Some(entry) if entry.handler == handler => pending.remove(&id),
                Some(_) => {
                    tracing::warn!(request = %id, handler, "response from a handler that was not sent this command; ignored");
                    return;
                }
                None => None,
            }
        };
        match entry {
            Some(entry) => {
                let _ = entry.reply.send(response);
            }
            None => tracing::warn!(request = %id, handler, "response for an unknown command id; ignored"),
        }
    }

    /// A handler went away: it leaves the registry at once; the commands it had queued but not
    /// received are routed again (to another handler, or failed); the ones it received fail
    /// with AXONIQ-4001.
    pub fn handler_closed(&self, link: &dyn HandlerLink, unsent: Vec<Routed>) {
        self.registry.remove(link.id());
        let client_id = link.client_id();
        let mut rerouted = 0usize;
        for routed in unsent {
            let id = routed.command.message_identifier.clone();
            let context = match self.pending.lock().unwrap().get(&id) {
                Some(entry) if entry.handler == link.id() => entry.context.clone(),
                _ => continue, // already answered (timed out, caller gone)
            };
            if let Err(response) = self.route(&context, routed, Target::Ring) {
                let response = if response.error_code == ErrorCode::NoHandlerForCommand.code() {
                    connection_lost(&client_id, &id)
                } else {
                    *response
                };
                tracing::debug!(request = %id, code = %response.error_code, "queued command could not be re-routed");
                if let Some(entry) = self.pending.lock().unwrap().remove(&id) {
                    let _ = entry.reply.send(response);
                }
            } else {
                rerouted += 1;
            }
        }
        let lost: Vec<(String, Pending)> = {
            let mut pending = self.pending.lock().unwrap();
            let ids: Vec<String> = pending
                .iter()
                .filter(|(_, entry)| entry.handler == link.id())
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| pending.remove(&id).map(|entry| (id, entry)))
                .collect()
        };
        if !lost.is_empty() || rerouted > 0 {
            tracing::info!(client_id = %client_id, failed = lost.len(), rerouted, "command handler disconnected with commands in flight");
        }
        for (id, entry) in lost {
            let _ = entry.reply.send(connection_lost(&client_id, &id));
        }
    }
}

/// Where a command goes: to the handler the ring picks for its routing key, or (sent here by
/// another node) to a given handler connected here.
#[derive(Debug, Clone, Copy)]
enum Target {
    Ring,
    Handler(HandlerId),
}

/// Removes a dispatch's pending entry and counts it when the dispatch ends in any way,
/// including the caller cancelling the call (the future is dropped).
struct InFlight<'a> {
    dispatcher: &'a Dispatcher,
    id: &'a str,
    seq: u64,
    metrics: Arc<CommandMetrics>,
    started: Instant,
    failed: bool,
    /// False when the id belongs to another dispatch (duplicate): leave its entry alone.
    owned: bool,
}

impl<'a> InFlight<'a> {
    fn start(dispatcher: &'a Dispatcher, id: &'a str, seq: u64, metrics: Arc<CommandMetrics>) -> Self {
        metrics.started();
        InFlight {
            dispatcher,
            id,
            seq,
            metrics,
            started: Instant::now(),
            failed: true,
            owned: true,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.owned {
            let mut pending = self.dispatcher.pending.lock().unwrap();
            if pending.get(self.id).is_some_and(|entry| entry.seq == self.seq) {
                pending.remove(self.id);
            }
        }
        self.metrics.finished(self.failed, self.started.elapsed());
    }
}

/// The routing key: the ROUTING_KEY processing instruction's text, else the message id.
pub fn routing_key(command: &Command) -> &str {
    command
        .processing_instructions
        .iter()
        .filter(|pi| pi.key == ProcessingKey::RoutingKey as i32)
        .find_map(|pi| match pi.value.as_ref().and_then(|v| v.data.as_ref()) {
            Some(Data::TextValue(text)) => Some(text.as_str()),
            _ => None,
        })
        .unwrap_or(&command.message_identifier)
}

/// The TIMEOUT processing instruction, in milliseconds, if positive.
pub fn command_timeout(command: &Command) -> Option<Duration> {
    command
        .processing_instructions
        .iter()
        .filter(|pi| pi.key == ProcessingKey::Timeout as i32)
        .find_map(|pi| match pi.value.as_ref().and_then(|v| v.data.as_ref()) {
            Some(Data::NumberValue(ms)) => u64::try_from(*ms).ok(),
            Some(Data::TextValue(text)) => text.trim().parse::<u64>().ok(),
            _ => None,
        })
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
}

/// An in-band routing error, as Axon Server sends it.
pub fn error_response(code: ErrorCode, message: impl Into<String>, request_id: &str) -> CommandResponse {
    CommandResponse {
        message_identifier: format!("{request_id}-error"),
        error_code: code.code().to_owned(),
        error_message: Some(ErrorMessage {
            message: message.into(),
            location: ERROR_LOCATION.to_owned(),
            details: Vec::new(),
            error_code: code.code().to_owned(),
        }),
        request_identifier: request_id.to_owned(),
        ..Default::default()
    }
}

pub fn connection_lost(client_id: &str, request_id: &str) -> CommandResponse {
    error_response(
        ErrorCode::ConnectionToHandlerLost,
        format!("Connection lost while executing command on: {client_id}"),
        request_id,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    /// A link that records what it was sent.
    struct Recorder {
        id: HandlerId,
        key: String,
        sent: StdMutex<Vec<Routed>>,
        full: bool,
    }

    impl HandlerLink for Recorder {
        fn id(&self) -> HandlerId {
            self.id
        }
        fn ring_key(&self) -> &str {
            &self.key
        }
        fn client_id(&self) -> String {
            self.key.clone()
        }
        fn send(&self, command: Routed) -> Result<(), LinkError> {
            if self.full {
                return Err(LinkError::QueueFull);
            }
            self.sent.lock().unwrap().push(command);
            Ok(())
        }
    }

    fn recorder(id: HandlerId, full: bool) -> Arc<Recorder> {
        Arc::new(Recorder {
            id,
            key: format!("client-{id}"),
            sent: StdMutex::new(Vec::new()),
            full,
        })
    }

    fn command(id: &str) -> Command {
        Command {
            message_identifier: id.to_owned(),
            name: "Cmd".to_owned(),
            ..Default::default()
        }
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn response_matching_timeout_and_strays() {
        let prometheus = crate::metrics::builder().build_recorder();
        let dispatcher = Arc::new(Dispatcher::new(Duration::from_secs(300), usize::MAX));
        // The context's handles are made (and kept) under a recorder of this test's own.
        metrics::with_local_recorder(&prometheus, || dispatcher.metrics().context("c"));
        let link = recorder(1, false);
        dispatcher.registry().subscribe("c", "Cmd", link.clone(), 0);

        let call = tokio::spawn({
            let d = dispatcher.clone();
            async move { d.dispatch("c", command("x")).await }
        });
        settle().await;
        assert_eq!(link.sent.lock().unwrap().len(), 1);
        let answer = CommandResponse {
            request_identifier: "x".to_owned(),
            message_identifier: "r".to_owned(),
            ..Default::default()
        };
        dispatcher.respond(2, answer.clone()); // not the handler it went to: ignored
        dispatcher.respond(
            1,
            CommandResponse {
                request_identifier: "unknown".to_owned(),
                ..Default::default()
            },
        );
        dispatcher.respond(1, answer.clone());
        assert_eq!(call.await.unwrap(), answer);

        // The default timeout applies without a TIMEOUT instruction; the entry is then gone.
        let call = tokio::spawn({
            let d = dispatcher.clone();
            async move { d.dispatch("c", command("slow")).await }
        });
        tokio::time::advance(Duration::from_secs(301)).await;
        let response = call.await.unwrap();
        assert_eq!(response.error_code, "AXONIQ-4002");
        assert!(dispatcher.pending.lock().unwrap().is_empty());
        let text = prometheus.handle().render();
        let value = |name, outcome: Option<&str>| {
            let mut labels = vec![("context", "c")];
            labels.extend(outcome.map(|o| ("outcome", o)));
            crate::metrics::sample(&text, name, &labels)
        };
        assert_eq!(value("myelin_commands_routed_total", None), Some(2.0));
        assert_eq!(value("myelin_commands_in_flight", None), Some(0.0));
        assert_eq!(value("myelin_commands_total", Some("error")), Some(1.0));
        assert_eq!(value("myelin_commands_total", Some("success")), Some(1.0));
    }

    #[tokio::test(start_paused = true)]
    async fn lost_handler_and_full_queue() {
        let dispatcher = Arc::new(Dispatcher::new(Duration::from_secs(300), usize::MAX));
        let gone = recorder(1, false);
        dispatcher.registry().subscribe("c", "Cmd", gone.clone(), 0);
        let call = tokio::spawn({
            let d = dispatcher.clone();
            async move { d.dispatch("c", command("held")).await }
        });
        settle().await;
        dispatcher.handler_closed(gone.as_ref(), Vec::new());
        let response = call.await.unwrap();
        assert_eq!(response.error_code, "AXONIQ-4001");
        assert_eq!(
            response.error_message.unwrap().message,
            "Connection lost while executing command on: client-1"
        );
        assert_eq!(dispatcher.registry().handler_count("c", "Cmd"), 0);

        dispatcher.registry().subscribe("c", "Cmd", recorder(2, true), 0);
        let response = dispatcher.dispatch("c", command("full")).await;
        assert_eq!(response.error_code, "AXONIQ-1900");
        assert!(dispatcher.pending.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn queued_commands_of_a_lost_handler_are_rerouted() {
        let dispatcher = Arc::new(Dispatcher::new(Duration::from_secs(300), usize::MAX));
        let gone = recorder(1, false);
        dispatcher.registry().subscribe("c", "Cmd", gone.clone(), 0);
        let call = tokio::spawn({
            let d = dispatcher.clone();
            async move { d.dispatch("c", command("queued")).await }
        });
        settle().await;
        let survivor = recorder(2, false);
        dispatcher.registry().subscribe("c", "Cmd", survivor.clone(), 0);
        let unsent = std::mem::take(&mut *gone.sent.lock().unwrap());
        dispatcher.handler_closed(gone.as_ref(), unsent);
        assert_eq!(survivor.sent.lock().unwrap().len(), 1);
        let answer = CommandResponse {
            request_identifier: "queued".to_owned(),
            ..Default::default()
        };
        dispatcher.respond(2, answer.clone());
        assert_eq!(call.await.unwrap(), answer);
    }

    /// The node's command budget: a command that does not fit fails at once with AXONIQ-1900
    /// and changes nothing; a sent command keeps only its pending entry's bytes until answered;
    /// everything returns when it is.
    #[tokio::test(start_paused = true)]
    async fn the_node_budget_bounds_command_bytes() {
        let big = |id: &str| Command {
            payload: Some(myelin_proto::axon::SerializedObject {
                data: vec![1u8; 10_000].into(),
                ..Default::default()
            }),
            ..command(id)
        };
        let dispatcher = Arc::new(Dispatcher::new(Duration::from_secs(300), 25_000));
        let link = recorder(1, false);
        dispatcher.registry().subscribe("c", "Cmd", link.clone(), 0);
        let calls: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|id| {
                let d = dispatcher.clone();
                let command = big(id);
                tokio::spawn(async move { d.dispatch("c", command).await })
            })
            .collect();
        settle().await;
        let held = dispatcher.held_bytes();
        assert!(held > 20_000 && held <= 25_000, "{held}");
        let refused = dispatcher.dispatch("c", big("c")).await;
        assert_eq!(refused.error_code, "AXONIQ-1900");
        let message = refused.error_message.unwrap().message;
        assert!(message.contains("myelin.limits.command-queue-bytes"), "{message}");
        assert_eq!(dispatcher.held_bytes(), held, "a refusal changes nothing");
        assert_eq!(link.sent.lock().unwrap().len(), 2);

        // The handler's stream takes them: only the pending entries stay charged.
        link.sent.lock().unwrap().clear();
        let entries = dispatcher.held_bytes();
        assert!(entries < 1_000, "{entries}");
        for id in ["a", "b"] {
            dispatcher.respond(
                1,
                CommandResponse {
                    request_identifier: id.to_owned(),
                    ..Default::default()
                },
            );
        }
        for call in calls {
            assert!(call.await.unwrap().error_code.is_empty());
        }
        assert_eq!(dispatcher.held_bytes(), 0);
        assert!(dispatcher.pending.lock().unwrap().is_empty());
    }

    #[test]
    fn instructions() {
        use myelin_proto::axon::{MetaDataValue, ProcessingInstruction};
        let mut c = command("id");
        assert_eq!(routing_key(&c), "id");
        assert_eq!(command_timeout(&c), None);
        c.processing_instructions = vec![
            ProcessingInstruction {
                key: ProcessingKey::RoutingKey as i32,
                value: Some(MetaDataValue {
                    data: Some(Data::TextValue("k".to_owned())),
                }),
            },
            ProcessingInstruction {
                key: ProcessingKey::Timeout as i32,
                value: Some(MetaDataValue {
                    data: Some(Data::NumberValue(1500)),
                }),
            },
        ];
        assert_eq!(routing_key(&c), "k");
        assert_eq!(command_timeout(&c), Some(Duration::from_millis(1500)));
    }
}
