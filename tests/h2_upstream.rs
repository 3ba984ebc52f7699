//! An `https://` upstream that answers in h2, on every inbound transport: once it is known to
//! speak h2, requests share one h2 connection to it (`upstream::h2_pool`), more only beyond
//! the upstream's stream limit; bodies larger
//! than h2's flow-control windows go both ways whole; the token is injected, the authority
//! travels as `:authority` and the client's host as `X-Forwarded-Host`.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::{Digest, Sha256};
use std::time::Duration;
use support::blackhole;
use support::raw;
use support::tls::{https_route, https_route_with, TestCa};
use support::transport::On;
use support::*;
use tokio::net::TcpListener;

/// A request as the h2 upstream saw it.
#[derive(Debug, Clone)]
struct Served {
    version: http::Version,
    path: String,
    authorization: Option<String>,
    host: Option<String>,
    forwarded_host: Option<String>,
    content_length: Option<String>,
    body_len: usize,
    body_sha: String,
}

const BIG: usize = 5 * 1024 * 1024;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An h2 (and http/1.1) TLS upstream: `/big` answers `BIG` bytes, `/stall` a body that never
/// comes, `/slow` after 5 s, `/gate/N` once N requests to `/gate/…` are under way at once,
/// `/pause/MS` after MS milliseconds, `/early` at once, keeping the request body unread for
/// 30 s, anything else a small JSON body after reading the request body whole. Counts TCP
/// connections.
async fn h2_upstream(
    ca: &TestCa,
) -> (
    u16,
    Arc<Mutex<Vec<Served>>>,
    Arc<AtomicUsize>,
    AbortOnDrop,
    Arc<AtomicUsize>,
) {
    h2_upstream_with(ca, None).await
}

/// As `h2_upstream`, allowing at most `max_streams` streams per connection when given.
async fn h2_upstream_with(
    ca: &TestCa,
    max_streams: Option<u32>,
) -> (
    u16,
    Arc<Mutex<Vec<Served>>>,
    Arc<AtomicUsize>,
    AbortOnDrop,
    Arc<AtomicUsize>,
) {
    h2_upstream_serving(ca, max_streams, usize::MAX, false).await
}

/// As `h2_upstream_with`, closing every TCP connection after the first `served` right after
/// its TLS handshake and h2's (its SETTINGS sent); with `silent`, keeping them open without a
/// byte instead.
async fn h2_upstream_serving(
    ca: &TestCa,
    max_streams: Option<u32>,
    served: usize,
    silent: bool,
) -> (
    u16,
    Arc<Mutex<Vec<Served>>>,
    Arc<AtomicUsize>,
    AbortOnDrop,
    Arc<AtomicUsize>,
) {
    let (cert, key) = ca.leaf("h2-upstream");
    let config = egain_proxy::tls::server_config(cert.as_ref(), key.as_ref()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let stalled = Arc::new(AtomicUsize::new(0));
    let (log, count, stalled_bodies) = (
        Arc::clone(&seen),
        Arc::clone(&connections),
        Arc::clone(&stalled),
    );
    let gate = Arc::new(tokio::sync::watch::channel(0usize).0);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let serve = count.fetch_add(1, Ordering::SeqCst) < served;
            let (acceptor, log) = (acceptor.clone(), Arc::clone(&log));
            let (dropped, gate) = (Arc::clone(&stalled), Arc::clone(&gate));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                if !serve {
                    if silent {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        drop(tls);
                    } else {
                        let _ = h2::server::handshake(tls).await;
                    }
                    return;
                }
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (log, dropped, gate) =
                        (Arc::clone(&log), Arc::clone(&dropped), Arc::clone(&gate));
                    async move {
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .map(|v| v.to_str().unwrap().to_owned())
                        };
                        let mut served = Served {
                            version: req.version(),
                            path: req.uri().path().to_owned(),
                            authorization: header("authorization"),
                            host: header("host"),
                            forwarded_host: header("x-forwarded-host"),
                            content_length: header("content-length"),
                            body_len: 0,
                            body_sha: String::new(),
                        };
                        if served.path == "/early" {
                            log.lock().unwrap().push(served);
                            let body = req.into_body();
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                drop(body);
                            });
                            return Ok(json_response(200, "{\"ok\":true}", &[]));
                        }
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        served.body_len = body.len();
                        served.body_sha = sha(&body);
                        let path = served.path.clone();
                        log.lock().unwrap().push(served);
                        let response = match path.as_str() {
                            "/big" => http::Response::new(full(Bytes::from(pattern(BIG)))),
                            "/stall" => http::Response::new(Stalled(Arc::clone(&dropped)).boxed()),
                            "/slow" => {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                                json_response(200, "{\"ok\":true}", &[])
                            }
                            paused if paused.starts_with("/pause/") => {
                                let ms: u64 = paused["/pause/".len()..].parse().unwrap();
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                                json_response(200, "{\"ok\":true}", &[])
                            }
                            gated if gated.starts_with("/gate/") => {
                                let n: usize = gated["/gate/".len()..].parse().unwrap();
                                let mut opened = gate.subscribe();
                                gate.send_modify(|under_way| *under_way += 1);
                                let _ = opened.wait_for(|under_way| *under_way >= n).await;
                                json_response(200, "{\"ok\":true}", &[])
                            }
                            _ => json_response(200, "{\"ok\":true}", &[]),
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                if let Some(max) = max_streams {
                    builder.http2().max_concurrent_streams(max);
                }
                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    (port, seen, connections, AbortOnDrop(task), stalled_bodies)
}

/// A response body that never sends a byte; counts its drops (the stream was reset).
struct Stalled(Arc<AtomicUsize>);

impl http_body::Body for Stalled {
    type Data = Bytes;
    type Error = egain_proxy::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

async fn h2_upstream_shares_one_connection_and_moves_big_bodies(on: On) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, seen, connections, _guard, _) = h2_upstream(&ca).await;
    let proxy = on.proxy(&https_route(&tokens, port, &ca)).await;
    proxy.ready().await;
    let client = on.client();

    // The first answer tells the proxy the upstream speaks h2.
    let r = client.get(on.url(&proxy, "/first")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let before = connections.load(Ordering::SeqCst);

    // At once: small requests, an upload and a download, each larger than h2's default
    // windows (64 KiB) and the proxy's own (2 MiB per stream).
    let upload = pattern(3 * 1024 * 1024 + 17);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (client, url) = (client.clone(), on.url(&proxy, &format!("/small/{i}")));
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .body(format!("body {i}"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap().len())
        }));
    }
    let up = client
        .post(on.url(&proxy, "/upload"))
        .body(upload.clone())
        .send();
    let down = client.get(on.url(&proxy, "/big")).send();
    let (up, down) = tokio::join!(up, down);
    let up = up.unwrap();
    assert_eq!(up.status(), 200);
    let down = down.unwrap();
    assert_eq!(down.status(), 200);
    let got = down.bytes().await.unwrap();
    assert_eq!(got.len(), BIG, "the download arrived short");
    assert_eq!(
        sha(&got),
        sha(&pattern(BIG)),
        "the download arrived altered"
    );
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, "{\"ok\":true}".len()));
    }

    let seen = seen.lock().unwrap().clone();
    let uploaded = seen
        .iter()
        .find(|s| s.path == "/upload")
        .expect("the upstream saw the upload");
    assert_eq!(uploaded.body_len, upload.len());
    assert_eq!(uploaded.body_sha, sha(&upload));
    for s in &seen {
        assert_eq!(s.version, http::Version::HTTP_2, "{} not over h2", s.path);
        assert!(
            tokens.is_live(s.authorization.as_deref()),
            "{} without the token: {:?}",
            s.path,
            s.authorization
        );
        // The authority travels as `:authority`, the client's host as X-Forwarded-Host.
        assert_eq!(s.host, None, "{} carried a Host field", s.path);
        assert!(
            s.forwarded_host.is_some(),
            "{} without X-Forwarded-Host",
            s.path
        );
    }
    let small = seen
        .iter()
        .filter(|s| s.path.starts_with("/small/"))
        .count();
    assert_eq!(small, 16);
    // Everything after the first answer on one connection.
    let after = connections.load(Ordering::SeqCst);
    assert!(
        after - before <= 1,
        "{} new upstream connections for 18 requests to an h2 upstream",
        after - before
    );
}

on_every_transport!(h2_upstream_shares_one_connection_and_moves_big_bodies);

/// A proxy in front of the h2 upstream on `port`, and a raw HTTP/1.1 client whose first
/// request has told the proxy that the upstream speaks h2.
async fn warmed_up(tokens: &TokenServer, port: u16, ca: &TestCa) -> (TestProxy, raw::Client) {
    let proxy = TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        https_route(tokens, port, ca)
    ))
    .await;
    proxy.ready().await;
    let mut client = raw::Client::connect(&proxy).await;
    let (head, _) = client.get("/first").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    (proxy, client)
}

/// A GET with a chunked body (HTTP/1.1; hyper's transport takes it) reaches an h2 upstream
/// without the connection-specific `Transfer-Encoding` h2 forbids (RFC 9113 §8.2.2), its body
/// whole and its length stated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_get_reaches_an_h2_upstream() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, seen, _connections, _guard, _) = h2_upstream(&ca).await;
    let (_proxy, mut client) = warmed_up(&tokens, port, &ca).await;
    client
        .send(
            "GET /search HTTP/1.1\r\nhost: proxy\r\ntransfer-encoding: chunked\r\n\r\n\
             5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await;
    let (head, body) = client.response(false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"{\"ok\":true}");
    let seen = seen.lock().unwrap().clone();
    let search = seen
        .iter()
        .find(|s| s.path == "/search")
        .expect("upstream saw it");
    assert_eq!(search.version, http::Version::HTTP_2);
    assert_eq!(search.body_len, 11);
    assert_eq!(search.body_sha, sha(b"hello world"));
    assert_eq!(search.content_length.as_deref(), Some("11"));
}

/// An HTTP/1.1 client that leaves while an h2 upstream's body is stalled ends the upstream
/// stream (a reset), rather than holding one of the shared connection's streams for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_a_stalled_body_frees_the_upstream_stream() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, _seen, _connections, _guard, dropped) = h2_upstream(&ca).await;
    let (proxy, _client) = warmed_up(&tokens, port, &ca).await;
    for _ in 0..3 {
        let mut client = raw::Client::connect(&proxy).await;
        client
            .send("GET /stall HTTP/1.1\r\nhost: proxy\r\n\r\n")
            .await;
        // The head arrives; the body never does. Then the client goes.
        let mut stream = client.stream;
        let mut buf = client.buf;
        while raw::find(&buf, b"\r\n\r\n").is_none() {
            assert!(
                raw::fill(&mut stream, &mut buf).await,
                "closed before the head"
            );
        }
        assert!(buf.starts_with(b"HTTP/1.1 200"));
        drop(stream);
    }
    eventually(Duration::from_secs(5), || {
        dropped.load(Ordering::SeqCst) == 3
    })
    .await;
}

/// An h2 upstream written with the `h2` crate's server, which lets it do what hyper's
/// server will not: `/nocontent` answers 204 and then sends DATA, as every answer does, to
/// HEAD too; `/hugehead` answers with 300 KB of fields, over the proxy's limit for a response
/// head (a connection error for the proxy's h2 client); `/slow` answers after 500 ms;
/// `/early` answers 413 before the request body and then holds the stream, giving no window
/// (counting the resets it sees); `/refused` answers 200,
/// sends part of a body, then resets the stream with REFUSED_STREAM; `/refuse-once/…` reads
/// the request body whole and refuses the stream (REFUSED_STREAM) the first time each path
/// comes, and answers the body's length after.
async fn raw_h2_upstream(ca: &TestCa) -> (u16, AbortOnDrop, Arc<AtomicUsize>) {
    let refused_once = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
    let (cert, key) = ca.leaf("raw-h2-upstream");
    let config = egain_proxy::tls::server_config(cert.as_ref(), key.as_ref()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let resets = Arc::new(AtomicUsize::new(0));
    let reset_seen = Arc::clone(&resets);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let reset_seen = Arc::clone(&reset_seen);
            let refused_once = Arc::clone(&refused_once);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut connection) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let path = request.uri().path().to_owned();
                    let reset_seen = Arc::clone(&reset_seen);
                    let refused_once = Arc::clone(&refused_once);
                    tokio::spawn(async move {
                        if path.starts_with("/refuse-once/") {
                            let Ok(body) = read_all(request.into_body()).await else {
                                return;
                            };
                            if refused_once.lock().unwrap().insert(path) {
                                respond.send_reset(h2::Reason::REFUSED_STREAM);
                                return;
                            }
                            let response = http::Response::builder().status(200).body(()).unwrap();
                            if let Ok(mut out) = respond.send_response(response, false) {
                                let _ = out.send_data(Bytes::from(body.len().to_string()), true);
                            }
                            return;
                        }
                        if path == "/early" {
                            // 413 at once; the body is read but its window never given back,
                            // and the stream neither reset nor closed by this side.
                            let response = http::Response::builder().status(413).body(()).unwrap();
                            let _ = respond.send_response(response, true);
                            let mut body = request.into_body();
                            loop {
                                match body.data().await {
                                    Some(Ok(_)) => continue,
                                    Some(Err(e)) if e.is_reset() => {
                                        reset_seen.fetch_add(1, Ordering::SeqCst);
                                        break;
                                    }
                                    _ => break,
                                }
                            }
                            // Held: only the proxy can end this stream.
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            drop(body);
                            return;
                        }
                        let status = if path == "/nocontent" { 204 } else { 200 };
                        let mut response = http::Response::builder().status(status);
                        match path.as_str() {
                            "/slow" => tokio::time::sleep(Duration::from_millis(500)).await,
                            "/hugehead" => {
                                for i in 0..300 {
                                    response =
                                        response.header(format!("x-huge-{i}"), "h".repeat(1000));
                                }
                            }
                            _ => {}
                        }
                        let response = response.body(()).unwrap();
                        let Ok(mut body) = respond.send_response(response, false) else {
                            return;
                        };
                        let _ = body.send_data(Bytes::from_static(b"stray bytes"), false);
                        match path.as_str() {
                            "/refused" => {
                                // After the head has gone on to the client.
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                body.send_reset(h2::Reason::REFUSED_STREAM)
                            }
                            _ => {
                                let _ = body.send_data(Bytes::new(), true);
                            }
                        }
                    });
                }
            });
        }
    });
    (port, AbortOnDrop(task), resets)
}

/// What an upstream says after its head reaches an h2 client only as the proxy's own word: no
/// body after a 204 (RFC 9110 §6.4.1), and a stream the upstream reset mid-body is reset with
/// INTERNAL_ERROR, never with the upstream's REFUSED_STREAM, which would tell the client the
/// request was not processed (RFC 9113 §8.7) and invite it to send it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_gets_no_body_after_204_and_no_upstream_reset_code() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, _guard, _) = raw_h2_upstream(&ca).await;
    let proxy = TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        https_route(&tokens, port, &ca)
    ))
    .await;
    proxy.ready().await;
    // h2c by prior knowledge, with the h2 crate, to see the reset's reason.
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let get = |path: &str| {
        http::Request::builder()
            .uri(format!("http://proxy{path}"))
            .body(())
            .unwrap()
    };
    for path in ["/first", "/nocontent"] {
        let mut client = client.clone().ready().await.unwrap();
        let (response, _) = client.send_request(get(path), true).unwrap();
        let response = response.await.unwrap();
        let expected = if path == "/first" { 200 } else { 204 };
        assert_eq!(response.status(), expected, "{path}");
        let body = read_all(response.into_body()).await.unwrap();
        if path == "/nocontent" {
            assert_eq!(body, b"", "a body after 204");
        }
    }
    let mut client = client.clone().ready().await.unwrap();
    let (response, _) = client.send_request(get("/refused"), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let e = read_all(response.into_body()).await.unwrap_err();
    assert_eq!(e.reason(), Some(h2::Reason::INTERNAL_ERROR), "{e}");
}

/// On every transport, an upload an h2 upstream refused (REFUSED_STREAM, after reading it) is
/// sent again whole from what the proxy kept of it; one that had sent more than the proxy
/// keeps (256 KiB) is a 502 that says why it was not sent again.
async fn a_refused_upload_is_sent_again_from_what_was_kept(on: On) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, _guard, _) = raw_h2_upstream(&ca).await;
    let proxy = on.proxy(&https_route(&tokens, port, &ca)).await;
    proxy.ready().await;
    let client = on.client();
    let r = client.get(on.url(&proxy, "/first")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let kept = pattern(200_000);
    let r = client
        .post(on.url(&proxy, "/refuse-once/a"))
        .body(kept)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "200000");
    let r = client
        .post(on.url(&proxy, "/refuse-once/b"))
        .body(pattern(400_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let text = r.text().await.unwrap();
    assert!(text.contains("not sent again"), "{text}");
}

on_every_transport!(a_refused_upload_is_sent_again_from_what_was_kept);

async fn read_all(mut body: h2::RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut all = Vec::new();
    while let Some(data) = body.data().await {
        let data = data?;
        let _ = body.flow_control().release_capacity(data.len());
        all.extend_from_slice(&data);
    }
    Ok(all)
}

/// On every transport, a 204, or an answer to HEAD, from an h2 upstream that sends DATA after
/// it reaches the client without a body, and the client's connection goes on serving (RFC
/// 9110 §6.4.1, §9.3.2).
async fn no_body_after_a_204_or_head_from_an_h2_upstream(on: On) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, _guard, _) = raw_h2_upstream(&ca).await;
    let proxy = on.proxy(&https_route(&tokens, port, &ca)).await;
    proxy.ready().await;
    let client = on.client();
    for path in [
        "/first",
        "/nocontent",
        "HEAD /head",
        "/nocontent",
        "HEAD /head",
        "/after",
    ] {
        let r = match path.strip_prefix("HEAD ") {
            Some(path) => client.head(on.url(&proxy, path)),
            None => client.get(on.url(&proxy, path)),
        };
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.bytes().await.unwrap();
        match path {
            "/nocontent" => assert_eq!((status, &body[..]), (204, &b""[..]), "{path}"),
            "HEAD /head" => assert_eq!((status, &body[..]), (200, &b""[..]), "{path}"),
            _ => assert_eq!(status, 200, "{path}"),
        }
    }
}

on_every_transport!(no_body_after_a_204_or_head_from_an_h2_upstream);

/// On every transport, an h2 upstream's response head of 40 KiB passes as an HTTP/1.1
/// upstream's does (both up to `upstream::MAX_RESPONSE_HEAD`); it was a 502 over h2 beyond
/// 16 KiB, and the upstream connection with it. Through hyper's client (the first answer)
/// and the proxy's own h2 connection.
async fn a_large_response_head_passes_from_an_h2_upstream(on: On) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (cert, key) = ca.leaf("h2-upstream");
    let (addr, _guard) = support::tls::serve_tls(&cert, &key, |_req| async {
        let mut response = http::Response::new(full("ok"));
        for i in 0..10 {
            response.headers_mut().insert(
                http::HeaderName::from_bytes(format!("x-big-{i}").as_bytes()).unwrap(),
                http::HeaderValue::from_str(&"v".repeat(4000)).unwrap(),
            );
        }
        response
    })
    .await;
    let proxy = on.proxy(&https_route(&tokens, addr.port(), &ca)).await;
    proxy.ready().await;
    let client = on.client();
    for i in 0..3 {
        let r = client
            .get(on.url(&proxy, &format!("/big-head/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.headers()["x-big-9"].len(), 4000);
        assert_eq!(r.text().await.unwrap(), "ok");
    }
}

on_every_transport!(a_large_response_head_passes_from_an_h2_upstream);

/// On every transport, an upstream body that stops coming ends once the upstream has sent
/// nothing for the route's `timeout`: the client's transfer ends as broken, and the upstream
/// stream is reset (its body dropped), so neither side is held for good. Twice: through
/// hyper's client (the first answer, before the proxy knows the upstream speaks h2), then on
/// the proxy's own h2 connection.
async fn a_stalled_h2_upstream_body_ends_at_the_route_timeout(on: On) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, _seen, _connections, _guard, dropped) = h2_upstream(&ca).await;
    let extra = "timeout = \"700ms\"";
    let proxy = on.proxy(&https_route_with(&tokens, port, &ca, extra)).await;
    proxy.ready().await;
    let client = on.client();
    let url = on.url(&proxy, "/stall");
    expect_stalled_bodies_cut(&client, &url, Duration::from_millis(700), || {
        dropped.load(Ordering::SeqCst)
    })
    .await;
    let r = client.get(on.url(&proxy, "/after")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

on_every_transport!(a_stalled_h2_upstream_body_ends_at_the_route_timeout);

/// On every transport, an h2 connection that goes silent (no FIN, no RST: the upstream or a
/// middlebox vanished) is found dead while requests wait on it: it is sent a PING once it has
/// been silent for a third of the route's timeout, and closed when that goes unanswered as
/// long. Its GET is sent again on a new connection and answered within the route's timeout;
/// its POST, which the upstream may have processed, is a 502 and is not sent again; what
/// follows goes to the new connection. A connection that is slow to answer but answers its
/// PINGs is kept.
async fn a_silent_h2_connection_is_found_dead_and_replaced(on: On) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, seen, connections, _guard, _) = h2_upstream(&ca).await;
    let hole = blackhole::Blackhole::start(port).await;
    let extra = "timeout = \"6s\"";
    let proxy = on
        .proxy(&https_route_with(&tokens, hole.port, &ca, extra))
        .await;
    proxy.ready().await;
    let client = on.client();
    // The first answer tells the proxy the upstream speaks h2; the second opens its h2
    // connection.
    for path in ["/first", "/second"] {
        let r = client.get(on.url(&proxy, path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let before = connections.load(Ordering::SeqCst);
    let r = client.get(on.url(&proxy, "/slow")).send().await.unwrap();
    assert_eq!(r.status(), 200, "a slow answer on a live connection");
    assert_eq!(connections.load(Ordering::SeqCst), before);

    hole.silence();
    let get = client.get(on.url(&proxy, "/get-after")).send();
    let post = client
        .post(on.url(&proxy, "/post-after"))
        .body("once")
        .send();
    let (get, post) = tokio::join!(get, post);
    let get = get.unwrap();
    assert_eq!(
        get.status(),
        200,
        "the GET was not sent again on a new connection"
    );
    let post = post.unwrap();
    assert_eq!(post.status(), 502);
    let body = post.text().await.unwrap();
    assert!(body.contains("connection failed"), "{body}");
    assert!(connections.load(Ordering::SeqCst) > before);

    let r = client.get(on.url(&proxy, "/later")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = seen.lock().unwrap().clone();
    let count = |path: &str| seen.iter().filter(|s| s.path == path).count();
    assert_eq!(count("/get-after"), 1);
    assert_eq!(count("/post-after"), 0, "the upstream never saw the POST");
    assert_eq!(count("/later"), 1);
}

on_every_transport!(a_silent_h2_connection_is_found_dead_and_replaced);

/// On every transport, when the proxy's h2 client ends an upstream connection on an error it
/// found itself (here a response head over its limit: GOAWAY COMPRESSION_ERROR), a GET
/// waiting on another stream of that connection is sent again on a new one, as for a
/// connection that broke; the POST that met the error is a 502, not sent again.
async fn a_get_on_a_connection_the_proxy_ends_is_sent_again(on: On) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, _guard, _) = raw_h2_upstream(&ca).await;
    let proxy = on.proxy(&https_route(&tokens, port, &ca)).await;
    proxy.ready().await;
    let client = on.client();
    for path in ["/first", "/second"] {
        let r = client.get(on.url(&proxy, path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let slow = client.get(on.url(&proxy, "/slow")).send();
    let huge = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.post(on.url(&proxy, "/hugehead")).send().await
    };
    let (slow, huge) = tokio::join!(slow, huge);
    assert_eq!(huge.unwrap().status(), 502);
    let slow = slow.unwrap();
    let status = slow.status();
    let body = slow.text().await.unwrap();
    assert_eq!(status, 200, "the waiting GET was not sent again: {body}");
}

on_every_transport!(a_get_on_a_connection_the_proxy_ends_is_sent_again);

/// On every transport, an upload the h2 upstream answered early (413) and then neither reset
/// nor gave window for is reset by the proxy once the route's `timeout` has passed without
/// window, so the stream (and the client's connection) is not held for good.
async fn an_upload_answered_early_and_starved_of_window_is_reset(on: On) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, _guard, resets) = raw_h2_upstream(&ca).await;
    let extra = "timeout = \"1s\"";
    let proxy = on.proxy(&https_route_with(&tokens, port, &ca, extra)).await;
    proxy.ready().await;
    let client = on.client();
    for path in ["/first", "/second"] {
        let r = client.get(on.url(&proxy, path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let upload = client
        .post(on.url(&proxy, "/early"))
        .body(pattern(1024 * 1024))
        .send();
    let r = tokio::time::timeout(Duration::from_secs(5), upload).await;
    // The 413 came before the upload ended; a client may also see its upload cut.
    if let Ok(Ok(r)) = r {
        assert_eq!(r.status(), 413);
    }
    eventually(Duration::from_secs(4), || {
        resets.load(Ordering::SeqCst) == 1
    })
    .await;
}

on_every_transport!(an_upload_answered_early_and_starved_of_window_is_reset);

/// Four h2 clients (over TLS on the TLS transport, else h2c) ask for `/big` (5 MiB) each and
/// read none of it: their windows stay at h2's initial 64 KiB, so each of their upstream
/// streams fills its 2 MiB window in the proxy. Returns once the upstream has seen all four.
async fn stall_big_answers(
    on: &On,
    proxy: &TestProxy,
    seen: &Mutex<Vec<Served>>,
) -> Vec<(h2::RecvStream, support::transport::Conn)> {
    let h2c = On::new(support::transport::Transport::H2c);
    let stalling = match on.transport {
        support::transport::Transport::TlsH2 => on,
        _ => &h2c,
    };
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut conn = stalling.connect(proxy).await;
        held.push((conn.get_unread("/big").await, conn));
    }
    eventually(Duration::from_secs(5), || {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == "/big")
            .count()
            == 4
    })
    .await;
    held
}

/// On every transport, clients that stop reading large answers from an h2 upstream hold only
/// their own streams' windows: other answers on the same upstream connection keep coming
/// (with a connection window as small as the sum of a few stream windows, three such clients
/// stalled every answer).
async fn clients_that_stop_reading_do_not_stall_other_answers(on: On) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, seen, _connections, _guard, _) = h2_upstream(&ca).await;
    let proxy = on.proxy(&https_route(&tokens, port, &ca)).await;
    proxy.ready().await;
    let client = on.client();
    let r = client.get(on.url(&proxy, "/first")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let held = stall_big_answers(&on, &proxy, &seen).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = async {
        let r = client.get(on.url(&proxy, "/small")).send().await.unwrap();
        (r.status(), r.bytes().await.unwrap().len())
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), answer).await;
    assert_eq!(
        answer.expect("an answer stalled behind clients that stopped reading"),
        (http::StatusCode::OK, "{\"ok\":true}".len())
    );
    drop(held);
}

on_every_transport!(clients_that_stop_reading_do_not_stall_other_answers);

/// On every transport, clients that stop reading lose their answers' streams once they have
/// taken nothing for the route's `timeout` (1 s here): the proxy resets the upstream streams,
/// and the clients, reading on later, get an error where they would get all of `/big`. (As
/// many such clients as the upstream allows streams on a connection would otherwise keep it,
/// and their windows' worth of memory, for good.)
async fn clients_that_stop_reading_lose_their_streams_at_the_route_timeout(on: On) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, seen, _connections, _guard, _) = h2_upstream_with(&ca, Some(4)).await;
    let proxy = on
        .proxy(&https_route_with(&tokens, port, &ca, "timeout = \"1s\""))
        .await;
    proxy.ready().await;
    let client = on.client();
    let r = client.get(on.url(&proxy, "/first")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let held = stall_big_answers(&on, &proxy, &seen).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for (answer, _conn) in held {
        let read = tokio::time::timeout(Duration::from_secs(10), read_all(answer)).await;
        match read.expect("a stalled answer neither ended nor failed") {
            Ok(all) => panic!(
                "a client that took nothing for 2.5 s got all {} bytes",
                all.len()
            ),
            Err(e) => assert!(e.is_reset() || e.is_io(), "{e}"),
        }
    }
    let r = client.get(on.url(&proxy, "/small")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

on_every_transport!(clients_that_stop_reading_lose_their_streams_at_the_route_timeout);

/// On every transport, requests beyond the upstream's stream limit (2 per connection here) go
/// on further connections: the upstream answers `/gate/16` only once sixteen of them are under
/// way at once, which one connection would never carry (they would wait for a stream until the
/// route's timeout, 504). The burst also opens the proxy's first h2 connection: a connection
/// takes requests only once its limit is known, so none is sent beyond it and refused (a
/// connection used at once took the whole burst, and the upstream refused all but two).
async fn requests_beyond_the_upstream_stream_limit_open_more_connections(on: On) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, seen, connections, _guard, _) = h2_upstream_with(&ca, Some(2)).await;
    let proxy = on
        .proxy(&https_route_with(&tokens, port, &ca, "timeout = \"5s\""))
        .await;
    proxy.ready().await;
    let client = on.client();
    // The first answer tells the proxy the upstream speaks h2.
    let r = client.get(on.url(&proxy, "/first")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let before = connections.load(Ordering::SeqCst);
    let gated = (0..16).map(|_| {
        let request = client.get(on.url(&proxy, "/gate/16")).send();
        async move {
            let r = request.await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    });
    for answer in futures_util::future::join_all(gated).await {
        assert_eq!(answer, (200, "{\"ok\":true}".to_owned()));
    }
    let opened = connections.load(Ordering::SeqCst) - before;
    assert!(
        opened >= 8,
        "sixteen requests at once on {opened} connections allowing 2 streams each"
    );
    {
        let seen = seen.lock().unwrap();
        assert!(seen.iter().all(|s| s.version == http::Version::HTTP_2));
        assert_eq!(seen.iter().filter(|s| s.path == "/gate/16").count(), 16);
    }
    // Answered, their streams count no more: requests one at a time open nothing new.
    let now = connections.load(Ordering::SeqCst);
    for _ in 0..10 {
        let r = client.get(on.url(&proxy, "/again")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!(connections.load(Ordering::SeqCst), now);
}

on_every_transport!(requests_beyond_the_upstream_stream_limit_open_more_connections);

/// On every transport, an upload the upstream answered at once and then stopped reading still
/// holds its stream while the proxy sends on (until the route's timeout): it counts against
/// the upstream's stream limit, so with two such uploads on a connection allowing two
/// streams, the next request goes on a new connection at once rather than waiting there.
async fn uploads_sent_on_after_their_answer_keep_their_streams_counted(on: On) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, seen, connections, _guard, _) = h2_upstream_with(&ca, Some(2)).await;
    let proxy = on
        .proxy(&https_route_with(&tokens, port, &ca, "timeout = \"20s\""))
        .await;
    proxy.ready().await;
    let client = on.client();
    for path in ["/first", "/second"] {
        let r = client.get(on.url(&proxy, path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let before = connections.load(Ordering::SeqCst);
    // Larger than the upstream's windows (hyper's: 1 MiB per stream and connection).
    let upload = pattern(3 * 1024 * 1024);
    let mut uploads = Vec::new();
    for _ in 0..2 {
        // A client each: reqwest's HTTP/1.1 pool may hold the second back for the first's
        // connection.
        let (client, url, body) = (on.client(), on.url(&proxy, "/early"), upload.clone());
        uploads.push(tokio::spawn(async move {
            let r = client.post(url).body(body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }));
    }
    let arrived = async {
        while seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == "/early")
            .count()
            < 2
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), arrived)
        .await
        .is_err()
    {
        let paths: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.path.clone())
            .collect();
        panic!(
            "the upstream saw {paths:?} on {} connections",
            connections.load(Ordering::SeqCst)
        );
    }
    // A client of its own: reqwest's HTTP/1.1 pool would wait for one of the uploads'.
    let next = async {
        let r = on
            .client()
            .get(on.url(&proxy, "/next"))
            .send()
            .await
            .unwrap();
        r.status()
    };
    let next = tokio::time::timeout(Duration::from_secs(8), next).await;
    assert_eq!(
        next.expect("the request waited behind two uploads' streams"),
        200
    );
    assert!(connections.load(Ordering::SeqCst) > before);
    for upload in uploads {
        upload.abort();
    }
}

on_every_transport!(uploads_sent_on_after_their_answer_keep_their_streams_counted);

/// On every transport, when every further connection the upstream accepts is closed right
/// after its TLS handshake, requests beyond the first connection's stream limit queue on it
/// and are answered, rather than being sent on the closing connections and failing (502).
async fn requests_queue_when_further_connections_close_at_once(on: On) {
    burst_beyond_the_one_connection_served(on, false).await;
}

on_every_transport!(requests_queue_when_further_connections_close_at_once);

/// On every transport, when further connections the upstream accepts never send a byte after
/// TLS (no SETTINGS: a load balancer whose backend hangs), requests beyond the first
/// connection's stream limit queue on it once the new connection has been silent for a third
/// of the route's timeout, and are answered, rather than going on the silent one to end at
/// the route's timeout (504).
async fn requests_queue_when_further_connections_stay_silent(on: On) {
    burst_beyond_the_one_connection_served(on, true).await;
}

/// Six requests at once, answered after 200 ms, through an upstream that allows 2 streams per
/// connection and serves only the warm-up's connection and the proxy's first h2 connection
/// (closing or, with `silent`, holding the others): all must be 200 (3 s route timeout).
async fn burst_beyond_the_one_connection_served(on: On, silent: bool) {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (port, _seen, _connections, _guard, _) = h2_upstream_serving(&ca, Some(2), 2, silent).await;
    let proxy = on
        .proxy(&https_route_with(&tokens, port, &ca, "timeout = \"3s\""))
        .await;
    proxy.ready().await;
    let client = on.client();
    for path in ["/first", "/second"] {
        let r = client.get(on.url(&proxy, path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let burst = (0..6).map(|_| {
        let request = client.get(on.url(&proxy, "/pause/200")).send();
        async move { request.await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(burst).await;
    assert_eq!(statuses, vec![200; 6]);
}

on_every_transport!(requests_queue_when_further_connections_stay_silent);
