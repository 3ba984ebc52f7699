//! The request path: validate, match, inject the token, forward, map errors, log.

pub mod headers;
pub mod stall;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, HOST};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Incoming;

use crate::error::ProxyError;
use crate::metrics::{method_label, RequestLabels, RouteLabels};
use crate::routes::Route;
use crate::state::{Generation, Shared};
use crate::token::{AccessToken, TokenHolder};
use crate::{BoxError, ProxyBody};

/// Bodies up to this size are kept so the request can be replayed after a 401.
pub const REPLAY_LIMIT: usize = 64 * 1024;

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

/// The hyper service function for the proxy listener.
pub async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let metrics = &shared.metrics;
    metrics.inflight.inc();
    let _inflight = InflightGuard(&metrics.inflight);
    let generation = shared.load();
    let request_id = headers::request_id(req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut log = RequestLog::default();

    let response = match forward(&shared, &generation, conn, req, &request_id, &mut log).await {
        Ok(response) => response,
        Err(e) => {
            log.error = Some(e.to_string());
            e.into_response(&request_id)
        }
    };

    record(
        &shared,
        conn,
        &request_id,
        &method,
        &path,
        response.status().as_u16(),
        started,
        &log,
    );
    Ok(response)
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

async fn forward(
    shared: &Shared,
    generation: &Generation,
    conn: ConnInfo,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    log: &mut RequestLog,
) -> Result<Response<ProxyBody>, ProxyError> {
    // No open proxy: CONNECT and absolute-form targets are refused (RFC 9112 §3.2.2 lets a
    // server accept absolute-form, but a reverse proxy that did could be aimed elsewhere).
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    if req.version() < Version::HTTP_2 && req.uri().scheme().is_some() {
        return Err(ProxyError::BadRequest(
            "absolute-form request targets are not accepted: this is a reverse proxy; send the path only".into(),
        ));
    }
    // RFC 9112 §3.2: exactly one valid Host on HTTP/1.1 (h2 names the host in :authority).
    let hosts = req.headers().get_all(HOST).iter().map(|v| v.as_bytes());
    if let Some(e) = crate::http::host_fields_error(req.version() == Version::HTTP_11, hosts) {
        return Err(ProxyError::BadRequest(e.into()));
    }
    let path = req.uri().path();
    crate::http::path::validate(path).map_err(|e| ProxyError::BadRequest(e.message().into()))?;

    if let Some(access) = &generation.access {
        access.check(conn.peer.ip(), req.headers())?;
    }

    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let (index, route) = generation
        .routes
        .find(req.method(), host, path)
        .ok_or_else(|| ProxyError::NoRoute {
            method: req.method().to_string(),
            path: path.to_owned(),
        })?;
    log.route = Some(route.config.name.clone());
    log.profile = route.config.profile.clone();
    let client =
        generation
            .upstreams
            .for_route(index)
            .ok_or_else(|| ProxyError::UpstreamUnreachable {
                route: route.config.name.clone(),
                detail: "no client".into(),
            })?;

    let holder = match &route.config.profile {
        Some(profile) => Some((
            profile.as_str(),
            generation
                .tokens
                .get(profile)
                .ok_or_else(|| ProxyError::UpstreamUnreachable {
                    route: route.config.name.clone(),
                    detail: format!("profile {profile} has no token holder"),
                })?,
        )),
        None => None,
    };
    let token = match holder {
        Some((profile, holder)) => Some(
            holder
                .get(profile)
                .await
                .map_err(ProxyError::TokenUnavailable)?,
        ),
        None => None,
    };
    log.fingerprint = token.as_ref().map(|t| t.fingerprint.clone());

    let (parts, body) = req.into_parts();
    let uri = upstream_uri(route, &parts.uri)?;
    let mut head = parts.headers;
    rewrite_request_headers(&mut head, &parts.uri, route, generation, conn, request_id);
    let declared = head
        .remove(CONTENT_LENGTH)
        .and_then(|v| crate::http::parse_length(v.as_bytes()));
    let body = stall::StallGuard::new(body, generation.config.server.body_read_timeout).boxed();
    frame_request(&mut head, &parts.method, &body);

    let retry = route.config.retry_on_401 && token.is_some();
    let body = if retry {
        prepare_body(body, declared).await?
    } else {
        Prepared::Stream(body)
    };

    let build = |token: Option<&Arc<AccessToken>>, body: ProxyBody, headers: http::HeaderMap| {
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = headers;
        if let Some(t) = token {
            request
                .headers_mut()
                .insert(AUTHORIZATION, t.header.clone());
        }
        request
    };

    let (first_body, replay) = match body {
        Prepared::Replayable(bytes) => (
            crate::error::full(bytes.clone()),
            Some((bytes, head.clone())),
        ),
        Prepared::Stream(body) => (body, None),
    };
    let (response, _) = send(
        client,
        route,
        build(token.as_ref(), first_body, head),
        log,
        shared,
    )
    .await?;

    if response.status() == StatusCode::UNAUTHORIZED && retry {
        if let (Some((profile, holder)), Some(sent)) = (holder, &token) {
            match replay {
                Some((bytes, headers)) => {
                    if let Some(fresh) =
                        token_for_replay(shared, route, holder, profile, sent, log).await
                    {
                        drop(response);
                        let again = send(
                            client,
                            route,
                            build(Some(&fresh), crate::error::full(bytes), headers),
                            log,
                            shared,
                        )
                        .await?;
                        return Ok(finish_response(again.0));
                    }
                }
                None => {
                    // Too large to replay: the client gets the 401, the next request a new token.
                    holder.invalidate(sent);
                }
            }
        }
    }
    Ok(finish_response(response))
}

/// The proxy frames the body it forwards (RFC 9112 §6.3, §11.2): hyper's client writes
/// `Content-Length` from the body's exact size, else the chunked coding, so no framing field
/// of the client's is passed on. hyper assumes a GET, HEAD or CONNECT of unknown size has no
/// body; one that has one is sent chunked rather than dropped.
fn frame_request(head: &mut http::HeaderMap, method: &Method, body: &ProxyBody) {
    let unknown_size = !body.is_end_stream() && body.size_hint().exact().is_none();
    if unknown_size && matches!(*method, Method::GET | Method::HEAD) {
        head.insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
}

/// After a 401 for `sent`: invalidate it (rate-limited) and return a different usable token
/// to replay the request with, if one can be had within the usual wait. The replay is noted
/// in the access log and counted. Both engines (here and `crate::h1`) replay through this.
pub(crate) async fn token_for_replay(
    shared: &Shared,
    route: &Route,
    holder: &TokenHolder,
    profile: &str,
    sent: &Arc<AccessToken>,
    log: &mut RequestLog,
) -> Option<Arc<AccessToken>> {
    if !holder.invalidate(sent) {
        return None;
    }
    let fresh = match holder.get(profile).await {
        Ok(fresh) if !Arc::ptr_eq(&fresh, sent) => fresh,
        _ => return None,
    };
    log.replayed = true;
    log.fingerprint = Some(fresh.fingerprint.clone());
    shared
        .metrics
        .replays
        .get_or_create(&RouteLabels {
            route: route.config.name.clone(),
        })
        .inc();
    Some(fresh)
}

/// Sends `request` through hyper's client within the route's timeout. The response's framing
/// is checked (`crate::http::response_framing`): an ambiguous one is a 502 and its connection
/// is never used again. Hop-by-hop fields are gone from the response that is returned.
pub(crate) async fn send(
    client: &crate::upstream::HttpClient,
    route: &Route,
    mut request: Request<ProxyBody>,
    log: &mut RequestLog,
    shared: &Shared,
) -> Result<(Response<Incoming>, crate::http::Framing), ProxyError> {
    let name = &route.config.name;
    let upstream_error = |kind| shared.metrics.upstream_error(name, kind);
    let head_request = request.method() == Method::HEAD;
    let connection = hyper_util::client::legacy::connect::capture_connection(&mut request);
    match tokio::time::timeout(route.config.timeout, client.request(request)).await {
        Ok(Ok(mut response)) => {
            log.upstream_status = Some(response.status().as_u16());
            let fields = response
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
            let status = response.status().as_u16();
            match crate::http::response_framing(head_request, status, fields) {
                Ok(framing) => {
                    headers::remove_hop_by_hop(response.headers_mut());
                    Ok((response, framing))
                }
                Err(what) => {
                    if let Some(connected) = connection.connection_metadata().as_ref() {
                        connected.poison();
                    }
                    upstream_error("protocol");
                    Err(ProxyError::UpstreamUnreachable {
                        route: name.clone(),
                        detail: format!("invalid response: {what}"),
                    })
                }
            }
        }
        Ok(Err(e)) => {
            if let Some(idle) = stall::is_stall(&e) {
                return Err(ProxyError::RequestTimeout(idle));
            }
            let kind = if e.is_connect() {
                "connect"
            } else {
                "protocol"
            };
            upstream_error(kind);
            Err(ProxyError::UpstreamUnreachable {
                route: name.clone(),
                detail: crate::error::chain(&e),
            })
        }
        Err(_) => {
            upstream_error("timeout");
            Err(ProxyError::UpstreamTimeout {
                route: name.clone(),
                timeout: route.config.timeout,
            })
        }
    }
}

fn upstream_uri(route: &Route, original: &Uri) -> Result<Uri, ProxyError> {
    let target = &route.config.upstream;
    let path_and_query = route.upstream_path_and_query(original.path(), original.query());
    Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| ProxyError::BadRequest(format!("cannot build the upstream URL: {e}")))
}

fn rewrite_request_headers(
    head: &mut http::HeaderMap,
    uri: &Uri,
    route: &Route,
    generation: &Generation,
    conn: ConnInfo,
    request_id: &HeaderValue,
) {
    headers::remove_hop_by_hop(head);
    // HTTP/2 clients name the host in `:authority` rather than `Host` (RFC 9113 §8.3.1).
    let original_host = head.remove(HOST).or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    // The client's own credentials never reach the upstream; the proxy's token replaces them.
    head.remove(AUTHORIZATION);
    // `Expect: 100-continue` was answered on this hop (hyper sends the 100 when the body is
    // first read); the upstream gets the body straight away, as RFC 9110 §10.1.1 allows.
    head.remove(http::header::EXPECT);
    if let Some(access) = &generation.access {
        head.remove(access.header());
    }
    for name in &route.config.remove_headers {
        head.remove(name);
    }
    headers::set_forwarded(
        head,
        &headers::Forwarded {
            client_ip: conn.peer.ip().to_canonical(),
            proto: if conn.tls { "https" } else { "http" },
            host: original_host.as_ref(),
        },
    );
    head.insert(headers::X_REQUEST_ID.clone(), request_id.clone());
    for (name, value) in &route.config.set_headers {
        head.insert(name.clone(), value.clone());
    }
    // `Host` is left unset: the client writes it (HTTP/1.1) or `:authority` (h2) from the
    // upstream URI, so it always names the upstream authority.
}

fn finish_response(response: Response<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, map_incoming(body))
}

fn map_incoming(body: Incoming) -> ProxyBody {
    body.map_err(|e| -> BoxError { Box::new(e) }).boxed()
}

enum Prepared {
    /// The whole body, small enough to send twice.
    Replayable(Bytes),
    Stream(ProxyBody),
}

/// Keeps bodies up to `REPLAY_LIMIT` in memory so a 401 can be replayed; anything larger (by
/// `Content-Length`, or found while reading) streams on without further buffering.
async fn prepare_body(mut body: ProxyBody, declared: Option<u64>) -> Result<Prepared, ProxyError> {
    if body.is_end_stream() {
        return Ok(Prepared::Replayable(Bytes::new()));
    }
    if declared.is_some_and(|n| n > REPLAY_LIMIT as u64) {
        return Ok(Prepared::Stream(body));
    }
    let mut buffered = BytesMut::new();
    let mut prefix: Vec<Frame<Bytes>> = Vec::new();
    loop {
        match body.frame().await {
            None => return Ok(Prepared::Replayable(buffered.freeze())),
            Some(Err(e)) => {
                if let Some(idle) = stall::is_stall(&*e) {
                    return Err(ProxyError::RequestTimeout(idle));
                }
                return Err(ProxyError::BadRequest(format!(
                    "could not read the request body: {e}"
                )));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    buffered.extend_from_slice(&data);
                    if buffered.len() > REPLAY_LIMIT {
                        prefix.push(Frame::data(buffered.split().freeze()));
                        break;
                    }
                }
                Err(trailers) => {
                    // Trailers end the body; keep everything as a stream (not replayable).
                    prefix.push(Frame::data(buffered.split().freeze()));
                    prefix.push(trailers);
                    break;
                }
            },
        }
    }
    let head_frames = futures_util::stream::iter(prefix.into_iter().map(Ok::<_, BoxError>));
    let rest = BodyStream::new(body);
    let stream = futures_util::StreamExt::chain(head_frames, rest);
    Ok(Prepared::Stream(StreamBody::new(stream).boxed()))
}
