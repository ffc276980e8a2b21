//! Telling a client's handler streams that the client is gone.
//!
//! The control stream is the only place that knows whether a client is alive (heartbeats), but
//! the client's command and query handlers live on other streams of the same connection. When
//! the control stream gives up on a client it publishes a [`Disconnect`] naming the context and
//! client id; every handler stream listens and ends itself when it serves that client, which
//! takes the normal stream-ended path (handlers unsubscribed, commands in flight fail with
//! AXONIQ-4001). When a context is deleted, one disconnect names the whole context: every
//! control and handler stream of it ends, with CONTEXT_NOT_FOUND. Disconnects are rare, so one
//! broadcast channel for the node is enough; a handler stream that falls behind by more than
//! [`CAPACITY`] disconnects skips the missed ones.

use std::sync::Arc;

use myelin_proto::errors::ErrorCode;
use tokio::sync::broadcast;
use tonic::Status;

/// Disconnects a listener may fall behind by before it misses some.
const CAPACITY: usize = 256;

/// Why streams are being ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// One client stopped heartbeating.
    Inactive,
    /// The context was deleted: every client of it goes.
    ContextDeleted,
}

/// A client given up on by its control stream, or every client of a deleted context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub context: String,
    /// Empty when the whole context goes.
    pub client_id: String,
    /// The control stream's id, `<client_id>.<uuid>`; it names the client in error texts. For a
    /// deleted context, a text naming the context.
    pub client_stream_id: String,
    pub reason: Reason,
}

impl Disconnect {
    /// A client that stopped heartbeating on the control stream `client_stream_id`.
    pub fn inactive(context: &str, client_id: &str, client_stream_id: &str) -> Disconnect {
        Disconnect {
            context: context.to_owned(),
            client_id: client_id.to_owned(),
            client_stream_id: client_stream_id.to_owned(),
            reason: Reason::Inactive,
        }
    }

    /// Every client of a deleted context.
    pub fn context_deleted(context: &str) -> Disconnect {
        Disconnect {
            context: context.to_owned(),
            client_id: String::new(),
            client_stream_id: format!("{context} (context deleted)"),
            reason: Reason::ContextDeleted,
        }
    }

    /// Whether this disconnect is for `client_id` in `context`. A client's disconnect never
    /// matches a stream that has not named its client yet; a context's matches every stream.
    pub fn concerns(&self, context: &str, client_id: &str) -> bool {
        self.context == context
            && match self.reason {
                Reason::Inactive => !client_id.is_empty() && self.client_id == client_id,
                Reason::ContextDeleted => true,
            }
    }

    /// The error a `kind` ("Platform", "Command", "Query") stream ends with.
    pub fn status(&self, kind: &str) -> Status {
        match self.reason {
            Reason::Inactive => {
                ErrorCode::Other.status(format!("{kind} stream inactivity for {}", self.client_stream_id))
            }
            Reason::ContextDeleted => {
                ErrorCode::ContextNotFound.status(format!("context {} was deleted", self.context))
            }
        }
    }
}

/// The node's disconnect channel; clones share it.
#[derive(Clone)]
pub struct Disconnects {
    sender: broadcast::Sender<Arc<Disconnect>>,
}

impl Default for Disconnects {
    fn default() -> Self {
        Disconnects::new()
    }
}

impl Disconnects {
    pub fn new() -> Disconnects {
        Disconnects {
            sender: broadcast::channel(CAPACITY).0,
        }
    }

    /// Tells every handler stream that the client is gone.
    pub fn publish(&self, disconnect: Disconnect) {
        // No listeners is fine: the client had no handler streams.
        let _ = self.sender.send(Arc::new(disconnect));
    }

    /// A listener for disconnects published from now on.
    pub fn listen(&self) -> Listener {
        Listener {
            receiver: self.sender.subscribe(),
        }
    }
}

/// One handler stream's view of the disconnect channel.
pub struct Listener {
    receiver: broadcast::Receiver<Arc<Disconnect>>,
}

impl Listener {
    /// The next disconnect (of any client; the caller checks [`Disconnect::concerns`]).
    /// Cancel-safe, so it can sit in a `select!` next to the stream's reads.
    pub async fn next(&mut self) -> Arc<Disconnect> {
        loop {
            match self.receiver.recv().await {
                Ok(disconnect) => return disconnect,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "handler stream missed client disconnects");
                }
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_hear_disconnects_published_after_they_listen() {
        let disconnects = Disconnects::new();
        disconnects.publish(Disconnect::inactive("c", "early", "early.1"));
        let mut listener = disconnects.listen();
        disconnects.publish(Disconnect::inactive("c", "a", "a.1"));
        let heard = listener.next().await;
        assert_eq!(heard.client_id, "a");
        assert!(heard.concerns("c", "a"));
        assert!(!heard.concerns("other", "a"));
        assert!(!heard.concerns("c", "b"));
        assert!(!heard.concerns("c", ""));
        let status = heard.status("Command");
        assert_eq!(status.message(), "[AXONIQ-0001] Command stream inactivity for a.1");
    }

    #[test]
    fn a_deleted_context_concerns_every_stream_of_it() {
        let deleted = Disconnect::context_deleted("orders");
        assert!(deleted.concerns("orders", "a"));
        assert!(deleted.concerns("orders", ""));
        assert!(!deleted.concerns("billing", "a"));
        let status = deleted.status("Query");
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "[AXONIQ-1302] context orders was deleted");
    }
}
