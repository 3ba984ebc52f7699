//! An h2 upstream that ends its connections with GOAWAY (NO_ERROR) every few streams, as
//! nginx, load balancers and CDNs do routinely: streams it did not process are retried on a
//! new connection, for any method, and no client ever sees a 502 (RFC 9113 §6.8, §8.7).

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use support::tls::TestCa;
use support::transport::On;
use support::*;
use tokio::net::TcpListener;

/// An h2 (TLS, ALPN) upstream that, after `every` requests on a connection, shuts that
/// connection down gracefully (GOAWAY with NO_ERROR, then close once in-flight streams are
/// done). Counts requests and connections.
async fn goaway_upstream(
    ca: &TestCa,
    every: usize,
) -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    AbortOnDrop,
) {
    let (cert, key) = ca.leaf("h2-upstream");
    let config = egain_proxy::tls::server_config(cert.as_ref(), key.as_ref()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
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
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (s, e, requests) = (Arc::clone(&s), Arc::clone(&e), Arc::clone(&requests));
                    async move {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                        if s.fetch_add(1, Ordering::SeqCst) + 1 == every {
                            e.notify_one();
                        }
                        Ok::<_, Infallible>(json_response(200, "{\"ok\":true}", &[]))
                    }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let connection = builder.serve_connection(TokioIo::new(tls), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = enough.notified() => {}
                }
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            });
        }
    });
    (addr, requests, connections, AbortOnDrop(task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_from_an_h2_upstream_is_never_a_502() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let (addr, requests, connections, _guard) = goaway_upstream(&ca, 25).await;
    let on = On::new(support::transport::Transport::FastH1);
    let proxy = on
        .proxy(&format!(
            "{}{}",
            client_app_profile("p", &tokens, ""),
            route(
                "h2",
                "/",
                &format!("https://127.0.0.1:{}", addr.port()),
                "p",
                &format!("ca_file = \"{}\"", ca.ca_file())
            ),
        ))
        .await;
    proxy.ready().await;
    // Both inbound paths (the fast path's relay and hyper's), several methods, at once.
    let mut tasks = Vec::new();
    for worker in 0..32 {
        let client = if worker % 2 == 0 {
            on.client()
        } else {
            On::new(support::transport::Transport::H2c).client()
        };
        let base = on.url(&proxy, "");
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..40 {
                let url = format!("{base}/w{worker}/{i}");
                let (method, request) = match i % 3 {
                    0 => ("GET", client.get(url)),
                    1 => ("POST", client.post(url).body("a body")),
                    _ => ("PATCH", client.patch(url).body("another")),
                };
                let r = request.send().await.unwrap();
                if r.status() != 200 {
                    failures.push(format!(
                        "{method}: {} {}",
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
    assert!(
        failures.is_empty(),
        "{} of 1280 requests failed ({connections} upstream connections): {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(
        connections >= 10,
        "the upstream ended only {connections} connections"
    );
    assert!(requests.load(Ordering::SeqCst) >= 1280);
}
