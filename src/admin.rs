//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/status`, `POST /reload`.
//! Never served on the proxy listener.

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
use crate::ProxyBody;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The same slow-client guard as the proxy listener.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
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
            let service = service_fn(move |req| handle(Arc::clone(&shared), req));
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection error");
            }
        });
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
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
        (_, "/healthz" | "/readyz" | "/metrics" | "/status" | "/reload") => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({ "error": "method_not_allowed" }),
        ),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": "not_found", "endpoints": ["/healthz", "/readyz", "/metrics", "/status", "POST /reload"] }),
        ),
    };
    Ok(response)
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
        profiles.insert(
            name.clone(),
            json!({
                "kind": settings.kind.as_str(),
                "state": holder.state().as_str(),
                "token_url": settings.token_url,
                "scopes": settings.scopes,
                "used_by_routes": generation.config.uses_profile(name),
                "shares_token_with": holder.profile_names().iter().filter(|n| *n != name).collect::<Vec<_>>(),
                "token_fingerprint": token.as_ref().map(|t| t.fingerprint.clone()),
                "expires_in_seconds": token.as_ref().map(|t| t.expires_at.saturating_duration_since(now).as_secs_f64()),
                "last_refresh": status.last_refresh.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                "fetch_count": status.fetch_count,
                "failures_in_a_row": status.failures_in_a_row,
                "next_attempt_in_seconds": status.next_attempt.map(|n| n.saturating_duration_since(now).as_secs_f64()),
                "last_error": status.last_error.as_ref().map(|e| e.to_string()),
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
                "strip_prefix": c.strip_prefix,
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": generation.number,
        "ready": generation.unready_profiles().is_empty(),
        "profiles": profiles,
        "routes": routes,
    })
}
