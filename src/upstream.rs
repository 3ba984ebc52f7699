//! Upstream connections, three kinds under one pool policy (`IDLE_TIMEOUT`, the retry rule
//! in `crate::pipeline`):
//!
//! - the fast path's pool (`pool`): HTTP/1.1 keep-alive connections, plain for `http://`
//!   upstreams and TLS for `https://` ones known to answer in HTTP/1.1, used by the fast
//!   path's own exchange and, through hyper's HTTP/1.1 codec (`h1`), by every other
//!   transport;
//! - `h2_pool`: h2 connections to `https://` upstreams known to answer in h2 (one, and more
//!   only while the upstream's stream limit fills them), driven with the `h2` crate from the
//!   requests' own tasks;
//! - hyper's pooled client (`Upstreams`), which lets ALPN choose, for the first requests to an
//!   `https://` upstream (until it is known what it answers in). One client per distinct
//!   (ca_file, connect_timeout, egress proxy), shared by routes and kept across reloads so
//!   pools stay warm; routes with different egress proxies never share a client, so never a
//!   connection.

pub mod deferred;
pub mod egress;
pub mod h1;
pub mod h2_pool;
pub mod pool;
pub mod stream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{Config, EgressProxy};
use crate::ProxyBody;

pub use egress::EgressConnector;
pub use h2_pool::H2Pool;
pub use pool::Pool;

/// The pool policy both upstream clients follow (the fast path's pool and hyper's): an idle
/// connection is kept at most this long (servers commonly close idle keep-alive connections
/// after 60-75 s), and a request that fails on a reused connection before any byte of the
/// answer is retried once on a new one when `crate::pipeline::may_retry` allows.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(55);
/// The largest response head taken from an upstream, HTTP/1.1 or h2 alike (h2: the decoded
/// header list, RFC 9113 §6.5.2); a larger one is a 502.
pub const MAX_RESPONSE_HEAD: usize = 256 * 1024;

pub type HttpClient = Client<HttpsConnector<EgressConnector>, ProxyBody>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    ca_file: Option<PathBuf>,
    connect_timeout: Duration,
    egress: Option<Arc<EgressProxy>>,
}

#[derive(Clone, Default)]
pub struct Upstreams {
    clients: HashMap<ClientKey, HttpClient>,
    /// Index into `clients` per route, in route order.
    per_route: Vec<ClientKey>,
}

impl Upstreams {
    pub fn build(config: &Config, previous: Option<&Upstreams>) -> Result<Upstreams, String> {
        let mut clients = HashMap::new();
        let mut per_route = Vec::new();
        for route in &config.routes {
            let key = ClientKey {
                ca_file: route.ca_file.clone(),
                connect_timeout: route.connect_timeout,
                egress: route.egress.proxy.clone(),
            };
            if !clients.contains_key(&key) {
                let client = match previous.and_then(|p| p.clients.get(&key)) {
                    Some(c) => c.clone(),
                    None => new_client(&key).map_err(|e| format!("route {}: {e}", route.name))?,
                };
                clients.insert(key.clone(), client);
            }
            per_route.push(key);
        }
        Ok(Upstreams { clients, per_route })
    }

    pub fn for_route(&self, index: usize) -> Option<&HttpClient> {
        self.per_route.get(index).and_then(|k| self.clients.get(k))
    }
}

/// A client for `key`'s upstreams, letting ALPN choose h2 or HTTP/1.1.
fn new_client(key: &ClientKey) -> Result<HttpClient, String> {
    let tls = crate::tls::client_config(key.ca_file.as_deref(), &[])?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(key.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(EgressConnector::new(
            http,
            key.egress.clone(),
            key.connect_timeout,
        ));
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        // A silent h2 connection is found dead as on the proxy's own (`h2_pool`), at the
        // longest patience: PINGed after 10 s without a frame while streams are open.
        .http2_keep_alive_interval(h2_pool::MAX_PATIENCE)
        .http2_keep_alive_timeout(h2_pool::MAX_PATIENCE)
        .http2_max_header_list_size(MAX_RESPONSE_HEAD as u32)
        .build(https))
}

/// A new connection of the fast path's kind to `route`'s upstream (its pool and upgrades):
/// TCP, through the route's egress proxy when it has one, and for `https://` TLS offering only
/// http/1.1, verified against the upstream's own name. `connect_timeout` bounds all of it.
pub fn connect<'a>(
    pool: &'a Pool,
    route: &'a crate::routes::Route,
) -> Connecting<'a, stream::UpStream> {
    let target = &route.config.upstream;
    let tls = target.scheme == http::uri::Scheme::HTTPS;
    Box::pin(within_connect_timeout(route, async move {
        let tcp = tcp(route).await?;
        if !tls {
            return Ok(stream::UpStream::Plain(tcp));
        }
        let config = pool.tls_config(route.config.ca_file.as_deref(), false)?;
        Ok(stream::UpStream::Tls(Box::new(
            handshake(config, route, tcp).await?,
        )))
    }))
}

/// A connection being made (`connect`, `connect_h2`). Boxed: a TLS handshake's future is
/// ~2.6 KiB, and every future that may await one (each request's, most of which never do)
/// would otherwise carry that room and copy it as it moves.
pub type Connecting<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send + 'a>>;

/// A new connection for `h2_pool::H2Pool` to `route`'s (`https://`) upstream: as `connect`, with
/// TLS offering only h2, on a socket that keeps reading after a failed write.
pub fn connect_h2<'a>(
    pool: &'a Pool,
    route: &'a crate::routes::Route,
) -> Connecting<'a, h2_pool::Opened> {
    Box::pin(within_connect_timeout(route, async move {
        let tcp = deferred::DeferWriteErrors::new(tcp(route).await?);
        let config = pool.tls_config(route.config.ca_file.as_deref(), true)?;
        let tls = handshake(config, route, tcp).await?;
        match tls.get_ref().1.alpn_protocol() {
            Some(b"h2") => Ok(Box::new(tls)),
            _ => Err("the upstream no longer offers h2 (ALPN)".into()),
        }
    }))
}

/// TCP to the route's upstream, through its egress proxy when it has one.
async fn tcp(route: &crate::routes::Route) -> Result<tokio::net::TcpStream, String> {
    let target = &route.config.upstream;
    let tls = target.scheme == http::uri::Scheme::HTTPS;
    egress::connect(
        target.authority.host(),
        target
            .authority
            .port_u16()
            .unwrap_or(if tls { 443 } else { 80 }),
        route.config.egress.proxy.as_deref(),
        route.config.connect_timeout,
    )
    .await
    .map_err(|e| e.to_string())
}

/// TLS over `io`, verified against the upstream's own name.
async fn handshake<IO>(
    config: Arc<rustls::ClientConfig>,
    route: &crate::routes::Route,
    io: IO,
) -> Result<tokio_rustls::client::TlsStream<IO>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let host = route.config.upstream.authority.host();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host}: {e}"))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, io)
        .await
        .map_err(|e| format!("TLS: {e}"))
}

async fn within_connect_timeout<T>(
    route: &crate::routes::Route,
    setup: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    let timeout = route.config.connect_timeout;
    match tokio::time::timeout(timeout, setup).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "connect timed out after {}",
            humantime::format_duration(timeout)
        )),
    }
}

/// A response body from any of the upstream clients — hyper's, a pooled HTTP/1.1 connection
/// (`h1`), or an h2 stream of `h2_pool` (whose flow-control window is given back as its data
/// is taken) — bounded, once `idle_limit` sets it, in how long it may go without sending a
/// byte (`crate::pipeline::send` sets the route's `timeout`).
pub struct UpstreamBody {
    source: Source,
    idle: Option<Idle>,
}

enum Source {
    Hyper(hyper::body::Incoming),
    Pooled(Box<h1::Pooled>),
    H2(h2_pool::Answer),
}

/// The idle bound: armed when the body first has nothing to give after a frame, cleared by
/// the next frame. Only a body that waits arms it (most answers come whole with their head).
struct Idle {
    limit: std::time::Duration,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl UpstreamBody {
    pub fn hyper(body: hyper::body::Incoming) -> Self {
        UpstreamBody::from(Source::Hyper(body))
    }

    pub fn pooled(body: h1::Pooled) -> Self {
        UpstreamBody::from(Source::Pooled(Box::new(body)))
    }

    pub fn h2(answer: h2_pool::Answer) -> Self {
        UpstreamBody::from(Source::H2(answer))
    }

    fn from(source: Source) -> Self {
        UpstreamBody { source, idle: None }
    }

    /// Ends the body with an error when the upstream sends nothing for `limit`.
    pub fn idle_limit(&mut self, limit: std::time::Duration) {
        self.idle = Some(Idle {
            limit,
            sleep: None,
            armed: false,
        });
    }

    /// Keeps a pooled HTTP/1.1 connection from being used again (an answer that must have no
    /// body, or an ambiguous one).
    pub fn retire(&mut self) {
        if let Source::Pooled(body) = &mut self.source {
            body.retire();
        }
    }
}

impl Source {
    fn poll_frame(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, crate::BoxError>>> {
        use http_body::Body as _;
        match self {
            Source::Hyper(body) => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map_err(|e| BodyFailed::boxed(&e)),
            Source::Pooled(body) => std::pin::Pin::new(body.as_mut())
                .poll_frame(cx)
                .map_err(|e| BodyFailed::boxed(&e)),
            Source::H2(answer) => answer
                .poll_frame(cx)
                .map_err(|e| BodyFailed::boxed(e.as_ref())),
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, crate::BoxError>>> {
        use std::task::Poll;
        let this = self.get_mut();
        let polled = this.source.poll_frame(cx);
        let Some(idle) = &mut this.idle else {
            return polled;
        };
        if polled.is_ready() {
            idle.armed = false;
            return polled;
        }
        // The deadline counts from the first wait after a frame; later polls keep it.
        let sleep = match &mut idle.sleep {
            Some(sleep) => {
                if !idle.armed {
                    sleep
                        .as_mut()
                        .reset(tokio::time::Instant::now() + idle.limit);
                }
                sleep
            }
            None => idle.sleep.insert(Box::pin(tokio::time::sleep(idle.limit))),
        };
        idle.armed = true;
        match std::future::Future::poll(sleep.as_mut(), cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyFailed(went_quiet(idle.limit)))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Hyper(body) => body.is_end_stream(),
            Source::Pooled(body) => body.is_end_stream(),
            Source::H2(answer) => answer.is_end_stream(),
        }
    }
}

/// How a response body that stopped coming for `limit` is reported (every transport).
pub fn went_quiet(limit: std::time::Duration) -> String {
    format!(
        "the upstream sent nothing for {}",
        humantime::format_duration(limit)
    )
}

/// An upstream response body that broke, as its own error with no source: an h2 reset code
/// from the upstream (REFUSED_STREAM says "not processed", NO_ERROR makes a cut body look
/// whole) must not reach an h2 client, which hyper's server would reset with the code it
/// finds in the chain. The client's stream is reset with INTERNAL_ERROR instead.
#[derive(Debug)]
struct BodyFailed(String);

impl BodyFailed {
    fn boxed(e: &dyn std::error::Error) -> crate::BoxError {
        Box::new(BodyFailed(crate::error::chain(e)))
    }
}

impl std::fmt::Display for BodyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream response body failed: {}", self.0)
    }
}

impl std::error::Error for BodyFailed {}
