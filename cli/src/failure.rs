//! Why a command failed, and the exit code that tells a script which kind of failure it was.
//!
//! The kinds are kept apart because a script reacts differently to each: a refusal (1) will be
//! refused again, a usage error (2) never reached the server, an unreachable server (3) may
//! answer a retry. A request that timed out after it was sent is reported as such, with the
//! warning that it may still have taken effect.

/// A failed command. `Display` is the one-line message printed after `error: `.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The server answered with an error status (4xx/5xx).
    #[error("{message} ({})", code.as_deref().map_or_else(|| format!("HTTP {status}"), str::to_string))]
    Refused {
        status: u16,
        /// The `AXONIQ-xxxx` code, when the server gave one.
        code: Option<String>,
        message: String,
    },
    /// The server answered success, but not in a form this tool understands.
    #[error("unexpected answer from {url}: {reason}")]
    BadAnswer { url: String, reason: String },
    /// Invalid input; nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// No HTTP conversation with the server was possible.
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The request was sent but no complete answer came in time.
    #[error("no answer from {url} within {seconds} s; the request may or may not have taken effect")]
    TimedOut { url: String, seconds: u64 },
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused { .. } | Failure::BadAnswer { .. } => 1,
            Failure::Usage(_) => 2,
            Failure::Unreachable { .. } | Failure::TimedOut { .. } => 3,
        }
    }

    /// A second line for the user when there is an obvious next step.
    pub fn hint(&self, token_given: bool) -> Option<&'static str> {
        match self {
            Failure::Refused { status: 401 | 403, .. } if !token_given => {
                Some("access control is on: give a token with -t/--token, MYELIN_TOKEN or MYELIN_TOKEN_FILE")
            }
            // Admin answers an unknown path with 404 "no such resource: ..."; another server
            // with a bare 404.
            Failure::Refused {
                status: 404,
                code,
                message,
                ..
            } if code.is_none() || message.starts_with("no such resource") => Some(
                "the server does not offer this request: is -S the admin HTTP port (8024) of a Myelin node, \
                 and is the node as new as this tool?",
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_exit_codes() {
        let refused = Failure::Refused {
            status: 400,
            code: Some("AXONIQ-1304".into()),
            message: "context orders already exists".into(),
        };
        assert_eq!(refused.to_string(), "context orders already exists (AXONIQ-1304)");
        assert_eq!(refused.exit_code(), 1);
        let bare = Failure::Refused {
            status: 502,
            code: None,
            message: "Bad Gateway".into(),
        };
        assert_eq!(bare.to_string(), "Bad Gateway (HTTP 502)");
        assert_eq!(Failure::Usage("x".into()).exit_code(), 2);
        let unreachable = Failure::Unreachable {
            url: "http://localhost:1".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(
            unreachable.to_string(),
            "cannot reach http://localhost:1: connection refused"
        );
        assert_eq!(unreachable.exit_code(), 3);
        assert_eq!(
            Failure::TimedOut {
                url: "http://h:1".into(),
                seconds: 5
            }
            .exit_code(),
            3
        );
    }

    #[test]
    fn hints() {
        let denied = Failure::Refused {
            status: 401,
            code: Some("AXONIQ-1000".into()),
            message: "no token".into(),
        };
        assert!(denied.hint(false).unwrap().contains("-t"));
        assert_eq!(denied.hint(true), None);
        let unknown_path = Failure::Refused {
            status: 404,
            code: None,
            message: "Not Found".into(),
        };
        assert!(unknown_path.hint(true).unwrap().contains("8024"));
        let admins_unknown_path = Failure::Refused {
            status: 404,
            code: Some("AXONIQ-0001".into()),
            message: "no such resource: /v1/backup/createControlDbBackup".into(),
        };
        assert!(admins_unknown_path.hint(true).is_some());
        let missing_context = Failure::Refused {
            status: 404,
            code: Some("AXONIQ-1302".into()),
            message: "orders: context not found".into(),
        };
        assert_eq!(missing_context.hint(true), None);
    }
}
