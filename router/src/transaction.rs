//! An `AppendEvent` call's transaction as the router collects it, and the bounds on it.
//!
//! The router keeps every event of a call until the client half-closes its stream and only then
//! sends the transaction on (a stream that breaks mid-transaction stores nothing). Memory held
//! for transactions still open is therefore memory a client chooses to hold, so every part of
//! it is bounded:
//!
//! - **events per transaction** (`max_events`, AXONIQ-2002) and **bytes per transaction**
//!   (`max_bytes`, AXONIQ-2001), where each event costs its encoded size plus
//!   [`EVENT_OVERHEAD`]: an empty event is not free, so two million of them are refused like any
//!   other oversized transaction;
//! - **bytes of all open transactions on the node** (`budget`, AXONIQ-1900 with
//!   RESOURCE_EXHAUSTED): every event reserves its cost from one node-wide budget until its call
//!   ends, so half-sent transactions on any number of streams and connections hold at most the
//!   budget;
//! - **time** (`timeout`): a transaction not completed in time is refused and its memory freed.
//!
//! A refused transaction stores nothing. After a size refusal the router reads and drops the
//! rest of the call's events until the client half-closes (within the same timeout), holding
//! nothing, and only then answers: answering while the client is still sending makes the
//! server reset a stream the client still writes to, and some HTTP/2 clients (grpcio) then tear
//! down the whole connection with every other call on it (issue 15, D10).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use myelin_proto::axon::event::Event;
use myelin_proto::errors::ErrorCode;
use myelin_proto::limits::{EVENT_OVERHEAD, event_cost};
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, Streaming};

/// The bounds on transactions; one per router, shared by every call.
#[derive(Clone)]
pub struct TransactionLimits {
    pub max_events: usize,
    /// Largest transaction, counting [`event_cost`] per event.
    pub max_bytes: usize,
    /// Bytes of every transaction still being received, node-wide.
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    pub timeout: Duration,
}

/// A transaction received whole: the events as the client encoded them, and the share of the
/// node-wide budget they hold until the call ends.
pub struct Collected {
    pub events: Vec<Bytes>,
    _reserved: Option<OwnedSemaphorePermit>,
}

impl TransactionLimits {
    pub fn new(max_events: usize, max_bytes: usize, budget_bytes: usize, timeout: Duration) -> TransactionLimits {
        TransactionLimits {
            max_events,
            max_bytes,
            budget: Arc::new(Semaphore::new(budget_bytes.min(Semaphore::MAX_PERMITS))),
            budget_bytes,
            timeout,
        }
    }

    /// Reads the call's events until the client half-closes, within the bounds.
    pub async fn collect(&self, stream: &mut Streaming<Event>) -> Result<Collected, Status> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut events = Vec::new();
        let mut bytes = 0usize;
        let mut reserved: Option<OwnedSemaphorePermit> = None;
        let mut refused: Option<Status> = None;
        loop {
            let next = match tokio::time::timeout_at(deadline, stream.message()).await {
                // A refused transaction whose client never finished sending: the refusal is
                // the answer.
                Err(_elapsed) => return Err(refused.unwrap_or_else(|| self.unfinished())),
                Ok(next) => next.map_err(crate::limits::client_stream_error)?,
            };
            let Some(event) = next else { break };
            if refused.is_some() {
                // Draining: see the module docs.
                continue;
            }
            match self.admit(event, &mut events, &mut bytes, &mut reserved) {
                Ok(()) => {}
                Err(status) => {
                    events = Vec::new();
                    reserved = None;
                    refused = Some(status);
                }
            }
        }
        match refused {
            Some(status) => Err(status),
            None => Ok(Collected {
                events,
                _reserved: reserved,
            }),
        }
    }

    fn admit(
        &self,
        event: Event,
        events: &mut Vec<Bytes>,
        bytes: &mut usize,
        reserved: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<(), Status> {
        let encoded = Bytes::from(event.encode_to_vec());
        if encoded.is_empty() {
            return Err(Status::invalid_argument(
                "an event must not be empty: it needs at least a message identifier",
            ));
        }
        if events.len() >= self.max_events {
            return Err(ErrorCode::TooManyEvents
                .status(format!("transaction exceeds the maximum of {} events", self.max_events)));
        }
        let cost = event_cost(encoded.len());
        *bytes += cost;
        if *bytes > self.max_bytes {
            return Err(ErrorCode::PayloadTooLarge.status(format!(
                "transaction exceeds the maximum size of {} bytes (each event counts its encoded size plus {} bytes)",
                self.max_bytes, EVENT_OVERHEAD
            )));
        }
        let permit = u32::try_from(cost)
            .ok()
            .and_then(|n| self.budget.clone().try_acquire_many_owned(n).ok())
            .ok_or_else(|| {
                ErrorCode::TooManyRequests.status(format!(
                    "the node holds {} bytes of unfinished transactions, its maximum; try again",
                    self.budget_bytes
                ))
            })?;
        match reserved {
            Some(held) => held.merge(permit),
            None => *reserved = Some(permit),
        }
        events.push(encoded);
        Ok(())
    }

    fn unfinished(&self) -> Status {
        Status::deadline_exceeded(format!(
            "the transaction was not completed (half-closed) within {} ms; nothing was stored",
            self.timeout.as_millis()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(bytes: usize) -> Event {
        Event {
            message_identifier: "x".repeat(bytes),
            ..Default::default()
        }
    }

    /// Admits `events` into one transaction as `collect` does; returns the first refusal.
    fn admit_all(limits: &TransactionLimits, events: Vec<Event>) -> Result<Collected, Status> {
        let (mut kept, mut bytes, mut reserved) = (Vec::new(), 0, None);
        for e in events {
            limits.admit(e, &mut kept, &mut bytes, &mut reserved)?;
        }
        Ok(Collected {
            events: kept,
            _reserved: reserved,
        })
    }

    fn code(status: &Status) -> &str {
        status
            .metadata()
            .get(myelin_proto::errors::ERROR_CODE_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[test]
    fn events_cost_their_bytes_plus_the_overhead_and_are_counted() {
        let limits = TransactionLimits::new(3, 1000, 1 << 20, Duration::from_secs(1));
        // 98 + 2 bytes of framing + 64 overhead = 164 per event.
        assert_eq!(admit_all(&limits, vec![event(98); 3]).unwrap().events.len(), 3);
        let refused = admit_all(&limits, vec![event(1); 4]).err().unwrap();
        assert_eq!(code(&refused), "AXONIQ-2002");
        let limits = TransactionLimits::new(100, 1000, 1 << 20, Duration::from_secs(1));
        let refused = admit_all(&limits, vec![event(98); 7]).err().unwrap();
        assert_eq!(code(&refused), "AXONIQ-2001", "7 x 164 > 1000");
        let refused = admit_all(&limits, vec![Event::default()]).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn the_node_wide_budget_is_held_until_the_transaction_is_dropped() {
        let limits = TransactionLimits::new(100, 10_000, 1000, Duration::from_secs(1));
        let first = admit_all(&limits, vec![event(98); 5]).unwrap();
        let refused = admit_all(&limits, vec![event(98); 2]).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(code(&refused), "AXONIQ-1900");
        drop(first);
        assert_eq!(admit_all(&limits, vec![event(98); 6]).unwrap().events.len(), 6);
    }
}
