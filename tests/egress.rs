//! Egress proxies (contract §12) against a real forward proxy, Debian's tinyproxy: token
//! requests and upstream calls through CONNECT tunnels (TLS end to end, checked against the
//! upstream's name), the fast path's pool through the same tunnels and keyed apart,
//! `NO_PROXY` and `"none"`, proxy credentials, and credentials kept out of logs and `/status`.
//!
//! tinyproxy opens its outgoing connections from 127.0.0.2, so the recording upstreams here
//! see which way each request came: 127.0.0.2 through the proxy, 127.0.0.1 direct. The
//! environment reaches in-process proxies through the config's look-up function (never the
//! process's own, which parallel tests share), and the real binary gets real variables.

mod support;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use egain_proxy::Config;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use support::binary::{Running, PROXY_VARS};
use support::tinyproxy::{Tinyproxy, VIA_PROXY};
use support::tls::TestCa;
use support::*;

const DIRECT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// One request as a recording upstream saw it.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    /// 127.0.0.2: through tinyproxy; 127.0.0.1: direct.
    peer: IpAddr,
    authorization: Option<String>,
    version: http::Version,
}

/// An upstream (plain, or TLS with h2 and http/1.1 by ALPN) that records each request with
/// the address it came from. `/oauth2/token` answers with a token, anything else with 200.
#[derive(Clone)]
struct Recorder {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    _guard: Arc<AbortOnDrop>,
}

impl Recorder {
    async fn plain() -> Recorder {
        Recorder::start(None).await
    }

    async fn tls(cert: &str, key: &str) -> Recorder {
        let config = egain_proxy::tls::server_config(cert.as_ref(), key.as_ref()).unwrap();
        Recorder::start(Some(tokio_rustls::TlsAcceptor::from(config))).await
    }

    async fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&hits);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let hits = Arc::clone(&sink);
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_conn(stream, peer.ip(), hits).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve_conn(stream, peer.ip(), hits).await
                            }
                        }
                    }
                });
            }
        });
        Recorder {
            addr,
            hits,
            _guard: Arc::new(AbortOnDrop(task)),
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Where each request for a path under `prefix` came from, in order.
    fn peers(&self, prefix: &str) -> Vec<IpAddr> {
        self.hits()
            .iter()
            .filter(|h| h.path.starts_with(prefix))
            .map(|h| h.peer)
            .collect()
    }
}

async fn serve_conn<IO>(io: IO, peer: IpAddr, hits: Arc<Mutex<Vec<Hit>>>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let hits = Arc::clone(&hits);
        async move {
            let path = req.uri().path().to_owned();
            hits.lock().unwrap().push(Hit {
                path: path.clone(),
                peer,
                authorization: req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                version: req.version(),
            });
            let body = if path.starts_with("/oauth2/token") {
                r#"{"access_token":"egress-token","token_type":"Bearer","expires_in":3600}"#
            } else {
                r#"{"ok":true}"#
            };
            Ok::<_, Infallible>(json_response(200, body, &[]))
        }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// A proxy from `toml` with `env` as its environment.
async fn start(toml: &str, env: &[(&str, String)]) -> TestProxy {
    TestProxy::start_config(parse(toml, env), None).await
}

fn parse(toml: &str, env: &[(&str, String)]) -> Config {
    let lookup = |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
    Config::parse(toml, std::path::Path::new("."), &lookup)
        .unwrap_or_else(|e| panic!("test config: {e}"))
}

/// The proxy's own error for `path`: status and JSON body.
async fn error_for(client: &reqwest::Client, url: String) -> (u16, Value) {
    let r = client.get(url).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn tls_profile(name: &str, port: u16, ca_file: &str, extra: &str) -> String {
    format!(
        "[profiles.{name}]\nkind = \"client_app\"\ntoken_url = \"https://localhost:{port}/oauth2/token\"\n\
         client_id = \"id\"\nclient_secret = \"secret\"\nca_file = \"{ca_file}\"\n{extra}\n"
    )
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_token_request_and_upstream_call_go_through_connect_with_end_to_end_tls() {
    let tinyproxy = Tinyproxy::start();
    let ca = TestCa::new();
    // Valid for `localhost` only: the tunnel's far end must be verified by the upstream's
    // name, never by the proxy's address (127.0.0.1).
    let (cert, key) = ca.leaf_for("upstream", &["localhost"]);
    let tokens = Recorder::tls(&cert, &key).await;
    let upstream = Recorder::tls(&cert, &key).await;
    let ca_file = ca.ca_file();
    let config = format!(
        "{HEAD}{}{}{}",
        tls_profile("portal", tokens.port(), &ca_file, ""),
        route(
            "by-address",
            "/by-address",
            &format!("https://127.0.0.1:{}", upstream.port()),
            "none",
            &format!("ca_file = \"{ca_file}\"")
        ),
        route(
            "r",
            "/",
            &format!("https://localhost:{}", upstream.port()),
            "portal",
            &format!("ca_file = \"{ca_file}\"")
        ),
    );
    // Upper-case HTTPS_PROXY, as most deployments set it.
    let proxy = start(&config, &[("HTTPS_PROXY", tinyproxy.url())]).await;
    proxy.ready().await;

    let client = client();
    assert_eq!(status(client.get(proxy.url("/knowledge/x"))).await, 200);
    let hit = upstream.hits().pop().expect("the upstream saw the request");
    assert_eq!(hit.authorization.as_deref(), Some("Bearer egress-token"));
    assert_eq!(hit.version, http::Version::HTTP_2, "ALPN inside the tunnel");
    assert_eq!(
        hit.peer, VIA_PROXY,
        "the upstream call came through tinyproxy"
    );
    assert_eq!(
        tokens.peers("/oauth2/token"),
        [VIA_PROXY],
        "so did the token request"
    );
    assert_eq!(
        tinyproxy.connects_to(&format!("localhost:{}", tokens.port())),
        1
    );
    assert_eq!(
        tinyproxy.connects_to(&format!("localhost:{}", upstream.port())),
        1
    );

    // The tunnel opens, but the certificate does not name 127.0.0.1: verification is on.
    let (code, body) = error_for(&client, proxy.url("/by-address")).await;
    assert_eq!(code, 502, "{body}");
    let message = body["message"].as_str().unwrap().to_lowercase();
    assert!(message.contains("certificate"), "{message}");
    assert_eq!(
        tinyproxy.connects_to(&format!("127.0.0.1:{}", upstream.port())),
        1
    );

    let status = proxy.status_json().await;
    assert_eq!(status["routes"][1]["egress_proxy"], tinyproxy.url());
    assert_eq!(status["routes"][1]["egress_from"], "HTTPS_PROXY");
    assert_eq!(
        status["profiles"]["portal"]["egress_proxy"],
        tinyproxy.url()
    );
    assert_eq!(status["egress_proxy"]["NO_PROXY"], "not set");
}

async fn plain_http_upstreams_go_through_a_pooled_tunnel(on: support::transport::On) {
    let tinyproxy = Tinyproxy::start();
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Recorder::plain().await;
    let proxy = on
        .proxy(&format!(
            "{}{}",
            client_app_profile("portal", &tokens, ""),
            route(
                "r",
                "/",
                &format!("http://127.0.0.1:{}", upstream.port()),
                "portal",
                &format!("egress_proxy = \"{}\"", tinyproxy.url())
            )
        ))
        .await;
    proxy.ready().await;
    let client = on.client();
    for i in 0..3 {
        let r = client.get(on.url(&proxy, &format!("/{i}"))).send().await;
        assert_eq!(r.unwrap().status(), 200);
    }
    let hits = upstream.hits();
    assert_eq!(hits.len(), 3);
    for hit in &hits {
        assert_eq!(hit.peer, VIA_PROXY, "{hit:?}");
        assert!(tokens.is_live(hit.authorization.as_deref()), "{hit:?}");
    }
    // One tunnel, kept alive and reused by the pool (the fast path's, or hyper's).
    assert_eq!(
        tinyproxy.connects_to(&format!("127.0.0.1:{}", upstream.port())),
        1,
        "{:?}",
        tinyproxy.requests()
    );
}

on_every_transport!(plain_http_upstreams_go_through_a_pooled_tunnel);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_pool_never_mixes_tunnels_and_direct_connections() {
    let tinyproxy = Tinyproxy::start();
    let upstream = Recorder::plain().await;
    let url = format!("http://127.0.0.1:{}", upstream.port());
    // One upstream authority, three ways to reach it: through the proxy, direct, and
    // through the proxy with other credentials (tinyproxy without BasicAuth ignores them).
    let config = format!(
        "{HEAD}{}{}{}",
        route(
            "a",
            "/a",
            &url,
            "none",
            &format!("egress_proxy = \"{}\"", tinyproxy.url())
        ),
        route("b", "/b", &url, "none", "egress_proxy = \"none\""),
        route(
            "c",
            "/c",
            &url,
            "none",
            &format!("egress_proxy = \"{}\"", tinyproxy.url_with("u", "other"))
        ),
    );
    let proxy = start(&config, &[("HTTP_PROXY", tinyproxy.url())]).await;
    // One keep-alive client connection on the fast path; each answer returns its upstream
    // connection to the pool before the next request takes one.
    let client = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .build()
        .unwrap();
    for path in ["/a", "/b", "/a", "/b", "/c", "/b", "/a", "/c"] {
        assert_eq!(status(client.get(proxy.url(path))).await, 200, "{path}");
    }
    assert_eq!(upstream.peers("/a"), [VIA_PROXY; 3]);
    assert_eq!(upstream.peers("/b"), [DIRECT; 3]);
    assert_eq!(upstream.peers("/c"), [VIA_PROXY; 2]);
    // One tunnel per egress setting, each reused.
    assert_eq!(
        tinyproxy.connects_to(&format!("127.0.0.1:{}", upstream.port())),
        2,
        "{:?}",
        tinyproxy.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_and_none_bypass_the_proxy_loopback_does_not_and_reload_applies() {
    let tinyproxy = Tinyproxy::start();
    let tokens = TokenServer::healthy(3600).await;
    let up1 = Recorder::plain().await;
    let up2 = Recorder::plain().await;
    let config = |r1: &str, r3: &str| {
        format!(
            "{HEAD}{}{}{}{}",
            client_app_profile("portal", &tokens, ""),
            route(
                "one",
                "/one",
                &format!("http://127.0.0.1:{}", up1.port()),
                "portal",
                r1
            ),
            route(
                "two",
                "/two",
                &format!("http://127.0.0.1:{}", up2.port()),
                "portal",
                "egress_proxy = \"none\""
            ),
            route(
                "three",
                "/three",
                &format!("http://127.0.0.1:{}", up2.port()),
                "portal",
                r3
            ),
        )
    };
    let env = [
        ("HTTP_PROXY", tinyproxy.url()),
        // Lower-case wins: NO_PROXY=* would exempt everything.
        ("NO_PROXY", "*".to_owned()),
        (
            "no_proxy",
            format!(
                "example.corp, 127.0.0.1:{}, 127.0.0.1:{}",
                up1.port(),
                tokens.addr.port()
            ),
        ),
    ];
    let proxy = start(&config("", ""), &env).await;
    proxy.ready().await;
    let client = client();
    for path in ["/one", "/two", "/three"] {
        assert_eq!(status(client.get(proxy.url(path))).await, 200, "{path}");
    }
    assert_eq!(
        up1.peers("/one"),
        [DIRECT],
        "exempt by no_proxy (with its port)"
    );
    assert_eq!(up2.peers("/two"), [DIRECT], "egress_proxy = \"none\"");
    assert_eq!(
        up2.peers("/three"),
        [VIA_PROXY],
        "a loopback upstream is not exempt"
    );
    // Nothing else went through the proxy: not the exempt route, not the token request.
    assert_eq!(
        tinyproxy.requests(),
        [format!("CONNECT 127.0.0.1:{} HTTP/1.1", up2.port())]
    );
    let shown = proxy.status_json().await;
    let routes = &shown["routes"];
    assert_eq!(routes[0]["egress_proxy"], "direct");
    assert_eq!(
        routes[0]["egress_from"],
        format!("no_proxy (\"127.0.0.1:{}\")", up1.port())
    );
    assert_eq!(
        routes[1]["egress_from"],
        "routes[1].egress_proxy = \"none\""
    );
    assert_eq!(routes[2]["egress_proxy"], tinyproxy.url());
    assert_eq!(routes[2]["egress_from"], "HTTP_PROXY");
    assert_eq!(shown["profiles"]["portal"]["egress_proxy"], "direct");

    // Reload: the setting wins over no_proxy for route one, and route three goes direct.
    let next = parse(
        &config(
            &format!("egress_proxy = \"{}\"", tinyproxy.url()),
            "egress_proxy = \"none\"",
        ),
        &env,
    );
    proxy.shared.install(next).await.unwrap();
    for path in ["/one", "/three"] {
        assert_eq!(status(client.get(proxy.url(path))).await, 200, "{path}");
    }
    assert_eq!(up1.peers("/one"), [DIRECT, VIA_PROXY]);
    assert_eq!(up2.peers("/three"), [VIA_PROXY, DIRECT]);
    assert_eq!(tokens.count(), 1, "the profile's token survived the reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_credentials_work_and_wrong_or_missing_ones_get_a_clear_answer() {
    const PASSWORD: &str = "Pr0xy-Secret";
    const WRONG: &str = "Wr0ng-Secret";
    let tinyproxy = Tinyproxy::with_basic_auth("egress", PASSWORD);
    let ca = TestCa::new();
    let (cert, key) = ca.leaf_for("tokens", &["localhost"]);
    let tokens = Recorder::tls(&cert, &key).await;
    let upstream = Recorder::plain().await;
    let ca_file = ca.ca_file();
    let up = format!("http://127.0.0.1:{}", upstream.port());
    let port = tinyproxy.port;
    let good = format!("egress_proxy = \"http://egress:${{PROXY_PASS}}@127.0.0.1:{port}\"");
    let wrong = format!("egress_proxy = \"http://egress:{WRONG}@127.0.0.1:{port}\"");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // An http:// token URL: forwarded in absolute form, refused by tinyproxy with a 401.
    let refused_http = format!(
        "[profiles.refused_http]\nkind = \"client_app\"\ntoken_url = \"http://127.0.0.1:{}/oauth2/token\"\n\
         client_id = \"id\"\nclient_secret = \"secret\"\n{wrong}\n{}",
        upstream.port(),
        route("refused_http", "/refused-http", &up, "refused_http", "")
    );
    let config = format!(
        "{HEAD}{}{}{}{}{}{}{}{}",
        tls_profile("portal", tokens.port(), &ca_file, &good),
        tls_profile("refused", tokens.port(), &ca_file, &wrong),
        route("ok", "/ok", &up, "portal", &good),
        route("wrong", "/wrong", &up, "none", &wrong),
        route(
            "missing",
            "/missing",
            &up,
            "none",
            &format!("egress_proxy = \"{}\"", tinyproxy.url())
        ),
        route(
            "down",
            "/down",
            &up,
            "none",
            &format!("egress_proxy = \"http://127.0.0.1:{closed}\"")
        ),
        route("refused", "/refused", &up, "refused", ""),
        refused_http,
    );
    let proxy = start(&config, &[("PROXY_PASS", PASSWORD.to_owned())]).await;
    let client = client();

    // The right credentials: the token request and the upstream call both tunnel.
    assert_eq!(status(client.get(proxy.url("/ok"))).await, 200);
    assert_eq!(tokens.peers("/oauth2/token"), [VIA_PROXY]);
    let hit = upstream.hits().pop().unwrap();
    assert_eq!(
        (hit.peer, hit.authorization.as_deref()),
        (VIA_PROXY, Some("Bearer egress-token"))
    );

    let shown = format!("http://egress:***@127.0.0.1:{port}");
    let target = format!("127.0.0.1:{}", upstream.port());
    let (code, body) = error_for(&client, proxy.url("/wrong")).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (502, Some("upstream_unreachable"))
    );
    let message = body["message"].as_str().unwrap();
    // tinyproxy answers wrong credentials with 401 (and none with 407).
    assert!(
        message.contains(&format!(
            "the egress proxy {shown} refused CONNECT {target}: 401 Unauthorized"
        )) && message.contains("did not accept the credentials"),
        "{message}"
    );
    let (code, body) = error_for(&client, proxy.url("/missing")).await;
    let message = body["message"].as_str().unwrap();
    assert_eq!(code, 502);
    assert!(
        message.contains(&format!(
            "the egress proxy {} refused CONNECT",
            tinyproxy.url()
        )) && message.contains("407")
            && message.contains("requires credentials"),
        "{message}"
    );
    let (code, body) = error_for(&client, proxy.url("/down")).await;
    let message = body["message"].as_str().unwrap();
    assert_eq!(code, 502);
    assert!(
        message.contains(&format!(
            "cannot connect to the egress proxy http://127.0.0.1:{closed}"
        )),
        "{message}"
    );
    // The token request refused by the proxy: 503 naming the proxy and its answer.
    let (code, body) = error_for(&client, proxy.url("/refused")).await;
    let message = body["message"].as_str().unwrap();
    assert_eq!(
        (code, body["error"].as_str()),
        (503, Some("token_unavailable")),
        "{body}"
    );
    assert!(
        message.contains(&format!(
            "the egress proxy {shown} refused CONNECT localhost:{}: 401",
            tokens.port()
        )) && message.contains("did not accept the credentials"),
        "{message}"
    );

    let (code, body) = error_for(&client, proxy.url("/refused-http")).await;
    let message = body["message"].as_str().unwrap();
    assert_eq!(code, 503, "{body}");
    // Named either from the answer (a 401 that is no OAuth error) or, when the proxy closed
    // before the request was sent, by asking it again.
    assert!(
        message.contains(&format!("the egress proxy {shown}"))
            && message.contains("401")
            && message.contains("did not accept the credentials"),
        "{message}"
    );

    let metrics = proxy.metrics_text().await;
    for route in ["wrong", "missing", "down"] {
        let line =
            format!("egain_proxy_upstream_errors_total{{route=\"{route}\",kind=\"connect\"}} 1");
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }

    // Neither password, nor its Basic encoding, anywhere in /status; the URL is shown masked.
    let status = client
        .get(proxy.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_no_credentials(&status, "egress", &[PASSWORD, WRONG]);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["routes"][0]["egress_proxy"], shown);
    assert_eq!(status["profiles"]["portal"]["egress_proxy"], shown);
    assert_eq!(
        status["profiles"]["portal"]["egress_from"],
        "profiles.portal.egress_proxy"
    );
}

/// `text` holds none of `passwords`, in clear or as `user:password` in base64.
fn assert_no_credentials(text: &str, user: &str, passwords: &[&str]) {
    for password in passwords {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        for secret in [password.to_string(), basic] {
            let at = text.find(&secret);
            assert!(
                at.is_none(),
                "{secret:?} leaked: …{}…",
                &text[at.unwrap_or(0).saturating_sub(200)..(at.unwrap_or(0) + 200).min(text.len())]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary, with real environment variables

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_follows_proxy_variables_and_never_logs_the_credentials_even_at_trace() {
    const PASSWORD: &str = "Env-Pr0xy-Secret";
    const WRONG: &str = "Wr0ng-Env-Secret";
    let tinyproxy = Tinyproxy::with_basic_auth("egress", PASSWORD);
    let ca = TestCa::new();
    let (cert, key) = ca.leaf_for("upstream", &["localhost"]);
    let tokens = Recorder::tls(&cert, &key).await;
    let secure = Recorder::tls(&cert, &key).await;
    let plain = Recorder::plain().await;
    let ca_file = ca.ca_file();
    let port = tinyproxy.port;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n{}{}{}{}",
        tls_profile("portal", tokens.port(), &ca_file, ""),
        route("secure", "/secure", &format!("https://localhost:{}", secure.port()), "portal", &format!("ca_file = \"{ca_file}\"")),
        route("plain", "/plain", &format!("http://127.0.0.1:{}", plain.port()), "portal", ""),
        route(
            "wrong",
            "/wrong",
            &format!("http://127.0.0.1:{}", plain.port()),
            "none",
            &format!("egress_proxy = \"http://egress:{WRONG}@127.0.0.1:{port}\"")
        ),
    );
    let with_password = format!("http://egress:{PASSWORD}@127.0.0.1:{port}");
    let proc = Running::start(
        &config,
        &[
            ("RUST_LOG", "trace"),
            ("HTTPS_PROXY", &with_password),
            // Lower-case wins over upper-case: this is the one http:// upstreams use.
            ("HTTP_PROXY", "http://127.0.0.1:1"),
            ("http_proxy", &with_password),
        ],
    );
    let addr = proc.addr("proxy listening").await;
    let admin = proc.addr("admin listening").await;
    let client = client();
    eventually(Duration::from_secs(10), || !tokens.hits().is_empty()).await;
    for path in ["/secure", "/plain"] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // The first request may wait for the token.
        while status(client.get(format!("http://{addr}{path}"))).await != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "{path}\n{}",
                proc.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(tokens.peers("/oauth2/token")[0], VIA_PROXY);
    assert_eq!(secure.peers("/secure"), [VIA_PROXY]);
    assert_eq!(plain.peers("/plain"), [VIA_PROXY]);
    assert_eq!(
        tinyproxy.connects_to(&format!("localhost:{}", tokens.port())),
        1
    );
    assert_eq!(
        tinyproxy.connects_to(&format!("localhost:{}", secure.port())),
        1
    );
    assert_eq!(
        tinyproxy.connects_to(&format!("127.0.0.1:{}", plain.port())),
        1
    );
    let r = client
        .get(format!("http://{addr}/wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let text = r.text().await.unwrap();
    assert!(text.contains("did not accept the credentials"), "{text}");

    let status = client
        .get(format!("http://{admin}/status"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        status.contains(&format!(
            "http://egress:***@127.0.0.1:{port} (from HTTPS_PROXY)"
        )),
        "{status}"
    );
    assert_no_credentials(&status, "egress", &[PASSWORD, WRONG]);
    // Every request above is in the logs by now (the access line is written before the
    // answer), at trace level: hyper, rustls, reqwest and the proxy's own.
    let logs = proc.logs().join("\n");
    assert!(logs.contains("\"level\":\"TRACE\""), "trace logging is on");
    assert!(logs.contains("did not accept the credentials"), "{logs}");
    assert_no_credentials(&logs, "egress", &[PASSWORD, WRONG]);
}

#[test]
fn check_shows_the_egress_proxy_masked_and_refuses_what_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let run = |config: &str, env: &[(&str, &str)]| {
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_egain-proxy"));
        cmd.args(["check", "--config", path.to_str().unwrap()]);
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let config = |egress: &str| {
        format!(
            "[profiles.p]\nkind = \"client_app\"\ntoken_url = \"https://t.example/token\"\n\
             client_id = \"i\"\nclient_secret = \"s\"\n\
             [[routes]]\npath_prefix = \"/\"\nupstream = \"https://api.example\"\nprofile = \"p\"\n{egress}\n"
        )
    };
    let (code, out, err) = run(
        &config("egress_proxy = \"http://u:${PASS}@proxy.corp:3128\""),
        &[("PASS", "hunter2"), ("HTTPS_PROXY", "http://envproxy:8080")],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("via http://u:***@proxy.corp:3128 (routes[0].egress_proxy)"),
        "{out}"
    );
    assert!(
        out.contains("via http://envproxy:8080 (HTTPS_PROXY)"),
        "{out}"
    );
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );

    let (code, _, err) = run(
        &config("egress_proxy = \"https://u:hunter2@proxy.corp\""),
        &[],
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("routes[0].egress_proxy: https:// egress proxies") && !err.contains("hunter2"),
        "{err}"
    );
    let (code, _, err) = run(&config(""), &[("https_proxy", "socks5://u:hunter2@s:1080")]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("profiles.p.token_url:")
            && err.contains("https_proxy")
            && !err.contains("hunter2"),
        "{err}"
    );
}

/// A forwarding proxy that refuses an http:// token request with a 401 of its own (an HTML
/// page, as tinyproxy sends for wrong credentials), after reading it whole: the 503 names the
/// proxy and its answer, not "invalid JSON" from a token endpoint that was never reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_proxys_own_401_to_a_token_request_is_named() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _refuser = AbortOnDrop(tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = listener.accept().await {
            // The head, and the form body behind it.
            let _ = support::raw::read_request(&mut s, &mut Vec::new()).await;
            let page = "<html><body><h1>Unauthorized</h1></body></html>";
            let answer = format!(
                "HTTP/1.0 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"proxy\"\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{page}",
                page.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    }));
    let upstream = Recorder::plain().await;
    let config = format!(
        "{HEAD}[profiles.p]\nkind = \"client_app\"\ntoken_url = \"http://127.0.0.1:9/oauth2/token\"\n\
         client_id = \"id\"\nclient_secret = \"secret\"\nclient_auth = \"basic\"\n\
         egress_proxy = \"http://egress:Wr0ng@127.0.0.1:{port}\"\n{}",
        route("r", "/", &format!("http://127.0.0.1:{}", upstream.port()), "p", "")
    );
    let proxy = start(&config, &[]).await;
    let (code, body) = error_for(&client(), proxy.url("/x")).await;
    let message = body["message"].as_str().unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        message.contains(&format!(
            "the egress proxy http://egress:***@127.0.0.1:{port} answered 401 Unauthorized"
        )) && message.contains("did not accept the credentials"),
        "{message}"
    );
    assert!(!message.contains("Wr0ng"), "{message}");
}

/// An egress proxy that opens the tunnel and then closes it: the 502 names the proxy, not
/// only "connection reset" (the wording is the pipeline's, for every transport).
async fn a_tunnel_the_egress_proxy_closes_is_named(on: support::transport::On) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _closer = AbortOnDrop(tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let _ = support::raw::read_request(&mut s, &mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await;
            // Closed as the first request arrives through the tunnel.
            let _ = support::raw::fill(&mut s, &mut buf).await;
        }
    }));
    let proxy = on
        .proxy(&route(
            "r",
            "/",
            "http://127.0.0.1:9",
            "none",
            &format!("egress_proxy = \"http://127.0.0.1:{port}\""),
        ))
        .await;
    let (code, body) = error_for(&on.client(), on.url(&proxy, "/x")).await;
    let message = body["message"].as_str().unwrap();
    assert_eq!(code, 502, "{body}");
    assert!(
        message.contains(&format!("through the egress proxy http://127.0.0.1:{port}")),
        "{message}"
    );
}

on_every_transport!(a_tunnel_the_egress_proxy_closes_is_named);
