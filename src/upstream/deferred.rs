//! The stream under every HTTP client of the proxy's but the fast path's own exchange (hyper's
//! pooled client and `h2_pool` at the TCP level, `h1` over a pooled connection), which keeps
//! reading after a write failed.
//!
//! An upstream that ends a connection — an h2 GOAWAY followed by a close, an HTTP/1.1 server
//! answering early and closing — can have its last frames sitting in our receive buffer when
//! our next write meets the reset its close provoked. A client that gives up on the first
//! write error never reads them, so streams the upstream had answered, or had told us by
//! GOAWAY it never processed (safe to send again, RFC 9113 §6.8), all fail alike as "broken
//! pipe", and a non-idempotent request cannot be retried. Here a write that fails because the
//! peer is gone (`EPIPE`, `ECONNRESET`) is reported as written and every later write is
//! dropped; reads go on until the peer's EOF or reset, which end the connection moments
//! later. The frames in between are read, and each stream gets its true outcome.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub struct DeferWriteErrors<IO = TcpStream> {
    inner: IO,
    /// Set once a write met a peer that is gone: writes are dropped from then on.
    peer_gone: bool,
    /// No write since the last completed flush: every byte given has left.
    flushed: bool,
}

impl<IO> DeferWriteErrors<IO> {
    pub fn new(inner: IO) -> Self {
        DeferWriteErrors {
            inner,
            peer_gone: false,
            flushed: true,
        }
    }

    /// The stream, if it can carry another exchange: every byte written has been flushed (a
    /// codec that kept some back would lose them), and no write met a peer that is gone.
    pub fn into_reusable(self) -> Option<IO> {
        (self.flushed && !self.peer_gone).then_some(self.inner)
    }
}

fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for DeferWriteErrors<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for DeferWriteErrors<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flushed = false;
        if this.peer_gone {
            return Poll::Ready(Ok(buf.len()));
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Err(e)) if peer_gone(&e) => {
                this.peer_gone = true;
                Poll::Ready(Ok(buf.len()))
            }
            other => other,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flushed = false;
        let len = || bufs.iter().map(|b| b.len()).sum();
        if this.peer_gone {
            return Poll::Ready(Ok(len()));
        }
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Err(e)) if peer_gone(&e) => {
                this.peer_gone = true;
                Poll::Ready(Ok(len()))
            }
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.peer_gone {
            return Poll::Ready(Ok(()));
        }
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            this.flushed = true;
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.peer_gone {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl Connection for DeferWriteErrors<TcpStream> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A stream is reusable only when every byte written has been flushed: a codec that kept
    /// part of a request back (an upstream that answered before reading it all) would
    /// otherwise leave the next request to be read as the rest of that body.
    #[tokio::test]
    async fn reusable_only_once_flushed() {
        let (ours, _theirs) = tokio::io::duplex(1024);
        let mut io = DeferWriteErrors::new(ours);
        assert!(io.flushed, "nothing written yet");
        io.write_all(b"part of a request").await.unwrap();
        assert!(io.into_reusable().is_none(), "written, not flushed");

        let (ours, _theirs) = tokio::io::duplex(1024);
        let mut io = DeferWriteErrors::new(ours);
        io.write_all(b"a whole request").await.unwrap();
        io.flush().await.unwrap();
        assert!(io.into_reusable().is_some());
    }

    /// A peer that writes its last words and closes with our bytes unread (so its kernel
    /// answers our next segment with a reset): our writes keep "succeeding", and its last
    /// words are still read, then the end of the connection.
    #[tokio::test]
    async fn last_words_are_read_after_the_peer_reset_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut first = [0u8; 5];
            s.read_exact(&mut first).await.unwrap();
            s.write_all(b"goodbye").await.unwrap();
            // Unread bytes in its buffer when it closes: the kernel sends a reset.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        });
        let mut ours = DeferWriteErrors::new(TcpStream::connect(addr).await.unwrap());
        ours.write_all(b"hello").await.unwrap();
        ours.write_all(b"unread").await.unwrap();
        peer.await.unwrap();
        // The peer is gone; writes go on "succeeding" until we read the end.
        for _ in 0..5 {
            ours.write_all(b"more").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(ours.peer_gone, "no write ever met the reset");
        let mut words = [0u8; 7];
        ours.read_exact(&mut words).await.unwrap();
        assert_eq!(&words, b"goodbye");
        let mut rest = Vec::new();
        let end = ours.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
        assert!(end.is_ok() || end.as_ref().is_err_and(peer_gone), "{end:?}");
    }
}
