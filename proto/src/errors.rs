//! The one table of Axon error codes: each code's `AXONIQ-xxxx` text, gRPC status and HTTP status.
//!
//! Errors reach clients the way Axon Server sends them: the gRPC status of the code, the
//! description `"[AXONIQ-xxxx] message"`, and the trailer `AxonIQ-ErrorCode: AXONIQ-xxxx`.

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// The trailer (and HTTP header) that carries the code.
pub const ERROR_CODE_KEY: &str = "axoniq-errorcode";

macro_rules! codes {
    ($($name:ident = $text:literal, $grpc:ident, $http:literal;)*) => {
        /// An Axon error code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $($name),* }

        impl ErrorCode {
            /// `AXONIQ-xxxx`.
            pub fn code(self) -> &'static str {
                match self { $(ErrorCode::$name => $text),* }
            }
            /// The gRPC status Axon Server uses for it.
            pub fn grpc(self) -> Code {
                match self { $(ErrorCode::$name => Code::$grpc),* }
            }
            /// The HTTP status Axon Server uses for it.
            pub fn http(self) -> u16 {
                match self { $(ErrorCode::$name => $http),* }
            }
            /// Looks a code up by its text; unknown codes are `Other`, as in Axon Server.
            pub fn parse(text: &str) -> ErrorCode {
                match text { $($text => ErrorCode::$name,)* _ => ErrorCode::Other }
            }
        }
    };
}

codes! {
    Other = "AXONIQ-0001", Cancelled, 500;
    // Axon Server answers PERMISSION_DENIED/403 to a missing or wrong token; we answer
    // UNAUTHENTICATED/401 with the same codes, as the caller failed to prove who it is
    // (docs/decisions/0005-access-control.md). A known caller lacking a role gets 403.
    AuthenticationTokenMissing = "AXONIQ-1000", Unauthenticated, 401;
    AuthenticationInvalidToken = "AXONIQ-1001", Unauthenticated, 401;
    UnsupportedInstruction = "AXONIQ-1002", Unknown, 400;
    InstructionExecutionError = "AXONIQ-1003", Internal, 500;
    InstructionResultTimeout = "AXONIQ-1004", Internal, 500;
    NodeIsReplica = "AXONIQ-1100", Unavailable, 503;
    NoSuchApplication = "AXONIQ-1300", NotFound, 404;
    NoSuchNode = "AXONIQ-1301", NotFound, 404;
    ContextNotFound = "AXONIQ-1302", NotFound, 404;
    ContextExists = "AXONIQ-1304", AlreadyExists, 400;
    NoAxonServerForContext = "AXONIQ-1400", Unavailable, 503;
    AxonserverNodeNotConnected = "AXONIQ-1500", Unavailable, 503;
    TooManyRequests = "AXONIQ-1900", ResourceExhausted, 429;
    InvalidSequence = "AXONIQ-2000", OutOfRange, 409;
    PayloadTooLarge = "AXONIQ-2001", InvalidArgument, 400;
    TooManyEvents = "AXONIQ-2002", InvalidArgument, 400;
    // Axon Server answers NOT_FOUND; UNAVAILABLE makes Axon's Java connector retry in 50 ms
    // instead of 5 s, and a context without a leader is a passing state (docs/cluster.md).
    NoLeaderAvailable = "AXONIQ-2100", Unavailable, 503;
    CannotDeleteInternalContext = "AXONIQ-2304", PermissionDenied, 403;
    AlreadyMemberOfCluster = "AXONIQ-2306", AlreadyExists, 406;
    NotAMember = "AXONIQ-2307", FailedPrecondition, 400;
    InvalidContextName = "AXONIQ-2308", InvalidArgument, 400;
    CannotRemoveLastNode = "AXONIQ-2310", FailedPrecondition, 400;
    InvalidPropertyValue = "AXONIQ-2311", InvalidArgument, 400;
    SameNodeName = "AXONIQ-2500", AlreadyExists, 400;
    UnknownHost = "AXONIQ-2501", Unavailable, 400;
    CannotJoin = "AXONIQ-2502", FailedPrecondition, 400;
    UnknownRole = "AXONIQ-2510", InvalidArgument, 400;
    InvalidQuery = "AXONIQ-2511", InvalidArgument, 400;
    EventProcessorNotFound = "AXONIQ-2800", NotFound, 404;
    NoHandlerForCommand = "AXONIQ-4000", NotFound, 500;
    ConnectionToHandlerLost = "AXONIQ-4001", Cancelled, 500;
    CommandTimeout = "AXONIQ-4002", Cancelled, 504;
    CommandDuplicated = "AXONIQ-4005", InvalidArgument, 400;
    NoHandlerForQuery = "AXONIQ-5000", NotFound, 400;
    QueryTimeout = "AXONIQ-5006", Cancelled, 504;
    QueryDuplicated = "AXONIQ-5007", InvalidArgument, 400;
    NoEventStore = "AXONIQ-6000", NotFound, 503;
    ClientDisconnected = "AXONIQ-6001", NotFound, 500;
    NodeNotReadyForBackup = "AXONIQ-7000", Unavailable, 503;
    DatafileReadError = "AXONIQ-9000", Cancelled, 500;
    DatafileWriteError = "AXONIQ-9100", Cancelled, 500;
    InstructionTimeout = "AXONIQ-11000", DeadlineExceeded, 504;
}

impl ErrorCode {
    /// A gRPC status as Axon Server sends it: `[code] message`, with the code in a trailer.
    pub fn status(self, message: impl std::fmt::Display) -> Status {
        let mut metadata = MetadataMap::new();
        metadata.insert(ERROR_CODE_KEY, MetadataValue::from_static(self.code()));
        Status::with_metadata(self.grpc(), format!("[{}] {message}", self.code()), metadata)
    }
}

/// Rebuilds a status received from another process so that only its code, message and Axon
/// error code travel on (not the transport headers of the internal hop).
pub fn relay(status: Status) -> Status {
    let code = status
        .metadata()
        .get(ERROR_CODE_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut metadata = MetadataMap::new();
    if let Some(code) = code.and_then(|c| MetadataValue::try_from(c).ok()) {
        metadata.insert(ERROR_CODE_KEY, code);
    }
    Status::with_metadata(status.code(), status.message().to_owned(), metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_code_text_and_trailer() {
        let status = ErrorCode::InvalidSequence.status("Invalid sequence number 0 for aggregate a, expected 1");
        assert_eq!(status.code(), Code::OutOfRange);
        assert_eq!(
            status.message(),
            "[AXONIQ-2000] Invalid sequence number 0 for aggregate a, expected 1"
        );
        assert_eq!(status.metadata().get(ERROR_CODE_KEY).unwrap(), "AXONIQ-2000");
        let relayed = relay(status);
        assert_eq!(relayed.metadata().get(ERROR_CODE_KEY).unwrap(), "AXONIQ-2000");
        assert_eq!(ErrorCode::parse("AXONIQ-2000"), ErrorCode::InvalidSequence);
        assert_eq!(ErrorCode::parse("nonsense"), ErrorCode::Other);
    }
}
