//! Aggregate reads in bounded chunks.
//!
//! An aggregate's history has no size limit (one that is never snapshotted keeps growing), so a
//! read never loads it whole. A cursor remembers where the read stands — a segment and a place in
//! that segment's index entries for the aggregate, no event bytes and no copy of the index — and
//! each [`next_chunk`](AggregateEvents::next_chunk) reads about a byte budget of events. What a
//! read holds between chunks is therefore independent of the aggregate's size, and the caller
//! decides how many chunks may wait for a slow reader.
//!
//! A read sees the aggregate as it was when the cursor was made: the segments it reads are fixed
//! then, and in the segment that was open it takes only the entries stored before. So chunk by
//! chunk a cursor returns exactly what [`SegmentStore::read_aggregate`] returned at that moment,
//! whatever is appended meanwhile.
//!
//! - [`AggregateEvents`]: in storage order (ascending sequence for events).
//! - [`AggregateSnapshots`]: highest sequence first, and of equal sequences the newest first,
//!   up to a number of results. Snapshots need not be stored in sequence order, so each pass
//!   over the aggregate's index entries keeps only the next [`SNAPSHOT_PASS`] keys (a bounded
//!   heap): memory stays bounded however many snapshots an aggregate has, and a read of the
//!   newest one alone (an event-sourcing load) is one pass and one read.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fs::File;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::index::Position;
use super::store::{SegmentStore, StoreError, read_positions};

/// What an entry costs a chunk's budget beyond its bytes (its slice and framing in a message),
/// so that a chunk of tiny events is bounded in count as well.
const ENTRY_OVERHEAD: usize = 32;
/// Most snapshot keys one pass of [`AggregateSnapshots`] keeps.
pub const SNAPSHOT_PASS: usize = 1024;

/// A segment a read takes entries from: its base, and how many of the aggregate's entries in it
/// the read may take (all for a closed one; those stored before the read began for the one open
/// then).
type Segment = (i64, usize);

/// The segments holding entries of an aggregate now, oldest first.
fn segments_of(store: &SegmentStore, aggregate_id: &str) -> VecDeque<Segment> {
    let state = store.state.read();
    let mut segments: VecDeque<Segment> = store
        .candidates(&state, aggregate_id)
        .into_iter()
        .map(|(base, _)| (base, usize::MAX))
        .collect();
    if let Some(positions) = state.open.index.aggregates.get(aggregate_id) {
        segments.push_back((state.open.base, positions.len()));
    }
    segments
}

/// Calls `with` with the aggregate's entries in segment `base` (none when it has none there) and
/// returns its result with the segment's file. `None` when the segment is gone.
fn with_positions<T>(
    store: &SegmentStore,
    base: i64,
    aggregate_id: &str,
    with: impl FnOnce(&[Position]) -> T,
) -> Result<Option<(Arc<File>, PathBuf, T)>, StoreError> {
    let (file, path) = {
        let state = store.state.read();
        if state.open.base == base {
            // The open segment's index changes under the lock only; what `with` takes is bounded.
            let positions = state.open.index.aggregates.get(aggregate_id);
            let result = with(positions.map_or(&[], Vec::as_slice));
            return Ok(Some((state.open.file.clone(), state.open.path.clone(), result)));
        }
        match state.closed.get(&base) {
            Some(closed) => (closed.file.clone(), closed.path.clone()),
            None => return Ok(None),
        }
    };
    let index = store.closed_index(base)?;
    let positions = index.aggregates.get(aggregate_id);
    Ok(Some((file, path, with(positions.map_or(&[], Vec::as_slice)))))
}

/// A read of an aggregate's entries in storage order, chunk by chunk.
#[derive(Debug)]
pub struct AggregateEvents {
    aggregate_id: String,
    sequences: RangeInclusive<i64>,
    /// Segments still to read, oldest first.
    segments: VecDeque<Segment>,
    /// Where the read stands in the first of `segments`.
    next: usize,
}

impl SegmentStore {
    /// A chunked read of the aggregate's entries with a sequence in `sequences`, as the store
    /// holds them now.
    pub fn aggregate_events(&self, aggregate_id: &str, sequences: RangeInclusive<i64>) -> AggregateEvents {
        let segments = if sequences.is_empty() {
            VecDeque::new()
        } else {
            segments_of(self, aggregate_id)
        };
        AggregateEvents {
            aggregate_id: aggregate_id.to_owned(),
            sequences,
            segments,
            next: 0,
        }
    }

    /// A chunked read of the aggregate's snapshots with a sequence in `sequences`, highest first,
    /// at most `max_results` of them.
    pub fn aggregate_snapshots(
        &self,
        aggregate_id: &str,
        sequences: RangeInclusive<i64>,
        max_results: usize,
    ) -> AggregateSnapshots {
        let segments = if sequences.is_empty() || max_results == 0 {
            Vec::new()
        } else {
            segments_of(self, aggregate_id).into()
        };
        AggregateSnapshots {
            aggregate_id: aggregate_id.to_owned(),
            sequences,
            segments,
            pending: VecDeque::new(),
            below: None,
            passes_done: false,
            remaining: max_results,
            pass_keys: SNAPSHOT_PASS,
        }
    }
}

impl AggregateEvents {
    /// Whether every entry was returned.
    pub fn is_done(&self) -> bool {
        self.segments.is_empty()
    }

    /// The next entries (sequence, bytes), about `budget` bytes of them and at least one while
    /// any is left; empty at the end. Blocking file I/O.
    pub fn next_chunk(&mut self, store: &SegmentStore, budget: usize) -> Result<Vec<(i64, Bytes)>, StoreError> {
        let mut out = Vec::new();
        let mut spent = 0usize;
        while spent < budget {
            let Some(&(base, limit)) = self.segments.front() else {
                break;
            };
            let (from, sequences) = (self.next, &self.sequences);
            let picked = with_positions(store, base, &self.aggregate_id, |positions| {
                let end = positions.len().min(limit);
                let mut at = from;
                let mut picked = Vec::new();
                let mut bytes = 0usize;
                while at < end && spent + bytes < budget {
                    let p = positions[at];
                    at += 1;
                    if sequences.contains(&p.sequence) {
                        bytes += p.len as usize + ENTRY_OVERHEAD;
                        picked.push(p);
                    }
                }
                (picked, bytes, at, at >= end)
            })?;
            let Some((file, path, (picked, bytes, at, segment_done))) = picked else {
                self.segments.pop_front();
                self.next = 0;
                continue;
            };
            read_positions(&file, &path, &picked, &mut out)?;
            spent += bytes;
            if segment_done {
                self.segments.pop_front();
                self.next = 0;
            } else {
                self.next = at;
            }
        }
        Ok(out)
    }
}

/// An entry's place in the order of [`AggregateSnapshots`] (compared field by field): higher
/// sequence first, then the newer segment, then the later entry in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    sequence: i64,
    base: i64,
    at: usize,
}

/// A read of an aggregate's snapshots, highest sequence first, chunk by chunk.
#[derive(Debug)]
pub struct AggregateSnapshots {
    aggregate_id: String,
    sequences: RangeInclusive<i64>,
    segments: Vec<Segment>,
    /// Keys found by the last pass and not returned yet, first in order first.
    pending: VecDeque<Key>,
    /// The last key any pass found: the next pass looks only at keys after it in the order.
    below: Option<Key>,
    /// Whether the last pass found every key that was left.
    passes_done: bool,
    /// How many more results the read may return.
    remaining: usize,
    /// Most keys one pass keeps (`SNAPSHOT_PASS`; smaller in tests).
    pass_keys: usize,
}

impl AggregateSnapshots {
    /// Whether every result was returned.
    pub fn is_done(&self) -> bool {
        self.remaining == 0 || (self.pending.is_empty() && (self.passes_done || self.segments.is_empty()))
    }

    /// The next snapshots (sequence, bytes), about `budget` bytes of them and at least one while
    /// any is left; empty at the end. Blocking file I/O.
    pub fn next_chunk(&mut self, store: &SegmentStore, budget: usize) -> Result<Vec<(i64, Bytes)>, StoreError> {
        let mut out = Vec::new();
        let mut spent = 0usize;
        while spent < budget && !self.is_done() {
            if self.pending.is_empty() {
                self.pass(store)?;
                continue;
            }
            let key = self.pending.pop_front().expect("not empty");
            let at = key.at;
            let found = with_positions(store, key.base, &self.aggregate_id, |positions| {
                positions.get(at).copied()
            })?;
            if let Some((file, path, Some(position))) = found {
                read_positions(&file, &path, &[position], &mut out)?;
                spent += position.len as usize + ENTRY_OVERHEAD;
                self.remaining -= 1;
            }
        }
        Ok(out)
    }

    /// Finds the next keys in order after `below`, at most `SNAPSHOT_PASS` and `remaining`.
    fn pass(&mut self, store: &SegmentStore) -> Result<(), StoreError> {
        let keep = self.remaining.min(self.pass_keys);
        // The `keep` greatest keys below the last pass's, smallest on top to be dropped first.
        let mut heap: BinaryHeap<Reverse<Key>> = BinaryHeap::with_capacity(keep + 1);
        let mut found = 0usize;
        for &(base, limit) in &self.segments {
            let (sequences, below) = (&self.sequences, self.below);
            with_positions(store, base, &self.aggregate_id, |positions| {
                for (at, p) in positions.iter().enumerate().take(limit) {
                    let key = Key {
                        sequence: p.sequence,
                        base,
                        at,
                    };
                    if !sequences.contains(&p.sequence) || below.is_some_and(|below| key >= below) {
                        continue;
                    }
                    found += 1;
                    heap.push(Reverse(key));
                    if heap.len() > keep {
                        heap.pop();
                    }
                }
            })?;
        }
        let mut keys: Vec<Key> = heap.into_iter().map(|Reverse(key)| key).collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        self.below = keys.last().copied().or(self.below);
        self.passes_done = found <= keep;
        self.pending = keys.into();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::tests::{Random, append, append_at, open};

    fn text(entries: &[(i64, Bytes)]) -> Vec<(i64, String)> {
        entries
            .iter()
            .map(|(s, b)| (*s, String::from_utf8(b.to_vec()).unwrap()))
            .collect()
    }

    fn drain_events(store: &SegmentStore, mut read: AggregateEvents, budget: usize) -> Vec<(i64, Bytes)> {
        let mut out = Vec::new();
        for _ in 0..100_000 {
            let chunk = read.next_chunk(store, budget).unwrap();
            if chunk.is_empty() {
                assert!(read.is_done() || read.next_chunk(store, budget).unwrap().is_empty());
                return out;
            }
            // About the budget: whole entries, and never more than one past it.
            let cost: Vec<usize> = chunk.iter().map(|(_, b)| b.len() + ENTRY_OVERHEAD).collect();
            assert!(
                cost[..cost.len() - 1].iter().sum::<usize>() < budget,
                "{cost:?} for {budget}"
            );
            out.extend(chunk);
        }
        panic!("the read never ended");
    }

    /// Chunk by chunk, with any budget, a read returns exactly what the whole read returns,
    /// across segment boundaries and for any range.
    #[test]
    fn chunked_event_reads_return_the_whole_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 200);
        let mut next = [0i64; 3];
        for i in 0..90u64 {
            let a = (i % 3) as usize;
            let id = ["a", "b", "c"][a];
            // Records of one to three events, some of another aggregate or of none.
            let mut events = vec![(id, next[a])];
            next[a] += 1;
            if i % 4 == 0 {
                events.push((id, next[a]));
                next[a] += 1;
            }
            if i % 5 == 0 {
                events.push(("", 0));
            }
            append(&store, i + 1, &events);
        }
        assert!(store.closed_segments().len() > 10);
        for id in ["a", "b", "c", "none"] {
            let empty = RangeInclusive::new(31, 29);
            for range in [0..=i64::MAX, 5..=17, 30..=30, empty, 1000..=2000] {
                let whole = store.read_aggregate(id, range.clone()).unwrap();
                for budget in [1, 40, 100, 1000, usize::MAX] {
                    let chunked = drain_events(&store, store.aggregate_events(id, range.clone()), budget);
                    assert_eq!(text(&chunked), text(&whole), "{id} {range:?} by {budget}");
                }
            }
        }
    }

    /// A read sees the aggregate as it was when it began, even when the open segment closes
    /// and new ones follow meanwhile.
    #[test]
    fn a_read_does_not_see_later_appends() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 200);
        for i in 0..10 {
            append(&store, i as u64 + 1, &[("a", i)]);
        }
        let whole = store.read_aggregate("a", 0..=i64::MAX).unwrap();
        let mut read = store.aggregate_events("a", 0..=i64::MAX);
        let mut got = read.next_chunk(&store, 1).unwrap();
        let segments = store.closed_segments().len();
        for i in 10..30 {
            append(&store, i as u64 + 1, &[("a", i)]);
        }
        assert!(store.closed_segments().len() > segments + 1);
        got.extend(drain_events(&store, read, 30));
        assert_eq!(text(&got), text(&whole));
    }

    /// The order of a snapshot read, as the whole read gives it: highest sequence first, the
    /// newest of equal ones first.
    fn expected_snapshots(
        store: &SegmentStore,
        id: &str,
        range: RangeInclusive<i64>,
        max: usize,
    ) -> Vec<(i64, String)> {
        let mut all = store.read_aggregate(id, range).unwrap();
        all.reverse();
        all.sort_by_key(|(s, _)| Reverse(*s));
        all.truncate(max);
        text(&all)
    }

    /// Snapshots stored out of order and repeated come back highest first, whatever the pass
    /// size, the budget and the number of results asked for.
    #[test]
    fn chunked_snapshot_reads_come_highest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 300);
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        for i in 0..120u64 {
            let seq = random.below(40) as i64;
            let id = if i % 3 == 0 { "other" } else { "s" };
            append_at(&store, i + 1, &[(id, seq, i as i64)]);
        }
        assert!(store.closed_segments().len() > 5);
        for range in [0..=i64::MAX, 10..=20, 39..=39, 50..=60] {
            for max in [1, 2, 7, 50, usize::MAX] {
                let expected = expected_snapshots(&store, "s", range.clone(), max);
                for pass in [1, 3, SNAPSHOT_PASS] {
                    for budget in [1, 64, usize::MAX] {
                        let mut read = store.aggregate_snapshots("s", range.clone(), max);
                        read.pass_keys = pass;
                        let mut got = Vec::new();
                        for _ in 0..10_000 {
                            let chunk = read.next_chunk(&store, budget).unwrap();
                            if chunk.is_empty() {
                                break;
                            }
                            got.extend(chunk);
                        }
                        assert!(read.is_done());
                        assert_eq!(text(&got), expected, "{range:?} max {max} pass {pass} budget {budget}");
                    }
                }
            }
        }
    }
}
