//! The request side of the fast path: parsing a request head in place (what it takes and
//! what it leaves to hyper) and writing the upstream request from those bytes.

use std::net::IpAddr;
use std::ops::Range;

use http::header::HeaderValue;
use http::Method;

use super::{body, write_field, MAX_HEADERS};
use crate::http::{is_sane_request_id, new_request_id};
use crate::pipeline::{ConnInfo, REPLAY_LIMIT};
use crate::routes::Route;
use crate::token::AccessToken;

/// The fast path's per-request head work, for the micro-benchmarks: parses `raw` (one
/// request head), takes a request id, and writes the upstream request for `route` into
/// `out`. `false` when the fast path would hand the request to hyper.
#[doc(hidden)]
pub fn rewrite_head(
    raw: &[u8],
    route: &Route,
    token: Option<&AccessToken>,
    out: &mut Vec<u8>,
) -> bool {
    let mut spans = Vec::new();
    let Parsed::Complete(head) = parse_request(raw, &mut spans) else {
        return false;
    };
    if raw.len() < head.head_len + head.body_len {
        return false;
    }
    let request_id = request_id(raw, &head);
    RequestParts {
        buf: raw,
        head: &head,
        spans: &spans,
        route,
        conn: ConnInfo {
            peer: ([127, 0, 0, 1], 50000).into(),
            tls: false,
        },
        request_id: &request_id,
        key_header: None,
    }
    .write(out, token);
    true
}

/// One header field of the current request: where its name and value are in the read
/// buffer, and what the upstream request does with it.
#[derive(Clone)]
pub(super) struct Span {
    pub(super) name: Range<usize>,
    pub(super) value: Range<usize>,
    pub(super) kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Passed on as is.
    Keep,
    /// Hop-by-hop or replaced by the proxy.
    Skip,
    /// `X-Forwarded-For`: extended.
    Forwarded,
}

/// A parsed request head (positions are into the read buffer).
pub(super) struct Head {
    pub(super) method: Method,
    pub(super) path: Range<usize>,
    pub(super) query: Option<Range<usize>>,
    pub(super) head_len: usize,
    pub(super) body_len: usize,
    pub(super) host: Option<Range<usize>>,
    pub(super) request_id: Option<Range<usize>>,
    pub(super) close: bool,
    /// The client framed a body with `Content-Length` (the proxy writes its own).
    pub(super) has_length: bool,
    /// `Connection` names fields besides `close`/`keep-alive`: those are hop-by-hop too.
    pub(super) names_fields: bool,
}

pub(super) enum Parsed {
    Complete(Head),
    Partial,
    HandOver,
}

/// Everything needed to write the upstream request.
pub(super) struct RequestParts<'a> {
    pub(super) buf: &'a [u8],
    pub(super) head: &'a Head,
    pub(super) spans: &'a [Span],
    pub(super) route: &'a Route,
    pub(super) conn: ConnInfo,
    pub(super) request_id: &'a HeaderValue,
    /// The API key header (`[server.access]`), never passed on.
    pub(super) key_header: Option<&'a http::HeaderName>,
}

impl RequestParts<'_> {
    /// The upstream request: request line with the upstream target, `Host` = upstream
    /// authority, the client's end-to-end fields minus those the route removes or sets,
    /// `X-Forwarded-*`, `x-request-id`, the route's fields, the token, then the body.
    pub(super) fn write(&self, out: &mut Vec<u8>, token: Option<&AccessToken>) {
        let buf = self.buf;
        let head = self.head;
        let route = &self.route.config;
        let path = text(&buf[head.path.clone()]);
        let query = head.query.clone().map(|q| text(&buf[q]));
        out.clear();
        out.extend_from_slice(head.method.as_str().as_bytes());
        out.push(b' ');
        // As Route::upstream_path_and_query, without building a String.
        let base = route.upstream.base_path.as_bytes();
        let tail = self.route.upstream_tail(path).as_bytes();
        if base.is_empty() && tail.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(base);
        out.extend_from_slice(tail);
        if let Some(query) = query {
            out.push(b'?');
            out.extend_from_slice(query.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(route.upstream.authority.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");

        // Managed fields (framing, Host, Authorization, X-Forwarded-*, x-request-id) are
        // never `Kind::Keep`, and no route may name them (config), so what follows cannot
        // drop or duplicate them.
        let removed = |name: &[u8]| {
            route
                .remove_headers
                .iter()
                .chain(route.set_headers.iter().map(|(n, _)| n))
                .chain(self.key_header)
                .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
        };
        for span in self.spans {
            if span.kind != Kind::Keep {
                continue;
            }
            let name = &buf[span.name.clone()];
            if removed(name) {
                continue;
            }
            let value = &buf[span.value.clone()];
            if head.names_fields && self.conn_listed(name) {
                continue;
            }
            write_field(out, name, value);
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        // Several X-Forwarded-For lines are one list (RFC 9110 §5.3), extended when its
        // first line is not blank (as proxy::headers::set_forwarded).
        let mut list = self
            .spans
            .iter()
            .filter(|s| s.kind == Kind::Forwarded)
            .map(|s| &buf[s.value.clone()]);
        if let Some(first) = list.next().filter(|v| !body::trim(v).is_empty()) {
            for value in std::iter::once(first).chain(list) {
                out.extend_from_slice(value);
                out.extend_from_slice(b", ");
            }
        }
        write_ip(out, self.conn.peer.ip().to_canonical());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(if self.conn.tls {
            b"x-forwarded-proto: https\r\n"
        } else {
            b"x-forwarded-proto: http\r\n"
        });
        if let Some(host) = &head.host {
            write_field(out, b"x-forwarded-host", &buf[host.clone()]);
        }
        write_field(out, b"x-request-id", self.request_id.as_bytes());
        for (name, value) in &route.set_headers {
            write_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
        if let Some(token) = token {
            write_field(out, b"authorization", token.header.as_bytes());
        }
        // The proxy frames the body it sends: the length of what it read, whatever fields
        // the client, `Connection` or the route named (RFC 9112 §6.3, §11.2).
        if head.has_length {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(head.body_len).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&buf[head.head_len..head.head_len + head.body_len]);
    }

    /// Whether the client's `Connection` field names this field (then it is hop-by-hop,
    /// unless the proxy manages it).
    fn conn_listed(&self, name: &[u8]) -> bool {
        crate::http::connection_drops(name)
            && self.spans.iter().any(|s| {
                self.buf[s.name.clone()].eq_ignore_ascii_case(b"connection")
                    && body::list_items(&self.buf[s.value.clone()])
                        .any(|token| token.eq_ignore_ascii_case(name))
            })
    }
}

/// An address as `Display` writes it, without a String for the common IPv4 case.
pub(super) fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(_) => out.extend_from_slice(ip.to_string().as_bytes()),
    }
}

/// The client's `x-request-id` when it is sane, else a new one.
pub(super) fn request_id(buf: &[u8], head: &Head) -> HeaderValue {
    match &head.request_id {
        Some(r) if is_sane_request_id(&buf[r.clone()]) => {
            HeaderValue::from_bytes(&buf[r.clone()]).unwrap_or_else(|_| new_request_id())
        }
        _ => new_request_id(),
    }
}

pub(super) fn text(bytes: &[u8]) -> &str {
    // Request targets and host values were checked to be ASCII when parsed.
    std::str::from_utf8(bytes).unwrap_or("")
}

/// Bytes allowed in a request target on the fast path: RFC 3986 `pchar`, `/` and `?`. Any
/// other byte sends the request to hyper, which applies its own (stricter) URI rules.
pub(super) fn is_target_byte(b: u8) -> bool {
    TARGET_BYTES[usize::from(b)]
}

pub(super) static TARGET_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"-._~!$&'()*+,;=:@/?%";
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
};

pub(super) fn parse_request(buf: &[u8], spans: &mut Vec<Span>) -> Parsed {
    // Left uninitialised: httparse fills what it uses (saves a 3 KiB memset per request).
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let head_len = match request.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::HandOver,
    };
    if request.version != Some(1) {
        return Parsed::HandOver;
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Parsed::HandOver;
    };
    if method == "CONNECT" || !target.starts_with('/') || !target.bytes().all(is_target_byte) {
        return Parsed::HandOver;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::HandOver;
    };
    let base = buf.as_ptr() as usize;
    let range = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let target_range = range(target.as_bytes());
    let (path, query) = match target.bytes().position(|b| b == b'?') {
        Some(q) => (
            target_range.start..target_range.start + q,
            Some(target_range.start + q + 1..target_range.end),
        ),
        None => (target_range, None),
    };
    let mut head = Head {
        method,
        path,
        query,
        head_len,
        body_len: 0,
        host: None,
        request_id: None,
        close: false,
        has_length: false,
        names_fields: false,
    };
    let mut content_length = None;
    spans.clear();
    for h in request.headers.iter() {
        let name = h.name;
        let value = range(h.value);
        let kind = match Known::of(name) {
            Some(Known::ContentLength) => {
                let Some(n) = body::parse_length(h.value) else {
                    return Parsed::HandOver;
                };
                if content_length.is_some() || n > REPLAY_LIMIT as u64 {
                    return Parsed::HandOver;
                }
                content_length = Some(n as usize);
                Kind::Skip
            }
            Some(Known::Host) => {
                // Two Host fields or an invalid one: hyper's path answers 400 (the pipeline's
                // rule, `crate::http::host_fields_error`).
                if head.host.is_some() || !crate::http::is_valid_host(h.value) {
                    return Parsed::HandOver;
                }
                head.host = Some(value.clone());
                Kind::Skip
            }
            Some(Known::Connection) => {
                for token in body::list_items(h.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        head.close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return Parsed::HandOver;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        head.names_fields = true;
                    }
                }
                Kind::Skip
            }
            Some(Known::HandOver) => return Parsed::HandOver,
            Some(Known::RequestId) => {
                if head.request_id.is_none() {
                    head.request_id = Some(value.clone());
                }
                Kind::Skip
            }
            Some(Known::ForwardedFor) => Kind::Forwarded,
            Some(Known::Dropped) => Kind::Skip,
            None => Kind::Keep,
        };
        spans.push(Span {
            name: range(name.as_bytes()),
            value,
            kind,
        });
    }
    if head.host.is_none() {
        return Parsed::HandOver;
    }
    head.has_length = content_length.is_some();
    head.body_len = content_length.unwrap_or(0);
    Parsed::Complete(head)
}

/// Request header fields the fast path treats specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Known {
    ContentLength,
    Host,
    Connection,
    RequestId,
    ForwardedFor,
    /// Hop-by-hop (RFC 9110 §7.6.1, plus `Keep-Alive`, `Proxy-Connection` and the proxy-auth
    /// pair, as `proxy::headers::is_hop_by_hop`) or set by the proxy itself.
    Dropped,
    /// `Transfer-Encoding`, `Expect`, `Upgrade`: hyper serves such requests.
    HandOver,
}

impl Known {
    /// Sorted by length first: one or two comparisons per field instead of a dozen.
    fn of(name: &str) -> Option<Known> {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        Some(match name.len() {
            2 if is("te") => Known::Dropped,
            4 if is("host") => Known::Host,
            6 if is("expect") => Known::HandOver,
            7 if is("upgrade") => Known::HandOver,
            7 if is("trailer") => Known::Dropped,
            10 if is("connection") => Known::Connection,
            10 if is("keep-alive") => Known::Dropped,
            12 if is("x-request-id") => Known::RequestId,
            13 if is("authorization") => Known::Dropped,
            14 if is("content-length") => Known::ContentLength,
            15 if is("x-forwarded-for") => Known::ForwardedFor,
            16 if is("x-forwarded-host") || is("proxy-connection") => Known::Dropped,
            17 if is("x-forwarded-proto") => Known::Dropped,
            17 if is("transfer-encoding") => Known::HandOver,
            18 if is("proxy-authenticate") => Known::Dropped,
            19 if is("proxy-authorization") => Known::Dropped,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Instant;

    fn test_route() -> crate::routes::RouteTable {
        let config = crate::config::Config::parse(
            "[profiles.p]\nkind = \"client_app\"\ntoken_url = \"http://127.0.0.1:1/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n[[routes]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1/base\"\nprofile = \"p\"\nset_headers = { x-team = \"t\" }\nremove_headers = [\"cookie\"]\n",
            std::path::Path::new("."),
            &|_| None,
        )
        .unwrap();
        crate::routes::RouteTable::new(&config.routes)
    }

    proptest! {
        /// Whatever arrives, the fast path parses it, leaves it to hyper or waits for more,
        /// and what it writes upstream carries the proxy's token and never the client's.
        #[test]
        fn any_bytes_are_parsed_or_handed_over_never_a_panic(
            line in "(GET|POST|PUT|HEAD|DELETE|PATCH|FOO) /[a-z0-9/%?=&.]{0,20} HTTP/1\\.[01]\r\n",
            fields in proptest::collection::vec(
                "(Host|Authorization|Connection|Content-Length|X-Forwarded-For|X-Request-Id|Cookie|TE|Accept|X-Team)(: ?)[ -~]{0,24}\r\n",
                0..8,
            ),
            tail in proptest::collection::vec(any::<u8>(), 0..40),
            noise in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let table = test_route();
            let route = table.iter().next().unwrap();
            let token = AccessToken::new("proxy-token", std::time::Duration::from_secs(60), Instant::now(), None).unwrap();
            let mut raw = line.into_bytes();
            for f in &fields {
                raw.extend_from_slice(f.as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            raw.extend_from_slice(&tail);
            let mut out = Vec::new();
            if rewrite_head(&raw, route, Some(&token), &mut out) {
                let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
                prop_assert_eq!(text.matches("authorization:").count(), 1);
                prop_assert!(text.contains("authorization: bearer proxy-token\r\n"));
                prop_assert!(!text.contains("cookie:"));
                prop_assert_eq!(text.matches("x-team:").count(), 1);
                let method_len = raw.iter().position(|&b| b == b' ').unwrap_or(0);
                let method = String::from_utf8_lossy(&raw[..method_len]).to_ascii_lowercase();
                let expected = format!("{method} /base");
                prop_assert!(text.starts_with(&expected), "{}", text);
            }
            let mut spans = Vec::new();
            let _ = parse_request(&noise, &mut spans);
            let _ = rewrite_head(&noise, route, None, &mut out);
        }
    }

    #[test]
    fn field_tables_agree_with_the_general_path() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-authenticate",
        ] {
            let header = http::HeaderName::from_static(name);
            assert!(crate::pipeline::headers::is_hop_by_hop(&header), "{name}");
            assert!(
                crate::http::is_hop_by_hop(name.to_ascii_uppercase().as_bytes()),
                "{name}"
            );
            // A hop-by-hop field on a request is dropped, or the request goes to hyper.
            assert!(
                matches!(
                    Known::of(name),
                    Some(Known::Dropped | Known::HandOver | Known::Connection)
                ),
                "{name}"
            );
        }
        for name in ["x-forwarded-proto", "X-Forwarded-Host", "Authorization"] {
            assert_eq!(Known::of(name), Some(Known::Dropped), "{name}");
        }
        for name in ["accept", "x-forwarded", "hosts", "content-type"] {
            assert_eq!(Known::of(name), None, "{name}");
            assert!(!crate::http::is_hop_by_hop(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.255.9",
            "192.168.100.1",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn what_the_fast_path_leaves_to_hyper() {
        let mut spans = Vec::new();
        let handed_over = |raw: &str, spans: &mut Vec<Span>| {
            matches!(parse_request(raw.as_bytes(), spans), Parsed::HandOver)
        };
        for raw in [
            "GET / HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET http://elsewhere/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            "GET /a\"b HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(handed_over(raw, &mut spans), "{raw:?}");
        }
        let raw = "POST /a/b?x=%20&y HTTP/1.1\r\nHost: app:8080\r\nContent-Length: 4\r\nConnection: keep-alive, X-Hop\r\n\r\nbody";
        let Parsed::Complete(head) = parse_request(raw.as_bytes(), &mut spans) else {
            panic!("a plain request stays on the fast path");
        };
        assert_eq!(&raw[head.path.clone()], "/a/b");
        assert_eq!(&raw[head.query.clone().unwrap()], "x=%20&y");
        assert_eq!(&raw[head.host.clone().unwrap()], "app:8080");
        assert_eq!(head.body_len, 4);
        assert_eq!(head.head_len, raw.len() - 4);
        assert!(head.names_fields && !head.close);
        assert!(matches!(
            parse_request(&raw.as_bytes()[..20], &mut spans),
            Parsed::Partial
        ));
    }
}
