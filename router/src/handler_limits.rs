//! What command and query traffic may hold in the router, in counts and in bytes.
//!
//! A handler that never answers, or a client that subscribes without end, must not grow the
//! router's memory with it. Counts alone do not bound memory (10,000 queued commands of 4 MiB are
//! 40 GiB), so every queue also has a byte [`Budget`]: a message is admitted only if its encoded
//! size still fits, and the [`Charge`] it takes travels with it until the router lets go of it
//! (it was handed to the handler's gRPC stream, or it was dropped). Two budgets apply to each
//! queued message: the handler's own (one handler's backlog cannot use up everything) and the
//! node's total for that kind of message (many handlers together cannot either).
//!
//! Subscriptions are bounded per handler stream, in names and in bytes: the bytes include what
//! routing keeps per subscription (a command's hash-ring points, see
//! [`subscription_cost`]), so a large load factor costs what it uses.
//!
//! Refusals are clear and change nothing: a command or query beyond a budget fails at once with
//! AXONIQ-1900 (Axon's TOO_MANY_REQUESTS, RESOURCE_EXHAUSTED), a subscription beyond a limit is
//! acknowledged with `success: false` and the same code on its own stream. The defaults and keys
//! are listed in docs/limits.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const MIB: usize = 1024 * 1024;

/// The limits, as the supervisor passes them (`myelin.limits.*` and Axon's queue capacities).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct HandlerLimits {
    /// Commands queued for one handler stream, waiting for its permits
    /// (Axon's `command-queue-capacity-per-client`).
    #[arg(long, default_value_t = 10_000, value_parser = at_least_one)]
    pub command_queue_capacity: usize,
    /// Bytes of commands queued for one handler stream.
    #[arg(long, default_value_t = 64 * MIB, value_parser = at_least_one)]
    pub command_queue_bytes_per_client: usize,
    /// Bytes of commands the router holds in all: queued for handlers, plus the ids of commands
    /// waiting for their answer.
    #[arg(long, default_value_t = 256 * MIB, value_parser = at_least_one)]
    pub command_queue_bytes: usize,
    /// Queries queued for one handler stream (Axon's `query-queue-capacity-per-client`).
    #[arg(long, default_value_t = 10_000, value_parser = at_least_one)]
    pub query_queue_capacity: usize,
    /// Bytes of queries queued for one handler stream.
    #[arg(long, default_value_t = 64 * MIB, value_parser = at_least_one)]
    pub query_queue_bytes_per_client: usize,
    /// Bytes of queries the router holds in all: queued for handler streams, plus the ids of
    /// queries in flight.
    #[arg(long, default_value_t = 256 * MIB, value_parser = at_least_one)]
    pub query_queue_bytes: usize,
    /// Command names one command handler stream may subscribe.
    #[arg(long, default_value_t = 10_000, value_parser = at_least_one)]
    pub command_subscriptions_per_stream: usize,
    /// Query names one query handler stream may subscribe.
    #[arg(long, default_value_t = 10_000, value_parser = at_least_one)]
    pub query_subscriptions_per_stream: usize,
    /// Bytes the subscriptions of one handler stream may take in the router (see
    /// [`subscription_cost`]).
    #[arg(long, default_value_t = 32 * MIB, value_parser = at_least_one)]
    pub subscription_bytes_per_stream: usize,
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{value:?} is not a positive number")),
    }
}

impl Default for HandlerLimits {
    fn default() -> Self {
        HandlerLimits {
            command_queue_capacity: 10_000,
            command_queue_bytes_per_client: 64 * MIB,
            command_queue_bytes: 256 * MIB,
            query_queue_capacity: 10_000,
            query_queue_bytes_per_client: 64 * MIB,
            query_queue_bytes: 256 * MIB,
            command_subscriptions_per_stream: 10_000,
            query_subscriptions_per_stream: 10_000,
            subscription_bytes_per_stream: 32 * MIB,
        }
    }
}

/// What the router keeps per subscription besides its strings: map entries and bookkeeping.
const SUBSCRIPTION_OVERHEAD: usize = 128;
/// What one point of a command's hash ring takes (a sorted `(u64, u32)` entry, padded).
pub const RING_POINT_BYTES: usize = 16;

/// The bytes one subscription takes in the router: its strings, a fixed overhead, and for a
/// command its `ring_points` (its load factor) on the name's hash ring.
pub fn subscription_cost(strings: &[&str], ring_points: usize) -> usize {
    strings.iter().map(|s| s.len()).sum::<usize>() + SUBSCRIPTION_OVERHEAD + ring_points * RING_POINT_BYTES
}

/// A number of bytes that may be held at a time. Cheap to clone; clones share the count.
#[derive(Clone, Debug)]
pub struct Budget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            inner: Arc::new(Inner {
                limit,
                used: AtomicUsize::new(0),
            }),
        }
    }

    /// Takes `bytes` if they fit, all or nothing. A message larger than the whole budget never
    /// fits: the bound is exact.
    pub fn try_charge(&self, bytes: usize) -> Option<Charge> {
        let limit = self.inner.limit;
        self.inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= limit)
            })
            .ok()
            .map(|_| Charge {
                budget: self.clone(),
                bytes,
            })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.inner.used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.inner.limit
    }
}

/// Bytes taken from a [`Budget`]; they return to it when the charge is dropped.
#[derive(Debug)]
#[must_use = "a dropped charge returns its bytes at once"]
pub struct Charge {
    budget: Budget,
    bytes: usize,
}

impl Charge {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.inner.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The subscriptions of one handler stream: what they cost, against the stream's limits.
#[derive(Debug)]
pub struct StreamSubscriptions {
    max_names: usize,
    max_bytes: usize,
    bytes: usize,
    /// Name -> its cost, as charged.
    names: std::collections::HashMap<String, usize>,
    /// Subscribes refused so far (a hostile stream is logged once, not once per subscribe).
    refused: u64,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionRefused {
    #[error("this stream already subscribes {limit} names, the most one stream may ({key})")]
    TooManyNames { limit: usize, key: &'static str },
    #[error(
        "this stream's subscriptions would take {wanted} bytes, more than the {limit} one stream may \
         (myelin.limits.subscription-bytes-per-stream)"
    )]
    TooManyBytes { wanted: usize, limit: usize },
}

impl StreamSubscriptions {
    pub fn new(max_names: usize, max_bytes: usize) -> StreamSubscriptions {
        StreamSubscriptions {
            max_names,
            max_bytes,
            bytes: 0,
            names: std::collections::HashMap::new(),
            refused: 0,
        }
    }

    /// Admits (or re-prices, for a name already subscribed) a subscription of `name` costing
    /// `cost` bytes; on refusal nothing changes. `key` names the count limit in the error.
    pub fn admit(&mut self, name: &str, cost: usize, key: &'static str) -> Result<(), SubscriptionRefused> {
        let previous = self.names.get(name).copied();
        if previous.is_none() && self.names.len() >= self.max_names {
            self.refused += 1;
            return Err(SubscriptionRefused::TooManyNames {
                limit: self.max_names,
                key,
            });
        }
        let wanted = self.bytes - previous.unwrap_or(0) + cost;
        if wanted > self.max_bytes {
            self.refused += 1;
            return Err(SubscriptionRefused::TooManyBytes {
                wanted,
                limit: self.max_bytes,
            });
        }
        self.bytes = wanted;
        self.names.insert(name.to_owned(), cost);
        Ok(())
    }

    /// The stream unsubscribed `name`.
    pub fn remove(&mut self, name: &str) {
        if let Some(cost) = self.names.remove(name) {
            self.bytes -= cost;
        }
    }

    /// The stream unsubscribed every name `drop` selects.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&str) -> bool) {
        let mut freed = 0;
        self.names.retain(|name, cost| {
            let gone = drop(name);
            if gone {
                freed += *cost;
            }
            !gone
        });
        self.bytes -= freed;
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Subscribes refused on this stream so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_fit_exactly_and_return_on_drop() {
        let budget = Budget::new(100);
        let a = budget.try_charge(60).unwrap();
        let b = budget.try_charge(40).unwrap();
        assert_eq!(budget.used(), 100);
        assert!(budget.try_charge(1).is_none(), "nothing beyond the limit");
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(budget.try_charge(61).is_none());
        let c = budget.try_charge(60).unwrap();
        assert_eq!((b.bytes(), c.bytes()), (40, 60));
        drop((b, c));
        assert_eq!(budget.used(), 0);
        assert!(
            budget.try_charge(101).is_none(),
            "a message larger than the budget never fits"
        );
        assert!(budget.try_charge(usize::MAX).is_none(), "no overflow");
    }

    #[test]
    fn clones_share_the_count_across_threads() {
        let budget = Budget::new(1_000);
        let held: Vec<Charge> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let budget = budget.clone();
                    s.spawn(move || (0..500).filter_map(|_| budget.try_charge(1)).collect::<Vec<_>>())
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(held.len(), 1_000);
        assert_eq!(budget.used(), 1_000);
        drop(held);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn stream_subscriptions_cap_names_and_bytes_and_refusals_change_nothing() {
        let key = "myelin.limits.command-subscriptions-per-stream";
        let mut subs = StreamSubscriptions::new(2, 1_000);
        subs.admit("a", 100, key).unwrap();
        subs.admit("b", 100, key).unwrap();
        assert_eq!(
            subs.admit("c", 1, key),
            Err(SubscriptionRefused::TooManyNames { limit: 2, key })
        );
        // Subscribing a name again re-prices it and is not a new name.
        subs.admit("a", 300, key).unwrap();
        assert_eq!((subs.len(), subs.bytes()), (2, 400));
        assert_eq!(
            subs.admit("b", 801, key),
            Err(SubscriptionRefused::TooManyBytes {
                wanted: 1_101,
                limit: 1_000
            })
        );
        assert_eq!((subs.len(), subs.bytes()), (2, 400), "a refusal changes nothing");
        assert_eq!(subs.refused(), 2);
        subs.remove("a");
        subs.remove("never");
        assert_eq!((subs.len(), subs.bytes()), (1, 100));
        subs.admit("a/1", 10, key).unwrap();
        subs.remove_where(|name| name.starts_with("a/"));
        assert_eq!((subs.len(), subs.bytes()), (1, 100));
        subs.admit("c", 900, key).unwrap();
        assert!(subs.admit("d", 1, key).is_err());
        let message = SubscriptionRefused::TooManyNames { limit: 2, key }.to_string();
        assert!(message.contains(key), "{message}");
    }

    #[test]
    fn costs_count_strings_and_ring_points() {
        assert_eq!(subscription_cost(&["abc", "de"], 0), 5 + SUBSCRIPTION_OVERHEAD);
        assert_eq!(
            subscription_cost(&["x"], 100),
            1 + SUBSCRIPTION_OVERHEAD + 100 * RING_POINT_BYTES
        );
    }
}
