//! An h2 upstream that ends its connections with GOAWAY (NO_ERROR) every few streams or when
//! idle, as nginx, load balancers and CDNs do routinely: streams it did not process are
//! retried on a new connection, for any method, and no client ever sees a 502 (RFC 9113
//! §6.8, §8.7); new connections are opened one at a time. And an upstream that stops
//! offering h2 is followed to HTTP/1.1 without a failed request.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use support::tls::{https_route, TestCa};
use support::transport::On;
use support::*;
use tokio::net::TcpListener;

/// A TLS listener on loopback for a test upstream, with a certificate from `ca` (ALPN h2 and
/// http/1.1).
async fn tls_listener(
    ca: &TestCa,
) -> (tokio_rustls::TlsAcceptor, TcpListener, std::net::SocketAddr) {
    let (cert, key) = ca.leaf("h2-upstream");
    let config = egain_proxy::tls::server_config(cert.as_ref(), key.as_ref()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (tokio_rustls::TlsAcceptor::from(config), listener, addr)
}

/// An h2 (TLS, ALPN) upstream that, after `every` requests on a connection, or when a
/// connection has been idle for `idle`, shuts that connection down gracefully (GOAWAY with
/// NO_ERROR, then close once in-flight streams are done). Counts requests and connections.
async fn goaway_upstream(
    ca: &TestCa,
    every: usize,
    idle: Duration,
) -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    AbortOnDrop,
) {
    let (acceptor, listener, addr) = tls_listener(ca).await;
    let (requests, connections) = (Arc::<AtomicUsize>::default(), Arc::<AtomicUsize>::default());
    let (r, c) = (Arc::clone(&requests), Arc::clone(&connections));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let requests = Arc::clone(&r);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let served = Arc::new(AtomicUsize::new(0));
                let enough = Arc::new(tokio::sync::Notify::new());
                let (s, e) = (Arc::clone(&served), Arc::clone(&enough));
                let served = &served;
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (s, e, requests) = (Arc::clone(&s), Arc::clone(&e), Arc::clone(&requests));
                    async move {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let declared = req
                            .headers()
                            .get(http::header::CONTENT_LENGTH)
                            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
                        let body = http_body_util::BodyExt::collect(req.into_body()).await;
                        let got = body.map(|b| b.to_bytes().len()).ok();
                        if declared.is_some() && got != declared {
                            let what = format!("{{\"declared\":{declared:?},\"got\":{got:?}}}");
                            return Ok(json_response(400, &what, &[]));
                        }
                        if s.fetch_add(1, Ordering::SeqCst) + 1 == every {
                            e.notify_one();
                        }
                        Ok::<_, Infallible>(json_response(200, "{\"ok\":true}", &[]))
                    }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let connection = builder.serve_connection(TokioIo::new(tls), service);
                tokio::pin!(connection);
                let idle_for_long = async {
                    let mut seen = served.load(Ordering::SeqCst);
                    loop {
                        tokio::time::sleep(idle).await;
                        let now = served.load(Ordering::SeqCst);
                        if now == seen {
                            return;
                        }
                        seen = now;
                    }
                };
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = enough.notified() => {}
                    _ = idle_for_long => {}
                }
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            });
        }
    });
    (addr, requests, connections, AbortOnDrop(task))
}

/// `workers` clients at once, the fast path's and h2c's by turns when `mixed` (else `on`'s),
/// each sending `each` requests that `request` builds from the client, a URL and the
/// request's number; what failed, as "label: status body".
async fn failures_under_load<F>(
    on: &On,
    proxy: &TestProxy,
    workers: usize,
    each: usize,
    mixed: bool,
    request: F,
) -> Vec<String>
where
    F: Fn(&reqwest::Client, String, usize) -> (&'static str, reqwest::RequestBuilder)
        + Send
        + Sync
        + 'static,
{
    let request = Arc::new(request);
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let client = if mixed && worker % 2 == 1 {
            On::new(support::transport::Transport::H2c).client()
        } else {
            on.client()
        };
        let (base, request) = (on.url(proxy, ""), Arc::clone(&request));
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..each {
                let (label, r) = request(&client, format!("{base}/w{worker}/{i}"), i);
                let r = r.send().await.unwrap();
                if r.status() != 200 {
                    failures.push(format!(
                        "{label}: {} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    ));
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap());
    }
    failures
}

/// No request of `total` failed (`failures_under_load`), with the upstream's connection count
/// to tell what happened.
fn assert_none_failed(failures: &[String], total: usize, connections: usize) {
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed ({connections} upstream connections): {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_from_an_h2_upstream_is_never_a_502() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (addr, requests, connections, _guard) =
        goaway_upstream(&ca, 25, Duration::from_secs(60)).await;
    let on = On::new(support::transport::Transport::FastH1);
    let proxy = on.proxy(&https_route(&tokens, addr.port(), &ca)).await;
    proxy.ready().await;
    // Both inbound paths (the fast path's relay and hyper's), several methods, at once.
    let failures = failures_under_load(&on, &proxy, 32, 40, true, |client, url, i| match i % 3 {
        0 => ("GET", client.get(url)),
        1 => ("POST", client.post(url).body("a body")),
        _ => ("PATCH", client.patch(url).body("another")),
    })
    .await;
    let connections = connections.load(Ordering::SeqCst);
    assert_none_failed(&failures, 1280, connections);
    assert!(
        connections >= 10,
        "the upstream ended only {connections} connections"
    );
    // About one connection per 25 requests, plus the first burst before the proxy learns the
    // upstream speaks h2: a GOAWAY must not cost one TLS handshake per waiting request.
    assert!(
        connections <= 150,
        "{connections} upstream connections for 1280 requests ended every 25"
    );
    assert!(requests.load(Ordering::SeqCst) >= 1280);
}

/// Uploads larger than the proxy keeps whole (64 KiB), streamed to an upstream that ends a
/// connection every 10 requests: those it did not process are sent again, whole, from what
/// the proxy kept of them (a red-team run against nginx saw ~12% of 200 KB uploads fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_under_streamed_uploads_is_never_a_502() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (addr, requests, connections, _guard) =
        goaway_upstream(&ca, 10, Duration::from_secs(60)).await;
    let on = On::new(support::transport::Transport::FastH1);
    let proxy = on.proxy(&https_route(&tokens, addr.port(), &ca)).await;
    proxy.ready().await;
    let body = Bytes::from(vec![b'u'; 200_000]);
    let failures = failures_under_load(&on, &proxy, 16, 15, true, move |client, url, _| {
        ("POST", client.post(url).body(body.clone()))
    })
    .await;
    let connections = connections.load(Ordering::SeqCst);
    assert_none_failed(&failures, 240, connections);
    assert!(
        connections >= 10,
        "the upstream ended only {connections} connections"
    );
    assert!(requests.load(Ordering::SeqCst) >= 240);
}

/// An h2 (TLS) upstream that retires each connection after `every` requests as nginx's
/// `keepalive_requests` does, which hyper's and the h2 crate's servers cannot: on the
/// `every`th HEADERS it sends GOAWAY(NO_ERROR) naming that stream as the last it processes,
/// ignores every later stream, answers the ones it took and closes. Raw frames (a test
/// upstream only; its answers use HPACK's static table, so no decoding is needed). Counts
/// requests answered and connections.
async fn retiring_upstream(
    ca: &TestCa,
    every: usize,
) -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    AbortOnDrop,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (acceptor, listener, addr) = tls_listener(ca).await;
    let (answered, connections) = (Arc::<AtomicUsize>::default(), Arc::<AtomicUsize>::default());
    let (a, c) = (Arc::clone(&answered), Arc::clone(&connections));
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let (acceptor, answered) = (acceptor.clone(), Arc::clone(&a));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut preface = [0u8; 24];
                if tls.read_exact(&mut preface).await.is_err() {
                    return;
                }
                let _ = tls.write_all(&frame(4, 0, 0, &[])).await;
                let (mut taken, mut last, mut open) = (0, None::<u32>, 0usize);
                loop {
                    let mut head = [0u8; 9];
                    if tls.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let (kind, flags) = (head[3], head[4]);
                    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    let mut payload = vec![0u8; len];
                    if tls.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let mut out = Vec::new();
                    let ends = flags & 0x1 != 0;
                    match kind {
                        // SETTINGS and PING are acknowledged.
                        4 if flags & 0x1 == 0 => out = frame(4, 0x1, 0, &[]),
                        6 if flags & 0x1 == 0 => out = frame(6, 0x1, 0, &payload),
                        // A new stream: taken while under `every`, the `every`th with GOAWAY.
                        1 if last.map_or(true, |l| id <= l) => {
                            taken += 1;
                            open += 1;
                            if taken == every {
                                last = Some(id);
                                let mut goaway = id.to_be_bytes().to_vec();
                                goaway.extend_from_slice(&0u32.to_be_bytes());
                                out = frame(7, 0, 0, &goaway);
                            }
                            if ends {
                                out.extend(frame(1, 0x4, id, &[0x88]));
                                out.extend(frame(0, 0x1, id, b"{\"ok\":true}"));
                                open -= 1;
                                answered.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        0 if ends && last.map_or(true, |l| id <= l) => {
                            out.extend(frame(1, 0x4, id, &[0x88]));
                            out.extend(frame(0, 0x1, id, b"{\"ok\":true}"));
                            open -= 1;
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                    // The connection window, given back for what came.
                    if kind == 0 && len > 0 {
                        out.extend(frame(8, 0, 0, &(len as u32).to_be_bytes()));
                    }
                    if !out.is_empty() && tls.write_all(&out).await.is_err() {
                        return;
                    }
                    if last.is_some() && open == 0 {
                        let _ = tls.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (addr, answered, connections, AbortOnDrop(task))
}

/// An upstream that ends each connection after 3 requests (nginx's `keepalive_requests 3`)
/// under 16 clients at once: each new connection is sent many streams and processes 3, so a
/// request can be turned away more often than the three tries allow for an upstream that
/// refuses it; a GOAWAY from a connection that answered others does not count against them
/// (a red-team run against nginx saw 13–25% 502s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_retires_connections_every_few_requests_is_never_a_502() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (addr, answered, connections, _guard) = retiring_upstream(&ca, 3).await;
    let on = On::new(support::transport::Transport::H2c);
    let proxy = on.proxy(&https_route(&tokens, addr.port(), &ca)).await;
    proxy.ready().await;
    let failures = failures_under_load(&on, &proxy, 16, 10, false, |client, url, _| {
        ("POST", client.post(url).body("a body"))
    })
    .await;
    let connections = connections.load(Ordering::SeqCst);
    assert_none_failed(&failures, 160, connections);
    assert_eq!(answered.load(Ordering::SeqCst), 160);
    assert!(connections >= 160 / 3, "{connections} upstream connections");
}

/// The same upstream closing connections idle for 30 ms, and clients that pause about that
/// long between requests: requests race the upstream's GOAWAY and close on pooled
/// connections, and none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstream_closing_idle_connections_is_never_a_502() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let idle = Duration::from_millis(30);
    let (addr, _requests, connections, _guard) = goaway_upstream(&ca, usize::MAX, idle).await;
    let on = On::new(support::transport::Transport::FastH1);
    let proxy = on.proxy(&https_route(&tokens, addr.port(), &ca)).await;
    proxy.ready().await;
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let client = on.client();
        let base = on.url(&proxy, "");
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..25u64 {
                // In step, 24-36 ms apart: around the upstream's idle limit.
                tokio::time::sleep(Duration::from_millis(24 + (i * 5) % 13)).await;
                let url = format!("{base}/idle{worker}/{i}");
                let r = client.post(url).body("a body").send().await.unwrap();
                if r.status() != 200 {
                    failures.push(format!(
                        "{} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    ));
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap());
    }
    let connections = connections.load(Ordering::SeqCst);
    assert_none_failed(&failures, 200, connections);
    assert!(
        connections >= 3,
        "the upstream closed only {} idle connections",
        connections - 1
    );
}

/// An upstream that answers in h2 until it is switched to offer only http/1.1 by ALPN (and
/// drains its h2 connections with GOAWAY), as after a load balancer is reconfigured. Records
/// the version of every request it serves.
async fn switching_upstream(
    ca: &TestCa,
) -> (
    std::net::SocketAddr,
    Arc<std::sync::atomic::AtomicBool>,
    Arc<std::sync::Mutex<Vec<http::Version>>>,
    Arc<tokio::sync::Notify>,
    AbortOnDrop,
) {
    let (cert, key) = ca.leaf("switching-upstream");
    let both = egain_proxy::tls::server_config(cert.as_ref(), key.as_ref()).unwrap();
    let mut only_h1 = (*both).clone();
    only_h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let only_h1 = Arc::new(only_h1);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h2 = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let drain = Arc::new(tokio::sync::Notify::new());
    let (flag, versions, drain_all) = (Arc::clone(&h2), Arc::clone(&seen), Arc::clone(&drain));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let config = if flag.load(Ordering::SeqCst) {
                Arc::clone(&both)
            } else {
                Arc::clone(&only_h1)
            };
            let (versions, drain) = (Arc::clone(&versions), Arc::clone(&drain_all));
            tokio::spawn(async move {
                // A client offering only h2 to the h1-only configuration fails here (ALPN).
                let Ok(tls) = tokio_rustls::TlsAcceptor::from(config).accept(stream).await else {
                    return;
                };
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let versions = Arc::clone(&versions);
                    async move {
                        versions.lock().unwrap().push(req.version());
                        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                        Ok::<_, Infallible>(json_response(200, "{\"ok\":true}", &[]))
                    }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let connection = builder.serve_connection(TokioIo::new(tls), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = drain.notified() => {}
                }
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            });
        }
    });
    (addr, h2, seen, drain, AbortOnDrop(task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_offering_h2_is_followed_to_http_1_1() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (addr, h2, seen, drain, _guard) = switching_upstream(&ca).await;
    for transport in [
        support::transport::Transport::FastH1,
        support::transport::Transport::H2c,
    ] {
        h2.store(true, Ordering::SeqCst);
        seen.lock().unwrap().clear();
        let on = On::new(transport);
        let proxy = on.proxy(&https_route(&tokens, addr.port(), &ca)).await;
        proxy.ready().await;
        let client = on.client();
        for i in 0..5 {
            let r = client
                .get(on.url(&proxy, &format!("/before/{i}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{transport:?}");
        }
        assert!(
            seen.lock()
                .unwrap()
                .iter()
                .all(|v| *v == http::Version::HTTP_2),
            "{transport:?}: {:?}",
            seen.lock().unwrap()
        );
        h2.store(false, Ordering::SeqCst);
        drain.notify_waiters();
        seen.lock().unwrap().clear();
        for i in 0..5 {
            let r = client
                .post(on.url(&proxy, &format!("/after/{i}")))
                .body("once")
                .send()
                .await
                .unwrap();
            let status = r.status();
            assert_eq!(status, 200, "{transport:?}: {}", r.text().await.unwrap());
        }
        // Each POST served once. Requests racing the drain may still be served in h2: on the
        // proxy's own h2 connection, and once on the connection hyper's client opened to learn
        // what the upstream speaks (the fallback goes through that client). From then on,
        // HTTP/1.1.
        let versions = seen.lock().unwrap().clone();
        assert_eq!(versions.len(), 5, "{transport:?}: {versions:?}");
        assert_eq!(
            versions[2..],
            [http::Version::HTTP_11; 3],
            "{transport:?}: {versions:?}"
        );
    }
}
