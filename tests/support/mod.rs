//! Test builders: a scriptable token server, a recording upstream and a running proxy, all
//! in-process on 127.0.0.1:0.
#![allow(dead_code)]

pub mod binary;
pub mod blackhole;
pub mod browser;
pub mod raw;
pub mod redis_server;
pub mod tinyproxy;
pub mod tls;
pub mod tools;
pub mod transport;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use egain_proxy::{Config, Proxy, ProxyBody};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Serves `handler` on 127.0.0.1:0 (HTTP/1.1 and h2c) until the returned guard drops.
pub async fn serve<F, Fut>(handler: F) -> (SocketAddr, AbortOnDrop)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, AbortOnDrop(task))
}

pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Token server

#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: String,
}

impl TokenRequest {
    pub fn form(&self) -> HashMap<String, String> {
        form_urlencoded::parse(self.body.as_bytes())
            .into_owned()
            .collect()
    }
}

pub enum Reply {
    /// A token with this lifetime (`expires_in` omitted when `None`).
    Token { ttl: Option<u64> },
    /// A raw answer.
    Raw {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Wait this long, then give a token (for timeouts).
    Slow(Duration),
}

pub type Behaviour = Box<dyn Fn(usize) -> Reply + Send + Sync>;
/// A behaviour that reads the request (its form, headers).
pub type RequestBehaviour = Arc<dyn Fn(&TokenRequest) -> Reply + Send + Sync>;

struct TokenState {
    requests: Mutex<Vec<TokenRequest>>,
    behaviour: Mutex<Arc<Behaviour>>,
    by_request: Mutex<Option<RequestBehaviour>>,
    /// token -> expiry, for upstreams that check what they receive.
    issued: Mutex<HashMap<String, Instant>>,
    counter: AtomicUsize,
}

#[derive(Clone)]
pub struct TokenServer {
    pub addr: SocketAddr,
    state: Arc<TokenState>,
    _guard: Arc<AbortOnDrop>,
}

impl TokenServer {
    pub async fn start(behaviour: impl Fn(usize) -> Reply + Send + Sync + 'static) -> TokenServer {
        let state = Arc::new(TokenState {
            requests: Mutex::new(Vec::new()),
            behaviour: Mutex::new(Arc::new(Box::new(behaviour))),
            by_request: Mutex::new(None),
            issued: Mutex::new(HashMap::new()),
            counter: AtomicUsize::new(0),
        });
        let s = Arc::clone(&state);
        let (addr, guard) = serve(move |req: Request<Incoming>| {
            let state = Arc::clone(&s);
            async move { token_reply(&state, req).await }
        })
        .await;
        TokenServer {
            addr,
            state,
            _guard: Arc::new(guard),
        }
    }

    /// Always answers with a token of `ttl` seconds.
    pub async fn healthy(ttl: u64) -> TokenServer {
        TokenServer::start(move |_| Reply::Token { ttl: Some(ttl) }).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_behaviour(&self, behaviour: impl Fn(usize) -> Reply + Send + Sync + 'static) {
        *self.state.behaviour.lock().unwrap() = Arc::new(Box::new(behaviour));
    }

    /// Answers by looking at each request; wins over the numbered behaviour.
    pub fn answer_by_request(
        &self,
        behaviour: impl Fn(&TokenRequest) -> Reply + Send + Sync + 'static,
    ) {
        *self.state.by_request.lock().unwrap() = Some(Arc::new(behaviour));
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Whether `bearer` (the whole header value) is a token this server issued that has
    /// not expired.
    pub fn is_live(&self, authorization: Option<&str>) -> bool {
        let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
            return false;
        };
        self.state
            .issued
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|exp| Instant::now() < *exp)
    }

    pub fn revoke_all(&self) {
        self.state.issued.lock().unwrap().clear();
    }
}

async fn token_reply(state: &TokenState, req: Request<Incoming>) -> Response<ProxyBody> {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let record = TokenRequest {
        at,
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let by_request = state.by_request.lock().unwrap().clone();
    let first = by_request.map(|b| b(&record));
    let n = {
        let mut requests = state.requests.lock().unwrap();
        requests.push(record);
        requests.len() - 1
    };
    let behaviour = Arc::clone(&state.behaviour.lock().unwrap());
    let mut reply = first.unwrap_or_else(|| behaviour(n));
    if let Reply::Slow(d) = reply {
        tokio::time::sleep(d).await;
        reply = Reply::Token { ttl: Some(3600) };
    }
    match reply {
        Reply::Token { ttl } => {
            let id = state.counter.fetch_add(1, Ordering::SeqCst);
            let token = format!("tok-{id}-{:08x}", rand::random::<u32>());
            let lifetime = Duration::from_secs(ttl.unwrap_or(300));
            state
                .issued
                .lock()
                .unwrap()
                .insert(token.clone(), at + lifetime);
            let mut body = serde_json::json!({ "access_token": token, "token_type": "Bearer" });
            if let Some(ttl) = ttl {
                body["expires_in"] = ttl.into();
            }
            json_response(200, &body.to_string(), &[])
        }
        Reply::Raw {
            status,
            headers,
            body,
        } => json_response(status, &body, &headers),
        Reply::Slow(_) => unreachable!(),
    }
}

pub fn json_response(
    status: u16,
    body: &str,
    headers: &[(&'static str, String)],
) -> Response<ProxyBody> {
    let mut r = Response::new(full(body.to_owned()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    for (k, v) in headers {
        r.headers_mut().insert(*k, v.parse().unwrap());
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Upstream

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query exactly as received.
    pub target: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub type UpstreamBehaviour = Arc<dyn Fn(&Seen) -> Response<ProxyBody> + Send + Sync>;

/// Records every request; answers 200 with a small JSON body unless told otherwise.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _guard: Arc<AbortOnDrop>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        Upstream::with(|_| json_response(200, r#"{"ok":true}"#, &[])).await
    }

    pub async fn with(
        behaviour: impl Fn(&Seen) -> Response<ProxyBody> + Send + Sync + 'static,
    ) -> Upstream {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let behaviour: UpstreamBehaviour = Arc::new(behaviour);
        let s = Arc::clone(&seen);
        let (addr, guard) = serve(move |req: Request<Incoming>| {
            let seen = Arc::clone(&s);
            let behaviour = Arc::clone(&behaviour);
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let record = Seen {
                    method: parts.method.to_string(),
                    target: parts
                        .uri
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    version: parts.version,
                    headers: parts.headers,
                    body,
                };
                let response = behaviour(&record);
                seen.lock().unwrap().push(record);
                response
            }
        })
        .await;
        Upstream {
            addr,
            seen,
            _guard: Arc::new(guard),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen()
            .last()
            .cloned()
            .expect("the upstream saw no request")
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy

pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub shared: Arc<egain_proxy::state::Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    pub async fn start(toml: &str) -> TestProxy {
        let config = Config::parse(toml, std::path::Path::new("."), &|_| None)
            .unwrap_or_else(|e| panic!("test config: {e}"));
        TestProxy::start_config(config, None).await
    }

    pub async fn start_config(config: Config, path: Option<std::path::PathBuf>) -> TestProxy {
        let proxy = Proxy::bind(config, path).await.unwrap();
        let addr = proxy.local_addrs()[0];
        let admin = proxy.admin_addr();
        let shared = proxy.shared();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(proxy.run(async move {
            let _ = rx.await;
        }));
        TestProxy {
            addr,
            admin,
            shared,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin.expect("admin listener"))
    }

    /// `GET /status` on the admin listener, parsed.
    pub async fn status_json(&self) -> serde_json::Value {
        client()
            .get(self.admin_url("/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `GET /metrics` on the admin listener.
    pub async fn metrics_text(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until every routed profile has a token.
    pub async fn ready(&self) {
        eventually(Duration::from_secs(10), || {
            self.shared.load().unready_profiles().is_empty()
        })
        .await;
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Polls `check` until it holds, failing the test after `limit`.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `[server]` and `[admin]` on ephemeral loopback ports.
pub const HEAD: &str = "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";

/// The common case: profile `portal` against `tokens`, route `r` for every path to `upstream`.
pub async fn proxy_for(
    tokens: &TokenServer,
    upstream: &Upstream,
    profile_extra: &str,
    route_extra: &str,
) -> TestProxy {
    let config = format!(
        "{HEAD}{}{}",
        client_app_profile("portal", tokens, profile_extra),
        route("r", "/", &upstream.url(), "portal", route_extra)
    );
    TestProxy::start(&config).await
}

/// A client-app profile `name` against `tokens`, and any extra lines.
pub fn client_app_profile(name: &str, tokens: &TokenServer, extra: &str) -> String {
    format!(
        "[profiles.{name}]\nkind = \"client_app\"\ntoken_url = \"{}\"\nclient_id = \"id-{name}\"\nclient_secret = \"secret-{name}\"\nscopes = [\"knowledge.portalmgr.manage\"]\n{extra}\n",
        tokens.url("/oauth2/token")
    )
}

pub fn route(name: &str, prefix: &str, upstream: &str, profile: &str, extra: &str) -> String {
    format!("[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\nprofile = \"{profile}\"\n{extra}\n")
}

/// Sends `request` and returns the status code.
pub async fn status(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.unwrap().status().as_u16()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Twice asks `url` for an answer whose body stalls after its head, and asserts each body
/// ends as broken (never as a whole body), no sooner than `timeout` (the route's) and within
/// 10 s, and that the upstream saw its exchange end (`ended` counts those).
pub async fn expect_stalled_bodies_cut(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    ended: impl Fn() -> usize,
) {
    for n in 1..=2 {
        let started = Instant::now();
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let body = tokio::time::timeout(Duration::from_secs(10), r.bytes())
            .await
            .expect("the stalled body ends");
        assert!(body.is_err(), "a cut body must not look whole: {body:?}");
        let waited = started.elapsed();
        assert!(waited >= timeout, "{waited:?}");
        eventually(Duration::from_secs(5), || ended() == n).await;
    }
}
