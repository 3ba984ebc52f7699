//! Requests made by a web browser for a page of some other site (part of the first phase,
//! `super::admit`).
//!
//! The proxy adds eGain credentials to whatever reaches it, and a browser on the proxy's host
//! reaches it on behalf of every site it has open. Same-origin rules keep those sites from
//! reading most answers, but not all: a WebSocket handshake has no CORS check (a page of any
//! site could open a socket through the proxy and read eGain's chat), a form POST or an
//! image GET has its effect whether or not its answer can be read, and a name of the
//! attacker's that resolves to 127.0.0.1 (DNS rebinding) makes the proxy the attacker's
//! own origin, every answer readable. Browsers say where a request comes from: `Origin`
//! (every WebSocket handshake, every cross-origin request but a simple GET, every POST) and
//! `Sec-Fetch-Site` (every request, in current browsers). Programs that are not browsers
//! send neither, and are not affected.
//!
//! So a browser request is refused (403 `forbidden`) when it comes from another site — an
//! `Origin` that is neither listed in `server.allowed_origins`, nor the proxy's own, nor on
//! this host (a loopback address, `localhost`: its server could call the proxy anyway), or
//! `Sec-Fetch-Site: cross-site`/`same-site` — and when it comes from a page of the proxy's
//! own origin under a name that is not one: not an IP address, not `localhost`, not a
//! route's `host` nor a listed origin's. What a person opens in the address bar (`Sec-Fetch-Site: none`, no
//! `Origin`) passes.

use crate::error::ProxyError;

/// How a browser says where a request comes from.
#[derive(Default, Clone, Copy)]
pub(crate) struct Provenance<'a> {
    /// `Origin`.
    pub origin: Option<&'a [u8]>,
    /// `Sec-Fetch-Site`.
    pub fetch_site: Option<&'a [u8]>,
}

impl<'a> Provenance<'a> {
    /// Collects the two fields from a request's fields, given as (name, value).
    pub fn note(&mut self, name: &[u8], value: &'a [u8]) {
        if name.eq_ignore_ascii_case(b"origin") {
            self.origin.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"sec-fetch-site") {
            self.fetch_site.get_or_insert(value);
        }
    }
}

/// Refuses a browser's request made for another site's page (see the module doc). `host` is
/// the request's `Host` (or h2's `:authority`); `host_routed` says whether the route that
/// takes it matched on its `host`.
pub(crate) fn check(
    provenance: &Provenance<'_>,
    allowed_origins: &[String],
    host: Option<&str>,
    host_routed: bool,
) -> Result<(), ProxyError> {
    let refuse = |why: String| Err(ProxyError::BrowserRequest(why));
    let site = provenance.fetch_site.unwrap_or(b"");
    // The origin a page of the proxy's own has under `host`.
    let own = |origin: &str| {
        host.is_some_and(|h| {
            let h = h.to_ascii_lowercase();
            origin == format!("http://{h}") || origin == format!("https://{h}")
        })
    };
    if let Some(origin) = provenance.origin {
        let origin = String::from_utf8_lossy(origin).to_ascii_lowercase();
        // Listed; or a page served from this host (a loopback address, `localhost`), whose
        // server could call the proxy itself anyway.
        if allowed_origins.contains(&origin) || is_loopback_origin(&origin) {
            return Ok(());
        }
        if !own(&origin) {
            let shown: String = origin.chars().take(100).collect();
            return refuse(format!(
                "a browser request from a page of {shown}; to let pages of that origin use this proxy, add it to server.allowed_origins"
            ));
        }
    } else if provenance.fetch_site.is_none() || site.eq_ignore_ascii_case(b"none") {
        // Not a browser's, or one a person made (the address bar, a bookmark).
        return Ok(());
    }
    if site.eq_ignore_ascii_case(b"cross-site") || site.eq_ignore_ascii_case(b"same-site") {
        return refuse(format!(
            "a browser request made by a page of another site (Sec-Fetch-Site: {})",
            String::from_utf8_lossy(site)
        ));
    }
    // A page of the proxy's own origin: under a name that cannot be someone else's, or one
    // the config names (a route's host, a listed origin).
    if host_routed || host.is_some_and(is_local_name) || allowed_origins.iter().any(|o| own(o)) {
        return Ok(());
    }
    refuse(format!(
        "a browser request for {:?}, a name that is not this proxy's own (an IP address, localhost, or a route's host)",
        host.unwrap_or("")
    ))
}

/// `http(s)://` and a loopback address or `localhost` (or a name under it), with any port.
fn is_loopback_origin(origin: &str) -> bool {
    let Some(host) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let (name, _) = split_port(host);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
        || name == "localhost"
        || name.ends_with(".localhost")
}

/// `host[:port]` into the name (an IPv6 literal keeps its brackets) and the port, if any.
fn split_port(host: &str) -> (&str, Option<&str>) {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.find(']') {
            Some(end) => (&host[..end + 2], rest[end + 1..].strip_prefix(':')),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => (name, Some(port)),
        _ => (host, None),
    }
}

/// An IP address, `localhost` or a name under it (RFC 6761 §6.3: always this host), with
/// any port: names no DNS answer can point here.
fn is_local_name(host: &str) -> bool {
    let (name, _) = split_port(host);
    if let Some(v6) = name.strip_prefix('[') {
        return v6
            .trim_end_matches(']')
            .parse::<std::net::Ipv6Addr>()
            .is_ok();
    }
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(origin: Option<&str>, site: Option<&str>, host: &str, routed: bool) -> bool {
        let p = Provenance {
            origin: origin.map(str::as_bytes),
            fetch_site: site.map(str::as_bytes),
        };
        let allowed = vec!["https://tool.corp".to_owned()];
        check(&p, &allowed, Some(host), routed).is_ok()
    }

    #[test]
    fn who_may_use_the_proxy_from_a_browser() {
        let local = "127.0.0.1:8080";
        // Not a browser, or a person at the address bar.
        assert!(verdict(None, None, "anything.example", false));
        assert!(verdict(None, Some("none"), "anything.example", false));
        // Another site's page: a WebSocket, a form POST, an image.
        assert!(!verdict(
            Some("http://evil.example"),
            Some("cross-site"),
            local,
            false
        ));
        assert!(!verdict(Some("http://evil.example"), None, local, false));
        assert!(!verdict(Some("null"), None, local, false));
        assert!(!verdict(None, Some("cross-site"), local, false));
        assert!(!verdict(None, Some("same-site"), local, false));
        // Pages served from this host.
        assert!(verdict(
            Some("http://localhost:3000"),
            Some("cross-site"),
            local,
            false
        ));
        assert!(verdict(
            Some("http://127.0.0.2:3000"),
            Some("cross-site"),
            local,
            false
        ));
        assert!(verdict(
            Some("http://[::1]:3000"),
            Some("cross-site"),
            local,
            false
        ));
        assert!(verdict(
            Some("http://app.localhost"),
            Some("cross-site"),
            local,
            false
        ));
        assert!(!verdict(
            Some("http://10.0.0.1:3000"),
            Some("cross-site"),
            local,
            false
        ));
        assert!(!verdict(
            Some("http://localhost.evil.example"),
            None,
            local,
            false
        ));
        assert!(!verdict(Some("file://localhost"), None, local, false));
        // Listed.
        assert!(verdict(
            Some("https://tool.corp"),
            Some("cross-site"),
            local,
            false
        ));
        assert!(verdict(
            Some("HTTPS://TOOL.CORP"),
            Some("cross-site"),
            local,
            false
        ));
        assert!(!verdict(
            Some("https://tool.corp:444"),
            Some("cross-site"),
            local,
            false
        ));
        // The proxy's own origin, under its own names.
        assert!(verdict(
            Some("http://127.0.0.1:8080"),
            Some("same-origin"),
            local,
            false
        ));
        assert!(verdict(None, Some("same-origin"), "localhost:8080", false));
        assert!(verdict(None, Some("same-origin"), "api.localhost", false));
        assert!(verdict(None, Some("same-origin"), "[::1]:8080", false));
        // DNS rebinding: the attacker's name, same origin as far as the browser knows.
        assert!(!verdict(
            Some("http://rebind.example:8080"),
            Some("same-origin"),
            "rebind.example:8080",
            false
        ));
        assert!(!verdict(
            None,
            Some("same-origin"),
            "rebind.example:8080",
            false
        ));
        assert!(!verdict(
            None,
            Some("same-origin"),
            "localhost.evil.example",
            false
        ));
        // …unless a route is for that name, or it is a listed origin's.
        assert!(verdict(None, Some("same-origin"), "portal.internal", true));
        assert!(verdict(None, Some("same-origin"), "tool.corp", false));
    }
}
