//! Events kept in their encoded form on the read path.
//!
//! The eventstore stores each event as the bytes of an encoded `Event` and serves reads from
//! those bytes; the router relays them to clients without decoding them. Two things make that
//! possible without a full decode:
//!
//! - Framing: an `EventWithToken` is `token` (field 1, varint) then `event` (field 2, length
//!   delimited, the encoded `Event`), so `internal::EncodedEventWithToken` (the same fields with
//!   `event` as bytes) encodes to the very bytes a client decodes as an `EventWithToken`, and
//!   [`EncodedCodec`] writes an already encoded `Event` as a message as it is.
//! - Field scans: the few facts a reader needs (payload type and revision for a tracking
//!   stream's blacklist, the timestamp, the snapshot flag) are read by walking the top-level
//!   fields of the encoded bytes, skipping everything else, with protobuf's rules: the last
//!   occurrence of a scalar field wins and occurrences of a message field merge.

use std::marker::PhantomData;

use bytes::{BufMut, Bytes};
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};

pub use tonic_prost::{ProstCodec, ProstDecoder};

/// `Event` field numbers (see `axon/event.proto`) and `SerializedObject`'s.
const EVENT_TIMESTAMP: u32 = 5;
const EVENT_PAYLOAD: u32 = 6;
const EVENT_SNAPSHOT: u32 = 8;
const OBJECT_TYPE: u32 = 1;
const OBJECT_REVISION: u32 = 2;
/// Nesting of (unknown) groups a scan follows, as prost's decoder allows.
const MAX_DEPTH: u32 = 100;

/// The encoded bytes are not a valid protobuf message of the expected shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed encoded event: {0}")]
pub struct Malformed(&'static str);

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// Fixed-width values and groups, skipped.
    Other,
}

fn varint(buf: &mut &[u8]) -> Result<u64, Malformed> {
    let mut value = 0u64;
    for i in 0..10 {
        let Some((&byte, rest)) = buf.split_first() else {
            return Err(Malformed("truncated varint"));
        };
        *buf = rest;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err(Malformed("varint longer than 10 bytes"))
}

fn take<'a>(buf: &mut &'a [u8], len: u64) -> Result<&'a [u8], Malformed> {
    let len = usize::try_from(len).map_err(|_| Malformed("length out of range"))?;
    if buf.len() < len {
        return Err(Malformed("truncated field"));
    }
    let (head, rest) = buf.split_at(len);
    *buf = rest;
    Ok(head)
}

/// Reads one field: its number and value. Groups are skipped whole.
fn field<'a>(buf: &mut &'a [u8], depth: u32) -> Result<(u32, Value<'a>), Malformed> {
    let key = varint(buf)?;
    let number = u32::try_from(key >> 3).map_err(|_| Malformed("field number out of range"))?;
    if number == 0 {
        return Err(Malformed("field number 0"));
    }
    let value = match key & 7 {
        0 => Value::Varint(varint(buf)?),
        1 => {
            take(buf, 8)?;
            Value::Other
        }
        2 => {
            let len = varint(buf)?;
            Value::Bytes(take(buf, len)?)
        }
        3 => {
            if depth >= MAX_DEPTH {
                return Err(Malformed("groups nested too deeply"));
            }
            loop {
                if buf.is_empty() {
                    return Err(Malformed("unterminated group"));
                }
                let mut peek = *buf;
                let end = varint(&mut peek)?;
                if end & 7 == 4 {
                    if end >> 3 != u64::from(number) {
                        return Err(Malformed("mismatched end of group"));
                    }
                    *buf = peek;
                    break;
                }
                field(buf, depth + 1)?;
            }
            Value::Other
        }
        4 => return Err(Malformed("end of group without a start")),
        5 => {
            take(buf, 4)?;
            Value::Other
        }
        _ => return Err(Malformed("invalid wire type")),
    };
    Ok((number, value))
}

/// Calls `each` with every top-level field of a message.
fn scan<'a>(mut buf: &'a [u8], mut each: impl FnMut(u32, Value<'a>) -> Result<(), Malformed>) -> Result<(), Malformed> {
    while !buf.is_empty() {
        let (number, value) = field(&mut buf, 0)?;
        each(number, value)?;
    }
    Ok(())
}

fn bytes_of(value: Value<'_>) -> Result<&[u8], Malformed> {
    match value {
        Value::Bytes(bytes) => Ok(bytes),
        _ => Err(Malformed("expected a length-delimited field")),
    }
}

fn varint_of(value: Value<'_>) -> Result<u64, Malformed> {
    match value {
        Value::Varint(v) => Ok(v),
        _ => Err(Malformed("expected a varint field")),
    }
}

/// The payload type and revision of an encoded `Event` (empty when unset), as a decode would
/// give them. The bytes are not checked to be UTF-8.
pub fn payload_type(event: &[u8]) -> Result<(&[u8], &[u8]), Malformed> {
    let (mut kind, mut revision): (&[u8], &[u8]) = (b"", b"");
    scan(event, |number, value| {
        if number == EVENT_PAYLOAD {
            scan(bytes_of(value)?, |number, value| {
                match number {
                    OBJECT_TYPE => kind = bytes_of(value)?,
                    OBJECT_REVISION => revision = bytes_of(value)?,
                    _ => {}
                }
                Ok(())
            })?;
        }
        Ok(())
    })?;
    Ok((kind, revision))
}

/// The timestamp of an encoded `Event` (0 when unset).
pub fn timestamp(event: &[u8]) -> Result<i64, Malformed> {
    let mut timestamp = 0i64;
    scan(event, |number, value| {
        if number == EVENT_TIMESTAMP {
            // int64 is the two's complement of the varint.
            timestamp = varint_of(value)? as i64;
        }
        Ok(())
    })?;
    Ok(timestamp)
}

/// The encoded `Event` with `snapshot = true`: the same bytes when the flag is already set,
/// else with the field appended. The flag is the last field (8), so on canonically encoded
/// bytes the result is what encoding the decoded event with the flag set gives.
pub fn as_snapshot(event: Bytes) -> Result<Bytes, Malformed> {
    let mut snapshot = false;
    scan(&event, |number, value| {
        if number == EVENT_SNAPSHOT {
            snapshot = varint_of(value)? != 0;
        }
        Ok(())
    })?;
    if snapshot {
        return Ok(event);
    }
    let mut out = Vec::with_capacity(event.len() + 2);
    out.extend_from_slice(&event);
    out.put_u8((EVENT_SNAPSHOT << 3) as u8);
    out.put_u8(1);
    Ok(Bytes::from(out))
}

/// A codec for serving messages that are already encoded: each `Bytes` is written as one
/// message as it is; requests are decoded with prost as usual.
#[derive(Debug)]
pub struct EncodedCodec<D>(PhantomData<D>);

impl<D> Default for EncodedCodec<D> {
    fn default() -> Self {
        EncodedCodec(PhantomData)
    }
}

impl<D: prost::Message + Default + Send + 'static> Codec for EncodedCodec<D> {
    type Encode = Bytes;
    type Decode = D;
    type Encoder = EncodedWriter;
    type Decoder = ProstDecoder<D>;

    fn encoder(&mut self) -> EncodedWriter {
        EncodedWriter
    }

    fn decoder(&mut self) -> ProstDecoder<D> {
        ProstDecoder::default()
    }
}

/// Writes an encoded message as it is.
#[derive(Debug, Default)]
pub struct EncodedWriter;

impl Encoder for EncodedWriter {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::axon::event::{Event, EventWithToken};
    use crate::axon::{MetaDataValue, SerializedObject, meta_data_value};
    use crate::internal::EncodedEventWithToken;
    use prost::Message;

    fn event(payload_type: &str, revision: &str) -> Event {
        Event {
            message_identifier: "m-1".into(),
            aggregate_identifier: "order-7".into(),
            aggregate_sequence_number: 300,
            aggregate_type: "Order".into(),
            timestamp: 1_700_000_000_123,
            payload: Some(SerializedObject {
                r#type: payload_type.into(),
                revision: revision.into(),
                data: Bytes::from_static(b"<order/>"),
            }),
            meta_data: [(
                "trace".to_owned(),
                MetaDataValue {
                    data: Some(meta_data_value::Data::TextValue("t-1".into())),
                },
            )]
            .into(),
            snapshot: false,
        }
    }

    /// The relayed bytes of a tracking stream are exactly prost's encoding of the decoded
    /// message, for tokens of every varint length and for an empty event.
    #[test]
    fn encoded_event_with_token_is_wire_identical() {
        for event in [event("com.example.Placed", "2"), Event::default()] {
            let stored = Bytes::from(event.encode_to_vec());
            for token in [0, 1, 127, 128, 1 << 35, i64::MAX, -1] {
                let encoded = EncodedEventWithToken {
                    token,
                    event: Some(stored.clone()),
                }
                .encode_to_vec();
                let expected = EventWithToken {
                    token,
                    event: Some(event.clone()),
                }
                .encode_to_vec();
                assert_eq!(encoded, expected, "token {token}");
                let decoded = EventWithToken::decode(&encoded[..]).unwrap();
                assert_eq!(decoded.event.as_ref(), Some(&event));
            }
        }
    }

    #[test]
    fn payload_type_scan_matches_a_decode() {
        let cases = [
            event("com.example.Placed", "2"),
            event("com.example.Placed", ""),
            event("", ""),
            Event {
                payload: None,
                ..event("x", "y")
            },
            Event::default(),
        ];
        for case in cases {
            let bytes = case.encode_to_vec();
            let (kind, revision) = payload_type(&bytes).unwrap();
            let payload = case.payload.clone().unwrap_or_default();
            assert_eq!(kind, payload.r#type.as_bytes());
            assert_eq!(revision, payload.revision.as_bytes());
            assert_eq!(timestamp(&bytes).unwrap(), case.timestamp);
        }
    }

    /// Repeated fields follow protobuf's rules: the last scalar wins, message fields merge;
    /// unknown fields of every wire type (groups too) are skipped.
    #[test]
    fn payload_type_scan_follows_merge_rules() {
        let mut bytes = event("First", "1").encode_to_vec();
        // A second payload that sets only the revision: the type of the first one stays.
        let second = SerializedObject {
            revision: "9".into(),
            ..Default::default()
        };
        bytes.put_u8((EVENT_PAYLOAD << 3 | 2) as u8);
        bytes.put_u8(second.encoded_len() as u8);
        second.encode(&mut bytes).unwrap();
        // Unknown fields: fixed64 (12), fixed32 (13), a group (14) holding a varint, a later
        // timestamp.
        bytes.extend_from_slice(&[12 << 3 | 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        bytes.extend_from_slice(&[13 << 3 | 5, 1, 2, 3, 4]);
        bytes.extend_from_slice(&[14 << 3 | 3, 1 << 3, 5, 14 << 3 | 4]);
        bytes.extend_from_slice(&[(EVENT_TIMESTAMP as u8) << 3, 42]);
        let decoded = Event::decode(&bytes[..]).unwrap();
        let payload = decoded.payload.unwrap();
        assert_eq!((payload.r#type.as_str(), payload.revision.as_str()), ("First", "9"));
        assert_eq!(payload_type(&bytes).unwrap(), (&b"First"[..], &b"9"[..]));
        assert_eq!(timestamp(&bytes).unwrap(), 42);
        assert_eq!(decoded.timestamp, 42);
    }

    #[test]
    fn malformed_bytes_are_reported_never_misread() {
        let bytes = event("com.example.Placed", "2").encode_to_vec();
        for cut in 1..bytes.len() {
            let part = &bytes[..cut];
            if Event::decode(part).is_err() {
                assert!(payload_type(part).is_err(), "cut at {cut}");
            }
        }
        assert!(
            payload_type(&[(EVENT_PAYLOAD as u8) << 3, 1]).is_err(),
            "payload must be a message"
        );
        assert!(payload_type(&[0x0f]).is_err(), "wire type 7");
    }

    #[test]
    fn snapshot_flag_is_set_as_an_encode_would() {
        let plain = event("S", "1");
        let flagged = Event {
            snapshot: true,
            ..plain.clone()
        };
        let set = as_snapshot(Bytes::from(plain.encode_to_vec())).unwrap();
        assert_eq!(Event::decode(set.clone()).unwrap(), flagged);
        // Single meta-data entry, so prost's encoding is deterministic.
        assert_eq!(&set[..], &flagged.encode_to_vec()[..]);
        let again = as_snapshot(set.clone()).unwrap();
        assert_eq!(again, set);
    }
}
