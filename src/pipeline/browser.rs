//! Requests made by a web browser for a page of some other site (part of the first phase,
//! `super::admit`; the admin listener applies it too).
//!
//! The proxy adds eGain credentials to whatever reaches it, and a browser on the proxy's host
//! reaches it on behalf of every site it has open. Same-origin rules keep those sites from
//! reading most answers, but not all: a WebSocket handshake has no CORS check (a page of any
//! site could open a socket through the proxy and read eGain's chat), a form POST or an
//! image GET has its effect whether or not its answer can be read, and a name of the
//! attacker's that resolves to 127.0.0.1 (DNS rebinding) makes the proxy the attacker's
//! own origin, every answer readable.
//!
//! Browsers say where a request comes from: `Origin` (every WebSocket handshake, every
//! cross-origin request but a simple GET, every POST), `Sec-Fetch-Site` (every request to a
//! trustworthy URL: https, loopback) and `Referer` (unless the page suppresses it); and they
//! always send a `Mozilla/` agent with `Accept-Language`. Programs send none of these together
//! and are not affected (`Provenance::is_browser`).
//!
//! A browser's request is refused (403 `forbidden`) when it comes from another site's page —
//! an `Origin`, or failing that a `Referer`, that is neither the proxy's own, nor on this host
//! (a loopback address, `localhost`: its server could call the proxy anyway), nor listed in
//! `server.allowed_origins`; `Sec-Fetch-Site: cross-site`/`same-site` without such a
//! `Referer` — and when it names the proxy by a name that is not the proxy's: not an IP
//! address, not `localhost`, not a route's `host` nor a listed origin's (`HostRule::Own`).
//! What a person opens in the address bar (`Sec-Fetch-Site: none`) passes.

use crate::error::ProxyError;

/// How a browser says where a request comes from.
#[derive(Default, Clone, Copy)]
pub(crate) struct Provenance<'a> {
    /// `Origin`.
    pub origin: Option<&'a [u8]>,
    /// `Sec-Fetch-Site`.
    pub fetch_site: Option<&'a [u8]>,
    /// `Referer`.
    pub referer: Option<&'a [u8]>,
    /// A `User-Agent` as browsers write it (`Mozilla/…`).
    pub mozilla: bool,
    /// An `Accept-Language`, which browsers send with every request.
    pub language: bool,
}

impl<'a> Provenance<'a> {
    /// Collects the fields from a request's fields, given as (name, value).
    pub fn note(&mut self, name: &[u8], value: &'a [u8]) {
        if name.eq_ignore_ascii_case(b"origin") {
            self.origin.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"sec-fetch-site") {
            self.fetch_site.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"referer") {
            self.referer.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"user-agent") {
            self.mozilla |= value.starts_with(b"Mozilla/");
        } else if name.eq_ignore_ascii_case(b"accept-language") {
            self.language = true;
        }
    }

    /// The same from a header map.
    pub fn of(headers: &'a http::HeaderMap) -> Self {
        let mut p = Provenance::default();
        for (name, value) in headers {
            p.note(name.as_str().as_bytes(), value.as_bytes());
        }
        p
    }

    /// A browser's request: `Origin` or `Sec-Fetch-Site`, or — as browsers leave both out
    /// for same-origin GETs to plain `http://` URLs not on a loopback address (Fetch
    /// Metadata goes to trustworthy URLs only) — a browser's `User-Agent` with the
    /// `Accept-Language` every browser sends. Programs that write a browser's `User-Agent`
    /// (PowerShell's `Invoke-WebRequest`) send no `Accept-Language`.
    fn is_browser(&self) -> bool {
        self.origin.is_some() || self.fetch_site.is_some() || (self.mozilla && self.language)
    }
}

/// The names a browser's request may give in `Host` (`check`; DNS rebinding).
pub(crate) enum HostRule<'a> {
    /// The proxy's own: an IP address, `localhost`, a listed origin's host, and those
    /// `is_route_host` says a route is for (asked only of a browser's request). On the proxy's
    /// listener, and the admin listener for connections from this host.
    Own(&'a dyn Fn(&str) -> bool),
    /// Any: the admin listener for connections from elsewhere, its page opened by name on a
    /// management network.
    Any,
}

/// Refuses a browser's request made for another site's page (see the module doc). `host` is
/// the request's `Host` (or h2's `:authority`).
pub(crate) fn check(
    provenance: &Provenance<'_>,
    allowed_origins: &[String],
    host: Option<&str>,
    names: HostRule<'_>,
) -> Result<(), ProxyError> {
    if !provenance.is_browser() {
        return Ok(());
    }
    let refuse = |why: String| Err(ProxyError::BrowserRequest(why));
    let site = provenance.fetch_site.unwrap_or(b"");
    // The origin a page of the proxy's own has under `host`.
    let own = |origin: &str| {
        host.is_some_and(|h| {
            let h = h.to_ascii_lowercase();
            origin == format!("http://{h}") || origin == format!("https://{h}")
        })
    };
    // Listed; or a page served from this host (a loopback address, `localhost`), whose
    // server could call the proxy itself anyway.
    let trusted =
        |origin: &str| allowed_origins.iter().any(|a| a == origin) || is_loopback_origin(origin);
    // The page a request without `Origin` came from, as its `Referer` names it (a page can
    // leave it out, never forge it).
    let referrer = provenance
        .referer
        .map(|r| origin_of(&String::from_utf8_lossy(r)));
    if let Some(origin) = provenance.origin {
        let origin = String::from_utf8_lossy(origin).to_ascii_lowercase();
        if trusted(&origin) {
            return Ok(());
        }
        if !own(&origin) {
            let shown: String = origin.chars().take(100).collect();
            return refuse(format!(
                "a browser request from a page of {shown}; to let pages of that origin use this proxy, add it to server.allowed_origins"
            ));
        }
        // A program that names the proxy's own origin (Python's websocket-client does, by
        // default): browsers send `Sec-Fetch-Site`, or their agent and languages, with it.
        if provenance.fetch_site.is_none() && !(provenance.mozilla && provenance.language) {
            return Ok(());
        }
    } else if site.eq_ignore_ascii_case(b"none") {
        // One a person made (the address bar, a bookmark).
        return Ok(());
    } else if site.eq_ignore_ascii_case(b"cross-site") || site.eq_ignore_ascii_case(b"same-site") {
        // An image, a script, a link of another site's page: unless that page is one the
        // proxy trusts.
        if referrer.as_deref().is_some_and(&trusted) {
            return Ok(());
        }
        return refuse(format!(
            "a browser request made by a page of another site (Sec-Fetch-Site: {})",
            String::from_utf8_lossy(site)
        ));
    } else if let Some(page) = referrer.as_deref().filter(|r| !r.is_empty()) {
        // No marks at all (a plain http:// URL): the referring page says whose it is.
        if trusted(page) {
            return Ok(());
        }
        if !own(page) {
            let shown: String = page.chars().take(100).collect();
            return refuse(format!(
                "a browser request from a page of {shown}; to let pages of that origin use this proxy, add it to server.allowed_origins"
            ));
        }
    }
    let HostRule::Own(is_route_host) = names else {
        return Ok(());
    };
    // A page of the proxy's own origin, or a person at the address bar of a plain http://
    // URL: under a name that cannot be someone else's, or one the config names (a route's
    // host, a listed origin's).
    if host.is_some_and(|h| is_local_name(h) || is_route_host(h))
        || allowed_origins.iter().any(|o| own(o))
    {
        return Ok(());
    }
    refuse(format!(
        "a browser request for {:?}, a name that is not this proxy's own (an IP address, localhost, a route's host or an origin in server.allowed_origins)",
        host.unwrap_or("")
    ))
}

/// `scheme://host[:port]` of a URL, in lower case.
fn origin_of(url: &str) -> String {
    let lower = url.to_ascii_lowercase();
    match lower.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            format!("{scheme}://{authority}")
        }
        None => String::new(),
    }
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

    const CHROME: (&str, &str) = ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/156");
    const LANGUAGE: (&str, &str) = ("accept-language", "en-US");

    /// Whether a request with `fields` for `host` passes on the proxy's listener.
    fn passes(fields: &[(&str, &str)], host: &str) -> bool {
        passes_in(fields, host, HostRule::Own(&|h| h == "portal.internal"))
    }

    fn passes_in(fields: &[(&str, &str)], host: &str, names: HostRule<'_>) -> bool {
        let mut p = Provenance::default();
        for (name, value) in fields {
            p.note(name.as_bytes(), value.as_bytes());
        }
        let allowed = vec!["https://tool.corp".to_owned()];
        check(&p, &allowed, Some(host), names).is_ok()
    }

    #[test]
    fn who_may_use_the_proxy_from_a_browser() {
        let local = "127.0.0.1:8080";
        let site = |s| ("sec-fetch-site", s);
        let origin = |o| ("origin", o);
        // Programs: whatever their Host, even with a browser's User-Agent alone (PowerShell)
        // or Fetch fields of their own (node's fetch sends Sec-Fetch-Mode).
        assert!(passes(&[], "anything.example"));
        assert!(passes(
            &[("user-agent", "Mozilla/5.0 WindowsPowerShell/5.1")],
            "gw.corp"
        ));
        assert!(passes(
            &[
                ("sec-fetch-mode", "cors"),
                ("accept-language", "*"),
                ("user-agent", "node")
            ],
            "gw.corp"
        ));
        // A person at the address bar.
        assert!(passes(
            &[CHROME, LANGUAGE, site("none")],
            "anything.example"
        ));
        assert!(passes(&[CHROME, LANGUAGE], local));
        // Another site's page: a WebSocket, a form POST, a sandboxed frame, an image.
        assert!(!passes(
            &[origin("http://evil.example"), site("cross-site")],
            local
        ));
        assert!(!passes(&[origin("http://evil.example")], local));
        assert!(!passes(&[origin("null")], local));
        assert!(!passes(&[site("cross-site")], local));
        assert!(!passes(&[site("same-site")], local));
        // …and over plain http:// to a name or address not on loopback, where browsers send
        // no Fetch Metadata: its Referer gives it away.
        assert!(!passes(
            &[CHROME, LANGUAGE, ("referer", "http://evil.example/page")],
            "10.1.2.3:8080"
        ));
        // Pages served from this host.
        assert!(passes(
            &[origin("http://localhost:3000"), site("cross-site")],
            local
        ));
        assert!(passes(
            &[origin("http://127.0.0.2:3000"), site("cross-site")],
            local
        ));
        assert!(passes(
            &[origin("http://[::1]:3000"), site("cross-site")],
            local
        ));
        assert!(passes(
            &[origin("http://app.localhost"), site("cross-site")],
            local
        ));
        assert!(!passes(
            &[origin("http://10.0.0.1:3000"), site("cross-site")],
            local
        ));
        assert!(!passes(&[origin("http://localhost.evil.example")], local));
        assert!(!passes(&[origin("file://localhost")], local));
        // Listed, and its page's images (no Origin, its Referer).
        assert!(passes(
            &[origin("https://tool.corp"), site("cross-site")],
            local
        ));
        assert!(passes(
            &[origin("HTTPS://TOOL.CORP"), site("cross-site")],
            local
        ));
        assert!(!passes(
            &[origin("https://tool.corp:444"), site("cross-site")],
            local
        ));
        assert!(passes(
            &[site("cross-site"), ("referer", "https://tool.corp/app?x")],
            local
        ));
        assert!(!passes(
            &[site("cross-site"), ("referer", "https://tool.corp.evil/")],
            local
        ));
        // The proxy's own origin, under its own names.
        assert!(passes(
            &[origin("http://127.0.0.1:8080"), site("same-origin")],
            local
        ));
        assert!(passes(&[site("same-origin")], "localhost:8080"));
        assert!(passes(&[site("same-origin")], "api.localhost"));
        assert!(passes(&[site("same-origin")], "[::1]:8080"));
        // DNS rebinding: the attacker's name, same origin as far as the browser knows, with
        // Fetch Metadata (https, loopback) or without (Chromium over plain http).
        let rebound = "rebind.example:8080";
        assert!(!passes(
            &[origin("http://rebind.example:8080"), site("same-origin")],
            rebound
        ));
        assert!(!passes(&[site("same-origin")], rebound));
        assert!(!passes(&[CHROME, LANGUAGE], rebound));
        assert!(!passes(
            &[
                CHROME,
                LANGUAGE,
                ("referer", "http://rebind.example:8080/a")
            ],
            rebound
        ));
        assert!(!passes(&[site("same-origin")], "localhost.evil.example"));
        // …unless a route is for that name, or it is a listed origin's.
        assert!(passes(&[site("same-origin")], "portal.internal"));
        assert!(passes(&[site("same-origin")], "tool.corp"));
        // A program naming the proxy's own origin (websocket-client); a browser doing so under
        // a rebound name.
        assert!(passes(&[origin("http://gw.corp:8080")], "gw.corp:8080"));
        assert!(!passes(
            &[origin("http://gw.corp:8080"), CHROME, LANGUAGE],
            "gw.corp:8080"
        ));
        // A listed page's image, to the proxy by name over plain http (no Fetch Metadata).
        assert!(passes(
            &[CHROME, LANGUAGE, ("referer", "https://tool.corp/app")],
            "gw.corp:8080"
        ));
        // The admin listener: where a request comes from, not its Host.
        assert!(passes_in(
            &[CHROME, LANGUAGE],
            "admin.corp:9901",
            HostRule::Any
        ));
        assert!(!passes_in(
            &[origin("http://evil.example")],
            "admin.corp:9901",
            HostRule::Any
        ));
    }
}
