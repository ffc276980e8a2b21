//! Client connections open at once on the client port, bounded.
//!
//! Every other bound on what a client can make the router hold is per connection (streams,
//! flow-control windows) or per node in bytes; the number of connections itself would leave
//! them all unbounded. A connection accepted beyond `myelin.limits.connections` is closed at
//! once (the client's calls fail as on any lost connection and it reconnects with its own
//! backoff, as after a restart),
//! and the router says so in its log, at most once a second. A closed connection frees its place
//! for the next one.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// An accepted connection holding its place until it is dropped.
pub struct Counted<T> {
    io: T,
    _place: OwnedSemaphorePermit,
}

/// The connections of `incoming`, at most `max` open at once; see the module docs.
pub fn limit<S, T, E>(incoming: S, max: usize) -> impl Stream<Item = Result<Counted<T>, E>>
where
    S: Stream<Item = Result<T, E>>,
{
    let places = Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)));
    let last_warning = Arc::new(AtomicU64::new(0));
    incoming.filter_map(move |accepted| {
        let admitted = accepted.map(|io| {
            places
                .clone()
                .try_acquire_owned()
                .ok()
                .map(|place| Counted { io, _place: place })
        });
        if let Ok(None) = admitted {
            warn_at_most_once_a_second(&last_warning, max);
        }
        futures::future::ready(admitted.transpose())
    })
}

fn warn_at_most_once_a_second(last: &AtomicU64, max: usize) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if last.swap(now, Ordering::Relaxed) != now {
        tracing::warn!(
            max,
            "refusing client connections: {max} are open, the maximum (myelin.limits.connections)"
        );
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Counted<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_beyond_the_limit_are_dropped_and_places_come_back() {
        let incoming = futures::stream::iter((0..5).map(Ok::<_, io::Error>));
        let admitted: Vec<_> = limit(incoming, 2).collect().await;
        let admitted: Vec<Counted<i32>> = admitted.into_iter().map(Result::unwrap).collect();
        assert_eq!(admitted.iter().map(|c| c.io).collect::<Vec<_>>(), vec![0, 1]);
        // Errors pass through; a place freed serves the next connection.
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut limited = Box::pin(limit(rx, 1));
        tx.unbounded_send(Err(io::Error::other("accept failed"))).unwrap();
        assert!(limited.next().await.unwrap().is_err());
        tx.unbounded_send(Ok(10)).unwrap();
        let first = limited.next().await.unwrap().unwrap();
        tx.unbounded_send(Ok(11)).unwrap();
        assert!(
            futures::FutureExt::now_or_never(limited.next()).is_none(),
            "11 is dropped while 10 holds the only place"
        );
        drop(first);
        tx.unbounded_send(Ok(12)).unwrap();
        assert_eq!(limited.next().await.unwrap().unwrap().io, 12);
    }
}
