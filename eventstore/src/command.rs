//! What a Raft log entry of a context carries, and its compact binary form.
//!
//! A `Command` is proposed by the context's leader and applied by every replica. Apply must be a
//! deterministic function of (state, command), so each event travels with the facts apply needs
//! (aggregate id, sequence number, whether it is indexed) next to its encoded protobuf bytes; apply
//! never has to decode a payload.
//!
//! The binary form is ours (not serde) because entries are written to the log on the hot path:
//! length-prefixed fields, little-endian integers, no per-field allocation on encode.

use bytes::{Buf, BufMut, Bytes};
use serde::{Deserialize, Serialize};

/// One stored event (or snapshot) as the log and the segments hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Aggregate identifier; empty for an event that belongs to no aggregate.
    pub aggregate_id: String,
    /// The event's aggregate sequence number as the client sent it.
    pub sequence: i64,
    /// Whether the event takes part in aggregate sequence checks and the aggregate index. Axon
    /// indexes only events that name an aggregate type.
    pub indexed: bool,
    /// The `io.axoniq.axonserver.grpc.event.Event` message, protobuf-encoded.
    pub encoded: Bytes,
}

/// A client's transaction: all of its events are stored, or none.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Transaction {
    pub events: Vec<EventRecord>,
}

/// The application data of a Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A batch of event transactions from concurrent clients (group commit): one entry, one log
    /// write, one fsync for all of them. Each transaction still succeeds or fails on its own.
    AppendEvents(Vec<Transaction>),
    /// A batch of snapshots, each validated and stored on its own.
    AppendSnapshots(Vec<EventRecord>),
    /// Axon's ScheduleEvent and RescheduleEvent: keeps `record` to be appended at `instant`,
    /// after cancelling `replaces` (if still pending) in the same step. The token is chosen by
    /// the member that took the request, so the entry (and its re-application) names it.
    Schedule(Scheduling),
    /// Axon's CancelScheduledEvent: removes a pending schedule; one already published, or
    /// never known, is left as it is (Axon answers success either way).
    CancelScheduled(String),
    /// Proposed by the leader's timer: appends the events of these due schedules, each as a
    /// transaction of its own, and removes them, in one entry, so that a leader change can
    /// neither publish one twice nor lose one. A token no longer pending is skipped.
    PublishScheduled(Vec<String>),
}

/// An event to append later (see [`Command::Schedule`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scheduling {
    /// The opaque token the client gets back and may cancel with.
    pub token: String,
    /// When to append it: Unix time in milliseconds.
    pub instant: i64,
    /// The schedule this one takes the place of; empty for none.
    pub replaces: String,
    /// The event; never indexed (an event of no aggregate).
    pub record: EventRecord,
}

/// The outcome of applying one transaction or snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Stored; events got the tokens `first_token .. first_token + count`.
    Stored { first_token: i64, count: u32 },
    /// Rejected by the aggregate sequence check; nothing of it was stored.
    InvalidSequence {
        aggregate_id: String,
        got: i64,
        expected: i64,
    },
    /// A snapshot whose sequence number is above the aggregate's highest event.
    SnapshotAheadOfEvents {
        aggregate_id: String,
        highest: i64,
        snapshot: i64,
    },
    /// A schedule was kept (or replaced another).
    Scheduled,
    /// A schedule was refused: the context holds as many pending schedules (or bytes of them)
    /// as it may; nothing changed, the schedule it would have replaced is still pending.
    TooManyScheduled { pending: u64, pending_bytes: u64 },
    /// A cancel was applied, or a due schedule was no longer pending when its publish applied.
    NotPending,
}

/// What applying an entry returned: one outcome per transaction (or snapshot), in order.
/// Entries without application data (blank, membership) return an empty list.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CommandResult {
    pub outcomes: Vec<Outcome>,
}

/// A command could not be decoded: the bytes are not what `Command::encode` wrote.
#[derive(Debug, thiserror::Error)]
#[error("corrupt command encoding: {0}")]
pub struct DecodeError(&'static str);

const TAG_EVENTS: u8 = 1;
const TAG_SNAPSHOTS: u8 = 2;
const TAG_SCHEDULE: u8 = 3;
const TAG_CANCEL_SCHEDULED: u8 = 4;
const TAG_PUBLISH_SCHEDULED: u8 = 5;

impl Command {
    /// Appends the binary form of this command to `buf`.
    pub fn encode(&self, buf: &mut impl BufMut) {
        match self {
            Command::AppendEvents(txs) => {
                buf.put_u8(TAG_EVENTS);
                buf.put_u32_le(txs.len() as u32);
                for tx in txs {
                    buf.put_u32_le(tx.events.len() as u32);
                    for event in &tx.events {
                        encode_record(event, buf);
                    }
                }
            }
            Command::AppendSnapshots(records) => {
                buf.put_u8(TAG_SNAPSHOTS);
                buf.put_u32_le(records.len() as u32);
                for record in records {
                    encode_record(record, buf);
                }
            }
            Command::Schedule(s) => {
                buf.put_u8(TAG_SCHEDULE);
                encode_str(&s.token, buf);
                buf.put_i64_le(s.instant);
                encode_str(&s.replaces, buf);
                encode_record(&s.record, buf);
            }
            Command::CancelScheduled(token) => {
                buf.put_u8(TAG_CANCEL_SCHEDULED);
                encode_str(token, buf);
            }
            Command::PublishScheduled(tokens) => {
                buf.put_u8(TAG_PUBLISH_SCHEDULED);
                buf.put_u32_le(tokens.len() as u32);
                for token in tokens {
                    encode_str(token, buf);
                }
            }
        }
    }

    /// Upper bound of the encoded size, for buffer reservation.
    pub fn encoded_len_hint(&self) -> usize {
        let record = |r: &EventRecord| 4 + r.aggregate_id.len() + 8 + 1 + 4 + r.encoded.len();
        match self {
            Command::AppendEvents(txs) => {
                5 + txs
                    .iter()
                    .map(|tx| 4 + tx.events.iter().map(record).sum::<usize>())
                    .sum::<usize>()
            }
            Command::AppendSnapshots(records) => 5 + records.iter().map(record).sum::<usize>(),
            Command::Schedule(s) => 1 + 4 + s.token.len() + 8 + 4 + s.replaces.len() + record(&s.record),
            Command::CancelScheduled(token) => 5 + token.len(),
            Command::PublishScheduled(tokens) => 5 + tokens.iter().map(|t| 4 + t.len()).sum::<usize>(),
        }
    }

    /// Decodes a command written by [`Command::encode`]. `bytes` is shared, not copied: the
    /// records' `encoded` fields point into it.
    pub fn decode(mut bytes: Bytes) -> Result<Command, DecodeError> {
        let tag = get_u8(&mut bytes)?;
        match tag {
            TAG_EVENTS => {
                let n = get_u32(&mut bytes)? as usize;
                let mut txs = Vec::with_capacity(n.min(bytes.len()));
                for _ in 0..n {
                    let m = get_u32(&mut bytes)? as usize;
                    let mut events = Vec::with_capacity(m.min(bytes.len()));
                    for _ in 0..m {
                        events.push(decode_record(&mut bytes)?);
                    }
                    txs.push(Transaction { events });
                }
                finish(bytes, Command::AppendEvents(txs))
            }
            TAG_SNAPSHOTS => {
                let n = get_u32(&mut bytes)? as usize;
                let mut records = Vec::with_capacity(n.min(bytes.len()));
                for _ in 0..n {
                    records.push(decode_record(&mut bytes)?);
                }
                finish(bytes, Command::AppendSnapshots(records))
            }
            TAG_SCHEDULE => {
                let token = decode_str(&mut bytes)?;
                if bytes.remaining() < 8 {
                    return Err(DecodeError("short schedule"));
                }
                let instant = bytes.get_i64_le();
                let replaces = decode_str(&mut bytes)?;
                let record = decode_record(&mut bytes)?;
                finish(
                    bytes,
                    Command::Schedule(Scheduling {
                        token,
                        instant,
                        replaces,
                        record,
                    }),
                )
            }
            TAG_CANCEL_SCHEDULED => {
                let token = decode_str(&mut bytes)?;
                finish(bytes, Command::CancelScheduled(token))
            }
            TAG_PUBLISH_SCHEDULED => {
                let n = get_u32(&mut bytes)? as usize;
                let mut tokens = Vec::with_capacity(n.min(bytes.len()));
                for _ in 0..n {
                    tokens.push(decode_str(&mut bytes)?);
                }
                finish(bytes, Command::PublishScheduled(tokens))
            }
            _ => Err(DecodeError("unknown command tag")),
        }
    }
}

fn finish(rest: Bytes, command: Command) -> Result<Command, DecodeError> {
    if rest.is_empty() {
        Ok(command)
    } else {
        Err(DecodeError("trailing bytes"))
    }
}

fn encode_str(s: &str, buf: &mut impl BufMut) {
    buf.put_u32_le(s.len() as u32);
    buf.put_slice(s.as_bytes());
}

fn decode_str(bytes: &mut Bytes) -> Result<String, DecodeError> {
    let len = get_u32(bytes)? as usize;
    let raw = take(bytes, len)?;
    String::from_utf8(raw.to_vec()).map_err(|_| DecodeError("string is not UTF-8"))
}

fn encode_record(record: &EventRecord, buf: &mut impl BufMut) {
    buf.put_u32_le(record.aggregate_id.len() as u32);
    buf.put_slice(record.aggregate_id.as_bytes());
    buf.put_i64_le(record.sequence);
    buf.put_u8(u8::from(record.indexed));
    buf.put_u32_le(record.encoded.len() as u32);
    buf.put_slice(&record.encoded);
}

fn decode_record(bytes: &mut Bytes) -> Result<EventRecord, DecodeError> {
    let id_len = get_u32(bytes)? as usize;
    let id = take(bytes, id_len)?;
    let aggregate_id = String::from_utf8(id.to_vec()).map_err(|_| DecodeError("aggregate id"))?;
    if bytes.remaining() < 9 {
        return Err(DecodeError("short record"));
    }
    let sequence = bytes.get_i64_le();
    let indexed = match bytes.get_u8() {
        0 => false,
        1 => true,
        _ => return Err(DecodeError("indexed flag")),
    };
    let len = get_u32(bytes)? as usize;
    let encoded = take(bytes, len)?;
    Ok(EventRecord {
        aggregate_id,
        sequence,
        indexed,
        encoded,
    })
}

fn get_u8(bytes: &mut Bytes) -> Result<u8, DecodeError> {
    if bytes.remaining() < 1 {
        return Err(DecodeError("short input"));
    }
    Ok(bytes.get_u8())
}

fn get_u32(bytes: &mut Bytes) -> Result<u32, DecodeError> {
    if bytes.remaining() < 4 {
        return Err(DecodeError("short input"));
    }
    Ok(bytes.get_u32_le())
}

fn take(bytes: &mut Bytes, len: usize) -> Result<Bytes, DecodeError> {
    if bytes.remaining() < len {
        return Err(DecodeError("length beyond input"));
    }
    Ok(bytes.split_to(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, seq: i64) -> EventRecord {
        EventRecord {
            aggregate_id: id.into(),
            sequence: seq,
            indexed: !id.is_empty(),
            encoded: Bytes::from(format!("payload-{id}-{seq}")),
        }
    }

    #[test]
    fn round_trips_and_rejects_every_truncation() {
        let commands = [
            Command::AppendEvents(vec![
                Transaction {
                    events: vec![record("a", 0), record("a", 1)],
                },
                Transaction::default(),
                Transaction {
                    events: vec![record("", 0)],
                },
            ]),
            Command::AppendSnapshots(vec![record("b", 7)]),
            Command::Schedule(Scheduling {
                token: "t-1".into(),
                instant: 1_700_000_000_123,
                replaces: String::new(),
                record: EventRecord {
                    indexed: false,
                    ..record("", 0)
                },
            }),
            Command::Schedule(Scheduling {
                token: "t-2".into(),
                instant: -5,
                replaces: "t-1".into(),
                record: record("c", 3),
            }),
            Command::CancelScheduled("t-2".into()),
            Command::CancelScheduled(String::new()),
            Command::PublishScheduled(vec!["t-1".into(), "t-3".into()]),
            Command::PublishScheduled(Vec::new()),
        ];
        for command in commands {
            let mut buf = Vec::new();
            command.encode(&mut buf);
            assert!(buf.len() <= command.encoded_len_hint());
            let bytes = Bytes::from(buf);
            assert_eq!(Command::decode(bytes.clone()).unwrap(), command);
            for cut in 0..bytes.len() {
                assert!(Command::decode(bytes.slice(..cut)).is_err(), "cut at {cut}");
            }
            let mut longer = bytes.to_vec();
            longer.push(0);
            assert!(Command::decode(Bytes::from(longer)).is_err());
        }
    }
}
