//! HTTP/1.1 exchanges for `crate::pipeline::send` (hyper's transport: h2 clients, inbound
//! TLS, handed-over connections) on the fast path's own pool (`super::Pool`), so every
//! transport shares one set of keep-alive connections to an upstream that speaks HTTP/1.1.
//!
//! hyper's HTTP/1.1 client codec (`hyper::client::conn::http1`) writes the request and reads
//! the answer, and is driven from the request's own task, as the fast path and `h2_pool` do:
//! no connection task, no dispatch hand-off between tasks, no second pool. A pooled
//! connection is taken for one exchange, the codec set on it, and the response body
//! (`Pooled`) keeps driving it until the body is through. A connection whose exchange
//! finished cleanly (the body read to its end, nothing more read, every request byte
//! flushed, the upstream keeping it alive) goes back to the pool when the body is dropped;
//! any other is closed. A request whose body still streams from the client is the
//! exception (`send`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderValue, HOST};
use http::{Request, Response, Uri};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::deferred::DeferWriteErrors;
use super::stream::UpStream;
use super::Pool;
use crate::ProxyBody;

/// The codec over a pooled connection that keeps reading after a failed write
/// (`super::deferred`): an upstream that answers early and closes is still heard.
type Codec = http1::Connection<TokioIo<DeferWriteErrors<UpStream>>, ProxyBody>;

/// Why an exchange got no answer.
pub enum Failure {
    /// No connection could be made.
    Connect(String),
    /// The connection ended before the request was written: safe to send again, whatever the
    /// method.
    Unsent(String),
    /// The connection closed before any byte of the answer (RFC 9110 §9.2.2: only idempotent
    /// requests may be sent again).
    Lost(String),
    /// Anything else (the request body failed, the answer was malformed).
    Other(hyper::Error),
}

/// Sends `request` (its URI absolute, as the pipeline builds it) to `route`'s upstream on a
/// pooled connection, or a new one; the answer's body drives the connection
/// (`UpstreamBody::Pooled`). The caller bounds the time (the route's timeout).
///
/// A request whose body is already whole (none, or one kept for a replay) is exchanged in
/// this task. One whose body still streams from the client gets a task for its connection,
/// as hyper's pooled client would: its upload must go on whether or not the answer's body
/// is being read (an h2 client that reads the answer only after its upload would otherwise
/// wait on the proxy, and the proxy on it). That connection is not pooled again.
pub async fn send(
    pool: &Arc<Pool>,
    route: &crate::routes::Route,
    mut request: Request<ProxyBody>,
) -> Result<Response<Pooled>, Failure> {
    let in_task = {
        let body = request.body();
        body.is_end_stream()
            || body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= crate::pipeline::REPLAY_LIMIT as u64)
    };
    let mut pooled_ok = true;
    loop {
        let (stream, reused) = match pooled_ok.then(|| pool.checkout(&route.pool_key)) {
            Some(Some(stream)) => (stream, true),
            _ => (
                super::connect(pool, route)
                    .await
                    .map_err(Failure::Connect)?,
                false,
            ),
        };
        let (mut sender, codec) = http1::Builder::new()
            .handshake::<_, ProxyBody>(TokioIo::new(DeferWriteErrors::new(stream)))
            .await
            .map_err(Failure::Other)?;
        let answer = sender.try_send_request(origin_form(request, route));
        let mut answer = std::pin::pin!(answer);
        let mut ended = false;
        let mut codec = Some(codec);
        let result = match codec.as_mut().filter(|_| in_task) {
            // The codec writes the request and reads the answer when polled, here.
            Some(driven) => {
                std::future::poll_fn(|cx| {
                    if !ended && Pin::new(&mut *driven).poll(cx).is_ready() {
                        // The connection is done (closed, or failed); the answer, if it came,
                        // is in.
                        ended = true;
                    }
                    match answer.as_mut().poll(cx) {
                        Poll::Pending if ended => Poll::Ready(None),
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(result) => Poll::Ready(Some(result)),
                    }
                })
                .await
            }
            None => {
                if let Some(codec) = codec.take() {
                    tokio::spawn(async move {
                        if let Err(e) = codec.await {
                            let error = crate::error::chain(&e);
                            tracing::debug!(%error, "upstream connection ended");
                        }
                    });
                }
                Some(answer.await)
            }
        };
        let response = match result {
            Some(Ok(response)) => response,
            Some(Err(mut e)) => match e.take_message() {
                // Never written, on a pooled connection found dead: once more on a new one
                // (the body, streamed or not, is still whole).
                Some(unsent) if reused => {
                    request = unsent;
                    pooled_ok = false;
                    continue;
                }
                _ => return Err(classify(e.into_error())),
            },
            None => return Err(Failure::Lost("the connection closed".into())),
        };
        // A codec still here is driven by the body and may go back to the pool.
        let codec = codec.filter(|_| !ended);
        let home = codec
            .is_some()
            .then(|| (Arc::clone(pool), route.pool_key.clone()));
        return Ok(response.map(|body| Pooled {
            body,
            codec,
            sender,
            home,
            ended: false,
        }));
    }
}

/// The request as HTTP/1.1 puts it to an origin server: the target in origin form and the
/// upstream in `Host` (as the fast path writes them, `Plan::encode_h1`).
fn origin_form(request: Request<ProxyBody>, route: &crate::routes::Route) -> Request<ProxyBody> {
    let (mut parts, body) = request.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    parts.uri = Uri::from(target);
    parts.version = http::Version::HTTP_11;
    if !parts.headers.contains_key(HOST) {
        if let Ok(host) = HeaderValue::from_str(route.config.upstream.authority.as_str()) {
            parts.headers.insert(HOST, host);
        }
    }
    Request::from_parts(parts, body)
}

fn classify(e: hyper::Error) -> Failure {
    if e.is_canceled() {
        Failure::Unsent(crate::error::chain(&e))
    } else if e.is_incomplete_message() || reset(&e) {
        Failure::Lost(crate::error::chain(&e))
    } else {
        Failure::Other(e)
    }
}

/// The upstream reset the connection before any byte of the answer.
fn reset(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            )
        })
}

/// A response body from a pooled HTTP/1.1 connection, driving that connection as it is read.
pub struct Pooled {
    body: Incoming,
    /// `None` once the connection is done.
    codec: Option<Codec>,
    sender: http1::SendRequest<ProxyBody>,
    /// Where the connection goes back to; `None` when it must not be used again.
    home: Option<(Arc<Pool>, Box<str>)>,
    /// The body was read to its end.
    ended: bool,
}

impl Pooled {
    /// The connection is closed when this body is dropped, never used again (an answer that
    /// must have no body: HEAD, 204, 304; an ambiguous one).
    pub fn retire(&mut self) {
        self.home = None;
    }

    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(codec) = &mut self.codec {
            if Pin::new(codec).poll(cx).is_ready() {
                self.codec = None;
                self.home = None;
            }
        }
    }
}

impl http_body::Body for Pooled {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let this = &mut *self;
        // The codec moves the body's bytes from the socket into `body`.
        this.drive(cx);
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            None => this.ended = true,
            Some(Err(_)) => this.home = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    /// Back to the pool, when the exchange finished cleanly: the body read to its end (or one
    /// that had none), the codec idle and wanting the next request (so the upstream keeps the
    /// connection alive and the request was written whole), and no byte read past the answer.
    fn drop(&mut self) {
        let Some((pool, key)) = self.home.take() else {
            return;
        };
        if !(self.ended || self.body.is_end_stream()) {
            return;
        }
        let Some(mut codec) = self.codec.take() else {
            return;
        };
        // One more turn lets the codec settle after the body's end; it reads only what is
        // already there.
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        if Pin::new(&mut codec).poll(&mut cx).is_ready() || !self.sender.is_ready() {
            return;
        }
        let parts = codec.into_parts();
        if !parts.read_buf.is_empty() {
            return;
        }
        if let Some(stream) = parts.io.into_inner().into_reusable() {
            pool.checkin(&key, stream);
        }
    }
}
