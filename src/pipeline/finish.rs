//! The last phase: an upstream failure becomes the proxy's own error (one message and one
//! metric kind per failure, whichever transport met it), and every request is counted and
//! logged once.

use std::time::Instant;

use http::header::HeaderValue;
use http::Method;

use super::{ConnInfo, RequestLog};
use crate::error::ProxyError;
use crate::metrics::{method_label, RequestLabels, RouteLabels};
use crate::routes::Route;
use crate::state::Shared;

/// Why an exchange with the upstream failed.
#[derive(Debug)]
pub(crate) enum UpstreamFailure {
    /// No connection (refused, DNS, TLS handshake): the cause, as the OS or TLS words it.
    Connect(String),
    /// No response head within the route's `timeout`.
    Timeout,
    /// The connection broke, or the answer was not valid HTTP.
    Protocol(String),
}

/// The 502/504 for a failed exchange, counted in `egain_proxy_upstream_errors_total`.
pub(crate) fn upstream_failed(
    shared: &Shared,
    route: &Route,
    failure: UpstreamFailure,
) -> ProxyError {
    let name = &route.config.name;
    let kind = match &failure {
        UpstreamFailure::Connect(_) => "connect",
        UpstreamFailure::Timeout => "timeout",
        UpstreamFailure::Protocol(_) => "protocol",
    };
    shared.metrics.upstream_error(name, kind);
    match failure {
        UpstreamFailure::Timeout => ProxyError::UpstreamTimeout {
            route: name.clone(),
            timeout: route.config.timeout,
        },
        UpstreamFailure::Connect(cause) => ProxyError::UpstreamUnreachable {
            route: name.clone(),
            detail: format!("cannot connect: {}", via_egress(route, cause)),
        },
        UpstreamFailure::Protocol(what) if what.starts_with("connection failed") => {
            ProxyError::UpstreamUnreachable {
                route: name.clone(),
                detail: via_egress(route, what),
            }
        }
        UpstreamFailure::Protocol(what) => ProxyError::UpstreamUnreachable {
            route: name.clone(),
            detail: what,
        },
    }
}

/// A connection failure on a route whose connections go through an egress proxy, with that
/// proxy named (a tunnel that the proxy closed, or a TLS handshake through it that failed,
/// otherwise reads as the upstream's doing), unless the message already names it.
fn via_egress(route: &Route, what: String) -> String {
    match &route.config.egress.proxy {
        Some(proxy) if !what.contains("egress proxy") => {
            format!("{what} (through the egress proxy {proxy})")
        }
        _ => what,
    }
}

/// The innermost cause of a connect error, as the OS or TLS library words it (hyper's and
/// the HTTP connector's wrappers say only "client error (Connect)").
pub(crate) fn connect_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io.to_string();
        }
        cause = next;
    }
    cause.to_string()
}

/// Counts a finished request in the metrics and writes its access-log line.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record(
    shared: &Shared,
    conn: ConnInfo,
    request_id: &HeaderValue,
    method: &Method,
    path: &str,
    status: u16,
    started: Instant,
    log: &RequestLog,
) {
    let elapsed = started.elapsed();
    let metrics = &shared.metrics;
    let route = log.route.as_deref().unwrap_or("none");
    metrics
        .requests
        .get_or_create(&RequestLabels {
            route: route.to_owned(),
            method: method_label(method).to_owned(),
            status,
        })
        .inc();
    metrics
        .request_duration
        .get_or_create(&RouteLabels {
            route: route.to_owned(),
        })
        .observe(elapsed.as_secs_f64());
    metrics.recent.record(route, status, elapsed);
    tracing::info!(
        target: "egain_proxy::access",
        request_id = request_id.to_str().unwrap_or(""),
        client = %conn.peer.ip(),
        method = %method,
        path = %path,
        route = %route,
        profile = log.profile.as_deref().unwrap_or("none"),
        status,
        upstream_status = log.upstream_status,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        token = log.fingerprint.as_deref().unwrap_or(""),
        replayed = log.replayed,
        error = log.error.as_deref(),
        "request"
    );
}
