//! Keeping each context's client applications spread over its nodes, and off a node that can
//! no longer reach the majority of its context.
//!
//! The only lever a server has on a connected client is `RequestReconnect` on its control
//! stream: the client then asks a node (`GetPlatformServer`) where to go, and
//! [`super::placement`] answers with the lightest node that suits it. So this module only
//! decides whom to ask, and when:
//!
//! - **Balancing** (Axon's `cluster.auto-balancing`, on by default). Every
//!   `rebalance-interval`, for each context it stores, a node that serves more clients than its
//!   even share (rounded up) of the clients of the context's reachable nodes, and at least two
//!   more than the lightest of them, asks up to [`MOVES_PER_ROUND`] of its clients to
//!   reconnect: the oldest first, and only those that placement would send elsewhere (a client
//!   whose tags match this node best stays). Nodes decide on their own, each shedding only what
//!   is above the rounded-up share, so together they never push the lightest node past it. A
//!   change in the set of reachable nodes (one joined, one came back) starts a wait of
//!   `rebalance-delay` first, so the newcomer's counts arrive before anyone moves. A client
//!   asked once is not asked again for [`ASKED_FOR`].
//! - **Isolation**. A node whose peer links reach no majority of the nodes that store a context
//!   (itself included) for [`ISOLATION_GRACE`] cannot have an append confirmed there, and may
//!   hold a stale view of the handlers: it refuses new clients of that context
//!   (`GetPlatformServer` and `OpenStream` fail with AXONIQ-1400, UNAVAILABLE, so Axon's
//!   connector tries its next routing server at once) and asks the connected ones to reconnect,
//!   as Axon Server does since 4.4.16. It takes clients again as soon as it reaches a majority.
//!   The grace period covers a restart, whose links come up within a ping period.
//!
//! Asking drops nothing by itself: this node keeps routing to the client until its streams
//! end, and whatever is in flight when they end is answered as any disconnect is (the commands
//! a handler held fail with AXONIQ-4001, the caller may retry).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use myelin_proto::axon::control::platform_outbound_instruction::Request as Outbound;
use myelin_proto::axon::control::{PlatformOutboundInstruction, RequestReconnect};

use super::clients::{Clients, ControlStream};
use super::placement::Placement;
use crate::peers::Peers;

/// How often the node looks at whether it reaches its contexts' majorities.
const WATCH_PERIOD: Duration = Duration::from_millis(500);
/// How long a node must have been cut off from the majority of a context before it turns its
/// clients away: longer than a ping period (2 s), so a restarting node, whose links come up
/// with their first ping, is not taken as isolated.
pub const ISOLATION_GRACE: Duration = Duration::from_secs(3);
/// The most clients of one context a node asks to reconnect in one balancing round.
pub const MOVES_PER_ROUND: usize = 4;
/// How long a client asked to reconnect is not asked again (by the balancer).
const ASKED_FOR: Duration = Duration::from_secs(60);

/// When and whether the node balances its clients (Axon's `cluster.*` properties).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balancing {
    /// `cluster.auto-balancing`.
    pub auto: bool,
    /// `cluster.rebalance-delay`: the wait after the context's reachable nodes changed.
    pub delay: Duration,
    /// `cluster.rebalance-interval`: how often a node looks at its share.
    pub interval: Duration,
}

impl Default for Balancing {
    fn default() -> Balancing {
        Balancing {
            auto: true,
            delay: Duration::from_secs(7),
            interval: Duration::from_secs(15),
        }
    }
}

/// Which contexts this node has been cut off from the majority of, and since when.
#[derive(Debug, Default)]
pub struct Isolation {
    since: RwLock<HashMap<String, Instant>>,
}

impl Isolation {
    /// Whether the node turns clients of `context` away: cut off for [`ISOLATION_GRACE`].
    pub fn refuses(&self, context: &str) -> bool {
        self.since
            .read()
            .expect("isolation")
            .get(context)
            .is_some_and(|since| since.elapsed() >= ISOLATION_GRACE)
    }

    /// Records whether the node reaches the majority of `context` now; returns what changed.
    fn observe(&self, context: &str, reaches: bool, now: Instant) -> Change {
        let mut since = self.since.write().expect("isolation");
        match (reaches, since.get(context).copied()) {
            (true, None) => Change::None,
            (true, Some(at)) => {
                since.remove(context);
                if now.duration_since(at) >= ISOLATION_GRACE {
                    Change::Rejoined
                } else {
                    Change::None
                }
            }
            (false, None) => {
                since.insert(context.to_owned(), now);
                Change::None
            }
            (false, Some(at)) if now.duration_since(at) >= ISOLATION_GRACE => Change::Isolated,
            (false, Some(_)) => Change::None,
        }
    }

    /// Forgets contexts the node no longer stores.
    fn retain(&self, stored: &BTreeSet<String>) {
        self.since.write().expect("isolation").retain(|c, _| stored.contains(c));
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Change {
    None,
    /// Cut off (for the grace period at least): every client of the context is asked to go.
    Isolated,
    /// Reaching the majority again after being isolated.
    Rejoined,
}

/// What the balancing task works with.
pub struct Balancer {
    pub settings: Balancing,
    pub clients: Arc<Clients>,
    pub placement: Arc<Placement>,
    pub isolation: Arc<Isolation>,
    pub peers: Peers,
}

impl Balancer {
    /// Runs until the process ends.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run())
    }

    async fn run(self) {
        let mut rounds = Rounds {
            next: Instant::now() + self.settings.interval,
            reachable: HashMap::new(),
            asked: HashMap::new(),
        };
        loop {
            tokio::time::sleep(WATCH_PERIOD).await;
            let now = Instant::now();
            let stored: BTreeSet<String> = self.placement.local_contexts().into_iter().collect();
            self.isolation.retain(&stored);
            for context in &stored {
                let reaches = self
                    .placement
                    .reaches_majority(context, |node| self.peers.is_connected(node));
                match self.isolation.observe(context, reaches, now) {
                    Change::None => {}
                    Change::Rejoined => {
                        tracing::info!(%context, "this node reaches the majority of the context again: taking its clients");
                    }
                    Change::Isolated => self.send_away(context),
                }
            }
            rounds.asked.retain(|_, at| now.duration_since(*at) < ASKED_FOR);
            if self.settings.auto && now >= rounds.next {
                rounds.next = now + self.settings.interval;
                for context in &stored {
                    if !self.isolation.refuses(context) {
                        self.balance(context, now, &mut rounds);
                    }
                }
            }
        }
    }

    /// Asks every client of `context` still connected here to reconnect elsewhere (this node is
    /// cut off from the context's majority). Called every watch while it lasts: a client that
    /// has not gone yet is asked again (the queue may have been full).
    fn send_away(&self, context: &str) {
        let streams = self.clients.of_context(context);
        if streams.is_empty() {
            return;
        }
        tracing::warn!(
            %context,
            clients = streams.len(),
            "this node reaches no majority of the nodes that store the context: asking its clients to reconnect elsewhere"
        );
        for stream in &streams {
            ask_to_reconnect(context, stream);
        }
    }

    fn balance(&self, context: &str, now: Instant, rounds: &mut Rounds) {
        let connected = |node: &str| self.peers.is_connected(node);
        let reachable = self.placement.reachable_storing(context, connected);
        let changed = match rounds.reachable.get(context) {
            Some((nodes, _)) if *nodes == reachable => None,
            _ => Some(now),
        };
        if let Some(at) = changed {
            rounds.reachable.insert(context.to_owned(), (reachable, at));
        }
        let (_, since) = &rounds.reachable[context];
        if now.duration_since(*since) < self.settings.delay {
            return;
        }
        let streams = self.clients.of_context(context);
        let here = streams.len();
        let surplus = self.placement.surplus(context, here, connected);
        if surplus == 0 {
            return;
        }
        let registered = |client_id: &str| streams.iter().any(|s| s.client_id == client_id);
        let mut moved = 0;
        // Oldest first: a client that arrived lately was placed here on purpose.
        for stream in streams.iter().rev() {
            if moved == surplus.min(MOVES_PER_ROUND) {
                break;
            }
            if rounds.asked.contains_key(&stream.stream_id)
                || !self.placement.better_elsewhere(
                    context,
                    &stream.client_id,
                    &stream.tags,
                    connected,
                    here,
                    registered,
                )
            {
                continue;
            }
            if ask_to_reconnect(context, stream) {
                rounds.asked.insert(stream.stream_id.clone(), now);
                moved += 1;
            }
        }
        if moved > 0 {
            tracing::info!(%context, here, surplus, moved, "balancing: clients asked to reconnect to a lighter node");
        }
    }
}

/// What the balancing rounds remember.
struct Rounds {
    next: Instant,
    /// Per context: the reachable nodes that store it (this one excluded), and since when.
    reachable: HashMap<String, (Vec<String>, Instant)>,
    /// Control streams asked to reconnect, and when.
    asked: HashMap<String, Instant>,
}

/// Queues `RequestReconnect` on a client's control stream without waiting: a stream whose queue
/// is full is skipped (false), never waited for.
fn ask_to_reconnect(context: &str, stream: &ControlStream) -> bool {
    let instruction = PlatformOutboundInstruction {
        request: Some(Outbound::RequestReconnect(RequestReconnect {})),
        instruction_id: crate::query::unique_id(),
    };
    let sent = stream.outbox.try_send(Ok(instruction)).is_ok();
    tracing::info!(
        %context,
        client_id = %stream.client_id,
        client_stream_id = %stream.stream_id,
        sent,
        "asked the client to reconnect"
    );
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_isolated_only_after_the_grace_period_and_rejoins_at_once() {
        let isolation = Isolation::default();
        let start = Instant::now();
        assert_eq!(isolation.observe("orders", true, start), Change::None);
        assert!(!isolation.refuses("orders"));
        // Cut off: nothing for the grace period.
        assert_eq!(isolation.observe("orders", false, start), Change::None);
        assert_eq!(
            isolation.observe("orders", false, start + ISOLATION_GRACE / 2),
            Change::None
        );
        // Back before the grace ended: it never counted.
        assert_eq!(
            isolation.observe("orders", true, start + ISOLATION_GRACE / 2),
            Change::None
        );
        assert_eq!(isolation.observe("orders", false, start), Change::None);
        assert_eq!(
            isolation.observe("orders", false, start + ISOLATION_GRACE),
            Change::Isolated
        );
        // Another context is not affected; a context no longer stored is forgotten.
        assert!(!isolation.refuses("default"));
        assert_eq!(
            isolation.observe("orders", true, start + 2 * ISOLATION_GRACE),
            Change::Rejoined
        );
        assert!(!isolation.refuses("orders"));
        isolation.observe("default", false, start);
        isolation.retain(&BTreeSet::from(["orders".to_owned()]));
        assert!(isolation.since.read().unwrap().is_empty());
    }
}
