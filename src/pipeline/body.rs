//! Request bodies on their way upstream (the rules, whatever carried them): a body must keep
//! arriving (`stall`), the proxy frames what it forwards, bodies small enough are kept for a
//! replay after a 401, larger ones keep what they sent for a retry (`Retained`), and what the
//! proxy answers before reading is drained within limits (`DRAIN_*`, by the transports).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http::header::HeaderValue;
use http::Method;
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, BodyStream, StreamBody};

use super::{stall, REPLAY_LIMIT};
use crate::error::ProxyError;
use crate::{BoxError, ProxyBody};

/// The proxy frames the body it forwards (RFC 9112 §6.3, §11.2): hyper's client writes
/// `Content-Length` from the body's exact size, else the chunked coding, so no framing field
/// of the client's is passed on (`Plan::fate` drops them). hyper assumes a GET or HEAD of
/// unknown size has no body; one that has one is sent chunked rather than dropped.
pub(crate) fn frame(head: &mut http::HeaderMap, method: &Method, body: &ProxyBody) {
    let unknown_size = !body.is_end_stream() && body.size_hint().exact().is_none();
    if unknown_size && matches!(*method, Method::GET | Method::HEAD) {
        head.insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
}

pub(crate) enum Prepared {
    /// The whole body, small enough to send twice.
    Replayable(Bytes),
    Stream(ProxyBody),
}

/// Keeps bodies up to `REPLAY_LIMIT` in memory so a 401 can be replayed; anything larger (by
/// `Content-Length`, or found while reading) streams on without further buffering.
pub(crate) async fn prepare(
    mut body: ProxyBody,
    declared: Option<u64>,
) -> Result<Prepared, ProxyError> {
    if body.is_end_stream() {
        return Ok(Prepared::Replayable(Bytes::new()));
    }
    if declared.is_some_and(|n| n > REPLAY_LIMIT as u64) {
        return Ok(Prepared::Stream(body));
    }
    let mut buffered = BytesMut::new();
    let mut prefix: Vec<Frame<Bytes>> = Vec::new();
    loop {
        match body.frame().await {
            None => return Ok(Prepared::Replayable(buffered.freeze())),
            Some(Err(e)) => {
                if let Some(idle) = stall::is_stall(&*e) {
                    return Err(ProxyError::RequestTimeout(idle));
                }
                return Err(ProxyError::BadRequest(format!(
                    "could not read the request body: {e}"
                )));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    buffered.extend_from_slice(&data);
                    if buffered.len() > REPLAY_LIMIT {
                        prefix.push(Frame::data(buffered.split().freeze()));
                        break;
                    }
                }
                Err(trailers) => {
                    // Trailers end the body; keep everything as a stream (not replayable).
                    prefix.push(Frame::data(buffered.split().freeze()));
                    prefix.push(trailers);
                    break;
                }
            },
        }
    }
    let head_frames = futures_util::stream::iter(prefix.into_iter().map(Ok::<_, BoxError>));
    let rest = BodyStream::new(body);
    let stream = futures_util::StreamExt::chain(head_frames, rest);
    Ok(Prepared::Stream(StreamBody::new(stream).boxed()))
}

/// How much of a request body the proxy answered before reading is read on and thrown away
/// after the answer, at most, and for how long: a client still sending then finishes and
/// reads the answer, where a reset of its stream or connection can cost it the answer (the
/// transports drain; nginx's lingering close does the same for HTTP/1.1).
pub const DRAIN_LIMIT: usize = 8 * 1024 * 1024;
pub const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest wait for each next piece of a body being drained (or `body_read_timeout`, if
/// shorter): a client that is not sending, but waits, is let go soon.
pub const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// How much of a streamed request body is kept while it is sent, so the request can go
/// again when its upstream did not process it (an h2 GOAWAY or REFUSED_STREAM, an HTTP/1.1
/// connection found closed before the request was written) or lost it before answering an
/// idempotent request (`pipeline::send`): as much as an h2 client stream's window, so the
/// proxy never holds more of an upload for a retry than it lets the client have waiting.
pub const RETRY_LIMIT: usize = 256 * 1024;
/// What all streamed bodies together keep for retries, at most: a body that would go over
/// keeps nothing more and is sent once (a red-team run held ~128 MiB per h2 connection of
/// unanswered uploads when the limit was 1 MiB and unshared).
pub const RETRY_BUDGET: usize = 64 * 1024 * 1024;
static RETAINED: Budget = Budget::new(RETRY_BUDGET);

/// Bytes kept for retries, shared by the bodies that keep them.
pub(crate) struct Budget {
    used: std::sync::atomic::AtomicUsize,
    cap: usize,
}

impl Budget {
    pub(crate) const fn new(cap: usize) -> Budget {
        Budget {
            used: std::sync::atomic::AtomicUsize::new(0),
            cap,
        }
    }

    fn take(&self, n: usize) -> bool {
        if self.used.fetch_add(n, Ordering::Relaxed) + n > self.cap {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// A streamed request body that keeps what it has given, up to `RETRY_LIMIT`, until the
/// answer's head is in (`settle`): `again` then makes a body that gives the kept bytes once
/// more and goes on with the rest. One attempt holds the body at a time: a retry waits, when
/// first polled, for the attempt before it to let go of the body (hyper's client can still
/// hold a failed request's body when it reports the failure).
pub(crate) struct Retained {
    /// What the attempt that is sending holds (`None` until it is first polled, and for the
    /// handle that makes attempts).
    state: Option<Kept>,
    shared: Arc<RetainedShared>,
    /// An attempt after the first: it gives the kept bytes again before the rest.
    retry: bool,
    /// The next kept chunk to give again (`usize::MAX`: none).
    replay: usize,
    replay_trailers: bool,
}

struct RetainedShared {
    idle: Mutex<Idle>,
    /// More than could be kept went, or the answer's head is in (`settle`): no attempt
    /// follows.
    spent: AtomicBool,
    hint: http_body::SizeHint,
}

/// The body while no attempt holds it, and the retry waiting for it.
struct Idle {
    kept: Option<Kept>,
    waiter: Option<std::task::Waker>,
}

struct Kept {
    chunks: Vec<Bytes>,
    kept: usize,
    trailers: Option<http::HeaderMap>,
    ended: bool,
    rest: ProxyBody,
    budget: &'static Budget,
}

/// A retry found that more of the body had gone than was kept.
#[derive(Debug, thiserror::Error)]
#[error("not sent again: its body had streamed past what is kept for a retry")]
struct NotKept;

impl Retained {
    /// The handle that makes the attempts' bodies (`again`) of `body`.
    pub(crate) fn new(body: ProxyBody) -> Retained {
        Retained::within(body, &RETAINED)
    }

    fn within(body: ProxyBody, budget: &'static Budget) -> Retained {
        let hint = body.size_hint();
        let kept = Kept {
            chunks: Vec::new(),
            kept: 0,
            trailers: None,
            ended: false,
            rest: body,
            budget,
        };
        Retained {
            state: None,
            shared: Arc::new(RetainedShared {
                idle: Mutex::new(Idle {
                    kept: Some(kept),
                    waiter: None,
                }),
                spent: AtomicBool::new(false),
                hint,
            }),
            retry: false,
            replay: usize::MAX,
            replay_trailers: false,
        }
    }

    /// The body for the next attempt: the first, or one that gives again all the previous
    /// attempts gave. `None` when that is no longer possible (more went than was kept, or
    /// the exchange settled).
    pub(crate) fn again(&self, first: bool) -> Option<ProxyBody> {
        if self.shared.spent.load(Ordering::Relaxed) {
            return None;
        }
        Some(
            Retained {
                state: None,
                shared: Arc::clone(&self.shared),
                retry: !first,
                replay: usize::MAX,
                replay_trailers: false,
            }
            .boxed(),
        )
    }

    /// The answer's head is in: nothing more is kept, and what was is let go.
    pub(crate) fn settle(&self) {
        self.shared.spent.store(true, Ordering::Relaxed);
        if let Some(kept) = lock(&self.shared.idle).kept.as_mut() {
            kept.release();
        }
    }
}

impl Kept {
    /// Keeps `data` for another attempt, within `RETRY_LIMIT` and `RETRY_BUDGET`; `false`
    /// past either (the body cannot be sent again).
    fn keep(&mut self, data: &Bytes) -> bool {
        let n = data.len();
        if n == 0 {
            return true;
        }
        if self.kept + n > RETRY_LIMIT || !self.budget.take(n) {
            return false;
        }
        self.kept += n;
        self.chunks.push(data.clone());
        true
    }

    /// Lets go of what was kept.
    fn release(&mut self) {
        self.budget.give_back(self.kept);
        self.chunks = Vec::new();
        self.kept = 0;
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.budget.give_back(self.kept);
    }
}

impl http_body::Body for Retained {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.state.is_none() {
            let mut idle = lock(&this.shared.idle);
            let Some(kept) = idle.kept.take() else {
                // The attempt before still holds it: woken when it lets go.
                idle.waiter = Some(cx.waker().clone());
                return Poll::Pending;
            };
            if this.retry && this.shared.spent.load(Ordering::Relaxed) {
                idle.kept = Some(kept);
                return Poll::Ready(Some(Err(Box::new(NotKept))));
            }
            if this.retry {
                (this.replay, this.replay_trailers) = (0, true);
            }
            this.state = Some(kept);
        }
        let Some(kept) = this.state.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(chunk) = kept.chunks.get(this.replay) {
            this.replay += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        this.replay = usize::MAX;
        if kept.ended {
            let trailers = kept.trailers.as_ref().filter(|_| this.replay_trailers);
            let frame = trailers.map(|t| Ok(Frame::trailers(t.clone())));
            this.replay_trailers = false;
            return Poll::Ready(frame);
        }
        this.replay_trailers = false;
        // Spent (more went than could be kept, or the answer's head is in): nothing is kept.
        let spent = this.shared.spent.load(Ordering::Relaxed);
        if spent && !kept.chunks.is_empty() {
            kept.release();
        }
        let frame = match std::pin::Pin::new(&mut kept.rest).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                kept.ended = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(trailers) = frame.trailers_ref() {
            kept.ended = true;
            kept.trailers = Some(trailers.clone());
        } else if let Some(data) = frame.data_ref() {
            if !spent && !kept.keep(data) {
                this.shared.spent.store(true, Ordering::Relaxed);
                kept.release();
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            Some(kept) => {
                self.replay >= kept.chunks.len()
                    && !self.replay_trailers
                    && (kept.ended || kept.rest.is_end_stream())
            }
            None => false,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.shared.hint
    }
}

impl Drop for Retained {
    fn drop(&mut self) {
        if let Some(kept) = self.state.take() {
            let mut idle = lock(&self.shared.idle);
            idle.kept = Some(kept);
            let waiter = idle.waiter.take();
            drop(idle);
            if let Some(waiter) = waiter {
                waiter.wake();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A streamed body of `chunks`, then `trailers` if any.
    fn streamed(chunks: &[&'static [u8]], trailers: Option<http::HeaderMap>) -> ProxyBody {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        frames.extend(trailers.map(|t| Ok(Frame::trailers(t))));
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    async fn read(body: &mut ProxyBody, frames: usize) -> (Vec<u8>, Option<http::HeaderMap>) {
        let (mut data, mut trailers) = (Vec::new(), None);
        for _ in 0..frames {
            let Some(frame) = body.frame().await else {
                break;
            };
            match frame.unwrap().into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        (data, trailers)
    }

    #[tokio::test]
    async fn an_attempt_after_a_failed_one_sends_the_whole_body_again() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        let retained = Retained::new(streamed(&[b"ab", b"cd", b"ef"], Some(trailers)));
        let mut first = retained.again(true).unwrap();
        assert_eq!(read(&mut first, 2).await.0, b"abcd");
        // Held by the first attempt: the second waits for it to let go.
        let mut second = retained.again(false).unwrap();
        assert!(futures_util::FutureExt::now_or_never(second.frame()).is_none());
        drop(first);
        let (data, trailers) = read(&mut second, 10).await;
        assert_eq!(data, b"abcdef");
        assert_eq!(trailers.unwrap()["x-sum"], "1");
        drop(second);
        // And once more, all of it from what was kept.
        let (data, trailers) = read(&mut retained.again(false).unwrap(), 10).await;
        assert_eq!(
            (data.as_slice(), trailers.is_some()),
            (&b"abcdef"[..], true)
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_or_settled_is_not_sent_again() {
        let big: &'static [u8] = Box::leak(vec![b'x'; RETRY_LIMIT].into_boxed_slice());
        let retained = Retained::new(streamed(&[big, b"y"], None));
        let mut first = retained.again(true).unwrap();
        assert_eq!(read(&mut first, 1).await.0.len(), RETRY_LIMIT);
        drop(first);
        let mut second = retained.again(false).unwrap();
        assert_eq!(read(&mut second, 10).await.0.len(), RETRY_LIMIT + 1);
        drop(second);
        assert!(
            retained.again(false).is_none(),
            "more than RETRY_LIMIT went"
        );

        // All bodies together keep at most their budget; what one gives back, another can
        // keep.
        static BUDGET: Budget = Budget::new(5);
        let full = Retained::within(streamed(&[b"abc", b"d"], None), &BUDGET);
        let other = Retained::within(streamed(&[b"xyz"], None), &BUDGET);
        read(&mut full.again(true).unwrap(), 10).await;
        read(&mut other.again(true).unwrap(), 10).await;
        assert!(full.again(false).is_some());
        assert!(other.again(false).is_none(), "over the budget");
        drop(full);
        let after = Retained::within(streamed(&[b"xyz"], None), &BUDGET);
        read(&mut after.again(true).unwrap(), 10).await;
        assert!(after.again(false).is_some(), "the budget was given back");

        let retained = Retained::new(streamed(&[b"ab"], None));
        let mut first = retained.again(true).unwrap();
        assert_eq!(read(&mut first, 1).await.0, b"ab");
        drop(first);
        retained.settle();
        assert!(retained.again(false).is_none(), "settled");
    }
}
