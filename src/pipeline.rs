//! The request pipeline: every rule of contract §3–§5 and §8, decided once, whatever
//! transport carries the request. The phases, in order:
//!
//! 1. `admit`: validate the head, check access, find the route and its token holder;
//! 2. `admit::token`: the route's token;
//! 3. `plan`: what the upstream request becomes, with an encoder into raw HTTP/1.1 bytes (the
//!    fast path) and one onto a `HeaderMap` (hyper's client); `body`: how its body is framed,
//!    bounded and kept for a replay;
//! 4. the exchange: the fast path's own pool (`crate::transport::h1`), or `send` (an h2
//!    upstream's own connection, or hyper's client), which checks the response's framing;
//! 5. `replay`: the 401 rule;
//! 6. `finish`: upstream failure -> the proxy's error, access log and metrics.
//!
//! Transports (`crate::transport`) parse and move bytes and call these phases; they never
//! decide what a request becomes.

pub mod admit;
pub mod body;
pub mod browser;
pub mod egain;
pub mod finish;
pub mod headers;
pub mod plan;
pub mod replay;
pub mod stall;
pub mod upgrade;

use std::net::SocketAddr;

use http::{Method, Request, Response};

pub(crate) use admit::{admit, Admitted, HeadFacts};
pub(crate) use finish::{record, upstream_failed, UpstreamFailure};

use crate::error::ProxyError;
use crate::http::Framing;
use crate::routes::Route;
use crate::state::Shared;
use crate::upstream::pool::Speaks;
use crate::upstream::UpstreamBody;
use crate::ProxyBody;

/// Bodies up to this size are kept so the request can be replayed after a 401.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// The client connection's `max_connections` slot, in each request's extensions on hyper's
/// transport: an upgraded connection (a tunnel) keeps it after hyper lets the connection go.
#[derive(Clone)]
pub struct ConnectionSlot(pub std::sync::Arc<tokio::sync::OwnedSemaphorePermit>);

/// Something a transport keeps while a request's body is being read (hyper's transport: the
/// connection's count of requests under way, so an upload that goes on after its answer is
/// not taken for an idle connection).
#[derive(Clone)]
pub struct UnderWay(pub std::sync::Arc<dyn std::any::Any + Send + Sync>);

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// What the access log reports about one request.
#[derive(Default)]
pub(crate) struct RequestLog {
    pub route: Option<String>,
    pub profile: Option<String>,
    pub upstream_status: Option<u16>,
    pub fingerprint: Option<String>,
    pub replayed: bool,
    pub error: Option<String>,
}

pub(crate) struct InflightGuard<'a>(pub &'a prometheus_client::metrics::gauge::Gauge);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How often a request is sent again after an h2 upstream retired the connection under it
/// (graceful GOAWAY) before processing it: nginx with `keepalive_requests 3` turned away 13–25%
/// of 16 concurrent uploads three times in a row. Each new connection takes all waiting
/// requests and processes 3, so one of 16 is turned away about 13 times in 16: 16 tries still
/// left ~4% out (a test measured 9 of 160); 64 leave about one in a million, and the route's
/// `timeout` bounds them all.
const RETIRED_TRIES: usize = 64;

/// The retry rule for an exchange that failed before any byte of the response arrived: once,
/// on a new connection, when the request never left or its method is idempotent (RFC 9110
/// §9.2.2). Both upstream clients follow it (the fast path's pool; `send` for hyper's).
pub(crate) fn may_retry(method: &Method, written: bool) -> bool {
    !written
        || matches!(
            *method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
        )
}

/// Sends a request to the route's upstream within the route's timeout: an `http://` upstream,
/// or an `https://` one known to answer in HTTP/1.1, on the fast path's pooled connections
/// (`crate::upstream::h1`); an `https://` upstream known to answer in h2 on its h2 connections
/// (`crate::upstream::H2Pool`); any other through hyper's client (ALPN chooses, and what the
/// upstream answered in is learned). `make` builds
/// the request, and is asked again for a retry (`may_retry`, and streams an h2 upstream did
/// not process; it answers `None` when the body cannot be sent twice). The response's framing
/// is checked (`crate::http::response_framing`): an ambiguous one is a 502 and its connection
/// is never used again. Hop-by-hop fields are gone from the response that is returned, and
/// its body ends with an error if the upstream sends nothing for the route's timeout.
pub(crate) async fn send(
    shared: &Shared,
    admitted: &Admitted<'_>,
    mut make: impl FnMut() -> Option<Request<ProxyBody>>,
    log: &mut RequestLog,
) -> Result<(Response<UpstreamBody>, Framing), ProxyError> {
    let route = admitted.route;
    let https = route.config.upstream.scheme == http::uri::Scheme::HTTPS;
    let pool = &shared.h1_pool;
    let deadline = tokio::time::Instant::now() + route.config.timeout;
    let mut retried = false;
    let mut unprocessed_retries = 0;
    let mut retired_retries = 0;
    let mut fell_back = false;
    // The failure a retry was for: reported if the request cannot be sent again (a streamed
    // body that had sent more than `body::RETRY_LIMIT`, or past `body::RETRY_BUDGET`, is
    // sent once).
    let mut last: Option<String> = None;
    loop {
        let Some(mut request) = make() else {
            let what = match last {
                Some(failure) => format!(
                    "{failure}; not sent again: its body had streamed past what is kept for a retry"
                ),
                None => "the request could not be built".into(),
            };
            return Err(upstream_failed(
                shared,
                route,
                UpstreamFailure::Protocol(what),
            ));
        };
        let method = request.method().clone();
        let speaks = pool.speaks(&route.pool_key);
        let h2 = https && !fell_back && speaks == Some(Speaks::H2);
        let h1 = !https || speaks == Some(Speaks::H1);
        let attempt = async {
            if h2 {
                let open = || crate::upstream::connect_h2(pool, route);
                let sent = pool
                    .h2
                    .send(&route.pool_key, open, request, route.config.timeout);
                let response = sent.await.map_err(Failed::from_h2)?;
                return Ok((response.map(UpstreamBody::h2), None));
            }
            if h1 {
                let sent = crate::upstream::h1::send(pool, route, request);
                let response = sent.await.map_err(Failed::from_h1)?;
                return Ok((response.map(UpstreamBody::pooled), None));
            }
            let Some(client) = admitted.generation.upstreams.for_route(admitted.index) else {
                return Err(Failed::Other("no upstream client for this route".into()));
            };
            let connection = hyper_util::client::legacy::connect::capture_connection(&mut request);
            let response = client
                .request(request)
                .await
                .map_err(|e| Failed::from_hyper(&e))?;
            if https {
                pool.learn(&route.pool_key, response.version());
            }
            Ok((response.map(UpstreamBody::hyper), Some(connection)))
        };
        let failed = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok((response, connection))) => {
                return checked(shared, route, &method, response, connection.as_ref(), log);
            }
            Ok(Err(failed)) => failed,
            Err(_) => return Err(upstream_failed(shared, route, UpstreamFailure::Timeout)),
        };
        match failed {
            Failed::Stall(idle) => return Err(ProxyError::RequestTimeout(idle)),
            // The request never left. An upstream known to speak h2 may have stopped (ALPN
            // now chooses HTTP/1.1, or its h2 connection cannot be made): once more through
            // hyper's client, letting ALPN choose, and learning what it answers in.
            Failed::Connect(cause) if h2 => {
                pool.forget(&route.pool_key);
                fell_back = true;
                last = Some(format!("connection failed: {cause}"));
            }
            Failed::Connect(cause) => {
                return Err(upstream_failed(
                    shared,
                    route,
                    UpstreamFailure::Connect(cause),
                ));
            }
            // An h2 upstream that did not process the stream (GOAWAY above its last stream
            // id, REFUSED_STREAM) left it safe to send again, whatever the method (RFC 9113
            // §8.7). A few times: a new connection can meet the next GOAWAY.
            Failed::Unprocessed(what) if unprocessed_retries < 3 => {
                unprocessed_retries += 1;
                last = Some(format!("connection failed: {what}"));
            }
            // Retired with its connection (a graceful GOAWAY): an upstream that ends its
            // connections every few requests can turn a request away from many new ones
            // under load; up to RETIRED_TRIES, within the route's timeout.
            Failed::Retired(what) if retired_retries < RETIRED_TRIES => {
                retired_retries += 1;
                last = Some(format!("connection failed: {what}"));
            }
            // A connection closed (or an h2 one broken) before the answer: the idempotent half
            // of the retry rule (requests never written are retried by the clients).
            Failed::Lost(what) if !retried && may_retry(&method, true) => {
                retried = true;
                last = Some(format!("connection failed: {what}"));
            }
            Failed::Unprocessed(what)
            | Failed::Retired(what)
            | Failed::Lost(what)
            | Failed::Other(what) => {
                return Err(upstream_failed(
                    shared,
                    route,
                    UpstreamFailure::Protocol(format!("connection failed: {what}")),
                ));
            }
        }
    }
}

/// Why an exchange got no answer, from either client, in the terms of the retry rule.
enum Failed {
    /// The client's request body stalled (`stall`): the client's fault, a 408.
    Stall(std::time::Duration),
    /// No connection could be made (for an h2 upstream: none that speaks h2).
    Connect(String),
    /// An h2 upstream did not process the stream (RFC 9113 §6.8, §8.7).
    Unprocessed(String),
    /// An h2 upstream retired the connection before processing the stream (graceful GOAWAY).
    Retired(String),
    /// The connection closed or broke before any byte of the answer.
    Lost(String),
    Other(String),
}

impl Failed {
    fn from_h2(e: crate::upstream::h2_pool::Failure) -> Failed {
        use crate::upstream::h2_pool::Failure;
        match e {
            Failure::Connect(cause) => Failed::Connect(cause),
            Failure::Unprocessed(what) => Failed::Unprocessed(what),
            Failure::Retired(what) => Failed::Retired(what),
            Failure::Lost(what) => Failed::Lost(what),
            Failure::Body(e) => match stall::is_stall(e.as_ref()) {
                Some(idle) => Failed::Stall(idle),
                None => Failed::Other(format!(
                    "the request body failed: {}",
                    crate::error::chain(e.as_ref())
                )),
            },
            Failure::Protocol(what) => Failed::Other(what),
        }
    }

    fn from_h1(e: crate::upstream::h1::Failure) -> Failed {
        use crate::upstream::h1::Failure;
        match e {
            Failure::Connect(cause) => Failed::Connect(cause),
            // Never written: as safe to send again as a stream an h2 upstream did not process.
            Failure::Unsent(what) => Failed::Unprocessed(what),
            Failure::Lost(what) => Failed::Lost(what),
            Failure::Other(e) => match stall::is_stall(&e) {
                Some(idle) => Failed::Stall(idle),
                None => Failed::Other(crate::error::chain(&e)),
            },
        }
    }

    fn from_hyper(e: &hyper_util::client::legacy::Error) -> Failed {
        if let Some(idle) = stall::is_stall(e) {
            return Failed::Stall(idle);
        }
        if e.is_connect() {
            return Failed::Connect(finish::connect_cause(e));
        }
        let what = crate::error::chain(e);
        let h2 = h2_cause(e);
        if h2.is_some_and(crate::upstream::h2_pool::retired) {
            Failed::Retired(what)
        } else if h2.is_some_and(crate::upstream::h2_pool::unprocessed) {
            Failed::Unprocessed(what)
        } else if closed_before_answer(e) || h2_connection_lost(e) {
            Failed::Lost(what)
        } else {
            Failed::Other(what)
        }
    }
}

/// The h2 error under one of hyper's client, if any.
fn h2_cause(e: &hyper_util::client::legacy::Error) -> Option<&h2::Error> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        cause = c.source();
    }
    None
}

/// An h2 connection that broke under a stream (reset, broken pipe) before its answer: for an
/// idempotent request, as safe to send again as an HTTP/1.1 connection closed before the
/// answer (an upstream that closes right after its GOAWAY can reset the socket before that
/// frame is read).
fn h2_connection_lost(e: &hyper_util::client::legacy::Error) -> bool {
    h2_cause(e).is_some_and(h2::Error::is_io)
}

fn closed_before_answer(e: &hyper_util::client::legacy::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(|h| h.is_incomplete_message() || h.is_canceled())
}

fn checked(
    shared: &Shared,
    route: &Route,
    method: &Method,
    mut response: Response<UpstreamBody>,
    connection: Option<&hyper_util::client::legacy::connect::CaptureConnection>,
    log: &mut RequestLog,
) -> Result<(Response<UpstreamBody>, Framing), ProxyError> {
    log.upstream_status = Some(response.status().as_u16());
    let fields = response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    let status = response.status().as_u16();
    match crate::http::response_framing(*method == Method::HEAD, status, fields) {
        Ok(framing) => {
            // As the fast path's pool: a connection that answered without a body (HEAD,
            // 204, 304) is not used again, in case the upstream sends one anyway.
            if framing == Framing::Empty && response.version() < http::Version::HTTP_2 {
                retire(&mut response, connection);
            }
            headers::remove_hop_by_hop(response.headers_mut());
            // The route's timeout bounds each wait for the body's next bytes, too.
            response.body_mut().idle_limit(route.config.timeout);
            Ok((response, framing))
        }
        Err(what) => {
            retire(&mut response, connection);
            let what = format!("invalid response: {what}");
            Err(upstream_failed(
                shared,
                route,
                UpstreamFailure::Protocol(what),
            ))
        }
    }
}

/// Keeps the response's connection from being used again (a pooled HTTP/1.1 one, or
/// hyper's captured one).
fn retire(
    response: &mut Response<UpstreamBody>,
    connection: Option<&hyper_util::client::legacy::connect::CaptureConnection>,
) {
    response.body_mut().retire();
    if let Some(connection) = connection {
        if let Some(connected) = connection.connection_metadata().as_ref() {
            connected.poison();
        }
    }
}

/// An upstream's response body as the proxy's body type.
pub(crate) fn into_proxy_response(response: Response<UpstreamBody>) -> Response<crate::ProxyBody> {
    use http_body_util::BodyExt;
    response.map(|body| body.boxed())
}
