//! Accepting TLS connections on a listening socket.
//!
//! A TLS handshake takes round trips, and a client may never finish one; done one after another
//! in the accept loop, a single silent client would stop the port. So every handshake runs in a
//! task of its own, with a deadline, and at most [`MAX_HANDSHAKES`] at once (connections beyond
//! are closed at once, as the plaintext port's connection limit does); finished connections are
//! handed on in the order they finish. A failed handshake is the client's problem (a client
//! without the CA, or speaking plaintext): it is logged at debug level and the port goes on.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Handshakes in progress at once.
pub const MAX_HANDSHAKES: usize = 256;
/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One accepted connection, its handshake done.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
}

impl TlsConnection {
    /// The client's address.
    pub fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.get_ref().0.peer_addr().ok()
    }
}

/// The connections of `listener`, each after a successful handshake with `config`; ends when
/// the stream is dropped. `nodelay` sets TCP_NODELAY on every connection.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    nodelay: bool,
) -> impl Stream<Item = io::Result<TlsConnection>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<io::Result<TlsConnection>>(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let places = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        let mut last_warning = None;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pass it on (the server decides) and
                    // give the system a moment rather than spin.
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(place) = places.clone().try_acquire_owned() else {
                // At most once a second: a flood of connections must not become a flood of logs.
                let now = std::time::Instant::now();
                if last_warning.is_none_or(|at: std::time::Instant| now.duration_since(at) >= Duration::from_secs(1)) {
                    last_warning = Some(now);
                    tracing::warn!(%peer, "closing connections: {MAX_HANDSHAKES} TLS handshakes are in progress");
                }
                continue;
            };
            if nodelay {
                let _ = tcp.set_nodelay(true);
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(place);
                match handshake {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(TlsConnection { stream })).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake not finished in {HANDSHAKE_TIMEOUT:?}"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

impl AsyncRead for TlsConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.get_ref().0.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use rustls::pki_types::{CertificateDer, ServerName};

    /// A CA, and a certificate for localhost it issued: (CA PEM, certificate PEM, key PEM).
    fn issued() -> (String, String, String) {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        (ca_pem, cert.pem(), key.serialize_pem())
    }

    fn connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    #[tokio::test]
    async fn silent_and_untrusting_clients_do_not_stop_the_port() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = issued();
        let files = crate::files::tests::files(dir.path(), &cert, &key);
        let config = crate::server_config(crate::ReloadingCert::load(files).unwrap(), crate::ALPN_HTTP);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connections = Box::pin(incoming(listener, config, true));

        // One client connects and never speaks; another trusts some other CA.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (stranger_ca, _, _) = issued();
        let stranger = connector(&stranger_ca)
            .connect(
                ServerName::try_from("localhost").unwrap(),
                TcpStream::connect(addr).await.unwrap(),
            )
            .await;
        assert!(stranger.is_err());

        // A client that trusts the CA still gets through, and is the only connection handed on.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let local = tcp.local_addr().unwrap();
        let client = tokio::spawn(async move {
            connector(&ca)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
        });
        let accepted = tokio::time::timeout(Duration::from_secs(5), connections.next())
            .await
            .expect("the trusting client is accepted while the silent one waits")
            .unwrap()
            .unwrap();
        assert_eq!(accepted.remote_addr(), Some(local));
        client.await.unwrap().unwrap();
    }
}
