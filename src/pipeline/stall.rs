//! A request body that must keep arriving: `server.body_read_timeout` bounds the wait for
//! each next piece, so a client that stalls an upload cannot hold a connection slot (and an
//! upstream connection) for ever.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::BoxError;

/// The error a stalled body ends with; `pipeline::send` and `body::prepare` map it to 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for {0:?}")]
pub struct BodyStalled(pub Duration);

pin_project_lite::pin_project! {
    pub struct StallGuard<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Sleep,
        idle: Duration,
    }
}

impl<B> StallGuard<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        StallGuard {
            inner,
            sleep: tokio::time::sleep(idle),
            idle,
        }
    }
}

impl<B> Body for StallGuard<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                let idle = *this.idle;
                this.sleep.reset(Instant::now() + idle);
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(*this.idle))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `e` (or one of its sources) is a stalled request body.
pub fn is_stall(e: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(stalled) = e.downcast_ref::<BodyStalled>() {
            return Some(stalled.0);
        }
        next = e.source();
    }
    None
}
