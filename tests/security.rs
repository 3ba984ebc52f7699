//! Security: inbound TLS and access control, strict request validation over raw sockets,
//! TLS to token endpoints and upstreams with a test CA, and property tests of the path rules.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use proptest::prelude::*;
use support::tls::*;
use support::transport::On;
use support::*;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEAD: &str = "[server]\nlisten = \"127.0.0.1:0\"\n";

#[tokio::test]
async fn https_token_endpoint_and_https_h2_upstream_with_a_private_ca() {
    let ca = TestCa::new();
    let (cert, key) = ca.leaf("server");
    let (token_addr, _t) = serve_tls(&cert, &key, |_req| async {
        json_response(
            200,
            r#"{"access_token":"tls-token","token_type":"Bearer","expires_in":3600}"#,
            &[],
        )
    })
    .await;
    let (up_addr, _u) = serve_tls(
        &cert,
        &key,
        |req: http::Request<hyper::body::Incoming>| async move {
            let auth = req
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned());
            json_response(
                200,
                &serde_json::json!({ "version": format!("{:?}", req.version()), "auth": auth })
                    .to_string(),
                &[],
            )
        },
    )
    .await;
    let ca_file = ca.ca_file();
    let config = format!(
        "{HEAD}[profiles.p]\nkind = \"client_app\"\ntoken_url = \"https://127.0.0.1:{}/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\nca_file = \"{ca_file}\"\n{}",
        token_addr.port(),
        route("r", "/", &format!("https://127.0.0.1:{}", up_addr.port()), "p", &format!("ca_file = \"{ca_file}\""))
    );
    let proxy = TestProxy::start(&config).await;
    let body: serde_json::Value = client()
        .get(proxy.url("/x"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["auth"], "Bearer tls-token");
    assert_eq!(body["version"], "HTTP/2.0", "h2 by ALPN to the upstream");

    // Without the CA, verification fails: no token, and the upstream is unreachable.
    let config = format!(
        "{HEAD}[profiles.p]\nkind = \"client_app\"\ntoken_url = \"https://127.0.0.1:{}/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n{}{}",
        token_addr.port(),
        route("r", "/r", &format!("https://127.0.0.1:{}", up_addr.port()), "p", ""),
        route("n", "/n", &format!("https://127.0.0.1:{}", up_addr.port()), "none", "")
    );
    let proxy = TestProxy::start(&config).await;
    let r = client().get(proxy.url("/r")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let text = r.text().await.unwrap();
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    assert_eq!(status(client().get(proxy.url("/n"))).await, 502);
}

/// An `https://` upstream behind the HTTP/1.1 fast path: the request carries what a plain
/// upstream gets, a 401 is replayed with a fresh token, and a streamed h2 body without a
/// length reaches the client chunked, trailers included.
#[tokio::test]
async fn https_upstream_requests_and_streamed_answers_through_the_fast_path() {
    use http_body_util::StreamBody;
    let ca = TestCa::new();
    let (cert, key) = ca.leaf("server");
    let tokens = TokenServer::healthy(3600).await;
    // What the upstream saw: path, fields, body.
    type Seen = (String, http::HeaderMap, Vec<u8>);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let first_auth: Arc<Mutex<Option<String>>> = Arc::default();
    let (s, f) = (Arc::clone(&seen), Arc::clone(&first_auth));
    let (up_addr, _u) = serve_tls(
        &cert,
        &key,
        move |req: http::Request<hyper::body::Incoming>| {
            let (s, f) = (Arc::clone(&s), Arc::clone(&f));
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes().to_vec();
                let path = parts.uri.path().to_owned();
                let auth = parts
                    .headers
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned());
                s.lock().unwrap().push((path.clone(), parts.headers, body));
                if path == "/v1/revoked" {
                    // The first token seen is revoked; any other is fine.
                    let mut first = f.lock().unwrap();
                    if first.is_none() || *first == auth {
                        *first = auth;
                        return json_response(401, r#"{"code":"401-101"}"#, &[]);
                    }
                    return json_response(200, r#"{"replayed":true}"#, &[]);
                }
                let frames = vec![
                    Ok::<_, egain_proxy::BoxError>(hyper::body::Frame::data(bytes::Bytes::from(
                        "one,",
                    ))),
                    Ok(hyper::body::Frame::data(bytes::Bytes::from("two"))),
                    Ok(hyper::body::Frame::trailers({
                        let mut t = http::HeaderMap::new();
                        t.insert("x-checksum", "2".parse().unwrap());
                        t
                    })),
                ];
                let mut r = http::Response::new(
                    StreamBody::new(futures_util::stream::iter(frames)).boxed(),
                );
                r.headers_mut().insert("x-upstream", "tls".parse().unwrap());
                r
            }
        },
    )
    .await;
    let config = format!(
        "{HEAD}{}{}",
        client_app_profile("p", &tokens, ""),
        route(
            "r",
            "/api",
            &format!("https://127.0.0.1:{}/v1", up_addr.port()),
            "p",
            &format!("strip_prefix = true\nca_file = \"{}\"", ca.ca_file())
        )
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;

    let response = raw_request(
        proxy.addr,
        b"POST /api/stream?q=1 HTTP/1.1\r\nHost: app.local\r\nAuthorization: Basic c2VjcmV0\r\nX-Forwarded-For: 203.0.113.7\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    let lower = response.to_ascii_lowercase();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        lower.contains("transfer-encoding: chunked\r\n"),
        "{response}"
    );
    assert!(lower.contains("x-upstream: tls\r\n"), "{response}");
    assert!(
        response.ends_with("4\r\none,\r\n3\r\ntwo\r\n0\r\nx-checksum: 2\r\n\r\n"),
        "{response:?}"
    );
    let (path, headers, body) = seen.lock().unwrap()[0].clone();
    assert_eq!(path, "/v1/stream");
    assert_eq!(body, b"hello");
    assert!(headers["authorization"]
        .to_str()
        .unwrap()
        .starts_with("Bearer "));
    assert_eq!(headers.get_all("authorization").iter().count(), 1);
    assert_eq!(headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(headers["x-forwarded-host"], "app.local");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert!(headers.get("connection").is_none());

    // A 401 for a revoked token: one new token, the request replayed with it.
    let r = client()
        .get(proxy.url("/api/revoked"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), r#"{"replayed":true}"#);
    assert_eq!(tokens.count(), 2);
}

#[tokio::test]
async fn https_listener_serves_h2_and_http1() {
    let ca = TestCa::new();
    let (cert, key) = ca.leaf("proxy");
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    let url = format!("https://127.0.0.1:{}/tls", proxy.addr.port());
    let r = ca.client().get(&url).send().await.unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(upstream.last().header("x-forwarded-proto"), Some("https"));
    let h1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.ca.pem().as_bytes()).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let r = h1.get(&url).send().await.unwrap();
    assert_eq!(r.version(), http::Version::HTTP_11);
    assert_eq!(r.status(), 200);
}

/// A certificate renewed in place (cert-manager, certbot: same paths, new files) is served
/// from the first connection after a reload; a reload does not need a restart for it.
#[tokio::test]
async fn a_reload_serves_a_certificate_renewed_in_place() {
    let ca = TestCa::new();
    let (cert_a, key_a) = ca.leaf_for("a", &["127.0.0.1", "localhost", "cert-a.test"]);
    let (cert_b, key_b) = ca.leaf_for("b", &["127.0.0.1", "localhost", "cert-b.test"]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(&key_a, &key).unwrap();
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
            cert.display(),
            key.display(),
            client_app_profile("p", &tokens, ""),
            route("r", "/", &upstream.url(), "p", "")
        ),
    )
    .unwrap();
    let config = egain_proxy::config::Config::load(&path).unwrap();
    let proxy = TestProxy::start_config(config, Some(path)).await;
    let served = || async {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(
                ca.ca.der().to_vec(),
            ))
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(proxy.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        String::from_utf8_lossy(&der).into_owned()
    };
    assert!(served().await.contains("cert-a.test"));
    std::fs::copy(&cert_b, &cert).unwrap();
    std::fs::copy(&key_b, &key).unwrap();
    proxy.shared.reload().await.unwrap();
    assert!(served().await.contains("cert-b.test"));
    assert!(proxy.shared.restart_needed().is_empty());
    // A broken renewal is a failed reload: the running certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    assert!(proxy.shared.reload().await.is_err());
    assert!(served().await.contains("cert-b.test"));
}

async fn api_keys_and_allow_list(on: On) {
    let head = on.head();
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let key = "k-0123456789abcdef";
    let config = format!(
        "{head}[server.access]\napi_keys = [\"{key}\", \"other-0123456789abcdef\"]\nallow = [\"127.0.0.0/8\"]\n{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    let r = on.client().get(on.url(&proxy, "/x")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "proxy_auth_required");
    let r = on
        .client()
        .get(on.url(&proxy, "/x"))
        .header("x-proxy-key", "k-0123456789abcdeX")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(upstream.seen().is_empty());
    let r = on
        .client()
        .get(on.url(&proxy, "/x"))
        .header("x-proxy-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        upstream.last().headers.get("x-proxy-key").is_none(),
        "the key must be stripped"
    );
    // The key field twice is no key, whichever order a good and a bad key come in.
    for keys in [
        [key, "wrong-0123456789abcdef"],
        ["wrong-0123456789abcdef", key],
        [key, key],
    ] {
        let r = on
            .client()
            .get(on.url(&proxy, "/twice"))
            .header("x-proxy-key", keys[0])
            .header("x-proxy-key", keys[1])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{keys:?}");
    }
    assert!(upstream.seen().iter().all(|s| s.target != "/twice"));

    let config = format!(
        "{head}[server.access]\napi_keys = [\"{key}\"]\nallow = [\"10.0.0.0/8\"]\n{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    let r = on
        .client()
        .get(on.url(&proxy, "/x"))
        .header("x-proxy-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "forbidden"
    );
}

#[tokio::test]
async fn refuses_to_start_exposed_or_in_clear_text() {
    let parse = |text: &str| egain_proxy::Config::parse(text, std::path::Path::new("."), &|_| None);
    let profile = "[profiles.p]\nkind = \"client_app\"\ntoken_url = \"https://egain.example/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n";
    let e = parse(&format!("[server]\nlisten = \"0.0.0.0:8080\"\n{profile}")).unwrap_err();
    assert_eq!(e.location, "server.listen");
    assert!(parse(&format!(
        "[server]\nlisten = \"0.0.0.0:8080\"\nopen = true\n{profile}"
    ))
    .is_ok());
    assert!(parse(&format!(
        "[server]\nlisten = \"0.0.0.0:8080\"\n[server.access]\nallow = [\"10.0.0.0/8\"]\n{profile}"
    ))
    .is_ok());
    let e = parse(&format!(
        "[server.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n{profile}"
    ))
    .unwrap_err();
    assert_eq!(e.location, "server.tls");
    let e = parse(&profile.replace("https://egain.example", "http://egain.example")).unwrap_err();
    assert_eq!(e.location, "profiles.p.token_url");
    assert!(parse(&format!(
        "{}allow_insecure_http = true\n",
        profile.replace("https://egain.example", "http://egain.example")
    ))
    .is_ok());
    let e = parse(&format!("{profile}[[routes]]\npath_prefix = \"/\"\nupstream = \"http://api.example\"\nprofile = \"p\"\n")).unwrap_err();
    assert_eq!(e.location, "routes[0].upstream");
}

async fn raw_request(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_and_escaping_requests_are_refused_before_routing() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{HEAD}max_header_bytes = 8192\n{}{}",
        client_app_profile("p", &tokens, ""),
        route("api", "/api", &upstream.url(), "p", "strip_prefix = true")
    );
    let proxy = TestProxy::start(&config).await;
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"GET http://evil.example/api/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".to_vec(), "400", "bad_request"),
        (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n".to_vec(), "405", "method_not_allowed"),
        (b"GET /api/../admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), "400", "bad_request"),
        (b"GET /api/%2e%2e/admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), "400", "bad_request"),
        (b"GET /api/..%2fadmin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), "400", "bad_request"),
        (b"GET /api/.%2E/admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), "400", "bad_request"),
        (b"GET /api/./x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), "400", "bad_request"),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), "400", "bad_request"),
        (
            format!("GET /api/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(20_000)).into_bytes(),
            "431",
            "header_too_large",
        ),
        // Complete in one read but over the limit: still refused.
        (
            format!("GET /api/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(9_000)).into_bytes(),
            "431",
            "header_too_large",
        ),
        (
            format!("GET /api/x HTTP/1.1\r\nHost: x\r\n{}\r\n", "X-F: 1\r\n".repeat(100)).into_bytes(),
            "431",
            "header_too_large",
        ),
        // Malformed heads: the proxy's JSON, not an empty 400.
        (b"GARBAGE\r\n\r\n".to_vec(), "400", "bad_request"),
        (b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n".to_vec(), "400", "bad_request"),
        (b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-A : 1\r\n\r\n".to_vec(), "400", "bad_request"),
        (b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-A: 1\r2\r\n\r\n".to_vec(), "400", "bad_request"),
        // Framing no one can trust (RFC 9112 §6.3).
        (b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\nx".to_vec(), "400", "bad_request"),
        (b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\nx".to_vec(), "400", "bad_request"),
        (b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1,1\r\n\r\nx".to_vec(), "400", "bad_request"),
        (b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx".to_vec(), "400", "bad_request"),
    ];
    for (request, status, code) in cases {
        let response = raw_request(proxy.addr, &request).await;
        let first = String::from_utf8_lossy(&request[..request.len().min(40)]).into_owned();
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{first:?} -> {response:?}"
        );
        assert!(response.contains(code), "{first:?} -> {response:?}");
    }
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    // The process keeps serving.
    assert_eq!(status(client().get(proxy.url("/api/ok"))).await, 200);
    assert_eq!(upstream.last().target, "/ok");
}

#[tokio::test]
async fn slow_header_clients_are_cut_off() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{HEAD}header_read_timeout = \"500ms\"\n{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let started = std::time::Instant::now();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Trickle one header byte every 100 ms; the proxy must give up at ~500 ms.
    let mut closed = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if stream.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await
        {
            let _ = n;
            closed = true;
            break;
        }
    }
    assert!(closed, "the slow client was never cut off");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut off only after {:?}",
        started.elapsed()
    );
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn connection_limit_holds_new_clients_until_a_slot_frees() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{HEAD}max_connections = 1\n{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    first
        .write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The second connection is not served while the first stays open...
    let second = tokio::spawn(raw_request(
        proxy.addr,
        b"GET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished());
    assert_eq!(upstream.seen().len(), 1);
    // ...and is once it closes.
    drop(first);
    let response = second.await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[test]
fn secrets_never_print() {
    let secret = egain_proxy::config::Secret::new("hunter2-hunter2");
    assert!(!format!("{secret:?}{secret}").contains("hunter2"));
    let config = egain_proxy::Config::parse(
        "[profiles.p]\nkind = \"client_app\"\ntoken_url = \"https://e/t\"\nclient_id = \"i\"\nclient_secret = \"hunter2-hunter2\"\n[server.access]\napi_keys = [\"key-hunter2-hunter2\"]\n",
        std::path::Path::new("."),
        &|_| None,
    )
    .unwrap();
    assert!(!format!("{config:?}").contains("hunter2"));
    let token = egain_proxy::token::AccessToken::new(
        "tok-secret",
        Duration::from_secs(60),
        std::time::Instant::now(),
        None,
    )
    .unwrap();
    assert!(token.header.is_sensitive());
    // A server claiming an absurd lifetime cannot overflow the proxy's deadlines.
    assert!(egain_proxy::token::AccessToken::new(
        "t",
        Duration::MAX,
        std::time::Instant::now(),
        None
    )
    .is_some());
    assert!(!format!("{token:?}").contains("tok-secret"));
}

fn route_table(prefixes: &[String]) -> egain_proxy::routes::RouteTable {
    let mut text = String::from("[profiles.p]\nkind = \"client_app\"\ntoken_url = \"http://127.0.0.1:1/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n");
    for (i, p) in prefixes.iter().enumerate() {
        text.push_str(&format!("[[routes]]\nname = \"r{i}\"\npath_prefix = \"{p}\"\nupstream = \"http://127.0.0.1:1\"\nprofile = \"p\"\n"));
    }
    let config = egain_proxy::Config::parse(&text, std::path::Path::new("."), &|_| None).unwrap();
    egain_proxy::routes::RouteTable::new(&config.routes)
}

proptest! {
    #[test]
    fn validated_paths_never_escape_the_matched_prefix(
        prefixes in proptest::collection::vec("/[a-z]{1,3}(/[a-z]{1,3}){0,2}/?", 1..5),
        path in "(/([a-z]{1,3}|\\.|\\.\\.|%2[eEfF]|%25|%5[cC]|\\\\)){0,6}/?",
    ) {
        let table = route_table(&prefixes);
        let path = if path.is_empty() { "/".to_owned() } else { path };
        if egain_proxy::http::path::validate(&path).is_ok() {
            // Normalising (RFC 3986 §5.2.4) a valid path changes nothing: it has no dot segments.
            prop_assert!(!egain_proxy::http::path::has_dot_segment(&path));
            let decoded = percent_encoding::percent_decode_str(&path).decode_utf8_lossy().replace('\\', "/");
            prop_assert!(!decoded.split('/').any(|s| s == "." || s == ".."));
            if let Some((_, route)) = table.find(&http::Method::GET, None, &path) {
                let prefix = route.config.path_prefix.trim_end_matches('/');
                prop_assert!(path == prefix || path.starts_with(&format!("{prefix}/")), "{} matched {}", path, prefix);
            }
        }
    }

    #[test]
    fn the_path_validator_never_panics(path in "\\PC*") {
        let _ = egain_proxy::http::path::validate(&path);
    }

    #[test]
    fn config_parsing_never_panics(text in "\\PC*", mutated in "(\\[server\\]|listen = |\\[\\[routes\\]\\]|path_prefix = \"/|\"|\\$\\{|\\}|\\n|=|é|\\[profiles\\.p\\]|kind = \"client_app\"){0,30}") {
        let _ = egain_proxy::Config::parse(&text, std::path::Path::new("."), &|_| None);
        let _ = egain_proxy::Config::parse(&mutated, std::path::Path::new("."), &|_| None);
    }

    #[test]
    fn token_response_parsing_never_panics(status in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..200), json in "\\{(\"(access_token|expires_in|token_type|error|scope)\": ?(\"[a-z.=-]{0,12}\"|-?[0-9]{1,20}(\\.[0-9]+)?|null|true|\\[\\]|\\{\\}),? ?){0,5}\\}") {
        let headers = http::HeaderMap::new();
        let now = std::time::SystemTime::now();
        let ttl = Duration::from_secs(300);
        let _ = egain_proxy::token::fetch::parse_response(status, &headers, &body, ttl, now);
        let _ = egain_proxy::token::fetch::parse_response(200, &headers, json.as_bytes(), ttl, now);
    }

    #[test]
    fn the_route_matcher_never_panics(path in "\\PC*", host in proptest::option::of("\\PC*")) {
        let table = route_table(&["/a".to_owned(), "/".to_owned()]);
        let _ = table.find(&http::Method::GET, host.as_deref(), &path);
    }
}

#[tokio::test]
async fn keys_are_compared_whole() {
    // A prefix of a valid key, or the key with a suffix, is not the key.
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let key = "k-0123456789abcdef";
    let config = format!(
        "{HEAD}[server.access]\napi_keys = [\"{key}\"]\napi_key_header = \"x-gateway-key\"\n{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    for wrong in [&key[..10], &format!("{key}x"), ""] {
        let r = client()
            .get(proxy.url("/x"))
            .header("x-gateway-key", wrong)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{wrong:?}");
    }
    assert_eq!(
        status(client().get(proxy.url("/x")).header("x-gateway-key", key)).await,
        200
    );
}

/// Paths a lax server reads as dot segments, so as outside the route's base path: path
/// parameters (`..;`, which Java servlet containers drop before normalising), trailing
/// whitespace, IIS's `%u` escapes and overlong UTF-8. The same 400 on every transport; an
/// ordinary path with a parameter passes.
async fn paths_any_server_reads_as_dot_segments_are_refused(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let (upstream, rest) = (Upstream::start().await, Upstream::start().await);
    let proxy = on
        .proxy(&format!(
            "{}{}{}",
            client_app_profile("p", &tokens, ""),
            route("api", "/api", &upstream.url(), "p", "strip_prefix = true"),
            route("rest", "/", &rest.url(), "p", ""),
        ))
        .await;
    proxy.ready().await;
    let mut conn = on.connect(&proxy).await;
    for path in [
        "/api/..;/x",
        "/api/.;/x",
        "/api/%2e%2e;/x",
        "/api/..%3b/x",
        "/api/..;jsessionid=1/x",
        "/api/..%20/x",
        "/api/..%09/x",
        "/api/%u002e%u002e/x",
        "/api/%c0%ae%c0%ae/x",
        "/api/%e0%80%ae%e0%80%ae/x",
    ] {
        assert_eq!(conn.get(path).await, 400, "{path}");
    }
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    assert_eq!(conn.get("/api/a;v=1/b").await, 200);
    assert_eq!(upstream.last().target, "/a;v=1/b");
}

/// h2: the request's host is its `:authority` (RFC 9113 §8.3.1), which must be a valid
/// host[:port]; a `Host` naming another host is malformed. Otherwise the route, and so the
/// token, would follow a field that other front ends do not read.
#[tokio::test]
async fn an_h2_request_is_routed_by_its_authority() {
    let tokens = TokenServer::healthy(3600).await;
    let (plain, special) = (Upstream::start().await, Upstream::start().await);
    let on = On::new(support::transport::Transport::H2c);
    let proxy = on
        .proxy(&format!(
            "{}[[routes]]\nname = \"special\"\nhost = \"special.example\"\npath_prefix = \"/\"\nupstream = \"{}\"\nprofile = \"p\"\n{}",
            client_app_profile("p", &tokens, ""),
            special.url(),
            route("plain", "/", &plain.url(), "p", ""),
        ))
        .await;
    proxy.ready().await;
    let conn = on.connect(&proxy).await;
    let support::transport::Conn::H2 { send, .. } = &conn else {
        unreachable!()
    };
    let ask = |authority: &str, host: Option<&str>| {
        let mut request = http::Request::get(format!("http://{authority}/x"));
        if let Some(host) = host {
            request = request.header("host", host);
        }
        let request = request.body(()).unwrap();
        let send = send.clone();
        async move {
            let mut send = send.ready().await.unwrap();
            let (response, _) = send.send_request(request, true).unwrap();
            response.await.unwrap().status().as_u16()
        }
    };
    assert_eq!(ask("127.0.0.1", Some("special.example")).await, 400);
    assert_eq!(ask("special.example", Some("127.0.0.1")).await, 400);
    assert_eq!(ask("u@special.example", None).await, 400);
    assert_eq!(ask("special.example:abc", None).await, 400);
    assert!(special.seen().is_empty() && plain.seen().is_empty());
    assert_eq!(ask("special.example", None).await, 200);
    assert_eq!(ask("special.example", Some("SPECIAL.example")).await, 200);
    assert_eq!(
        special.last().headers.get("x-forwarded-host").unwrap(),
        "special.example"
    );
    // The default port is no difference (RFC 3986 §6.2.3), another one is.
    assert_eq!(
        ask("special.example", Some("special.example:80")).await,
        200
    );
    assert_eq!(
        ask("special.example:80", Some("special.example")).await,
        200
    );
    assert_eq!(
        ask("special.example", Some("special.example:8080")).await,
        400
    );
    assert_eq!(special.seen().len(), 4);
    assert_eq!(ask("127.0.0.1", None).await, 200);
    assert_eq!(plain.seen().len(), 1);
}

/// More header fields than the HTTP/1.1 parsers take is the same `431 header_too_large` on
/// every transport (h2 has no count of its own); as many passes.
async fn too_many_header_fields_are_refused_alike(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    // An upstream without a field limit of its own (hyper's is 100).
    let upstream = support::raw::RawUpstream::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
            false,
        )
    })
    .await;
    let proxy = on.proxy_to(&tokens, &upstream.url()).await;
    proxy.ready().await;
    for (fields, want) in [(101, 431), (100, 200)] {
        // `fields` in all: Host (or `:authority`) and the x-f ones.
        let names: Vec<String> = (1..fields).map(|i| format!("x-f{i}")).collect();
        let (status, body) = match on.connect(&proxy).await {
            support::transport::Conn::H1(mut client) => {
                let lines: String = names.iter().map(|n| format!("{n}: 1\r\n")).collect();
                client
                    .send(&format!("GET /fields HTTP/1.1\r\nHost: app\r\n{lines}\r\n"))
                    .await;
                let (head, body) = client.response(false).await;
                (head[9..12].parse::<u16>().unwrap(), body)
            }
            support::transport::Conn::H2 { send, _task, .. } => {
                let mut request = http::Request::get("http://app/fields");
                for n in &names {
                    request = request.header(n.as_str(), "1");
                }
                let mut send = send.ready().await.unwrap();
                let (response, _) = send.send_request(request.body(()).unwrap(), true).unwrap();
                let response = response.await.unwrap();
                let status = response.status().as_u16();
                let mut body = response.into_body();
                let mut bytes = Vec::new();
                while let Some(chunk) = body.data().await {
                    bytes.extend_from_slice(&chunk.unwrap());
                }
                drop(_task);
                (status, bytes)
            }
        };
        assert_eq!(
            status,
            want,
            "{fields} fields: {}",
            String::from_utf8_lossy(&body)
        );
        if want == 431 {
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"], "header_too_large");
            assert!(upstream.seen().is_empty());
        }
    }
    // An h2 browser sends one `Cookie` field per cookie: they count as the one line they
    // become (Chromium sends 88 cookies as 88 fields).
    if let support::transport::Conn::H2 { send, .. } = on.connect(&proxy).await {
        let mut request = http::Request::get("http://app/cookies");
        for i in 0..150 {
            request = request.header("cookie", format!("c{i}=1"));
        }
        let mut send = send.ready().await.unwrap();
        let (response, _) = send.send_request(request.body(()).unwrap(), true).unwrap();
        assert_eq!(response.await.unwrap().status(), 200);
        let seen = upstream.seen().pop().unwrap();
        assert!(seen.header("cookie").unwrap().ends_with("c148=1; c149=1"));
    }
}

/// TRACE would reflect the proxy's bearer token back to the client; a standard method in the
/// wrong case might be the standard one to a lenient upstream.
async fn trace_and_miscased_methods_are_refused(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let proxy = on.proxy_for(&tokens, &upstream, "", "").await;
    proxy.ready().await;
    let r = on
        .client()
        .request(http::Method::TRACE, on.url(&proxy, "/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "method_not_allowed");
    let track = http::Method::from_bytes(b"TRACK").unwrap();
    let r = on
        .client()
        .request(track, on.url(&proxy, "/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let head = http::Method::from_bytes(b"head").unwrap();
    let r = on
        .client()
        .request(head, on.url(&proxy, "/h"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
}

/// A browser on the proxy's host carries other sites' pages: their requests — a WebSocket
/// handshake, a form POST, an image — and a page under a name of the attacker's that resolves
/// here (DNS rebinding) are refused before they reach the upstream with the proxy's token.
/// Programs that are not browsers, a person at the address bar, the proxy's own origin and
/// origins listed in `server.allowed_origins` pass.
async fn browser_requests_for_other_sites_are_refused(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let proxy = support::TestProxy::start(&format!(
        "{}{}{}{}",
        on.head_with("allowed_origins = [\"https://tool.corp\"]\n"),
        client_app_profile("portal", &tokens, ""),
        // GET and POST only: a PATCH matches no route.
        route(
            "r",
            "/",
            &upstream.url(),
            "portal",
            "methods = [\"GET\", \"POST\"]"
        ),
        // Never taken (the route above takes every path), but its host is the proxy's name.
        route(
            "named",
            "/",
            &upstream.url(),
            "portal",
            "host = \"portal.test\"\nmethods = [\"GET\", \"POST\"]"
        )
    ))
    .await;
    proxy.ready().await;
    let own = on.url(&proxy, "");
    let client = on.client();
    // Method, the browser's fields, a name (the path), the status.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, u16);
    let chrome = ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/156");
    let language = ("accept-language", "en-US");
    let cases: [Case; 18] = [
        ("GET", &[], "plain", 200),
        // No route for a program: 404. For a page of another site: 403 all the same, so it
        // cannot tell routed paths from others.
        ("PATCH", &[], "unrouted", 404),
        (
            "PATCH",
            &[
                ("host", "rebind.example"),
                ("sec-fetch-site", "same-origin"),
            ],
            "unrouted-rebound",
            403,
        ),
        ("GET", &[("sec-fetch-site", "none")], "address-bar", 200),
        (
            "GET",
            &[
                ("origin", "http://evil.example"),
                ("sec-fetch-site", "cross-site"),
            ],
            "socket",
            403,
        ),
        ("POST", &[("origin", "http://evil.example")], "form", 403),
        ("POST", &[("origin", "null")], "sandboxed", 403),
        ("GET", &[("sec-fetch-site", "cross-site")], "image", 403),
        (
            "GET",
            &[
                ("origin", "https://tool.corp"),
                ("sec-fetch-site", "cross-site"),
            ],
            "listed",
            200,
        ),
        (
            "POST",
            &[("origin", own.as_str()), ("sec-fetch-site", "same-origin")],
            "own",
            200,
        ),
        (
            "GET",
            &[
                ("host", "rebind.example"),
                ("sec-fetch-site", "same-origin"),
            ],
            "rebound",
            403,
        ),
        (
            "GET",
            &[("host", "localhost"), ("sec-fetch-site", "same-origin")],
            "localhost",
            200,
        ),
        // Rebinding over plain http://, where Chromium sends no Fetch Metadata: a browser
        // still, by its User-Agent and Accept-Language.
        (
            "GET",
            &[("host", "rebind.example"), chrome, language],
            "rebound-plain",
            403,
        ),
        // A program with a browser's User-Agent (PowerShell) and a name of its own.
        (
            "GET",
            &[
                ("host", "gw.corp"),
                ("user-agent", "Mozilla/5.0 WindowsPowerShell/5.1"),
            ],
            "powershell",
            200,
        ),
        // The listed origin's page loading an image: no Origin, its Referer.
        (
            "GET",
            &[
                ("sec-fetch-site", "cross-site"),
                ("referer", "https://tool.corp/app"),
            ],
            "listed-image",
            200,
        ),
        // A program naming the proxy's own origin (Python's websocket-client does).
        (
            "GET",
            &[("host", "gw.example"), ("origin", "http://gw.example")],
            "own-origin-program",
            200,
        ),
        // A browser under a name some route is for.
        (
            "GET",
            &[("host", "portal.test"), chrome, language],
            "route-host",
            200,
        ),
        // Another site's page over plain http://: its Referer gives it away.
        (
            "GET",
            &[chrome, language, ("referer", "http://evil.example/page")],
            "referred",
            403,
        ),
    ];
    for (method, fields, name, want) in cases {
        let method: http::Method = method.parse().unwrap();
        let host = fields.iter().find(|(f, _)| *f == "host").map(|(_, v)| *v);
        let mut request = match (host, on.version()) {
            // h2 names the host in `:authority` (a `Host` naming another is refused).
            (Some(host), http::Version::HTTP_2) => {
                // No port in the URL: the name resolves to the proxy's address and port.
                let url = on
                    .url(&proxy, &format!("/{name}"))
                    .replace(&proxy.addr.to_string(), host);
                on.client_naming(host, &proxy).request(method, url)
            }
            _ => client.request(method, on.url(&proxy, &format!("/{name}"))),
        };
        for (field, value) in fields {
            if on.version() == http::Version::HTTP_2 && *field == "host" {
                continue;
            }
            request = request.header(*field, *value);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), want, "{name}");
        if want == 403 {
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"], "forbidden", "{name}");
        }
    }
    let seen: Vec<String> = upstream.seen().into_iter().map(|r| r.target).collect();
    assert_eq!(
        seen,
        [
            "/plain",
            "/address-bar",
            "/listed",
            "/own",
            "/localhost",
            "/powershell",
            "/listed-image",
            "/own-origin-program",
            "/route-host"
        ]
    );
    // The admin listener (on loopback): a browser under a rebound name cannot read it, a
    // program under any name can.
    let status = |fields: &'static [(&'static str, &'static str)]| {
        let mut request = client
            .get(proxy.admin_url("/status"))
            .header("host", "rebind.example");
        for (field, value) in fields {
            request = request.header(*field, *value);
        }
        request
    };
    assert_eq!(
        status(&[
            ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/156"),
            ("accept-language", "en-US")
        ])
        .send()
        .await
        .unwrap()
        .status(),
        403
    );
    assert_eq!(status(&[]).send().await.unwrap().status(), 200);
    // Another site's page cannot reload the config.
    let r = client
        .post(proxy.admin_url("/reload"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Without it the request reaches the reload (which finds no file behind this test's
    // config: 400).
    let r = client
        .post(proxy.admin_url("/reload"))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["reloaded"], false, "{body}");
}

/// On every transport, a client connection with no request under way is closed once
/// `header_read_timeout` has passed (for h2, with GOAWAY), so idle or half-opened connections
/// cannot hold the `max_connections` slots for good; a request whose answer takes longer
/// than that is not cut, and its connection stays open for the next one.
async fn an_idle_client_connection_is_closed_after_header_read_timeout(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::with(|seen| {
        if seen.target != "/slow" {
            return json_response(200, r#"{"ok":true}"#, &[]);
        }
        // The head at once, the body after 1.5 s.
        let later = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok::<_, egain_proxy::BoxError>(hyper::body::Frame::data(bytes::Bytes::from_static(
                b"late",
            )))
        });
        http::Response::new(http_body_util::StreamBody::new(later).boxed())
    })
    .await;
    let proxy = TestProxy::start(&format!(
        "{}{}{}",
        on.head_with("header_read_timeout = \"1s\"\n"),
        client_app_profile("p", &tokens, ""),
        route("r", "/", &upstream.url(), "p", "")
    ))
    .await;
    proxy.ready().await;
    let mut conn = on.connect(&proxy).await;
    assert_eq!(conn.get("/slow").await, 200);
    assert_eq!(conn.get("/quick").await, 200, "closed during a slow answer");
    let idle = std::time::Instant::now();
    assert!(
        conn.closed_within(Duration::from_secs(4)).await,
        "an idle connection was kept"
    );
    assert!(
        idle.elapsed() >= Duration::from_millis(800),
        "{:?}",
        idle.elapsed()
    );
}

/// An h2c client that sends its preface and then nothing, not even the acknowledgements h2's
/// graceful close waits for (a SETTINGS ack, a PING answer), is still closed: after
/// `header_read_timeout` idle, and as long again for the close.
#[tokio::test]
async fn a_silent_h2_client_connection_is_closed() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{HEAD}header_read_timeout = \"1s\"\n{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    // The preface and an empty SETTINGS frame (RFC 9113 §3.4, §6.5).
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a silent h2 client was kept");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
}

/// The next h2 frame on `stream`: its type, stream id and payload; `None` at the end.
async fn h2_frame(stream: &mut TcpStream) -> Option<(u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[3], id, payload))
}

/// An h2c client that opens a stream just as the proxy's idle GOAWAY reaches it gets its
/// answer. The first GOAWAY of a graceful close names the highest stream id (RFC 9113 §6.8),
/// so a stream already on its way is taken, and the connection is dropped only once nothing
/// has been under way for `header_read_timeout` again (it was dropped at once, before the
/// stream arrived).
#[tokio::test]
async fn a_stream_opened_as_the_idle_goaway_arrives_is_answered() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{HEAD}header_read_timeout = \"1s\"\n{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    // The preface and an empty SETTINGS frame (RFC 9113 §3.4, §6.5).
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    const HEADERS: u8 = 0x1;
    const GOAWAY: u8 = 0x7;
    let goaway = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some((kind, _, _)) = h2_frame(&mut stream).await {
            if kind == GOAWAY {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        goaway,
        Ok(true),
        "an idle h2c connection was kept, or closed without GOAWAY"
    );
    // HEADERS on stream 1, END_STREAM | END_HEADERS: GET, http, /, and :authority as a
    // literal (HPACK static table indices 2, 6, 4 and 1; RFC 7541 Appendix A).
    let authority = b"app.local";
    let mut block = vec![0x82, 0x86, 0x84, 0x01, authority.len() as u8];
    block.extend_from_slice(authority);
    let mut frame = (block.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[HEADERS, 0x5, 0, 0, 0, 1]);
    frame.extend_from_slice(&block);
    stream.write_all(&frame).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some((kind, id, payload)) = h2_frame(&mut stream).await {
            if kind == HEADERS && id == 1 {
                return Some(payload);
            }
        }
        None
    })
    .await
    .expect("no answer, and the connection stayed open");
    let answer = answer.expect("the connection closed without answering the stream");
    // `:status: 200` is the static table's entry 8.
    assert_eq!(answer.first(), Some(&0x88), "not a 200: {answer:02x?}");
}

/// An h2 client that vanishes (no FIN, no RST) while its answer streams is found gone by
/// PING (after `header_read_timeout` without a frame from it, and as long again without an
/// answer): its connection closes and the upstream's answer is dropped, long before the
/// route's timeout would end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_h2_client_is_found_gone_and_its_answer_dropped() {
    let tokens = TokenServer::healthy(3600).await;
    let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen_drop = Arc::clone(&dropped);
    let upstream = Upstream::with(move |_| {
        // "start", then nothing more, for good; counts its drop.
        struct Endless(Arc<std::sync::atomic::AtomicUsize>, bool);
        impl http_body::Body for Endless {
            type Data = bytes::Bytes;
            type Error = egain_proxy::BoxError;
            fn poll_frame(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>>
            {
                if self.1 {
                    return std::task::Poll::Pending;
                }
                self.1 = true;
                let start = bytes::Bytes::from_static(b"start");
                std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(start))))
            }
        }
        impl Drop for Endless {
            fn drop(&mut self) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        http::Response::new(Endless(Arc::clone(&seen_drop), false).boxed())
    })
    .await;
    let config = format!(
        "{HEAD}header_read_timeout = \"1s\"\n{}{}",
        client_app_profile("p", &tokens, ""),
        route("r", "/", &upstream.url(), "p", "timeout = \"60s\"")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    let hole = support::blackhole::Blackhole::start(proxy.addr.port()).await;
    let tcp = TcpStream::connect(("127.0.0.1", hole.port)).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("http://app/endless").body(()).unwrap();
    let mut client = client.ready().await.unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let mut body = response.await.unwrap().into_body();
    assert_eq!(body.data().await.unwrap().unwrap(), "start");
    let started = std::time::Instant::now();
    hole.silence();
    eventually(Duration::from_secs(6), || {
        dropped.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
}

/// On every transport, an upload that goes on after the upstream answered (202 at once, the
/// body read meanwhile) is under way, not idle: it is not cut at `header_read_timeout`.
async fn an_upload_after_its_answer_is_not_taken_for_idle(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&received);
    let (addr, _guard) = serve(move |req: http::Request<hyper::body::Incoming>| {
        let counted = Arc::clone(&counted);
        async move {
            let mut body = req.into_body();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = body.frame().await {
                    if let Some(data) = frame.data_ref() {
                        counted.fetch_add(data.len(), std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
            json_response(202, r#"{"accepted":true}"#, &[])
        }
    })
    .await;
    let proxy = TestProxy::start(&format!(
        "{}{}{}",
        on.head_with("header_read_timeout = \"1s\"\n"),
        client_app_profile("p", &tokens, ""),
        route("r", "/", &format!("http://{addr}"), "p", "")
    ))
    .await;
    proxy.ready().await;
    // 24 pieces of 64 KiB, one every 125 ms: 3 s of upload.
    let pieces = futures_util::stream::unfold(0, |i| async move {
        if i == 24 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(125)).await;
        Some((Ok::<_, std::io::Error>(vec![7u8; 64 * 1024]), i + 1))
    });
    let r = on
        .client()
        .post(on.url(&proxy, "/upload"))
        .body(reqwest::Body::wrap_stream(pieces))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually(Duration::from_secs(8), || {
        received.load(std::sync::atomic::Ordering::SeqCst) == 24 * 64 * 1024
    })
    .await;
}

on_every_transport!(
    browser_requests_for_other_sites_are_refused,
    trace_and_miscased_methods_are_refused,
    paths_any_server_reads_as_dot_segments_are_refused,
    too_many_header_fields_are_refused_alike,
    api_keys_and_allow_list,
    an_idle_client_connection_is_closed_after_header_read_timeout,
    an_upload_after_its_answer_is_not_taken_for_idle,
);
