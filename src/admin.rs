//! The admin listener: `/` (the HTML page), `/healthz`, `/readyz`, `/metrics`, `/status`,
//! `POST /reload`. Never served on the proxy listener.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::{full, json_response};
use crate::metrics::ProfileLabels;
use crate::state::Shared;
use crate::token::cache::Health;
use crate::ProxyBody;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The same slow-client guard as the proxy listener.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let shared = Arc::clone(&shared);
        let builder = builder.clone();
        tokio::spawn(async move {
            // A connection from this host (whatever address the listener is bound to: a
            // wildcard one takes loopback connections too) may come from a browser here.
            let local = peer.ip().is_loopback();
            let service = service_fn(move |req| handle(Arc::clone(&shared), req, local));
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection error");
            }
        });
    }
}

/// One admin request; `local`: it came on a connection from this host.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    local: bool,
) -> Result<Response<ProxyBody>, Infallible> {
    // A page of another site in a browser on this host must not reload the config or read
    // the status (the proxy listener's rule, `pipeline::browser`). From this host the Host
    // rule holds too (a DNS-rebinding page); from elsewhere the admin page is opened by name
    // on management networks, and only where a request comes from is checked.
    use crate::pipeline::browser::HostRule;
    let generation = shared.load();
    let names = if local {
        HostRule::Own(&|_| false)
    } else {
        HostRule::Any
    };
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(req.uri().authority().map(|a| a.as_str()));
    let refused = crate::pipeline::browser::check(
        &crate::pipeline::browser::Provenance::of(req.headers()),
        &generation.config.server.allowed_origins,
        host,
        names,
    );
    drop(generation);
    if let Err(e) = refused {
        let body = json!({ "error": e.code(), "message": e.to_string() });
        return Ok(json_response(StatusCode::FORBIDDEN, &body));
    }
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/") => page(),
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET | &Method::HEAD, "/readyz") => readyz(&shared),
        (&Method::GET | &Method::HEAD, "/metrics") => metrics(&shared),
        (&Method::GET | &Method::HEAD, "/status") => {
            json_response(StatusCode::OK, &status(&shared))
        }
        (&Method::POST, "/reload") => match shared.reload().await {
            Ok(generation) => json_response(
                StatusCode::OK,
                &json!({ "reloaded": true, "generation": generation }),
            ),
            Err(e) => json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "reloaded": false, "error": e.to_string() }),
            ),
        },
        (_, "/" | "/healthz" | "/readyz" | "/metrics" | "/status" | "/reload") => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({ "error": "method_not_allowed" }),
        ),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": "not_found", "endpoints": ["/", "/healthz", "/readyz", "/metrics", "/status", "POST /reload"] }),
        ),
    };
    Ok(response)
}

/// The page, assembled once: its style and script are inline (one document, no other
/// request but `/status`), and the Content-Security-Policy allows exactly those two by hash,
/// so nothing else can run or load on it.
struct Page {
    html: bytes::Bytes,
    csp: HeaderValue,
}

fn page() -> Response<ProxyBody> {
    static PAGE: std::sync::OnceLock<Page> = std::sync::OnceLock::new();
    let page = PAGE.get_or_init(|| {
        const STYLE: &str = include_str!("admin/page.css");
        const SCRIPT: &str = include_str!("admin/page.js");
        let html = include_str!("admin/page.html")
            .replace("{{style}}", STYLE)
            .replace("{{script}}", SCRIPT);
        let hash = |text: &str| {
            use base64::Engine;
            use sha2::Digest;
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(text))
        };
        let csp = format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
             connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
            hash(SCRIPT),
            hash(STYLE)
        );
        Page {
            html: bytes::Bytes::from(html),
            // Base64 and ASCII only: always a valid header value.
            csp: HeaderValue::from_str(&csp)
                .unwrap_or(HeaderValue::from_static("default-src 'none'")),
        }
    });
    let mut response = Response::new(full(page.html.clone()));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert("content-security-policy", page.csp.clone());
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert("cache-control", HeaderValue::from_static("no-store"));
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn readyz(shared: &Shared) -> Response<ProxyBody> {
    let not_ready = shared.load().unready_profiles();
    if not_ready.is_empty() {
        json_response(StatusCode::OK, &json!({ "ready": true }))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "ready": false, "not_ready": not_ready, "message": "these profiles have no valid token" }),
        )
    }
}

fn metrics(shared: &Shared) -> Response<ProxyBody> {
    // Expiry is a function of time; set it at scrape time rather than tick a timer.
    let generation = shared.load();
    for (name, holder) in generation.tokens.iter() {
        shared
            .metrics
            .token_expiry
            .get_or_create(&ProfileLabels {
                profile: name.clone(),
            })
            .set(holder.expiry_seconds());
    }
    let mut response = Response::new(full(shared.metrics.encode()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// Everything an operator needs to see, and never a token or a secret.
pub fn status(shared: &Shared) -> serde_json::Value {
    let generation = shared.load();
    let now = Instant::now();
    let mut profiles = serde_json::Map::new();
    for (name, holder) in generation.tokens.iter() {
        let status = holder.status();
        let token = holder.current();
        let settings = &holder.settings;
        let egress_from = generation
            .config
            .profiles
            .get(name)
            .map(|p| p.egress_from.as_str());
        profiles.insert(
            name.clone(),
            json!({
                "kind": settings.kind.as_str(),
                "state": holder.state().as_str(),
                "token_url": settings.token_url,
                "scopes": settings.scopes,
                "egress_proxy": settings.egress.as_ref().map_or_else(|| "direct".to_owned(), |p| p.redacted()),
                "egress_from": egress_from,
                "used_by_routes": generation.config.uses_profile(name),
                "shares_token_with": holder.profile_names().iter().filter(|n| *n != name).collect::<Vec<_>>(),
                "token_fingerprint": token.as_ref().map(|t| t.fingerprint.clone()),
                "expires_in_seconds": token.as_ref().map(|t| t.expires_at.saturating_duration_since(now).as_secs_f64()),
                "lifetime_seconds": token.as_ref().map(|t| t.lifetime.as_secs_f64()),
                "last_refresh": status.last_refresh.map(rfc3339),
                "fetch_count": status.fetch_count,
                "failures_in_a_row": status.failures_in_a_row,
                "next_attempt_in_seconds": status.next_attempt.map(|n| n.saturating_duration_since(now).as_secs_f64()),
                "token_source": status.source,
                "cache_hits": status.cache_hits,
                "last_error": status.last_error.as_ref().map(|e| e.to_string()),
                "oauth_error": status.last_error.as_ref().and_then(|e| e.oauth_error()),
                "recent_fetches": status.recent.iter().map(|f| json!({
                    "at": rfc3339(f.at),
                    "outcome": f.outcome,
                    "duration_ms": f.duration.as_secs_f64() * 1000.0,
                    "oauth_error": f.oauth_error,
                    "error": f.error,
                })).collect::<Vec<_>>(),
            }),
        );
    }
    let routes: Vec<_> = generation
        .routes
        .iter()
        .map(|r| {
            let c = &r.config;
            json!({
                "name": c.name,
                "path_prefix": c.path_prefix,
                "host": c.host,
                "methods": c.methods.as_ref().map(|m| m.iter().map(|m| m.to_string()).collect::<Vec<_>>()),
                "upstream": format!("{}://{}{}", c.upstream.scheme, c.upstream.authority, c.upstream.base_path),
                "profile": c.profile.as_deref().unwrap_or("none"),
                "egress_proxy": c.egress.describe(),
                "egress_from": c.egress.from,
                "strip_prefix": c.strip_prefix,
                "recent": shared.metrics.recent.snapshot(&c.name),
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": generation.number,
        "ready": generation.unready_profiles().is_empty(),
        "uptime_seconds": shared.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        "reload": shared.last_reload().map(|r| json!({
            "at": rfc3339(r.at),
            "outcome": if r.error.is_none() { "success" } else { "error" },
            "generation": r.generation,
            "error": r.error,
        })),
        "restart_needed": shared.restart_needed(),
        "profiles": profiles,
        "routes": routes,
        "egress_proxy": egress_summary(&generation.config),
        "token_cache": generation.token_cache.as_ref().map(|c| {
            let (state, error, since) = match c.health() {
                Health::Unknown => ("connecting", None, None),
                Health::Up => ("up", None, None),
                Health::Down { error, since } => ("down", Some(error), Some(rfc3339(since))),
            };
            json!({
                "state": state,
                "redis": c.config.redacted_url(),
                "key_prefix": c.config.key_prefix,
                "key_id": c.key_id(),
                "error": error,
                "down_since": since,
                "fallback": if state == "down" { "each replica fetches its own tokens" } else { "none" },
            })
        }),
    })
}

/// The egress proxy environment and where each route's and profile's traffic goes, flat for
/// the admin page; `null` when no proxy is configured anywhere.
fn egress_summary(config: &crate::config::Config) -> serde_json::Value {
    let env = &config.egress_env;
    let proxied = config.routes.iter().any(|r| r.egress.proxy.is_some())
        || config.profiles.values().any(|p| p.token.egress.is_some());
    if env.is_empty() && !proxied {
        return serde_json::Value::Null;
    }
    let var = |v: &Option<crate::config::egress::EnvProxy>| match v {
        None => "not set".to_owned(),
        Some(v) => match &v.proxy {
            Ok(p) => format!("{} (from {})", p.redacted(), v.name),
            Err(e) => format!("unusable (from {}): {e}", v.name),
        },
    };
    let mut out = serde_json::Map::new();
    out.insert("HTTPS_PROXY".into(), var(&env.https).into());
    out.insert("HTTP_PROXY".into(), var(&env.http).into());
    out.insert(
        "NO_PROXY".into(),
        match &env.no_proxy {
            Some((name, list)) => format!("{} (from {name})", list.raw),
            None => "not set".to_owned(),
        }
        .into(),
    );
    for r in &config.routes {
        out.insert(
            format!("route {}", r.name),
            format!("{} ({})", r.egress.describe(), r.egress.from).into(),
        );
    }
    for (name, p) in &config.profiles {
        let via = p
            .token
            .egress
            .as_ref()
            .map_or_else(|| "direct".to_owned(), |p| p.redacted());
        out.insert(
            format!("profile {name}"),
            format!("{via} ({})", p.egress_from).into(),
        );
    }
    serde_json::Value::Object(out)
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
