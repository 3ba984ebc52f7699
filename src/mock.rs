//! An embedded mock of eGain, used by `demo`, `mock-egain` and the tests: both token
//! endpoints, validating requests the way eGain documents them, and a small API that accepts
//! only live bearer tokens it issued and answers like eGain when it does not
//! (`{"code":"401-101","developerMessage":"..."}`), refuses a token without the API's scope
//! (`403` with `403-197`), can rate-limit (`429` with `Retry-After` and `X-RateLimit-*`), and
//! accepts WebSocket upgrades (echoing every message) with the same bearer check.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;

pub const DEMO_TENANT: &str = "TDEMO0000001";
pub const DEMO_CLIENT_ID: &str = "demo-client-app";
pub const DEMO_CLIENT_SECRET: &str = "demo-client-app-secret";
pub const DEMO_ANON_CLIENT_ID: &str = "demo-anonymous-client";
pub const DEMO_ANON_CLIENT_SECRET: &str = "demo-anonymous-secret";
pub const ANON_TOKEN_PATH: &str = "/core/authmgr/v3/oauth2/v2.0/anonymous/token";
pub const SCOPE_PREFIX: &str = crate::config::DEFAULT_SCOPE_PREFIX;

/// Path of the client-app token endpoint for `tenant`, as in eGain's client metadata.
pub fn client_app_token_path(tenant: &str) -> String {
    format!("/system/auth/{tenant}-U/oauth2/token")
}

#[derive(Debug, Clone)]
pub struct MockOptions {
    pub tenant: String,
    pub token_ttl: Duration,
    /// (client_id, client_secret) accepted by the client-app endpoint.
    pub client_app: (String, String),
    /// (client_id, client_secret) accepted by the anonymous-customer endpoint.
    pub anonymous: (String, String),
    /// API calls allowed per token per minute; more get eGain's 429. `None`: no limit.
    pub rate_limit_per_minute: Option<u64>,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            tenant: DEMO_TENANT.to_owned(),
            token_ttl: Duration::from_secs(3600),
            client_app: (DEMO_CLIENT_ID.to_owned(), DEMO_CLIENT_SECRET.to_owned()),
            anonymous: (
                DEMO_ANON_CLIENT_ID.to_owned(),
                DEMO_ANON_CLIENT_SECRET.to_owned(),
            ),
            rate_limit_per_minute: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Issued {
    kind: &'static str,
    scopes: Vec<String>,
    expires_at: Instant,
}

#[derive(Default)]
struct State {
    tokens: Mutex<HashMap<String, Issued>>,
    token_requests: AtomicU64,
    api_requests: AtomicU64,
    api_rejections: AtomicU64,
    /// token -> (minute, calls in it), for the rate limit.
    calls: Mutex<HashMap<String, (u64, u64)>>,
    upgrades: AtomicU64,
}

/// A running mock; stops when dropped.
pub struct MockEgain {
    addr: SocketAddr,
    state: Arc<State>,
    options: MockOptions,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockEgain {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockEgain {
    pub async fn start(listen: SocketAddr, options: MockOptions) -> std::io::Result<MockEgain> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let task = tokio::spawn(serve(listener, Arc::clone(&state), options.clone()));
        Ok(MockEgain {
            addr,
            state,
            options,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client_app_token_url(&self) -> String {
        format!(
            "{}{}",
            self.base_url(),
            client_app_token_path(&self.options.tenant)
        )
    }

    /// Without the query: the proxy adds `user_type` and `domain_hint` itself.
    pub fn anonymous_token_url(&self) -> String {
        format!("{}{ANON_TOKEN_PATH}", self.base_url())
    }

    pub fn options(&self) -> &MockOptions {
        &self.options
    }

    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    pub fn api_requests(&self) -> u64 {
        self.state.api_requests.load(Ordering::SeqCst)
    }

    /// WebSocket upgrades accepted.
    pub fn upgrades(&self) -> u64 {
        self.state.upgrades.load(Ordering::SeqCst)
    }

    pub fn api_rejections(&self) -> u64 {
        self.state.api_rejections.load(Ordering::SeqCst)
    }

    /// Revokes every issued token, as eGain does when a client secret is rotated.
    pub fn revoke_all(&self) {
        self.state
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

async fn serve(listener: TcpListener, state: Arc<State>, options: MockOptions) {
    let options = Arc::new(options);
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let state = Arc::clone(&state);
        let options = Arc::clone(&options);
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                let options = Arc::clone(&options);
                async move { Ok::<_, Infallible>(route(req, &state, &options).await) }
            });
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

type MockResponse = Response<Full<Bytes>>;

fn json(status: StatusCode, body: serde_json::Value) -> MockResponse {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, "application/json".parse().expect("static"));
    r
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> MockResponse {
    json(
        status,
        json!({ "error": error, "error_description": description }),
    )
}

async fn route(req: Request<Incoming>, state: &State, options: &MockOptions) -> MockResponse {
    let path = req.uri().path().to_owned();
    if path == client_app_token_path(&options.tenant) {
        token(req, state, options, "client_app").await
    } else if path == ANON_TOKEN_PATH {
        token(req, state, options, "anonymous_customer").await
    } else {
        api(req, state, options).await
    }
}

async fn token(
    req: Request<Incoming>,
    state: &State,
    options: &MockOptions,
    kind: &'static str,
) -> MockResponse {
    state.token_requests.fetch_add(1, Ordering::SeqCst);
    if req.method() != Method::POST {
        return oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the token endpoint accepts POST only",
        );
    }
    let form_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded",
        );
    }
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    if kind == "anonymous_customer" {
        if query.get("user_type").map(String::as_str) != Some("customer") {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "user_type=customer is required",
            );
        }
        if query.get("domain_hint") != Some(&options.tenant) {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "domain_hint must be the tenant id",
            );
        }
    }
    let basic = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_basic);
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "unreadable body",
            )
        }
    };
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be client_credentials",
        );
    }
    let (id, secret) = match (basic, form.get("client_id"), form.get("client_secret")) {
        (Some(pair), None, None) => pair,
        (None, Some(id), Some(secret)) => (id.clone(), secret.clone()),
        _ => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client credentials missing or sent twice",
            )
        }
    };
    let expected = if kind == "client_app" {
        &options.client_app
    } else {
        &options.anonymous
    };
    if id != expected.0 || secret != expected.1 {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    let scopes: Vec<String> = form
        .get("scope")
        .map(|s| {
            s.split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if scopes.is_empty() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "scope is required",
        );
    }
    if kind == "anonymous_customer" && scopes.iter().any(|s| !s.starts_with(SCOPE_PREFIX)) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "anonymous scopes must be prefixed with https://api.ai.egain.cloud/auth/",
        );
    }
    let token = format!(
        "mock-{}-{:032x}",
        if kind == "client_app" { "app" } else { "anon" },
        rand::random::<u128>()
    );
    state
        .tokens
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            token.clone(),
            Issued {
                kind,
                scopes: scopes.clone(),
                expires_at: Instant::now() + options.token_ttl,
            },
        );
    json(
        StatusCode::OK,
        json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": options.token_ttl.as_secs(),
            "scope": scopes.join(" "),
        }),
    )
}

fn parse_basic(header: &str) -> Option<(String, String)> {
    let b64 = header.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (id, secret) = raw.split_once(':')?;
    let dec = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((dec(id)?, dec(secret)?))
}

fn egain_401(state: &State, message: &str) -> MockResponse {
    state.api_rejections.fetch_add(1, Ordering::SeqCst);
    json(
        StatusCode::UNAUTHORIZED,
        json!({ "code": "401-101", "developerMessage": message }),
    )
}

async fn api(mut req: Request<Incoming>, state: &State, options: &MockOptions) -> MockResponse {
    state.api_requests.fetch_add(1, Ordering::SeqCst);
    let bearer = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let Some(token) = bearer else {
        return egain_401(
            state,
            "Authorization header with a bearer token is required.",
        );
    };
    let issued = state
        .tokens
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&token)
        .cloned();
    let Some(issued) = issued else {
        return egain_401(state, "The access token is invalid or has been revoked.");
    };
    if Instant::now() >= issued.expires_at {
        return egain_401(state, "The access token has expired.");
    }
    if let Some(needed) = required_scope(req.uri().path()) {
        if !issued.scopes.iter().any(|s| s.contains(&needed)) {
            return json(
                StatusCode::FORBIDDEN,
                json!({
                    "code": "403-197",
                    "developerMessage": format!("The scope required for this API ({needed}) is not assigned to the client application."),
                }),
            );
        }
    }
    let mut limit_headers = Vec::new();
    if let Some(limit) = options.rate_limit_per_minute {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let minute = now / 60;
        let used = {
            let mut calls = state.calls.lock().unwrap_or_else(|p| p.into_inner());
            let entry = calls.entry(token.clone()).or_insert((minute, 0));
            if entry.0 != minute {
                *entry = (minute, 0);
            }
            entry.1 += 1;
            entry.1
        };
        let reset = std::time::UNIX_EPOCH + Duration::from_secs((minute + 1) * 60);
        limit_headers = vec![
            ("x-ratelimit-limit", limit.to_string()),
            (
                "x-ratelimit-remaining",
                limit.saturating_sub(used).to_string(),
            ),
            (
                "x-ratelimit-reset",
                humantime::format_rfc3339_seconds(reset).to_string(),
            ),
        ];
        if used > limit {
            let mut r = json(
                StatusCode::TOO_MANY_REQUESTS,
                json!({ "code": "429", "developerMessage": "Too many requests: the rate limit for this client is exceeded." }),
            );
            limit_headers.push(("retry-after", ((minute + 1) * 60 - now).max(1).to_string()));
            add_headers(&mut r, &limit_headers);
            return r;
        }
    }
    if is_websocket(&req) {
        return websocket(&mut req, state, &issued);
    }
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let method = req.method().to_string();
    let body_len = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let mut response = api_answer(&path, query, &method, body_len, &issued);
    add_headers(&mut response, &limit_headers);
    response
}

fn api_answer(
    path: &str,
    query: Option<String>,
    method: &str,
    body_len: usize,
    issued: &Issued,
) -> MockResponse {
    if path.ends_with("/portals") && method == "GET" {
        return json(
            StatusCode::OK,
            json!({ "portal": [
                { "id": "PROD-1000", "name": "Demo Support Portal", "language": "en-US" },
                { "id": "PROD-1001", "name": "Demo Partner Portal", "language": "en-US" },
            ]}),
        );
    }
    json(
        StatusCode::OK,
        json!({
            "mock": "egain",
            "method": method,
            "path": path,
            "query": query,
            "token_kind": issued.kind,
            "scopes": issued.scopes,
            "body_bytes": body_len,
        }),
    )
}

fn add_headers(response: &mut MockResponse, headers: &[(&'static str, String)]) {
    for (name, value) in headers {
        if let Ok(v) = http::HeaderValue::from_str(value) {
            response.headers_mut().insert(*name, v);
        }
    }
}

/// The scope an API path needs, as eGain names them: `/knowledge/portalmgr/...` needs a
/// `knowledge.portalmgr.*` scope. Other paths need none.
fn required_scope(path: &str) -> Option<String> {
    let mut segments = path.trim_start_matches('/').split('/');
    let family = segments.next()?;
    let module = segments.next()?;
    let known = matches!(family, "knowledge" | "core") && !module.is_empty();
    known.then(|| format!("{family}.{module}"))
}

fn is_websocket(req: &Request<Incoming>) -> bool {
    let has = |name: http::header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    has(http::header::CONNECTION, "upgrade") && has(http::header::UPGRADE, "websocket")
}

/// Accepts a WebSocket handshake (RFC 6455 §4.2) and echoes every text and binary message;
/// the first message it sends says which token kind it saw.
fn websocket(req: &mut Request<Incoming>, state: &State, issued: &Issued) -> MockResponse {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, protocol::Role, Message};
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return json(
            StatusCode::BAD_REQUEST,
            json!({ "code": "400", "developerMessage": "Sec-WebSocket-Key is required." }),
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    state.upgrades.fetch_add(1, Ordering::SeqCst);
    let hello = json!({ "mock": "egain-chat", "token_kind": issued.kind }).to_string();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        if ws.send(Message::text(hello)).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = ws.next().await {
            let echo = match message {
                Message::Text(_) | Message::Binary(_) => message,
                // tungstenite answers a Close (and a Ping) itself, on the next poll; the
                // stream ends once the closing handshake is done.
                _ => continue,
            };
            if ws.send(echo).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    response
}
