//! The HTTP/1.1 fast path.
//!
//! Most traffic through the proxy is small HTTP/1.1 requests to a plain-HTTP or pooled
//! upstream. For those, one task per client connection parses the request head in place
//! (httparse), writes the upstream request head straight from those bytes, exchanges it on a
//! pooled upstream connection in the same task, and passes the response through with its own
//! framing. No header map, no per-request task hand-off, one read and one write per side.
//!
//! Anything this path does not handle itself is handed, with every byte read so far, to the
//! general hyper-based path (`crate::proxy`), which then serves the connection for the rest
//! of its life: HTTP/2 (prior knowledge or ALPN), HTTP/1.0, `Transfer-Encoding` or
//! `Expect` on a request, upgrades, request bodies over `REPLAY_LIMIT`, targets outside the
//! plain path-and-query alphabet, `https://` upstreams (h2 by ALPN), oversized or malformed
//! heads (hyper answers 400/431). The two paths apply the same rules; the integration tests
//! run against both.

mod body;
mod pool;

use std::io;
use std::net::IpAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes};
use http::header::HeaderValue;
use http::Method;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::error::ProxyError;
use crate::metrics::{RouteLabels, UpstreamErrorLabels};
use crate::proxy::headers::{is_sane_request_id, new_request_id};
use crate::proxy::{ConnInfo, InflightGuard, RequestLog, REPLAY_LIMIT};
use crate::routes::Route;
use crate::state::{Generation, Shared};
use crate::token::AccessToken;

use body::{ChunkedScanner, Framing};
pub use pool::Pool;

/// As hyper's default: more header fields than this, and the request goes to hyper (431).
const MAX_HEADERS: usize = 100;
/// Response heads larger than this are a protocol error (502).
const MAX_RESPONSE_HEAD: usize = 256 * 1024;
/// Read-buffer size for either side.
const READ_CHUNK: usize = 16 * 1024;

/// Serves one client connection: the fast path while it can, then hyper.
pub async fn serve<IO>(
    io: IO,
    conn: ConnInfo,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stop: watch::Receiver<bool>,
) where
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
    let mut watch_stop = stop.clone();
    if let End::HandOver = connection.run(&mut watch_stop).await {
        let io = Prefixed {
            prefix: Bytes::from(connection.read),
            io: connection.io,
        };
        // Boxed: the fast path's task stays small for the connections that never need hyper.
        Box::pin(crate::server::serve_connection(
            io, conn, shared, &builder, stop,
        ))
        .await;
    }
}

enum End {
    Close,
    HandOver,
}

/// The fast path's per-request head work, for the micro-benchmarks: parses `raw` (one
/// request head), takes a request id, and writes the upstream request for `route` into
/// `out`. `false` when the fast path would hand the request to hyper.
#[doc(hidden)]
pub fn rewrite_head(
    raw: &[u8],
    route: &Route,
    token: Option<&AccessToken>,
    out: &mut Vec<u8>,
) -> bool {
    let mut spans = Vec::new();
    let Parsed::Complete(head) = parse_request(raw, &mut spans) else {
        return false;
    };
    if raw.len() < head.head_len + head.body_len {
        return false;
    }
    let request_id = request_id(raw, &head);
    RequestParts {
        buf: raw,
        head: &head,
        spans: &spans,
        route,
        conn: ConnInfo {
            peer: ([127, 0, 0, 1], 50000).into(),
            tls: false,
        },
        request_id: &request_id,
        key_header: None,
    }
    .write(out, token);
    true
}

/// One header field of the current request: where its name and value are in the read
/// buffer, and what the upstream request does with it.
#[derive(Clone)]
struct Span {
    name: Range<usize>,
    value: Range<usize>,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Passed on as is.
    Keep,
    /// Hop-by-hop or replaced by the proxy.
    Skip,
    /// `X-Forwarded-For`: extended.
    Forwarded,
}

/// A parsed request head (positions are into the read buffer).
struct Head {
    method: Method,
    path: Range<usize>,
    query: Option<Range<usize>>,
    head_len: usize,
    body_len: usize,
    host: Option<Range<usize>>,
    request_id: Option<Range<usize>>,
    close: bool,
    /// `Connection` names fields besides `close`/`keep-alive`: those are hop-by-hop too.
    names_fields: bool,
}

enum Parsed {
    Complete(Head),
    Partial,
    HandOver,
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
    /// Bounds an upstream exchange up to the response head (the route's `timeout`).
    upstream_timer: Deadline,
}

/// A timeout that is cheap to move forward: one timer per connection and purpose, re-armed
/// only when it fires before the current deadline. A fresh tokio timer per request costs a
/// timer-wheel insertion and removal (under the driver's lock) on every request.
#[derive(Default)]
struct Deadline {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    at: Option<tokio::time::Instant>,
}

impl Deadline {
    /// Runs `work` to completion, or gives up (`None`) once `timeout` has passed.
    async fn within<F: std::future::Future>(
        &mut self,
        timeout: std::time::Duration,
        work: F,
    ) -> Option<F::Output> {
        let at = tokio::time::Instant::now() + timeout;
        self.at = Some(at);
        let sleep = match &mut self.sleep {
            // Firing late is never right; firing early is fixed up below.
            Some(sleep) if sleep.deadline() <= at => sleep,
            Some(sleep) => {
                sleep.as_mut().reset(at);
                sleep
            }
            None => self.sleep.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return Some(out),
                _ = sleep.as_mut() => {
                    if tokio::time::Instant::now() >= at {
                        return None;
                    }
                    sleep.as_mut().reset(at);
                }
            }
        }
    }
}

/// An upstream response whose head (and first body bytes) went to the client.
struct Streaming<'g> {
    stream: TcpStream,
    authority: &'g str,
    framing: Framing,
    /// Body bytes still to come (`Framing::Length`).
    remaining: u64,
    chunked: ChunkedScanner,
    /// Whether the upstream connection can serve another request once the body is through.
    reusable: bool,
    done: bool,
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
                Err(end) => return end,
            };
            // Loaded once the request is here: an idle connection picks up a reload.
            let generation = self.shared.load();
            if let Err(end) = self.request(&generation, &head).await {
                return end;
            }
            self.read.drain(..head.head_len + head.body_len);
            if self.read.is_empty() && self.read.capacity() > 2 * READ_CHUNK {
                // A large request body grew the buffer; idle connections keep little memory.
                self.read = Vec::new();
            }
            if head.close {
                return self.close().await;
            }
        }
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
        let mut waited = std::time::Duration::ZERO;
        let first_wait = tokio::time::Instant::now();
        loop {
            if !self.read.is_empty() {
                match parse_request(&self.read, &mut self.spans) {
                    Parsed::Complete(head) => return Ok(head),
                    Parsed::HandOver => return Err(End::HandOver),
                    Parsed::Partial if self.read.len() >= max_header_bytes => {
                        // hyper answers 431.
                        return Err(End::HandOver);
                    }
                    Parsed::Partial => {}
                }
            }
            self.read.reserve(READ_CHUNK);
            // The timeout counts from the first wait for this head, over all its reads.
            let left = timeout.saturating_sub(waited);
            let read = self
                .head_timer
                .within(left, self.io.read_buf(&mut self.read));
            let n = tokio::select! {
                biased;
                r = read => match r {
                    Some(Ok(n)) => n,
                    Some(Err(_)) | None => return Err(End::Close),
                },
                _ = stop.changed() => return Err(self.close().await),
            };
            waited = first_wait.elapsed();
            if n == 0 {
                return Err(End::Close);
            }
        }
    }

    /// Serves one request whose head is in the read buffer.
    async fn request(&mut self, generation: &Generation, head: &Head) -> Result<(), End> {
        // The body (at most REPLAY_LIMIT, else the request went to hyper) is read whole: it is
        // sent in the same write as the head, and kept for a replay after a 401.
        let total = head.head_len + head.body_len;
        while self.read.len() < total {
            self.read.reserve(total - self.read.len());
            match self.io.read_buf(&mut self.read).await {
                Ok(0) | Err(_) => return Err(End::Close),
                Ok(_) => {}
            }
        }

        let started = Instant::now();
        let shared = Arc::clone(&self.shared);
        let metrics = &shared.metrics;
        metrics.inflight.inc();
        let inflight = InflightGuard(&metrics.inflight);
        let request_id = request_id(&self.read, head);
        let mut log = RequestLog::default();

        let outcome = self.forward(generation, head, &request_id, &mut log).await;
        let path = text(&self.read[head.path.clone()]);
        let (status, streaming) = match outcome {
            Outcome::HandOver => return Err(End::HandOver),
            Outcome::Streaming(status, streaming) => (status, Some(streaming)),
            Outcome::Failed(e) => {
                log.error = Some(e.to_string());
                let status = write_error(&mut self.out, e, &request_id, head.close);
                if self.io.write_all(&self.out).await.is_err() {
                    return Err(End::Close);
                }
                (status, None)
            }
            Outcome::ClientGone => return Err(End::Close),
        };
        crate::proxy::record(
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
        let Some(mut streaming) = streaming else {
            return Ok(());
        };
        while !streaming.done {
            if let Err(e) = self.stream_more(&mut streaming).await {
                tracing::debug!(peer = %self.info.peer, error = %e, "response body ended early");
                return Err(End::Close);
            }
        }
        if streaming.reusable {
            self.shared
                .h1_pool
                .checkin(streaming.authority, streaming.stream);
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
        let path = text(&buf[head.path.clone()]);
        if let Err(e) = crate::proxy::path::validate(path) {
            return Outcome::Failed(ProxyError::BadRequest(e.message().into()));
        }
        if let Some(access) = &generation.access {
            let name = access.header().as_str();
            let key = self
                .spans
                .iter()
                .find(|s| buf[s.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
                .map(|s| &buf[s.value.clone()]);
            if let Err(e) = access.check_key(self.info.peer.ip(), key) {
                return Outcome::Failed(e);
            }
        }
        let host = head.host.clone().map(|h| text(&buf[h]));
        let Some((_, route)) = generation.routes.find(&head.method, host, path) else {
            return Outcome::Failed(ProxyError::NoRoute {
                method: head.method.to_string(),
                path: path.to_owned(),
            });
        };
        if route.config.upstream.scheme != http::uri::Scheme::HTTP {
            // TLS upstreams may speak h2 (ALPN): hyper's client serves those.
            return Outcome::HandOver;
        }
        log.route = Some(route.config.name.clone());
        log.profile = route.config.profile.clone();

        let holder = match &route.config.profile {
            Some(profile) => match generation.tokens.get(profile) {
                Some(holder) => Some((profile.as_str(), holder)),
                None => {
                    return Outcome::Failed(ProxyError::UpstreamUnreachable {
                        route: route.config.name.clone(),
                        detail: format!("profile {profile} has no token holder"),
                    })
                }
            },
            None => None,
        };
        let token = match holder {
            Some((profile, holder)) => match holder.get(profile).await {
                Ok(t) => Some(t),
                Err(e) => return Outcome::Failed(ProxyError::TokenUnavailable(e)),
            },
            None => None,
        };
        log.fingerprint = token.as_ref().map(|t| t.fingerprint.clone());

        let request = RequestParts {
            buf: &self.read,
            head,
            spans: &self.spans,
            route,
            conn: self.info,
            request_id,
            key_header: generation.access.as_ref().map(|a| a.header()),
        };
        request.write(&mut self.out, token.as_deref());
        let mut answer = match self.exchange(route, head).await {
            Ok(answer) => answer,
            Err(e) => return Outcome::Failed(self.upstream_failed(route, e)),
        };
        log.upstream_status = Some(answer.status);

        if answer.status == 401 && route.config.retry_on_401 {
            if let (Some((profile, holder)), Some(sent)) = (holder, &token) {
                if let Some(fresh) =
                    crate::proxy::fresh_token_after_401(holder, profile, sent).await
                {
                    log.replayed = true;
                    log.fingerprint = Some(fresh.fingerprint.clone());
                    self.shared
                        .metrics
                        .replays
                        .get_or_create(&RouteLabels {
                            route: route.config.name.clone(),
                        })
                        .inc();
                    let request = RequestParts {
                        buf: &self.read,
                        head,
                        spans: &self.spans,
                        route,
                        conn: self.info,
                        request_id,
                        key_header: generation.access.as_ref().map(|a| a.header()),
                    };
                    request.write(&mut self.out, Some(&fresh));
                    // The 401's connection is dropped rather than drained: one reconnect, rarely.
                    answer = match self.exchange(route, head).await {
                        Ok(answer) => answer,
                        Err(e) => return Outcome::Failed(self.upstream_failed(route, e)),
                    };
                    log.upstream_status = Some(answer.status);
                }
            }
        }

        let mut streaming = Streaming {
            stream: answer.stream,
            authority: route.config.upstream.authority.as_str(),
            framing: answer.framing,
            remaining: match answer.framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunked: ChunkedScanner::default(),
            reusable: answer.keep_alive,
            done: false,
        };
        // self.out holds the client's response head (read_response_head).
        let first = answer.head_len..self.up.len();
        if let Err(e) = take_body(&mut streaming, &self.up[first], &mut self.out) {
            // A malformed chunked body right at the start: the client gets what is valid and
            // the connection closes.
            tracing::debug!(error = %e, "upstream response body is malformed");
            streaming.reusable = false;
        }
        if self.io.write_all(&self.out).await.is_err() {
            return Outcome::ClientGone;
        }
        Outcome::Streaming(answer.status, streaming)
    }

    /// Sends `self.out` to the route's upstream and reads the response head into `self.up`.
    /// A reused connection that turns out to be closed is replaced once, for idempotent
    /// requests or when the request could not even be written.
    async fn exchange(&mut self, route: &Route, head: &Head) -> Result<Answer, UpstreamError> {
        let pool = &self.shared.h1_pool;
        let timeout = route.config.timeout;
        let attempt = async {
            let authority = &route.config.upstream.authority;
            let idempotent = matches!(
                head.method,
                Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
            );
            let mut retried = false;
            loop {
                let (mut stream, reused) = match pool.checkout(authority.as_str()) {
                    Some(stream) => (stream, true),
                    None => (
                        pool::connect(authority, route.config.connect_timeout)
                            .await
                            .map_err(UpstreamError::Connect)?,
                        false,
                    ),
                };
                self.up.clear();
                let mut unwritten = false;
                let result = match stream.write_all(&self.out).await {
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
                        if reused && !retried && self.up.is_empty() && (idempotent || unwritten) {
                            retried = true;
                            continue;
                        }
                        return Err(e);
                    }
                }
            }
        };
        match self.upstream_timer.within(timeout, attempt).await {
            Some(result) => result,
            None => Err(UpstreamError::Timeout),
        }
    }

    fn upstream_failed(&self, route: &Route, e: UpstreamError) -> ProxyError {
        let name = &route.config.name;
        let kind = match &e {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Io(_) | UpstreamError::Protocol(_) => "protocol",
        };
        self.shared
            .metrics
            .upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                route: name.clone(),
                kind,
            })
            .inc();
        match e {
            UpstreamError::Timeout => ProxyError::UpstreamTimeout {
                route: name.clone(),
                timeout: route.config.timeout,
            },
            UpstreamError::Connect(e) => ProxyError::UpstreamUnreachable {
                route: name.clone(),
                detail: format!("cannot connect: {e}"),
            },
            UpstreamError::Io(e) => ProxyError::UpstreamUnreachable {
                route: name.clone(),
                detail: format!("connection failed: {e}"),
            },
            UpstreamError::Protocol(m) => ProxyError::UpstreamUnreachable {
                route: name.clone(),
                detail: format!("invalid response: {m}"),
            },
        }
    }

    /// Moves the next piece of the response body from the upstream to the client.
    async fn stream_more(&mut self, s: &mut Streaming<'_>) -> io::Result<()> {
        self.up.clear();
        self.up.reserve(READ_CHUNK);
        let n = s.stream.read_buf(&mut self.up).await?;
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

enum Outcome<'g> {
    Streaming(u16, Streaming<'g>),
    Failed(ProxyError),
    HandOver,
    ClientGone,
}

struct Answer {
    stream: TcpStream,
    status: u16,
    head_len: usize,
    framing: Framing,
    keep_alive: bool,
}

#[derive(Debug)]
enum UpstreamError {
    Connect(io::Error),
    Io(io::Error),
    Protocol(&'static str),
    Timeout,
}

struct ResponseHead {
    status: u16,
    head_len: usize,
    framing: Framing,
    keep_alive: bool,
}

/// Reads the upstream's response head into `up` and writes the client's version of it into
/// `out` (the request there has been sent).
async fn read_response_head(
    stream: &mut TcpStream,
    up: &mut Vec<u8>,
    out: &mut Vec<u8>,
    head_request: bool,
    client_close: bool,
) -> Result<ResponseHead, UpstreamError> {
    loop {
        if !up.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(up) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = response.code.unwrap_or(0);
                    if status == 101 {
                        return Err(UpstreamError::Protocol(
                            "unexpected 101 Switching Protocols",
                        ));
                    }
                    if (100..200).contains(&status) {
                        // Interim responses (100, 103) are not passed on; the final one follows.
                        up.drain(..n);
                        continue;
                    }
                    let framing = body::response_framing(head_request, status, response.headers)
                        .map_err(UpstreamError::Protocol)?;
                    let keep_alive = response.version == Some(1)
                        && !has_token(response.headers, "connection", b"close");
                    out.clear();
                    write_client_head(out, &response, framing, client_close);
                    return Ok(ResponseHead {
                        status,
                        head_len: n,
                        framing,
                        keep_alive,
                    });
                }
                Ok(httparse::Status::Partial) if up.len() > MAX_RESPONSE_HEAD => {
                    return Err(UpstreamError::Protocol("response head too large"));
                }
                Ok(httparse::Status::Partial) => {}
                Err(_) => return Err(UpstreamError::Protocol("malformed response head")),
            }
        }
        up.reserve(READ_CHUNK);
        match stream.read_buf(up).await {
            Ok(0) => {
                return Err(UpstreamError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection without a response",
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(UpstreamError::Io(e)),
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

/// Everything needed to write the upstream request.
struct RequestParts<'a> {
    buf: &'a [u8],
    head: &'a Head,
    spans: &'a [Span],
    route: &'a Route,
    conn: ConnInfo,
    request_id: &'a HeaderValue,
    /// The API key header (`[server.access]`), never passed on.
    key_header: Option<&'a http::HeaderName>,
}

impl RequestParts<'_> {
    /// The upstream request: request line with the upstream target, `Host` = upstream
    /// authority, the client's end-to-end fields minus those the route removes or sets,
    /// `X-Forwarded-*`, `x-request-id`, the route's fields, the token, then the body.
    fn write(&self, out: &mut Vec<u8>, token: Option<&AccessToken>) {
        let buf = self.buf;
        let head = self.head;
        let route = &self.route.config;
        let path = text(&buf[head.path.clone()]);
        let query = head.query.clone().map(|q| text(&buf[q]));
        out.clear();
        out.extend_from_slice(head.method.as_str().as_bytes());
        out.push(b' ');
        // As Route::upstream_path_and_query, without building a String.
        let base = route.upstream.base_path.as_bytes();
        let tail = self.route.upstream_tail(path).as_bytes();
        if base.is_empty() && tail.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(base);
        out.extend_from_slice(tail);
        if let Some(query) = query {
            out.push(b'?');
            out.extend_from_slice(query.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(route.upstream.authority.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");

        let removed = |name: &[u8]| {
            route
                .remove_headers
                .iter()
                .chain(route.set_headers.iter().map(|(n, _)| n))
                .chain(self.key_header)
                .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
        };
        for span in self.spans {
            if span.kind != Kind::Keep {
                continue;
            }
            let name = &buf[span.name.clone()];
            if removed(name) {
                continue;
            }
            let value = &buf[span.value.clone()];
            if head.names_fields && self.conn_listed(name) {
                continue;
            }
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        let sets = |name: &str| route.set_headers.iter().any(|(n, _)| n.as_str() == name);
        if !sets("x-forwarded-for") {
            out.extend_from_slice(b"x-forwarded-for: ");
            // Several X-Forwarded-For lines are one list (RFC 9110 §5.3), extended when its
            // first line is not blank (as proxy::headers::set_forwarded).
            if !removed(b"x-forwarded-for") {
                let mut list = self
                    .spans
                    .iter()
                    .filter(|s| s.kind == Kind::Forwarded)
                    .map(|s| &buf[s.value.clone()]);
                if let Some(first) = list.next().filter(|v| !body::trim(v).is_empty()) {
                    for value in std::iter::once(first).chain(list) {
                        out.extend_from_slice(value);
                        out.extend_from_slice(b", ");
                    }
                }
            }
            write_ip(out, self.conn.peer.ip().to_canonical());
            out.extend_from_slice(b"\r\n");
        }
        if !sets("x-forwarded-proto") {
            out.extend_from_slice(if self.conn.tls {
                b"x-forwarded-proto: https\r\n"
            } else {
                b"x-forwarded-proto: http\r\n"
            });
        }
        if let Some(host) = &head.host {
            if !sets("x-forwarded-host") {
                out.extend_from_slice(b"x-forwarded-host: ");
                out.extend_from_slice(&buf[host.clone()]);
                out.extend_from_slice(b"\r\n");
            }
        }
        if !sets("x-request-id") {
            out.extend_from_slice(b"x-request-id: ");
            out.extend_from_slice(self.request_id.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        for (name, value) in &route.set_headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if let Some(token) = token {
            out.extend_from_slice(b"authorization: ");
            out.extend_from_slice(token.header.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&buf[head.head_len..head.head_len + head.body_len]);
    }

    /// Whether the client's `Connection` field names this field (then it is hop-by-hop).
    fn conn_listed(&self, name: &[u8]) -> bool {
        self.spans.iter().any(|s| {
            self.buf[s.name.clone()].eq_ignore_ascii_case(b"connection")
                && self.buf[s.value.clone()]
                    .split(|&b| b == b',')
                    .any(|token| body::trim(token).eq_ignore_ascii_case(name))
        })
    }
}

/// An address as `Display` writes it, without a String for the common IPv4 case.
fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(_) => out.extend_from_slice(ip.to_string().as_bytes()),
    }
}

/// The client's `x-request-id` when it is sane, else a new one.
fn request_id(buf: &[u8], head: &Head) -> HeaderValue {
    match &head.request_id {
        Some(r) if is_sane_request_id(&buf[r.clone()]) => {
            HeaderValue::from_bytes(&buf[r.clone()]).unwrap_or_else(|_| new_request_id())
        }
        _ => new_request_id(),
    }
}

fn text(bytes: &[u8]) -> &str {
    // Request targets and host values were checked to be ASCII when parsed.
    std::str::from_utf8(bytes).unwrap_or("")
}

/// Whether a comma-separated field `name` contains `token` (case-insensitive).
fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &[u8]) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|t| body::trim(t).eq_ignore_ascii_case(token))
}

/// Bytes allowed in a request target on the fast path: RFC 3986 `pchar`, `/` and `?`. Any
/// other byte sends the request to hyper, which applies its own (stricter) URI rules.
fn is_target_byte(b: u8) -> bool {
    TARGET_BYTES[usize::from(b)]
}

static TARGET_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"-._~!$&'()*+,;=:@/?%";
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
};

fn parse_request(buf: &[u8], spans: &mut Vec<Span>) -> Parsed {
    // Left uninitialised: httparse fills what it uses (saves a 3 KiB memset per request).
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let head_len = match request.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::HandOver,
    };
    if request.version != Some(1) {
        return Parsed::HandOver;
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Parsed::HandOver;
    };
    if method == "CONNECT" || !target.starts_with('/') || !target.bytes().all(is_target_byte) {
        return Parsed::HandOver;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::HandOver;
    };
    let base = buf.as_ptr() as usize;
    let range = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let target_range = range(target.as_bytes());
    let (path, query) = match target.bytes().position(|b| b == b'?') {
        Some(q) => (
            target_range.start..target_range.start + q,
            Some(target_range.start + q + 1..target_range.end),
        ),
        None => (target_range, None),
    };
    let mut head = Head {
        method,
        path,
        query,
        head_len,
        body_len: 0,
        host: None,
        request_id: None,
        close: false,
        names_fields: false,
    };
    let mut content_length = None;
    spans.clear();
    for h in request.headers.iter() {
        let name = h.name;
        let value = range(h.value);
        let kind = match Known::of(name) {
            Some(Known::ContentLength) => {
                let Some(n) = body::parse_length(h.value) else {
                    return Parsed::HandOver;
                };
                if content_length.is_some() || n > REPLAY_LIMIT as u64 {
                    return Parsed::HandOver;
                }
                content_length = Some(n as usize);
                Kind::Keep
            }
            Some(Known::Host) => {
                if head.host.is_some() || !h.value.iter().all(|b| b.is_ascii_graphic()) {
                    return Parsed::HandOver;
                }
                head.host = Some(value.clone());
                Kind::Skip
            }
            Some(Known::Connection) => {
                for token in h.value.split(|&b| b == b',').map(body::trim) {
                    if token.eq_ignore_ascii_case(b"close") {
                        head.close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return Parsed::HandOver;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        head.names_fields = true;
                    }
                }
                Kind::Skip
            }
            Some(Known::HandOver) => return Parsed::HandOver,
            Some(Known::RequestId) => {
                if head.request_id.is_none() {
                    head.request_id = Some(value.clone());
                }
                Kind::Skip
            }
            Some(Known::ForwardedFor) => Kind::Forwarded,
            Some(Known::Dropped) => Kind::Skip,
            None => Kind::Keep,
        };
        spans.push(Span {
            name: range(name.as_bytes()),
            value,
            kind,
        });
    }
    head.body_len = content_length.unwrap_or(0);
    Parsed::Complete(head)
}

/// Request header fields the fast path treats specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    ContentLength,
    Host,
    Connection,
    RequestId,
    ForwardedFor,
    /// Hop-by-hop (RFC 9110 §7.6.1, plus `Keep-Alive`, `Proxy-Connection` and the proxy-auth
    /// pair, as `proxy::headers::is_hop_by_hop`) or set by the proxy itself.
    Dropped,
    /// `Transfer-Encoding`, `Expect`, `Upgrade`: hyper serves such requests.
    HandOver,
}

impl Known {
    /// Sorted by length first: one or two comparisons per field instead of a dozen.
    fn of(name: &str) -> Option<Known> {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        Some(match name.len() {
            2 if is("te") => Known::Dropped,
            4 if is("host") => Known::Host,
            6 if is("expect") => Known::HandOver,
            7 if is("upgrade") => Known::HandOver,
            7 if is("trailer") => Known::Dropped,
            10 if is("connection") => Known::Connection,
            10 if is("keep-alive") => Known::Dropped,
            12 if is("x-request-id") => Known::RequestId,
            13 if is("authorization") => Known::Dropped,
            14 if is("content-length") => Known::ContentLength,
            15 if is("x-forwarded-for") => Known::ForwardedFor,
            16 if is("x-forwarded-host") || is("proxy-connection") => Known::Dropped,
            17 if is("x-forwarded-proto") => Known::Dropped,
            17 if is("transfer-encoding") => Known::HandOver,
            18 if is("proxy-authenticate") => Known::Dropped,
            19 if is("proxy-authorization") => Known::Dropped,
            _ => return None,
        })
    }
}

/// Connection-specific fields (RFC 9110 §7.6.1, plus `Keep-Alive` and `Proxy-Connection`
/// from earlier practice and the proxy-auth pair), as `proxy::headers::is_hop_by_hop`.
fn is_hop_by_hop(name: &str) -> bool {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    match name.len() {
        2 => is("te"),
        7 => is("upgrade") || is("trailer"),
        10 => is("connection") || is("keep-alive"),
        16 => is("proxy-connection"),
        17 => is("transfer-encoding"),
        18 => is("proxy-authenticate"),
        19 => is("proxy-authorization"),
        _ => false,
    }
}

/// The client's response head: the upstream's status line and end-to-end fields, framed
/// for this connection.
fn write_client_head(
    out: &mut Vec<u8>,
    response: &httparse::Response<'_, '_>,
    framing: Framing,
    close: bool,
) {
    let status = response.code.unwrap_or(502);
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse accepts exactly three digits.
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let headers = &*response.headers;
    let has_connection = headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("connection"));
    for h in headers {
        let name = h.name;
        if is_hop_by_hop(name)
            || has_connection && has_token(headers, "connection", name.as_bytes())
        {
            continue;
        }
        if name.eq_ignore_ascii_case("content-length")
            && matches!(framing, Framing::Chunked | Framing::Close)
        {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if matches!(framing, Framing::Chunked | Framing::Close) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The proxy's own JSON error response; returns its status.
fn write_error(out: &mut Vec<u8>, e: ProxyError, request_id: &HeaderValue, close: bool) -> u16 {
    let (status, headers, body) = e.into_parts(request_id);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    status.as_u16()
}

/// An IO whose first reads return bytes already read from it: hands a connection to hyper
/// mid-stream.
struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn test_route() -> crate::routes::RouteTable {
        let config = crate::config::Config::parse(
            "[profiles.p]\nkind = \"client_app\"\ntoken_url = \"http://127.0.0.1:1/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n[[routes]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1/base\"\nprofile = \"p\"\nset_headers = { x-team = \"t\" }\nremove_headers = [\"cookie\"]\n",
            std::path::Path::new("."),
            &|_| None,
        )
        .unwrap();
        crate::routes::RouteTable::new(&config.routes)
    }

    proptest! {
        /// Whatever arrives, the fast path parses it, leaves it to hyper or waits for more,
        /// and what it writes upstream carries the proxy's token and never the client's.
        #[test]
        fn any_bytes_are_parsed_or_handed_over_never_a_panic(
            line in "(GET|POST|PUT|HEAD|DELETE|PATCH|FOO) /[a-z0-9/%?=&.]{0,20} HTTP/1\\.[01]\r\n",
            fields in proptest::collection::vec(
                "(Host|Authorization|Connection|Content-Length|X-Forwarded-For|X-Request-Id|Cookie|TE|Accept|X-Team)(: ?)[ -~]{0,24}\r\n",
                0..8,
            ),
            tail in proptest::collection::vec(any::<u8>(), 0..40),
            noise in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let table = test_route();
            let route = table.iter().next().unwrap();
            let token = AccessToken::new("proxy-token", std::time::Duration::from_secs(60), Instant::now(), None).unwrap();
            let mut raw = line.into_bytes();
            for f in &fields {
                raw.extend_from_slice(f.as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            raw.extend_from_slice(&tail);
            let mut out = Vec::new();
            if rewrite_head(&raw, route, Some(&token), &mut out) {
                let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
                prop_assert_eq!(text.matches("authorization:").count(), 1);
                prop_assert!(text.contains("authorization: bearer proxy-token\r\n"));
                prop_assert!(!text.contains("cookie:"));
                prop_assert_eq!(text.matches("x-team:").count(), 1);
                let method_len = raw.iter().position(|&b| b == b' ').unwrap_or(0);
                let method = String::from_utf8_lossy(&raw[..method_len]).to_ascii_lowercase();
                let expected = format!("{method} /base");
                prop_assert!(text.starts_with(&expected), "{}", text);
            }
            let mut spans = Vec::new();
            let _ = parse_request(&noise, &mut spans);
            let _ = rewrite_head(&noise, route, None, &mut out);
        }
    }

    #[test]
    fn field_tables_agree_with_the_general_path() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-authenticate",
        ] {
            let header = http::HeaderName::from_static(name);
            assert!(crate::proxy::headers::is_hop_by_hop(&header), "{name}");
            assert!(is_hop_by_hop(&name.to_ascii_uppercase()), "{name}");
            // A hop-by-hop field on a request is dropped, or the request goes to hyper.
            assert!(
                matches!(
                    Known::of(name),
                    Some(Known::Dropped | Known::HandOver | Known::Connection)
                ),
                "{name}"
            );
        }
        for name in ["x-forwarded-proto", "X-Forwarded-Host", "Authorization"] {
            assert_eq!(Known::of(name), Some(Known::Dropped), "{name}");
        }
        for name in ["accept", "x-forwarded", "hosts", "content-type"] {
            assert_eq!(Known::of(name), None, "{name}");
            assert!(!is_hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.255.9",
            "192.168.100.1",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn what_the_fast_path_leaves_to_hyper() {
        let mut spans = Vec::new();
        let handed_over = |raw: &str, spans: &mut Vec<Span>| {
            matches!(parse_request(raw.as_bytes(), spans), Parsed::HandOver)
        };
        for raw in [
            "GET / HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET http://elsewhere/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            "GET /a\"b HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(handed_over(raw, &mut spans), "{raw:?}");
        }
        let raw = "POST /a/b?x=%20&y HTTP/1.1\r\nHost: app:8080\r\nContent-Length: 4\r\nConnection: keep-alive, X-Hop\r\n\r\nbody";
        let Parsed::Complete(head) = parse_request(raw.as_bytes(), &mut spans) else {
            panic!("a plain request stays on the fast path");
        };
        assert_eq!(&raw[head.path.clone()], "/a/b");
        assert_eq!(&raw[head.query.clone().unwrap()], "x=%20&y");
        assert_eq!(&raw[head.host.clone().unwrap()], "app:8080");
        assert_eq!(head.body_len, 4);
        assert_eq!(head.head_len, raw.len() - 4);
        assert!(head.names_fields && !head.close);
        assert!(matches!(
            parse_request(&raw.as_bytes()[..20], &mut spans),
            Parsed::Partial
        ));
    }
}
