//! `https://` upstreams known to speak h2, driven with the `h2` crate from the request's own
//! task: connections per key (`Route::pool_key`) shared by every request to that upstream; a
//! request takes a stream on one and awaits its answer where it stands, with no dispatch
//! channel, no per-request task and no pool checkout between the two sides (as the fast path
//! does for HTTP/1.1). Only a connection's own frame I/O runs in a task of its own, as h2
//! requires.
//!
//! A request takes the oldest connection with a stream to spare: one with fewer streams under
//! way (sent and not yet answered whole) than the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`.
//! Only when every connection is that full is another opened, up to `MAX_CONNECTIONS`; past
//! that, or when opening one fails, requests queue for a stream on the least busy one. So one
//! connection carries the traffic an upstream allows on one (extra ones go idle and are closed
//! when the load falls), and a slow upstream's stream limit does not cap the proxy's
//! concurrency (as Go's transport and Envoy do; hyper's client queues instead).
//!
//! A connection is replaced when it is gone: its task ended (the upstream closed it, an I/O
//! error), a stream learned it is going away (GOAWAY), it sat unused for `IDLE_TIMEOUT`, or
//! it went silent: requests waited on it for their answers while not a byte came from the
//! upstream for a third of their route's timeout (`patience`), and nothing came either within
//! as long again after a PING (a peer or middlebox that vanished without a FIN or RST; TCP
//! alone would notice after many minutes). Its waiting requests then fail as lost, and the
//! retry rule may send them again on a new connection.
//!
//! Flow control: each stream may hold `STREAM_WINDOW` of its answer unread; the connection's
//! window is so large that it never binds first, so clients that stop reading their answers
//! hold at most that much each in memory and cannot stall the other streams' answers (as Go's
//! HTTP/2 transport does). A request body's wait for the upstream's window is bounded by the
//! route's timeout, also after the answer came.
//! New connections are opened one at a time per key, so a GOAWAY under load costs one TLS
//! handshake, not one per waiting request, and a new one takes requests once the upstream's
//! first SETTINGS are in (most upstreams send them a round trip after the TLS handshake), so
//! a burst is never sent beyond a stream limit not yet known, to be refused. One that ends
//! before that, or sends nothing for `patience` while there are others, is a failed open, and
//! one that goes away before it answered anything (`Slot::dud_lately`) pauses opening: either
//! way the requests waiting queue on the connections there are. What a failed
//! stream may do next (retry on a new connection, or fail) is `crate::pipeline::send`'s rule,
//! fed by `Failure`.

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::header::HOST;
use http::{Request, Response};
use http_body::Body;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::client::TlsStream;

use super::deferred::DeferWriteErrors;
use super::IDLE_TIMEOUT;
use crate::coalesce::Coalesce;
use crate::{BoxError, ProxyBody};

/// Flow-control windows offered to the upstream: per stream hyper's client default, large
/// enough that a response body never waits on a window update on a fast link; per connection
/// Go's transport's (1 GiB), so streams whose clients stopped reading never use it up.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1 << 30;
/// The largest response head taken, as from an HTTP/1.1 upstream (hyper's client takes 16 KiB:
/// a larger head was a 502 over h2 that HTTP/1.1 passed).
const MAX_HEADER_LIST: u32 = crate::upstream::MAX_RESPONSE_HEAD as u32;
/// The longest a connection with requests waiting on it may stay silent before it is sent a
/// PING, and the longest it then has to answer (`patience`).
pub const MAX_PATIENCE: Duration = Duration::from_secs(10);
/// The shortest: a PING's answer can queue behind a busy connection's frames.
const MIN_PATIENCE: Duration = Duration::from_secs(1);
/// h2's stream limit for a connection until the upstream's first SETTINGS: not a value SETTINGS
/// can set (at most 2^32 - 1, or `usize::MAX` when they name none), so it tells they have not
/// come yet.
const UNKNOWN_LIMIT: usize = usize::MAX - 1;
/// The most connections one request opens before it queues on a full one: a connection that
/// ends as soon as it is listed (a GOAWAY at once) makes each waiting request open another.
const OPENS_PER_REQUEST: usize = 3;
/// How long after a new connection went away unused requests queue on the others rather than
/// open another (`Slot::dud_lately`).
const DUD_PAUSE: Duration = Duration::from_secs(1);
/// The most connections to one upstream (key): with the usual stream limits of 100 or 128,
/// 1,600 or more requests under way at once.
pub const MAX_CONNECTIONS: usize = 16;

/// How long a request with `timeout` lets its connection stay silent before a PING, and then
/// without an answer: a third of the timeout, so that a dead connection is known, and an
/// idempotent request sent again, before the timeout ends (for timeouts of 3 s and more).
fn patience(timeout: Duration) -> Duration {
    (timeout / 3).clamp(MIN_PATIENCE, MAX_PATIENCE)
}

/// The request's fields as h2 takes them: the authority travels as `:authority` (RFC 9113
/// §8.3.1); connection-specific fields (`crate::http::is_hop_by_hop`) are not allowed but
/// for `te: trailers` (§8.2.2; the plan drops them, but hyper's transport frames a GET body
/// of unknown size as chunked); a body of known size states it.
fn h2_fields(fields: &mut http::HeaderMap, body: &ProxyBody) {
    fields.remove(HOST);
    let trailers_only = |name: &http::HeaderName, fields: &http::HeaderMap| {
        name == http::header::TE && fields.get_all(name).iter().all(|te| te == "trailers")
    };
    let gone: Vec<http::HeaderName> = fields
        .keys()
        .filter(|name| {
            crate::http::is_hop_by_hop(name.as_str().as_bytes()) && !trailers_only(name, fields)
        })
        .cloned()
        .collect();
    for name in gone {
        fields.remove(name);
    }
    if !fields.contains_key(http::header::CONTENT_LENGTH) && !body.is_end_stream() {
        if let Some(n) = body.size_hint().exact() {
            fields.insert(http::header::CONTENT_LENGTH, n.into());
        }
    }
}

/// The h2 connections of each upstream key.
#[derive(Default)]
pub struct H2Pool {
    slots: Mutex<HashMap<Box<str>, Arc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    /// Its usable connections, oldest first.
    live: Mutex<Vec<Live>>,
    /// Held while a new connection is opened, so only one is.
    opening: tokio::sync::Mutex<()>,
    /// Numbers the connections, so a retiring one never removes its successor.
    next_id: AtomicU64,
    /// Failed attempts to open a connection, and the last one's cause: requests that waited
    /// for an attempt that failed share its failure rather than each trying again in turn.
    failed_opens: AtomicU64,
    last_failure: Mutex<String>,
    /// When a new connection last went away before it answered any request (`DUD_PAUSE`).
    last_dud: Mutex<Option<Instant>>,
}

#[derive(Clone)]
struct Live {
    id: u64,
    send: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

struct ConnState {
    /// The connection's task ended, or a stream saw the connection go away.
    gone: AtomicBool,
    /// When a stream was last started, in milliseconds since `born`.
    last_used: AtomicU64,
    /// Streams under way on it (`Counted`), to tell when it is full.
    streams: AtomicUsize,
    /// A response head came on it.
    answered: AtomicBool,
    /// Requests waiting for their response heads.
    waiting: AtomicUsize,
    /// When requests last began waiting on it with none waiting before, in milliseconds
    /// since `born`.
    wait_began: AtomicU64,
    /// When bytes last came from the upstream (`Listening`), in milliseconds since `born`.
    last_read: AtomicU64,
    /// The least `patience` of the requests waiting since none was, in milliseconds.
    patience: AtomicU64,
    /// Answers whose bodies are being relayed (`Answer`), for `reap`.
    relayed: Mutex<Vec<std::sync::Weak<Relayed>>>,
    born: Instant,
}

impl ConnState {
    fn new(patience: Duration) -> ConnState {
        ConnState {
            gone: AtomicBool::new(false),
            last_used: AtomicU64::new(0),
            streams: AtomicUsize::new(0),
            answered: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            wait_began: AtomicU64::new(0),
            last_read: AtomicU64::new(0),
            patience: AtomicU64::new(patience.as_millis() as u64),
            relayed: Mutex::new(Vec::new()),
            born: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn idle_for(&self) -> Duration {
        let now = self.now();
        Duration::from_millis(now.saturating_sub(self.last_used.load(Ordering::Relaxed)))
    }

    /// A request is sent on the connection and waits for its answer, with `patience`.
    fn wait(&self, patience: Duration) -> Waiting<'_> {
        let now = self.now();
        self.last_used.store(now, Ordering::Relaxed);
        let patience = patience.as_millis() as u64;
        if self.waiting.fetch_add(1, Ordering::Relaxed) == 0 {
            self.wait_began.store(now, Ordering::Relaxed);
            self.patience.store(patience, Ordering::Relaxed);
        } else if patience < self.patience.load(Ordering::Relaxed) {
            self.patience.fetch_min(patience, Ordering::Relaxed);
        }
        Waiting(self)
    }

    fn patience(&self) -> Duration {
        Duration::from_millis(self.patience.load(Ordering::Relaxed))
    }

    fn last_read(&self) -> u64 {
        self.last_read.load(Ordering::Relaxed)
    }

    /// Drops the answers whose clients took none of them for their limit (`Answer`): their
    /// streams are reset and their windows given back.
    fn reap(&self) {
        let now = self.now();
        let mut relayed = lock(&self.relayed);
        relayed.retain(|answer| {
            let Some(answer) = answer.upgrade() else {
                return false;
            };
            let since = answer.since.load(Ordering::Relaxed);
            if since == WAITING || now.saturating_sub(since) < answer.limit_ms {
                return true;
            }
            let stream = lock(&answer.stream).take();
            lock(&answer.counted).take();
            if stream.is_some() {
                tracing::debug!(
                    limit_ms = answer.limit_ms,
                    "h2 upstream stream reset: its client took nothing of the answer"
                );
            }
            false
        });
    }

    /// Requests are waiting and not a byte has come for `patience`: time for a PING.
    fn needs_ping(&self) -> bool {
        let since = self
            .last_read()
            .max(self.wait_began.load(Ordering::Relaxed));
        let silent = Duration::from_millis(self.now().saturating_sub(since));
        self.waiting.load(Ordering::Relaxed) > 0 && silent >= self.patience()
    }
}

/// An upstream connection's socket, noting when bytes come (`ConnState::last_read`).
struct Listening<IO> {
    io: IO,
    state: Arc<ConnState>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Listening<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = self.state.now();
            self.state.last_read.store(now, Ordering::Relaxed);
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Listening<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// `Relayed::since` while the client waits for the upstream's next bytes.
const WAITING: u64 = u64::MAX;

/// An answer's body on an h2 connection. A client that stops taking it would hold one of the
/// connection's streams (and its window's worth of data) for good, and as many such clients as
/// the upstream allows streams would hold them all: once the client has taken nothing for the
/// route's `timeout` while the body had more to give, the connection's task drops the stream
/// (resetting it with CANCEL), and the body ends with an error if it is polled again.
pub struct Answer {
    relayed: Arc<Relayed>,
    data_done: bool,
}

struct Relayed {
    stream: Mutex<Option<RecvStream>>,
    /// When the client last took a frame (milliseconds since the connection's `born`), or
    /// `WAITING`.
    since: AtomicU64,
    limit_ms: u64,
    /// Whether `ConnState::relayed` lists it (from its first frame that was not the last).
    listed: AtomicBool,
    /// The stream, counted on its connection until the answer is dropped or reset (and a
    /// request body sent on after the answer is done: `Live::exchange`).
    counted: Mutex<Option<Arc<Counted>>>,
    state: Arc<ConnState>,
}

impl Answer {
    fn new(stream: RecvStream, counted: Arc<Counted>, limit: Duration) -> Answer {
        Answer {
            relayed: Arc::new(Relayed {
                stream: Mutex::new(Some(stream)),
                since: AtomicU64::new(WAITING),
                limit_ms: limit.as_millis() as u64,
                listed: AtomicBool::new(false),
                state: Arc::clone(&counted.0),
                counted: Mutex::new(Some(counted)),
            }),
            data_done: false,
        }
    }

    /// The body's next frame; the stream's window is given back as its data is taken.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let relayed = &self.relayed;
        let mut guard = lock(&relayed.stream);
        let Some(stream) = guard.as_mut() else {
            let limit = Duration::from_millis(relayed.limit_ms);
            let what = format!(
                "the client took nothing for {}",
                humantime::format_duration(limit)
            );
            return Poll::Ready(Some(Err(what.into())));
        };
        let polled = Self::poll_stream(stream, &mut self.data_done, cx);
        let more = matches!(polled, Poll::Ready(Some(Ok(_)))) && !stream.is_end_stream();
        // `reap` takes the list's lock, then a stream's: never the other way round.
        drop(guard);
        match &polled {
            Poll::Pending => relayed.since.store(WAITING, Ordering::Relaxed),
            Poll::Ready(_) if more => {
                relayed.since.store(relayed.state.now(), Ordering::Relaxed);
                if !relayed.listed.swap(true, Ordering::Relaxed) {
                    lock(&relayed.state.relayed).push(Arc::downgrade(relayed));
                }
            }
            Poll::Ready(_) => {}
        }
        polled
    }

    fn poll_stream(
        stream: &mut RecvStream,
        data_done: &mut bool,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if !*data_done {
            match std::task::ready!(stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The upstream may send as much again.
                    let _ = stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => *data_done = true,
            }
        }
        match std::task::ready!(stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    pub fn is_end_stream(&self) -> bool {
        lock(&self.relayed.stream)
            .as_ref()
            .map_or(true, |stream| stream.is_end_stream())
    }
}

/// A stream under way on a connection (`ConnState::streams`), from the moment a request picks
/// the connection until its answer is done.
struct Counted(Arc<ConnState>);

impl Counted {
    fn new(state: &Arc<ConnState>) -> Counted {
        state.streams.fetch_add(1, Ordering::Relaxed);
        Counted(Arc::clone(state))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request waiting for its response head (`ConnState::wait`).
struct Waiting<'a>(&'a ConnState);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A new connection to the upstream, as `open` made it: TLS done and h2 chosen by ALPN (an
/// upstream that stopped offering h2 is a failure to connect). Its socket keeps reading after
/// a write failed (`DeferWriteErrors`), so a closing upstream's last frames are seen.
pub type Opened = Box<TlsStream<DeferWriteErrors>>;

/// Why a request on an h2 connection got no answer.
#[derive(Debug)]
pub enum Failure {
    /// No h2 connection could be made, or the upstream no longer offers h2 (the request
    /// never left).
    Connect(String),
    /// The upstream said it did not process the stream: GOAWAY above its last stream id, or
    /// REFUSED_STREAM (RFC 9113 §6.8, §8.7). Safe to send again, whatever the method.
    Unprocessed(String),
    /// The upstream retired the connection gracefully (GOAWAY with NO_ERROR) before it
    /// processed the stream, as nginx does after `keepalive_requests` and load balancers do
    /// when they rotate connections: as safe to send again, and no sign the upstream turns
    /// the request away.
    Retired(String),
    /// The connection broke under the stream (I/O error, reset socket, a connection error
    /// the proxy's h2 client found) before the answer.
    Lost(String),
    /// The request body failed while it was being sent (the client's side).
    Body(BoxError),
    /// Anything else: a stream reset, a protocol error.
    Protocol(String),
}

impl H2Pool {
    /// Sends `request` on a connection under `key` with a stream to spare, opening one with
    /// `open` when there is none (the module's rule), and awaits the response head; `timeout`
    /// is the route's (it sets how long a silent connection is borne, `patience`, and bounds
    /// each wait of the request body for the upstream's window). The body is sent alongside; a body the upstream answered before
    /// the end of is sent on in a task of its own.
    pub async fn send<F, Fut>(
        &self,
        key: &str,
        open: F,
        request: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<Answer>, Failure>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Opened, String>>,
    {
        let patience = patience(timeout);
        let slot = self.slot(key);
        let mut opened = 0;
        let (live, counted) = loop {
            if let Some(picked) = slot.pick(false) {
                break picked;
            }
            if slot.dud_lately() {
                if let Some(picked) = slot.pick(true) {
                    break picked;
                }
            }
            let failure = if opened < OPENS_PER_REQUEST {
                match Slot::open(&slot, key, &open, patience).await {
                    Ok(Some(picked)) => break picked,
                    Ok(None) => {
                        opened += 1;
                        continue;
                    }
                    Err(failure) => failure,
                }
            } else {
                Failure::Connect("new connections to the upstream were gone at once".into())
            };
            // Every connection is full and no other could be opened: queue on one.
            break slot.pick(true).ok_or(failure)?;
        };
        let counted = Arc::new(counted);
        let _waiting = live.state.wait(patience);
        let response = match live.exchange(request, timeout, &counted).await {
            Ok(response) => response,
            Err(failure) => {
                let state = &live.state;
                if state.gone.load(Ordering::Relaxed) && !state.answered.load(Ordering::Relaxed) {
                    *lock(&slot.last_dud) = Some(Instant::now());
                }
                return Err(failure);
            }
        };
        if !live.state.answered.load(Ordering::Relaxed) {
            live.state.answered.store(true, Ordering::Relaxed);
        }
        Ok(response.map(|stream| Answer::new(stream, counted, timeout)))
    }

    fn slot(&self, key: &str) -> Arc<Slot> {
        let mut slots = lock(&self.slots);
        match slots.get(key) {
            Some(slot) => Arc::clone(slot),
            None => {
                let slot = Arc::new(Slot::default());
                slots.insert(key.into(), Arc::clone(&slot));
                slot
            }
        }
    }
}

impl Slot {
    /// The oldest usable connection with a stream to spare, counting the request's stream on
    /// it; `None` when another should be opened (there is none, or every one is full and
    /// there are fewer than `MAX_CONNECTIONS`). With `queue`, or at `MAX_CONNECTIONS`, the
    /// least busy connection even when it is full: h2 holds the request until a stream ends.
    fn pick(&self, queue: bool) -> Option<(Live, Counted)> {
        let mut conns = lock(&self.live);
        // Dropping a handle lets h2 close its connection once its streams are done.
        conns.retain(Live::usable);
        let mut least: Option<(usize, &Live)> = None;
        for live in conns.iter() {
            let under_way = live.state.streams.load(Ordering::Relaxed);
            if under_way < live.limit() {
                return Some((live.clone(), Counted::new(&live.state)));
            }
            if least.map_or(true, |(fewest, _)| under_way < fewest) {
                least = Some((under_way, live));
            }
        }
        if !queue && conns.len() < MAX_CONNECTIONS {
            return None;
        }
        least.map(|(_, live)| (live.clone(), Counted::new(&live.state)))
    }

    /// Opens another connection, unless one has a stream to spare by the time this request's
    /// turn to open comes (another request just opened one, or a stream ended: that stream is
    /// taken and returned). The
    /// connection is listed once the upstream's first SETTINGS are in (`Watch::drive` tells):
    /// listed before, the requests waiting to open would all be sent on it at once, beyond a
    /// stream limit not yet known, and the upstream would refuse the excess.
    async fn open<F, Fut>(
        slot: &Arc<Slot>,
        key: &str,
        open: &F,
        patience: Duration,
    ) -> Result<Option<(Live, Counted)>, Failure>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Opened, String>>,
    {
        let failed_before = slot.failed_opens.load(Ordering::Acquire);
        let _opening = slot.opening.lock().await;
        if let Some(picked) = slot.pick(false) {
            return Ok(Some(picked));
        }
        if slot.failed_opens.load(Ordering::Acquire) != failed_before {
            return Err(Failure::Connect(lock(&slot.last_failure).clone()));
        }
        let failed = |cause: String| {
            *lock(&slot.last_failure) = cause.clone();
            slot.failed_opens.fetch_add(1, Ordering::Release);
            Failure::Connect(cause)
        };
        let state = Arc::new(ConnState::new(patience));
        let handshake = async {
            let io = Listening {
                io: open().await?,
                state: Arc::clone(&state),
            };
            h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_header_list_size(MAX_HEADER_LIST)
                .initial_max_send_streams(UNKNOWN_LIMIT)
                .enable_push(false)
                .handshake::<_, Bytes>(Coalesce::new(io))
                .await
                .map_err(|e| format!("h2 handshake: {e}"))
        };
        let (send, connection) = handshake.await.map_err(failed)?;
        let id = slot.next_id.fetch_add(1, Ordering::Relaxed);
        let (settled, settling) = tokio::sync::oneshot::channel();
        let watch = Watch {
            slot: Arc::downgrade(slot),
            key: key.into(),
            id,
            state: Arc::clone(&state),
            settling: Some((send.clone(), settled)),
        };
        let live = Live { id, send, state };
        tokio::spawn(watch.drive(connection));
        match tokio::time::timeout(patience, settling).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err(failed(
                    "h2: the connection ended before its SETTINGS".into(),
                ))
            }
            // Silent: with other connections to use, given up (requests queue on those); as
            // the only way to the upstream, taken all the same, one stream at a time until its
            // SETTINGS come.
            Err(_) if lock(&slot.live).iter().any(Live::usable) => {
                let waited = humantime::format_duration(patience);
                return Err(failed(format!("h2: no SETTINGS within {waited}")));
            }
            Err(_) => {}
        }
        lock(&slot.live).push(live);
        Ok(None)
    }

    fn retire(&self, id: u64) {
        lock(&self.live).retain(|live| live.id != id);
    }

    /// A new connection went away before it answered anything within `DUD_PAUSE`: requests
    /// that find every connection full queue on one rather than open another, which would
    /// likely go the same way (an upstream that takes no more connections than it has, and
    /// says so with a GOAWAY or a reset once the first request comes).
    fn dud_lately(&self) -> bool {
        lock(&self.last_dud).is_some_and(|at| at.elapsed() < DUD_PAUSE)
    }
}

/// What a connection's task keeps of it.
struct Watch {
    slot: std::sync::Weak<Slot>,
    key: Box<str>,
    id: u64,
    state: Arc<ConnState>,
    /// A handle to the connection and whom to tell once the upstream's SETTINGS are in; the
    /// sender is dropped unsent when the connection ends first.
    settling: Option<(SendRequest<Bytes>, tokio::sync::oneshot::Sender<()>)>,
}

impl Watch {
    /// Drives the connection's frame I/O until it ends; retires it when it sits unused for
    /// `IDLE_TIMEOUT` (no new streams; h2 closes it with GOAWAY once its streams are done and
    /// the slot's handle is dropped), and closes it when nothing comes from it within
    /// `patience` of a PING sent while requests waited on it in silence
    /// (`ConnState::needs_ping`).
    async fn drive(
        mut self,
        connection: h2::client::Connection<Coalesce<Listening<Opened>>, Bytes>,
    ) {
        let state = &self.state;
        let mut connection = std::pin::pin!(connection);
        let mut pings = connection.ping_pong();
        // Until the upstream's SETTINGS are in: a handle to read its stream limit with, and
        // whom to tell. Both go once they are (or `open` stopped waiting), so that the
        // connection still closes once the slot lets go of it.
        let mut settling = self.settling.take();
        let mut connection = std::pin::pin!(poll_fn(|cx| {
            let polled = std::future::Future::poll(connection.as_mut(), cx);
            let settled = settling.as_ref().is_some_and(|(probe, settled)| {
                probe.current_max_send_streams() != UNKNOWN_LIMIT || settled.is_closed()
            });
            if settled {
                settling.take().map(|(_, settled)| settled.send(()));
            }
            polled
        }));
        // A PING awaits its answer (h2 takes one at a time).
        let mut outstanding = false;
        // When the connection is taken for dead unless something comes from it meanwhile, and
        // when that wait began (milliseconds since `born`).
        let mut deadline: Option<(tokio::time::Instant, u64)> = None;
        let mut retired = false;
        loop {
            let check = (state.patience() / 4).min(IDLE_TIMEOUT / 4);
            let pong = async {
                match (outstanding, pings.as_mut()) {
                    (true, Some(pings)) => poll_fn(|cx| pings.poll_pong(cx)).await.is_ok(),
                    _ => std::future::pending().await,
                }
            };
            let dead = async {
                match deadline {
                    Some((by, _)) => tokio::time::sleep_until(by).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // A PONG read in the same poll as the deadline passed wins.
                biased;
                ended = &mut connection => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "h2 upstream connection ended");
                    }
                    break;
                }
                answered = pong => {
                    outstanding = false;
                    if answered {
                        deadline = None;
                    }
                }
                () = dead => {
                    let since = deadline.take().map_or(0, |(_, since)| since);
                    if state.last_read() > since {
                        // Frames came, if not yet the PONG: alive.
                        continue;
                    }
                    tracing::warn!(
                        upstream = %self.key,
                        after_ms = state.patience().as_millis() as u64,
                        "h2 upstream connection silent, even after a PING: closed, its requests fail as lost"
                    );
                    break;
                }
                () = tokio::time::sleep(check) => {
                    state.reap();
                    if !retired && state.idle_for() >= IDLE_TIMEOUT {
                        retired = true;
                        self.retire();
                    }
                    if deadline.is_none() && state.needs_ping() {
                        if let (false, Some(pings)) = (outstanding, pings.as_mut()) {
                            outstanding = pings.send_ping(h2::Ping::opaque()).is_ok();
                        }
                        let by = tokio::time::Instant::now() + state.patience();
                        deadline = Some((by, state.now()));
                    }
                }
            }
        }
        self.retire();
    }

    /// No new streams on this connection.
    fn retire(&self) {
        self.state.gone.store(true, Ordering::Relaxed);
        if let Some(slot) = self.slot.upgrade() {
            slot.retire(self.id);
        }
    }
}

impl Live {
    /// The streams the upstream allows at once on it.
    fn limit(&self) -> usize {
        match self.send.current_max_send_streams() {
            // Its SETTINGS were slow to come (`Slot::open`): one, as any upstream allows.
            UNKNOWN_LIMIT => 1,
            limit => limit,
        }
    }

    /// Takes new streams: not gone, and used within `IDLE_TIMEOUT`.
    fn usable(&self) -> bool {
        !self.state.gone.load(Ordering::Relaxed) && self.state.idle_for() < IDLE_TIMEOUT
    }

    /// Sends `request` on this connection and awaits the response head (`H2Pool::send`).
    async fn exchange(
        &self,
        request: Request<ProxyBody>,
        timeout: Duration,
        counted: &Arc<Counted>,
    ) -> Result<Response<RecvStream>, Failure> {
        let (parts, body) = request.into_parts();
        let mut head = Request::from_parts(parts, ());
        h2_fields(head.headers_mut(), &body);
        let end = body.is_end_stream();
        let result = async {
            let mut send = self.send.clone().ready().await?;
            let (response, stream) = send.send_request(head, end)?;
            Ok::<_, h2::Error>((response, stream))
        }
        .await;
        let (response, stream) = match result {
            Ok(pair) => pair,
            Err(e) => return Err(self.failed_before_sending(e)),
        };
        if end {
            return response.await.map_err(|e| self.failed(e));
        }
        let mut pump = Box::pin(pump(body, stream, timeout));
        let mut response = std::pin::pin!(response);
        let answer = tokio::select! {
            biased;
            answer = &mut response => Some(answer),
            sent = &mut pump => match sent {
                Ok(()) => None,
                Err(Pumped::Body(e)) => return Err(Failure::Body(e)),
                // The stream failed: its reason comes with the response.
                Err(Pumped::Stream(e)) => {
                    tracing::debug!(error = %e, "request body not sent whole");
                    None
                }
            },
        };
        let answer = match answer {
            Some(Ok(answer)) => {
                // Answered before the whole body went: the rest is sent on meanwhile (the
                // pump ends when the upstream resets the stream), its stream still counted.
                let counted = Arc::clone(counted);
                tokio::spawn(async move {
                    let _ = pump.await;
                    drop(counted);
                });
                Ok(answer)
            }
            // The stream failed: dropping the pump stops reading the client's body.
            Some(Err(e)) => Err(e),
            None => response.await,
        };
        answer.map_err(|e| self.failed(e))
    }

    /// A failure to open a stream: nothing was sent, so a connection that failed or is going
    /// away (whatever the method) is as good as unprocessed.
    fn failed_before_sending(&self, e: h2::Error) -> Failure {
        if e.is_io() || e.is_go_away() {
            self.state.gone.store(true, Ordering::Relaxed);
            if retired(&e) {
                return Failure::Retired(format!("h2: {e}"));
            }
            return Failure::Unprocessed(format!("h2: {e}"));
        }
        self.failed(e)
    }

    /// Classifies a stream's failure; one that says the connection is going away, or broke,
    /// marks it gone so the next request opens a new one.
    fn failed(&self, e: h2::Error) -> Failure {
        let what = format!("h2: {e}");
        if e.is_go_away() || e.is_io() {
            self.state.gone.store(true, Ordering::Relaxed);
        }
        if retired(&e) {
            return Failure::Retired(what);
        }
        if unprocessed(&e) {
            return Failure::Unprocessed(what);
        }
        // The connection broke, or the proxy's h2 client ended it on an error it found (a
        // malformed frame, an oversized head, on this stream or another): whether the upstream
        // processed the stream is unknown, as for a broken connection.
        if e.is_io() || (e.is_go_away() && e.is_library()) {
            return Failure::Lost(what);
        }
        Failure::Protocol(what)
    }
}

/// The upstream's graceful GOAWAY (NO_ERROR): it retires the connection, not the request.
pub(crate) fn retired(e: &h2::Error) -> bool {
    e.is_remote() && e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR)
}

/// The upstream said it did not process the stream: a GOAWAY whose last stream id is below
/// it, or a REFUSED_STREAM reset (RFC 9113 §6.8, §8.7).
pub(crate) fn unprocessed(e: &h2::Error) -> bool {
    e.is_remote() && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

enum Pumped {
    /// The client's body failed.
    Body(BoxError),
    /// The stream could not take more (reset, connection gone).
    Stream(h2::Error),
}

/// Sends `body` on `stream` as the upstream's flow control allows; its last data frame ends
/// the stream, or its trailers do. An upstream that gives no window for `limit` gets the
/// stream reset (CANCEL): one that answered early and neither reset the stream nor reads on
/// would hold it, and the client's connection, for good.
async fn pump(
    mut body: ProxyBody,
    mut stream: SendStream<Bytes>,
    limit: Duration,
) -> Result<(), Pumped> {
    loop {
        // The upstream resetting the stream ends the wait for the client's next bytes.
        let next = poll_fn(|cx| {
            if let std::task::Poll::Ready(reset) = stream.poll_reset(cx) {
                return std::task::Poll::Ready(Err(reset));
            }
            std::pin::Pin::new(&mut body).poll_frame(cx).map(Ok)
        })
        .await;
        let next = match next {
            Ok(next) => next,
            Err(Ok(reason)) => return Err(Pumped::Stream(reason.into())),
            Err(Err(e)) => return Err(Pumped::Stream(e)),
        };
        let frame = match next {
            None => {
                return stream.send_data(Bytes::new(), true).map_err(Pumped::Stream);
            }
            Some(Err(e)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return Err(Pumped::Body(e));
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(mut data) => {
                let last = body.is_end_stream();
                if data.is_empty() {
                    if last {
                        return stream.send_data(data, true).map_err(Pumped::Stream);
                    }
                    continue;
                }
                loop {
                    stream.reserve_capacity(data.len().max(1));
                    let room = poll_fn(|cx| {
                        if let std::task::Poll::Ready(reset) = stream.poll_reset(cx) {
                            let e = reset.map_or_else(|e| e, h2::Error::from);
                            return std::task::Poll::Ready(Some(Err(e)));
                        }
                        stream.poll_capacity(cx)
                    });
                    let room = match tokio::time::timeout(limit, room).await {
                        Ok(Some(Ok(room))) => room,
                        Ok(Some(Err(e))) => return Err(Pumped::Stream(e)),
                        Ok(None) => return Err(Pumped::Stream(h2::Reason::STREAM_CLOSED.into())),
                        Err(_) => {
                            stream.send_reset(h2::Reason::CANCEL);
                            return Err(Pumped::Stream(h2::Reason::CANCEL.into()));
                        }
                    };
                    if room == 0 {
                        continue;
                    }
                    let chunk = data.split_to(room.min(data.len()));
                    let end = last && data.is_empty();
                    stream.send_data(chunk, end).map_err(Pumped::Stream)?;
                    if data.is_empty() {
                        break;
                    }
                }
                if last {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return stream.send_trailers(trailers).map_err(Pumped::Stream);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
