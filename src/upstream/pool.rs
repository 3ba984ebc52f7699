//! Keep-alive connections to plain-HTTP upstreams for the fast path: a shared LIFO pool per
//! key (`Route::pool_key`: the upstream authority, and the egress proxy its connections go
//! through), used inline by the connection task that needs one (no connection task and no
//! channel between the client side and the upstream side).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// Idle connections kept per key; more are closed on return.
const MAX_IDLE_PER_UPSTREAM: usize = 256;
use super::IDLE_TIMEOUT;

struct Idle {
    stream: TcpStream,
    since: Instant,
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Box<str>, Vec<Idle>>>,
}

impl Pool {
    /// The most recently used live idle connection under `key`, if any.
    pub fn checkout(&self, key: &str) -> Option<TcpStream> {
        let now = Instant::now();
        loop {
            let idle = {
                let mut map = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                map.get_mut(key)?.pop()?
            };
            if now.duration_since(idle.since) < IDLE_TIMEOUT && is_quiet(&idle.stream) {
                return Some(idle.stream);
            }
            // Closed by the upstream, or talked out of turn, or too old: drop it, try the next.
        }
    }

    pub fn checkin(&self, key: &str, stream: TcpStream) {
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

/// An idle connection is usable when it has nothing to read: no EOF (the upstream closed it)
/// and no stray bytes. tokio answers from its readiness state, so a quiet socket costs no
/// system call.
fn is_quiet(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
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
