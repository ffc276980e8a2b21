//! etcd as an event store: one key per event, `ev/<aggregate id>/<sequence, 20 digits>`, the
//! payload as its value. An aggregate's events are then one key range, in order, and etcd's
//! revision is the global position: each write (a Txn) is one revision of the whole store, in
//! the one order that every member applies. etcd confirms a write once its Raft entry is in
//! the WAL of a quorum of members, each WAL write fsynced (no setting turns that off, short of
//! `--unsafe-no-fsync`).
//!
//! - Append: one Txn per call. Its compares are the sequence check: the aggregate holds exactly
//!   `first` events, i.e. no key at `first` (create revision 0) and, past the first event, a key
//!   at `first - 1`. Then it puts the call's events: atomic, checked, one Raft entry.
//! - Aggregate read: one Range over the aggregate's keys; linearizable, as etcd reads are by
//!   default (the member asks the leader for its commit index first).
//! - Replay: a Watch of `ev/` from revision 1: etcd sends the stored history in revision order
//!   (nothing is compacted during a run), then new writes. The events of one Txn share its
//!   revision.
//! - Fill: Txns of up to 100 puts (etcd refuses more than 128 operations per Txn by default),
//!   a fill call's Txns at once.

mod rpc;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::future::try_join_all;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Replayed;
use rpc::{Compare, PutRequest, RangeRequest, Request, RequestOp, TxnRequest};

const PREFIX: &str = "ev/";
/// Puts per fill Txn (etcd's `--max-txn-ops` is 128 by default).
const FILL_TXN_OPS: usize = 100;

pub struct Etcd {
    connections: Vec<rpc::Client>,
}

fn event_key(aggregate: &str, seq: i64) -> Vec<u8> {
    format!("{PREFIX}{aggregate}/{seq:020}").into_bytes()
}

/// The first key of `aggregate`'s range and the key past its last.
fn aggregate_range(aggregate: &str) -> (Vec<u8>, Vec<u8>) {
    (
        format!("{PREFIX}{aggregate}/").into_bytes(),
        // '0' follows '/': every key that starts with "<aggregate>/" sorts before it.
        format!("{PREFIX}{aggregate}0").into_bytes(),
    )
}

fn sequence_of(key: &[u8]) -> anyhow::Result<i64> {
    let key = std::str::from_utf8(key)?;
    key.rsplit_once('/')
        .and_then(|(_, seq)| seq.parse().ok())
        .with_context(|| format!("event key {key}"))
}

fn put(key: Vec<u8>, payload: &Bytes) -> RequestOp {
    RequestOp {
        request: Some(Request::Put(PutRequest {
            key,
            value: payload.clone(),
        })),
    }
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

impl Etcd {
    /// Connection `i` to `servers[i % len]`: clients talk to every member, and a member that
    /// does not lead forwards their writes to the leader.
    pub async fn connect(servers: &[&str], connections: usize) -> anyhow::Result<Etcd> {
        let mut out = Vec::with_capacity(connections);
        for i in 0..connections {
            out.push(rpc::Client::connect(servers[i % servers.len()]).await?);
        }
        Ok(Etcd { connections: out })
    }

    fn client(&self, conn: usize) -> &rpc::Client {
        &self.connections[conn % self.connections.len()]
    }

    /// Waits (up to 30 s) until the cluster has a leader, and says who its members are.
    pub async fn setup(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            match self.client(0).status().await {
                Ok(s) if s.leader != 0 => break s,
                Ok(_) if Instant::now() < deadline => {}
                Err(e) if Instant::now() < deadline => eprintln!("etcd: not ready ({e}); trying again"),
                Ok(_) => anyhow::bail!("etcd has no leader after 30 s"),
                Err(e) => return Err(status_error(e)).context("etcd status"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let members = self.client(0).member_list().await.map_err(status_error)?.members;
        let leader = members
            .iter()
            .find(|m| m.id == status.leader)
            .map_or("?", |m| m.name.as_str());
        eprintln!(
            "etcd {}: {} member(s) ({}), leader {leader}",
            status.version,
            members.len(),
            members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
        );
        Ok(())
    }

    pub async fn append(
        &self,
        conn: usize,
        aggregate: &str,
        first: i64,
        payload: &Bytes,
        count: usize,
    ) -> anyhow::Result<u64> {
        let mut compare = vec![Compare::create_revision(event_key(aggregate, first), rpc::EQUAL, 0)];
        if first > 0 {
            compare.push(Compare::create_revision(
                event_key(aggregate, first - 1),
                rpc::GREATER,
                0,
            ));
        }
        let success = (0..count)
            .map(|i| put(event_key(aggregate, first + i as i64), payload))
            .collect();
        let response = self
            .client(conn)
            .txn(TxnRequest {
                compare,
                success,
                failure: Vec::new(),
            })
            .await
            .map_err(status_error)?;
        anyhow::ensure!(
            response.succeeded,
            "sequence check failed: aggregate {aggregate} does not hold exactly {first} events"
        );
        Ok(response.header.map_or(0, |h| h.revision) as u64)
    }

    pub async fn position(&self, conn: usize, aggregate: &str) -> anyhow::Result<(i64, Option<u64>)> {
        let (key, range_end) = aggregate_range(aggregate);
        let last = self
            .client(conn)
            .range(RangeRequest {
                key,
                range_end,
                limit: 1,
                sort_order: rpc::SORT_DESCEND,
                keys_only: true,
                ..Default::default()
            })
            .await
            .map_err(status_error)?;
        match last.kvs.first() {
            Some(kv) => Ok((sequence_of(&kv.key)? + 1, None)),
            None => Ok((0, None)),
        }
    }

    /// All events of the aggregate through one Range (in key order, i.e. sequence order).
    pub async fn read_aggregate(&self, conn: usize, aggregate: &str) -> anyhow::Result<Vec<i64>> {
        let (key, range_end) = aggregate_range(aggregate);
        let range = self
            .client(conn)
            .range(RangeRequest {
                key,
                range_end,
                ..Default::default()
            })
            .await
            .map_err(status_error)?;
        range.kvs.iter().map(|kv| sequence_of(&kv.key)).collect()
    }

    /// The batch in Txns of up to 100 puts, all in flight at once (unchecked: the fill writes
    /// each aggregate's events in order from one client).
    pub async fn fill(&self, conn: usize, batch: &[(String, i64)], payload: &Bytes) -> anyhow::Result<()> {
        let client = self.client(conn);
        try_join_all(batch.chunks(FILL_TXN_OPS).map(|chunk| {
            let success = chunk
                .iter()
                .map(|(aggregate, seq)| put(event_key(aggregate, *seq), payload))
                .collect();
            client.txn(TxnRequest {
                success,
                ..Default::default()
            })
        }))
        .await
        .map_err(status_error)?;
        Ok(())
    }

    /// A Watch of every event key from revision 1.
    pub async fn replay(&self, events: u64) -> anyhow::Result<Replayed> {
        let (requests, rx) = mpsc::channel(1);
        requests
            .send(rpc::WatchRequest {
                request: Some(rpc::WatchRequestKind::Create(rpc::WatchCreateRequest {
                    key: PREFIX.as_bytes().to_vec(),
                    range_end: b"ev0".to_vec(),
                    start_revision: 1,
                    fragment: true,
                })),
            })
            .await?;
        let start = Instant::now();
        let mut stream = self
            .client(0)
            .watch(ReceiverStream::new(rx))
            .await
            .map_err(status_error)?;
        let mut out = Replayed::default();
        let mut last_revision = 0;
        while out.events < events {
            let response = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .context("no event for 30 s")?
                .map_err(status_error)?
                .context("watch ended early")?;
            anyhow::ensure!(
                !response.canceled,
                "watch canceled: {} (compacted to {})",
                response.cancel_reason,
                response.compact_revision
            );
            for event in response.events {
                let Some(kv) = event.kv else { continue };
                out.first_event.get_or_insert_with(|| start.elapsed());
                if kv.mod_revision < last_revision {
                    out.out_of_order += 1;
                }
                last_revision = kv.mod_revision;
                out.payload_bytes += kv.value.len() as u64;
                out.events += 1;
            }
        }
        // Closing the request stream ends the watch.
        drop(requests);
        Ok(out)
    }
}
