//! A handler connected to this node by `CommandService.OpenStream`: the local [`HandlerLink`].
//!
//! Commands routed to the handler wait in its bounded queue, higher PRIORITY instruction first
//! and FIFO within a priority; a pump task sends them on the stream only while the handler has
//! permits (one permit per command; `FlowControl` adds permits). The queue and the permit count sit behind one short mutex that is never held across
//! an await: the pump takes a batch out under the lock and sends it after releasing it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use myelin_proto::axon::ProcessingKey;
use myelin_proto::axon::command::command_provider_inbound::Request as Inbound;
use myelin_proto::axon::command::{Command, CommandProviderInbound};
use myelin_proto::axon::meta_data_value::Data;
use tokio::sync::{Notify, mpsc};
use tonic::Status;

use super::registry::{HandlerId, HandlerLink, LinkError};

/// Commands a handler may have queued (Axon's `command-queue-capacity-per-client`).
pub const QUEUE_CAPACITY: usize = 10_000;
/// Commands the pump takes out of the queue at a time.
const BATCH: usize = 64;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Where the stream's messages to the client go.
pub type Outbound = mpsc::Sender<Result<CommandProviderInbound, Status>>;

struct Outbox {
    permits: i64,
    /// (priority, command), ordered by priority descending, then arrival.
    queue: VecDeque<(i64, Command)>,
    closed: bool,
}

impl Outbox {
    fn push(&mut self, priority: i64, command: Command) {
        // The usual case (all equal priority) appends without scanning.
        let at = self
            .queue
            .iter()
            .rposition(|(p, _)| *p >= priority)
            .map_or(0, |i| i + 1);
        self.queue.insert(at, (priority, command));
    }
}

/// The command's PRIORITY instruction (number), else 0.
fn priority(command: &Command) -> i64 {
    command
        .processing_instructions
        .iter()
        .filter(|pi| pi.key == ProcessingKey::Priority as i32)
        .find_map(|pi| match pi.value.as_ref().and_then(|v| v.data.as_ref()) {
            Some(Data::NumberValue(n)) => Some(*n),
            Some(Data::TextValue(text)) => text.trim().parse().ok(),
            _ => None,
        })
        .unwrap_or(0)
}

/// One handler stream.
pub struct LocalHandler {
    id: HandlerId,
    ring_key: String,
    client_id: Mutex<String>,
    component_name: Mutex<String>,
    outbox: Mutex<Outbox>,
    wake: Notify,
    capacity: usize,
}

impl LocalHandler {
    pub fn new(capacity: usize) -> LocalHandler {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        LocalHandler {
            id,
            ring_key: format!("local-stream-{id}"),
            client_id: Mutex::new(String::new()),
            component_name: Mutex::new(String::new()),
            outbox: Mutex::new(Outbox {
                permits: 0,
                queue: VecDeque::new(),
                closed: false,
            }),
            wake: Notify::new(),
            capacity,
        }
    }

    /// The first non-empty client id named on the stream binds it.
    pub fn bind_client(&self, client_id: &str) {
        let mut bound = self.client_id.lock().unwrap();
        if bound.is_empty() && !client_id.is_empty() {
            *bound = client_id.to_owned();
        }
    }

    /// The first non-empty component name named on the stream binds it (for the admin API).
    pub fn bind_component(&self, component_name: &str) {
        let mut bound = self.component_name.lock().unwrap();
        if bound.is_empty() && !component_name.is_empty() {
            *bound = component_name.to_owned();
        }
    }

    /// Adds permits (saturating: a client granting `i64::MAX` twice is not an overflow).
    pub fn grant(&self, permits: i64) {
        let mut outbox = self.outbox.lock().unwrap();
        outbox.permits = outbox.permits.saturating_add(permits);
        drop(outbox);
        self.wake.notify_one();
    }

    /// Stops the pump; returns the commands that were queued but never sent.
    pub fn close(&self) -> Vec<Command> {
        let mut outbox = self.outbox.lock().unwrap();
        outbox.closed = true;
        let unsent = outbox.queue.drain(..).map(|(_, command)| command).collect();
        drop(outbox);
        self.wake.notify_one();
        unsent
    }

    /// Sends queued commands while there are permits, until closed or the client is gone.
    pub async fn pump(&self, outbound: Outbound) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            {
                let mut outbox = self.outbox.lock().unwrap();
                if outbox.closed {
                    return;
                }
                while outbox.permits > 0 && batch.len() < BATCH {
                    let Some((_, command)) = outbox.queue.pop_front() else {
                        break;
                    };
                    outbox.permits -= 1;
                    batch.push(command);
                }
            }
            if batch.is_empty() {
                self.wake.notified().await;
                continue;
            }
            for command in batch.drain(..) {
                let message = CommandProviderInbound {
                    request: Some(Inbound::Command(command)),
                    instruction_id: String::new(),
                };
                if outbound.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl HandlerLink for LocalHandler {
    fn id(&self) -> HandlerId {
        self.id
    }

    fn ring_key(&self) -> &str {
        &self.ring_key
    }

    fn client_id(&self) -> String {
        self.client_id.lock().unwrap().clone()
    }

    fn component_name(&self) -> String {
        self.component_name.lock().unwrap().clone()
    }

    fn send(&self, command: Command) -> Result<(), LinkError> {
        let mut outbox = self.outbox.lock().unwrap();
        if outbox.closed {
            return Err(LinkError::Closed);
        }
        if outbox.queue.len() >= self.capacity {
            return Err(LinkError::QueueFull);
        }
        outbox.push(priority(&command), command);
        drop(outbox);
        self.wake.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn command(id: &str) -> Command {
        Command {
            message_identifier: id.to_owned(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn sends_only_with_permits_and_bounds_the_queue() {
        let handler = Arc::new(LocalHandler::new(3));
        let (tx, mut rx) = mpsc::channel(16);
        let pump = tokio::spawn({
            let handler = handler.clone();
            async move { handler.pump(tx).await }
        });
        for id in ["a", "b", "c"] {
            handler.send(command(id)).unwrap();
        }
        assert_eq!(handler.send(command("d")), Err(LinkError::QueueFull));
        handler.grant(2);
        for want in ["a", "b"] {
            let got = rx.recv().await.unwrap().unwrap();
            assert!(matches!(got.request, Some(Inbound::Command(c)) if c.message_identifier == want));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "sent beyond the permits");
        let unsent = handler.close();
        assert_eq!(unsent.len(), 1);
        assert_eq!(handler.send(command("e")), Err(LinkError::Closed));
        pump.await.unwrap();
    }

    #[tokio::test]
    async fn higher_priority_first_fifo_within() {
        use myelin_proto::axon::{MetaDataValue, ProcessingInstruction};
        let handler = Arc::new(LocalHandler::new(10));
        let with_priority = |id: &str, p: i64| {
            let mut c = command(id);
            c.processing_instructions.push(ProcessingInstruction {
                key: ProcessingKey::Priority as i32,
                value: Some(MetaDataValue {
                    data: Some(Data::NumberValue(p)),
                }),
            });
            c
        };
        handler.send(command("a0")).unwrap();
        handler.send(with_priority("b5", 5)).unwrap();
        handler.send(command("c0")).unwrap();
        handler.send(with_priority("d5", 5)).unwrap();
        handler.send(with_priority("e9", 9)).unwrap();
        let order: Vec<String> = handler.close().into_iter().map(|c| c.message_identifier).collect();
        assert_eq!(order, ["e9", "b5", "d5", "a0", "c0"]);
    }
}
