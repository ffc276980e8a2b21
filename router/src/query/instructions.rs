//! The processing instructions the router reads and writes on queries.
//!
//! Axon's `ProcessingInstruction`s are (key, value) pairs; the router reads TIMEOUT (ms, a number
//! or, from some clients, text) and CLIENT_SUPPORTS_STREAMING (a boolean, or text "true"), and
//! writes SERVER_SUPPORTS_STREAMING (always, true or false, as Axon Server does) and a TIMEOUT
//! rewritten to the time a queued query has left. Writing replaces every instruction of that key,
//! so a handler never sees two answers to one question.

use std::time::Duration;

use myelin_proto::axon::query::QueryRequest;
use myelin_proto::axon::{MetaDataValue, ProcessingInstruction, ProcessingKey, meta_data_value};

use super::dispatch::DEFAULT_TIMEOUT;

fn instruction(request: &QueryRequest, key: ProcessingKey) -> Option<&meta_data_value::Data> {
    request
        .processing_instructions
        .iter()
        .filter(|instruction| instruction.key == key as i32)
        .find_map(|instruction| instruction.value.as_ref()?.data.as_ref())
}

/// The query's TIMEOUT processing instruction (ms), else [`DEFAULT_TIMEOUT`].
pub fn timeout_of(request: &QueryRequest) -> Duration {
    match instruction(request, ProcessingKey::Timeout) {
        Some(meta_data_value::Data::NumberValue(ms)) => u64::try_from(*ms).ok(),
        Some(meta_data_value::Data::TextValue(ms)) => ms.trim().parse().ok(),
        _ => None,
    }
    .map_or(DEFAULT_TIMEOUT, Duration::from_millis)
}

/// Whether the dispatcher asked for a streaming query (CLIENT_SUPPORTS_STREAMING=true).
pub fn wants_streaming(request: &QueryRequest) -> bool {
    match instruction(request, ProcessingKey::ClientSupportsStreaming) {
        Some(meta_data_value::Data::BooleanValue(yes)) => *yes,
        Some(meta_data_value::Data::TextValue(text)) => text.trim().eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// The query as handlers get it: with this node's SERVER_SUPPORTS_STREAMING in place of any
/// the dispatcher sent.
pub fn forwarded(mut request: QueryRequest, streaming: bool) -> QueryRequest {
    let value = meta_data_value::Data::BooleanValue(streaming);
    replace(&mut request, ProcessingKey::ServerSupportsStreaming, value);
    request
}

/// Replaces the query's TIMEOUT processing instructions by one of `left` (whole ms, at least 1).
pub fn set_timeout(query: &mut QueryRequest, left: Duration) {
    let ms = i64::try_from(left.as_micros().div_ceil(1000))
        .unwrap_or(i64::MAX)
        .max(1);
    query
        .processing_instructions
        .retain(|instruction| instruction.key != ProcessingKey::Timeout as i32);
    query.processing_instructions.push(ProcessingInstruction {
        key: ProcessingKey::Timeout as i32,
        value: Some(MetaDataValue {
            data: Some(meta_data_value::Data::NumberValue(ms)),
        }),
    });
}

fn replace(request: &mut QueryRequest, key: ProcessingKey, data: meta_data_value::Data) {
    request
        .processing_instructions
        .retain(|instruction| instruction.key != key as i32);
    request.processing_instructions.push(ProcessingInstruction {
        key: key as i32,
        value: Some(MetaDataValue { data: Some(data) }),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(key: ProcessingKey, data: meta_data_value::Data) -> QueryRequest {
        let mut request = QueryRequest::default();
        request.processing_instructions.push(ProcessingInstruction {
            key: key as i32,
            value: Some(MetaDataValue { data: Some(data) }),
        });
        request
    }

    #[test]
    fn instructions_are_read_as_axon_clients_write_them() {
        use meta_data_value::Data;
        assert_eq!(timeout_of(&QueryRequest::default()), DEFAULT_TIMEOUT);
        assert_eq!(
            timeout_of(&with(ProcessingKey::Timeout, Data::NumberValue(500))),
            Duration::from_millis(500)
        );
        assert_eq!(
            timeout_of(&with(ProcessingKey::Timeout, Data::TextValue("750".into()))),
            Duration::from_millis(750)
        );
        assert_eq!(
            timeout_of(&with(ProcessingKey::Timeout, Data::NumberValue(-1))),
            DEFAULT_TIMEOUT
        );
        assert!(!wants_streaming(&QueryRequest::default()));
        assert!(wants_streaming(&with(
            ProcessingKey::ClientSupportsStreaming,
            Data::BooleanValue(true)
        )));
        assert!(wants_streaming(&with(
            ProcessingKey::ClientSupportsStreaming,
            Data::TextValue("true".into())
        )));
        assert!(!wants_streaming(&with(
            ProcessingKey::ClientSupportsStreaming,
            Data::BooleanValue(false)
        )));
    }

    #[test]
    fn writing_replaces_what_was_there() {
        let claimed = with(
            ProcessingKey::ServerSupportsStreaming,
            meta_data_value::Data::BooleanValue(true),
        );
        let forwarded = forwarded(claimed, false);
        assert_eq!(forwarded.processing_instructions.len(), 1);
        assert_eq!(
            forwarded.processing_instructions[0].value.as_ref().unwrap().data,
            Some(meta_data_value::Data::BooleanValue(false))
        );
        let mut query = with(ProcessingKey::Timeout, meta_data_value::Data::NumberValue(5_000));
        set_timeout(&mut query, Duration::from_micros(1_200_001));
        assert_eq!(query.processing_instructions.len(), 1);
        assert_eq!(
            query.processing_instructions[0].value.as_ref().unwrap().data,
            Some(meta_data_value::Data::NumberValue(1_201))
        );
        set_timeout(&mut query, Duration::ZERO);
        assert_eq!(
            query.processing_instructions[0].value.as_ref().unwrap().data,
            Some(meta_data_value::Data::NumberValue(1))
        );
    }
}
