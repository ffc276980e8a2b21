//! The scheduled events of a context (Axon's `EventScheduler`): replicated state of the
//! context's Raft group, next to its event and snapshot segments.
//!
//! The book of pending schedules changes only by applying committed entries
//! ([`Command::Schedule`], [`Command::CancelScheduled`], [`Command::PublishScheduled`]), in the
//! same order on every member, by rules that read nothing but the book and the entry: every
//! replica holds the same book after the same entry. The leader's timer (`crate::publisher`)
//! only proposes; whether a schedule is published is decided here, when its publish applies.
//!
//! Durability: the book lives in memory and is written into each Raft snapshot's pointer
//! (`snapshot.json`, see `consensus::state_machine`), exact at the snapshot's last entry. At start
//! it is read from there and the entries after that snapshot are replayed from the Raft log
//! (which openraft never purges past its snapshot), schedule changes only; the entries the
//! segments do not hold yet are then applied as usual. A member that receives a snapshot gets the
//! book inside its pointer, and a backup carries the pointer with the log.
//!
//! Bounds: at most [`MAX_PENDING`] schedules and [`MAX_PENDING_BYTES`] bytes of their events per
//! context (checked when a schedule applies, so the same on every member), which also keeps the
//! pointer (sent as a whole in a snapshot stream's manifest) well under its 64 MiB bound.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::command::{Command, EventRecord, Outcome, Scheduling};

/// Pending schedules a context holds at most (docs/limits.md).
pub const MAX_PENDING: u64 = 10_000;
/// Bytes of pending scheduled events a context holds at most (docs/limits.md).
pub const MAX_PENDING_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    instant: i64,
    record: EventRecord,
}

/// The pending schedules of a context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Book {
    pending: BTreeMap<String, Pending>,
    /// (instant, token) of every pending schedule: the due ones first.
    by_time: BTreeSet<(i64, String)>,
    bytes: u64,
}

fn size(record: &EventRecord) -> u64 {
    record.encoded.len() as u64
}

impl Book {
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Keeps `s` (after removing the schedule it replaces), unless that would pass a bound; then
    /// nothing changes.
    pub fn schedule(&mut self, s: &Scheduling) -> Outcome {
        let removed: BTreeSet<&str> = [s.replaces.as_str(), s.token.as_str()]
            .into_iter()
            .filter(|t| !t.is_empty() && self.pending.contains_key(*t))
            .collect();
        let count_after = self.pending.len() as u64 - removed.len() as u64 + 1;
        let bytes_after =
            self.bytes - removed.iter().map(|t| size(&self.pending[*t].record)).sum::<u64>() + size(&s.record);
        if count_after > MAX_PENDING || bytes_after > MAX_PENDING_BYTES {
            return Outcome::TooManyScheduled {
                pending: self.pending.len() as u64,
                pending_bytes: self.bytes,
            };
        }
        if !s.replaces.is_empty() {
            self.take(&s.replaces);
        }
        self.take(&s.token);
        self.bytes += size(&s.record);
        self.by_time.insert((s.instant, s.token.clone()));
        self.pending.insert(
            s.token.clone(),
            Pending {
                instant: s.instant,
                record: s.record.clone(),
            },
        );
        Outcome::Scheduled
    }

    /// Removes a pending schedule and returns its event; `None` if it is not pending.
    pub fn take(&mut self, token: &str) -> Option<EventRecord> {
        let pending = self.pending.remove(token)?;
        self.by_time.remove(&(pending.instant, token.to_owned()));
        self.bytes -= size(&pending.record);
        Some(pending.record)
    }

    /// Tokens of up to `max` schedules due at `now` (Unix milliseconds), earliest first.
    pub fn due(&self, now: i64, max: usize) -> Vec<String> {
        self.by_time
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(max)
            .map(|(_, token)| token.clone())
            .collect()
    }

    /// When the earliest pending schedule is due.
    pub fn next_instant(&self) -> Option<i64> {
        self.by_time.first().map(|(at, _)| *at)
    }

    /// Bytes of the events of those of `tokens` that are pending.
    pub fn bytes_of(&self, tokens: &[String]) -> u64 {
        tokens
            .iter()
            .filter_map(|t| self.pending.get(t))
            .map(|p| size(&p.record))
            .sum()
    }

    /// Whether `token` is pending.
    pub fn contains(&self, token: &str) -> bool {
        self.pending.contains_key(token)
    }

    /// Applies the schedule part of `command`; for a publish, returns the events to append, one
    /// per token (`None` for a token no longer pending). Other commands change nothing.
    pub fn apply(&mut self, command: &Command) -> Applied {
        match command {
            Command::Schedule(s) => Applied::Outcome(self.schedule(s)),
            Command::CancelScheduled(token) => {
                self.take(token);
                Applied::Outcome(Outcome::NotPending)
            }
            Command::PublishScheduled(tokens) => Applied::Publish(tokens.iter().map(|t| self.take(t)).collect()),
            Command::AppendEvents(_) | Command::AppendSnapshots(_) => Applied::Nothing,
        }
    }
}

/// What applying a command did to the book.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Not a schedule command.
    Nothing,
    Outcome(Outcome),
    /// The events of a publish, in the order of its tokens.
    Publish(Vec<Option<EventRecord>>),
}

/// The book as a snapshot pointer holds it: events as hex text (JSON would otherwise spend a
/// number and a comma per byte).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PersistedSchedule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedSchedule {
    pub token: String,
    pub instant: i64,
    pub aggregate_id: String,
    pub sequence: i64,
    /// The encoded event, in hex.
    pub event: String,
}

impl From<&Book> for Persisted {
    fn from(book: &Book) -> Persisted {
        Persisted {
            pending: book
                .pending
                .iter()
                .map(|(token, p)| PersistedSchedule {
                    token: token.clone(),
                    instant: p.instant,
                    aggregate_id: p.record.aggregate_id.clone(),
                    sequence: p.record.sequence,
                    event: hex(&p.record.encoded),
                })
                .collect(),
        }
    }
}

/// A persisted book that does not read back: a damaged pointer.
#[derive(Debug, thiserror::Error)]
#[error("scheduled event {0} in the snapshot pointer is not valid hex")]
pub struct BadPersisted(String);

impl TryFrom<&Persisted> for Book {
    type Error = BadPersisted;

    fn try_from(persisted: &Persisted) -> Result<Book, BadPersisted> {
        let mut book = Book::default();
        for s in &persisted.pending {
            let encoded = unhex(&s.event).ok_or_else(|| BadPersisted(s.token.clone()))?;
            let record = EventRecord {
                aggregate_id: s.aggregate_id.clone(),
                sequence: s.sequence,
                indexed: false,
                encoded,
            };
            book.bytes += size(&record);
            book.by_time.insert((s.instant, s.token.clone()));
            book.pending.insert(
                s.token.clone(),
                Pending {
                    instant: s.instant,
                    record,
                },
            );
        }
        Ok(book)
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

fn unhex(text: &str) -> Option<Bytes> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let raw = text.as_bytes();
    if !raw.len().is_multiple_of(2) {
        return None;
    }
    raw.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect::<Option<Vec<u8>>>()
        .map(Bytes::from)
}

/// A context's book, shared by its state machine (which changes it) and the leader's timer
/// (which reads it), with a signal for every change.
pub struct Shelf {
    book: parking_lot::Mutex<Book>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for Shelf {
    fn default() -> Shelf {
        Shelf {
            book: parking_lot::Mutex::new(Book::default()),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Shelf {
    /// Runs `f` on the book and signals a change.
    pub fn update<T>(&self, f: impl FnOnce(&mut Book) -> T) -> T {
        let result = f(&mut self.book.lock());
        self.changed.send_modify(|n| *n += 1);
        result
    }

    /// Reads the book.
    pub fn read<T>(&self, f: impl FnOnce(&Book) -> T) -> T {
        f(&self.book.lock())
    }

    /// Puts `book` in the place of the current one (at start, and when a snapshot is installed).
    pub fn replace(&self, book: Book) {
        self.update(|current| *current = book);
    }

    /// The book as a snapshot pointer holds it.
    pub fn persisted(&self) -> Persisted {
        self.read(|book| Persisted::from(book))
    }

    /// Changes after the moment of the call.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u8, len: usize) -> EventRecord {
        EventRecord {
            aggregate_id: String::new(),
            sequence: 0,
            indexed: false,
            encoded: Bytes::from(vec![n; len]),
        }
    }

    fn scheduling(token: &str, instant: i64, replaces: &str) -> Scheduling {
        Scheduling {
            token: token.into(),
            instant,
            replaces: replaces.into(),
            record: event(token.len() as u8, 10),
        }
    }

    #[test]
    fn schedule_reschedule_cancel_and_due_order() {
        let mut book = Book::default();
        assert_eq!(book.schedule(&scheduling("a", 300, "")), Outcome::Scheduled);
        assert_eq!(book.schedule(&scheduling("b", 100, "")), Outcome::Scheduled);
        assert_eq!(book.schedule(&scheduling("c", 200, "a")), Outcome::Scheduled);
        assert!(!book.contains("a"));
        assert_eq!(book.due(250, 10), vec!["b", "c"]);
        assert_eq!(book.due(250, 1), vec!["b"]);
        assert_eq!(book.next_instant(), Some(100));
        // Rescheduling a token that is not pending (published, cancelled, unknown) still schedules.
        assert_eq!(book.schedule(&scheduling("d", 50, "gone")), Outcome::Scheduled);
        assert_eq!(
            book.apply(&Command::CancelScheduled("b".into())),
            Applied::Outcome(Outcome::NotPending)
        );
        assert_eq!(
            book.apply(&Command::CancelScheduled("b".into())),
            Applied::Outcome(Outcome::NotPending)
        );
        assert_eq!(book.due(i64::MAX, 10), vec!["d", "c"]);
        assert_eq!(book.bytes, 20);
    }

    #[test]
    fn publish_takes_pending_ones_only_and_a_cancel_after_it_changes_nothing() {
        let mut book = Book::default();
        book.schedule(&scheduling("a", 1, ""));
        book.schedule(&scheduling("b", 2, ""));
        book.apply(&Command::CancelScheduled("b".into()));
        let Applied::Publish(events) = book.apply(&Command::PublishScheduled(vec!["a".into(), "b".into()])) else {
            panic!("a publish")
        };
        assert_eq!(events, vec![Some(event(1, 10)), None]);
        // Published: a second publish (a new leader's timer) and a cancel find nothing.
        let Applied::Publish(again) = book.apply(&Command::PublishScheduled(vec!["a".into()])) else {
            panic!("a publish")
        };
        assert_eq!(again, vec![None]);
        assert_eq!(
            book.apply(&Command::CancelScheduled("a".into())),
            Applied::Outcome(Outcome::NotPending)
        );
        assert!(book.is_empty());
        assert_eq!(book.bytes, 0);
    }

    #[test]
    fn bounds_refuse_without_changing_anything() {
        let mut book = Book::default();
        for i in 0..MAX_PENDING {
            assert_eq!(book.schedule(&scheduling(&format!("t{i}"), 5, "")), Outcome::Scheduled);
        }
        let before = book.clone();
        assert!(matches!(
            book.schedule(&scheduling("one-more", 5, "")),
            Outcome::TooManyScheduled { .. }
        ));
        assert_eq!(book, before);
        // Replacing one keeps the count: allowed.
        assert_eq!(book.schedule(&scheduling("swap", 5, "t0")), Outcome::Scheduled);
        assert_eq!(book.len() as u64, MAX_PENDING);

        let mut book = Book::default();
        let big = |token: &str| Scheduling {
            record: event(1, (MAX_PENDING_BYTES / 2) as usize),
            ..scheduling(token, 1, "")
        };
        assert_eq!(book.schedule(&big("x")), Outcome::Scheduled);
        assert_eq!(book.schedule(&big("y")), Outcome::Scheduled);
        assert!(matches!(book.schedule(&big("z")), Outcome::TooManyScheduled { .. }));
        assert!(book.contains("x") && book.contains("y") && !book.contains("z"));
    }

    #[test]
    fn persisted_round_trip() {
        let mut book = Book::default();
        book.schedule(&scheduling("a", 3, ""));
        book.schedule(&Scheduling {
            record: EventRecord {
                aggregate_id: "agg".into(),
                sequence: 4,
                indexed: false,
                encoded: Bytes::from_static(&[0, 1, 0xab, 0xff]),
            },
            ..scheduling("b", -1, "")
        });
        let persisted = Persisted::from(&book);
        let json = serde_json::to_string(&persisted).unwrap();
        let back: Persisted = serde_json::from_str(&json).unwrap();
        assert_eq!(Book::try_from(&back).unwrap(), book);
        assert_eq!(serde_json::to_string(&Persisted::default()).unwrap(), "{}");
        let mut bad = persisted;
        bad.pending[0].event = "zz".into();
        assert!(Book::try_from(&bad).is_err());
    }
}
