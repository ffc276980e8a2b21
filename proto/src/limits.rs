//! Size rules shared by the router, which enforces them on clients, and the eventstore, which
//! checks them again on what the router sends: both must count a transaction the same way.

/// What one event costs a transaction beyond its encoded bytes: its share of the record and
/// index it is stored with, and of the internal message that carries it. Counting it means an
/// empty event is not free (two million of them were once one 10 MB "small" transaction), and
/// that the internal message carrying any transaction the client limit admits is no larger
/// than that limit (an event's framing inside it is at most 6 bytes).
pub const EVENT_OVERHEAD: usize = 64;

/// The cost of an event of `encoded_len` bytes against a transaction's size limit.
pub fn event_cost(encoded_len: usize) -> usize {
    encoded_len.saturating_add(EVENT_OVERHEAD)
}

/// The cost of a transaction of events with these encoded sizes.
pub fn transaction_cost(encoded_lens: impl IntoIterator<Item = usize>) -> usize {
    encoded_lens.into_iter().map(event_cost).fold(0, usize::saturating_add)
}

/// Largest transaction for Axon's `max-message-size`: that size less 10,000 bytes, as Axon
/// Server has it, and at least 1 KiB.
pub fn max_transaction_bytes(max_message_size: usize) -> usize {
    max_message_size.saturating_sub(10_000).max(1024)
}

/// The longest name or value of a node tag (`axoniq.axonserver.tags.NAME=VALUE`).
pub const MAX_TAG_BYTES: usize = 256;

/// A node tag as the supervisor passes it to a process (`--tag NAME=VALUE`), within
/// [`MAX_TAG_BYTES`]; the name and value trimmed.
pub fn parse_tag(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value))
            if !name.trim().is_empty() && name.len() <= MAX_TAG_BYTES && value.len() <= MAX_TAG_BYTES =>
        {
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!(
            "a tag is NAME=VALUE (each at most {MAX_TAG_BYTES} bytes), not {text:?}"
        )),
    }
}

/// Largest internal message the eventstore accepts from the router: any transaction the
/// client limit admits fits, with room for the request's own fields. The router is the only
/// sender and checks every transaction first, so this is a safety net, never what a client
/// meets: a message over it would end the one stream every append shares.
pub fn internal_message_limit(max_message_size: usize) -> usize {
    max_message_size.saturating_mul(2).saturating_add(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::internal::AppendRequest;
    use prost::Message;

    /// The largest transaction of the smallest events the limit admits travels to the
    /// eventstore in a message under the internal limit (issue 15, D3: 41,000 events of 102
    /// bytes once exceeded it and ended the shared append stream).
    #[test]
    fn every_admitted_transaction_fits_the_internal_message() {
        let max_message_size = 4 << 20;
        let limit = max_transaction_bytes(max_message_size);
        for event_len in [1usize, 2, 102, 127, 128, 1000, 16_383, 16_384, 100_000] {
            let count = limit / event_cost(event_len);
            assert!(transaction_cost(std::iter::repeat_n(event_len, count)) <= limit);
            let request = AppendRequest {
                id: u64::MAX,
                context: "a-context-name-of-some-length".into(),
                events: vec![bytes::Bytes::from(vec![7u8; event_len]); count],
                snapshot: false,
            };
            assert!(
                request.encoded_len() <= limit + 1024,
                "{count} events of {event_len} bytes encode to {} bytes, over {limit}",
                request.encoded_len()
            );
            assert!(request.encoded_len() < internal_message_limit(max_message_size));
        }
    }

    #[test]
    fn an_empty_event_is_not_free() {
        assert_eq!(transaction_cost([0, 0, 0]), 3 * EVENT_OVERHEAD);
        assert_eq!(max_transaction_bytes(4 << 20), (4 << 20) - 10_000);
        assert_eq!(max_transaction_bytes(100), 1024);
    }
}
