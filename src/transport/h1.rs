//! The HTTP/1.1 fast path: a transport. It parses and moves bytes; what a request becomes
//! is the pipeline's (`crate::pipeline`), which this path calls phase by phase.
//!
//! Most traffic through the proxy is small HTTP/1.1 requests. For those to `http://`
//! upstreams, one task per client connection parses the request head in place (httparse),
//! writes the pipeline's plan for the upstream request straight into a buffer, exchanges it
//! on a pooled upstream connection in the same task, and passes the response through with
//! its own framing. No header map, no per-request task hand-off, one read and one write per
//! side.
//!
//! `request` parses heads, `response` reads upstream response heads and writes the client's
//! and the proxy's own errors, `body` scans chunked bodies and ends response heads, `bridge`
//! relays through hyper's client, `deadline` and `prefixed` are the I/O helpers. The
//! upstream pool is `crate::upstream::pool`.
//!
//! `https://` upstreams keep the client side here and use hyper's pooled client (h2 or
//! HTTP/1.1 by ALPN) for the upstream side (`bridge`).
//!
//! Anything this path does not handle itself goes back, with every byte read so far, to
//! `crate::server`, which hands the connection to hyper (`crate::transport::hyper`) for the
//! rest of its life: HTTP/2 (prior knowledge or ALPN), HTTP/1.0, `Transfer-Encoding` or
//! `Expect` on a request, upgrades, request bodies over `REPLAY_LIMIT`, targets outside the
//! plain path-and-query alphabet, two or no `Host` fields or an invalid one, oversized or
//! malformed heads (hyper answers 400/431). The integration tests run on both.

mod body;
mod bridge;
mod deadline;
mod prefixed;
mod request;
mod response;

use std::io;
use std::sync::Arc;
use std::time::Instant;

use crate::upstream::stream::UpStream;
use bytes::Bytes;
use http::header::HeaderValue;
use http::Method;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::error::ProxyError;
use crate::pipeline::plan::Plan;
use crate::pipeline::{
    self, replay, ConnInfo, HeadFacts, InflightGuard, RequestLog, UpstreamFailure,
};
use crate::routes::Route;
use crate::state::{Generation, Shared};
use crate::token::AccessToken;

use body::{ChunkedScanner, Framing};
use deadline::Deadline;
pub use prefixed::Prefixed;
pub use request::rewrite_head;
use request::{parse_request, request_id, text, Head, Parsed, Span};
use response::{read_response_head, write_error};

/// More header fields than this is a 431, as on every transport.
const MAX_HEADERS: usize = crate::http::MAX_FIELDS;
/// Response heads larger than this are a protocol error (502).
const MAX_RESPONSE_HEAD: usize = crate::upstream::MAX_RESPONSE_HEAD;
/// Read-buffer size for either side.
const READ_CHUNK: usize = 16 * 1024;
/// The read buffer's limit while a relayed response streams: the current request (head and a
/// body of at most REPLAY_LIMIT) and what the client pipelined after it.
const MAX_PIPELINED: usize = 256 * 1024;

use crate::pipeline::plan::write_field;

/// Serves one client connection on the fast path while it can. When a request comes that
/// it does not take, it returns the connection, with every byte read so far in front, for
/// `crate::server` to hand to hyper.
pub async fn serve<IO>(
    io: IO,
    conn: ConnInfo,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> Option<Prefixed<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = Connection {
        io,
        info: conn,
        shared: Arc::clone(&shared),
        read: Vec::new(),
        out: Vec::new(),
        up: Vec::new(),
        spans: Vec::new(),
        head_timer: Deadline::default(),
        upstream_timer: Deadline::default(),
    };
    let mut watch_stop = stop;
    match connection.run(&mut watch_stop).await {
        End::HandOver => Some(Prefixed {
            prefix: Bytes::from(connection.read),
            io: connection.io,
        }),
        End::Close | End::Refused(_) => None,
    }
}

enum End {
    Close,
    HandOver,
    /// A head the proxy will not read on (malformed, too large): answered, then closed.
    Refused(ProxyError),
}

struct Connection<IO> {
    io: IO,
    info: ConnInfo,
    shared: Arc<Shared>,
    /// Bytes from the client not yet consumed.
    read: Vec<u8>,
    /// The next thing to write, to the upstream or to the client.
    out: Vec<u8>,
    /// Bytes from the upstream.
    up: Vec<u8>,
    spans: Vec<Span>,
    /// Bounds reading a request head (`server.header_read_timeout`).
    head_timer: Deadline,
    /// Bounds an upstream exchange up to the response head, and each wait for the next bytes
    /// of its body (the route's `timeout`).
    upstream_timer: Deadline,
}

/// An upstream response whose head (and first body bytes) went to the client.
struct Streaming<'g> {
    stream: UpStream,
    /// Where the connection goes back to (`Route::pool_key`).
    pool_key: &'g str,
    framing: Framing,
    /// Body bytes still to come (`Framing::Length`).
    remaining: u64,
    chunked: ChunkedScanner,
    /// Whether the upstream connection can serve another request once the body is through.
    reusable: bool,
    done: bool,
    /// The longest wait for the body's next bytes (the route's `timeout`).
    idle: std::time::Duration,
}

impl<IO> Connection<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run(&mut self, stop: &mut watch::Receiver<bool>) -> End {
        loop {
            if *stop.borrow() {
                return self.close().await;
            }
            let head = match self.read_head(stop).await {
                Ok(head) => head,
                Err(End::Refused(e)) => return self.refuse(e).await,
                Err(end) => return end,
            };
            // Loaded once the request is here: an idle connection picks up a reload.
            let generation = self.shared.load();
            if let Err(end) = self.request(&generation, &head).await {
                return end;
            }
            self.read.drain(..head.head_len + head.body_len);
            // A large body or head grew a buffer: give it back, so idle connections keep
            // little memory.
            if self.read.is_empty() && self.read.capacity() > 2 * READ_CHUNK {
                self.read = Vec::new();
            }
            for buf in [&mut self.out, &mut self.up] {
                if buf.capacity() > 4 * READ_CHUNK {
                    *buf = Vec::new();
                }
            }
            if head.close {
                return self.close().await;
            }
        }
    }

    /// Answers a head the proxy does not read on (the proxy's JSON error, where hyper would
    /// answer with an empty body) and closes: nothing after it on the connection can be
    /// trusted to start where the client meant.
    async fn refuse(&mut self, e: ProxyError) -> End {
        tracing::debug!(peer = %self.info.peer, error = %e, "request head refused");
        let request_id = crate::http::new_request_id();
        write_error(&mut self.out, e, &request_id, true, false);
        let _ = self.io.write_all(&self.out).await;
        self.close().await
    }

    async fn close(&mut self) -> End {
        let _ = self.io.shutdown().await;
        End::Close
    }

    /// Reads until a complete request head is buffered, within the header read timeout
    /// (which also bounds how long an idle keep-alive connection is kept, as in hyper).
    async fn read_head(&mut self, stop: &mut watch::Receiver<bool>) -> Result<Head, End> {
        let (timeout, max_header_bytes) = {
            let generation = self.shared.load();
            let server = &generation.config.server;
            (server.header_read_timeout, server.max_header_bytes)
        };
        // The timeout counts from the first wait for this head, over all its reads.
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.read.is_empty() {
                let too_large = || {
                    End::Refused(ProxyError::HeadTooLarge(format!(
                        "the request head is larger than server.max_header_bytes ({max_header_bytes} bytes)"
                    )))
                };
                match parse_request(&self.read, &mut self.spans) {
                    // Over the limit even though complete (one large read).
                    Parsed::Complete(head) if head.head_len > max_header_bytes => {
                        return Err(too_large())
                    }
                    Parsed::Complete(head) => return Ok(head),
                    Parsed::HandOver => return Err(End::HandOver),
                    Parsed::Refused(e) => return Err(End::Refused(e)),
                    Parsed::Partial if self.read.len() >= max_header_bytes => {
                        return Err(too_large());
                    }
                    Parsed::Partial => {}
                }
            }
            self.read.reserve(READ_CHUNK);
            let read = self
                .head_timer
                .until(deadline, self.io.read_buf(&mut self.read));
            let n = tokio::select! {
                biased;
                r = read => match r {
                    Some(Ok(n)) => n,
                    Some(Err(_)) | None => return Err(End::Close),
                },
                _ = stop.changed() => return Err(self.close().await),
            };
            if n == 0 {
                return Err(End::Close);
            }
        }
    }

    /// Reads the rest of the request body (at most REPLAY_LIMIT, else the request went to
    /// hyper) into the read buffer: it is sent in the same write as the head, and kept for a
    /// replay after a 401. Each wait for more is bounded by `server.body_read_timeout`.
    async fn read_body(
        &mut self,
        head: &Head,
        idle: std::time::Duration,
    ) -> Result<(), Outcome<'static>> {
        let total = head.head_len + head.body_len;
        while self.read.len() < total {
            self.read.reserve(total - self.read.len());
            let deadline = tokio::time::Instant::now() + idle;
            match self
                .head_timer
                .until(deadline, self.io.read_buf(&mut self.read))
                .await
            {
                Some(Ok(0)) | Some(Err(_)) => return Err(Outcome::ClientGone),
                Some(Ok(_)) => {}
                None => return Err(Outcome::Failed(ProxyError::RequestTimeout(idle))),
            }
        }
        Ok(())
    }

    /// Reads the rest of a refused request's body (at most REPLAY_LIMIT on this path) and
    /// throws it away, within `body::DRAIN_TIME` and each piece within `idle`, before the
    /// connection closes: closing on unread bytes makes the kernel reset the connection,
    /// which can cost a client still sending its body the answer it was sent (nginx's
    /// lingering close). The answer's end is signalled first (FIN).
    async fn discard_body(&mut self, head: &Head, idle: std::time::Duration) {
        let _ = self.io.shutdown().await;
        let total = head.head_len + head.body_len;
        let read = async {
            while self.read.len() < total {
                self.read.reserve(total - self.read.len());
                match tokio::time::timeout(idle, self.io.read_buf(&mut self.read)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
            }
        };
        let _ = tokio::time::timeout(crate::pipeline::body::DRAIN_TIME, read).await;
    }

    /// Serves one request whose head is in the read buffer.
    async fn request(&mut self, generation: &Generation, head: &Head) -> Result<(), End> {
        let started = Instant::now();
        let shared = Arc::clone(&self.shared);
        let metrics = &shared.metrics;
        metrics.inflight.inc();
        let inflight = InflightGuard(&metrics.inflight);
        let request_id = request_id(&self.read, head);
        let mut log = RequestLog::default();

        let outcome = self.forward(generation, head, &request_id, &mut log).await;
        let path = text(&self.read[head.path.clone()]);
        let (mut close, mut discard) = (false, false);
        let (status, body) = match outcome {
            Outcome::Forwarded(status, body) => (status, Some(body)),
            Outcome::Failed(e) => {
                log.error = Some(e.to_string());
                // Refused before its body was read (access, route, token, a stalled body):
                // the connection closes after the answer. What is left of the body is read
                // and thrown away first (`body::DRAIN_TIME`), but for a body that stalled.
                let unread = self.read.len() < head.head_len + head.body_len;
                let stalled = matches!(e, ProxyError::RequestTimeout(_));
                let closing = head.close || unread;
                let head_request = head.method == Method::HEAD;
                let status = write_error(&mut self.out, e, &request_id, closing, head_request);
                let written = self.io.write_all(&self.out).await.is_ok();
                discard = written && unread && !stalled;
                close = !written || unread;
                (status, None)
            }
            Outcome::ClientGone => return Err(End::Close),
        };
        crate::pipeline::record(
            &shared,
            self.info,
            &request_id,
            &head.method,
            path,
            status,
            started,
            &log,
        );
        drop(inflight);
        if discard {
            let idle = generation.config.server.body_read_timeout;
            let idle = idle.min(crate::pipeline::body::DRAIN_IDLE);
            self.discard_body(head, idle).await;
        }
        if close {
            return Err(self.close().await);
        }
        match body {
            None => Ok(()),
            Some(body) => self.rest_of_body(body).await,
        }
    }

    /// Moves the rest of a response body to the client (its head went with the outcome).
    async fn rest_of_body(&mut self, body: ResponseBody<'_>) -> Result<(), End> {
        let peer = self.info.peer;
        let ended_early = |e: &dyn std::fmt::Display| {
            tracing::debug!(%peer, error = %e, "response body ended early");
            End::Close
        };
        match body {
            ResponseBody::Direct(mut streaming) => {
                while !streaming.done {
                    self.stream_more(&mut streaming)
                        .await
                        .map_err(|e| ended_early(&e))?;
                }
                if streaming.reusable {
                    self.shared
                        .h1_pool
                        .checkin(streaming.pool_key, streaming.stream);
                }
            }
            ResponseBody::Relayed(mut relay) => {
                while !relay.done {
                    // While the upstream is quiet, watch the client: one that leaves (EOF or an
                    // error; as hyper's default, a half-close counts as leaving) ends the relay,
                    // which resets an h2 upstream's stream. Else a stalled body would hold one
                    // of the shared connection's streams until the upstream gives up. Bytes it
                    // sends meanwhile (a pipelined request) are kept for later.
                    let watch = self.read.len() < MAX_PIPELINED;
                    let piece = bridge::next_piece(&mut relay, &mut self.out);
                    let client = async {
                        if !watch {
                            return std::future::pending().await;
                        }
                        self.read.reserve(READ_CHUNK);
                        self.io.read_buf(&mut self.read).await
                    };
                    tokio::select! {
                        biased;
                        piece = piece => piece.map_err(|e| ended_early(&e))?,
                        read = client => match read {
                            Ok(0) | Err(_) => return Err(End::Close),
                            Ok(_) => continue,
                        },
                    }
                    self.io.write_all(&self.out).await.map_err(|_| End::Close)?;
                }
            }
        }
        Ok(())
    }

    async fn forward<'g>(
        &mut self,
        generation: &'g Generation,
        head: &Head,
        request_id: &HeaderValue,
        log: &mut RequestLog,
    ) -> Outcome<'g> {
        let buf = &self.read;
        let key_header = generation.access.as_ref().map(|a| a.header());
        let mut api_key = None;
        let mut more_api_keys = false;
        let mut provenance = pipeline::browser::Provenance::default();
        for s in &self.spans {
            let (name, value) = (&buf[s.name.clone()], &buf[s.value.clone()]);
            if key_header.is_some_and(|k| name.eq_ignore_ascii_case(k.as_str().as_bytes())) {
                more_api_keys |= api_key.replace(value).is_some();
            } else {
                provenance.note(name, value);
            }
        }
        let facts = HeadFacts {
            method: &head.method,
            path: text(&buf[head.path.clone()]),
            absolute_form: false,
            http11: true,
            host: head.host.clone().map(|h| &buf[h]),
            more_hosts: false,
            authority: None,
            api_key,
            more_api_keys,
            provenance,
            fields: self.spans.len(),
        };
        let admitted = match pipeline::admit(generation, self.info, &facts, log) {
            Ok(admitted) => admitted,
            Err(e) => return Outcome::Failed(e),
        };
        let route = admitted.route;
        let token = match pipeline::admit::token(&admitted, log).await {
            Ok(token) => token,
            Err(e) => return Outcome::Failed(e),
        };
        // Only now, with access decided on the head, is the body read.
        let idle = generation.config.server.body_read_timeout;
        if let Err(outcome) = self.read_body(head, idle).await {
            return outcome;
        }
        let plan = Plan {
            route,
            conn: self.info,
            request_id,
            key_header,
        };
        self.write_request(&plan, head, token.as_deref());
        // `http://` upstreams, and `https://` ones known to speak HTTP/1.1, on the fast
        // path's own pool; the others (h2, or not yet known) through hyper's client.
        let scheme = &route.config.upstream.scheme;
        let fast = *scheme == http::uri::Scheme::HTTP
            || (*scheme == http::uri::Scheme::HTTPS
                && self.shared.h1_pool.speaks(&route.pool_key)
                    == Some(crate::upstream::pool::Speaks::H1));
        if !fast {
            return self
                .forward_via_client(&admitted, &plan, head, token.as_ref(), log)
                .await;
        }
        let mut answer = match self.exchange(route, head).await {
            Ok(answer) => answer,
            Err(e) => return Outcome::Failed(pipeline::upstream_failed(&self.shared, route, e)),
        };
        log.upstream_status = Some(answer.status);
        let status = answer.status;
        // Bodies on this path are at most REPLAY_LIMIT and kept whole: always replayable.
        if let Some(fresh) =
            replay::after_answer(&self.shared, &admitted, status, token.as_ref(), true, log).await
        {
            self.write_request(&plan, head, Some(&fresh));
            // The 401's connection is dropped rather than drained: one reconnect, rarely.
            answer = match self.exchange(route, head).await {
                Ok(answer) => answer,
                Err(e) => {
                    return Outcome::Failed(pipeline::upstream_failed(&self.shared, route, e))
                }
            };
            log.upstream_status = Some(answer.status);
        }

        let mut streaming = Streaming {
            stream: answer.stream,
            pool_key: &route.pool_key,
            framing: answer.framing,
            remaining: match answer.framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunked: ChunkedScanner::default(),
            reusable: answer.keep_alive,
            done: false,
            idle: route.config.timeout,
        };
        // self.out holds the client's response head (read_response_head).
        let first = answer.head_len..self.up.len();
        if answer.status == 403 {
            // The body bytes that came with the head (eGain's error bodies are small).
            pipeline::egain::after_403(&self.shared, &admitted, &self.up[first.clone()]);
        }
        if take_body(&mut streaming, &self.up[first], &mut self.out).is_err() {
            // A malformed chunked body before anything went to the client: a 502, and the
            // upstream connection is dropped (a later malformation closes the client's).
            let what = UpstreamFailure::Protocol("invalid response: malformed chunked body".into());
            return Outcome::Failed(pipeline::upstream_failed(&self.shared, route, what));
        }
        if self.io.write_all(&self.out).await.is_err() {
            return Outcome::ClientGone;
        }
        Outcome::Forwarded(answer.status, ResponseBody::Direct(streaming))
    }

    /// Writes the upstream request (`plan`, with `token`) and its body into `self.out`.
    fn write_request(&mut self, plan: &Plan<'_>, head: &Head, token: Option<&AccessToken>) {
        let body = &self.read[head.head_len..head.head_len + head.body_len];
        plan.encode_h1(
            &head.raw(&self.read, &self.spans),
            token,
            body,
            &mut self.out,
        );
    }

    /// `https://` upstreams: the request in `self.out` goes through hyper's pooled client
    /// (h2 or HTTP/1.1 by ALPN); the response head is written to the client here and its
    /// body relayed by the caller.
    async fn forward_via_client<'g>(
        &mut self,
        admitted: &pipeline::Admitted<'_>,
        plan: &Plan<'_>,
        head: &Head,
        token: Option<&Arc<AccessToken>>,
        log: &mut RequestLog,
    ) -> Outcome<'g> {
        let route = admitted.route;
        let (mut response, mut framing) = match self.send_via(admitted, log).await {
            Ok(answer) => answer,
            Err(e) => return Outcome::Failed(e),
        };
        let status = response.status().as_u16();
        if let Some(fresh) =
            replay::after_answer(&self.shared, admitted, status, token, true, log).await
        {
            drop(response);
            self.write_request(plan, head, Some(&fresh));
            (response, framing) = match self.send_via(admitted, log).await {
                Ok(answer) => answer,
                Err(e) => return Outcome::Failed(e),
            };
        }
        // An h2 upstream need not send a length: such a body is chunked to the client, which
        // also lets its trailers pass.
        if framing == Framing::Close {
            framing = Framing::Chunked;
        }
        self.out.clear();
        bridge::write_head(&mut self.out, &response, framing, head.close);
        let head_len = self.out.len();
        let status = response.status().as_u16();
        // A HEAD, 204 or 304 answer has no body, whatever the upstream sent after its head:
        // nothing of it is read (an h2 upstream's DATA there is its error, not the client's).
        let mut relay = bridge::Relay {
            body: response.into_body(),
            framing,
            done: framing == Framing::Empty,
        };
        if let Err(e) = bridge::take_ready(&mut relay, &mut self.out) {
            // Broken before anything went to the client: a 502 (later, the client connection
            // closes instead).
            tracing::debug!(error = %e, "upstream response body failed");
            let what =
                UpstreamFailure::Protocol("invalid response: malformed response body".into());
            return Outcome::Failed(pipeline::upstream_failed(&self.shared, route, what));
        }
        if status == 403 {
            // The body bytes that came with the head (eGain's error bodies are small).
            pipeline::egain::after_403(&self.shared, admitted, &self.out[head_len..]);
        }
        if self.io.write_all(&self.out).await.is_err() {
            return Outcome::ClientGone;
        }
        Outcome::Forwarded(status, ResponseBody::Relayed(relay))
    }

    /// Sends the request in `self.out` through hyper's client (with the route's timeout).
    async fn send_via(
        &self,
        admitted: &pipeline::Admitted<'_>,
        log: &mut RequestLog,
    ) -> Result<(http::Response<crate::upstream::UpstreamBody>, Framing), ProxyError> {
        let route = admitted.route;
        let out = &self.out;
        let shared = &self.shared;
        let mut broken = None;
        let result = pipeline::send(
            shared,
            admitted,
            || match bridge::hyper_request(out, route) {
                Ok(request) => Some(request),
                Err(e) => {
                    broken = Some(e);
                    None
                }
            },
            log,
        )
        .await;
        match broken {
            Some(e) => Err(e),
            None => result,
        }
    }

    /// Sends `self.out` to the route's upstream and reads the response head into `self.up`.
    /// A reused connection that turns out to be closed is replaced once, for idempotent
    /// requests or when the request could not even be written.
    async fn exchange(&mut self, route: &Route, head: &Head) -> Result<Answer, UpstreamFailure> {
        let pool = &self.shared.h1_pool;
        let timeout = route.config.timeout;
        let attempt = async {
            let mut retried = false;
            loop {
                let (mut stream, reused) = match pool.checkout(&route.pool_key) {
                    Some(stream) => (stream, true),
                    None => (
                        crate::upstream::connect(pool, route)
                            .await
                            .map_err(UpstreamFailure::Connect)?,
                        false,
                    ),
                };
                self.up.clear();
                let mut unwritten = false;
                let written = async {
                    stream.write_all(&self.out).await?;
                    // TLS: the records may still sit in rustls's buffer.
                    stream.flush().await
                };
                let result = match written.await {
                    Ok(()) => {
                        let head_request = head.method == Method::HEAD;
                        let (up, out) = (&mut self.up, &mut self.out);
                        read_response_head(&mut stream, up, out, head_request, head.close).await
                    }
                    Err(e) => {
                        unwritten = true;
                        Err(UpstreamError::Io(e))
                    }
                };
                match result {
                    Ok(h) => {
                        return Ok(Answer {
                            stream,
                            status: h.status,
                            head_len: h.head_len,
                            framing: h.framing,
                            keep_alive: h.keep_alive,
                        })
                    }
                    Err(e) => {
                        let retry = pipeline::may_retry(&head.method, !unwritten);
                        if reused && !retried && self.up.is_empty() && retry {
                            retried = true;
                            continue;
                        }
                        return Err(e.into());
                    }
                }
            }
        };
        let deadline = tokio::time::Instant::now() + timeout;
        match self.upstream_timer.until(deadline, attempt).await {
            Some(result) => result,
            None => Err(UpstreamFailure::Timeout),
        }
    }

    /// Moves the next piece of the response body from the upstream to the client.
    async fn stream_more(&mut self, s: &mut Streaming<'_>) -> io::Result<()> {
        self.up.clear();
        self.up.reserve(READ_CHUNK);
        let deadline = tokio::time::Instant::now() + s.idle;
        let read = s.stream.read_buf(&mut self.up);
        let Some(n) = self.upstream_timer.until(deadline, read).await else {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                crate::upstream::went_quiet(s.idle),
            ));
        };
        let n = n?;
        self.out.clear();
        if n == 0 {
            if s.framing != Framing::Close {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before the body was complete",
                ));
            }
            self.out.extend_from_slice(body::LAST_CHUNK);
            s.done = true;
            s.reusable = false;
        } else {
            take_body(s, &self.up, &mut self.out)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        self.io.write_all(&self.out).await
    }
}

/// The rest of a response whose head went to the client.
enum ResponseBody<'g> {
    /// From a pooled connection to an `http://` upstream.
    Direct(Streaming<'g>),
    /// From hyper's client (`https://` upstreams).
    Relayed(bridge::Relay),
}

enum Outcome<'g> {
    /// Forwarded, with the upstream's status; the head has been written.
    Forwarded(u16, ResponseBody<'g>),
    Failed(ProxyError),
    ClientGone,
}

struct Answer {
    stream: UpStream,
    status: u16,
    head_len: usize,
    framing: Framing,
    keep_alive: bool,
}

/// How an exchange on a pooled connection failed, before the pipeline words it.
#[derive(Debug)]
enum UpstreamError {
    Io(io::Error),
    Protocol(&'static str),
}

impl From<UpstreamError> for UpstreamFailure {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Io(e) => UpstreamFailure::Protocol(format!("connection failed: {e}")),
            UpstreamError::Protocol(m) => {
                UpstreamFailure::Protocol(format!("invalid response: {m}"))
            }
        }
    }
}

/// Appends the part of `input` that belongs to the body to `out`, framed for the client, and
/// notes whether the body is complete.
fn take_body(
    s: &mut Streaming<'_>,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), body::ChunkError> {
    match s.framing {
        Framing::Empty => {
            s.done = true;
            if !input.is_empty() {
                s.reusable = false;
            }
        }
        Framing::Length(_) => {
            let take = (s.remaining.min(input.len() as u64)) as usize;
            out.extend_from_slice(&input[..take]);
            s.remaining -= take as u64;
            s.done = s.remaining == 0;
            if take < input.len() {
                s.reusable = false;
            }
        }
        Framing::Chunked => {
            let taken = s.chunked.scan(input);
            let taken = match taken {
                Ok(n) => n,
                Err(e) => {
                    s.reusable = false;
                    return Err(e);
                }
            };
            out.extend_from_slice(&input[..taken]);
            s.done = s.chunked.is_done();
            if taken < input.len() {
                s.reusable = false;
            }
        }
        Framing::Close => {
            body::write_chunk(out, input);
            s.reusable = false;
        }
    }
    Ok(())
}
