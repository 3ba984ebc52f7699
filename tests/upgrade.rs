//! Upgrades (contract §11): WebSocket through the proxy, against a real WebSocket server
//! (tokio-tungstenite) and a real WebSocket client, over both inbound HTTP/1.1 transports
//! (plain, where the fast path hands the connection over, and TLS) and both upstream kinds
//! (ws:// and wss:// with a private CA). h2 has no Upgrade (RFC 9113 §8.2.2).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::tls::TestCa;
use support::transport::{On, Transport};
use support::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// What the WebSocket server saw of each handshake.
type Handshakes = Arc<Mutex<Vec<http::HeaderMap>>>;

/// A WebSocket echo server; `refuse` answers the handshake with that status instead.
/// With `tls`, it speaks wss:// with a certificate from that CA.
async fn ws_server(
    tls: Option<&TestCa>,
    refuse: Option<u16>,
) -> (std::net::SocketAddr, Handshakes, AbortOnDrop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Handshakes = Arc::default();
    let acceptor = tls.map(|ca| {
        let (cert, key) = ca.leaf("ws-upstream");
        tokio_rustls::TlsAcceptor::from(
            egain_proxy::tls::server_config(cert.as_ref(), key.as_ref()).unwrap(),
        )
    });
    let record = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (record, acceptor) = (Arc::clone(&record), acceptor.clone());
            tokio::spawn(async move {
                match acceptor {
                    Some(a) => {
                        if let Ok(tls) = a.accept(stream).await {
                            echo(tls, record, refuse).await
                        }
                    }
                    None => echo(stream, record, refuse).await,
                }
            });
        }
    });
    (addr, seen, AbortOnDrop(task))
}

// tungstenite's callback type is fixed.
#[allow(clippy::result_large_err)]
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    record: Handshakes,
    refuse: Option<u16>,
) {
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        record.lock().unwrap().push(req.headers().clone());
        match refuse {
            Some(status) => {
                let mut r = ErrorResponse::new(Some(r#"{"code":"403-197"}"#.to_owned()));
                *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                Err(r)
            }
            None => Ok(resp),
        }
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        if message.is_close() {
            break;
        }
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            break;
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection to the proxy over `on`'s HTTP/1.1 transport (TLS offering only http/1.1).
async fn connect(on: &On, proxy: &TestProxy) -> Box<dyn Io> {
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    match on.transport {
        Transport::TlsH2 => Box::new(on.tls(tcp, b"http/1.1").await),
        _ => Box::new(tcp),
    }
}

fn handshake_request(
    proxy: &TestProxy,
    path: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = format!("ws://{}{path}", proxy.addr)
        .into_client_request()
        .unwrap();
    // The client's own credentials never reach the upstream.
    request.headers_mut().insert(
        "authorization",
        http::HeaderValue::from_static("Bearer the-client-s-own"),
    );
    request
}

/// A ready proxy whose route `chat` (`/chat`) goes to `upstream`; `head` is its `[server]`
/// and `[admin]`.
async fn chat_proxy(
    head: &str,
    tokens: &TokenServer,
    upstream: &str,
    profile_extra: &str,
    route_extra: &str,
) -> TestProxy {
    let proxy = TestProxy::start(&format!(
        "{head}{}{}",
        client_app_profile("portal", tokens, profile_extra),
        route("chat", "/chat", upstream, "portal", route_extra)
    ))
    .await;
    proxy.ready().await;
    proxy
}

/// A WebSocket through the proxy's plain listener to `path`.
async fn open_socket(
    proxy: &TestProxy,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let io = TcpStream::connect(proxy.addr).await.unwrap();
    tokio_tungstenite::client_async(handshake_request(proxy, path), io)
        .await
        .expect("the handshake through the proxy failed")
        .0
}

/// The same body for both inbound HTTP/1.1 transports and both upstream kinds.
async fn websocket_round_trip(on: On, tls_upstream: bool) {
    let tokens = TokenServer::healthy(3600).await;
    let upstream_ca = TestCa::new();
    let (ws_addr, seen, _server) = ws_server(tls_upstream.then_some(&upstream_ca), None).await;
    let (scheme, extra) = if tls_upstream {
        ("https", format!("ca_file = \"{}\"", upstream_ca.ca_file()))
    } else {
        ("http", String::new())
    };
    let proxy = on
        .proxy(&format!(
            "{}{}",
            client_app_profile("portal", &tokens, ""),
            route(
                "chat",
                "/chat",
                &format!("{scheme}://{ws_addr}"),
                "portal",
                &extra
            )
        ))
        .await;
    proxy.ready().await;

    // A page of another site opening a socket through the proxy (no CORS check protects a
    // WebSocket): refused before the upstream hears of it.
    let mut foreign = handshake_request(&proxy, "/chat/ws?room=0");
    foreign.headers_mut().insert(
        "origin",
        http::HeaderValue::from_static("https://evil.example"),
    );
    match tokio_tungstenite::client_async(foreign, connect(&on, &proxy).await).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!(
            "a foreign page's socket was not refused: {:?}",
            other.map(|r| r.1)
        ),
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "the upstream saw the foreign handshake"
    );

    let io = connect(&on, &proxy).await;
    let (mut ws, response) =
        tokio_tungstenite::client_async(handshake_request(&proxy, "/chat/ws?room=1"), io)
            .await
            .expect("the handshake through the proxy failed");
    assert_eq!(response.status(), 101);

    // Text and binary, small and 1 MiB, both ways.
    let big_text = "é".repeat(512 * 1024);
    let big_binary: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    for message in [
        Message::text("hello"),
        Message::binary(vec![0u8, 1, 2, 255]),
        Message::text(big_text),
        Message::binary(big_binary),
    ] {
        ws.send(message.clone()).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no echo")
            .unwrap()
            .unwrap();
        assert_eq!(back, message);
    }
    // The metrics see the tunnel while it is open.
    let metrics = proxy.metrics_text().await;
    assert!(
        metrics.contains("egain_proxy_upgrades_total{route=\"chat\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("egain_proxy_inflight_requests 1"),
        "{metrics}"
    );
    ws.close(None).await.unwrap();

    // The handshake carried the proxy's token, not the client's, to the route's path.
    let handshakes = seen.lock().unwrap().clone();
    assert_eq!(handshakes.len(), 1);
    let auth = handshakes[0]
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap();
    assert!(tokens.is_live(Some(auth)), "{auth}");
    assert_eq!(handshakes[0]["upgrade"], "websocket");
    assert!(handshakes[0].contains_key("sec-websocket-key"));
    assert_eq!(handshakes[0]["x-forwarded-proto"], on.proto());
    eventually(Duration::from_secs(5), || proxy.shared.tunnels.open() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_plain_client_plain_upstream() {
    websocket_round_trip(On::new(Transport::FastH1), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_plain_client_tls_upstream() {
    websocket_round_trip(On::new(Transport::FastH1), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tls_client_plain_upstream() {
    websocket_round_trip(On::new(Transport::TlsH2), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tls_client_tls_upstream() {
    websocket_round_trip(On::new(Transport::TlsH2), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_passes_through() {
    let tokens = TokenServer::healthy(3600).await;
    let (ws_addr, seen, _server) = ws_server(None, Some(403)).await;
    let proxy = chat_proxy(HEAD, &tokens, &format!("http://{ws_addr}"), "", "").await;
    let io = TcpStream::connect(proxy.addr).await.unwrap();
    let err = tokio_tungstenite::client_async(handshake_request(&proxy, "/chat/ws"), io)
        .await
        .unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = err else {
        panic!("expected the upstream's HTTP answer, got {err:?}");
    };
    assert_eq!(response.status(), 403);
    let body = response.body().clone().unwrap_or_default();
    assert_eq!(String::from_utf8_lossy(&body), r#"{"code":"403-197"}"#);
    assert_eq!(seen.lock().unwrap().len(), 1, "a 403 is not replayed");
    assert_eq!(proxy.shared.tunnels.open(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_refused_with_401_is_replayed_with_a_fresh_token() {
    let tokens = TokenServer::healthy(3600).await;
    let (ws_addr, seen, _server) = ws_server(None, None).await;
    // A front that answers 401 to tokens the token server no longer honours, as eGain does.
    let t = tokens.clone();
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let _front = AbortOnDrop(tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = front.accept().await else {
                continue;
            };
            let t = t.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut head = vec![0u8; 8192];
                let n = client.read(&mut head).await.unwrap_or(0);
                let text = String::from_utf8_lossy(&head[..n]).to_string();
                let auth = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("authorization: ")
                            .or_else(|| l.strip_prefix("Authorization: "))
                    })
                    .map(str::to_owned);
                if !t.is_live(auth.as_deref()) {
                    let body = r#"{"code":"401-104"}"#;
                    let _ = client
                        .write_all(format!("HTTP/1.1 401 Unauthorized\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n{body}", body.len()).as_bytes())
                        .await;
                    return;
                }
                let mut upstream = TcpStream::connect(ws_addr).await.unwrap();
                upstream.write_all(&head[..n]).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    }));
    let proxy = chat_proxy(HEAD, &tokens, &format!("http://{front_addr}"), "", "").await;
    tokens.revoke_all();
    let mut ws = open_socket(&proxy, "/chat/ws").await;
    ws.send(Message::text("after replay")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("after replay")
    );
    assert_eq!(tokens.count(), 2);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_close_at_the_end_of_the_shutdown_grace_period() {
    let tokens = TokenServer::healthy(3600).await;
    let (ws_addr, _seen, _server) = ws_server(None, None).await;
    let head = "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let proxy = chat_proxy(head, &tokens, &format!("http://{ws_addr}"), "", "").await;
    let mut ws = open_socket(&proxy, "/chat/ws").await;
    assert_eq!(proxy.shared.tunnels.open(), 1);
    let shared = Arc::clone(&proxy.shared);
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(proxy.stop());
    // During the grace period the tunnel still works.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("still here")
    );
    // Then it is closed: the client sees the end of the stream.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(m)) if !m.is_close() => continue,
                _ => break,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the tunnel outlived the shutdown");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed before the grace period: {waited:?}"
    );
    stopping.await.unwrap();
    assert_eq!(shared.tunnels.open(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_egain_chat_socket_checks_the_bearer() {
    use egain_proxy::mock::{MockEgain, MockOptions};
    let mock = MockEgain::start(([127, 0, 0, 1], 0).into(), MockOptions::default())
        .await
        .unwrap();
    let proxy = TestProxy::start(&egain_proxy::demo::config_text(&mock, 0)).await;
    proxy.ready().await;
    let mut ws = open_socket(&proxy, "/knowledge/portalmgr/v4/chat").await;
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("client_app"), "{hello:?}");
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
    assert_eq!(mock.upgrades(), 1);
    // The closing handshake (RFC 6455 §5.5.1): the mock answers the client's Close.
    ws.close(None).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("no answer to Close");
    assert!(
        matches!(reply, Some(Ok(Message::Close(_))) | None),
        "{reply:?}"
    );
    // Straight to the mock without a token: refused like any API call.
    let io = TcpStream::connect(mock.addr()).await.unwrap();
    let request = format!("ws://{}/knowledge/portalmgr/v4/chat", mock.addr())
        .into_client_request()
        .unwrap();
    let err = tokio_tungstenite::client_async(request, io)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 401),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_goes_through_the_routes_egress_proxy() {
    let tinyproxy = support::tinyproxy::Tinyproxy::start();
    let tokens = TokenServer::healthy(3600).await;
    let (ws_addr, seen, _server) = ws_server(None, None).await;
    let proxy = chat_proxy(
        HEAD,
        &tokens,
        &format!("http://{ws_addr}"),
        "egress_proxy = \"none\"",
        &format!("egress_proxy = \"{}\"", tinyproxy.url()),
    )
    .await;
    let mut ws = open_socket(&proxy, "/chat/ws").await;
    ws.send(Message::text("via the proxy")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("via the proxy")
    );
    assert_eq!(tinyproxy.connects_to(&ws_addr.to_string()), 1);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// An open tunnel keeps its client connection's `max_connections` slot: with one slot, the
/// next client waits (in the kernel's backlog) until the tunnel closes, then is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_holds_its_connection_slot() {
    let tokens = TokenServer::healthy(3600).await;
    let (ws_addr, _seen, _server) = ws_server(None, None).await;
    let head = "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 1\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let proxy = chat_proxy(head, &tokens, &format!("http://{ws_addr}"), "", "").await;
    let mut ws = open_socket(&proxy, "/chat/ws").await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));

    let mut next = raw::Client::connect(&proxy).await;
    next.send("GET /chat/plain HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    let waiting = tokio::time::timeout(Duration::from_millis(700), next.response(false)).await;
    assert!(
        waiting.is_err(),
        "served while the tunnel held the only slot"
    );

    ws.close(None).await.unwrap();
    drop(ws);
    let (head, _) = tokio::time::timeout(Duration::from_secs(5), next.response(false))
        .await
        .expect("not served once the tunnel closed");
    assert!(head.starts_with("HTTP/1.1 "), "{head}");
}

/// A page of another site, in a real browser on the proxy's host, opens a WebSocket through
/// the proxy and posts a form to it: the proxy refuses both (the browser sends `Origin`), and
/// the upstream never sees them. Listed in `server.allowed_origins`, the same page's socket
/// works — so the browser did reach the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_site_in_a_browser_cannot_use_the_proxy() {
    let tokens = TokenServer::healthy(3600).await;
    let (ws_addr, seen, _server) = ws_server(None, None).await;
    let posts = Upstream::start().await;
    let run = |allowed: bool| {
        let (tokens, posts) = (&tokens, &posts);
        async move {
            // The page's own origin: a server of its own, under another name.
            // It also holds a request of the page's open (`/hold`) for up to 2 s of real
            // time, until the page reports how its socket ended (`/done?…`): while a fetch
            // is in flight Chromium's virtual time stands still (and with it the page's
            // events), so the real socket has that long to connect and echo.
            let proxy_port = Arc::new(std::sync::OnceLock::<u16>::new());
            let reported = Arc::new(tokio::sync::Notify::new());
            let reports = Arc::new(Mutex::new(Vec::<String>::new()));
            let (page, _pages) = {
                let (proxy_port, reported, reports) = (
                    Arc::clone(&proxy_port),
                    Arc::clone(&reported),
                    Arc::clone(&reports),
                );
                serve(move |req: http::Request<hyper::body::Incoming>| {
                    let proxy = *proxy_port.get().unwrap();
                    let (reported, reports) = (Arc::clone(&reported), Arc::clone(&reports));
                    async move {
                        match req.uri().path() {
                            "/hold" => {
                                let done = reported.notified();
                                tokio::pin!(done);
                                done.as_mut().enable();
                                if reports.lock().unwrap().is_empty() {
                                    let _ =
                                        tokio::time::timeout(Duration::from_secs(2), done).await;
                                }
                                html_response("")
                            }
                            "/done" => {
                                let report = req.uri().query().unwrap_or("").to_owned();
                                reports.lock().unwrap().push(report);
                                reported.notify_waiters();
                                html_response("")
                            }
                            _ => html_response(&page_html(proxy)),
                        }
                    }
                })
                .await
            };
            // A site of its own: a name the browser maps to this host (pages served from a
            // loopback address or localhost are this host's own, and may use the proxy).
            let origin = format!("http://site.example:{}", page.port());
            let head = if allowed {
                HEAD.replace(
                    "[server]\n",
                    &format!("[server]\nallowed_origins = [\"{origin}\"]\n"),
                )
            } else {
                HEAD.to_owned()
            };
            let proxy = TestProxy::start(&format!(
                "{head}{}{}{}",
                client_app_profile("portal", tokens, ""),
                route("chat", "/chat", &format!("http://{ws_addr}"), "portal", ""),
                route("api", "/api", &posts.url(), "portal", "")
            ))
            .await;
            proxy.ready().await;
            let _ = proxy_port.set(proxy.addr.port());
            let url = format!("{origin}/page.html");
            let dom = tokio::task::spawn_blocking(move || {
                support::browser::browse(
                    &url,
                    &[
                        "--dump-dom",
                        "--host-resolver-rules=MAP site.example 127.0.0.1",
                    ],
                )
            })
            .await
            .unwrap();
            proxy.stop().await;
            let reports = reports.lock().unwrap().join(";");
            assert!(!reports.is_empty(), "the page reported nothing: {dom}");
            reports
        }
    };
    let reports = run(false).await;
    assert_eq!(reports, "ws-error");
    assert!(
        seen.lock().unwrap().is_empty(),
        "the WebSocket server saw the handshake"
    );
    assert!(
        posts.seen().is_empty(),
        "the upstream saw the form: {:?}",
        posts.seen()
    );

    let reports = run(true).await;
    assert_eq!(reports, "ws-message:hello");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// A page that opens a WebSocket to the proxy on `proxy_port`, sends "hello", and writes what
/// happens into the document; and posts a form-like request (no CORS preflight) to `/api`.
fn page_html(proxy_port: u16) -> String {
    format!(
        r#"<!doctype html><html><body><pre id="out"></pre><script>
const out = document.getElementById("out");
const note = (s) => {{ out.textContent += s + ";"; }};
const report = (s) => {{ note(s); fetch("/done?" + s); }};
fetch("/hold");
const ws = new WebSocket("ws://127.0.0.1:{proxy_port}/chat/ws");
ws.onopen = () => {{ note("ws-open"); ws.send("hello"); }};
ws.onmessage = (e) => report("ws-message:" + e.data);
ws.onerror = () => report("ws-error");
fetch("http://127.0.0.1:{proxy_port}/api/form", {{ method: "POST", mode: "no-cors",
  headers: {{ "content-type": "application/x-www-form-urlencoded" }}, body: "a=1" }})
  .then(() => note("post-sent"), () => note("post-failed"));
</script></body></html>"#
    )
}

fn html_response(body: &str) -> http::Response<egain_proxy::ProxyBody> {
    let mut r = json_response(200, body, &[]);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html"),
    );
    r
}

/// A 101 that names no protocol, or one the client did not offer (RFC 9110 §7.8): the
/// client gets a 502, not a tunnel to something it did not ask for.
#[tokio::test]
async fn a_101_to_a_protocol_not_offered_is_a_502() {
    use support::raw::RawUpstream;
    let tokens = TokenServer::healthy(3600).await;
    let upstream = RawUpstream::start(|head| {
        let answer = if head.contains("/none") {
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n"
        } else {
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: IRC/6.9\r\n\r\n"
        };
        (answer.as_bytes().to_vec(), false)
    })
    .await;
    let proxy = chat_proxy(HEAD, &tokens, &upstream.url(), "", "").await;
    for path in ["/chat/none", "/chat/irc"] {
        let io = TcpStream::connect(proxy.addr).await.unwrap();
        match tokio_tungstenite::client_async(handshake_request(&proxy, path), io).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 502, "{path}")
            }
            other => panic!("{path}: {:?}", other.map(|r| r.1)),
        }
    }
}

/// h2c smuggling: an `Upgrade: h2c` would open an HTTP/2 tunnel to the upstream whose
/// requests no route, path rule or access log sees. The proxy never offers h2c: the request
/// reaches the upstream as the plain request it also is, without `Upgrade` or
/// `HTTP2-Settings`, on both HTTP/1.1 transports.
#[tokio::test]
async fn h2c_is_never_offered_upstream() {
    use support::raw::{Client, RawUpstream, INBOUND};
    let tokens = TokenServer::healthy(3600).await;
    let upstream = RawUpstream::start(|head| {
        let answer = if head.to_ascii_lowercase().contains("upgrade: h2c") {
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        } else {
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain"
        };
        (answer.as_bytes().to_vec(), false)
    })
    .await;
    let proxy = TestProxy::start(&format!(
        "{HEAD}{}{}",
        client_app_profile("portal", &tokens, ""),
        route("all", "/", &upstream.url(), "portal", "")
    ))
    .await;
    proxy.ready().await;
    for inbound in INBOUND {
        for (connection, upgrade) in [
            ("Upgrade, HTTP2-Settings", "h2c"),
            ("Upgrade", "H2C"),
            ("upgrade", "h2c/1.0"),
        ] {
            let mut client = Client::on(&proxy, inbound).await;
            client
                .send(&format!(
                    "GET /chat/x HTTP/1.1\r\nHost: app\r\nConnection: {connection}\r\nUpgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                ))
                .await;
            let (head, body) = client.response(false).await;
            assert!(
                head.starts_with("HTTP/1.1 200"),
                "{inbound:?} {upgrade}: {head}"
            );
            assert_eq!(body, b"plain");
            let seen = upstream.seen().pop().unwrap();
            assert_eq!(seen.header("upgrade"), None, "{inbound:?} {upgrade}");
            if connection.contains("HTTP2-Settings") {
                assert_eq!(seen.header("http2-settings"), None);
            }
        }
    }
}
