//! Pooled keep-alive clients to upstreams: HTTP/1.1 or h2 by ALPN over rustls, plain HTTP/1.1
//! for `http://` upstreams. One pair of clients (`Clients`: ALPN's choice, and h2 only) per
//! distinct (ca_file, connect_timeout, egress proxy), shared by routes and kept across reloads
//! so pools stay warm; routes with different egress proxies never share a client, so never a
//! connection.

pub mod deferred;
pub mod egress;
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
pub use pool::Pool;

/// The pool policy both upstream clients follow (the fast path's pool and hyper's): an idle
/// connection is kept at most this long (servers commonly close idle keep-alive connections
/// after 60-75 s), and a request that fails on a reused connection before any byte of the
/// answer is retried once on a new one when `crate::pipeline::may_retry` allows.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(55);

pub type HttpClient = Client<HttpsConnector<EgressConnector>, ProxyBody>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    ca_file: Option<PathBuf>,
    connect_timeout: Duration,
    egress: Option<Arc<EgressProxy>>,
}

/// hyper's clients for one `ClientKey`: `auto` lets ALPN choose (h2 or HTTP/1.1) and is used
/// until an upstream has answered; `h2` is for upstreams known to answer in h2. hyper's pool
/// opens one connection at a time only to a key it knows to be h2 (`http2_only`): through
/// `auto`, every request that finds no live connection opens its own — after each GOAWAY
/// from a busy upstream, one TLS handshake per waiting request, all but one thrown away.
#[derive(Clone)]
pub struct Clients {
    auto: HttpClient,
    h2: HttpClient,
}

#[derive(Clone, Default)]
pub struct Upstreams {
    clients: HashMap<ClientKey, Clients>,
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
                let built = match previous.and_then(|p| p.clients.get(&key)) {
                    Some(c) => c.clone(),
                    None => {
                        let new = |h2_only| {
                            new_client(&key, h2_only)
                                .map_err(|e| format!("route {}: {e}", route.name))
                        };
                        Clients {
                            auto: new(false)?,
                            h2: new(true)?,
                        }
                    }
                };
                clients.insert(key.clone(), built);
            }
            per_route.push(key);
        }
        Ok(Upstreams { clients, per_route })
    }

    /// The client for route `index`: the h2-only one when its upstream is known to speak h2.
    pub fn for_route(&self, index: usize, h2: bool) -> Option<&HttpClient> {
        let clients = self
            .per_route
            .get(index)
            .and_then(|k| self.clients.get(k))?;
        Some(if h2 { &clients.h2 } else { &clients.auto })
    }
}

/// A client for `key`'s upstreams; `h2_only` offers only h2 by ALPN and speaks nothing else.
fn new_client(key: &ClientKey, h2_only: bool) -> Result<HttpClient, String> {
    let tls = crate::tls::client_config(key.ca_file.as_deref(), &[])?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(key.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http();
    let egress = EgressConnector::new(http, key.egress.clone(), key.connect_timeout);
    let https = if h2_only {
        builder.enable_http2().wrap_connector(egress)
    } else {
        builder.enable_http1().enable_http2().wrap_connector(egress)
    };
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .http2_only(h2_only)
        .build(https))
}

/// A new connection of the fast path's kind to `route`'s upstream (its pool and upgrades):
/// TCP, through the route's egress proxy when it has one, and for `https://` TLS offering only
/// http/1.1, verified against the upstream's own name. `connect_timeout` bounds all of it.
pub async fn connect(
    pool: &Pool,
    route: &crate::routes::Route,
) -> Result<stream::UpStream, String> {
    let target = &route.config.upstream;
    let tls = target.scheme == http::uri::Scheme::HTTPS;
    let timeout = route.config.connect_timeout;
    let setup = async {
        let tcp = egress::connect(
            target.authority.host(),
            target
                .authority
                .port_u16()
                .unwrap_or(if tls { 443 } else { 80 }),
            route.config.egress.proxy.as_deref(),
            timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        if !tls {
            return Ok(stream::UpStream::Plain(tcp));
        }
        let config = pool.tls_config(route.config.ca_file.as_deref())?;
        let host = target.authority.host();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        Ok(stream::UpStream::Tls(Box::new(stream)))
    };
    match tokio::time::timeout(timeout, setup).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "connect timed out after {}",
            humantime::format_duration(timeout)
        )),
    }
}
