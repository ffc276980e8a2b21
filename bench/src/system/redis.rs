//! Redis as an event store, run with an append-only file and `appendfsync always` (Redis writes
//! and fsyncs the AOF before it answers any command of an event-loop round, so every confirmed
//! append is on disk; commands of concurrent clients share one fsync).
//!
//! Two mappings (see docs/benchmarks.md):
//! - `redis` (the event-store emulation): each append is one Lua script (EVALSHA), atomic like an
//!   event-store transaction. It checks that the aggregate's stream `a:<id>` holds exactly
//!   `first` events (XLEN: the optimistic-concurrency check), then for each event XADDs it to that
//!   stream with the explicit id `0-<seq+1>` (so a read of the aggregate is one XRANGE) and to the
//!   global stream `events` (the order a replay reads). Every event is stored twice, as an event
//!   store with a global log and an aggregate index does.
//! - `redis-xadd` (the cheapest durable use of Redis, as in the issue's reference figure): one
//!   plain XADD per event to `events`, no check; an append to a hot (shared) aggregate instead
//!   XADDs to that aggregate's own stream with explicit ids `0-<seq+1>`, which Redis rejects
//!   unless they grow: the sequence check. A batch is MULTI/EXEC. Append workloads only.

use anyhow::Context as _;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use super::{EVENT_TYPE, Replayed};

/// KEYS: aggregate stream, global stream. ARGV: aggregate id, first sequence, event type,
/// payloads. Checks before it writes, so a refused append changes nothing.
const APPEND_SCRIPT: &str = r"
local stored = redis.call('XLEN', KEYS[1])
local first = tonumber(ARGV[2])
if stored ~= first then
  return redis.error_reply('SEQ aggregate ' .. ARGV[1] .. ' holds ' .. stored .. ' events, append at ' .. first)
end
for i = 4, #ARGV do
  local seq = first + i - 4
  redis.call('XADD', KEYS[1], '0-' .. (seq + 1), 't', ARGV[3], 'd', ARGV[i])
  redis.call('XADD', KEYS[2], '*', 'a', ARGV[1], 's', seq, 't', ARGV[3], 'd', ARGV[i])
end
return first + #ARGV - 4
";

/// The fill's bulk form: KEYS: global stream, then one aggregate stream per event. ARGV: event
/// type, payload, then (aggregate id, sequence) per event. Unchecked: the fill writes each
/// aggregate's events in order from one client.
const FILL_SCRIPT: &str = r"
for i = 2, #KEYS do
  local id = ARGV[2 * i - 1]
  local seq = tonumber(ARGV[2 * i])
  redis.call('XADD', KEYS[i], '0-' .. (seq + 1), 't', ARGV[1], 'd', ARGV[2])
  redis.call('XADD', KEYS[1], '*', 'a', id, 's', seq, 't', ARGV[1], 'd', ARGV[2])
end
return #KEYS - 1
";

const GLOBAL: &str = "events";

pub struct Redis {
    connections: Vec<MultiplexedConnection>,
    plain: bool,
    script_sha: String,
    fill_sha: String,
}

fn aggregate_key(aggregate: &str) -> String {
    format!("a:{aggregate}")
}

impl Redis {
    pub async fn connect(server: &str, connections: usize, plain: bool) -> anyhow::Result<Redis> {
        let client = redis::Client::open(server).with_context(|| format!("redis address {server}"))?;
        // The default response timeout (0.5 s) is shorter than an fsync stall can be.
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(60)))
            .set_connection_timeout(Some(std::time::Duration::from_secs(5)));
        let mut out = Vec::with_capacity(connections);
        for _ in 0..connections {
            out.push(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .with_context(|| format!("connecting to {server}"))?,
            );
        }
        let load = |script: &'static str| {
            let mut con = out[0].clone();
            async move {
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(script)
                    .query_async::<String>(&mut con)
                    .await
            }
        };
        let script_sha = load(APPEND_SCRIPT).await?;
        let fill_sha = load(FILL_SCRIPT).await?;
        Ok(Redis {
            connections: out,
            plain,
            script_sha,
            fill_sha,
        })
    }

    fn con(&self, conn: usize) -> MultiplexedConnection {
        self.connections[conn % self.connections.len()].clone()
    }

    pub async fn setup(&self) -> anyhow::Result<()> {
        let mut con = self.con(0);
        let aof: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendfsync")
            .query_async(&mut con)
            .await?;
        anyhow::ensure!(
            aof.get(1).map(String::as_str) == Some("always"),
            "redis must run with appendfsync always (has {aof:?})"
        );
        Ok(())
    }

    fn script_call(&self, aggregate: &str, first: i64, count: usize, payload: &Bytes) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.script_sha)
            .arg(2)
            .arg(aggregate_key(aggregate))
            .arg(GLOBAL)
            .arg(aggregate)
            .arg(first)
            .arg(EVENT_TYPE);
        for _ in 0..count {
            cmd.arg(payload.as_ref());
        }
        cmd
    }

    pub async fn append(
        &self,
        conn: usize,
        aggregate: &str,
        first: i64,
        hot: bool,
        payload: &Bytes,
        count: usize,
    ) -> anyhow::Result<u64> {
        let mut con = self.con(conn);
        if !self.plain {
            let last: i64 = self
                .script_call(aggregate, first, count, payload)
                .query_async(&mut con)
                .await?;
            return Ok(last as u64);
        }
        let mut pipe = redis::pipe();
        if count > 1 {
            pipe.atomic();
        }
        for i in 0..count {
            let seq = first + i as i64;
            if hot {
                pipe.cmd("XADD")
                    .arg(aggregate_key(aggregate))
                    .arg(format!("0-{}", seq + 1))
                    .arg("t")
                    .arg(EVENT_TYPE)
                    .arg("d")
                    .arg(payload.as_ref());
            } else {
                pipe.cmd("XADD")
                    .arg(GLOBAL)
                    .arg("*")
                    .arg("a")
                    .arg(aggregate)
                    .arg("s")
                    .arg(seq)
                    .arg("t")
                    .arg(EVENT_TYPE)
                    .arg("d")
                    .arg(payload.as_ref());
            }
        }
        let _: Value = pipe.query_async(&mut con).await?;
        Ok((first + count as i64 - 1) as u64)
    }

    pub async fn position(&self, conn: usize, aggregate: &str) -> anyhow::Result<(i64, Option<u64>)> {
        let stored: i64 = redis::cmd("XLEN")
            .arg(aggregate_key(aggregate))
            .query_async(&mut self.con(conn))
            .await?;
        Ok((stored, None))
    }

    pub async fn read_aggregate(&self, conn: usize, aggregate: &str) -> anyhow::Result<Vec<i64>> {
        let entries: Value = redis::cmd("XRANGE")
            .arg(aggregate_key(aggregate))
            .arg("-")
            .arg("+")
            .query_async(&mut self.con(conn))
            .await?;
        let mut out = Vec::new();
        for entry in array(entries)? {
            let (id, _fields) = stream_entry(entry)?;
            let seq = id
                .split_once('-')
                .and_then(|(_, s)| s.parse::<i64>().ok())
                .context("aggregate stream id")?;
            out.push(seq - 1);
        }
        Ok(out)
    }

    /// One script call for the whole batch (one AOF write and fsync).
    pub async fn fill(&self, conn: usize, batch: &[(String, i64)], payload: &Bytes) -> anyhow::Result<()> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.fill_sha).arg(batch.len() + 1).arg(GLOBAL);
        for (aggregate, _) in batch {
            cmd.arg(aggregate_key(aggregate));
        }
        cmd.arg(EVENT_TYPE).arg(payload.as_ref());
        for (aggregate, seq) in batch {
            cmd.arg(aggregate).arg(*seq);
        }
        let stored: i64 = cmd.query_async(&mut self.con(conn)).await?;
        anyhow::ensure!(
            stored == batch.len() as i64,
            "fill script stored {stored} of {}",
            batch.len()
        );
        Ok(())
    }

    /// XRANGE over the global stream, 10,000 entries per call, each call starting after the
    /// last id received.
    pub async fn replay(&self, events: u64) -> anyhow::Result<Replayed> {
        const PAGE: u64 = 10_000;
        let mut con = self.con(0);
        let start = std::time::Instant::now();
        let mut out = Replayed::default();
        let mut from = "-".to_owned();
        while out.events < events {
            let page: Value = redis::cmd("XRANGE")
                .arg(GLOBAL)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(PAGE.min(events - out.events))
                .query_async(&mut con)
                .await?;
            let entries = array(page)?;
            anyhow::ensure!(!entries.is_empty(), "stream ended after {} events", out.events);
            out.first_event.get_or_insert_with(|| start.elapsed());
            for entry in entries {
                let (id, fields) = stream_entry(entry)?;
                for pair in fields.chunks(2) {
                    if let [Value::BulkString(k), Value::BulkString(v)] = pair
                        && k == b"d"
                    {
                        out.payload_bytes += v.len() as u64;
                    }
                }
                out.events += 1;
                from = format!("({id}");
            }
        }
        Ok(out)
    }
}

fn array(v: Value) -> anyhow::Result<Vec<Value>> {
    match v {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => anyhow::bail!("expected an array, got {other:?}"),
    }
}

/// `[id, [field, value, ...]]` of an XRANGE reply.
fn stream_entry(entry: Value) -> anyhow::Result<(String, Vec<Value>)> {
    let mut parts = array(entry)?.into_iter();
    let id = match parts.next() {
        Some(Value::BulkString(b)) => String::from_utf8(b)?,
        Some(Value::SimpleString(s)) => s,
        other => anyhow::bail!("stream entry id: {other:?}"),
    };
    let fields = array(parts.next().unwrap_or(Value::Nil))?;
    Ok((id, fields))
}
