//! HTTP/1.1 on the wire, with raw sockets on both sides of the proxy: response framings,
//! keep-alive and pooling, pipelining, interim responses, upstreams that close pooled
//! connections, malformed upstream answers, and requests handed from the fast path to hyper
//! in the middle of a connection.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::raw::*;
use support::*;
use tokio::io::AsyncReadExt;

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
    // The upstream sent no Date: the proxy adds one (RFC 9110 §6.6.1), once.
    let date = header_value(&head, "date").expect("a Date");
    assert!(httpdate::parse_http_date(&date).is_ok(), "{date}");
    assert_eq!(head.to_ascii_lowercase().matches("\r\ndate:").count(), 1);
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
    // The 103 and 100 did not cost a connection; the HEAD answer did (a connection that
    // answered without a body is not pooled).
    assert_eq!(upstream.connections(), 2);
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
    // The fast path, and hyper's transport (whose codec stays parked on the connection).
    let h2c = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for client in [client(), h2c] {
        for (i, method) in ["GET", "POST", "GET", "DELETE", "POST"].iter().enumerate() {
            // Time for the upstream's FIN to arrive; a POST must not be sent into a dead
            // socket (it could not be retried).
            tokio::time::sleep(Duration::from_millis(50)).await;
            let r = client
                .request(method.parse().unwrap(), proxy.url(&format!("/{i}")))
                .body("x")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "request {i} ({method})");
        }
    }
    assert_eq!(upstream.connections(), 10);
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

/// A reused connection that the upstream closes after reading a request, without a word:
/// an idempotent request is retried once on a new connection, a POST is not (it may have
/// been processed), on both inbound transports and both upstream clients.
#[tokio::test]
async fn idempotent_requests_survive_a_reused_connection_closed_under_them() {
    let tokens = TokenServer::healthy(3600).await;
    let once = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let upstream = RawUpstream::start(move |head| {
        let target = head.split(' ').nth(1).unwrap_or("").to_owned();
        // The first time each /die target arrives, close without answering.
        if target.starts_with("/die") && once.lock().unwrap().insert(target) {
            return (Vec::new(), true);
        }
        reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    })
    .await;
    let proxy = proxy_to(&upstream, &tokens).await;
    for inbound in INBOUND {
        let mut client = Client::on(&proxy, inbound).await;
        // Leaves a pooled connection behind.
        let (_, body) = client.get("/warm").await;
        assert_eq!(body, b"ok");
        for (method, expected) in [("GET", "200"), ("DELETE", "200"), ("POST", "502")] {
            let target = format!("/die-{method}-{inbound:?}");
            client
                .send(&format!(
                    "{method} {target} HTTP/1.1\r\nHost: app\r\nContent-Length: 1\r\n\r\nx"
                ))
                .await;
            let (head, _) = client.response(false).await;
            assert_eq!(
                head.split(' ').nth(1),
                Some(expected),
                "{method} {inbound:?}: {head}"
            );
            // Another request leaves a fresh pooled connection for the next case.
            let (_, body) = client.get("/warm").await;
            assert_eq!(body, b"ok");
        }
    }
}

/// An `https://` upstream that answers in HTTP/1.1 is served by hyper's client once, then by
/// the fast path's own TLS connections: pooled (one connection for many requests), with the
/// client's field names as written (hyper's client would lower-case them), certificate
/// checked. An h2 upstream stays with hyper (tests/goaway.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_http11_upstream_moves_to_the_fast_paths_pooled_tls_connections() {
    let ca = support::tls::TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let upstream = support::raw::RawUpstream::start_tls(&ca, |_| {
        support::raw::reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    })
    .await;
    let proxy = TestProxy::start(&format!(
        "{HEAD}{}{}",
        client_app_profile("p", &tokens, ""),
        route(
            "r",
            "/",
            &upstream.url(),
            "p",
            &format!("ca_file = \"{}\"", ca.ca_file())
        )
    ))
    .await;
    proxy.ready().await;
    let mut client = support::raw::Client::connect(&proxy).await;
    for i in 0..5 {
        client
            .send(&format!(
                "GET /n/{i} HTTP/1.1\r\nHost: app.test\r\nX-Mixed-Case: {i}\r\n\r\n"
            ))
            .await;
        let (head, body) = client.response(false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"ok");
    }
    let raw: Vec<String> = upstream
        .bytes()
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    // hyper's connection carried the first request; one TLS connection of the fast path's
    // own carried the other four.
    assert_eq!(upstream.connections(), 2, "{raw:?}");
    let first = raw.iter().find(|c| c.contains("/n/0")).unwrap();
    assert!(first.contains("x-mixed-case: 0"), "{first}");
    let rest = raw.iter().find(|c| c.contains("/n/1")).unwrap();
    for i in 1..5 {
        assert!(rest.contains(&format!("GET /n/{i} HTTP/1.1")), "{rest}");
        assert!(rest.contains(&format!("X-Mixed-Case: {i}")), "{rest}");
        assert!(
            rest.contains("authorization: Bearer tok-")
                || rest.contains("Authorization: Bearer tok-"),
            "{rest}"
        );
    }
}

/// One pool of upstream connections for every transport: an HTTP/1.1 client on the fast path
/// and an h2c client (hyper's transport) take turns on the same kept-alive connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_and_hyper_transport_share_pooled_upstream_connections() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream =
        RawUpstream::start(|_| reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
    let proxy = proxy_to(&upstream, &tokens).await;
    let mut fast = Client::connect(&proxy).await;
    let h2c = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for i in 0..3 {
        let (_, body) = fast.get(&format!("/fast/{i}")).await;
        assert_eq!(body, b"ok");
        let r = h2c
            .get(proxy.url(&format!("/h2c/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), http::Version::HTTP_2);
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 6);
    assert_eq!(upstream.connections(), 1, "{seen:?}");
    // Both wrote the request the same way: origin form, the upstream as Host, the token.
    for r in &seen {
        assert!(r.target().starts_with('/'), "{}", r.head);
        assert!(r.head.contains(" HTTP/1.1\r\n"), "{}", r.head);
        assert_eq!(
            r.header("host").as_deref(),
            Some(upstream.addr.to_string().as_str()),
            "{}",
            r.head
        );
        assert!(r.head.contains("Bearer "), "{}", r.head);
    }
}

/// The proxy's own error answer to HEAD has no body on the wire (RFC 9110 §9.3.2): the next
/// response on the connection starts right after its head. (reqwest would hide a stray
/// body by dropping the connection; a raw client sees it.)
#[tokio::test]
async fn the_proxys_own_error_to_head_has_no_body_on_the_wire() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = RawUpstream::start(|head| match head.split(' ').nth(1).unwrap_or("") {
        "/drop" => (Vec::new(), true),
        _ => reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    })
    .await;
    let proxy = proxy_to(&upstream, &tokens).await;
    for inbound in INBOUND {
        let mut client = Client::on(&proxy, inbound).await;
        client
            .send("HEAD /drop HTTP/1.1\r\nHost: app\r\n\r\n")
            .await;
        let (head, _) = client.response(true).await;
        assert!(head.starts_with("HTTP/1.1 502 "), "{inbound:?}: {head}");
        let (head, body) = client.get("/after").await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{inbound:?}: {head}");
        assert_eq!(body, b"ok");
    }
}

/// An HTTP/1.0 client cannot be sent chunks: an answer of unknown length reaches it
/// close-delimited, with `Connection: close` (never `keep-alive`, which would leave it waiting
/// for a next answer on a connection that ends). One with a length keeps the connection.
#[tokio::test]
async fn an_http10_client_gets_close_delimited_answers_it_can_read() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = RawUpstream::start(|head| {
        if head.contains("/chunked") {
            reply("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        } else if head.contains("/close") {
            ("HTTP/1.1 200 OK\r\n\r\nuntil the end".into(), true)
        } else {
            reply("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlength")
        }
    })
    .await;
    let proxy = proxy_to(&upstream, &tokens).await;
    let mut client = Client::connect(&proxy).await;
    client
        .send("GET /length HTTP/1.0\r\nHost: app\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let (head, body) = client.response(false).await;
    assert!(
        head.to_ascii_lowercase().contains("connection: keep-alive"),
        "{head}"
    );
    assert_eq!(body, b"length");
    for path in ["/chunked", "/close"] {
        let mut client = Client::connect(&proxy).await;
        client
            .send(&format!(
                "GET {path} HTTP/1.0\r\nHost: app\r\nConnection: keep-alive\r\n\r\n"
            ))
            .await;
        let mut all = Vec::new();
        client.stream.read_to_end(&mut all).await.unwrap();
        let all = String::from_utf8_lossy(&all).to_ascii_lowercase();
        let (head, body) = all.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("connection: close"), "{path}: {head}");
        assert!(
            !head.contains("keep-alive") && !head.contains("chunked"),
            "{path}: {head}"
        );
        assert_eq!(
            body,
            if path == "/close" {
                "until the end"
            } else {
                "hello"
            }
        );
    }
}

/// A request refused before its body is read says `Connection: close`, on both HTTP/1.1
/// transports: the fast path's (a small body), hyper's (chunked, a large body, `Expect`).
#[tokio::test]
async fn a_request_refused_before_its_body_is_read_says_close() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream =
        RawUpstream::start(|_| reply("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")).await;
    let config = format!(
        "{HEAD}{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/api", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    for head in [
        "POST /nothere HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\n".to_owned(),
        "POST /nothere HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
        "POST /nothere HTTP/1.1\r\nHost: app\r\nContent-Length: 100000\r\n\r\n".to_owned(),
        "POST /nothere HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
            .to_owned(),
        "POST /api/../x HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
    ] {
        let mut client = Client::connect(&proxy).await;
        client.send(&head).await;
        let (answer, _) = client.response(false).await;
        let answer = answer.to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 4"), "{head}: {answer}");
        assert!(answer.contains("connection: close"), "{head}: {answer}");
        let started = std::time::Instant::now();
        assert!(client.closed().await, "{head}");
        // One that waits for `100 Continue` has sent no body, and is not drained: not
        // invited to send it, and let go at once (a drain would wait a second for it).
        if head.contains("Expect") {
            let seen = String::from_utf8_lossy(&client.buf).to_ascii_lowercase();
            assert!(!seen.contains("100 continue"), "{seen}");
            assert!(
                started.elapsed() < Duration::from_millis(600),
                "held {:?}",
                started.elapsed()
            );
        }
    }
    assert!(upstream.seen().is_empty());
}
