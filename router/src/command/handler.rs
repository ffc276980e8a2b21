//! A handler connected to this node by `CommandService.OpenStream`: the local [`HandlerLink`].
//!
//! Commands routed to the handler wait in its bounded queue, higher PRIORITY instruction first
//! and FIFO within a priority; a pump task sends them on the stream only while the handler has
//! permits (one permit per command; `FlowControl` adds permits). The queue and the permit count
//! sit behind one short mutex that is never held across an await: the pump takes a batch out
//! under the lock and sends it after releasing it.
//!
//! The queue is bounded in commands (Axon's `command-queue-capacity-per-client`) and in bytes
//! (`myelin.limits.command-queue-bytes-per-client`). A queued command holds two charges, the
//! handler's and the node's (see [`crate::handler_limits`]); both ride with it through the
//! outbound channel and return when tonic takes the message for the wire, so everything the
//! router buffers for a handler that does not read is counted.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use myelin_proto::axon::ProcessingKey;
use myelin_proto::axon::command::command_provider_inbound::Request as Inbound;
use myelin_proto::axon::command::{Command, CommandProviderInbound};
use myelin_proto::axon::meta_data_value::Data;
use tokio::sync::{Notify, mpsc};
use tonic::Status;

use super::registry::{HandlerId, HandlerLink, LinkError, Routed};
use crate::handler_limits::{Budget, Charge};

/// Commands the pump takes out of the queue at a time.
const BATCH: usize = 64;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A handler id never given before in this process (local and remote handlers alike).
pub fn next_id() -> HandlerId {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// The ring key of handler `id` of node `node`: the same on every node of the cluster.
pub fn ring_key(node: &str, id: HandlerId) -> String {
    format!("{node}/{id}")
}

/// A message to the client, with the bytes it holds until tonic takes it.
pub struct Outgoing {
    pub message: Result<CommandProviderInbound, Status>,
    _held: Option<[Charge; 2]>,
}

impl Outgoing {
    /// A message that holds no budget (acks, errors).
    pub fn plain(message: Result<CommandProviderInbound, Status>) -> Outgoing {
        Outgoing { message, _held: None }
    }
}

/// Where the stream's messages to the client go.
pub type Outbound = mpsc::Sender<Outgoing>;

/// A command waiting for a permit, with its charges (the node's and this handler's).
struct Queued {
    priority: i64,
    routed: Routed,
    client: Charge,
}

struct Outbox {
    permits: i64,
    /// Ordered by priority descending, then arrival.
    queue: VecDeque<Queued>,
    closed: bool,
}

impl Outbox {
    fn push(&mut self, queued: Queued) {
        // The usual case (all equal priority) appends without scanning.
        let at = self
            .queue
            .iter()
            .rposition(|q| q.priority >= queued.priority)
            .map_or(0, |i| i + 1);
        self.queue.insert(at, queued);
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
    bytes: Budget,
}

impl LocalHandler {
    /// A handler connected to node `node` whose queue holds at most `capacity` commands and
    /// `bytes` bytes of them.
    pub fn new(node: &str, capacity: usize, bytes: usize) -> LocalHandler {
        let id = next_id();
        LocalHandler {
            id,
            // The key every node of the cluster puts this handler on its rings under.
            ring_key: ring_key(node, id),
            client_id: Mutex::new(String::new()),
            component_name: Mutex::new(String::new()),
            outbox: Mutex::new(Outbox {
                permits: 0,
                queue: VecDeque::new(),
                closed: false,
            }),
            wake: Notify::new(),
            capacity,
            bytes: Budget::new(bytes),
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

    /// Bytes of commands queued for this handler (and not yet taken by its stream).
    pub fn queued_bytes(&self) -> usize {
        self.bytes.used()
    }

    /// Adds permits (saturating: a client granting `i64::MAX` twice is not an overflow).
    pub fn grant(&self, permits: i64) {
        let mut outbox = self.outbox.lock().unwrap();
        outbox.permits = outbox.permits.saturating_add(permits);
        drop(outbox);
        self.wake.notify_one();
    }

    /// Stops the pump; returns the commands that were queued but never sent (with the node's
    /// charge, for routing them again; this handler's charge is returned).
    pub fn close(&self) -> Vec<Routed> {
        let mut outbox = self.outbox.lock().unwrap();
        outbox.closed = true;
        let unsent = outbox.queue.drain(..).map(|queued| queued.routed).collect();
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
                    let Some(queued) = outbox.queue.pop_front() else {
                        break;
                    };
                    outbox.permits -= 1;
                    batch.push(queued);
                }
            }
            if batch.is_empty() {
                self.wake.notified().await;
                continue;
            }
            for queued in batch.drain(..) {
                let Routed { command, charge } = queued.routed;
                let message = CommandProviderInbound {
                    request: Some(Inbound::Command(command)),
                    instruction_id: String::new(),
                };
                let outgoing = Outgoing {
                    message: Ok(message),
                    _held: Some([charge, queued.client]),
                };
                if outbound.send(outgoing).await.is_err() {
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

    fn send(&self, routed: Routed) -> Result<(), LinkError> {
        let mut outbox = self.outbox.lock().unwrap();
        if outbox.closed {
            return Err(LinkError::Closed);
        }
        if outbox.queue.len() >= self.capacity {
            return Err(LinkError::QueueFull);
        }
        let Some(client) = self.bytes.try_charge(routed.charge.bytes()) else {
            return Err(LinkError::QueueBytesFull);
        };
        let priority = priority(&routed.command);
        outbox.push(Queued {
            priority,
            routed,
            client,
        });
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

    /// `command` charged against `node`, as the dispatcher routes it.
    fn routed(node: &Budget, command: Command) -> Routed {
        use prost::Message as _;
        let charge = node.try_charge(command.encoded_len()).expect("fits the node's budget");
        Routed { command, charge }
    }

    fn unbounded() -> Budget {
        Budget::new(usize::MAX)
    }

    #[tokio::test]
    async fn sends_only_with_permits_and_bounds_the_queue() {
        let node = unbounded();
        let handler = Arc::new(LocalHandler::new("n1", 3, usize::MAX));
        let (tx, mut rx) = mpsc::channel(16);
        let pump = tokio::spawn({
            let handler = handler.clone();
            async move { handler.pump(tx).await }
        });
        for id in ["a", "b", "c"] {
            handler.send(routed(&node, command(id))).unwrap();
        }
        assert_eq!(handler.send(routed(&node, command("d"))), Err(LinkError::QueueFull));
        handler.grant(2);
        for want in ["a", "b"] {
            let got = rx.recv().await.unwrap().message.unwrap();
            assert!(matches!(got.request, Some(Inbound::Command(c)) if c.message_identifier == want));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "sent beyond the permits");
        let unsent = handler.close();
        assert_eq!(unsent.len(), 1);
        assert_eq!(handler.send(routed(&node, command("e"))), Err(LinkError::Closed));
        pump.await.unwrap();
    }

    /// The byte bound: commands are admitted while their bytes fit the handler's budget, and
    /// both charges (the handler's and the node's) stay held while the message waits in the
    /// outbound channel, until the stream's reader takes it.
    #[tokio::test]
    async fn bytes_are_bounded_and_held_until_the_stream_takes_them() {
        use prost::Message as _;
        let big = |id: &str| Command {
            message_identifier: id.to_owned(),
            payload: Some(myelin_proto::axon::SerializedObject {
                data: vec![7u8; 1_000].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let size = big("a").encoded_len();
        let node = Budget::new(10 * size);
        let handler = Arc::new(LocalHandler::new("n1", 100, 2 * size));
        handler.send(routed(&node, big("a"))).unwrap();
        handler.send(routed(&node, big("b"))).unwrap();
        // The count allows it; the bytes do not. The refused command's node charge is returned.
        assert_eq!(handler.send(routed(&node, big("c"))), Err(LinkError::QueueBytesFull));
        assert_eq!((handler.queued_bytes(), node.used()), (2 * size, 2 * size));

        let (tx, mut rx) = mpsc::channel(16);
        let pump = tokio::spawn({
            let handler = handler.clone();
            async move { handler.pump(tx).await }
        });
        handler.grant(10);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Both are in the outbound channel now, not yet taken: still charged.
        assert_eq!((handler.queued_bytes(), node.used()), (2 * size, 2 * size));
        assert_eq!(handler.send(routed(&node, big("c"))), Err(LinkError::QueueBytesFull));
        let taken = rx.recv().await.unwrap();
        drop(taken);
        assert_eq!((handler.queued_bytes(), node.used()), (size, size));
        handler.send(routed(&node, big("c"))).unwrap();
        handler.close();
        drop(rx);
        pump.await.unwrap();
        assert_eq!(node.used(), 0, "everything returned once the stream is gone");
    }

    #[tokio::test]
    async fn higher_priority_first_fifo_within() {
        use myelin_proto::axon::{MetaDataValue, ProcessingInstruction};
        let node = unbounded();
        let handler = Arc::new(LocalHandler::new("n1", 10, usize::MAX));
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
        handler.send(routed(&node, command("a0"))).unwrap();
        handler.send(routed(&node, with_priority("b5", 5))).unwrap();
        handler.send(routed(&node, command("c0"))).unwrap();
        handler.send(routed(&node, with_priority("d5", 5))).unwrap();
        handler.send(routed(&node, with_priority("e9", 9))).unwrap();
        let order: Vec<String> = handler
            .close()
            .into_iter()
            .map(|r| r.command.message_identifier)
            .collect();
        assert_eq!(order, ["e9", "b5", "d5", "a0", "c0"]);
    }
}
