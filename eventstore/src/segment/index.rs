//! The per-segment index: where each aggregate's events are, and where each record starts.
//!
//! The open segment keeps its index in memory (rebuilt from the file at start); a closed segment
//! writes it once to `<base>.index` next to a bloom filter `<base>.bloom`, and never changes again.
//!
//! Index file: `magic "MYELIDX2" | u64 data length of the segment | i64 next token |
//! u32 records | (i64 first token, u64 offset, i64 latest timestamp)* | u32 aggregates |
//! (u32 id length, id, u32 count, (i64 sequence, u64 offset, u32 length)*)* | u32 CRC32 of all before`.
//!
//! A record's *latest timestamp* is the highest event timestamp (ms) of that record and every
//! record before it in the segment. Clients set timestamps and need not keep them in order, but
//! this running maximum never decreases, so "the first event at or after an instant" is found by
//! a binary search over the records (see [`SegmentIndex::first_record_reaching`]), and a segment
//! whose last value is before the instant holds no such event at all.
//!
//! Files of the first format (`MYELIDX1`, without timestamps) do not decode: the store then
//! rebuilds them from the segment at open, once.

use std::collections::HashMap;

use bytes::{Buf, BufMut};

const MAGIC: &[u8; 8] = b"MYELIDX2";
/// Bytes of one record entry in the file.
const RECORD_LEN: usize = 24;

/// Where one event of an aggregate is stored in its segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub sequence: i64,
    /// Absolute file offset of the event's bytes.
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SegmentIndex {
    /// Positions per aggregate id, in the order they were stored (ascending sequence for events).
    pub aggregates: HashMap<String, Vec<Position>>,
    /// First token and file offset of every record, ascending.
    pub records: Vec<(i64, u64)>,
    /// Per record, the latest event timestamp up to and including it (see the module docs);
    /// never decreasing.
    pub latest: Vec<i64>,
}

impl SegmentIndex {
    /// Adds a record whose events' highest timestamp is `max_timestamp` (`i64::MIN` when it
    /// holds none).
    pub fn add_record(&mut self, first_token: i64, offset: u64, max_timestamp: i64) {
        self.records.push((first_token, offset));
        let latest = self.latest_timestamp().max(max_timestamp);
        self.latest.push(latest);
    }

    /// The latest event timestamp in the segment; `i64::MIN` when it holds no event.
    pub fn latest_timestamp(&self) -> i64 {
        self.latest.last().copied().unwrap_or(i64::MIN)
    }

    /// The first record holding an event with a timestamp at or after `instant` (every event
    /// of the records before it is older), as its index in `records`.
    pub fn first_record_reaching(&self, instant: i64) -> Option<usize> {
        let i = self.latest.partition_point(|latest| *latest < instant);
        (i < self.records.len()).then_some(i)
    }

    pub fn add_event(&mut self, aggregate_id: &str, position: Position) {
        match self.aggregates.get_mut(aggregate_id) {
            Some(positions) => positions.push(position),
            None => {
                self.aggregates.insert(aggregate_id.to_owned(), vec![position]);
            }
        }
    }

    /// Highest sequence number stored for the aggregate in this segment.
    pub fn last_sequence(&self, aggregate_id: &str) -> Option<i64> {
        self.aggregates
            .get(aggregate_id)
            .and_then(|p| p.iter().map(|p| p.sequence).max())
    }

    /// The record holding `token`: the last record whose first token is <= `token`.
    pub fn record_for(&self, token: i64) -> Option<(i64, u64)> {
        let i = self.records.partition_point(|(first, _)| *first <= token);
        i.checked_sub(1).map(|i| self.records[i])
    }

    /// File offset of the first record after the one holding `token`, if there is one.
    pub fn record_after(&self, token: i64) -> Option<u64> {
        let i = self.records.partition_point(|(first, _)| *first <= token);
        self.records.get(i).map(|(_, offset)| *offset)
    }

    pub fn encode(&self, data_len: u64, next_token: i64) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_slice(MAGIC);
        out.put_u64_le(data_len);
        out.put_i64_le(next_token);
        out.put_u32_le(self.records.len() as u32);
        for ((token, offset), latest) in self.records.iter().zip(&self.latest) {
            out.put_i64_le(*token);
            out.put_u64_le(*offset);
            out.put_i64_le(*latest);
        }
        out.put_u32_le(self.aggregates.len() as u32);
        // Sorted so the same segment always yields the same bytes (replicas compare equal).
        let mut ids: Vec<&String> = self.aggregates.keys().collect();
        ids.sort();
        for id in ids {
            let positions = &self.aggregates[id];
            out.put_u32_le(id.len() as u32);
            out.put_slice(id.as_bytes());
            out.put_u32_le(positions.len() as u32);
            for p in positions {
                out.put_i64_le(p.sequence);
                out.put_u64_le(p.offset);
                out.put_u32_le(p.len);
            }
        }
        let crc = crc32fast::hash(&out);
        out.put_u32_le(crc);
        out
    }

    /// Decodes an index file; `None` when it is damaged (the caller then rebuilds it).
    /// Returns the index, the segment data length and the next token it was written for.
    pub fn decode(bytes: &[u8]) -> Option<(SegmentIndex, u64, i64)> {
        if bytes.len() < MAGIC.len() + 4 {
            return None;
        }
        let (content, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(content) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let mut b = content.strip_prefix(MAGIC.as_slice())?;
        let need = |b: &[u8], n: usize| (b.len() >= n).then_some(());
        need(b, 20)?;
        let data_len = b.get_u64_le();
        let next_token = b.get_i64_le();
        let nrecords = b.get_u32_le() as usize;
        need(b, nrecords.checked_mul(RECORD_LEN)?)?;
        let mut index = SegmentIndex::default();
        for _ in 0..nrecords {
            index.records.push((b.get_i64_le(), b.get_u64_le()));
            index.latest.push(b.get_i64_le());
        }
        if !index.latest.is_sorted() {
            return None;
        }
        need(b, 4)?;
        let naggregates = b.get_u32_le() as usize;
        for _ in 0..naggregates {
            need(b, 4)?;
            let len = b.get_u32_le() as usize;
            need(b, len)?;
            let id = std::str::from_utf8(&b[..len]).ok()?.to_owned();
            b.advance(len);
            need(b, 4)?;
            let n = b.get_u32_le() as usize;
            need(b, n.checked_mul(20)?)?;
            let positions = (0..n)
                .map(|_| Position {
                    sequence: b.get_i64_le(),
                    offset: b.get_u64_le(),
                    len: b.get_u32_le(),
                })
                .collect();
            index.aggregates.insert(id, positions);
        }
        b.is_empty().then_some((index, data_len, next_token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_and_damage() {
        let mut index = SegmentIndex::default();
        index.add_record(10, 16, 500);
        index.add_record(12, 300, 400);
        for (i, id) in ["a", "b", "a"].iter().enumerate() {
            index.add_event(
                id,
                Position {
                    sequence: i as i64,
                    offset: 30 + i as u64,
                    len: 5,
                },
            );
        }
        assert_eq!(index.last_sequence("a"), Some(2));
        assert_eq!(index.record_for(11), Some((10, 16)));
        assert_eq!(index.record_for(12), Some((12, 300)));
        assert_eq!(index.record_for(9), None);
        // The running maximum: the second record's older events do not lower it.
        assert_eq!(index.latest, vec![500, 500]);
        assert_eq!(index.first_record_reaching(i64::MIN), Some(0));
        assert_eq!(index.first_record_reaching(500), Some(0));
        assert_eq!(index.first_record_reaching(501), None);
        let bytes = index.encode(400, 14);
        assert_eq!(SegmentIndex::decode(&bytes), Some((index, 400, 14)));
        for cut in 0..bytes.len() {
            assert!(SegmentIndex::decode(&bytes[..cut]).is_none());
        }
        let mut flipped = bytes.clone();
        flipped[20] ^= 4;
        assert!(SegmentIndex::decode(&flipped).is_none());
    }

    /// A file of the first format is not taken for this one (the store rebuilds it).
    #[test]
    fn first_format_files_do_not_decode() {
        let mut old = b"MYELIDX1".to_vec();
        old.put_u64_le(400);
        old.put_i64_le(11);
        old.put_u32_le(1);
        old.put_i64_le(10);
        old.put_u64_le(16);
        old.put_u32_le(0);
        let crc = crc32fast::hash(&old);
        old.put_u32_le(crc);
        assert!(SegmentIndex::decode(&old).is_none());
    }
}
