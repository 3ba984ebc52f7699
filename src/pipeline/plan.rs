//! The upstream request plan: what the upstream request becomes, decided once from the
//! client's head and the route (contract §3), and two encoders for it: raw HTTP/1.1 bytes for
//! the fast path, a `HeaderMap` for hyper's client. "Decide once, encode twice."
//!
//! The upstream gets: the upstream target and `Host`; the client's end-to-end fields minus
//! hop-by-hop ones, those `Connection` names, the API key, and those the route removes or
//! sets; `X-Forwarded-For` (the client's list, extended), `X-Forwarded-Proto`,
//! `X-Forwarded-Host`, `x-request-id`; the route's fields; the token; and the proxy's own
//! framing.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};

use super::ConnInfo;
use crate::http::{classify, connection_drops, is_hop_by_hop, list_items, trim, FieldClass};
use crate::routes::Route;
use crate::token::AccessToken;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What becomes of one field of the client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Pass,
    Drop,
    /// `X-Forwarded-For`: its values start the list the proxy extends.
    ForwardedFor,
}

/// One request's plan.
pub struct Plan<'a> {
    pub route: &'a Route,
    pub conn: ConnInfo,
    pub request_id: &'a HeaderValue,
    /// The API key header (`[server.access]`), never passed on.
    pub key_header: Option<&'a HeaderName>,
}

/// The client's request as the raw encoder reads it.
pub struct RawHead<'a, F> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The client's `Host` value (becomes `X-Forwarded-Host`).
    pub host: Option<&'a [u8]>,
    /// Every field, in order: (name, value).
    pub fields: F,
    /// The body length when the client framed one with `Content-Length`.
    pub body_len: Option<usize>,
    /// Whether a `Connection` field names fields (anything but `is_connection_option`s); the
    /// parser saw every `Connection` line, so it tells rather than have the encoder look.
    pub connection_names: bool,
}

impl Plan<'_> {
    /// The rule for one client field; `named_in_connection` says whether the client's
    /// `Connection` lists it.
    pub fn fate(&self, name: &[u8], named_in_connection: impl FnOnce() -> bool) -> Fate {
        match classify(name) {
            FieldClass::ForwardedFor => return Fate::ForwardedFor,
            // Managed fields are the proxy's to write (framing, Host, Authorization, its own
            // X-Forwarded-* and x-request-id); `Expect` was answered on this hop (hyper sends
            // the 100 when the body is first read; RFC 9110 §10.1.1).
            FieldClass::Managed
            | FieldClass::HopByHop
            | FieldClass::TransferEncoding
            | FieldClass::Expect
            | FieldClass::PathOverride => return Fate::Drop,
            // A GET-only route would otherwise take a DELETE in disguise.
            FieldClass::MethodOverride if self.route.config.methods.is_some() => return Fate::Drop,
            FieldClass::MethodOverride | FieldClass::Other => {}
        }
        let route = &self.route.config;
        let named = |n: &HeaderName| name.eq_ignore_ascii_case(n.as_str().as_bytes());
        if self.key_header.is_some_and(named)
            || route.remove_headers.iter().any(named)
            || route.set_headers.iter().any(|(n, _)| named(n))
            || named_in_connection()
        {
            return Fate::Drop;
        }
        Fate::Pass
    }

    /// Appends the `X-Forwarded-For` value: the client's list (several lines are one list,
    /// RFC 9110 §5.3), kept when its first line is not blank, then the client's address.
    pub fn write_forwarded_for<'v>(
        &self,
        client: impl Iterator<Item = &'v [u8]>,
        out: &mut Vec<u8>,
    ) {
        let mut client = client;
        if let Some(first) = client.next().filter(|v| !trim(v).is_empty()) {
            for value in std::iter::once(first).chain(client) {
                out.extend_from_slice(value);
                out.extend_from_slice(b", ");
            }
        }
        write_ip(out, self.conn.peer.ip().to_canonical());
    }

    pub fn forwarded_proto(&self) -> &'static str {
        if self.conn.tls {
            "https"
        } else {
            "http"
        }
    }

    /// The fast path's encoding: the whole upstream request head, then `body`.
    pub fn encode_h1<'f, F>(
        &self,
        head: &RawHead<'_, F>,
        token: Option<&AccessToken>,
        body: &[u8],
        out: &mut Vec<u8>,
    ) where
        F: Iterator<Item = (&'f [u8], &'f [u8])> + Clone,
    {
        let route = &self.route.config;
        out.clear();
        out.extend_from_slice(head.method.as_bytes());
        out.push(b' ');
        // As Route::upstream_path_and_query, without building a String.
        let base = route.upstream.base_path.as_bytes();
        let tail = self.route.upstream_tail(head.path).as_bytes();
        if base.is_empty() && tail.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(base);
        out.extend_from_slice(tail);
        if let Some(query) = head.query {
            out.push(b'?');
            out.extend_from_slice(query.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(route.upstream.authority.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");

        let connection_names = head.connection_names;
        let named = |name: &[u8]| {
            connection_names
                && head.fields.clone().any(|(n, v)| {
                    n.eq_ignore_ascii_case(b"connection")
                        && list_items(v).any(|t| t.eq_ignore_ascii_case(name))
                })
        };
        let mut forwarded_for = false;
        for (name, value) in head.fields.clone() {
            match self.fate(name, || named(name)) {
                Fate::Pass => write_field(out, name, value),
                Fate::ForwardedFor => forwarded_for = true,
                Fate::Drop => {}
            }
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        let forwarded = head
            .fields
            .clone()
            .filter(|(n, _)| forwarded_for && n.eq_ignore_ascii_case(b"x-forwarded-for"))
            .map(|(_, v)| v);
        self.write_forwarded_for(forwarded, out);
        out.extend_from_slice(b"\r\nx-forwarded-proto: ");
        out.extend_from_slice(self.forwarded_proto().as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(host) = head.host {
            write_field(out, b"x-forwarded-host", host);
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
        if let Some(n) = head.body_len {
            write_field(
                out,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            );
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
    }

    /// hyper's encoding: the upstream request's fields from the client's. `Host` (or h2's
    /// `:authority`) comes from the upstream URI and the framing from the body, both written
    /// by hyper's client; `host` is the client's `Host` or `:authority`.
    pub fn encode_headers(
        &self,
        client: &HeaderMap,
        host: Option<&HeaderValue>,
        token: Option<&AccessToken>,
    ) -> HeaderMap {
        let named: Vec<&[u8]> = client
            .get_all(http::header::CONNECTION)
            .iter()
            .flat_map(|v| list_items(v.as_bytes()))
            .filter(|t| !is_connection_option(t))
            .collect();
        let mut out = HeaderMap::with_capacity(client.len() + 6);
        let mut forwarded = Vec::new();
        for (name, value) in client {
            let bytes = name.as_str().as_bytes();
            let in_connection = || named.iter().any(|n| n.eq_ignore_ascii_case(bytes));
            match self.fate(bytes, in_connection) {
                Fate::Pass => {
                    out.append(name.clone(), value.clone());
                }
                Fate::ForwardedFor => forwarded.push(value.as_bytes()),
                Fate::Drop => {}
            }
        }
        let mut xff = Vec::new();
        self.write_forwarded_for(forwarded.into_iter(), &mut xff);
        if let Ok(v) = HeaderValue::from_bytes(&xff) {
            out.insert(X_FORWARDED_FOR.clone(), v);
        }
        out.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(self.forwarded_proto()),
        );
        if let Some(host) = host {
            out.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        out.insert(crate::http::X_REQUEST_ID.clone(), self.request_id.clone());
        for (name, value) in &self.route.config.set_headers {
            out.insert(name.clone(), value.clone());
        }
        if let Some(token) = token {
            out.insert(AUTHORIZATION, token.header.clone());
        }
        out
    }
}

/// `close` and `keep-alive` in `Connection` are connection options, not field names.
pub fn is_connection_option(token: &[u8]) -> bool {
    token.is_empty()
        || token.eq_ignore_ascii_case(b"close")
        || token.eq_ignore_ascii_case(b"keep-alive")
}

/// Whether a field of the upstream's response reaches the client: not hop-by-hop, and not
/// named by the response's `Connection` unless the proxy manages it (the framing pair, which
/// the proxy writes itself).
pub fn response_field_passes(name: &[u8], named_in_connection: impl FnOnce() -> bool) -> bool {
    !(is_hop_by_hop(name) || connection_drops(name) && named_in_connection())
}

/// Appends one header field line, `name: value`.
#[inline]
pub fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// An address as `Display` writes it, without a String for the common IPv4 case.
pub fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> crate::routes::RouteTable {
        crate::routes::test_table(
            "http://127.0.0.1:1",
            "set_headers = { x-set = \"1\" }\nremove_headers = [\"cookie\"]",
        )
    }

    #[test]
    fn the_fate_of_each_kind_of_field() {
        let table = table();
        let route = table.iter().next().unwrap();
        let id = HeaderValue::from_static("id");
        let key = HeaderName::from_static("x-proxy-key");
        let plan = Plan {
            route,
            conn: ConnInfo {
                peer: ([127, 0, 0, 1], 1).into(),
                tls: false,
            },
            request_id: &id,
            key_header: Some(&key),
        };
        let fate = |name: &str, named: bool| plan.fate(name.as_bytes(), || named);
        for name in [
            "connection",
            "Keep-Alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-authenticate",
            "content-length",
            "host",
            "authorization",
            "x-forwarded-proto",
            "X-Forwarded-Host",
            "x-request-id",
            "expect",
            "x-proxy-key",
            "cookie",
            "x-set",
        ] {
            assert_eq!(fate(name, false), Fate::Drop, "{name}");
        }
        assert_eq!(fate("accept", false), Fate::Pass);
        assert_eq!(fate("accept", true), Fate::Drop);
        // Connection cannot take managed fields away.
        assert_eq!(fate("x-forwarded-for", true), Fate::ForwardedFor);
        assert_eq!(fate("content-length", true), Fate::Drop);
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
}
