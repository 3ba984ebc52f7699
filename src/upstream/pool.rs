//! Keep-alive connections for the fast path, to `http://` upstreams and to `https://` ones
//! that speak HTTP/1.1: a shared LIFO pool per key (`Route::pool_key`: the upstream scheme
//! and authority, and the egress proxy its connections go through), used inline by the
//! connection task that needs one (no connection task and no channel between the client
//! side and the upstream side). An `https://` upstream is first served by hyper's client
//! (h2 or HTTP/1.1 by ALPN); once it has answered in HTTP/1.1 it is remembered, and the fast
//! path takes it over with TLS connections of its own offering only http/1.1. Upstreams
//! that choose h2 stay with hyper's client, which multiplexes h2.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tokio::net::TcpStream;

use super::stream::UpStream;

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
    /// Keys of `https://` upstreams seen answering in HTTP/1.1: the fast path serves those.
    h1: Mutex<HashSet<Box<str>>>,
    /// One TLS client configuration per `ca_file`, so TLS sessions are resumed across
    /// connections (rustls keeps its session cache in the configuration).
    tls: Mutex<HashMap<Option<PathBuf>, Arc<ClientConfig>>>,
}

impl Pool {
    /// Whether the `https://` upstream under `key` has answered in HTTP/1.1.
    pub fn speaks_h1(&self, key: &str) -> bool {
        lock(&self.h1).contains(key)
    }

    pub fn mark_h1(&self, key: &str) {
        let mut known = lock(&self.h1);
        if !known.contains(key) {
            known.insert(key.into());
        }
    }

    /// The TLS configuration for upstreams trusted through `ca_file` (ALPN: http/1.1).
    pub fn tls_config(
        &self,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Arc<ClientConfig>, String> {
        let key = ca_file.map(PathBuf::from);
        if let Some(c) = lock(&self.tls).get(&key) {
            return Ok(Arc::clone(c));
        }
        let config = crate::tls::client_config(ca_file, &[b"http/1.1"])?;
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
