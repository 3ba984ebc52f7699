//! Request smuggling and response splitting (RFC 9112 §6.3, §11.2), tried as an attacker
//! would: raw bytes from the client, raw bytes from the upstream, on both inbound HTTP/1.1
//! transports (fast path, hyper) and both kinds of upstream (plain, through the fast path's
//! pool; TLS, through hyper's client). What the upstream received is parsed with httparse,
//! never with the proxy's own code.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::raw::*;
use support::tls::TestCa;
use support::*;

type Reply = Arc<dyn Fn(&str) -> (Vec<u8>, bool) + Send + Sync>;

/// A raw upstream of each kind, answering with `reply`, and the route lines it needs.
async fn upstreams(ca: &TestCa, reply: Reply) -> Vec<(&'static str, RawUpstream, String)> {
    let (r1, r2) = (Arc::clone(&reply), reply);
    let plain = RawUpstream::start(move |h| r1(h)).await;
    let tls = RawUpstream::start_tls(ca, move |h| r2(h)).await;
    let ca_line = format!("ca_file = \"{}\"", ca.ca_file());
    vec![("plain", plain, String::new()), ("tls", tls, ca_line)]
}

async fn proxy_for_raw(
    tokens: &TokenServer,
    upstream: &RawUpstream,
    route_extra: &str,
) -> TestProxy {
    let config = format!(
        "{HEAD}{}{}",
        client_app_profile("p", tokens, ""),
        route("r", "/", &upstream.url(), "p", route_extra)
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    proxy
}

/// Answers every request with its own target, so a client can tell whose answer it got.
fn echo_target() -> Reply {
    Arc::new(|head: &str| {
        let target = head.split(' ').nth(1).unwrap_or("").to_owned();
        let body = format!("you asked for {target}");
        reply(&format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    })
}

/// A request as the upstream read it: target, fields (names lower-cased), decoded body.
type Parsed = (String, Vec<(String, String)>, Vec<u8>);

/// Every request in `bytes` (one upstream connection), parsed with httparse and framed as
/// RFC 9112 §6.3 says: (head fields lower-cased, target, body). Panics on bytes that are not
/// a sequence of complete requests.
fn parse_requests(mut bytes: &[u8]) -> Vec<Parsed> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut fields);
        let n = match request.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!(
                "upstream read a broken request ({other:?}): {:?}",
                String::from_utf8_lossy(bytes)
            ),
        };
        let target = request.path.unwrap_or("").to_owned();
        let fields: Vec<(String, String)> = request
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let get = |name: &str| {
            fields
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        let te = get("transfer-encoding");
        let cl = get("content-length");
        assert!(
            te.is_empty() || cl.is_empty(),
            "both framings sent upstream: {fields:?}"
        );
        assert!(cl.len() <= 1, "Content-Length sent twice: {fields:?}");
        bytes = &bytes[n..];
        let body = if !te.is_empty() {
            assert_eq!(te, vec!["chunked".to_owned()], "{fields:?}");
            let mut body = Vec::new();
            loop {
                let line = bytes
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .expect("chunk size line");
                let size_text = String::from_utf8_lossy(&bytes[..line]).into_owned();
                let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                    .expect("chunk size");
                bytes = &bytes[line + 2..];
                if size == 0 {
                    let end = bytes
                        .windows(2)
                        .position(|w| w == b"\r\n")
                        .expect("trailers");
                    assert_eq!(end, 0, "no trailers expected");
                    bytes = &bytes[2..];
                    break body;
                }
                body.extend_from_slice(&bytes[..size]);
                assert_eq!(&bytes[size..size + 2], b"\r\n");
                bytes = &bytes[size + 2..];
            }
        } else if let Some(n) = cl.first() {
            let n: usize = n.trim().parse().expect("a decimal Content-Length");
            let body = bytes[..n].to_vec();
            bytes = &bytes[n..];
            body
        } else {
            Vec::new()
        };
        out.push((target, fields, body));
    }
    out
}

/// Every request the upstream read, over all its connections.
fn all_requests(upstream: &RawUpstream) -> Vec<Parsed> {
    upstream
        .bytes()
        .iter()
        .flat_map(|b| parse_requests(b))
        .filter(|(target, _, _)| target != HANDOVER_TARGET)
        .collect()
}

#[tokio::test]
async fn connection_cannot_unframe_a_request_body() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    for (kind, upstream, extra) in upstreams(&ca, echo_target()).await {
        let proxy = proxy_for_raw(&tokens, &upstream, &extra).await;
        for inbound in INBOUND {
            let case = format!("{kind} upstream, {inbound:?} inbound");
            let smuggled = "GET /admin/SMUGGLED-escape HTTP/1.1\r\nX-Ignore: ";
            let mut a = Client::on(&proxy, inbound).await;
            a.send(&format!(
                "POST /knowledge/cc2 HTTP/1.1\r\nHost: app.test\r\nConnection: Content-Length\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ))
            .await;
            let (head, body) = a.response(false).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{case}: {head}");
            assert_eq!(
                String::from_utf8_lossy(&body),
                "you asked for /knowledge/cc2",
                "{case}"
            );

            let mut b = Client::on(&proxy, inbound).await;
            let (_, body) = b.get("/knowledge/victim").await;
            assert_eq!(
                String::from_utf8_lossy(&body),
                "you asked for /knowledge/victim",
                "{case}"
            );
        }
        let requests = all_requests(&upstream);
        // Over all the upstream's connections (their order is the pools' business).
        let mut targets: Vec<&str> = requests.iter().map(|(t, _, _)| t.as_str()).collect();
        targets.sort_unstable();
        assert_eq!(
            targets,
            vec![
                "/knowledge/cc2",
                "/knowledge/cc2",
                "/knowledge/victim",
                "/knowledge/victim"
            ],
            "{kind}"
        );
        for (target, fields, body) in &requests {
            if target == "/knowledge/cc2" {
                assert_eq!(
                    String::from_utf8_lossy(body),
                    "GET /admin/SMUGGLED-escape HTTP/1.1\r\nX-Ignore: "
                );
                assert!(
                    fields.contains(&("content-length".into(), "47".into())),
                    "{fields:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn connection_cannot_remove_what_the_proxy_manages() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    for (kind, upstream, extra) in upstreams(&ca, echo_target()).await {
        let proxy = proxy_for_raw(&tokens, &upstream, &extra).await;
        for inbound in INBOUND {
            let mut client = Client::on(&proxy, inbound).await;
            client
                .send("POST /m HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, Content-Length, Host, Authorization, X-Forwarded-For, X-Forwarded-Host, X-Request-Id, Transfer-Encoding, X-Hop\r\nAuthorization: Basic c2VjcmV0\r\nX-Forwarded-For: 10.1.1.1\r\nX-Request-Id: rid-1\r\nX-Hop: gone\r\nX-Kept: 1\r\nContent-Length: 4\r\n\r\nbody")
                .await;
            let (head, _) = client.response(false).await;
            assert!(
                head.starts_with("HTTP/1.1 200"),
                "{kind} {inbound:?}: {head}"
            );
        }
        let requests = all_requests(&upstream);
        assert_eq!(requests.len(), 2, "{kind}");
        for (_, fields, body) in &requests {
            let get = |name: &str| {
                fields
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str())
                    .collect::<Vec<_>>()
            };
            let case = format!("{kind}: {fields:?}");
            assert_eq!(body, b"body", "{case}");
            assert_eq!(get("host"), vec![upstream.addr.to_string()], "{case}");
            assert_eq!(get("authorization").len(), 1, "{case}");
            assert!(get("authorization")[0].starts_with("Bearer tok-"), "{case}");
            assert_eq!(
                get("x-forwarded-for"),
                vec!["10.1.1.1, 127.0.0.1"],
                "{case}"
            );
            assert_eq!(get("x-forwarded-host"), vec!["app"], "{case}");
            assert_eq!(get("x-request-id"), vec!["rid-1"], "{case}");
            assert_eq!(get("x-kept"), vec!["1"], "{case}");
            assert!(get("x-hop").is_empty(), "{case}");
            assert!(
                get("connection")
                    .iter()
                    .all(|v| !v.to_ascii_lowercase().contains("content-length")),
                "{case}"
            );
        }
        // Both transports gave the upstream the same head, but for the order of fields.
        let sorted = |i: usize| {
            let mut f = requests[i].1.clone();
            f.sort();
            f
        };
        assert_eq!(sorted(0), sorted(1), "{kind}");
    }
}

#[tokio::test]
async fn host_fields_are_checked_on_every_transport() {
    let tokens = TokenServer::healthy(3600).await;
    let echo = echo_target();
    let upstream = RawUpstream::start(move |h| echo(h)).await;
    let proxy = proxy_for_raw(&tokens, &upstream, "").await;
    for inbound in INBOUND {
        for (request, status) in [
            ("GET /no-host HTTP/1.1\r\n\r\n", "400"),
            (
                "GET /two-hosts HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                "400",
            ),
            ("GET /bad-host HTTP/1.1\r\nHost: a b\r\n\r\n", "400"),
            ("GET /bad-host HTTP/1.1\r\nHost: a/b\r\n\r\n", "400"),
            ("GET /bad-port HTTP/1.1\r\nHost: a:x\r\n\r\n", "400"),
            ("GET /http10 HTTP/1.0\r\n\r\n", "200"),
            ("GET /fine HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", "200"),
        ] {
            let mut client = Client::on(&proxy, inbound).await;
            client.send(request).await;
            let (head, body) = client.response(false).await;
            assert_eq!(
                head.split(' ').nth(1),
                Some(status),
                "{inbound:?} {request:?}: {head}"
            );
            if status == "400" {
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(json["error"], "bad_request");
            }
        }
    }
    let targets: Vec<String> = upstream
        .seen()
        .iter()
        .map(|r| r.target().to_owned())
        .collect();
    assert_eq!(targets, vec!["/http10", "/fine", "/http10", "/fine"]);
}

#[tokio::test]
async fn ambiguous_request_framing_reaches_the_upstream_as_one_request() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    for (kind, upstream, extra) in upstreams(&ca, echo_target()).await {
        let proxy = proxy_for_raw(&tokens, &upstream, &extra).await;
        for inbound in INBOUND {
            let case = format!("{kind} upstream, {inbound:?} inbound");
            // TE and CL: chunked wins (RFC 9112 §6.3), the connection closes after.
            let mut client = Client::on(&proxy, inbound).await;
            client
                .send("POST /te-cl HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
                .await;
            let (head, _) = client.response(false).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{case}: {head}");
            assert!(
                client.closed().await,
                "{case}: TE with CL keeps the connection open"
            );

            // Repeated equal lengths are one length (RFC 9110 §8.6); differing ones are 400.
            let mut client = Client::on(&proxy, inbound).await;
            client
                .send("POST /cl-cl HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello")
                .await;
            let (head, _) = client.response(false).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{case}: {head}");
            for bad in [
                "POST /cl-differ HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                "POST /cl-list HTTP/1.1\r\nHost: app\r\nContent-Length: 5, 6\r\n\r\nhello!",
                "POST /te-gzip HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip\r\n\r\nhello",
            ] {
                let mut client = Client::on(&proxy, inbound).await;
                client.send(bad).await;
                let (head, _) = client.response(false).await;
                assert!(head.starts_with("HTTP/1.1 400"), "{case} {bad:?}: {head}");
            }
        }
        let requests = all_requests(&upstream);
        let seen: Vec<(&str, &[u8])> = requests
            .iter()
            .map(|(t, _, b)| (t.as_str(), b.as_slice()))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("/te-cl", &b"hello"[..]),
                ("/cl-cl", b"hello"),
                ("/te-cl", b"hello"),
                ("/cl-cl", b"hello")
            ],
            "{kind}"
        );
    }
}

/// Upstream answers whose framing is ambiguous or invalid, each with a smuggled second
/// response where one fits.
fn bad_answer(target: &str) -> Option<&'static str> {
    const SMUGGLED: &str = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED";
    Some(match target {
        "/te-cl" => "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n2f\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED\r\n0\r\n\r\n",
        "/cl-te" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        "/cl-cl" => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        "/cl-list" => "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        "/cl-204" => "HTTP/1.1 204 No Content\r\nContent-Length: 51\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED",
        "/101" => "HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\nConnection: upgrade\r\n\r\n",
        "/te-gzip-chunked" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "/te-gzip" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        "/chunk-garbage" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
        "/chunk-overflow" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nok\r\n0\r\n\r\n",
        _ => {
            let _ = SMUGGLED;
            return None;
        }
    })
}

const BAD_SHAPES: [&str; 10] = [
    "/te-cl",
    "/cl-te",
    "/cl-cl",
    "/cl-list",
    "/cl-204",
    "/101",
    "/te-gzip-chunked",
    "/te-gzip",
    "/chunk-garbage",
    "/chunk-overflow",
];

#[tokio::test]
async fn ambiguous_responses_are_502_and_their_connection_is_never_reused() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let script: Reply = Arc::new(|head: &str| {
        let target = head.split(' ').nth(1).unwrap_or("");
        match bad_answer(target) {
            Some(answer) => reply(answer),
            None if target == "/conn-cl" => reply(
                "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
            ),
            None => reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        }
    });
    for (kind, upstream, extra) in upstreams(&ca, script).await {
        let proxy = proxy_for_raw(&tokens, &upstream, &extra).await;
        for inbound in INBOUND {
            let mut client = Client::on(&proxy, inbound).await;
            for shape in BAD_SHAPES {
                let case = format!("{kind} upstream, {inbound:?} inbound, {shape}");
                client
                    .send(&format!("GET {shape} HTTP/1.1\r\nHost: app\r\n\r\n"))
                    .await;
                let Some((head, body)) = client.try_response(false).await else {
                    // A body that breaks after hyper took the head (hyper's client, or hyper's
                    // server writing to the client) can only close the connection: no answer
                    // at all, never a wrong one.
                    let streamed = kind == "tls" || inbound == Inbound::Hyper;
                    assert!(
                        shape.starts_with("/chunk-") && streamed,
                        "{case}: no answer"
                    );
                    assert!(
                        client.buf.is_empty(),
                        "{case}: {:?}",
                        String::from_utf8_lossy(&client.buf)
                    );
                    client = Client::on(&proxy, inbound).await;
                    continue;
                };
                assert!(head.starts_with("HTTP/1.1 502"), "{case}: {head}");
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(json["error"], "upstream_unreachable", "{case}");
                assert!(
                    json["message"]
                        .as_str()
                        .unwrap()
                        .contains("invalid response"),
                    "{case}: {json}"
                );
                // The same client connection goes on, with nothing smuggled into it.
                let (head, body) = client.get("/fine").await;
                assert!(head.starts_with("HTTP/1.1 200"), "{case}: {head}");
                assert_eq!(body, b"ok", "{case}");
            }
            // `Connection: content-length` from the upstream cannot unframe the answer.
            client
                .send("GET /conn-cl HTTP/1.1\r\nHost: app\r\n\r\n")
                .await;
            let (head, body) = client.response(false).await;
            assert_eq!(
                header_value(&head, "content-length").as_deref(),
                Some("5"),
                "{head}"
            );
            assert_eq!(body, b"hello");
            let (_, body) = client.get("/fine").await;
            assert_eq!(body, b"ok");
        }
        // No request was ever sent on a connection after it carried a bad answer.
        let seen = upstream.seen();
        for (i, r) in seen.iter().enumerate() {
            if BAD_SHAPES.contains(&r.target()) {
                assert!(
                    seen[i + 1..]
                        .iter()
                        .all(|later| later.connection != r.connection),
                    "{kind}: connection {} reused after {}",
                    r.connection,
                    r.target()
                );
            }
        }
        let counted = proxy
            .shared
            .metrics
            .encode()
            .lines()
            .find(|l| l.starts_with("egain_proxy_upstream_errors_total") && l.contains("protocol"))
            .map(|l| {
                l.rsplit(' ')
                    .next()
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0)
            })
            .unwrap_or(0.0);
        // Every bad answer counted once (a body that broke after hyper took its head is
        // counted by the client's end, not here).
        assert!(
            counted as usize >= 2 * (BAD_SHAPES.len() - 2),
            "{kind}: {counted}"
        );
    }
}

/// Upstream answers that a lenient client would split into two responses, or that leave
/// bytes on a connection for the next client: none of it reaches a client as a response.
#[tokio::test]
async fn nothing_an_upstream_sends_becomes_another_response() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    const INJECTED: &str =
        "HTTP/1.1 302 Found\r\nLocation: http://evil.example/\r\nContent-Length: 0\r\n\r\n";
    let script: Reply = Arc::new(|head: &str| {
        let target = head.split(' ').nth(1).unwrap_or("");
        let answer = match target {
            // A bare LF ends the trailer section for a lenient client, not for a strict one.
            "/bare-lf-trailer" => format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\n{INJECTED}"),
            "/bare-lf-trailer-line" => format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nx-t: 1\n{INJECTED}"),
            "/ctl-in-extension" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;a=\x01\r\nhi\r\n0\r\n\r\n".into(),
            "/status-999" => "HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n".into(),
            // Bodiless answers followed, a little later, by bytes that look like a response.
            "/late-after-head" | "/late-after-204" => {
                let status = if target == "/late-after-head" { "200 OK" } else { "204 No Content" };
                format!("HTTP/1.1 {status}\r\nContent-Length: 8\r\n\r\n{PAUSE}HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED")
            }
            _ => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".into(),
        };
        (answer.into_bytes(), false)
    });
    for (kind, upstream, extra) in upstreams(&ca, script).await {
        let proxy = proxy_for_raw(&tokens, &upstream, &extra).await;
        for inbound in INBOUND {
            for (method, target) in [
                ("GET", "/bare-lf-trailer"),
                ("GET", "/bare-lf-trailer-line"),
                ("GET", "/ctl-in-extension"),
                ("GET", "/status-999"),
                ("HEAD", "/late-after-head"),
                ("GET", "/late-after-204"),
            ] {
                let case = format!("{kind} upstream, {inbound:?} inbound, {method} {target}");
                let mut a = Client::on(&proxy, inbound).await;
                a.send(&format!("{method} {target} HTTP/1.1\r\nHost: app\r\n\r\n"))
                    .await;
                let mut b = Client::on(&proxy, inbound).await;
                if target.starts_with("/late") {
                    // A's answer is complete; at once, while the upstream is still to send its
                    // stray bytes, another client's request: on a pooled connection it would
                    // get them.
                    let (head, _) = a.response(method == "HEAD").await;
                    assert!(!head.contains("INJECTED"), "{case}: {head}");
                }
                b.send("GET /next HTTP/1.1\r\nHost: app\r\n\r\n").await;
                // Every byte A gets, unparsed: a lenient client must not find a second
                // response in it.
                let mut raw = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(Ok(n)) = tokio::time::timeout(
                    std::time::Duration::from_millis(400),
                    tokio::io::AsyncReadExt::read(&mut a.stream, &mut chunk),
                )
                .await
                {
                    if n == 0 {
                        break;
                    }
                    raw.extend_from_slice(&chunk[..n]);
                }
                let text = String::from_utf8_lossy(&raw).into_owned();
                assert!(
                    !text.contains("302 Found") && !text.contains("INJECTED"),
                    "{case}: {text:?}"
                );
                if !text.is_empty() {
                    let status = text.split(' ').nth(1).unwrap_or("");
                    assert!(["200", "204", "502"].contains(&status), "{case}: {text:?}");
                }
                let (head, body) = b.response(false).await;
                assert!(head.starts_with("HTTP/1.1 200"), "{case}: {head}");
                assert_eq!(
                    body, b"ok",
                    "{case}: another client got someone else's bytes"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_body_that_breaks_after_its_head_went_out_closes_the_client_connection() {
    let ca = TestCa::new();
    let tokens = TokenServer::healthy(3600).await;
    let script: Reply = Arc::new(|head: &str| {
        if head.contains(" /break ") {
            let answer = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n{PAUSE}zz\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED");
            return (answer.into_bytes(), false);
        }
        reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    });
    for (kind, upstream, extra) in upstreams(&ca, script).await {
        let proxy = proxy_for_raw(&tokens, &upstream, &extra).await;
        for inbound in INBOUND {
            let case = format!("{kind} upstream, {inbound:?} inbound");
            let mut client = Client::on(&proxy, inbound).await;
            client
                .send("GET /break HTTP/1.1\r\nHost: app\r\n\r\n")
                .await;
            // A head and a body cut short, then the connection closes; never a second
            // response.
            let answer = client.try_response(false).await;
            assert!(answer.is_none(), "{case}: {answer:?}");
            assert!(client.closed().await, "{case}");
            assert!(
                !String::from_utf8_lossy(&client.buf).contains("SMUGGLED"),
                "{case}: {:?}",
                String::from_utf8_lossy(&client.buf)
            );
        }
        let seen = upstream.seen();
        for (i, r) in seen.iter().enumerate() {
            if r.target() == "/break" {
                assert!(
                    seen[i + 1..]
                        .iter()
                        .all(|later| later.connection != r.connection),
                    "{kind}"
                );
            }
        }
    }
}

#[tokio::test]
async fn access_is_decided_on_the_head_and_stalled_bodies_time_out() {
    let tokens = TokenServer::healthy(3600).await;
    let echo = echo_target();
    let upstream = RawUpstream::start(move |h| echo(h)).await;
    let key = "k-0123456789abcdef0123";
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 4\nbody_read_timeout = \"300ms\"\n[server.access]\napi_keys = [\"{key}\"]\n{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    let keyed = format!("x-proxy-key: {key}\r\n");
    for inbound in INBOUND {
        // Unkeyed clients that never finish their bodies are answered at once and cut off
        // once the rest of their body (read and thrown away) stalls for body_read_timeout,
        // so they do not hold a connection slot.
        let mut stalled = Vec::new();
        for _ in 0..3 {
            let mut client = Client::connect(&proxy).await;
            client
                .send("POST /x HTTP/1.1\r\nHost: app\r\nContent-Length: 1000\r\n\r\npartial")
                .await;
            let (head, _) = client.response(false).await;
            assert!(head.starts_with("HTTP/1.1 401"), "{inbound:?}: {head}");
            assert!(
                client.closed().await,
                "{inbound:?}: an unkeyed stalled body kept its connection"
            );
            stalled.push(client);
        }
        let mut client = Client::on_with(&proxy, inbound, &keyed).await;
        client
            .send(&format!(
                "POST /ok HTTP/1.1\r\nHost: app\r\n{keyed}Content-Length: 2\r\n\r\nhi"
            ))
            .await;
        let (head, _) = client.response(false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{inbound:?}: {head}");

        // A keyed client that stalls its body gets 408 once body_read_timeout passes.
        let started = std::time::Instant::now();
        client
            .send(&format!(
                "POST /slow HTTP/1.1\r\nHost: app\r\n{keyed}Content-Length: 100\r\n\r\nonly part"
            ))
            .await;
        let (head, body) = client.response(false).await;
        assert!(head.starts_with("HTTP/1.1 408"), "{inbound:?}: {head}");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"], "request_timeout");
        assert!(started.elapsed() < Duration::from_secs(5), "{inbound:?}");
        assert!(client.closed().await, "{inbound:?}");
    }
    let targets: Vec<String> = upstream
        .seen()
        .iter()
        .map(|r| r.target().to_owned())
        .collect();
    assert_eq!(targets, vec!["/ok", "/ok"]);
}

#[test]
fn routes_cannot_set_or_remove_framing_or_managed_fields() {
    let profile = "[profiles.p]\nkind = \"client_app\"\ntoken_url = \"http://127.0.0.1:1/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n";
    for (line, at) in [
        (
            "remove_headers = [\"Content-Length\"]",
            "routes[0].remove_headers[0]",
        ),
        (
            "remove_headers = [\"cookie\", \"transfer-encoding\"]",
            "routes[0].remove_headers[1]",
        ),
        ("remove_headers = [\"Host\"]", "routes[0].remove_headers[0]"),
        (
            "remove_headers = [\"x-forwarded-for\"]",
            "routes[0].remove_headers[0]",
        ),
        (
            "remove_headers = [\"connection\"]",
            "routes[0].remove_headers[0]",
        ),
        (
            "set_headers = { \"Content-Length\" = \"0\" }",
            "routes[0].set_headers.Content-Length",
        ),
        (
            "set_headers = { \"x-request-id\" = \"fixed\" }",
            "routes[0].set_headers.x-request-id",
        ),
        (
            "set_headers = { \"X-Forwarded-Proto\" = \"https\" }",
            "routes[0].set_headers.X-Forwarded-Proto",
        ),
        (
            "set_headers = { \"Authorization\" = \"Bearer x\" }",
            "routes[0].set_headers.Authorization",
        ),
    ] {
        let text = format!("{profile}[[routes]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\nprofile = \"p\"\n{line}\n");
        let e =
            egain_proxy::Config::parse(&text, std::path::Path::new("."), &|_| None).unwrap_err();
        assert_eq!(e.location, at, "{line}");
        assert!(e.message.contains("managed by the proxy"), "{line}: {e}");
    }
}

/// One generated request: fields the client sends, how it frames its body, and where.
#[derive(Debug, Clone)]
struct Case {
    method: &'static str,
    connection: Vec<&'static str>,
    framing: u8,
    body: Vec<u8>,
    extra: Vec<&'static str>,
    route: usize,
    tls: bool,
    inbound: Inbound,
}

impl Case {
    /// The raw request, and the body it frames per RFC 9112 §6.3 (`None`: a 400 is due).
    fn target(&self, n: usize) -> String {
        let prefix = if self.tls { "t" } else { "p" };
        format!("/{prefix}{}/case-{n}", self.route)
    }

    fn encode(&self, n: usize) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut raw = format!(
            "{} {} HTTP/1.1\r\nHost: app\r\n",
            self.method,
            self.target(n)
        )
        .into_bytes();
        if !self.connection.is_empty() {
            raw.extend_from_slice(
                format!("Connection: {}\r\n", self.connection.join(", ")).as_bytes(),
            );
        }
        for field in &self.extra {
            raw.extend_from_slice(field.as_bytes());
            raw.extend_from_slice(b"\r\n");
        }
        let n = self.body.len();
        let mut chunked = Vec::new();
        if n > 0 {
            chunked.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            chunked.extend_from_slice(&self.body);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let (fields, payload, expected): (String, Vec<u8>, Option<Vec<u8>>) = match self.framing {
            0 => (String::new(), Vec::new(), Some(Vec::new())),
            1 => (
                format!("Content-Length: {n}\r\n"),
                self.body.clone(),
                Some(self.body.clone()),
            ),
            2 => (
                format!("Content-Length: {n}\r\nContent-Length: {n}\r\n"),
                self.body.clone(),
                Some(self.body.clone()),
            ),
            // A list-valued length is refused (RFC 9110 §8.6 lets a recipient reject it).
            3 => (
                format!("Content-Length: {n}, {n}\r\n"),
                self.body.clone(),
                None,
            ),
            4 => (
                format!("Content-Length: {n}\r\nContent-Length: {}\r\n", n + 1),
                self.body.clone(),
                None,
            ),
            5 => (
                "Transfer-Encoding: chunked\r\n".into(),
                chunked,
                Some(self.body.clone()),
            ),
            6 => (
                format!("Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n"),
                chunked,
                Some(self.body.clone()),
            ),
            _ => (
                format!(
                    "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
                    n + 3
                ),
                chunked,
                Some(self.body.clone()),
            ),
        };
        raw.extend_from_slice(fields.as_bytes());
        raw.extend_from_slice(b"\r\n");
        raw.extend_from_slice(&payload);
        (raw, expected)
    }
}

fn case_strategy() -> impl proptest::strategy::Strategy<Value = Case> {
    use proptest::prelude::*;
    let names = proptest::sample::subsequence(
        vec![
            "content-length",
            "Transfer-Encoding",
            "host",
            "authorization",
            "x-forwarded-for",
            "x-request-id",
            "x-a",
            "x-b",
            "cookie",
            "keep-alive",
            "close",
        ],
        0..5,
    );
    let extra = proptest::sample::subsequence(
        vec![
            "X-A: a",
            "X-B: b",
            "Cookie: c=1",
            "X-Forwarded-For: 10.9.9.9",
            "Authorization: Basic eA==",
        ],
        0..5,
    );
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        Just(b"GET /admin/SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        Just(b"0\r\n\r\nGET /admin/SMUGGLED HTTP/1.1\r\nX: ".to_vec()),
    ];
    (
        prop_oneof![Just("GET"), Just("POST"), Just("PUT")],
        names,
        0u8..8,
        body,
        extra,
        0usize..4,
        any::<bool>(),
        prop_oneof![Just(Inbound::Fast), Just(Inbound::Hyper)],
    )
        .prop_map(
            |(method, connection, framing, body, extra, route, tls, inbound)| Case {
                method,
                connection,
                framing,
                body,
                extra,
                route,
                tls,
                inbound,
            },
        )
}

/// Whatever a client puts in `Connection`, however it frames (or double-frames) its body
/// and whichever route's set/remove lists apply, the upstream reads exactly one well-formed
/// request carrying exactly the body the client framed, or nothing and the client gets 400.
#[test]
fn any_request_head_reaches_the_upstream_as_exactly_the_request_the_client_framed() {
    use proptest::test_runner::{Config as RunnerConfig, TestRunner};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new();
    let (tokens, plain, tls, proxy) = rt.block_on(async {
        let tokens = TokenServer::healthy(3600).await;
        let ok = || reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        let plain = RawUpstream::start(move |_| ok()).await;
        let tls = RawUpstream::start_tls(&ca, move |_| ok()).await;
        let lists = [
            "",
            "remove_headers = [\"x-a\"]",
            "set_headers = { x-b = \"route\" }\nremove_headers = [\"cookie\"]",
            "remove_headers = [\"x-a\", \"x-b\", \"keep-alive-ish\"]",
        ];
        let mut routes = route("h", HANDOVER_TARGET, &plain.url(), "p", "");
        for (i, list) in lists.iter().enumerate() {
            routes += &route(&format!("p{i}"), &format!("/p{i}"), &plain.url(), "p", list);
            let ca_line = format!("{list}\nca_file = \"{}\"", ca.ca_file());
            routes += &route(
                &format!("t{i}"),
                &format!("/t{i}"),
                &tls.url(),
                "p",
                &ca_line,
            );
        }
        let proxy = TestProxy::start(&format!(
            "{HEAD}{}{routes}",
            client_app_profile("p", &tokens, "")
        ))
        .await;
        proxy.ready().await;
        (tokens, plain, tls, proxy)
    });
    let answered = std::cell::Cell::new(0usize);
    let rejected = std::cell::Cell::new(0usize);
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 96,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(&case_strategy(), |case| {
        rt.block_on(async {
            let n = answered.get() + 1000 * rejected.get();
            let (raw, expected) = case.encode(n);
            let mut client = Client::on(&proxy, case.inbound).await;
            client.send_bytes(&raw).await;
            let (head, _) = client
                .try_response(case.method == "HEAD")
                .await
                .unwrap_or_else(|| panic!("no answer to {case:?}"));
            let status = head.split(' ').nth(1).unwrap_or("").to_owned();
            match &expected {
                Some(_) => assert_eq!(status, "200", "{case:?}: {head}"),
                None => assert_eq!(status, "400", "{case:?}: {head}"),
            }
            match expected {
                Some(_) => answered.set(answered.get() + 1),
                None => rejected.set(rejected.get() + 1),
            }
            // Both upstreams' bytes, parsed independently: exactly the requests answered, the
            // last one this case's, with the body the client framed.
            let mut requests = all_requests(&plain);
            requests.extend(all_requests(&tls));
            assert_eq!(requests.len(), answered.get(), "{case:?}: {requests:?}");
            if let Some(body) = expected {
                let upstream = if case.tls { &tls } else { &plain };
                let mine: Vec<_> = all_requests(upstream)
                    .into_iter()
                    .filter(|r| r.0 == case.target(n))
                    .collect();
                assert_eq!(mine.len(), 1, "{case:?}: {requests:?}");
                let last = &mine[0];
                assert_eq!(last.2, body, "{case:?}");
                let count = |name: &str| last.1.iter().filter(|(n, _)| n == name).count();
                assert_eq!(count("authorization"), 1, "{case:?}");
                assert_eq!(count("host"), 1, "{case:?}");
                assert_eq!(
                    count("x-b"),
                    usize::from(
                        case.route == 2
                            || case.extra.contains(&"X-B: b")
                                && case.route != 3
                                && !case.connection.contains(&"x-b")
                    ),
                    "{case:?}: {:?}",
                    last.1
                );
            }
        });
        Ok(())
    });
    drop(tokens);
    if let Err(e) = result {
        panic!("{e}");
    }
}
