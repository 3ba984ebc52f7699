//! hyper's server as a transport: h2 and h2c clients, inbound TLS, and the HTTP/1.x
//! connections the fast path hands over. It turns hyper's `Request` into the pipeline's
//! terms and the pipeline's answer back into a `Response`; the rules are the pipeline's.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, COOKIE, HOST};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::error::ProxyError;
use crate::pipeline::body::{self, Prepared};
use crate::pipeline::plan::Plan;
use crate::pipeline::{self, ConnInfo, HeadFacts, InflightGuard, RequestLog};
use crate::state::{Generation, Shared};
use crate::ProxyBody;

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
    let request_id = crate::http::request_id(req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let version = req.version();
    // An HTTP/1.x request whose body may be left unread if the proxy refuses it (until it
    // has been read whole).
    let mut may_leave_body = version < Version::HTTP_2
        && (req.headers().contains_key(http::header::TRANSFER_ENCODING)
            || req
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| crate::http::parse_length(v.as_bytes()))
                .is_some_and(|n| n > 0));
    let mut pending = Unanswered {
        shared: &shared,
        conn,
        request_id: &request_id,
        method: &method,
        path: &path,
        started,
        log: RequestLog::default(),
        answered: false,
    };

    let forwarded = forward(
        &shared,
        &generation,
        conn,
        req,
        &request_id,
        &mut pending.log,
        &mut may_leave_body,
    )
    .await;
    let response = match forwarded {
        Ok(response) => response,
        Err(e) => {
            pending.log.error = Some(e.to_string());
            let mut response = e.into_response(&request_id);
            // hyper closes a connection whose request body was not read to the end; the
            // answer says so (as the fast path's do), so the client sends no more of it and
            // does not reuse the connection.
            if may_leave_body {
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            // An answer to HEAD has no body (RFC 9110 §9.3.2): hyper's h2 server would send
            // it, hyper's HTTP/1.1 server would not.
            if method == http::Method::HEAD {
                response.map(|_| crate::error::full(Bytes::new()))
            } else {
                response
            }
        }
    };
    let response = close_if_unframed(version, &method, response);
    pending.answered = true;
    pipeline::record(
        &shared,
        conn,
        &request_id,
        &method,
        &path,
        response.status().as_u16(),
        started,
        &pending.log,
    );
    Ok(response)
}

/// A request whose answer is not ready yet. hyper drops the service future when the client
/// goes away first (an h2 stream reset, a closed connection): the request is then counted
/// and logged with status 499, as nginx does, rather than not at all.
struct Unanswered<'a> {
    shared: &'a Shared,
    conn: ConnInfo,
    request_id: &'a HeaderValue,
    method: &'a http::Method,
    path: &'a str,
    started: Instant,
    log: RequestLog,
    answered: bool,
}

/// nginx's "client closed request".
const CLIENT_CLOSED: u16 = 499;

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.log
            .error
            .get_or_insert_with(|| "the client went away before the answer".to_owned());
        pipeline::record(
            self.shared,
            self.conn,
            self.request_id,
            self.method,
            self.path,
            CLIENT_CLOSED,
            self.started,
            &self.log,
        );
    }
}

async fn forward(
    shared: &Arc<Shared>,
    generation: &Generation,
    conn: ConnInfo,
    mut req: Request<Incoming>,
    request_id: &HeaderValue,
    log: &mut RequestLog,
    body_unread: &mut bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    // From here on, a body the proxy leaves unread, whatever refuses it, is drained.
    let stall = generation.config.server.body_read_timeout;
    let upload = req.extensions_mut().remove::<pipeline::UnderWay>();
    let drain = !req.headers().contains_key(http::header::EXPECT);
    let idle = stall.min(body::DRAIN_IDLE);
    let mut req = req.map(|body| Unread::new(body, drain, idle, upload));
    let mut hosts = req.headers().get_all(HOST).iter();
    let key_header = generation.access.as_ref().map(|a| a.header());
    let facts = HeadFacts {
        method: req.method(),
        path: req.uri().path(),
        absolute_form: req.version() < Version::HTTP_2 && req.uri().scheme().is_some(),
        http11: req.version() == Version::HTTP_11,
        host: hosts.next().map(|h| h.as_bytes()),
        more_hosts: hosts.next().is_some(),
        authority: req.uri().authority().map(|a| a.as_str()),
        api_key: key_header
            .and_then(|k| req.headers().get(k))
            .map(|v| v.as_bytes()),
        more_api_keys: key_header.is_some_and(|k| req.headers().get_all(k).iter().nth(1).is_some()),
        provenance: pipeline::browser::Provenance::of(req.headers()),
        fields: field_count(&req),
    };
    let admitted = pipeline::admit(generation, conn, &facts, log)?;
    let route = admitted.route;
    let token = pipeline::admit::token(&admitted, log).await?;

    let upgrade = pipeline::upgrade::requested(req.version(), req.headers());
    let on_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, incoming) = req.into_parts();
    if parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    let uri = upstream_uri(route, &parts.uri)?;
    // HTTP/2 clients name the host in `:authority` (RFC 9113 §8.3.1; a `Host` with it names
    // the same, as `admit` checked).
    let client_host = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| parts.headers.get(HOST).cloned());
    let plan = Plan {
        route,
        conn,
        request_id,
        key_header,
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| crate::http::parse_length(v.as_bytes()));
    if let (Some(protocol), Some(client)) = (upgrade, on_upgrade) {
        let has_body = declared.is_some_and(|n| n > 0)
            || parts.headers.contains_key(http::header::TRANSFER_ENCODING);
        if has_body {
            return Err(ProxyError::BadRequest(
                "an upgrade request with a body is not supported".into(),
            ));
        }
        let request = pipeline::upgrade::UpgradeRequest {
            method: parts.method.clone(),
            path_and_query: uri.path_and_query().map_or("/".into(), |p| p.to_string()),
            headers: plan.encode_headers(&parts.headers, client_host.as_ref(), None),
            protocol,
            client,
            slot: parts.extensions.remove::<pipeline::ConnectionSlot>(),
        };
        return pipeline::upgrade::forward(shared, &admitted, request, token, log).await;
    }
    let incoming = pipeline::stall::StallGuard::new(incoming, stall).boxed();
    let mut head = plan.encode_headers(&parts.headers, client_host.as_ref(), None);
    body::frame(&mut head, &parts.method, &incoming);

    // Bodies up to REPLAY_LIMIT are kept whole, so a 401 replay, a retry of an idempotent
    // request, or of one its upstream did not process, can send them again; larger ones keep
    // what they send up to RETRY_LIMIT, for the retries.
    let prepared = body::prepare(incoming, declared).await?;
    let (retained, copy) = match prepared {
        Prepared::Replayable(bytes) => {
            // Read to its end: the connection can go on whatever the answer.
            *body_unread = false;
            (None, Some(bytes))
        }
        Prepared::Stream(body) => (Some(body::Retained::new(body)), None),
    };
    let build = |token: Option<&crate::token::AccessToken>, body: ProxyBody| {
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = head.clone();
        if let Some(t) = token {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, t.header.clone());
        }
        request
    };
    // A body kept whole can be sent again (a retry, a replay); a streamed one can be retried
    // while what went of it is kept (`body::Retained`), never replayed after a 401.
    let mut first = true;
    let mut next_body = |copy: &Option<Bytes>| -> Option<ProxyBody> {
        match copy {
            Some(bytes) => Some(crate::error::full(bytes.clone())),
            None => retained.as_ref()?.again(std::mem::take(&mut first)),
        }
    };
    let (response, framing) = pipeline::send(
        shared,
        &admitted,
        || next_body(&copy).map(|b| build(token.as_deref(), b)),
        log,
    )
    .await?;
    if let Some(retained) = &retained {
        retained.settle();
    }
    let status = response.status().as_u16();
    let fresh = pipeline::replay::after_answer(
        shared,
        &admitted,
        status,
        token.as_ref(),
        copy.is_some(),
        log,
    )
    .await;
    let Some(fresh) = fresh else {
        let response = pipeline::egain::inspect(shared, &admitted, response).await;
        return Ok(bodiless(response, framing));
    };
    drop(response);
    let (again, framing) = pipeline::send(
        shared,
        &admitted,
        || next_body(&copy).map(|b| build(Some(&fresh), b)),
        log,
    )
    .await?;
    let response = pipeline::egain::inspect(shared, &admitted, again).await;
    Ok(bodiless(response, framing))
}

/// A client's request body, read on after the proxy is done with it (`body::DRAIN_LIMIT`,
/// `body::DRAIN_TIME`, `body::DRAIN_IDLE`). The proxy may answer before it
/// has read a body (refused, an upstream that cannot be reached or that answered early):
/// - h2: hyper then ends the stream with RST_STREAM(NO_ERROR) behind the answer, as RFC 9113
///   §8.1 allows, but curl and httpx then drop the answer they have received and report a
///   broken stream;
/// - HTTP/1.x: the answer says `Connection: close`, and closing on bytes still unread makes
///   the kernel reset the connection, which can cost a client still sending the answer.
///
/// A client that finishes its upload within the limits reads the answer whole. A request
/// that waits for `100 Continue` is not drained: it has not sent its body, and need not.
struct Unread {
    inner: Option<Incoming>,
    drain: bool,
    ended: bool,
    idle: std::time::Duration,
    /// Kept while the body is read, drained included: the connection counts the upload as
    /// under way, so it is not taken for idle.
    held: Option<pipeline::UnderWay>,
}

impl Unread {
    fn new(
        inner: Incoming,
        drain: bool,
        idle: std::time::Duration,
        held: Option<pipeline::UnderWay>,
    ) -> Self {
        Unread {
            inner: Some(inner),
            drain,
            ended: false,
            idle,
            held,
        }
    }
}

impl http_body::Body for Unread {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let polled = std::pin::Pin::new(inner).poll_frame(cx);
        if let std::task::Poll::Ready(None | Some(Err(_))) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().map_or(true, |b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        let Some(mut body) = self.inner.take() else {
            return;
        };
        if !self.drain || self.ended || http_body::Body::is_end_stream(&body) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (held, idle) = (self.held.take(), self.idle);
        runtime.spawn(async move {
            let _held = held;
            let mut left = body::DRAIN_LIMIT;
            let read = async {
                while let Ok(Some(Ok(frame))) = tokio::time::timeout(idle, body.frame()).await {
                    let n = frame.data_ref().map_or(0, Bytes::len);
                    left = left.saturating_sub(n);
                    if left == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(body::DRAIN_TIME, read).await;
        });
    }
}

/// An HTTP/1.0 client cannot be sent chunks: an answer of unknown length reaches it
/// close-delimited, so it says `Connection: close` (RFC 9112 §9.3). hyper would otherwise
/// confirm the client's `keep-alive` and close after the body anyway; it adds its
/// `keep-alive` to a `close` too, unless the response is marked HTTP/1.0, as it goes out.
fn close_if_unframed(
    version: Version,
    method: &http::Method,
    mut response: Response<ProxyBody>,
) -> Response<ProxyBody> {
    use http_body::Body;
    let status = response.status();
    let has_body = *method != http::Method::HEAD
        && status != http::StatusCode::NO_CONTENT
        && status != http::StatusCode::NOT_MODIFIED;
    let framed = response.body().size_hint().exact().is_some()
        || response
            .headers()
            .contains_key(http::header::CONTENT_LENGTH);
    if version == Version::HTTP_10 && has_body && !framed {
        *response.version_mut() = Version::HTTP_10;
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A response that has no body by its status or method (204, 304, HEAD: `Framing::Empty`)
/// gets none, whatever the upstream sent after its head (an h2 upstream can send DATA after
/// a 204; RFC 9110 §6.4.1).
fn bodiless(response: Response<ProxyBody>, framing: crate::http::Framing) -> Response<ProxyBody> {
    if framing == crate::http::Framing::Empty {
        response.map(|_| crate::error::full(bytes::Bytes::new()))
    } else {
        response
    }
}

fn upstream_uri(route: &crate::routes::Route, original: &Uri) -> Result<Uri, ProxyError> {
    let target = &route.config.upstream;
    let path_and_query = route.upstream_path_and_query(original.path(), original.query());
    Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| ProxyError::BadRequest(format!("cannot build the upstream URL: {e}")))
}

/// The request's header fields as HTTP/1.1 would count them: h2's `:authority` stands for
/// the `Host` line, and an h2 client's `Cookie` fields (one per cookie, as browsers send
/// them) are the one line they become (RFC 9113 §8.2.3).
fn field_count<B>(req: &Request<B>) -> usize {
    let headers = req.headers();
    if req.version() != Version::HTTP_2 {
        return headers.len();
    }
    let cookies = headers.get_all(COOKIE).iter().count();
    headers.len() - cookies.saturating_sub(1)
        + usize::from(!headers.contains_key(HOST) && req.uri().authority().is_some())
}

/// An h2 request's `Cookie` fields, one per cookie as h2 clients send them, become one field
/// joined with "; " (RFC 9113 §8.2.3: it MUST be, before an HTTP/1.1 connection; an h2
/// upstream may take it either way). HTTP/1.1 requests are left as they came, on both
/// HTTP/1.1 transports.
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(COOKIE).iter();
    if cookies.nth(1).is_none() {
        return;
    }
    let joined = headers
        .get_all(COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, value);
    }
}
