//! Message size limits, reported the way Axon Server reports them.
//!
//! Axon Server (grpc-java) answers a message over `max-message-size` with RESOURCE_EXHAUSTED.
//! tonic says OUT_OF_RANGE, which Axon clients read as a sequence conflict (AXONIQ-2000 uses
//! OUT_OF_RANGE), so a too-large event would look like a concurrency error. Both places where
//! tonic reports it are rewritten here: a streaming handler's `message()` error, and the
//! trailers-only response of a unary call.

use http::HeaderValue;
use tonic::{Code, Status};

const TONIC_TOO_LARGE: &str = "message length too large";

fn is_too_large(code: Code, message: &str) -> bool {
    code == Code::OutOfRange && message.contains(TONIC_TOO_LARGE)
}

/// Maps an error read from a client stream.
pub fn client_stream_error(status: Status) -> Status {
    if is_too_large(status.code(), status.message()) {
        Status::resource_exhausted(status.message().to_owned())
    } else {
        status
    }
}

/// Rewrites a trailers-only response that reports an over-size message.
pub fn rewrite_response<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains(TONIC_TOO_LARGE) || m.contains("message%20length%20too%20large"));
    if too_large {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_size_errors_are_rewritten() {
        let too_large =
            Status::out_of_range("Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes");
        assert_eq!(client_stream_error(too_large).code(), Code::ResourceExhausted);
        let sequence = Status::out_of_range("[AXONIQ-2000] Invalid sequence number 1 for aggregate a, expected 0");
        assert_eq!(client_stream_error(sequence).code(), Code::OutOfRange);

        let response = http::Response::builder()
            .header("grpc-status", "11")
            .header("grpc-message", "Error, decoded message length too large: found 9 bytes")
            .body(())
            .unwrap();
        assert_eq!(rewrite_response(response).headers()["grpc-status"], "8");
        let response = http::Response::builder()
            .header("grpc-status", "11")
            .header("grpc-message", "[AXONIQ-2000] x")
            .body(())
            .unwrap();
        assert_eq!(rewrite_response(response).headers()["grpc-status"], "11");
    }
}
