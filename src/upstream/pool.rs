//! Keep-alive connections for the fast path, to `http://` upstreams and to `https://` ones
//! that speak HTTP/1.1: a shared LIFO pool per key (`Route::pool_key`: the upstream scheme
//! and authority, and the egress proxy its connections go through), used inline by the
//! task that needs one — the fast path's connection task, or a request's task through
//! `super::h1` — with no connection task and no channel between the client side and the
//! upstream side. An `https://` upstream is first served by hyper's client
//! (h2 or HTTP/1.1 by ALPN), and what it answered in is remembered (`Speaks`): once it has
//! answered in HTTP/1.1 the fast path takes it over with TLS connections of its own offering
//! only http/1.1; upstreams that answered in h2 get one multiplexed h2 connection of their
//! own (`h2`, `super::h2_pool`).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tokio::net::TcpStream;

use super::stream::UpStream;

/// Idle time before the kernel probes an upstream connection (TCP keep-alive).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Idle connections kept per key; more are closed on return.
const MAX_IDLE_PER_UPSTREAM: usize = 256;
use super::IDLE_TIMEOUT;

struct Idle {
    stream: UpStream,
    since: Instant,
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Box<str>, Vec<Idle>>>,
    /// What `https://` upstreams (by key) answered in; the fast path serves those in HTTP/1.1.
    known: Mutex<HashMap<Box<str>, Speaks>>,
    /// One TLS client configuration per `ca_file` and ALPN offer (http/1.1, or h2 for
    /// `super::h2::H2Pool`), so TLS sessions are resumed across connections (rustls keeps its
    /// session cache in the configuration).
    tls: Mutex<HashMap<TlsKey, Arc<ClientConfig>>>,
    /// The h2 connections to `https://` upstreams that answered in h2.
    pub h2: super::H2Pool,
}

/// A TLS client configuration's key: the `ca_file`, and whether it offers h2 (else http/1.1).
type TlsKey = (Option<PathBuf>, bool);

/// The protocol an `https://` upstream last answered in (ALPN's choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    H1,
    H2,
}

impl Pool {
    /// What the `https://` upstream under `key` has answered in, if it has.
    pub fn speaks(&self, key: &str) -> Option<Speaks> {
        lock(&self.known).get(key).copied()
    }

    /// Remembers the version of an answer from the `https://` upstream under `key`.
    pub fn learn(&self, key: &str, version: http::Version) {
        let speaks = match version {
            http::Version::HTTP_11 => Speaks::H1,
            http::Version::HTTP_2 => Speaks::H2,
            _ => return,
        };
        let mut known = lock(&self.known);
        match known.get_mut(key) {
            Some(s) => *s = speaks,
            None => {
                known.insert(key.into(), speaks);
            }
        }
    }

    /// Forgets what the upstream under `key` speaks: its next request lets ALPN choose again.
    pub fn forget(&self, key: &str) {
        lock(&self.known).remove(key);
    }

    /// The TLS configuration for upstreams trusted through `ca_file`, offering http/1.1 by
    /// ALPN, or h2 when `h2`.
    pub fn tls_config(
        &self,
        ca_file: Option<&std::path::Path>,
        h2: bool,
    ) -> Result<Arc<ClientConfig>, String> {
        let key = (ca_file.map(PathBuf::from), h2);
        if let Some(c) = lock(&self.tls).get(&key) {
            return Ok(Arc::clone(c));
        }
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        let config = crate::tls::client_config(ca_file, &[alpn])?;
        lock(&self.tls).insert(key, Arc::clone(&config));
        Ok(config)
    }

    /// The most recently used live idle connection under `key`, if any.
    pub fn checkout(&self, key: &str) -> Option<UpStream> {
        let now = Instant::now();
        loop {
            let idle = {
                let mut map = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                map.get_mut(key)?.pop()?
            };
            if now.duration_since(idle.since) < IDLE_TIMEOUT && idle.stream.is_quiet() {
                return Some(idle.stream);
            }
            // Closed by the upstream, or talked out of turn, or too old: drop it, try the next.
        }
    }

    pub fn checkin(&self, key: &str, stream: UpStream) {
        let now = Instant::now();
        let mut map = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = match map.get_mut(key) {
            Some(list) => list,
            None => map.entry(key.into()).or_default(),
        };
        // The oldest sit at the front: shed those past their time so a burst's leftovers do not
        // linger as half-closed sockets.
        let expired = list
            .iter()
            .take_while(|i| now.duration_since(i.since) >= IDLE_TIMEOUT)
            .count();
        list.drain(..expired);
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push(Idle { stream, since: now });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens a new connection to `host` (an IPv6 literal may keep its brackets) on `port`,
/// trying each resolved address in turn within `timeout`.
pub async fn connect(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let attempt = async {
        let addrs: Vec<SocketAddr> = match literal.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port)).await?.collect(),
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    // A connection the upstream lost without a word (a host gone, a NAT
                    // entry dropped) is found out by the kernel, as hyper's connector does.
                    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
                    socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
                    return Ok(stream);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "connect timed out after {}",
                humantime::format_duration(timeout)
            ),
        )),
    }
}
