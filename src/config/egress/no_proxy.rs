//! `NO_PROXY`: which hosts the environment's egress proxy is not used for.

use std::net::IpAddr;

use ipnet::IpNet;

/// A parsed `NO_PROXY` list, read as curl and Go read it: comma-separated host names and
/// domain suffixes (`corp`, `.corp` and `*.corp` all match `corp` and `x.corp`), IP
/// addresses and CIDR blocks (matched against literal IP hosts; no name is resolved), each
/// with an optional `:port`, and `*` for every host. Case and a trailing dot are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    pub raw: String,
    entries: Vec<(String, Entry)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    All,
    Net(IpNet, Option<u16>),
    Name(String, Option<u16>),
}

impl NoProxy {
    pub fn parse(raw: &str) -> NoProxy {
        let entries = raw
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .filter_map(|e| Some((e.to_owned(), parse_entry(&e.to_ascii_lowercase())?)))
            .collect();
        NoProxy {
            raw: raw.trim().to_owned(),
            entries,
        }
    }

    /// The entry that exempts `host` (an IPv6 literal with or without brackets) on `port`.
    pub fn matches(&self, host: &str, port: u16) -> Option<&str> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        let port_ok = |p: &Option<u16>| p.map_or(true, |p| p == port);
        self.entries
            .iter()
            .find(|(_, entry)| match entry {
                Entry::All => true,
                Entry::Net(net, p) => ip.is_some_and(|ip| net.contains(&ip)) && port_ok(p),
                Entry::Name(name, p) => {
                    ip.is_none()
                        && (host == *name
                            || host
                                .strip_suffix(name.as_str())
                                .is_some_and(|h| h.ends_with('.')))
                        && port_ok(p)
                }
            })
            .map(|(text, _)| text.as_str())
    }
}

fn parse_entry(e: &str) -> Option<Entry> {
    if e == "*" {
        return Some(Entry::All);
    }
    if let Some(net) = parse_net(e) {
        return Some(Entry::Net(net, None));
    }
    // `[v6]`, `[v6]:port`, `name:port`, `v4:port`, `cidr:port`.
    let (body, port) = if let Some(inner) = e.strip_prefix('[') {
        let (addr, after) = inner.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse::<u16>().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some(Entry::Net(parse_net(addr)?, port));
    } else {
        match e.rsplit_once(':') {
            Some((body, p)) if !body.contains(':') => (body, Some(p.parse::<u16>().ok()?)),
            Some(_) => return None,
            None => (e, None),
        }
    };
    if let Some(net) = parse_net(body) {
        return Some(Entry::Net(net, port));
    }
    let name = body.strip_prefix("*.").unwrap_or(body);
    let name = name.strip_prefix('.').unwrap_or(name);
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return None;
    }
    Some(Entry::Name(name.to_owned(), port))
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_names_domains_ips_cidrs_ports_and_star() {
        let np = NoProxy::parse(
            " corp, .example.com ,*.wild.test, 10.0.0.0/8, 192.168.1.7, ::1, [fd00::/8], \
             api.svc:8443, 172.16.0.1:80, [2001:db8::1]:443, Mixed.Case., bad:port:x,",
        );
        let m = |host: &str, port: u16| np.matches(host, port).is_some();
        // Names and suffixes, with or without the leading dot or `*.`.
        assert!(m("corp", 443) && m("x.corp", 443) && m("a.b.corp", 80));
        assert!(!m("notcorp", 443) && !m("corp.evil", 443));
        assert!(m("example.com", 443) && m("www.example.com", 443));
        assert!(!m("badexample.com", 443));
        assert!(m("wild.test", 443) && m("a.wild.test", 443));
        // Case and a trailing dot do not matter.
        assert!(m("X.CORP.", 443) && m("mixed.case", 443) && m("a.mixed.case", 1));
        // Addresses and blocks match literal IP hosts only; brackets are optional.
        assert!(m("10.1.2.3", 443) && !m("11.0.0.1", 443));
        assert!(m("192.168.1.7", 1) && !m("192.168.1.8", 1));
        assert!(m("[::1]", 443) && m("::1", 443));
        assert!(m("[fd12::5]", 443) && !m("[fe80::1]", 443));
        // Ports restrict an entry to that port.
        assert!(m("api.svc", 8443) && !m("api.svc", 443));
        assert!(m("172.16.0.1", 80) && !m("172.16.0.1", 443));
        assert!(m("[2001:db8::1]", 443) && !m("[2001:db8::1]", 80));
        // Loopback is not exempt by itself.
        assert!(!m("127.0.0.1", 80) && !m("localhost", 80));
        assert_eq!(np.matches("x.corp", 1), Some("corp"));

        let all = NoProxy::parse("foo, *");
        assert!(all.matches("anything.at.all", 1).is_some());
        assert!(NoProxy::parse("").matches("x", 1).is_none());
        assert!(NoProxy::parse(" , ,").matches("x", 1).is_none());
    }
}
