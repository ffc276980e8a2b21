//! Myelin through Axon Server's EventStore gRPC API, as an Axon application talks to it: one
//! `AppendEvent` transaction per append (the server checks the aggregate sequence and confirms
//! once the events are fsynced), `ListAggregateEvents`, `ListEvents` with permits.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use myelin_proto::axon::event::event_store_client::EventStoreClient;
use myelin_proto::axon::event::{GetAggregateEventsRequest, GetEventsRequest, ReadHighestSequenceNrRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::Replayed;
use crate::common;

pub struct Myelin {
    connections: Vec<EventStoreClient<Channel>>,
    context: String,
}

impl Myelin {
    /// Connection `i` to `servers[i % len]`: on a cluster, clients talk to every node, and a
    /// node that does not lead the context forwards their appends to the one that does.
    pub async fn connect(servers: &[&str], context: &str, connections: usize) -> anyhow::Result<Myelin> {
        let mut out = Vec::with_capacity(connections);
        for i in 0..connections {
            out.push(common::connect(servers[i % servers.len()]).await?);
        }
        Ok(Myelin {
            connections: out,
            context: context.to_owned(),
        })
    }

    fn client(&self, conn: usize) -> EventStoreClient<Channel> {
        self.connections[conn % self.connections.len()].clone()
    }

    pub async fn append(
        &self,
        conn: usize,
        aggregate: &str,
        first: i64,
        payload: &Bytes,
        count: usize,
    ) -> anyhow::Result<u64> {
        let events: Vec<_> = (0..count)
            .map(|i| common::event(aggregate, first + i as i64, payload))
            .collect();
        let confirmation = self
            .client(conn)
            .append_event(common::request(&self.context, tokio_stream::iter(events)))
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
        anyhow::ensure!(confirmation.get_ref().success, "confirmation with success=false");
        Ok((first + count as i64 - 1) as u64)
    }

    pub async fn position(&self, conn: usize, aggregate: &str) -> anyhow::Result<(i64, Option<u64>)> {
        let highest = self
            .client(conn)
            .read_highest_sequence_nr(common::request(
                &self.context,
                ReadHighestSequenceNrRequest {
                    aggregate_id: aggregate.to_owned(),
                    from_sequence_nr: 0,
                },
            ))
            .await?
            .into_inner()
            .to_sequence_nr;
        Ok((highest + 1, None))
    }

    pub async fn read_aggregate(&self, conn: usize, aggregate: &str) -> anyhow::Result<Vec<i64>> {
        let mut stream = self
            .client(conn)
            .list_aggregate_events(common::request(
                &self.context,
                GetAggregateEventsRequest {
                    aggregate_id: aggregate.to_owned(),
                    initial_sequence: 0,
                    allow_snapshots: false,
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(event) = stream.message().await? {
            out.push(event.aggregate_sequence_number);
        }
        Ok(out)
    }

    pub async fn fill(&self, conn: usize, batch: &[(String, i64)], payload: &Bytes) -> anyhow::Result<()> {
        let events: Vec<_> = batch.iter().map(|(id, seq)| common::event(id, *seq, payload)).collect();
        let confirmation = self
            .client(conn)
            .append_event(common::request(&self.context, tokio_stream::iter(events)))
            .await?;
        anyhow::ensure!(confirmation.get_ref().success, "confirmation with success=false");
        Ok(())
    }

    /// One `ListEvents` stream from token 0, granting permits as Axon Framework does (10,000 at
    /// first, more whenever half are used).
    pub async fn replay(&self, events: u64) -> anyhow::Result<Replayed> {
        const PERMITS: i64 = 10_000;
        let (requests, rx) = mpsc::channel(16);
        requests
            .send(GetEventsRequest {
                tracking_token: 0,
                number_of_permits: PERMITS,
                client_id: format!("myelin-bench-{}", std::process::id()),
                component_name: "myelin-bench".to_owned(),
                processor: "replay".to_owned(),
                ..Default::default()
            })
            .await?;
        let start = Instant::now();
        let mut stream = self
            .client(0)
            .list_events(common::request(&self.context, ReceiverStream::new(rx)))
            .await?
            .into_inner();
        let mut out = Replayed::default();
        let mut used = 0i64;
        let mut expected = 0i64;
        while out.events < events {
            let item = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .context("no event for 30 s")??
                .context("stream ended early")?;
            out.first_event.get_or_insert_with(|| start.elapsed());
            if item.token != expected {
                out.out_of_order += 1;
            }
            expected = item.token + 1;
            if let Some(p) = item.event.as_ref().and_then(|e| e.payload.as_ref()) {
                out.payload_bytes += p.data.len() as u64;
            }
            out.events += 1;
            used += 1;
            if used >= PERMITS / 2 {
                requests
                    .send(GetEventsRequest {
                        number_of_permits: used,
                        ..Default::default()
                    })
                    .await?;
                used = 0;
            }
        }
        Ok(out)
    }
}
