//! Header rewriting between client and upstream: hop-by-hop removal (RFC 9110 §7.6.1),
//! X-Forwarded-*, and the request id. Pure functions over `HeaderMap`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub use crate::http::{request_id, X_REQUEST_ID};
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Connection-specific header fields (`crate::http::is_hop_by_hop`).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    crate::http::is_hop_by_hop(name.as_str().as_bytes())
}

/// Removes hop-by-hop fields and every field named in `Connection`, except those the proxy
/// manages (`crate::http::is_managed`: framing, `Host`, `Authorization`, `X-Forwarded-*`,
/// `x-request-id`), which `Connection` cannot take away.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| crate::http::list_items(v.as_bytes()))
        .filter(|name| crate::http::connection_drops(name))
        .filter_map(|name| HeaderName::from_bytes(name).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        KEEP_ALIVE.clone(),
        PROXY_CONNECTION.clone(),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
}

/// What the proxy knows about the client side of one request.
pub struct Forwarded<'a> {
    pub client_ip: std::net::IpAddr,
    pub proto: &'static str,
    pub host: Option<&'a HeaderValue>,
}

/// Appends the client address to `X-Forwarded-For` (keeping what earlier proxies wrote) and
/// sets `X-Forwarded-Proto` and `X-Forwarded-Host` to what this proxy saw.
pub fn set_forwarded(headers: &mut HeaderMap, fwd: &Forwarded<'_>) {
    let ip = fwd.client_ip.to_string();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            // Several X-Forwarded-For lines are one list (RFC 9110 §5.3).
            let all: Vec<&str> = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            format!("{}, {ip}", all.join(", "))
        }
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(fwd.proto),
    );
    match fwd.host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_hop_by_hop_and_connection_listed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn forwarded_headers() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        let host = HeaderValue::from_static("app.local:8080");
        set_forwarded(
            &mut h,
            &Forwarded {
                client_ip: "127.0.0.1".parse().unwrap(),
                proto: "http",
                host: Some(&host),
            },
        );
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.local:8080");
    }
}
