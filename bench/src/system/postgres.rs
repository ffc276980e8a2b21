//! PostgreSQL as an event store: one row per event in
//! `events(global_seq identity primary key, aggregate_id, seq, event_type, payload,
//! UNIQUE (aggregate_id, seq))`, with `fsync=on` and `synchronous_commit=on` (checked by
//! `setup`), so a committed INSERT is in the fsynced WAL; concurrent commits share WAL flushes.
//!
//! An append is one autocommitted statement: a single-row INSERT, or one INSERT of all rows of a
//! batch through `unnest` (one transaction). The UNIQUE constraint is the optimistic-concurrency
//! check: two writers claiming the same sequence number cannot both commit. Each client has its
//! own connection (a PostgreSQL backend process), as a connection pool would give it.

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio_postgres::{Client, NoTls, Statement};

use super::{EVENT_TYPE, Replayed};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS events (
    global_seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    aggregate_id text NOT NULL,
    seq bigint NOT NULL,
    event_type text NOT NULL,
    payload bytea NOT NULL,
    UNIQUE (aggregate_id, seq)
)";

struct Connection {
    client: Client,
    insert_one: Statement,
    insert_many: Statement,
    read: Statement,
    position: Statement,
}

pub struct Postgres {
    connections: Vec<Connection>,
}

async fn open(server: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(server, NoTls)
        .await
        .with_context(|| format!("connecting to postgres ({server})"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("postgres connection: {e}");
        }
    });
    Ok(client)
}

/// A readable error: the server's message (and constraint) rather than "db error".
fn describe(e: tokio_postgres::Error) -> anyhow::Error {
    match e.as_db_error() {
        Some(db) if db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION => {
            anyhow::anyhow!("sequence conflict: {}", db.message())
        }
        Some(db) => anyhow::anyhow!("{}: {}", db.code().code(), db.message()),
        None => anyhow::Error::new(e),
    }
}

impl Postgres {
    pub async fn connect(server: &str, connections: usize) -> anyhow::Result<Postgres> {
        let mut out = Vec::with_capacity(connections);
        for i in 0..connections {
            let client = open(server).await?;
            if i == 0 {
                // The statements below need the table.
                client.batch_execute(SCHEMA).await.map_err(describe)?;
            }
            out.push(Connection {
                insert_one: client
                    .prepare("INSERT INTO events (aggregate_id, seq, event_type, payload) VALUES ($1, $2, $3, $4)")
                    .await?,
                insert_many: client
                    .prepare(
                        "INSERT INTO events (aggregate_id, seq, event_type, payload) \
                         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bytea[])",
                    )
                    .await?,
                read: client
                    .prepare("SELECT seq, event_type, payload FROM events WHERE aggregate_id = $1 ORDER BY seq")
                    .await?,
                position: client
                    .prepare("SELECT coalesce(max(seq) + 1, 0) FROM events WHERE aggregate_id = $1")
                    .await?,
                client,
            });
        }
        Ok(Postgres { connections: out })
    }

    fn conn(&self, conn: usize) -> &Connection {
        &self.connections[conn % self.connections.len()]
    }

    pub async fn setup(&self) -> anyhow::Result<()> {
        let c = &self.conn(0).client;
        for (setting, want) in [("fsync", "on"), ("synchronous_commit", "on")] {
            let row = c.query_one(&format!("SHOW {setting}"), &[]).await?;
            let value: String = row.get(0);
            anyhow::ensure!(value == want, "postgres must run with {setting}={want} (has {value})");
        }
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
        let c = self.conn(conn);
        if count == 1 {
            c.client
                .execute(&c.insert_one, &[&aggregate, &first, &EVENT_TYPE, &payload.as_ref()])
                .await
                .map_err(describe)?;
        } else {
            let ids = vec![aggregate; count];
            let seqs: Vec<i64> = (0..count as i64).map(|i| first + i).collect();
            let types = vec![EVENT_TYPE; count];
            let payloads = vec![payload.as_ref(); count];
            c.client
                .execute(&c.insert_many, &[&ids, &seqs, &types, &payloads])
                .await
                .map_err(describe)?;
        }
        Ok((first + count as i64 - 1) as u64)
    }

    pub async fn position(&self, conn: usize, aggregate: &str) -> anyhow::Result<(i64, Option<u64>)> {
        let c = self.conn(conn);
        let row = c.client.query_one(&c.position, &[&aggregate]).await.map_err(describe)?;
        Ok((row.get(0), None))
    }

    pub async fn read_aggregate(&self, conn: usize, aggregate: &str) -> anyhow::Result<Vec<i64>> {
        let c = self.conn(conn);
        let rows = c.client.query(&c.read, &[&aggregate]).await.map_err(describe)?;
        Ok(rows
            .iter()
            .map(|r| {
                let _payload: &[u8] = r.get(2);
                r.get::<_, i64>(0)
            })
            .collect())
    }

    pub async fn fill(&self, conn: usize, batch: &[(String, i64)], payload: &Bytes) -> anyhow::Result<()> {
        let c = self.conn(conn);
        let ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
        let seqs: Vec<i64> = batch.iter().map(|(_, s)| *s).collect();
        let types = vec![EVENT_TYPE; batch.len()];
        let payloads = vec![payload.as_ref(); batch.len()];
        c.client
            .execute(&c.insert_many, &[&ids, &seqs, &types, &payloads])
            .await
            .map_err(describe)?;
        Ok(())
    }

    /// One query over the table in `global_seq` order, its rows streamed as they arrive.
    pub async fn replay(&self, events: u64) -> anyhow::Result<Replayed> {
        let c = &self.conn(0).client;
        let start = std::time::Instant::now();
        let limit = events as i64;
        let rows = c
            .query_raw(
                "SELECT global_seq, aggregate_id, seq, event_type, payload FROM events ORDER BY global_seq LIMIT $1",
                [&limit as &(dyn tokio_postgres::types::ToSql + Sync)],
            )
            .await
            .map_err(describe)?;
        let mut rows = std::pin::pin!(rows);
        let mut out = Replayed::default();
        let mut expected = None::<i64>;
        while let Some(row) = rows.next().await {
            let row = row.map_err(describe)?;
            out.first_event.get_or_insert_with(|| start.elapsed());
            let global: i64 = row.get(0);
            if expected.is_some_and(|e| e != global) {
                out.out_of_order += 1;
            }
            expected = Some(global + 1);
            let payload: &[u8] = row.get(4);
            out.payload_bytes += payload.len() as u64;
            out.events += 1;
        }
        anyhow::ensure!(out.events == events, "table holds only {} events", out.events);
        Ok(out)
    }
}
