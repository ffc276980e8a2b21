//! Who handles what: the command handlers of each context, by command name.
//!
//! The registry knows handlers only as [`HandlerLink`]s, so it does not care whether a handler is
//! a stream on this node or a handler connected to another node (`remote`): every node of a
//! cluster holds the same handlers under the same ring keys, so a routing key reaches the same
//! handler whichever node the command was dispatched on. For each (context,
//! command name) it keeps the subscribed handlers and a consistent-hash ring over them: every
//! handler contributes `load_factor` points, hashed from its stable key and the point's index.
//! A command goes to the owner of the first point at or after the hash of its routing key
//! (wrapping around). Invariants:
//! - the same routing key reaches the same handler as long as the set of handlers of that name
//!   does not change (the ring depends only on the members' keys and load factors);
//! - a handler's share of the keys is about proportional to its load factor;
//! - a handler that is removed disappears from every ring at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use myelin_proto::axon::command::Command;

use crate::handler_limits::Charge;

/// Identifies one handler connection for the life of the connection.
pub type HandlerId = u64;

/// Load factor of a subscription that names none (Axon's default).
pub const DEFAULT_LOAD_FACTOR: i32 = 100;
/// Upper bound on ring points per handler, so a huge load factor cannot exhaust memory.
pub const MAX_LOAD_FACTOR: i32 = 10_000;

/// Why a command could not be handed to a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    /// The handler's queue is at capacity.
    QueueFull,
    /// The handler's queue holds as many bytes as it may.
    QueueBytesFull,
    /// The handler is gone.
    Closed,
}

/// A command on its way to a handler, with the bytes it holds of the node's command budget
/// until the handler's stream takes it.
pub struct Routed {
    pub command: Command,
    pub charge: Charge,
}

/// How a command reaches a handler. Today the only implementation is a local handler stream;
/// node-to-node forwarding becomes another implementation.
pub trait HandlerLink: Send + Sync {
    /// Unique for the life of the link.
    fn id(&self) -> HandlerId;
    /// Stable text naming the link on the hash ring.
    fn ring_key(&self) -> &str;
    /// The handler's client id (for error messages).
    fn client_id(&self) -> String;
    /// The handler's component (application) name, if known (for the admin API).
    fn component_name(&self) -> String {
        String::new()
    }
    /// Queues a command for the handler; never blocks. On failure the command and its charge
    /// are dropped (the caller answers with an error).
    fn send(&self, routed: Routed) -> Result<(), LinkError>;
    /// The node the handler is connected to, when that is not this one.
    fn remote_node(&self) -> Option<&str> {
        None
    }
}

#[derive(Clone)]
struct Member {
    link: Arc<dyn HandlerLink>,
    load_factor: i32,
}

#[derive(Default)]
struct Handlers {
    members: Vec<Member>,
    /// (point, index into `members`), sorted by point, one entry per point. A sorted vector
    /// rather than a tree: 16 bytes a point instead of about 40, and the ring is rebuilt on
    /// every change anyway (see `handler_limits::RING_POINT_BYTES`, which prices it).
    ring: Vec<(u64, u32)>,
}

impl Handlers {
    fn rebuild(&mut self) {
        let points: usize = self.members.iter().map(|m| m.load_factor as usize).sum();
        let mut ring = Vec::with_capacity(points);
        for (index, member) in self.members.iter().enumerate() {
            let index = u32::try_from(index).expect("fewer than 2^32 handlers of one name");
            for point in 0..member.load_factor {
                ring.push((
                    stable_hash(format!("{} #{point}", member.link.ring_key()).as_bytes()),
                    index,
                ));
            }
        }
        // On the (astronomically rare) collision the smaller key wins, so the ring does not
        // depend on subscription order: sort colliding points by key, keep the first.
        let key = |index: u32| self.members[index as usize].link.ring_key();
        ring.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| key(a.1).cmp(key(b.1))));
        ring.dedup_by_key(|(point, _)| *point);
        self.ring = ring;
    }

    fn select(&self, routing_key: &str) -> Option<Arc<dyn HandlerLink>> {
        let hash = stable_hash(routing_key.as_bytes());
        let at = self.ring.partition_point(|(point, _)| *point < hash);
        let &(_, index) = self.ring.get(at).or_else(|| self.ring.first())?;
        Some(self.members[index as usize].link.clone())
    }
}

/// One handler's subscription to one command, as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub context: String,
    pub command: String,
    pub handler: HandlerId,
    pub client_id: String,
    pub component_name: String,
    pub load_factor: i32,
}

/// How long a command name whose last handler disconnected counts as having a handler on its
/// way back: a client asked to reconnect (balancing, `RequestReconnect`) closes its old
/// connection before it subscribes on the new one, and a command arriving in between waits for
/// it rather than failing with "no handler" (`dispatch`).
pub const RETURN_WINDOW: Duration = Duration::from_secs(3);

/// The handlers of every context. Cheap to share; all methods are synchronous and short.
pub struct Registry {
    /// (context, command name) -> handlers.
    by_name: Mutex<HashMap<(String, String), Handlers>>,
    /// Counts the changes to the handlers connected here (what the other nodes must be told).
    local_changes: tokio::sync::watch::Sender<u64>,
    /// Counts every subscription, here or on another node (what a held command waits for).
    subscriptions: tokio::sync::watch::Sender<u64>,
    /// (context, command name) whose last handler disconnected, and when: see [`RETURN_WINDOW`].
    orphaned: Mutex<HashMap<(String, String), Instant>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            by_name: Mutex::default(),
            local_changes: tokio::sync::watch::Sender::new(0),
            subscriptions: tokio::sync::watch::Sender::new(0),
            orphaned: Mutex::default(),
        }
    }
}

impl Registry {
    /// Changes whenever a handler connected here subscribes, unsubscribes or goes.
    pub fn local_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.local_changes.subscribe()
    }

    fn local_changed(&self) {
        self.local_changes.send_modify(|n| *n += 1);
    }

    /// Changes whenever a handler subscribes, here or on another node.
    pub fn subscriptions(&self) -> tokio::sync::watch::Receiver<u64> {
        self.subscriptions.subscribe()
    }

    /// Whether the last handler of `name` in `context` disconnected less than
    /// [`RETURN_WINDOW`] ago (and none subscribed since).
    pub fn recently_orphaned(&self, context: &str, name: &str) -> bool {
        self.orphaned
            .lock()
            .unwrap()
            .get(&(context.to_owned(), name.to_owned()))
            .is_some_and(|at| at.elapsed() < RETURN_WINDOW)
    }

    /// Adds (or updates the load factor of) a handler for `name` in `context`.
    pub fn subscribe(&self, context: &str, name: &str, link: Arc<dyn HandlerLink>, load_factor: i32) {
        let load_factor = effective_load_factor(load_factor);
        let local = link.remote_node().is_none();
        {
            let mut by_name = self.by_name.lock().unwrap();
            let handlers = by_name.entry((context.to_owned(), name.to_owned())).or_default();
            match handlers.members.iter_mut().find(|m| m.link.id() == link.id()) {
                Some(member) if member.load_factor == load_factor => return,
                Some(member) => member.load_factor = load_factor,
                None => handlers.members.push(Member { link, load_factor }),
            }
            handlers.rebuild();
        }
        self.orphaned
            .lock()
            .unwrap()
            .remove(&(context.to_owned(), name.to_owned()));
        self.subscriptions.send_modify(|n| *n += 1);
        if local {
            self.local_changed();
        }
    }

    /// Removes one subscription of a handler. A command name left without handlers is
    /// remembered for [`RETURN_WINDOW`]: Axon's connector unsubscribes before it reconnects.
    pub fn unsubscribe(&self, context: &str, name: &str, handler: HandlerId) {
        let mut local = false;
        let mut orphaned = None;
        {
            let mut by_name = self.by_name.lock().unwrap();
            let key = (context.to_owned(), name.to_owned());
            if let Some(handlers) = by_name.get_mut(&key) {
                let before = handlers.members.len();
                handlers.members.retain(|m| {
                    let gone = m.link.id() == handler;
                    local |= gone && m.link.remote_node().is_none();
                    !gone
                });
                if handlers.members.is_empty() {
                    by_name.remove(&key);
                    orphaned = Some(key);
                } else if handlers.members.len() != before {
                    handlers.rebuild();
                }
            }
        }
        self.orphan(orphaned);
        if local {
            self.local_changed();
        }
    }

    /// Remembers command names left without handlers (see [`RETURN_WINDOW`]); bounded by the
    /// names that had handlers, expired entries going first.
    fn orphan(&self, names: impl IntoIterator<Item = (String, String)>) {
        let mut names = names.into_iter().peekable();
        if names.peek().is_none() {
            return;
        }
        let now = Instant::now();
        let mut recent = self.orphaned.lock().unwrap();
        recent.retain(|_, at| now.duration_since(*at) < RETURN_WINDOW);
        recent.extend(names.map(|key| (key, now)));
    }

    /// Removes every subscription of a handler (it disconnected). A command name left without
    /// handlers is remembered for [`RETURN_WINDOW`].
    pub fn remove(&self, handler: HandlerId) {
        let mut local = false;
        let mut orphaned = Vec::new();
        self.by_name.lock().unwrap().retain(|key, handlers| {
            let before = handlers.members.len();
            handlers.members.retain(|m| {
                let gone = m.link.id() == handler;
                local |= gone && m.link.remote_node().is_none();
                !gone
            });
            if handlers.members.len() != before && !handlers.members.is_empty() {
                handlers.rebuild();
            }
            if handlers.members.is_empty() {
                orphaned.push(key.clone());
            }
            !handlers.members.is_empty()
        });
        self.orphan(orphaned);
        if local {
            self.local_changed();
        }
    }

    /// The handler `handler` of `name` in `context`, if it is subscribed to it (a command sent
    /// here by another node for that handler).
    pub fn link(&self, context: &str, name: &str, handler: HandlerId) -> Option<Arc<dyn HandlerLink>> {
        let by_name = self.by_name.lock().unwrap();
        by_name
            .get(&(context.to_owned(), name.to_owned()))?
            .members
            .iter()
            .find(|m| m.link.id() == handler)
            .map(|m| m.link.clone())
    }

    /// The handler for a command of `name` in `context` with this routing key, if any.
    pub fn select(&self, context: &str, name: &str, routing_key: &str) -> Option<Arc<dyn HandlerLink>> {
        let by_name = self.by_name.lock().unwrap();
        by_name.get(&(context.to_owned(), name.to_owned()))?.select(routing_key)
    }

    /// Every subscription, of one context or of all, ordered by context, command and client.
    pub fn registrations(&self, context: Option<&str>) -> Vec<Registration> {
        self.registrations_where(context, |_| true)
    }

    /// The subscriptions of the handlers connected to this node.
    pub fn local_registrations(&self) -> Vec<Registration> {
        self.registrations_where(None, |link| link.remote_node().is_none())
    }

    fn registrations_where(&self, context: Option<&str>, keep: impl Fn(&dyn HandlerLink) -> bool) -> Vec<Registration> {
        // Copy the links out first: their accessors take locks of their own.
        let members: Vec<(String, String, Member)> = {
            let by_name = self.by_name.lock().unwrap();
            by_name
                .iter()
                .filter(|((c, _), _)| context.is_none_or(|wanted| wanted == c))
                .flat_map(|((c, name), handlers)| {
                    handlers
                        .members
                        .iter()
                        .filter(|m| keep(m.link.as_ref()))
                        .map(move |m| (c.clone(), name.clone(), m.clone()))
                })
                .collect()
        };
        let mut all: Vec<Registration> = members
            .into_iter()
            .map(|(context, command, member)| Registration {
                context,
                command,
                handler: member.link.id(),
                client_id: member.link.client_id(),
                component_name: member.link.component_name(),
                load_factor: member.load_factor,
            })
            .collect();
        all.sort_by(|a, b| {
            (&a.context, &a.command, &a.client_id, a.handler).cmp(&(&b.context, &b.command, &b.client_id, b.handler))
        });
        all
    }

    /// How many handlers `name` has in `context`.
    pub fn handler_count(&self, context: &str, name: &str) -> usize {
        let by_name = self.by_name.lock().unwrap();
        by_name
            .get(&(context.to_owned(), name.to_owned()))
            .map_or(0, |h| h.members.len())
    }
}

/// The load factor a subscription gets: Axon's default for none, else clamped to
/// 1..=[`MAX_LOAD_FACTOR`]. It is also the number of ring points the subscription adds.
pub fn effective_load_factor(requested: i32) -> i32 {
    match requested {
        0 => DEFAULT_LOAD_FACTOR,
        n => n.clamp(1, MAX_LOAD_FACTOR),
    }
}

/// A 64-bit hash that never changes between builds, runs or platforms (unlike `std`'s
/// `DefaultHasher`): FNV-1a over the bytes, then the SplitMix64 finalizer so that keys that differ
/// only in their last characters ("x #1", "x #2") still land far apart on the ring.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(HandlerId, String);
    impl HandlerLink for Fake {
        fn id(&self) -> HandlerId {
            self.0
        }
        fn ring_key(&self) -> &str {
            &self.1
        }
        fn client_id(&self) -> String {
            self.1.clone()
        }
        fn send(&self, _: Routed) -> Result<(), LinkError> {
            Ok(())
        }
    }

    fn fake(id: HandlerId) -> Arc<dyn HandlerLink> {
        Arc::new(Fake(id, format!("client-{id}")))
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(stable_hash(b""), stable_hash(b""));
        assert_ne!(stable_hash(b"a #1"), stable_hash(b"a #2"));
    }

    #[test]
    fn same_key_same_handler_and_spread_by_load_factor() {
        let registry = Registry::default();
        registry.subscribe("c", "Cmd", fake(1), 100);
        registry.subscribe("c", "Cmd", fake(2), 300);
        let mut counts = HashMap::new();
        for i in 0..4000 {
            let key = format!("key-{i}");
            let first = registry.select("c", "Cmd", &key).unwrap().id();
            assert_eq!(registry.select("c", "Cmd", &key).unwrap().id(), first);
            *counts.entry(first).or_insert(0) += 1;
        }
        let share = f64::from(counts[&2]) / 4000.0;
        assert!((0.6..0.9).contains(&share), "share of the 300-handler: {share}");
        // Adding the order the other way round gives the same ring.
        let other = Registry::default();
        other.subscribe("c", "Cmd", fake(2), 300);
        other.subscribe("c", "Cmd", fake(1), 100);
        for i in 0..200 {
            let key = format!("key-{i}");
            assert_eq!(
                registry.select("c", "Cmd", &key).unwrap().id(),
                other.select("c", "Cmd", &key).unwrap().id()
            );
        }
    }

    #[test]
    fn removal_and_contexts() {
        let registry = Registry::default();
        registry.subscribe("c", "Cmd", fake(1), 0);
        registry.subscribe("c", "Cmd", fake(2), 0);
        registry.subscribe("c", "Other", fake(1), 0);
        assert!(registry.select("d", "Cmd", "k").is_none());
        registry.remove(1);
        assert_eq!(registry.handler_count("c", "Cmd"), 1);
        assert_eq!(registry.handler_count("c", "Other"), 0);
        for i in 0..50 {
            assert_eq!(registry.select("c", "Cmd", &format!("{i}")).unwrap().id(), 2);
        }
        registry.unsubscribe("c", "Cmd", 2);
        assert!(registry.select("c", "Cmd", "k").is_none());
    }

    #[test]
    fn registrations_per_context() {
        let registry = Registry::default();
        registry.subscribe("c", "B", fake(2), 0);
        registry.subscribe("c", "A", fake(1), 7);
        registry.subscribe("d", "A", fake(3), 0);
        let listed: Vec<(String, String, HandlerId, i32)> = registry
            .registrations(Some("c"))
            .into_iter()
            .map(|r| (r.context, r.command, r.handler, r.load_factor))
            .collect();
        assert_eq!(
            listed,
            [
                ("c".to_owned(), "A".to_owned(), 1, 7),
                ("c".to_owned(), "B".to_owned(), 2, DEFAULT_LOAD_FACTOR)
            ]
        );
        let all = registry.registrations(None);
        assert_eq!(all.len(), 3);
        assert_eq!((all[2].context.as_str(), all[2].client_id.as_str()), ("d", "client-3"));
    }
}
