//! Tracking streams (`ListEvents`): events in token order from a client's token, sent only
//! against permits the client grants, then tailing new events as they are committed.
//!
//! Flow control is Axon's: the first request names the start token (inclusive) and the initial
//! permits; later requests add permits and blacklist payload types. One event sent consumes one
//! permit; at zero permits nothing is sent. Blacklisted events are skipped without consuming
//! permits, but after `BLACKLIST_SEND_AFTER` skips in a row one is sent anyway so the client's
//! token advances. A client that stays at zero permits for `PERMITS_TIMEOUT` is disconnected.
//! Memory per stream is bounded by the read batch (plus the rest of its last record), the
//! outgoing queue and the blacklist's bound (`BLACKLIST_ENTRIES`, `BLACKLIST_BYTES`; entries
//! beyond it are ignored), whatever the client does.
//!
//! Events are never decoded here: each is sent as the stored bytes (slices of the read buffer),
//! several to a message (`EncodedEventsWithToken`), and the payload type a blacklist needs is
//! read by a field scan of those bytes.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use myelin_proto::axon::event::GetEventsRequest;
use myelin_proto::encoded;
use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::{EncodedEventWithToken, EncodedEventsWithToken};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::context::Context;
use crate::segment::{ReadBuffers, SegmentStore, StoreError, TokenAt};

const READ_BATCH: usize = 1024;
const READ_BYTES: usize = 1 << 20;
/// A message to the router carries at most this many events and about this many bytes: large
/// enough that the per-message cost vanishes, small enough to keep the stream moving.
const MESSAGE_EVENTS: usize = 256;
const MESSAGE_BYTES: usize = 64 << 10;
/// Messages queued for the router per stream.
const OUT_QUEUE: usize = 8;
const BLACKLIST_SEND_AFTER: u32 = 1000;
const PERMITS_TIMEOUT: Duration = Duration::from_secs(120);
/// Permits beyond this are not counted (a client sending huge grants must not overflow).
const MAX_PERMITS: i64 = 1 << 40;

type Out = mpsc::Sender<Result<EncodedEventsWithToken, Status>>;

/// Reads the first request, checks it, and starts the stream's task.
/// The first request of a `ListEvents` stream: where to start, the first permits, and whether
/// the stream must first see everything the leader has committed (`force_read_from_leader`).
pub async fn first_request(requests: &mut Streaming<GetEventsRequest>) -> Result<GetEventsRequest, Status> {
    // A first request that does not decode is reported as such (the `?`), not as a missing one.
    requests
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("ListEvents needs a first request"))
}

pub fn start(
    context: Arc<Context>,
    first: GetEventsRequest,
    requests: Streaming<GetEventsRequest>,
    bound: BlacklistBound,
) -> Result<mpsc::Receiver<Result<EncodedEventsWithToken, Status>>, Status> {
    let first_token = context.stored.events.first_token();
    if first.tracking_token < first_token {
        return Err(ErrorCode::Other.status(format!(
            "{}: token {} before start of event store",
            context.name, first.tracking_token
        )));
    }
    let (tx, rx) = mpsc::channel(OUT_QUEUE);
    let span = tracing::info_span!("list_events", context = %context.name, client = %first.client_id);
    tokio::spawn(tracing::Instrument::instrument(
        run(context, first, requests, tx, bound),
        span,
    ));
    Ok(rx)
}

struct Tracker {
    next: i64,
    permits: i64,
    blacklist: Blacklist,
    skipped_in_a_row: u32,
}

impl Tracker {
    fn grant(&mut self, request: &GetEventsRequest) {
        self.permits = (self.permits + request.number_of_permits.max(0)).min(MAX_PERMITS);
        for p in &request.blacklist {
            self.blacklist.insert(p.r#type.as_bytes(), p.revision.as_bytes());
        }
    }

    /// Whether the event is sent: not blacklisted, or the one sent anyway after a run of skips.
    /// Consumes a permit when it is.
    fn admits(&mut self, event: &[u8]) -> Result<bool, encoded::Malformed> {
        if !self.blacklist.is_empty() && self.skipped_in_a_row < BLACKLIST_SEND_AFTER {
            let (kind, revision) = encoded::payload_type(event)?;
            if self.blacklist.contains(kind, revision) {
                self.skipped_in_a_row += 1;
                return Ok(false);
            }
        }
        self.skipped_in_a_row = 0;
        self.permits -= 1;
        Ok(true)
    }
}

/// Payload types (type, revision) a client does not want, looked up by the bytes of an encoded
/// event without allocating.
///
/// Bounded per stream by a [`BlacklistBound`] (`myelin.limits.blacklist-entries` and
/// `myelin.limits.blacklist-bytes`, by default `BLACKLIST_ENTRIES` and `BLACKLIST_BYTES`);
/// entries beyond either are ignored, with one warning per stream. A blacklist only spares the
/// client events it would skip anyway (Axon Framework drops events it has no handler for), so
/// ignoring an entry costs some traffic, never correctness; refusing the stream instead would
/// make a client that sends its whole blacklist again on reconnect fail for ever.
#[derive(Default)]
struct Blacklist {
    bound: BlacklistBound,
    /// `type`, 0xFF, `revision`: 0xFF never occurs in UTF-8, so the join is unambiguous.
    keys: HashSet<Vec<u8>>,
    /// Bytes of all keys.
    bytes: usize,
    /// Entries ignored for the bound.
    ignored: u64,
    scratch: Vec<u8>,
}

/// Most entries one stream's blacklist keeps: a processor blacklists the payload types it has
/// no handler for, which even a large application counts in hundreds.
pub const BLACKLIST_ENTRIES: usize = 1000;
/// Most bytes of (type, revision) one stream's blacklist keeps: 1,000 type names of a generous
/// 256 bytes each. With the set's own overhead a stream's blacklist stays under about 320 KiB.
pub const BLACKLIST_BYTES: usize = 256 << 10;

/// How much of a blacklist one tracking stream keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlacklistBound {
    pub entries: usize,
    pub bytes: usize,
}

impl Default for BlacklistBound {
    fn default() -> Self {
        BlacklistBound {
            entries: BLACKLIST_ENTRIES,
            bytes: BLACKLIST_BYTES,
        }
    }
}

impl Blacklist {
    fn key<'a>(scratch: &'a mut Vec<u8>, kind: &[u8], revision: &[u8]) -> &'a [u8] {
        scratch.clear();
        scratch.extend_from_slice(kind);
        scratch.push(0xFF);
        scratch.extend_from_slice(revision);
        scratch
    }

    /// Adds an entry unless that would pass the bound; returns whether it is (now) kept.
    fn insert(&mut self, kind: &[u8], revision: &[u8]) -> bool {
        let key = Blacklist::key(&mut self.scratch, kind, revision);
        if self.keys.contains(key) {
            return true;
        }
        if self.keys.len() >= self.bound.entries || self.bytes + key.len() > self.bound.bytes {
            if self.ignored == 0 {
                tracing::warn!(
                    entries = self.keys.len(),
                    bytes = self.bytes,
                    "blacklist bound reached: further entries of this stream are ignored (their events are sent)"
                );
            }
            self.ignored += 1;
            return false;
        }
        self.bytes += key.len();
        self.keys.insert(key.to_vec());
        true
    }

    fn contains(&mut self, kind: &[u8], revision: &[u8]) -> bool {
        let key = Blacklist::key(&mut self.scratch, kind, revision);
        self.keys.contains(key)
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Collects the events of a read into messages of `MESSAGE_EVENTS` / `MESSAGE_BYTES`.
struct Message {
    events: Vec<EncodedEventWithToken>,
    bytes: usize,
    /// Events a new message makes room for.
    capacity: usize,
}

impl Message {
    fn for_read(events: usize) -> Message {
        Message {
            events: Vec::new(),
            bytes: 0,
            capacity: events.min(MESSAGE_EVENTS),
        }
    }

    /// Adds an event; returns a full message to send.
    fn push(&mut self, token: i64, event: Bytes) -> Option<EncodedEventsWithToken> {
        if self.events.is_empty() {
            self.events.reserve(self.capacity);
        }
        self.bytes += event.len();
        self.events.push(EncodedEventWithToken {
            token,
            event: Some(event),
        });
        (self.events.len() >= MESSAGE_EVENTS || self.bytes >= MESSAGE_BYTES).then(|| self.take())
    }

    fn take(&mut self) -> EncodedEventsWithToken {
        self.bytes = 0;
        EncodedEventsWithToken {
            events: std::mem::take(&mut self.events),
        }
    }
}

async fn run(
    context: Arc<Context>,
    first: GetEventsRequest,
    mut requests: Streaming<GetEventsRequest>,
    out: Out,
    bound: BlacklistBound,
) {
    let mut tracker = Tracker {
        next: first.tracking_token,
        permits: 0,
        blacklist: Blacklist {
            bound,
            ..Blacklist::default()
        },
        skipped_in_a_row: 0,
    };
    tracker.grant(&first);
    let mut visible = context.stored.events.subscribe();
    let closed = context.closed.clone();
    let mut buffers = ReadBuffers::default();
    // Events read but not sent yet: a read takes whole records, which may hold more events
    // than the client has permits for.
    let mut pending = VecDeque::new();
    loop {
        if closed.is_cancelled() {
            // The context was deleted.
            let _ = out.send(Err(context_gone(&context))).await;
            return;
        }
        if tracker.permits == 0 {
            // Wait for permits (or the client's end, or the context's).
            let message = tokio::select! {
                _ = closed.cancelled() => continue,
                message = tokio::time::timeout(PERMITS_TIMEOUT, requests.message()) => message,
            };
            match message {
                Ok(Ok(Some(request))) => tracker.grant(&request),
                Ok(Ok(None)) | Ok(Err(_)) => return,
                Err(_) => {
                    let _ = out
                        .send(Err(ErrorCode::Other.status(format!(
                            "{}: Timeout waiting for permits from client {}",
                            context.name, first.client_id
                        ))))
                        .await;
                    return;
                }
            }
            continue;
        }
        if pending.is_empty() {
            let want = tracker.permits.min(READ_BATCH as i64) as usize;
            let stored = context.stored.clone();
            let from = tracker.next;
            let mut lent = std::mem::take(&mut buffers);
            let batch = tokio::task::spawn_blocking(move || {
                let batch = stored.events.read_from_with(from, want, READ_BYTES, &mut lent);
                (batch, lent)
            })
            .await;
            match batch {
                Ok((Ok(batch), lent)) => {
                    // A stream that caught up keeps no buffers while it waits.
                    if !batch.is_empty() {
                        buffers = lent;
                    }
                    pending.extend(batch);
                }
                Ok((Err(e), _)) => {
                    let _ = out.send(Err(read_error(e))).await;
                    return;
                }
                Err(e) => {
                    let _ = out.send(Err(Status::internal(format!("read task failed: {e}")))).await;
                    return;
                }
            }
        }
        if pending.is_empty() {
            // Caught up: wait for new events, more requests, or the client's end.
            tokio::select! {
                _ = closed.cancelled() => {}
                changed = visible.changed() => if changed.is_err() { return },
                message = requests.message() => match message {
                    Ok(Some(request)) => tracker.grant(&request),
                    // Half-close: the client is done; Axon completes the stream normally.
                    Ok(None) => return,
                    Err(_) => return,
                },
                _ = out.closed() => return,
            }
            continue;
        }
        let mut message = Message::for_read(pending.len());
        while tracker.permits > 0 {
            let Some((token, event)) = pending.pop_front() else {
                break;
            };
            tracker.next = token + 1;
            match tracker.admits(&event) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    let _ = out
                        .send(Err(ErrorCode::DatafileReadError.status(format!("event {token}: {e}"))))
                        .await;
                    return;
                }
            }
            if let Some(full) = message.push(token, event)
                && out.send(Ok(full)).await.is_err()
            {
                return;
            }
        }
        if !message.events.is_empty() && out.send(Ok(message.take())).await.is_err() {
            return;
        }
        // Pick up permit grants that arrived meanwhile without blocking.
        loop {
            match futures::FutureExt::now_or_never(requests.message()) {
                Some(Ok(Some(request))) => tracker.grant(&request),
                // Half-close: the client is done; Axon completes the stream normally.
                Some(Ok(None)) | Some(Err(_)) => return,
                None => break,
            }
        }
    }
}

fn context_gone(context: &Context) -> Status {
    ErrorCode::ContextNotFound.status(format!("{}: context not found", context.name))
}

fn read_error(e: StoreError) -> Status {
    crate::service::storage_status(e)
}

/// The first token (in token order) whose event has a timestamp at or after `instant` (ms); the
/// next token when every event is older; -1 for an empty store (as Axon Server answers). Reads at
/// most one record, whatever the size of the store (see [`SegmentStore::token_at`]).
///
/// Clients set timestamps and need not keep them in order. This answer is exact either way.
/// Axon Server walks its segments newest first and takes the first one whose first event is not
/// after the instant: with timestamps in order both answers are the same; with timestamps out of
/// order Axon Server may answer a later token than this.
pub fn token_at(store: &SegmentStore, instant: i64) -> Result<TokenAt, StoreError> {
    if store.next_token() == store.first_token() {
        return Ok(TokenAt {
            token: -1,
            records_read: 0,
        });
    }
    store.token_at(instant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use myelin_proto::axon::SerializedObject;
    use myelin_proto::axon::event::{Event, PayloadDescription};
    use prost::Message as _;

    fn event(kind: &str, revision: &str) -> Vec<u8> {
        Event {
            message_identifier: "m".into(),
            payload: Some(SerializedObject {
                r#type: kind.into(),
                revision: revision.into(),
                data: Bytes::from_static(b"data"),
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn tracker(permits: i64, blacklist: &[(&str, &str)]) -> Tracker {
        let mut tracker = Tracker {
            next: 0,
            permits: 0,
            blacklist: Blacklist::default(),
            skipped_in_a_row: 0,
        };
        tracker.grant(&GetEventsRequest {
            number_of_permits: permits,
            blacklist: blacklist
                .iter()
                .map(|(t, r)| PayloadDescription {
                    r#type: (*t).into(),
                    revision: (*r).into(),
                })
                .collect(),
            ..Default::default()
        });
        tracker
    }

    #[test]
    fn blacklisted_types_are_skipped_without_permits_by_type_and_revision() {
        let mut tracker = tracker(10, &[("Noise", "1"), ("Quiet", "")]);
        assert!(!tracker.admits(&event("Noise", "1")).unwrap());
        assert!(!tracker.admits(&event("Quiet", "")).unwrap());
        assert_eq!(tracker.permits, 10);
        // Another revision, another type, or a type that only prefixes a blacklisted one.
        for (kind, revision) in [
            ("Noise", "2"),
            ("Noise", ""),
            ("Signal", "1"),
            ("Nois", "e1"),
            ("Quiet", "1"),
        ] {
            assert!(tracker.admits(&event(kind, revision)).unwrap(), "{kind}/{revision}");
        }
        assert_eq!(tracker.permits, 5);
    }

    #[test]
    fn one_is_sent_anyway_after_a_run_of_skips() {
        let mut tracker = tracker(5, &[("Noise", "")]);
        let noise = event("Noise", "");
        for _ in 0..2 {
            for i in 0..BLACKLIST_SEND_AFTER {
                assert!(!tracker.admits(&noise).unwrap(), "skip {i}");
            }
            assert!(tracker.admits(&noise).unwrap());
        }
        assert_eq!(tracker.permits, 3);
    }

    #[test]
    fn the_blacklist_is_bounded_in_entries_and_bytes_and_ignores_the_rest() {
        let mut blacklist = Blacklist::default();
        for i in 0..BLACKLIST_ENTRIES + 500 {
            let kept = blacklist.insert(format!("Type{i}").as_bytes(), b"1");
            assert_eq!(kept, i < BLACKLIST_ENTRIES, "entry {i}");
        }
        assert_eq!(blacklist.keys.len(), BLACKLIST_ENTRIES);
        assert_eq!(blacklist.ignored, 500);
        // Kept entries still filter, and sending one again does not count as new.
        assert!(blacklist.insert(b"Type7", b"1"));
        assert!(blacklist.contains(b"Type7", b"1"));
        assert!(!blacklist.contains(b"Type1200", b"1"));

        // Long names reach the byte bound first.
        let mut blacklist = Blacklist::default();
        let long = "T".repeat(4096);
        let mut kept = 0;
        for i in 0..200 {
            if blacklist.insert(format!("{long}{i}").as_bytes(), b"") {
                kept += 1;
            }
        }
        assert!(blacklist.bytes <= BLACKLIST_BYTES);
        assert_eq!(kept, BLACKLIST_BYTES / (long.len() + 4));
        // An event of an ignored type is sent (and takes a permit).
        let mut tracker = tracker(2, &[]);
        tracker.blacklist = blacklist;
        assert!(tracker.admits(&event(&format!("{long}199"), "")).unwrap());
        assert!(!tracker.admits(&event(&format!("{long}0"), "")).unwrap());
    }

    #[test]
    fn a_damaged_event_is_an_error_only_when_its_type_matters() {
        let damaged = [0x32, 0x05, 0x0a];
        assert!(tracker(1, &[]).admits(&damaged).unwrap());
        assert!(tracker(1, &[("Noise", "")]).admits(&damaged).is_err());
    }

    #[test]
    fn messages_are_cut_by_count_and_by_bytes() {
        let mut message = Message::for_read(1000);
        let full: Vec<_> = (0..600)
            .filter_map(|t| message.push(t, Bytes::from_static(b"e")))
            .collect();
        assert_eq!(full.iter().map(|m| m.events.len()).collect::<Vec<_>>(), vec![256, 256]);
        assert_eq!(message.take().events.len(), 88);
        let big = Bytes::from(vec![0u8; MESSAGE_BYTES / 2]);
        assert!(message.push(0, big.clone()).is_none());
        let cut = message.push(1, big).expect("full by bytes");
        assert_eq!(cut.events[1].token, 1);
        assert!(message.events.is_empty());
    }
}
