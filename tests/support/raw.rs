//! HTTP/1.1 with raw sockets on both sides of the proxy: a scripted upstream (plain or TLS)
//! that records every byte it reads, and a client that writes exactly the bytes it is given,
//! on either inbound transport (the fast path, or hyper's HTTP/1.1 after a hand-over).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::tls::TestCa;
use super::{AbortOnDrop, TestProxy};

/// In a scripted answer: write what came before, wait a little, then write the rest (so
/// a response head reaches the client before the rest of its body).
pub const PAUSE: &str = "<<pause>>";

/// What the scripted upstream saw: each request's head (as text) and body.
#[derive(Clone, Debug)]
pub struct RawRequest {
    pub head: String,
    pub body: Vec<u8>,
    pub connection: usize,
}

impl RawRequest {
    pub fn target(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.head, name)
    }
}

/// A raw HTTP/1.1 upstream: for each request it answers the bytes `reply` gives for the
/// request head, then closes the connection if `reply` says so (with or without telling).
pub struct RawUpstream {
    pub addr: std::net::SocketAddr,
    tls: bool,
    seen: Arc<Mutex<Vec<RawRequest>>>,
    /// Every byte read, per connection (index = connection number - 1).
    bytes: Arc<Mutex<Vec<Vec<u8>>>>,
    connections: Arc<AtomicUsize>,
    _task: AbortOnDrop,
}

type Script = dyn Fn(&str) -> (Vec<u8>, bool) + Send + Sync;

#[derive(Clone)]
struct Recorder {
    seen: Arc<Mutex<Vec<RawRequest>>>,
    bytes: Arc<Mutex<Vec<Vec<u8>>>>,
    reply: Arc<Script>,
}

impl RawUpstream {
    pub async fn start(reply: impl Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static) -> Self {
        RawUpstream::listen(None, reply).await
    }

    /// The same over TLS (HTTP/1.1 by ALPN), with a certificate from `ca`.
    pub async fn start_tls(
        ca: &TestCa,
        reply: impl Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static,
    ) -> Self {
        let (cert, key) = ca.leaf("raw-upstream");
        let mut config =
            (*egain_proxy::tls::server_config(cert.as_ref(), key.as_ref()).unwrap()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        RawUpstream::listen(Some(acceptor), reply).await
    }

    async fn listen(
        tls: Option<tokio_rustls::TlsAcceptor>,
        reply: impl Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorder = Recorder {
            seen: Arc::new(Mutex::new(Vec::new())),
            bytes: Arc::new(Mutex::new(Vec::new())),
            reply: Arc::new(reply),
        };
        let connections = Arc::new(AtomicUsize::new(0));
        let (r, c, is_tls) = (recorder.clone(), Arc::clone(&connections), tls.is_some());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let number = c.fetch_add(1, Ordering::SeqCst) + 1;
                r.bytes.lock().unwrap().push(Vec::new());
                let r = r.clone();
                match &tls {
                    None => {
                        tokio::spawn(serve_raw(stream, number, r));
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve_raw(stream, number, r).await;
                            }
                        });
                    }
                }
            }
        });
        RawUpstream {
            addr,
            tls: is_tls,
            seen: recorder.seen,
            bytes: recorder.bytes,
            connections,
            _task: AbortOnDrop(task),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Requests seen, without the ones a client used to move to hyper (`/handover`).
    pub fn seen(&self) -> Vec<RawRequest> {
        let seen = self.seen.lock().unwrap().clone();
        seen.into_iter()
            .filter(|r| r.target() != HANDOVER_TARGET)
            .collect()
    }

    /// Every byte the upstream read, per connection.
    pub fn bytes(&self) -> Vec<Vec<u8>> {
        self.bytes.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve_raw<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    connection: usize,
    recorder: Recorder,
) {
    let mut buf = Vec::new();
    loop {
        let mut tap = Tap {
            inner: &mut stream,
            recorder: &recorder,
            connection,
        };
        let Some((head, body)) = read_request(&mut tap, &mut buf).await else {
            return;
        };
        let (answer, close) = (recorder.reply)(&head);
        recorder.seen.lock().unwrap().push(RawRequest {
            head,
            body,
            connection,
        });
        let text = answer.clone();
        let pieces: Vec<&[u8]> = split_pauses(&text);
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                let _ = stream.flush().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if stream.write_all(piece).await.is_err() {
                return;
            }
        }
        let _ = stream.flush().await;
        if close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

fn split_pauses(bytes: &[u8]) -> Vec<&[u8]> {
    let mut pieces = Vec::new();
    let mut rest = bytes;
    while let Some(i) = find(rest, PAUSE.as_bytes()) {
        pieces.push(&rest[..i]);
        rest = &rest[i + PAUSE.len()..];
    }
    pieces.push(rest);
    pieces
}

/// A reader that copies what it reads into the recorder.
struct Tap<'a, S> {
    inner: &'a mut S,
    recorder: &'a Recorder,
    connection: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = out.filled().len();
        let this = &mut *self;
        let poll = std::pin::Pin::new(&mut *this.inner).poll_read(cx, out);
        if let std::task::Poll::Ready(Ok(())) = &poll {
            let new = &out.filled()[before..];
            if let Some(v) = this
                .recorder
                .bytes
                .lock()
                .unwrap()
                .get_mut(this.connection - 1)
            {
                v.extend_from_slice(new);
            }
        }
        poll
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

pub async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
        Ok(Ok(n)) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

/// Reads one request (head + Content-Length or chunked body, decoded).
pub async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Option<(String, Vec<u8>)> {
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if !fill(stream, buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let body = read_body(stream, buf, &head, false).await?;
    Some((head, body))
}

/// Reads a message body framed as `head` says; `close` reads to EOF when there is no length.
pub async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    head: &str,
    close: bool,
) -> Option<Vec<u8>> {
    if header_value(head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                if !fill(stream, buf).await {
                    return None;
                }
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailer section up to the empty line.
                loop {
                    if let Some(i) = find(buf, b"\r\n") {
                        buf.drain(..i + 2);
                        if i == 0 {
                            return Some(body);
                        }
                        continue;
                    }
                    if !fill(stream, buf).await {
                        return None;
                    }
                }
            }
            while buf.len() < size + 2 {
                if !fill(stream, buf).await {
                    return None;
                }
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    }
    match header_value(head, "content-length") {
        Some(n) => {
            let n: usize = n.parse().ok()?;
            while buf.len() < n {
                if !fill(stream, buf).await {
                    return None;
                }
            }
            Some(buf.drain(..n).collect())
        }
        None if close => {
            while fill(stream, buf).await {}
            Some(std::mem::take(buf))
        }
        None => Some(Vec::new()),
    }
}

/// The inbound HTTP/1.1 transports a raw client can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// The fast path.
    Fast,
    /// hyper's HTTP/1.1, after a request the fast path hands over (`Expect`) moved the
    /// connection there.
    Hyper,
}

pub const INBOUND: [Inbound; 2] = [Inbound::Fast, Inbound::Hyper];

/// The request that moves a connection to hyper; raw upstreams leave it out of `seen`.
pub const HANDOVER_TARGET: &str = "/handover";

/// A client connection to the proxy that reads responses as they come.
pub struct Client {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

impl Client {
    pub async fn connect(proxy: &TestProxy) -> Client {
        Client {
            stream: TcpStream::connect(proxy.addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// A connection served by `inbound`: for hyper, its first request is one the fast path
    /// hands over, answered before this returns.
    pub async fn on(proxy: &TestProxy, inbound: Inbound) -> Client {
        Client::on_with(proxy, inbound, "").await
    }

    /// As `on`, with `fields` (whole `name: value\r\n` lines) on the hand-over request.
    pub async fn on_with(proxy: &TestProxy, inbound: Inbound, fields: &str) -> Client {
        let mut client = Client::connect(proxy).await;
        if inbound == Inbound::Hyper {
            client
                .send(&format!("GET {HANDOVER_TARGET} HTTP/1.1\r\nHost: app\r\n{fields}Expect: 100-continue\r\nContent-Length: 0\r\n\r\n"))
                .await;
            let (head, _) = client.response(false).await;
            assert!(
                head.starts_with("HTTP/1.1 200"),
                "hand-over request: {head}"
            );
        }
        client
    }

    pub async fn send(&mut self, raw: &str) {
        self.send_bytes(raw.as_bytes()).await;
    }

    pub async fn send_bytes(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).await.unwrap();
    }

    /// The next response's head and decoded body; `head_request` when it answers a HEAD.
    pub async fn response(&mut self, head_request: bool) -> (String, Vec<u8>) {
        self.try_response(head_request).await.unwrap_or_else(|| {
            panic!(
                "connection closed before a response: {:?}",
                String::from_utf8_lossy(&self.buf)
            )
        })
    }

    /// The next response, or `None` when the connection ends first.
    pub async fn try_response(&mut self, head_request: bool) -> Option<(String, Vec<u8>)> {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !fill(&mut self.stream, &mut self.buf).await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end);
        let body = if head_request {
            Vec::new()
        } else {
            read_body(&mut self.stream, &mut self.buf, &head, false).await?
        };
        Some((head, body))
    }

    pub async fn get(&mut self, path: &str) -> (String, Vec<u8>) {
        self.send(&format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n"))
            .await;
        self.response(false).await
    }

    /// Whether the proxy closes the connection (EOF or reset) within a few seconds, with
    /// nothing but `what_is_left` unread.
    pub async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match tokio::time::timeout(Duration::from_secs(5), self.stream.read_to_end(&mut rest)).await
        {
            Ok(Ok(_)) | Ok(Err(_)) => {
                self.buf.extend_from_slice(&rest);
                true
            }
            Err(_) => false,
        }
    }
}

pub fn reply(raw: &str) -> (Vec<u8>, bool) {
    (raw.as_bytes().to_vec(), false)
}
