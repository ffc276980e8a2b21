//! One context's stored data: its event and snapshot segment stores, and the rules that apply
//! committed commands to them.
//!
//! `apply` is deterministic: given the same stores and the same command, every replica makes the
//! same decision for every transaction (stored, or rejected with the same sequence error) and
//! writes the same bytes. Sequence errors are results, not failures; an I/O error is a failure
//! that stops this replica.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use myelin_proto::axon::event::Event;
use prost::Message;

use crate::command::{Command, EventRecord, Outcome, Transaction};
use crate::segment::{EntryRef, Indexed, Inspect, Kind, SegmentStore, StoreError};

/// The storage limits of a context.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub event_segment_size: u64,
    pub snapshot_segment_size: u64,
}

pub struct StoredContext {
    pub name: String,
    pub dir: PathBuf,
    pub events: SegmentStore,
    pub snapshots: SegmentStore,
    /// The pending scheduled events (see `crate::scheduled`): filled from the snapshot pointer
    /// and the log when the Raft group starts, then changed by apply only.
    pub scheduled: crate::scheduled::Shelf,
}

/// The index facts of an event, the same at append time and when an index is rebuilt from disk.
/// Axon checks and indexes only events that name an aggregate type; snapshots always belong to
/// their aggregate.
pub fn event_facts(event: &Event, kind: Kind) -> (String, i64, bool) {
    let indexed = match kind {
        Kind::Events => !event.aggregate_type.is_empty(),
        Kind::Snapshots => !event.aggregate_identifier.is_empty(),
    };
    (
        event.aggregate_identifier.clone(),
        event.aggregate_sequence_number,
        indexed,
    )
}

fn event_facts_of(bytes: &[u8]) -> Option<(String, i64, bool)> {
    Event::decode(bytes).ok().map(|e| event_facts(&e, Kind::Events))
}

fn snapshot_facts_of(bytes: &[u8]) -> Option<(String, i64, bool)> {
    Event::decode(bytes).ok().map(|e| event_facts(&e, Kind::Snapshots))
}

/// An event's timestamp by a field scan; one that does not scan is at or after no instant.
fn timestamp_of(bytes: &[u8]) -> i64 {
    myelin_proto::encoded::timestamp(bytes).unwrap_or(i64::MIN)
}

const EVENTS: Inspect = Inspect {
    facts: event_facts_of,
    timestamp: timestamp_of,
};

const SNAPSHOTS: Inspect = Inspect {
    facts: snapshot_facts_of,
    timestamp: timestamp_of,
};

/// Builds the log record of an event received from a client.
pub fn record_of(event: &Event, kind: Kind) -> EventRecord {
    let (aggregate_id, sequence, indexed) = event_facts(event, kind);
    EventRecord {
        aggregate_id,
        sequence,
        indexed,
        encoded: Bytes::from(event.encode_to_vec()),
    }
}

impl StoredContext {
    /// Opens a context's stores, first finishing (or discarding) an install that a crash
    /// interrupted (see `crate::install`).
    pub fn open(name: &str, dir: &Path, limits: Limits) -> Result<StoredContext, StoreError> {
        crate::install::recover(dir)?;
        Ok(StoredContext {
            name: name.to_owned(),
            dir: dir.to_owned(),
            events: SegmentStore::open(&dir.join("events"), Kind::Events, limits.event_segment_size, EVENTS)?,
            snapshots: SegmentStore::open(
                &dir.join("snapshots"),
                Kind::Snapshots,
                limits.snapshot_segment_size,
                SNAPSHOTS,
            )?,
            scheduled: Default::default(),
        })
    }

    /// The newest Raft entry whose data the segments hold.
    pub fn last_entry(&self) -> Option<EntryRef> {
        [self.events.last_entry(), self.snapshots.last_entry()]
            .into_iter()
            .flatten()
            .max_by_key(|e| e.index)
    }

    /// Whether applying `command` may close a segment (and so fsync): the caller then moves off
    /// the async runtime for it.
    pub fn may_roll(&self, command: &Command) -> bool {
        // Per event: its bytes plus the record's per-event framing, generously.
        let size = |records: &mut dyn Iterator<Item = &EventRecord>| records.map(|r| r.encoded.len() as u64 + 64).sum();
        match command {
            Command::AppendEvents(txs) => self.events.may_roll(size(&mut txs.iter().flat_map(|tx| &tx.events))),
            Command::AppendSnapshots(records) => self.snapshots.may_roll(size(&mut records.iter())),
            Command::PublishScheduled(tokens) => self
                .events
                .may_roll(self.scheduled.read(|book| book.bytes_of(tokens)) + 64 * tokens.len() as u64),
            Command::Schedule(_) | Command::CancelScheduled(_) => false,
        }
    }

    /// Applies one command written by the Raft entry `entry`; returns one outcome per
    /// transaction or snapshot.
    pub fn apply(&self, entry: EntryRef, command: &Command) -> Result<Vec<Outcome>, StoreError> {
        match command {
            Command::AppendEvents(txs) => self.apply_events(entry, txs),
            Command::AppendSnapshots(records) => self.apply_snapshots(entry, records),
            Command::Schedule(_) | Command::CancelScheduled(_) | Command::PublishScheduled(_) => {
                self.apply_scheduled(entry, command)
            }
        }
    }

    /// A schedule command: the book decides (see `crate::scheduled`); a publish appends the
    /// events of the schedules it took, each a transaction of its own, in the same entry.
    fn apply_scheduled(&self, entry: EntryRef, command: &Command) -> Result<Vec<Outcome>, StoreError> {
        match self.scheduled.update(|book| book.apply(command)) {
            crate::scheduled::Applied::Nothing => Ok(Vec::new()),
            crate::scheduled::Applied::Outcome(outcome) => Ok(vec![outcome]),
            crate::scheduled::Applied::Publish(events) => {
                let txs: Vec<Transaction> = events
                    .iter()
                    .flatten()
                    .map(|record| Transaction {
                        events: vec![record.clone()],
                    })
                    .collect();
                let mut stored = self.apply_events(entry, &txs)?.into_iter();
                Ok(events
                    .iter()
                    .map(|e| match e {
                        Some(_) => stored.next().unwrap_or(Outcome::NotPending),
                        None => Outcome::NotPending,
                    })
                    .collect())
            }
        }
    }

    fn apply_events(&self, entry: EntryRef, txs: &[Transaction]) -> Result<Vec<Outcome>, StoreError> {
        // Sequences stored by earlier transactions of this same entry.
        let mut batch: HashMap<&str, i64> = HashMap::new();
        let mut stored: Vec<&EventRecord> = Vec::new();
        let mut outcomes = Vec::with_capacity(txs.len());
        let mut next_token = self.events.next_token();
        for tx in txs {
            let mut seen: HashMap<&str, i64> = HashMap::new();
            let mut rejected = None;
            for event in tx.events.iter().filter(|e| e.indexed) {
                let id = event.aggregate_id.as_str();
                let last = match seen.get(id).or_else(|| batch.get(id)) {
                    Some(seq) => Some(*seq),
                    None => self.events.last_sequence(id)?,
                };
                let expected = last.map_or(0, |s| s + 1);
                if event.sequence != expected {
                    rejected = Some(Outcome::InvalidSequence {
                        aggregate_id: id.to_owned(),
                        got: event.sequence,
                        expected,
                    });
                    break;
                }
                seen.insert(id, event.sequence);
            }
            match rejected {
                Some(outcome) => outcomes.push(outcome),
                None => {
                    batch.extend(seen);
                    stored.extend(&tx.events);
                    outcomes.push(Outcome::Stored {
                        first_token: next_token,
                        count: tx.events.len() as u32,
                    });
                    next_token += tx.events.len() as i64;
                }
            }
        }
        if !stored.is_empty() {
            let items: Vec<(&[u8], Indexed)> = stored.iter().map(|r| (&r.encoded[..], indexed(r))).collect();
            self.events.append(entry, &items)?;
        }
        Ok(outcomes)
    }

    fn apply_snapshots(&self, entry: EntryRef, records: &[EventRecord]) -> Result<Vec<Outcome>, StoreError> {
        let mut outcomes = Vec::with_capacity(records.len());
        let mut stored = Vec::new();
        let mut next_token = self.snapshots.next_token();
        for record in records {
            let highest = self.events.last_sequence(&record.aggregate_id)?.unwrap_or(-1);
            if record.sequence > highest {
                outcomes.push(Outcome::SnapshotAheadOfEvents {
                    aggregate_id: record.aggregate_id.clone(),
                    highest,
                    snapshot: record.sequence,
                });
            } else {
                stored.push(record);
                outcomes.push(Outcome::Stored {
                    first_token: next_token,
                    count: 1,
                });
                next_token += 1;
            }
        }
        if !stored.is_empty() {
            let items: Vec<(&[u8], Indexed)> = stored.iter().map(|r| (&r.encoded[..], indexed(r))).collect();
            self.snapshots.append(entry, &items)?;
        }
        Ok(outcomes)
    }

    /// Puts the stores received in `staging` (complete and marked ready) in the place of this
    /// context's own, and reopens them; see `crate::install` for what holds across a crash.
    /// Blocking file I/O.
    pub fn install(&self, staging: crate::install::Staging) -> Result<(), StoreError> {
        for (store, live) in [("events", &self.events), ("snapshots", &self.snapshots)] {
            let (staged, trash) = staging.store_dirs(store);
            live.replace_with(&staged, &trash)?;
            crate::crash::point("install-after-store");
        }
        staging.finish()
    }

    /// Makes both stores durable (before the Raft log may be purged behind them).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.events.sync()?;
        self.snapshots.sync()
    }
}

fn indexed(record: &EventRecord) -> Indexed<'_> {
    Indexed {
        aggregate_id: &record.aggregate_id,
        sequence: record.sequence,
        indexed: record.indexed,
    }
}
