//! Telling a client's handler streams that the client is gone.
//!
//! The control stream is the only place that knows whether a client is alive (heartbeats), but
//! the client's command and query handlers live on other streams of the same connection. When
//! the control stream gives up on a client it publishes a [`Disconnect`] naming the context and
//! client id; every handler stream listens and ends itself when it serves that client, which
//! takes the normal stream-ended path (handlers unsubscribed, commands in flight fail with
//! AXONIQ-4001). Disconnects are rare, so one broadcast channel for the node is enough; a handler
//! stream that falls behind by more than [`CAPACITY`] disconnects skips the missed ones.

use std::sync::Arc;

use tokio::sync::broadcast;

/// Disconnects a listener may fall behind by before it misses some.
const CAPACITY: usize = 256;

/// A client given up on by its control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub context: String,
    pub client_id: String,
    /// The control stream's id, `<client_id>.<uuid>`; it names the client in error texts.
    pub client_stream_id: String,
}

impl Disconnect {
    /// Whether this disconnect is for `client_id` in `context` (an unbound stream matches nothing).
    pub fn concerns(&self, context: &str, client_id: &str) -> bool {
        !client_id.is_empty() && self.context == context && self.client_id == client_id
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
        disconnects.publish(Disconnect {
            context: "c".into(),
            client_id: "early".into(),
            client_stream_id: "early.1".into(),
        });
        let mut listener = disconnects.listen();
        disconnects.publish(Disconnect {
            context: "c".into(),
            client_id: "a".into(),
            client_stream_id: "a.1".into(),
        });
        let heard = listener.next().await;
        assert!(heard.concerns("c", "a"));
        assert!(!heard.concerns("other", "a"));
        assert!(!heard.concerns("c", "b"));
        assert!(!heard.concerns("c", ""));
    }
}
