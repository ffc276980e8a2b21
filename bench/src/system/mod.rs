//! The systems the comparison drives: Myelin and its durable peers, each behind the same few
//! operations so that every workload has one shape for all of them (see `compare`).
//!
//! Every system stores the same logical event: an aggregate id, a sequence number within the
//! aggregate, an event type and an opaque payload. Each offers:
//! - `append`: store `count` events of one aggregate at sequences `first..first+count`, failing
//!   if the aggregate does not stand at `first` (an optimistic-concurrency check as an event
//!   store does it); confirmed only once durable;
//! - `position`: where an aggregate stands, to recover after a failed append;
//! - `read_aggregate`: all events of an aggregate, in order;
//! - `fill`: load events fast (preparation, not compared);
//! - `replay`: read the first N events in global order through one reader.
//!
//! How each peer maps these (and where it is weaker or stronger than an event store) is told in
//! its module and in docs/benchmarks.md.

pub mod etcd;
pub mod myelin;
pub mod nats;
pub mod postgres;
pub mod redis;

use std::time::Duration;

use bytes::Bytes;

/// Which system a run drives.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Myelin over its Axon gRPC API (`--server http://host:port`).
    Myelin,
    /// Redis, each append one Lua script: sequence check + XADD to the aggregate's stream and to
    /// the global stream (`--server redis://host:port/`).
    Redis,
    /// Redis, plain XADD per event to one global stream; appends to hot aggregates XADD with
    /// explicit ids to their own stream instead (the check). Append workloads only.
    RedisXadd,
    /// PostgreSQL, rows in an events table with UNIQUE (aggregate_id, seq)
    /// (`--server "host=... port=... user=..."`).
    Postgres,
    /// NATS JetStream, a subject per aggregate, `Nats-Expected-Last-Subject-Sequence` as the
    /// check (`--server host:port`).
    Nats,
    /// etcd, a key per event (`ev/<aggregate>/<sequence>`), each append one Txn whose compares
    /// are the check (`--server http://host:port`).
    Etcd,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Myelin => "myelin",
            Kind::Redis => "redis",
            Kind::RedisXadd => "redis-xadd",
            Kind::Postgres => "postgres",
            Kind::Nats => "nats",
            Kind::Etcd => "etcd",
        }
    }

    /// Clients sharing one connection: PostgreSQL runs one statement per connection at a time,
    /// so each client has its own; the others multiplex.
    pub fn clients_per_connection(self, asked: usize) -> usize {
        match self {
            Kind::Postgres => 1,
            _ => asked.max(1),
        }
    }
}

/// The event type every system stores with each event.
pub const EVENT_TYPE: &str = "io.myelin.bench.SomethingHappened";

/// What a replay delivered.
#[derive(Debug, Default)]
pub struct Replayed {
    pub events: u64,
    pub payload_bytes: u64,
    pub first_event: Option<Duration>,
    /// Events whose position was not one past the previous one's (should be 0).
    pub out_of_order: u64,
}

/// One append: which aggregate, where it must stand, how many events.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    pub aggregate: &'a str,
    /// Sequence number of the first event: the number of events the aggregate must hold.
    pub first: i64,
    /// The token the previous append to this aggregate returned (None: a new aggregate, or a
    /// system whose check needs no token).
    pub after: Option<u64>,
    /// The aggregate is shared by several clients (the plain-XADD Redis variant checks only
    /// those).
    pub hot: bool,
    pub count: usize,
}

/// A connected system.
pub enum System {
    Myelin(myelin::Myelin),
    Redis(redis::Redis),
    Postgres(postgres::Postgres),
    Nats(nats::Nats),
    Etcd(etcd::Etcd),
}

impl System {
    /// Opens `connections` connections (clients use `connection(i)` round-robin by index).
    /// `servers` is one address, or for a cluster every node's, comma-separated: connection `i`
    /// goes to server `i % servers`.
    pub async fn connect(kind: Kind, servers: &str, context: &str, connections: usize) -> anyhow::Result<System> {
        let n = connections.max(1);
        let list = crate::common::servers(servers);
        anyhow::ensure!(!list.is_empty(), "no server given");
        let single = || {
            anyhow::ensure!(
                list.len() == 1,
                "{} runs on one server, not {}",
                kind.name(),
                list.len()
            );
            Ok(list[0])
        };
        Ok(match kind {
            Kind::Myelin => System::Myelin(myelin::Myelin::connect(&list, context, n).await?),
            Kind::Redis => System::Redis(redis::Redis::connect(single()?, n, false).await?),
            Kind::RedisXadd => System::Redis(redis::Redis::connect(single()?, n, true).await?),
            Kind::Postgres => System::Postgres(postgres::Postgres::connect(single()?, n).await?),
            Kind::Nats => System::Nats(nats::Nats::connect(&list, n).await?),
            Kind::Etcd => System::Etcd(etcd::Etcd::connect(&list, n).await?),
        })
    }

    /// Creates what the workloads need (schema, stream) and checks the durability settings that
    /// the system reports; idempotent. `replicas`: of the NATS stream.
    pub async fn setup(&self, replicas: usize) -> anyhow::Result<()> {
        match self {
            System::Myelin(_) => Ok(()),
            System::Redis(s) => s.setup().await,
            System::Postgres(s) => s.setup().await,
            System::Nats(s) => s.setup(replicas).await,
            System::Etcd(s) => s.setup().await,
        }
    }

    /// Appends `a.count` events (each carrying `payload`) to `a.aggregate` at sequences
    /// `a.first..a.first+a.count`, checked. Returns the token for the next append.
    pub async fn append(&self, conn: usize, a: &Append<'_>, payload: &Bytes) -> anyhow::Result<u64> {
        match self {
            System::Myelin(s) => s.append(conn, a.aggregate, a.first, payload, a.count).await,
            System::Redis(s) => s.append(conn, a.aggregate, a.first, a.hot, payload, a.count).await,
            System::Postgres(s) => s.append(conn, a.aggregate, a.first, payload, a.count).await,
            System::Nats(s) => s.append(conn, a.aggregate, a.first, a.after, payload, a.count).await,
            System::Etcd(s) => s.append(conn, a.aggregate, a.first, payload, a.count).await,
        }
    }

    /// Where `aggregate` stands: the next sequence number and the token of its last append.
    pub async fn position(&self, conn: usize, aggregate: &str) -> anyhow::Result<(i64, Option<u64>)> {
        match self {
            System::Myelin(s) => s.position(conn, aggregate).await,
            System::Redis(s) => s.position(conn, aggregate).await,
            System::Postgres(s) => s.position(conn, aggregate).await,
            System::Nats(s) => s.position(conn, aggregate).await,
            System::Etcd(s) => s.position(conn, aggregate).await,
        }
    }

    /// The sequence numbers of all events of `aggregate`, in the order the system returned them
    /// (the payloads are fetched too, and dropped).
    pub async fn read_aggregate(&self, conn: usize, aggregate: &str) -> anyhow::Result<Vec<i64>> {
        match self {
            System::Myelin(s) => s.read_aggregate(conn, aggregate).await,
            System::Redis(s) => s.read_aggregate(conn, aggregate).await,
            System::Postgres(s) => s.read_aggregate(conn, aggregate).await,
            System::Nats(s) => s.read_aggregate(conn, aggregate).await,
            System::Etcd(s) => s.read_aggregate(conn, aggregate).await,
        }
    }

    /// Stores one event for each `(aggregate, sequence)` of `batch`, fast (no checks needed:
    /// the fill writes each aggregate's events in order from one client).
    pub async fn fill(&self, conn: usize, batch: &[(String, i64)], payload: &Bytes) -> anyhow::Result<()> {
        match self {
            System::Myelin(s) => s.fill(conn, batch, payload).await,
            System::Redis(s) => s.fill(conn, batch, payload).await,
            System::Postgres(s) => s.fill(conn, batch, payload).await,
            System::Nats(s) => s.fill(conn, batch, payload).await,
            System::Etcd(s) => s.fill(conn, batch, payload).await,
        }
    }

    /// Reads the first `events` events in global order through one reader.
    pub async fn replay(&self, events: u64) -> anyhow::Result<Replayed> {
        match self {
            System::Myelin(s) => s.replay(events).await,
            System::Redis(s) => s.replay(events).await,
            System::Postgres(s) => s.replay(events).await,
            System::Nats(s) => s.replay(events).await,
            System::Etcd(s) => s.replay(events).await,
        }
    }
}
