//! The framing of a segment file: a fixed header, then batch records back to back.
//!
//! ```text
//! header : magic "MYELSEG1" | u32 format version | u32 kind (1 events, 2 snapshots)
//! record : u32 body length | u32 CRC32 of body | body
//! body   : u64 term | u64 leader node | u64 log index     (the Raft entry it came from)
//!          i64 first token | u32 event count | (u32 length | event bytes) * count
//! ```
//! All integers little-endian. A record holds the stored events of one Raft entry, so a torn
//! write loses whole entries only, which the Raft log still has. A record whose length runs past
//! the end of the file, or whose checksum fails, ends the readable data.

use bytes::{Buf, BufMut};

pub const MAGIC: &[u8; 8] = b"MYELSEG1";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 16;
/// Record prefix: body length and checksum.
pub const PREFIX_LEN: usize = 8;
/// Fixed part of a body before the events.
pub const BODY_FIXED_LEN: usize = 8 * 3 + 8 + 4;

/// Which kind of segments a store holds; written in every header so files cannot be mixed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Events,
    Snapshots,
}

impl Kind {
    fn code(self) -> u32 {
        match self {
            Kind::Events => 1,
            Kind::Snapshots => 2,
        }
    }

    /// File name suffix of a segment of this kind.
    pub fn suffix(self) -> &'static str {
        match self {
            Kind::Events => "events",
            Kind::Snapshots => "snapshots",
        }
    }
}

pub fn header(kind: Kind) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&kind.code().to_le_bytes());
    h
}

/// Checks a header read from disk. `Ok(false)` means the header is incomplete (a torn create).
pub fn check_header(bytes: &[u8], kind: Kind) -> Result<bool, String> {
    if bytes.len() < HEADER_LEN as usize {
        return Ok(false);
    }
    if &bytes[..8] != MAGIC {
        return Err("not a Myelin segment (bad magic)".into());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format!("unsupported segment format version {version}"));
    }
    let code = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if code != kind.code() {
        return Err(format!("segment holds kind {code}, expected {}", kind.code()));
    }
    Ok(true)
}

/// Where a record came from in the Raft log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EntryRef {
    pub term: u64,
    pub leader: u64,
    pub index: u64,
}

/// Encodes one record (prefix included). Returns the bytes and, per event, the offset of its
/// bytes relative to the start of the record.
pub fn encode(entry: EntryRef, first_token: i64, events: &[&[u8]]) -> (Vec<u8>, Vec<u32>) {
    let body_len = BODY_FIXED_LEN + events.iter().map(|e| 4 + e.len()).sum::<usize>();
    let mut buf = Vec::with_capacity(PREFIX_LEN + body_len);
    buf.put_u32_le(body_len as u32);
    buf.put_u32_le(0); // checksum, filled in below
    buf.put_u64_le(entry.term);
    buf.put_u64_le(entry.leader);
    buf.put_u64_le(entry.index);
    buf.put_i64_le(first_token);
    buf.put_u32_le(events.len() as u32);
    let mut offsets = Vec::with_capacity(events.len());
    for event in events {
        buf.put_u32_le(event.len() as u32);
        offsets.push(buf.len() as u32);
        buf.put_slice(event);
    }
    let crc = crc32fast::hash(&buf[PREFIX_LEN..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    (buf, offsets)
}

/// A record's body, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body<'a> {
    pub entry: EntryRef,
    pub first_token: i64,
    /// Each event's bytes and its offset relative to the record start.
    pub events: Vec<(u32, &'a [u8])>,
}

/// Result of looking at the bytes where a record should start.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// A whole, valid record of `len` bytes.
    Record { len: usize, body: Body<'a> },
    /// Not enough bytes for the record the prefix announces (or for the prefix).
    Incomplete,
    /// The bytes are not a valid record.
    Corrupt(&'static str),
}

pub fn parse(buf: &[u8]) -> Parsed<'_> {
    if buf.len() < PREFIX_LEN {
        return Parsed::Incomplete;
    }
    let body_len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if body_len < BODY_FIXED_LEN {
        return Parsed::Corrupt("record shorter than its fixed part");
    }
    if buf.len() < PREFIX_LEN + body_len {
        return Parsed::Incomplete;
    }
    let body = &buf[PREFIX_LEN..PREFIX_LEN + body_len];
    if crc32fast::hash(body) != crc {
        return Parsed::Corrupt("checksum mismatch");
    }
    match parse_body(body) {
        Some(parsed) => Parsed::Record {
            len: PREFIX_LEN + body_len,
            body: parsed,
        },
        None => Parsed::Corrupt("record body does not add up"),
    }
}

fn parse_body(mut body: &[u8]) -> Option<Body<'_>> {
    let total = body.len();
    let entry = EntryRef {
        term: body.get_u64_le(),
        leader: body.get_u64_le(),
        index: body.get_u64_le(),
    };
    let first_token = body.get_i64_le();
    let count = body.get_u32_le() as usize;
    let mut events = Vec::with_capacity(count.min(body.len() / 4));
    for _ in 0..count {
        if body.len() < 4 {
            return None;
        }
        let len = body.get_u32_le() as usize;
        if body.len() < len {
            return None;
        }
        let offset = (PREFIX_LEN + total - body.len()) as u32;
        events.push((offset, &body[..len]));
        body = &body[len..];
    }
    body.is_empty().then_some(Body {
        entry,
        first_token,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_offsets() {
        let entry = EntryRef {
            term: 3,
            leader: 1,
            index: 42,
        };
        let events: [&[u8]; 3] = [b"one", b"", b"three"];
        let (bytes, offsets) = encode(entry, 100, &events);
        let Parsed::Record { len, body } = parse(&bytes) else {
            panic!("not parsed")
        };
        assert_eq!(len, bytes.len());
        assert_eq!(body.entry, entry);
        assert_eq!(body.first_token, 100);
        for (i, (offset, data)) in body.events.iter().enumerate() {
            assert_eq!(*offset, offsets[i]);
            assert_eq!(*data, events[i]);
            let o = *offset as usize;
            assert_eq!(&bytes[o..o + data.len()], events[i]);
        }
    }

    #[test]
    fn every_cut_is_incomplete_and_every_flip_is_detected() {
        let (bytes, _) = encode(EntryRef::default(), 0, &[b"abc", b"defgh"]);
        for cut in 0..bytes.len() {
            assert!(matches!(parse(&bytes[..cut]), Parsed::Incomplete), "cut {cut}");
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                match parse(&flipped) {
                    Parsed::Record { body, .. } => panic!("flip {i}/{bit} parsed as {body:?}"),
                    Parsed::Incomplete | Parsed::Corrupt(_) => {}
                }
            }
        }
    }
}
