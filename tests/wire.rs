//! HTTP/1.1 on the wire, with raw sockets on both sides of the proxy: response framings,
//! keep-alive and pooling, pipelining, interim responses, upstreams that close pooled
//! connections, malformed upstream answers, and requests handed from the fast path to hyper
//! in the middle of a connection.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted upstream saw: each request's head (as text) and body.
#[derive(Clone, Debug)]
struct RawRequest {
    head: String,
    body: Vec<u8>,
    connection: usize,
}

impl RawRequest {
    fn target(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }
}

/// A raw HTTP/1.1 upstream: for each request it answers the bytes `reply` gives for the
/// request head, then closes the connection if `reply` says so (with or without telling).
struct RawUpstream {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<RawRequest>>>,
    connections: Arc<AtomicUsize>,
    _task: AbortOnDrop,
}

type Script = dyn Fn(&str) -> (Vec<u8>, bool) + Send + Sync;

impl RawUpstream {
    async fn start(reply: impl Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let reply: Arc<Script> = Arc::new(reply);
        let (s, c) = (Arc::clone(&seen), Arc::clone(&connections));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let number = c.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(serve_raw(
                    stream,
                    number,
                    Arc::clone(&s),
                    Arc::clone(&reply),
                ));
            }
        });
        RawUpstream {
            addr,
            seen,
            connections,
            _task: AbortOnDrop(task),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<RawRequest> {
        self.seen.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve_raw(
    mut stream: TcpStream,
    connection: usize,
    seen: Arc<Mutex<Vec<RawRequest>>>,
    reply: Arc<Script>,
) {
    let mut buf = Vec::new();
    loop {
        let Some((head, body)) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let (answer, close) = reply(&head);
        seen.lock().unwrap().push(RawRequest {
            head,
            body,
            connection,
        });
        if stream.write_all(&answer).await.is_err() || close {
            return;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
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
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
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
async fn read_body(
    stream: &mut TcpStream,
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

/// A client connection to the proxy that reads responses as they come.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(proxy: &TestProxy) -> Client {
        Client {
            stream: TcpStream::connect(proxy.addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, raw: &str) {
        self.stream.write_all(raw.as_bytes()).await.unwrap();
    }

    /// The next response's head and decoded body; `head_request` when it answers a HEAD.
    async fn response(&mut self, head_request: bool) -> (String, Vec<u8>) {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                fill(&mut self.stream, &mut self.buf).await,
                "connection closed before a response: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end);
        let body = if head_request {
            Vec::new()
        } else {
            read_body(&mut self.stream, &mut self.buf, &head, false)
                .await
                .expect("a complete body")
        };
        (head, body)
    }

    async fn get(&mut self, path: &str) -> (String, Vec<u8>) {
        self.send(&format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n"))
            .await;
        self.response(false).await
    }
}

async fn proxy_to(upstream: &RawUpstream, tokens: &TokenServer) -> TestProxy {
    let config = format!(
        "{HEAD}{}{}",
        client_app_profile("p", tokens, ""),
        route("r", "/", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    proxy
}

fn reply(raw: &str) -> (Vec<u8>, bool) {
    (raw.as_bytes().to_vec(), false)
}

#[tokio::test]
async fn every_response_framing_passes_through_on_one_kept_alive_connection() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = RawUpstream::start(|head| {
        let target = head.split(' ').nth(1).unwrap_or("");
        match target {
            "/chunked" => reply(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-End: 1\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
            ),
            // No length, no chunking: the body ends when the upstream closes.
            "/close" => ("HTTP/1.1 200 OK\r\nX-Kind: close\r\n\r\nuntil the end".into(), true),
            _ => reply("HTTP/1.1 201 Made It\r\nContent-Length: 6\r\n\r\nlength"),
        }
    })
    .await;
    let proxy = proxy_to(&upstream, &tokens).await;
    let mut client = Client::connect(&proxy).await;

    let (head, body) = client.get("/chunked").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, b"hello world");
    assert!(header_value(&head, "x-hop").is_none(), "{head}");
    assert!(header_value(&head, "keep-alive").is_none(), "{head}");
    assert_eq!(header_value(&head, "x-end").as_deref(), Some("1"));

    let (head, body) = client.get("/close").await;
    assert_eq!(
        header_value(&head, "transfer-encoding").as_deref(),
        Some("chunked"),
        "a close-delimited body is re-framed so the client connection can stay open: {head}"
    );
    assert_eq!(body, b"until the end");

    let (head, body) = client.get("/length").await;
    assert!(head.starts_with("HTTP/1.1 201 Made It\r\n"), "{head}");
    assert_eq!(body, b"length");
    let (_, body) = client.get("/chunked").await;
    assert_eq!(body, b"hello world");

    // Chunked and length-delimited responses leave the upstream connection reusable; the
    // close-delimited one used it up.
    let seen = upstream.seen();
    let conns: Vec<usize> = seen.iter().map(|r| r.connection).collect();
    assert_eq!(conns, vec![1, 1, 2, 2], "{seen:?}");
    for r in &seen {
        assert!(r.head.contains("Bearer "), "{}", r.head);
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = RawUpstream::start(|head| {
        let target = head.split(' ').nth(1).unwrap_or("").to_owned();
        let body = format!("you asked for {target}");
        (
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
            false,
        )
    })
    .await;
    let proxy = proxy_to(&upstream, &tokens).await;
    let mut client = Client::connect(&proxy).await;
    client
        .send(concat!(
            "GET /1 HTTP/1.1\r\nHost: app\r\n\r\n",
            "POST /2 HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\n\r\nbody",
            "GET /3 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
        ))
        .await;
    for n in 1..=3 {
        let (_, body) = client.response(false).await;
        assert_eq!(
            String::from_utf8_lossy(&body),
            format!("you asked for /{n}")
        );
    }
    // `Connection: close` on the last one: the proxy closes after answering it.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), client.stream.read_to_end(&mut rest))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    assert_eq!(n, 0);
    let seen = upstream.seen();
    assert_eq!(seen[1].body, b"body");
    assert!(seen
        .iter()
        .all(|r| !r.head.to_ascii_lowercase().contains("connection: close")));
}

#[tokio::test]
async fn interim_responses_are_dropped_and_head_answers_have_no_body() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = RawUpstream::start(|head| {
        if head.starts_with("HEAD ") {
            // The length of the body a GET would have had; no body follows.
            return reply("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
        }
        reply("HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    })
    .await;
    let proxy = proxy_to(&upstream, &tokens).await;
    let mut client = Client::connect(&proxy).await;
    let (head, body) = client.get("/hints").await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, b"ok");
    client.send("HEAD /h HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let (head, _) = client.response(true).await;
    assert_eq!(header_value(&head, "content-length").as_deref(), Some("10"));
    // Nothing but the next response follows the HEAD answer on the connection.
    let (head, body) = client.get("/again").await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, b"ok");
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn pooled_connections_the_upstream_closed_are_not_used() {
    let tokens = TokenServer::healthy(3600).await;
    // Closes every connection after one answer, without saying so.
    let upstream = RawUpstream::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            true,
        )
    })
    .await;
    let proxy = proxy_to(&upstream, &tokens).await;
    let client = client();
    for (i, method) in ["GET", "POST", "GET", "DELETE", "POST"].iter().enumerate() {
        // Time for the upstream's FIN to arrive; a POST must not be sent into a dead socket
        // (it could not be retried).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = client
            .request(method.parse().unwrap(), proxy.url(&format!("/{i}")))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i} ({method})");
    }
    assert_eq!(upstream.connections(), 5);
}

#[tokio::test]
async fn broken_upstream_answers_are_502_and_the_client_connection_survives() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = RawUpstream::start(|head| match head.split(' ').nth(1).unwrap_or("") {
        "/garbage" => ("NOT HTTP AT ALL\r\n\r\n".into(), true),
        "/conflict" => (
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc".into(),
            true,
        ),
        "/silent" => (Vec::new(), true),
        _ => reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    })
    .await;
    let proxy = proxy_to(&upstream, &tokens).await;
    let mut client = Client::connect(&proxy).await;
    for path in ["/garbage", "/conflict", "/silent"] {
        let (head, body) = client.get(path).await;
        assert!(head.starts_with("HTTP/1.1 502 "), "{path}: {head}");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"], "upstream_unreachable", "{path}");
    }
    let (head, body) = client.get("/fine").await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, b"ok");
}

#[tokio::test]
async fn requests_the_fast_path_leaves_to_hyper_are_served_on_the_same_connection() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream =
        RawUpstream::start(|_| reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
    let proxy = proxy_to(&upstream, &tokens).await;
    let mut client = Client::connect(&proxy).await;
    let (_, body) = client.get("/fast").await;
    assert_eq!(body, b"ok");
    // A chunked request body: hyper takes the connection from here on.
    client
        .send("POST /chunked-upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        .await;
    let (head, body) = client.response(false).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, b"ok");
    let (_, body) = client.get("/after").await;
    assert_eq!(body, b"ok");

    let seen = upstream.seen();
    let targets: Vec<&str> = seen.iter().map(|r| r.target()).collect();
    assert_eq!(targets, vec!["/fast", "/chunked-upload", "/after"]);
    assert_eq!(seen[1].body, b"abcdefg");
    for r in &seen {
        assert!(r.head.contains("Bearer "), "{}", r.head);
        assert!(
            r.head
                .to_ascii_lowercase()
                .contains("x-forwarded-for: 127.0.0.1"),
            "{}",
            r.head
        );
    }
}
