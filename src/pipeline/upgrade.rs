//! Upgrades (contract §11): an HTTP/1.1 request with `Connection: upgrade` and `Upgrade`
//! (a WebSocket handshake, typically) goes through the same admission, route, path rules
//! and token as any request, on a connection of its own to the upstream (HTTP/1.1 forced by
//! ALPN, since h2 has no Upgrade). A `101` switches both sides to a byte tunnel until either
//! side closes; any other answer passes through like a normal response, after the 401 rule.
//! Tunnels are counted while open and closed at the end of the shutdown grace period.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::header::{HeaderMap, HeaderValue, CONNECTION, HOST, UPGRADE};
use http::{Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::finish::{upstream_failed, UpstreamFailure};
use super::{headers, replay, Admitted, RequestLog};
use crate::error::ProxyError;
use crate::metrics::RouteLabels;
use crate::routes::Route;
use crate::state::Shared;
use crate::token::AccessToken;
use crate::ProxyBody;

/// The protocol an HTTP/1.1 request asks to switch to: its `Upgrade` value when its
/// `Connection` lists `upgrade`. h2 has no Upgrade (RFC 9113 §8.2.2).
pub fn requested(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let listed = headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| crate::http::list_items(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"upgrade")));
    if !listed {
        return None;
    }
    upgrade_list(headers)
}

/// Every `Upgrade` line as one list (RFC 9110 §5.3), empty items left out; `None` without a
/// protocol. `h2c` is never offered upstream: a tunnel of HTTP/2 would carry requests that no
/// route, path rule or access log sees (h2c smuggling; RFC 9113 §3.1 deprecates the upgrade).
/// A request offering only `h2c` is served as the plain request it also is.
fn upgrade_list(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut joined = Vec::new();
    for value in headers.get_all(UPGRADE) {
        for protocol in crate::http::list_items(value.as_bytes()) {
            let name = protocol.split(|b| *b == b'/').next().unwrap_or(protocol);
            if protocol.is_empty() || name.eq_ignore_ascii_case(b"h2c") {
                continue;
            }
            if !joined.is_empty() {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(protocol);
        }
    }
    if joined.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// The protocol a `101` switched to is one the client offered (RFC 9110 §7.8: the server
/// must name it, and must not switch to one not asked for), compared by name, case aside
/// (`websocket`, `h2c`, `IRC/6.9`).
fn switched_as_offered(answered: Option<&HeaderValue>, offered: &HeaderValue) -> bool {
    let name = |p: &[u8]| {
        p.split(|b| *b == b'/')
            .next()
            .unwrap_or(p)
            .to_ascii_lowercase()
    };
    let Some(answered) = answered else {
        return false;
    };
    let items = |v: &HeaderValue| {
        crate::http::list_items(v.as_bytes())
            .filter(|p| !p.is_empty())
            .map(name)
            .collect::<Vec<_>>()
    };
    let (answered, offered) = (items(answered), items(offered));
    !answered.is_empty() && answered.iter().all(|p| offered.contains(p))
}

/// Open tunnels, and the signal that closes them at the end of a shutdown.
pub struct Tunnels {
    open: AtomicUsize,
    closed: tokio::sync::Notify,
    close: watch::Sender<bool>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels {
            open: AtomicUsize::new(0),
            closed: tokio::sync::Notify::new(),
            close: watch::Sender::new(false),
        }
    }
}

impl Tunnels {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits until no tunnel is open.
    pub async fn drained(&self) {
        loop {
            let notified = self.closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Closes every open tunnel (the end of the shutdown grace period).
    pub fn close_all(&self) {
        self.close.send_replace(true);
    }
}

/// Counts one open tunnel in `Tunnels` and `egain_proxy_inflight_requests`.
struct TunnelGuard {
    shared: Arc<Shared>,
}

impl TunnelGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.tunnels.open.fetch_add(1, Ordering::SeqCst);
        shared.metrics.inflight.inc();
        TunnelGuard { shared }
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.shared.metrics.inflight.dec();
        self.shared.tunnels.open.fetch_sub(1, Ordering::SeqCst);
        self.shared.tunnels.closed.notify_waiters();
    }
}

/// What the transport hands over: the request line, the header map the plan made for the
/// upstream (without Authorization), the protocol asked for, and the client side of the
/// connection once hyper has sent the 101.
pub(crate) struct UpgradeRequest {
    pub method: http::Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub protocol: HeaderValue,
    pub client: OnUpgrade,
    /// The client connection's slot, held while the tunnel is open.
    pub slot: Option<super::ConnectionSlot>,
}

pub(crate) async fn forward(
    shared: &Arc<Shared>,
    admitted: &Admitted<'_>,
    request: UpgradeRequest,
    token: Option<Arc<AccessToken>>,
    log: &mut RequestLog,
) -> Result<Response<ProxyBody>, ProxyError> {
    let route = admitted.route;
    let mut response = exchange(shared, route, &request, token.as_deref(), log).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status().as_u16();
        // No body to keep: always replayable.
        if let Some(fresh) =
            replay::after_answer(shared, admitted, status, token.as_ref(), true, log).await
        {
            drop(response);
            response = exchange(shared, route, &request, Some(&fresh), log).await?;
        }
    }
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        headers::remove_hop_by_hop(response.headers_mut());
        let response = response.map(crate::upstream::UpstreamBody::hyper);
        return Ok(super::egain::inspect(shared, admitted, response).await);
    }
    let protocol = upgrade_list(response.headers());
    if !switched_as_offered(protocol.as_ref(), &request.protocol) {
        // The connection is dropped with the answer: nothing is tunnelled.
        let what =
            format!(
            "invalid response: 101 Switching Protocols to {:?}, where the client asked for {:?}",
            protocol.as_ref().map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned()),
            String::from_utf8_lossy(request.protocol.as_bytes()),
        );
        return Err(upstream_failed(
            shared,
            route,
            UpstreamFailure::Protocol(what),
        ));
    }
    // The upstream switched: so does the client, once hyper has written this 101.
    let upstream_side = hyper::upgrade::on(&mut response);
    let (mut parts, _) = response.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = protocol {
        parts.headers.insert(UPGRADE, protocol);
    }
    parts
        .headers
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    shared
        .metrics
        .upgrades
        .get_or_create(&RouteLabels {
            route: route.config.name.clone(),
        })
        .inc();
    let guard = TunnelGuard::new(Arc::clone(shared));
    let name = route.config.name.clone();
    let client_side = request.client;
    let slot = request.slot;
    tokio::spawn(async move {
        let _guard = guard;
        let _slot = slot;
        let (client, upstream) = match tokio::join!(client_side, upstream_side) {
            (Ok(c), Ok(u)) => (c, u),
            (c, u) => {
                let e = c
                    .err()
                    .or(u.err())
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                tracing::debug!(route = %name, error = %e, "upgrade did not complete");
                return;
            }
        };
        let client = TokioIo::new(client);
        let upstream = TokioIo::new(upstream);
        let mut close = _guard.shared.tunnels.close.subscribe();
        tokio::select! {
            _ = tunnel(client, upstream) => {}
            _ = close.wait_for(|c| *c) => {
                tracing::debug!(route = %name, "tunnel closed by shutdown");
            }
        }
    });
    Ok(Response::from_parts(parts, crate::error::full("")))
}

/// One exchange on a new connection of its own: the upgrade request, the answer's head.
async fn exchange(
    shared: &Shared,
    route: &Route,
    request: &UpgradeRequest,
    token: Option<&AccessToken>,
    log: &mut RequestLog,
) -> Result<Response<hyper::body::Incoming>, ProxyError> {
    // A connection of its own, made as the fast path's pool makes them (egress proxy, TLS
    // offering only http/1.1: h2 has no Upgrade), never returned to a pool.
    let io = crate::upstream::connect(&shared.h1_pool, route)
        .await
        .map_err(|e| upstream_failed(shared, route, UpstreamFailure::Connect(e)))?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, ProxyBody>(TokioIo::new(io))
        .await
        .map_err(|e| upstream_failed(shared, route, UpstreamFailure::Protocol(e.to_string())))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upgrade connection ended with an error");
        }
    });
    let mut outgoing = Request::new(crate::error::full(""));
    *outgoing.method_mut() = request.method.clone();
    *outgoing.uri_mut() = request
        .path_and_query
        .parse()
        .map_err(|_| ProxyError::BadRequest("invalid request target".into()))?;
    let headers = outgoing.headers_mut();
    *headers = request.headers.clone();
    if let Ok(host) = HeaderValue::from_str(route.config.upstream.authority.as_str()) {
        headers.insert(HOST, host);
    }
    headers.insert(UPGRADE, request.protocol.clone());
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(t) = token {
        headers.insert(http::header::AUTHORIZATION, t.header.clone());
    }
    let response =
        match tokio::time::timeout(route.config.timeout, sender.send_request(outgoing)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let what = format!("connection failed: {}", crate::error::chain(&e));
                return Err(upstream_failed(
                    shared,
                    route,
                    UpstreamFailure::Protocol(what),
                ));
            }
            Err(_) => return Err(upstream_failed(shared, route, UpstreamFailure::Timeout)),
        };
    log.upstream_status = Some(response.status().as_u16());
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let fields = response
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
        if let Err(what) = crate::http::response_framing(false, response.status().as_u16(), fields)
        {
            let what = format!("invalid response: {what}");
            return Err(upstream_failed(
                shared,
                route,
                UpstreamFailure::Protocol(what),
            ));
        }
    }
    Ok(response)
}

/// Moves bytes both ways until either side closes: when one direction ends, the other side's
/// write half is shut down, the other direction gets a moment to finish, and both close.
async fn tunnel<A, B>(a: A, b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let a_to_b = async {
        let r = tokio::io::copy(&mut a_read, &mut b_write).await;
        let _ = b_write.shutdown().await;
        r
    };
    let b_to_a = async {
        let r = tokio::io::copy(&mut b_read, &mut a_write).await;
        let _ = a_write.shutdown().await;
        r
    };
    tokio::pin!(a_to_b, b_to_a);
    tokio::select! {
        _ = &mut a_to_b => { let _ = tokio::time::timeout(LINGER, b_to_a).await; }
        _ = &mut b_to_a => { let _ = tokio::time::timeout(LINGER, a_to_b).await; }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn an_upgrade_needs_both_fields_on_http11() {
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(requested(Version::HTTP_11, &ws).unwrap(), "websocket");
        assert!(requested(Version::HTTP_2, &ws).is_none());
        assert!(requested(Version::HTTP_10, &ws).is_none());
        assert!(requested(Version::HTTP_11, &headers(&[("upgrade", "websocket")])).is_none());
        assert!(requested(Version::HTTP_11, &headers(&[("connection", "upgrade")])).is_none());
        // Two lines are one list (RFC 9110 §5.3), as the upstream will read them.
        let two = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("upgrade", "IRC/6.9"),
        ]);
        assert_eq!(
            requested(Version::HTTP_11, &two).unwrap(),
            "websocket, IRC/6.9"
        );
        // h2c is never tunnelled: the request is served as a plain one.
        let h2c = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "H2C"),
        ]);
        assert!(requested(Version::HTTP_11, &h2c).is_none());
        let both = headers(&[("connection", "upgrade"), ("upgrade", "h2c, websocket")]);
        assert_eq!(requested(Version::HTTP_11, &both).unwrap(), "websocket");
    }

    #[test]
    fn a_101_switches_only_to_a_protocol_offered() {
        let offered = HeaderValue::from_static("websocket, IRC/6.9");
        let ok =
            |a: &'static str| switched_as_offered(Some(&HeaderValue::from_static(a)), &offered);
        assert!(ok("websocket"));
        assert!(ok("WebSocket"));
        assert!(ok("IRC/6.9"));
        assert!(ok("irc"));
        assert!(!ok("h2c"));
        assert!(!ok(""));
        assert!(!ok("websocket, h2c"));
        assert!(!switched_as_offered(None, &offered));
        // A 101's lines are one list too: every protocol in it must have been offered.
        let answer = headers(&[("upgrade", "websocket"), ("upgrade", "foo")]);
        assert!(!switched_as_offered(
            upgrade_list(&answer).as_ref(),
            &offered
        ));
        let answer = headers(&[("upgrade", ""), ("upgrade", "websocket")]);
        assert!(switched_as_offered(
            upgrade_list(&answer).as_ref(),
            &offered
        ));
    }
}
