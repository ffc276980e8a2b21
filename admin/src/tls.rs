//! HTTPS for the admin API: axum served over [`myelin_tls::incoming`]'s connections.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use myelin_tls::TlsConnection;

type Connections = Pin<Box<dyn Stream<Item = std::io::Result<TlsConnection>> + Send>>;

/// The HTTP port's listener, handing axum only connections whose TLS handshake succeeded.
pub struct Listener {
    connections: Connections,
    local: SocketAddr,
}

impl Listener {
    pub fn new(listener: tokio::net::TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Listener> {
        let local = listener.local_addr()?;
        Ok(Listener {
            connections: Box::pin(myelin_tls::incoming(listener, config, false)),
            local,
        })
    }
}

impl axum::serve::Listener for Listener {
    type Io = TlsConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsConnection, SocketAddr) {
        loop {
            match self.connections.next().await {
                Some(Ok(connection)) => {
                    let peer = connection.remote_addr().unwrap_or(self.local);
                    return (connection, peer);
                }
                // axum's own TCP listener logs and goes on the same way.
                Some(Err(e)) => tracing::warn!("accepting an HTTPS connection failed: {e}"),
                // The accepting task only ends when this stream is dropped.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
