//! Unix-socket streams for the node's internal gRPC links that do not wake on every read by the
//! peer.
//!
//! Linux wakes a Unix stream socket's writers each time its peer consumes data, whenever the
//! socket is writable, which on an idle link is always. tokio registers every socket for
//! writability, so with `tokio::net::UnixStream` each message the eventstore reads wakes the
//! router's thread once more (and each reply the router reads wakes the eventstore's), for
//! nothing: two extra sleeps and wake-ups per append, each costing tens of microseconds of CPU and
//! latency on a virtual machine. TCP has no such wake-up (it signals space only after a write
//! found the buffer full), so this is a Unix-socket matter only.
//!
//! [`QuietUnixStream`] registers the socket for readability only and writes without asking
//! first. Only when a write finds the buffer full does it register a duplicate of the descriptor
//! for writability, wait on that, and drop the registration again once the write went through. So
//! a link waits for space exactly when it has to and never otherwise.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected Unix stream registered for readability only; see the module docs.
#[derive(Debug)]
pub struct QuietUnixStream {
    /// The socket, registered with the runtime for readability.
    socket: AsyncFd<UnixStream>,
    /// A duplicate of the socket, registered for writability only while a write waits for space.
    space: Option<AsyncFd<UnixStream>>,
}

impl QuietUnixStream {
    /// Takes over a connected socket (made non-blocking here). Must be called within a tokio
    /// runtime with I/O enabled.
    pub fn new(socket: UnixStream) -> io::Result<QuietUnixStream> {
        socket.set_nonblocking(true)?;
        Ok(QuietUnixStream {
            socket: register(socket, Interest::READABLE)?,
            space: None,
        })
    }

    /// Takes over a socket accepted by a tokio listener.
    pub fn from_tokio(socket: tokio::net::UnixStream) -> io::Result<QuietUnixStream> {
        QuietUnixStream::new(socket.into_std()?)
    }

    /// Connects to the socket at `path`.
    pub async fn connect(path: impl AsRef<Path>) -> io::Result<QuietUnixStream> {
        QuietUnixStream::from_tokio(tokio::net::UnixStream::connect(path).await?)
    }

    /// Writes with `write` until it does not find the buffer full, waiting for space on the
    /// writability registration in between.
    fn poll_with_space<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&UnixStream) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            match write(self.socket.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => {
                    // Space again: stop listening for it, so that reads by the peer wake no one.
                    self.space = None;
                    return Poll::Ready(done);
                }
            }
            if self.space.is_none() {
                let duplicate = self.socket.get_ref().try_clone()?;
                self.space = Some(register(duplicate, Interest::WRITABLE)?);
            }
            let space = self.space.as_ref().expect("registered above");
            let mut ready = ready!(space.poll_write_ready(cx))?;
            // Readiness is edge-triggered: forget it before trying, so that another full buffer
            // waits for the next edge instead of spinning.
            ready.clear_ready();
        }
    }
}

/// Registers `socket` with the runtime's reactor for `interest` only.
///
/// tokio 1.54 deprecates its safe constructors because an arbitrary `AsRawFd` type could close or
/// swap its descriptor while registered. A `UnixStream` owns its descriptor and returns that same
/// one until it is dropped, which happens only after the `AsyncFd` deregistered it: the condition
/// the unsafe replacement asks callers to promise holds by construction here.
#[allow(deprecated)]
fn register(socket: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    AsyncFd::with_interest(socket, interest)
}

impl AsyncRead for QuietUnixStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut ready = ready!(this.socket.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match ready.try_io(|socket| socket.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for QuietUnixStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_with_space(cx, |mut socket| socket.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_with_space(cx, |mut socket| socket.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket: nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

impl tonic::transport::server::Connected for QuietUnixStream {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// HTTP/2 flow-control windows of the internal links.
///
/// One internal connection carries the streams of many clients. A stream whose reader stopped
/// (a client that opened a read and never consumes it) keeps up to its stream window unread in
/// the receiver, and in HTTP/2 those bytes also count against the connection's window. With
/// hyper's defaults (2 MiB per stream, 5 MiB per connection) three unread streams took the whole
/// connection window and every other stream of the link stopped with them (issue 15, D1).
///
/// The rule: the connection window is the largest HTTP/2 allows, so that only a stream's own
/// window can ever stop it. An unread stream stalls itself, never its neighbours, and pins at
/// most its stream window in the receiver's memory; the number of such streams is bounded
/// where they are opened (docs/limits.md).
pub mod window {
    /// Largest window HTTP/2 allows (2^31 - 1).
    pub const CONNECTION: u32 = (1 << 31) - 1;
    /// Per stream, eventstore to router: the event reads. Large enough that a stream of 64 KiB
    /// messages never waits on window updates over a Unix socket.
    pub const READ_STREAM: u32 = 256 << 10;
    /// Per stream, router to eventstore: mostly the one stream that carries every append, whose
    /// transactions are up to `max-message-size` (4 MiB by default) each.
    pub const WRITE_STREAM: u32 = 1 << 20;
}

/// A gRPC channel to the Unix socket at `path` over [`QuietUnixStream`]s, connecting lazily
/// (and again after the peer restarts), as tonic's own `unix://` endpoints do. Each channel is a
/// connection of its own, with the windows of [`window`].
pub fn channel(path: &Path) -> io::Result<tonic::transport::Channel> {
    let path = std::sync::Arc::new(std::path::absolute(path)?);
    // The authority is only a name in the requests' headers: the connector decides where they go.
    let endpoint = tonic::transport::Endpoint::from_static("http://localhost")
        .initial_connection_window_size(window::CONNECTION)
        .initial_stream_window_size(window::READ_STREAM);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let path = path.clone();
            async move {
                QuietUnixStream::connect(path.as_path())
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        })),
    )
}

/// Accepted connections of `listener` as [`QuietUnixStream`]s, for
/// `tonic::transport::Server::serve_with_incoming`.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = io::Result<QuietUnixStream>> + Send + 'static {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::UnixListenerStream::new(listener)
        .map(|accepted| accepted.and_then(QuietUnixStream::from_tokio))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// More than a socket buffer holds in one direction, while the reader is slow: every byte
    /// arrives, in order, through the writability wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_buffer_waits_for_space_and_loses_nothing() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut writer = QuietUnixStream::new(a).unwrap();
        let mut reader = QuietUnixStream::new(b).unwrap();
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expected = data.clone();
        let sent = tokio::spawn(async move {
            writer.write_all(&data).await.unwrap();
            writer.shutdown().await.unwrap();
            writer
        });
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 4096];
        loop {
            let n = reader.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            if got.len() % (1 << 20) < 4096 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        let writer = sent.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrive in order");
        assert!(
            writer.space.is_none(),
            "the writability registration is dropped once written"
        );
    }

    /// A gRPC server and client over quiet sockets: the health service answers.
    #[tokio::test]
    async fn grpc_runs_over_quiet_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(incoming(listener)),
        );
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel(&path).unwrap());
        let answer = client
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            answer.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        server.abort();
    }
}
