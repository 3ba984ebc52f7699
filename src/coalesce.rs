//! Batches an h2 connection's writes: what h2 writes is kept, and its first flush yields once
//! to the runtime before the bytes go out, so the frames other tasks queue meanwhile leave in
//! the same TLS records and the same system call. Used on both sides: the proxy's own h2
//! connections to upstreams (`crate::upstream::h2_pool`), and h2 client connections served
//! by hyper (`crate::server`).
//!
//! Without it, each request's task wakes the connection's task as it opens its stream (or
//! answers it), tokio runs that task at once (its LIFO slot), and every request costs a
//! `writev` of its own: measured under 64 busy client connections, 0.9 `writev` per request
//! against 1 per 17 with the yield (upstream side); on the client side (h2load, 4
//! connections x 16 streams, answers from pooled HTTP/1.1 upstream connections) 0.9 against
//! fewer than 1 per 100. The yield costs one pass of the run queue; when nothing else is
//! ready the task is polled again at once.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes kept before writes go through without waiting for a flush.
const LIMIT: usize = 64 * 1024;
/// Buffer capacity kept between bursts.
const KEEP: usize = 16 * 1024;

pub struct Coalesce<IO> {
    io: IO,
    buf: Vec<u8>,
    /// The current flush has yielded once already.
    yielded: bool,
}

impl<IO> Coalesce<IO> {
    pub fn new(io: IO) -> Self {
        Coalesce {
            io,
            buf: Vec::new(),
            yielded: false,
        }
    }
}

impl<IO: AsyncWrite + Unpin> Coalesce<IO> {
    /// Writes out what is kept.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.drain(..n);
        }
        // A burst's buffer is not kept by a connection that goes quiet.
        if self.buf.capacity() > KEEP {
            self.buf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesce<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesce<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() >= LIMIT {
            std::task::ready!(this.poll_drain(cx))?;
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() && !this.yielded {
            // Back of the run queue: the tasks ready now run (and add their streams) first.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(this.poll_drain(cx))?;
        this.yielded = false;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each write it is given.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn writes_wait_for_the_second_flush_and_leave_together() {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesce::new(Recorder::default());
        let mut pinned = Pin::new(&mut io);
        for frame in [&b"one"[..], b"two"] {
            assert!(matches!(
                pinned.as_mut().poll_write(&mut cx, frame),
                Poll::Ready(Ok(3))
            ));
        }
        assert!(pinned.as_mut().poll_flush(&mut cx).is_pending());
        assert!(pinned.io.writes.is_empty(), "written before the yield");
        // More frames from streams opened meanwhile join the same write.
        assert!(matches!(
            pinned.as_mut().poll_write(&mut cx, b"three"),
            Poll::Ready(Ok(5))
        ));
        assert!(matches!(
            pinned.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(pinned.io.writes, vec![b"onetwothree".to_vec()]);
        // Nothing kept: a flush does not yield.
        assert!(matches!(
            pinned.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        // Past the limit, writes go through without a flush.
        let big = vec![7u8; LIMIT];
        assert!(pinned.as_mut().poll_write(&mut cx, &big).is_ready());
        assert!(pinned.as_mut().poll_write(&mut cx, b"x").is_ready());
        assert_eq!(pinned.io.writes.len(), 2);
        assert_eq!(pinned.io.writes[1].len(), LIMIT);
    }
}
