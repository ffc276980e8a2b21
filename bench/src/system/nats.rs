//! NATS JetStream as an event store: one file-storage stream `EVENTS` over the subjects `ev.>`,
//! one subject `ev.<aggregate id>` per aggregate, the server run with `sync_interval: always`
//! (every acknowledged message was fsynced).
//!
//! - Append: a JetStream publish per event, the acknowledgements awaited (for a batch: all its
//!   publishes in flight, then all acks). The check is the header
//!   `Nats-Expected-Last-Subject-Sequence`: the stream sequence of the aggregate's last event as
//!   this client knows it (0 for a new aggregate), which the server compares with the subject's
//!   last sequence. A batch of N is N messages, the first one checked: not atomic (JetStream's
//!   atomic batch publish is not used). The event's sequence within its aggregate travels in the
//!   header `Bench-Seq`.
//! - Aggregate read: one batched Direct Get (`$JS.API.DIRECT.GET.EVENTS` with `next_by_subj` and
//!   `batch`, NATS 2.11+), the replies read from an inbox subscription until the end-of-batch
//!   status (204).
//! - Replay: an ordered pull consumer from the first message.
//!
//! On a cluster (`nats-r3`) the stream has `--stream-replicas` replicas and the connections are
//! spread over the servers, which route each publish to the stream's leader; a Direct Get may be
//! answered by any replica (`allow_direct`).

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt as _;

use super::Replayed;

const STREAM: &str = "EVENTS";
const EXPECTED_LAST: &str = "Nats-Expected-Last-Subject-Sequence";
const SEQ_HEADER: &str = "Bench-Seq";
/// Longest a publish may wait for its acknowledgement (fsync stalls included).
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

struct Connection {
    client: Client,
    js: jetstream::Context,
}

pub struct Nats {
    connections: Vec<Connection>,
}

fn subject(aggregate: &str) -> String {
    format!("ev.{aggregate}")
}

impl Nats {
    /// Connection `i` to `servers[i % len]`: on a cluster, clients talk to every server, and
    /// the cluster routes each publish to the stream's leader.
    pub async fn connect(servers: &[&str], connections: usize) -> anyhow::Result<Nats> {
        let mut out = Vec::with_capacity(connections);
        for i in 0..connections {
            let server = servers[i % servers.len()];
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(5))
                .request_timeout(Some(ACK_TIMEOUT))
                .connect(server)
                .await
                .with_context(|| format!("connecting to nats at {server}"))?;
            let mut js = jetstream::new(client.clone());
            js.set_timeout(ACK_TIMEOUT);
            out.push(Connection { client, js });
        }
        Ok(Nats { connections: out })
    }

    fn conn(&self, conn: usize) -> &Connection {
        &self.connections[conn % self.connections.len()]
    }

    /// Creates the stream with `replicas` replicas, or checks the one that exists. A cluster
    /// that has just (re)started may have no JetStream leader, or no leader of the stream yet,
    /// and then leaves a request unanswered: each try waits 5 s, for up to 60 s in all.
    pub async fn setup(&self, replicas: usize) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut stream = loop {
            let created = tokio::time::timeout(
                Duration::from_secs(5),
                self.conn(0).js.get_or_create_stream(stream::Config {
                    name: STREAM.to_owned(),
                    subjects: vec!["ev.>".to_owned()],
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    allow_direct: true,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|_| "no answer within 5 s".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()));
            match created {
                Ok(stream) => break stream,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("nats: stream {STREAM} not ready ({e}); trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => anyhow::bail!("creating stream {STREAM}: {e}"),
            }
        };
        let info = stream.info().await.map_err(|e| anyhow::anyhow!("stream info: {e}"))?;
        anyhow::ensure!(
            info.config.num_replicas == replicas,
            "stream {STREAM} has {} replicas, not {replicas}",
            info.config.num_replicas
        );
        Ok(())
    }

    pub async fn append(
        &self,
        conn: usize,
        aggregate: &str,
        first: i64,
        after: Option<u64>,
        payload: &Bytes,
        count: usize,
    ) -> anyhow::Result<u64> {
        let c = self.conn(conn);
        let subject = subject(aggregate);
        let mut acks = Vec::with_capacity(count);
        for i in 0..count {
            let mut headers = HeaderMap::new();
            if i == 0 {
                headers.insert(EXPECTED_LAST, after.unwrap_or(0).to_string());
            }
            headers.insert(SEQ_HEADER, (first + i as i64).to_string());
            acks.push(
                c.js.publish_with_headers(subject.clone(), headers, payload.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("publish: {e}"))?,
            );
        }
        let mut last = 0;
        for ack in acks {
            last = ack.await.map_err(|e| anyhow::anyhow!("publish ack: {e}"))?.sequence;
        }
        Ok(last)
    }

    pub async fn position(&self, conn: usize, aggregate: &str) -> anyhow::Result<(i64, Option<u64>)> {
        let stream = self.conn(conn).js.get_stream_no_info(STREAM).await?;
        match stream.direct_get_last_for_subject(subject(aggregate)).await {
            Ok(message) => {
                let seq: i64 = message
                    .headers
                    .get(SEQ_HEADER)
                    .and_then(|v| v.as_str().parse().ok())
                    .context("last message without Bench-Seq")?;
                Ok((seq + 1, Some(message.sequence)))
            }
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok((0, None)),
            Err(e) => Err(anyhow::anyhow!("direct get: {e}")),
        }
    }

    /// All events of the aggregate through one batched Direct Get.
    pub async fn read_aggregate(&self, conn: usize, aggregate: &str) -> anyhow::Result<Vec<i64>> {
        let c = self.conn(conn);
        let inbox = c.client.new_inbox();
        let mut replies = c.client.subscribe(inbox.clone()).await?;
        let request = serde_json::json!({"seq": 1, "next_by_subj": subject(aggregate), "batch": 100_000});
        c.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{STREAM}"),
                inbox,
                Bytes::from(request.to_string()),
            )
            .await?;
        let mut out = Vec::new();
        loop {
            let message = tokio::time::timeout(ACK_TIMEOUT, replies.next())
                .await
                .context("direct get timed out")?
                .context("inbox closed")?;
            match message.status.map(|s| s.as_u16()) {
                // End of batch, or no message at all for the subject.
                Some(204) | Some(404) => break,
                Some(code) => anyhow::bail!("direct get: status {code} {:?}", message.description),
                None => {}
            }
            let seq: i64 = message
                .headers
                .as_ref()
                .and_then(|h| h.get(SEQ_HEADER))
                .and_then(|v| v.as_str().parse().ok())
                .context("message without Bench-Seq")?;
            out.push(seq);
        }
        Ok(out)
    }

    /// Every event of the batch published at once, then every acknowledgement awaited.
    pub async fn fill(&self, conn: usize, batch: &[(String, i64)], payload: &Bytes) -> anyhow::Result<()> {
        let c = self.conn(conn);
        let mut acks = Vec::with_capacity(batch.len());
        for (aggregate, seq) in batch {
            let mut headers = HeaderMap::new();
            headers.insert(SEQ_HEADER, seq.to_string());
            acks.push(
                c.js.publish_with_headers(subject(aggregate), headers, payload.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("publish: {e}"))?,
            );
        }
        for ack in acks {
            ack.await.map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
        }
        Ok(())
    }

    /// An ordered pull consumer (no acknowledgements) from the stream's first message.
    pub async fn replay(&self, events: u64) -> anyhow::Result<Replayed> {
        let stream = self.conn(0).js.get_stream_no_info(STREAM).await?;
        let start = std::time::Instant::now();
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating consumer: {e}"))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("consumer messages: {e}"))?;
        let mut out = Replayed::default();
        let mut expected = 1u64;
        while out.events < events {
            let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .context("no message for 30 s")?
                .context("consumer ended early")?
                .map_err(|e| anyhow::anyhow!("consumer: {e}"))?;
            out.first_event.get_or_insert_with(|| start.elapsed());
            let sequence = message.info().map_err(|e| anyhow::anyhow!("{e}"))?.stream_sequence;
            if sequence != expected {
                out.out_of_order += 1;
            }
            expected = sequence + 1;
            out.payload_bytes += message.payload.len() as u64;
            out.events += 1;
        }
        Ok(out)
    }
}
