//! How a context's group reaches its other members: through this node's router, which relays to
//! the other nodes (`myelin_raft_relay`). Entries cross the wire as their log records (length,
//! CRC, body): events travel as they are stored, and a record damaged on its way is refused by
//! the receiver's checksum, never stored.

use bytes::Bytes;
use myelin_raft_relay::EntryCodec;

use super::log_store::{decode_record, encode_record};
use super::{Entry, TypeConfig};

/// The eventstore's entry encoding on the wire: its log record format.
pub struct LogRecords;

impl EntryCodec<TypeConfig> for LogRecords {
    fn encode(entry: &Entry) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        encode_record(entry, &mut out)?;
        Ok(out)
    }

    fn decode(bytes: Bytes) -> Result<Entry, String> {
        decode_record(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Transaction};

    #[test]
    fn a_record_crosses_the_wire_unchanged_and_damage_is_refused() {
        let record = crate::stored::record_of(
            &myelin_proto::axon::event::Event {
                aggregate_identifier: "a".into(),
                ..Default::default()
            },
            crate::segment::Kind::Events,
        );
        let entry = Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(3, 2), 9),
            payload: openraft::EntryPayload::Normal(Command::AppendEvents(vec![Transaction { events: vec![record] }])),
        };
        let wire = LogRecords::encode(&entry).unwrap();
        let back = LogRecords::decode(Bytes::from(wire.clone())).unwrap();
        assert_eq!(back.log_id, entry.log_id);
        assert_eq!(LogRecords::encode(&back).unwrap(), wire);
        let mut damaged = wire;
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(LogRecords::decode(Bytes::from(damaged)).is_err());
    }
}
