//! Forwarding: token flows on the wire, header and path rewriting, streaming, concurrency.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use egain_proxy::mock::{MockEgain, MockOptions};
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use sha2::{Digest, Sha256};
use support::transport::On;
use support::*;

#[tokio::test]
async fn client_app_token_request_is_exactly_egains() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{HEAD}{}{}",
        client_app_profile(
            "portal",
            &tokens,
            "scopes = [\"knowledge.portalmgr.manage\", \"core.aiservices.read\"]"
        )
        .replace("scopes = [\"knowledge.portalmgr.manage\"]\n", ""),
        route("r", "/", &upstream.url(), "portal", "")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    let requests = tokens.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/oauth2/token");
    assert_eq!(r.query, None);
    assert_eq!(
        r.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert!(r.headers.get("authorization").is_none());
    let form = r.form();
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(
        form["scope"],
        "knowledge.portalmgr.manage core.aiservices.read"
    );
    assert_eq!(form["client_id"], "id-portal");
    assert_eq!(form["client_secret"], "secret-portal");
    assert_eq!(form.len(), 4);
}

#[tokio::test]
async fn anonymous_customer_token_request_is_exactly_egains() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{HEAD}[profiles.anon]\nkind = \"anonymous_customer\"\ntenant = \"TMPRODB88619984\"\ntoken_url = \"{}\"\nclient_id = \"anon-id\"\nclient_secret = \"anon-secret\"\nscopes = [\"core.aiservices.read\", \"core.aiservices.manage\"]\n{}",
        tokens.url("/core/authmgr/v3/oauth2/v2.0/anonymous/token"),
        route("r", "/", &upstream.url(), "anon", "")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    let r = &tokens.requests()[0];
    assert_eq!(r.path, "/core/authmgr/v3/oauth2/v2.0/anonymous/token");
    assert_eq!(
        r.query.as_deref(),
        Some("user_type=customer&domain_hint=TMPRODB88619984")
    );
    assert_eq!(
        r.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    let form = r.form();
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], "anon-id");
    assert_eq!(form["client_secret"], "anon-secret");
    assert_eq!(
        form["scope"],
        "https://api.ai.egain.cloud/auth/core.aiservices.read https://api.ai.egain.cloud/auth/core.aiservices.manage"
    );
}

async fn upstream_sees_the_proxy_token_never_the_clients(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let proxy = on.proxy_for(&tokens, &upstream, "", "").await;
    let response = on
        .client()
        .get(on.url(&proxy, "/x"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = upstream.last();
    let auth: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(auth.len(), 1);
    assert!(tokens.is_live(seen.header("authorization")), "{auth:?}");
}

async fn paths_queries_and_prefixes_join_byte_for_byte(on: On) {
    let head = on.head();
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let base = format!("{}/base/v4/", upstream.url());
    let config = format!(
        "{head}{}{}{}{}",
        client_app_profile("p", &tokens, ""),
        route("strip", "/api/", &base, "p", "strip_prefix = true"),
        route("keep", "/keep", &base, "p", ""),
        route("root", "/", &upstream.url(), "p", ""),
    );
    let proxy = TestProxy::start(&config).await;
    let cases = [
        (
            "/api/portals/1?b=2&a=1&a=%20x+y&empty=&",
            "/base/v4/portals/1?b=2&a=1&a=%20x+y&empty=&",
        ),
        ("/api", "/base/v4"),
        ("/api/", "/base/v4/"),
        (
            "/keep/x%2Fy/%E2%82%AC?q=%zz",
            "/base/v4/keep/x%2Fy/%E2%82%AC?q=%zz",
        ),
        ("/apix?", "/apix?"),
        ("/a//b;p=1", "/a//b;p=1"),
    ];
    for (sent, expected) in cases {
        let r = on.client().get(on.url(&proxy, sent)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{sent}");
        assert_eq!(upstream.last().target, expected, "{sent}");
    }
}

async fn hop_by_hop_and_forwarding_headers(on: On) {
    let head = on.head();
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::with(|_| {
        json_response(
            200,
            "{}",
            &[
                ("connection", "x-up-hop".into()),
                ("x-up-hop", "1".into()),
                ("keep-alive", "timeout=5".into()),
                ("x-up-keep", "1".into()),
            ],
        )
    })
    .await;
    let config = format!(
        "{head}{}{}",
        client_app_profile("p", &tokens, ""),
        route(
            "r",
            "/",
            &upstream.url(),
            "p",
            "set_headers = { \"Accept-Language\" = \"en-US\" }\nremove_headers = [\"Cookie\"]"
        )
    );
    let proxy = TestProxy::start(&config).await;
    // An h2 request names its host in `:authority`; a `Host` naming another is malformed
    // (RFC 9113 §8.3.1, tests/security.rs).
    let client_host = match on.version() {
        http::Version::HTTP_2 => proxy.addr.to_string(),
        _ => "app.internal:8080".to_owned(),
    };
    let response = on
        .client()
        .get(on.url(&proxy, "/h"))
        .header("connection", "x-client-hop")
        .header("x-client-hop", "1")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic x")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-request-id", "req-123")
        .header("cookie", "session=1")
        .header("accept-language", "fr")
        .header("host", &client_host)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-up-hop").is_none());
    assert!(response.headers().get("keep-alive").is_none());
    assert_eq!(response.headers()["x-up-keep"], "1");
    let seen = upstream.last();
    for gone in [
        "x-client-hop",
        "te",
        "proxy-authorization",
        "cookie",
        "expect",
    ] {
        assert!(seen.headers.get(gone).is_none(), "{gone} was forwarded");
    }
    assert_eq!(
        seen.header("host"),
        Some(upstream.addr.to_string().as_str())
    );
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some(on.proto()));
    assert_eq!(seen.header("x-forwarded-host"), Some(client_host.as_str()));
    assert_eq!(seen.header("x-request-id"), Some("req-123"));
    assert_eq!(seen.header("accept-language"), Some("en-US"));

    // Without a client id, one is generated and passed on.
    on.client().get(on.url(&proxy, "/h")).send().await.unwrap();
    assert_eq!(
        upstream.last().header("x-request-id").map(str::len),
        Some(32)
    );
}

/// h2 clients send one `Cookie` field per cookie; an HTTP/1.1 upstream gets them as one,
/// joined with "; " in order (RFC 9113 §8.2.3). HTTP/1.1 requests pass as they came.
async fn cookie_fields_reach_the_upstream_as_http11_wants_them(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let proxy = on.proxy_for(&tokens, &upstream, "", "").await;
    let r = on
        .client()
        .get(on.url(&proxy, "/c"))
        .header("cookie", "a=1")
        .header("cookie", "b=2; c=3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.last();
    let cookies: Vec<_> = seen.headers.get_all("cookie").iter().collect();
    match on.version() {
        http::Version::HTTP_2 => assert_eq!(cookies, ["a=1; b=2; c=3"]),
        _ => assert_eq!(cookies, ["a=1", "b=2; c=3"]),
    }
}

/// Fields that make frameworks serve another path (`X-Original-URL`, `X-Rewrite-URL`) never
/// reach the upstream; method overrides do not on a route that restricts `methods` (a
/// GET-only route would otherwise take a DELETE in disguise), and do on others.
async fn path_and_method_overrides_cannot_get_past_a_route(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let proxy = on
        .proxy(&format!(
            "{}{}{}",
            client_app_profile("p", &tokens, ""),
            route("read", "/read", &upstream.url(), "p", "methods = [\"GET\"]"),
            route("any", "/any", &upstream.url(), "p", ""),
        ))
        .await;
    let overrides = [
        ("x-original-url", "/admin"),
        ("x_original_url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-http-method-override", "DELETE"),
        ("x_http_method_override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
    ];
    for (path, methods_pass) in [("/read/x", false), ("/any/x", true)] {
        let mut request = on.client().get(on.url(&proxy, path));
        for (name, value) in overrides {
            request = request.header(name, value);
        }
        assert_eq!(request.send().await.unwrap().status(), 200);
        let seen = upstream.last();
        for (name, _) in overrides {
            let passes = methods_pass && name.contains("method");
            assert_eq!(seen.headers.contains_key(name), passes, "{path} {name}");
        }
    }
}

async fn unmatched_request_gets_no_route_json(on: On) {
    let head = on.head();
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{head}{}{}",
        client_app_profile("p", &tokens, ""),
        route(
            "r",
            "/knowledge",
            &upstream.url(),
            "p",
            "methods = [\"GET\"]"
        )
    );
    let proxy = TestProxy::start(&config).await;
    for (method, path) in [
        ("GET", "/knowledgebase"),
        ("GET", "/other"),
        ("POST", "/knowledge/x"),
    ] {
        let r = on
            .client()
            .request(method.parse().unwrap(), on.url(&proxy, path))
            .header("x-request-id", "rid-1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["content-type"], "application/json");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "no_route");
        assert_eq!(body["request_id"], "rid-1");
        assert!(body["message"].as_str().unwrap().contains(path));
    }
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn cold_start_concurrency_makes_one_token_request_per_profile() {
    // A slow token endpoint keeps every request waiting on the same fetch.
    let tokens = TokenServer::start(|_| Reply::Slow(Duration::from_millis(300))).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{HEAD}{}{}{}{}",
        client_app_profile("a", &tokens, ""),
        client_app_profile("b", &tokens, ""),
        route("ra", "/a", &upstream.url(), "a", ""),
        route("rb", "/b", &upstream.url(), "b", ""),
    );
    let proxy = TestProxy::start(&config).await;
    let client = client();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let url = proxy.url(if i % 2 == 0 { "/a/x" } else { "/b/x" });
        let client = client.clone();
        tasks.push(tokio::spawn(async move { status(client.get(url)).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let ids: Vec<String> = tokens
        .requests()
        .iter()
        .map(|r| r.form()["client_id"].clone())
        .collect();
    assert_eq!(ids.iter().filter(|i| *i == "id-a").count(), 1, "{ids:?}");
    assert_eq!(ids.iter().filter(|i| *i == "id-b").count(), 1, "{ids:?}");
    assert_eq!(upstream.seen().len(), 200);
}

const BIG: u64 = 200 * 1024 * 1024;
const CHUNK: usize = 1024 * 1024;

fn chunk(i: u64) -> Bytes {
    Bytes::from(vec![(i % 251) as u8; CHUNK])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_streams_through_intact() {
    let tokens = TokenServer::healthy(3600).await;
    let received = Arc::new(AtomicU64::new(0));
    let r2 = Arc::clone(&received);
    let (addr, _guard) = serve(move |req: http::Request<hyper::body::Incoming>| {
        let received = Arc::clone(&r2);
        async move {
            let mut body = req.into_body();
            let mut hash = Sha256::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    hash.update(&data);
                    received.fetch_add(data.len() as u64, Ordering::SeqCst);
                }
            }
            json_response(200, &format!("{:x}", hash.finalize()), &[])
        }
    })
    .await;
    let config = format!(
        "{HEAD}{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &format!("http://{addr}"), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;

    // The client sends the first MiB, then waits until the upstream has it before sending the
    // rest: a proxy that buffered the body would never let this finish.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let mut expected = Sha256::new();
    for i in 0..(BIG / CHUNK as u64) {
        expected.update(chunk(i));
    }
    let sender = {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            tx.send(Ok(chunk(0))).await.unwrap();
            eventually(Duration::from_secs(10), || {
                received.load(Ordering::SeqCst) >= CHUNK as u64
            })
            .await;
            for i in 1..(BIG / CHUNK as u64) {
                tx.send(Ok(chunk(i))).await.unwrap();
            }
        })
    };
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let response = client()
        .put(proxy.url("/upload"))
        .header("content-length", BIG.to_string())
        .body(body)
        .send()
        .await
        .unwrap();
    sender.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        format!("{:x}", expected.finalize())
    );
    assert_eq!(received.load(Ordering::SeqCst), BIG);
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_through_intact() {
    let tokens = TokenServer::healthy(3600).await;
    let client_got = Arc::new(AtomicU64::new(0));
    let got = Arc::clone(&client_got);
    let (addr, _guard) = serve(move |_req: http::Request<hyper::body::Incoming>| {
        let got = Arc::clone(&got);
        async move {
            // The upstream sends the first MiB, then waits until the client has it.
            let stream = futures_util::stream::unfold(0u64, move |i| {
                let got = Arc::clone(&got);
                async move {
                    if i == BIG / CHUNK as u64 {
                        return None;
                    }
                    if i == 1 {
                        eventually(Duration::from_secs(10), || {
                            got.load(Ordering::SeqCst) >= CHUNK as u64
                        })
                        .await;
                    }
                    Some((
                        Ok::<_, egain_proxy::BoxError>(http_body::Frame::data(chunk(i))),
                        i + 1,
                    ))
                }
            });
            let mut r = http::Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert("content-length", BIG.into());
            r
        }
    })
    .await;
    let config = format!(
        "{HEAD}{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &format!("http://{addr}"), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    let response = client().get(proxy.url("/download")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut hash = Sha256::new();
    while let Some(data) = stream.next().await {
        let data = data.unwrap();
        hash.update(&data);
        client_got.fetch_add(data.len() as u64, Ordering::SeqCst);
    }
    let mut expected = Sha256::new();
    for i in 0..(BIG / CHUNK as u64) {
        expected.update(chunk(i));
    }
    assert_eq!(client_got.load(Ordering::SeqCst), BIG);
    assert_eq!(hash.finalize(), expected.finalize());
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let tokens = TokenServer::healthy(3600).await;
    let (release_tx, release_rx) = tokio::sync::watch::channel(0u32);
    let (addr, _guard) = serve(move |_req: http::Request<hyper::body::Incoming>| {
        let release = release_rx.clone();
        async move {
            // Event n is sent only after the client confirmed event n-1.
            let stream =
                futures_util::stream::unfold((0u32, release), |(n, mut release)| async move {
                    if n == 3 {
                        return None;
                    }
                    while *release.borrow() < n {
                        if release.changed().await.is_err() {
                            return None;
                        }
                    }
                    let frame = http_body::Frame::data(Bytes::from(format!("data: event {n}\n\n")));
                    Some((Ok::<_, egain_proxy::BoxError>(frame), (n + 1, release)))
                });
            let mut r = http::Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
    })
    .await;
    let config = format!(
        "{HEAD}{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &format!("http://{addr}"), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    let response = client().get(proxy.url("/events")).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    for n in 0..3u32 {
        while !text.contains(&format!("data: event {n}\n\n")) {
            let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .unwrap_or_else(|_| panic!("event {n} did not arrive on its own"))
                .unwrap()
                .unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        release_tx.send(n + 1).unwrap();
    }
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let proxy = proxy_for(&tokens, &upstream, "", "").await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2
        .get(proxy.url("/h2?x=1"))
        .header("authorization", "Bearer client")
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.target, "/h2?x=1");
    assert!(tokens.is_live(seen.header("authorization")));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some(proxy.addr.to_string().as_str())
    );
}

async fn upstream_failures_map_to_502_and_504(on: On) {
    let head = on.head();
    let tokens = TokenServer::healthy(3600).await;
    // A port with nothing listening.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let ok = Upstream::start().await;
    let (hang_addr, _g) = serve(|_req: http::Request<hyper::body::Incoming>| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        json_response(200, "{}", &[])
    })
    .await;
    let config = format!(
        "{head}{}{}{}{}",
        client_app_profile("p", &tokens, ""),
        route("dead", "/dead", &format!("http://{dead}"), "p", ""),
        route(
            "hang",
            "/hang",
            &format!("http://{hang_addr}"),
            "p",
            "timeout = \"300ms\""
        ),
        route("ok", "/ok", &ok.url(), "p", ""),
    );
    let proxy = TestProxy::start(&config).await;
    let r = on
        .client()
        .get(on.url(&proxy, "/dead"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unreachable");
    // The same words on every transport: the OS's, after "cannot connect".
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("the upstream of route \"dead\" could not be reached: cannot connect: Connection refused"),
        "{message}"
    );
    let r = on
        .client()
        .get(on.url(&proxy, "/hang"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "upstream_timeout");
    let metrics = proxy.shared.metrics.encode();
    for (route, kind, n) in [
        ("dead", "connect", 1),
        ("dead", "timeout", 0),
        ("dead", "protocol", 0),
        ("hang", "timeout", 1),
        ("hang", "connect", 0),
    ] {
        let line =
            format!("egain_proxy_upstream_errors_total{{route=\"{route}\",kind=\"{kind}\"}} {n}");
        assert!(metrics.lines().any(|l| l == line), "{line}\n{metrics}");
    }
    // And the proxy keeps serving.
    assert_eq!(status(on.client().get(on.url(&proxy, "/ok"))).await, 200);
}

#[tokio::test]
async fn embedded_mock_egain_works_end_to_end_with_both_flows() {
    let mock = MockEgain::start(([127, 0, 0, 1], 0).into(), MockOptions::default())
        .await
        .unwrap();
    let text = egain_proxy::demo::config_text(&mock, 0);
    let proxy = TestProxy::start(&text).await;
    let portals: serde_json::Value = client()
        .get(proxy.url("/knowledge/portalmgr/v4/portals"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(portals["portal"][0]["id"], "PROD-1000");
    let anon: serde_json::Value = client()
        .get(proxy.url("/customer/x?q=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(anon["token_kind"], "anonymous_customer");
    assert_eq!(anon["path"], "/x");
    // Straight to the mock without a token: eGain's error body.
    let r = client()
        .get(format!(
            "{}/knowledge/portalmgr/v4/portals",
            mock.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "401-101");
    assert_eq!(mock.token_requests(), 2);
}

#[tokio::test]
async fn every_listen_address_serves() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\", \"127.0.0.2:0\"]\n{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &upstream.url(), "p", "")
    );
    let config = egain_proxy::Config::parse(&config, std::path::Path::new("."), &|_| None).unwrap();
    let proxy = egain_proxy::Proxy::bind(config, None).await.unwrap();
    let addrs = proxy.local_addrs();
    assert_eq!(addrs.len(), 2);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(proxy.run(async move {
        let _ = rx.await;
    }));
    for addr in &addrs {
        let r = client()
            .get(format!("http://{addr}/multi"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{addr}");
    }
    assert_eq!(upstream.seen().len(), 2);
    let _ = tx.send(());
    task.await.unwrap();
}

/// Upstream connections are pooled the same way whatever carried the request: a body read to
/// its end by its length, its chunked framing, or an empty one leaves the connection for the
/// next request; an answer that must have no body (204, HEAD) and one the upstream closes
/// (`Connection: close`) do not. Asserted on what the upstream saw: which connection each
/// request came on.
async fn upstream_connections_are_pooled_and_retired_alike(on: On) {
    use support::raw::{reply, RawUpstream};
    let tokens = TokenServer::healthy(3600).await;
    let upstream = RawUpstream::start(|head| {
        if head.starts_with("HEAD ") {
            return reply("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
        }
        match head.split(' ').nth(1).unwrap_or("") {
            "/chunked" => reply(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            ),
            "/empty" => reply("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            "/no-content" => reply("HTTP/1.1 204 No Content\r\n\r\n"),
            // Longer than one read: the connection still goes back to the pool.
            "/large" => (
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: 40000\r\n\r\n{}",
                    "l".repeat(40_000)
                )
                .into_bytes(),
                false,
            ),
            "/closing" => (
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                true,
            ),
            _ => reply("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlength"),
        }
    })
    .await;
    let proxy = on.proxy_to(&tokens, &upstream.url()).await;
    proxy.ready().await;
    let client = on.client();
    let steps = [
        ("GET", "/length", "length"),
        ("GET", "/chunked", "hello"),
        ("POST", "/empty", ""),
        ("GET", "/length", "length"),
        ("GET", "/large", "large"),
        ("GET", "/length", "length"),
        ("GET", "/no-content", ""),
        ("GET", "/length", "length"),
        ("HEAD", "/head", ""),
        ("GET", "/closing", "ok"),
        ("GET", "/length", "length"),
        ("GET", "/length", "length"),
    ];
    for (method, path, body) in steps {
        let r = client
            .request(method.parse().unwrap(), on.url(&proxy, path))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{method} {path}: {}", r.status());
        let text = r.text().await.unwrap();
        if body == "large" {
            assert_eq!(text, "l".repeat(40_000), "{method} {path}");
        } else {
            assert_eq!(text, body, "{method} {path}");
        }
    }
    let seen: Vec<(String, usize)> = upstream
        .seen()
        .iter()
        .map(|r| (r.target().to_owned(), r.connection))
        .collect();
    let connections: Vec<usize> = seen.iter().map(|(_, c)| *c).collect();
    assert_eq!(
        connections,
        vec![1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4, 4],
        "{:?}: {seen:?}",
        on.transport
    );
}

/// An upstream that stops sending in the middle of a body: once it has sent nothing for the
/// route's `timeout`, the exchange ends — the client's transfer ends as broken (an HTTP/1.1
/// client's connection closes, an h2 client's stream is reset) and the upstream connection
/// is closed — rather than holding both for good. The proxy goes on serving.
async fn a_stalled_response_body_ends_at_the_route_timeout(on: On) {
    struct Dropped(Arc<AtomicU64>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let tokens = TokenServer::healthy(3600).await;
    let dropped = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&dropped);
    let (addr, _g) = serve(move |req: http::Request<hyper::body::Incoming>| {
        let counter = Arc::clone(&counter);
        async move {
            if req.uri().path() == "/fine" {
                return json_response(200, "{}", &[]);
            }
            // Part of the body, then nothing; the guard goes when the body is dropped (the
            // proxy closed the connection).
            let guard = Dropped(counter);
            let first = futures_util::stream::once(async {
                Ok::<_, egain_proxy::BoxError>(http_body::Frame::data(Bytes::from_static(
                    b"partial",
                )))
            });
            let stalled = first
                .chain(futures_util::stream::pending())
                .map(move |frame| {
                    let _ = &guard;
                    frame
                });
            http::Response::new(BodyExt::boxed(StreamBody::new(stalled)))
        }
    })
    .await;
    let proxy = on
        .proxy(&format!(
            "{}{}",
            client_app_profile("portal", &tokens, ""),
            route(
                "r",
                "/",
                &format!("http://{addr}"),
                "portal",
                "timeout = \"700ms\""
            )
        ))
        .await;
    proxy.ready().await;
    let client = on.client();
    let url = on.url(&proxy, "/stall");
    expect_stalled_bodies_cut(&client, &url, Duration::from_millis(700), || {
        dropped.load(Ordering::SeqCst) as usize
    })
    .await;
    let r = client.get(on.url(&proxy, "/fine")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// A large upload to an upstream that streams a large answer at once (as an echo or a
/// transcoding service does), from a client that reads the answer only once its upload is
/// done: the upload goes on whether or not the answer is being read, on every transport.
/// (Were the upstream connection driven only by reads of the answer, the proxy would wait
/// on the client and the client on the proxy.)
async fn an_upload_goes_on_while_the_answer_waits_to_be_read(on: On) {
    const CHUNK: usize = 64 * 1024;
    const UP: usize = 16 << 20;
    const DOWN: usize = 32 << 20;
    let tokens = TokenServer::healthy(3600).await;
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let (addr, _g) = serve(move |req: http::Request<hyper::body::Incoming>| {
        let counter = Arc::clone(&counter);
        async move {
            tokio::spawn(async move {
                let mut body = req.into_body();
                while let Some(Ok(frame)) = body.frame().await {
                    if let Ok(data) = frame.into_data() {
                        counter.fetch_add(data.len() as u64, Ordering::SeqCst);
                    }
                }
            });
            let chunk = Bytes::from(vec![7u8; CHUNK]);
            let answer = futures_util::stream::iter(0..DOWN / CHUNK).map(move |_| {
                Ok::<_, egain_proxy::BoxError>(http_body::Frame::data(chunk.clone()))
            });
            http::Response::new(BodyExt::boxed(StreamBody::new(answer)))
        }
    })
    .await;
    let proxy = on
        .proxy(&format!(
            "{}{}",
            client_app_profile("portal", &tokens, ""),
            route("r", "/", &format!("http://{addr}"), "portal", "")
        ))
        .await;
    proxy.ready().await;
    let upload = futures_util::stream::iter(0..UP / CHUNK)
        .map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![1u8; CHUNK])));
    let r = on
        .client()
        .post(on.url(&proxy, "/echo"))
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eventually(Duration::from_secs(20), || {
        received.load(Ordering::SeqCst) == UP as u64
    })
    .await;
    assert_eq!(r.bytes().await.unwrap().len(), DOWN);
}

/// The proxy's own error answers to HEAD have no body (RFC 9110 §9.3.2), and the client's
/// connection goes on serving: a body there would be read by an HTTP/1.1 client as the start
/// of the next response, and break an h2 client's stream.
async fn the_proxys_own_errors_to_head_have_no_body(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = on
        .proxy(&format!(
            "{}{}{}",
            client_app_profile("portal", &tokens, ""),
            route("dead", "/dead", &format!("http://{dead}"), "portal", ""),
            route("ok", "/ok", &upstream.url(), "portal", "")
        ))
        .await;
    proxy.ready().await;
    let client = on.client();
    for _ in 0..2 {
        for (path, status) in [("/nowhere", 404), ("/dead", 502)] {
            let r = client.head(on.url(&proxy, path)).send().await.unwrap();
            assert_eq!(r.status(), status, "{path}");
            assert_eq!(r.version(), on.version());
            assert_eq!(r.bytes().await.unwrap().len(), 0, "{path}");
        }
        let r = client.get(on.url(&proxy, "/ok")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}

on_every_transport!(
    path_and_method_overrides_cannot_get_past_a_route,
    cookie_fields_reach_the_upstream_as_http11_wants_them,
    the_proxys_own_errors_to_head_have_no_body,
    an_upload_goes_on_while_the_answer_waits_to_be_read,
    a_stalled_response_body_ends_at_the_route_timeout,
    upstream_connections_are_pooled_and_retired_alike,
    upstream_sees_the_proxy_token_never_the_clients,
    paths_queries_and_prefixes_join_byte_for_byte,
    hop_by_hop_and_forwarding_headers,
    unmatched_request_gets_no_route_json,
    upstream_failures_map_to_502_and_504,
);

/// Sends `len` bytes on an h2 request stream as its windows allow, then ends it. Whether
/// all of it went (the stream was not reset on the way).
async fn send_h2_body(mut stream: h2::SendStream<Bytes>, len: usize) -> bool {
    let mut left = len;
    while left > 0 {
        stream.reserve_capacity(left.min(64 * 1024));
        let granted = match futures_util::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            _ => return false,
        };
        let n = granted.min(left);
        if stream.send_data(Bytes::from(vec![b'x'; n]), false).is_err() {
            return false;
        }
        left -= n;
    }
    stream.send_data(Bytes::new(), true).is_ok()
}

/// An h2 upload the proxy answers before reading it (here: its upstream cannot be reached)
/// is read to its end after the answer, so the client finishes its upload and keeps the
/// answer (curl and httpx drop an answer whose stream is reset, though RFC 9113 §8.1 allows
/// the reset); one larger than the proxy drains (8 MiB) still gets its answer, then a reset.
async fn an_h2_upload_answered_before_it_is_read_is_read_to_its_end(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = TestProxy::start(&format!(
        "{}{}{}",
        on.head(),
        client_app_profile("p", &tokens, ""),
        route("dead", "/dead", &format!("http://{dead}"), "p", ""),
    ))
    .await;
    proxy.ready().await;
    let conn = on.connect(&proxy).await;
    let support::transport::Conn::H2 { send, .. } = &conn else {
        unreachable!()
    };
    // Refused once routed (its upstream cannot be reached), and before (no route).
    for (path, status, len, read_whole) in [
        ("/dead/upload", 502, 2 << 20, true),
        ("/elsewhere", 404, 2 << 20, true),
        ("/dead/upload", 502, 9 << 20, false),
    ] {
        let mut send = send.clone().ready().await.unwrap();
        let post = http::Request::post(format!("http://app{path}"))
            .body(())
            .unwrap();
        let (response, body) = send.send_request(post, false).unwrap();
        let upload = tokio::spawn(send_h2_body(body, len));
        let response = response.await.unwrap();
        assert_eq!(response.status(), status);
        let mut answer = response.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = answer.data().await {
            text.extend_from_slice(&chunk.unwrap());
        }
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("\"error\""), "{text}");
        let finished = tokio::time::timeout(Duration::from_secs(10), upload)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(finished, read_whole, "a {len}-byte upload to {path}");
    }
}

/// HTTP/1.1 uploads refused before their body was read (here: no route), on the fast path
/// (60 KB) and on hyper's (300 KB): the rest of the body is read and thrown away before the
/// connection closes, so a client still sending reads the answer and a clean end, where
/// closing on unread bytes makes the kernel reset the connection (nginx's lingering close),
/// and bytes that come after the close are answered with a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h1_upload_refused_before_it_is_read_ends_cleanly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let on = On::new(support::transport::Transport::FastH1);
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let proxy = TestProxy::start(&format!(
        "{}{}{}",
        on.head(),
        client_app_profile("p", &tokens, ""),
        route("api", "/api", &upstream.url(), "p", ""),
    ))
    .await;
    for len in [60_000usize, 300_000] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!("POST /elsewhere HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&vec![b'x'; 1000]).await.unwrap();
        // The answer comes before the rest of the body is sent.
        let mut answer = Vec::new();
        while !answer.ends_with(b"}\n") {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{len}: no answer"))
                .unwrap();
            assert!(n > 0, "{len}: closed before the answer");
            answer.extend_from_slice(&buf[..n]);
        }
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        let sent = s.write_all(&vec![b'x'; len - 1000]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A reset is what the client's kernel noted (Linux still hands over what came
        // before it; other systems drop it).
        let reset = s.take_error().unwrap();
        let mut rest = Vec::new();
        let end = s.read_to_end(&mut rest).await;
        assert!(
            sent.is_ok() && reset.is_none() && end.is_ok() && rest.is_empty(),
            "{len} bytes: the rest of the body {sent:?}, reset {reset:?}, then {end:?} ({} more bytes)",
            rest.len()
        );
    }
    assert!(upstream.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upload_answered_before_it_is_read_is_read_to_its_end() {
    let on = On::new(support::transport::Transport::H2c);
    an_h2_upload_answered_before_it_is_read_is_read_to_its_end(on).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_h2_upload_answered_before_it_is_read_is_read_to_its_end() {
    let on = On::new(support::transport::Transport::TlsH2);
    an_h2_upload_answered_before_it_is_read_is_read_to_its_end(on).await;
}

/// h2 flow control: an upload the proxy is not taking yet (its token is on the way) holds
/// its stream's window, never the connection's: another upload on the same connection goes
/// through whole while the first still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_h2_upload_does_not_hold_back_the_others() {
    let slow = TokenServer::start(|_| Reply::Slow(Duration::from_secs(4))).await;
    let fast = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let on = On::new(support::transport::Transport::H2c);
    // Without the fix the second upload stalls: 408 after body_read_timeout.
    let proxy = TestProxy::start(&format!(
        "{}{}{}{}{}",
        on.head_with("body_read_timeout = \"2s\"\n"),
        client_app_profile("slow", &slow, ""),
        client_app_profile("fast", &fast, ""),
        route("waits", "/waits", &upstream.url(), "slow", ""),
        route("goes", "/goes", &upstream.url(), "fast", ""),
    ))
    .await;
    eventually(Duration::from_secs(5), || {
        fast.count() == 1 && slow.count() == 1
    })
    .await;
    let conn = on.connect(&proxy).await;
    let support::transport::Conn::H2 { send, .. } = &conn else {
        unreachable!()
    };
    let post = |path: &str| {
        http::Request::post(format!("http://app{path}"))
            .body(())
            .unwrap()
    };
    let mut send = send.clone().ready().await.unwrap();
    // 4 MiB: more than any window the proxy gives one stream.
    let (waiting, body) = send.send_request(post("/waits/a"), false).unwrap();
    let _waiting_body = tokio::spawn(send_h2_body(body, 4 << 20));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut send = send.ready().await.unwrap();
    let (goes, body) = send.send_request(post("/goes/b"), false).unwrap();
    tokio::spawn(send_h2_body(body, 300_000));
    let goes = goes.await.unwrap();
    assert_eq!(goes.status(), 200);
    let seen = upstream.last();
    assert_eq!(
        (seen.target.as_str(), seen.body.len()),
        ("/goes/b", 300_000)
    );
    // The first was still waiting for its token all along.
    assert_eq!(slow.count(), 1);
    assert!(upstream.seen().iter().all(|s| s.target != "/waits/a"));
    drop(waiting);
}
