//! Event and snapshot storage in segment files (see `store` for the guarantees).
//!
//! - `record`: the framing of a segment file (header, length- and checksum-framed records).
//! - `index`: per-segment aggregate positions and record offsets.
//! - `bloom`: per-segment bloom filter over aggregate ids.
//! - `store`: the token-ordered store over a folder of segments, with recovery.
//! - `aggregate`: aggregate reads in bounded chunks.

pub mod aggregate;
pub mod bloom;
pub mod index;
pub mod record;
pub mod store;

pub use aggregate::{AggregateEvents, AggregateSnapshots};
pub use record::{EntryRef, Kind};
pub use store::{Indexed, Inspect, ReadBuffers, SegmentStore, StoreError, TokenAt};

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    /// Test events are `"<aggregate>:<sequence>"`, optionally followed by `"@<timestamp>"`; the
    /// empty aggregate is not indexed.
    fn facts(bytes: &[u8]) -> Option<(String, i64, bool)> {
        let text = std::str::from_utf8(bytes).ok()?;
        let text = text.split_once('@').map_or(text, |(facts, _)| facts);
        let (id, seq) = text.split_once(':')?;
        Some((id.to_owned(), seq.parse().ok()?, !id.is_empty()))
    }

    fn timestamp(bytes: &[u8]) -> i64 {
        std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.split_once('@'))
            .and_then(|(_, t)| t.parse().ok())
            .unwrap_or(i64::MIN)
    }

    pub(crate) const INSPECT: Inspect = Inspect { facts, timestamp };

    pub(crate) fn open(dir: &Path, max: u64) -> SegmentStore {
        SegmentStore::open(dir, Kind::Events, max, INSPECT).unwrap()
    }

    pub(crate) fn append(store: &SegmentStore, index: u64, events: &[(&str, i64)]) -> i64 {
        let texts: Vec<String> = events.iter().map(|(id, s)| format!("{id}:{s}")).collect();
        append_texts(store, index, &texts, events)
    }

    /// Appends one record of events `(aggregate, sequence, timestamp)`.
    pub(crate) fn append_at(store: &SegmentStore, index: u64, events: &[(&str, i64, i64)]) -> i64 {
        let texts: Vec<String> = events.iter().map(|(id, s, t)| format!("{id}:{s}@{t}")).collect();
        let facts: Vec<(&str, i64)> = events.iter().map(|(id, s, _)| (*id, *s)).collect();
        append_texts(store, index, &texts, &facts)
    }

    /// Appends one record of `texts`, each indexed under its `(aggregate, sequence)`.
    fn append_texts(store: &SegmentStore, index: u64, texts: &[String], facts: &[(&str, i64)]) -> i64 {
        let items: Vec<(&[u8], Indexed)> = texts
            .iter()
            .zip(facts)
            .map(|(text, (id, s))| {
                (
                    text.as_bytes(),
                    Indexed {
                        aggregate_id: id,
                        sequence: *s,
                        indexed: !id.is_empty(),
                    },
                )
            })
            .collect();
        let entry = EntryRef {
            term: 1,
            leader: 1,
            index,
        };
        store.append(entry, &items).unwrap()
    }

    /// A small deterministic generator for test data (xorshift).
    pub(crate) struct Random(pub(crate) u64);

    impl Random {
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    pub(crate) fn all(store: &SegmentStore) -> Vec<String> {
        store
            .read_from(0, usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, (token, bytes))| {
                assert_eq!(token, i as i64);
                String::from_utf8(bytes.to_vec()).unwrap()
            })
            .collect()
    }

    #[test]
    fn appends_roll_segments_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 120);
        let mut expected = Vec::new();
        for i in 0..40i64 {
            let agg = format!("agg{}", i % 3);
            let first = append(&store, i as u64 + 1, &[(&agg, i / 3), ("", 0)]);
            assert_eq!(first, i * 2);
            expected.push(format!("{agg}:{}", i / 3));
            expected.push(":0".to_owned());
        }
        assert!(store.closed_segments().len() > 5, "small segments must roll");
        assert_eq!(all(&store), expected);
        assert_eq!(store.last_sequence("agg1").unwrap(), Some(12));
        assert_eq!(store.last_sequence("nope").unwrap(), None);
        let agg2: Vec<i64> = store
            .read_aggregate("agg2", 0..=i64::MAX)
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(agg2, (0..13).collect::<Vec<_>>());
        // A range, read across segments with neighbouring events coalesced into one read.
        let part: Vec<(i64, String)> = store
            .read_aggregate("agg2", 3..=7)
            .unwrap()
            .into_iter()
            .map(|(s, b)| (s, String::from_utf8(b.to_vec()).unwrap()))
            .collect();
        assert_eq!(part, (3..=7).map(|s| (s, format!("agg2:{s}"))).collect::<Vec<_>>());
        // Reads from the middle, bounded by count.
        let part = store.read_from(33, 4, usize::MAX).unwrap();
        assert_eq!(part.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![33, 34, 35, 36]);
        drop(store);

        let store = open(dir.path(), 120);
        assert_eq!(store.next_token(), 80);
        assert_eq!(store.last_entry().unwrap().index, 40);
        assert_eq!(all(&store), expected);
        assert_eq!(store.last_sequence("agg0").unwrap(), Some(13));
        // Damaged side files are rebuilt, not trusted.
        let (base, _) = store.closed_segments()[1];
        drop(store);
        std::fs::write(dir.path().join(format!("{base:020}.index")), b"junk").unwrap();
        std::fs::remove_file(dir.path().join(format!("{base:020}.bloom"))).unwrap();
        let store = open(dir.path(), 120);
        assert_eq!(all(&store), expected);
        assert_eq!(store.read_aggregate("agg1", 0..=i64::MAX).unwrap().len(), 13);
    }

    /// A reader that goes on reading gets whole records (never one twice), from buffers it
    /// hands back; `read_from` still stops at its count.
    #[test]
    fn continued_reads_take_whole_records_and_reuse_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 400);
        for i in 0..30i64 {
            append(&store, i as u64 + 1, &[("a", 2 * i), ("a", 2 * i + 1)]);
        }
        let tokens = |batch: &[(i64, bytes::Bytes)]| batch.iter().map(|(t, _)| *t).collect::<Vec<_>>();
        let mut buffers = ReadBuffers::default();
        assert_eq!(
            tokens(&store.read_from_with(1, 2, usize::MAX, &mut buffers).unwrap()),
            vec![1, 2, 3]
        );
        assert_eq!(tokens(&store.read_from(1, 2, usize::MAX).unwrap()), vec![1, 2]);
        let mut next = 0;
        let mut read = Vec::new();
        loop {
            let batch = store.read_from_with(next, 3, usize::MAX, &mut buffers).unwrap();
            let Some((last, _)) = batch.last() else { break };
            next = last + 1;
            read.extend(batch.iter().map(|(_, b)| String::from_utf8(b.to_vec()).unwrap()));
        }
        assert_eq!(read, all(&store));
    }

    /// Cut the open segment at every byte offset: what comes back is always a prefix of whole
    /// records, and everything before the cut record is there.
    #[test]
    fn recovery_keeps_whole_records_at_every_cut() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 20);
        let mut ends = Vec::new(); // (file length after record, events so far)
        for i in 0..6u64 {
            append(&store, i + 1, &[("a", 2 * i as i64), ("a", 2 * i as i64 + 1)]);
            let len = std::fs::metadata(dir.path().join(format!("{:020}.events", 0)))
                .unwrap()
                .len();
            ends.push((len, 2 * (i + 1) as i64));
        }
        drop(store);
        let path = dir.path().join(format!("{:020}.events", 0));
        let full = std::fs::read(&path).unwrap();
        for cut in record::HEADER_LEN as usize..=full.len() {
            let copy = tempfile::tempdir().unwrap();
            std::fs::write(copy.path().join(format!("{:020}.events", 0)), &full[..cut]).unwrap();
            let store = open(copy.path(), 1 << 20);
            let whole = ends
                .iter()
                .rfind(|(len, _)| *len as usize <= cut)
                .map_or(0, |(_, n)| *n);
            assert_eq!(store.next_token(), whole, "cut at {cut}");
            assert_eq!(all(&store).len() as i64, whole);
            let expected_last = if whole == 0 { None } else { Some(whole - 1) };
            assert_eq!(store.last_sequence("a").unwrap(), expected_last);
            // The store keeps working after recovery.
            append(&store, 100, &[("a", whole)]);
            drop(store);
            let store = open(copy.path(), 1 << 20);
            assert_eq!(store.next_token(), whole + 1);
        }
    }

    /// A flipped byte in the open segment's tail is detected: the damaged record is dropped,
    /// never served as something else.
    #[test]
    fn flipped_bytes_are_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 20);
        append(&store, 1, &[("a", 0)]);
        append(&store, 2, &[("a", 1), ("b", 0)]);
        drop(store);
        let path = dir.path().join(format!("{:020}.events", 0));
        let full = std::fs::read(&path).unwrap();
        let first_len = {
            let copy = tempfile::tempdir().unwrap();
            std::fs::write(copy.path().join(format!("{:020}.events", 0)), &full).unwrap();
            full.len()
        };
        for i in record::HEADER_LEN as usize..first_len {
            let mut damaged = full.clone();
            damaged[i] ^= 0x10;
            let copy = tempfile::tempdir().unwrap();
            std::fs::write(copy.path().join(format!("{:020}.events", 0)), &damaged).unwrap();
            let store = match SegmentStore::open(copy.path(), Kind::Events, 1 << 20, INSPECT) {
                Ok(store) => store,
                Err(_) => continue,
            };
            for event in all(&store) {
                assert!(["a:0", "a:1", "b:0"].contains(&event.as_str()), "served {event:?}");
            }
        }
    }

    /// The first token at or after an instant, by a linear scan: what `token_at` must answer.
    fn token_at_by_scan(store: &SegmentStore, instant: i64) -> i64 {
        store
            .read_from(0, usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .find(|(_, event)| timestamp(event) >= instant)
            .map_or(store.next_token(), |(token, _)| token)
    }

    /// On random data, in order and out of order, `token_at` answers what a scan answers and
    /// reads at most one record; after a reopen too, and after the index files were of the
    /// first format (without timestamps) and had to be rebuilt.
    #[test]
    fn token_at_matches_a_scan_and_reads_one_record_at_most() {
        for in_order in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path(), 400);
            let mut random = Random(if in_order { 7 } else { 0x1234_5678_9abc });
            let mut clock = 1_000i64;
            for i in 0..150u64 {
                let n = 1 + random.below(3) as usize;
                let events: Vec<(&str, i64, i64)> = (0..n)
                    .map(|_| {
                        clock += random.below(20) as i64;
                        let t = if in_order {
                            clock
                        } else {
                            1_000 + random.below(3_000) as i64
                        };
                        ("", 0, t)
                    })
                    .collect();
                append_at(&store, i + 1, &events);
            }
            assert!(store.closed_segments().len() > 10);
            let check = |store: &SegmentStore| {
                let mut random = Random(99);
                let mut instants: Vec<i64> = (0..200).map(|_| random.below(5_000) as i64).collect();
                instants.extend([i64::MIN, 0, 1_000, 4_999, i64::MAX]);
                for instant in instants {
                    let found = store.token_at(instant).unwrap();
                    assert_eq!(found.token, token_at_by_scan(store, instant), "at {instant}");
                    assert!(found.records_read <= 1);
                }
                // Past every event: answered from memory.
                assert_eq!(store.token_at(i64::MAX).unwrap().records_read, 0);
            };
            check(&store);
            drop(store);
            let store = open(dir.path(), 400);
            check(&store);
            // Index files of the first format are rebuilt at open, with their timestamps.
            let bases: Vec<i64> = store.closed_segments().iter().map(|(b, _)| *b).collect();
            drop(store);
            for base in &bases {
                let path = dir.path().join(format!("{base:020}.index"));
                let mut bytes = std::fs::read(&path).unwrap();
                bytes[..8].copy_from_slice(b"MYELIDX1");
                std::fs::write(&path, bytes).unwrap();
            }
            let store = open(dir.path(), 400);
            check(&store);
            let rebuilt = std::fs::read(dir.path().join(format!("{:020}.index", bases[0]))).unwrap();
            assert_eq!(&rebuilt[..8], b"MYELIDX2");
        }
    }

    #[test]
    fn token_at_of_an_empty_store_is_its_next_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 400);
        assert_eq!(
            store.token_at(0).unwrap(),
            TokenAt {
                token: 0,
                records_read: 0
            }
        );
    }

    #[test]
    fn a_torn_roll_over_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 60);
        for i in 0..5 {
            append(&store, i + 1, &[("x", i as i64)]);
        }
        let segments = store.closed_segments().len();
        assert!(segments >= 2);
        let next = store.next_token();
        drop(store);
        // A crash right after creating the next segment file, before its header was written.
        std::fs::write(dir.path().join(format!("{next:020}.events")), b"MYEL").unwrap();
        let store = open(dir.path(), 60);
        assert_eq!(store.next_token(), next);
        assert_eq!(all(&store).len() as i64, next);
    }
}
