//! Pure HTTP facts, shared by the configuration, both transports and the pipeline: which
//! fields are connection-specific, which the proxy alone decides, what a valid `Host` is, and
//! how a response's body is delimited. No crate imports: everything else may use this.
//!
//! Request smuggling and response splitting live in the gaps between two parsers' ideas of
//! where a message ends (RFC 9112 §6.3, §11.2). The rules here close those gaps the same way
//! on every path: framing fields are never the client's, a route's or `Connection`'s to
//! remove, and a response whose framing is ambiguous is refused rather than guessed at.

pub mod path;

/// What kind of field a name is, for the rules: one length switch, so a request's fields
/// are classified in one or two comparisons each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldClass {
    /// Connection-specific (RFC 9110 §7.6.1, plus `Keep-Alive` and `Proxy-Connection` from
    /// earlier practice, and the proxy-auth pair of RFC 9110 §11.7, which are addressed to
    /// this proxy, never to the origin): never forwarded in either direction.
    HopByHop,
    /// Decided by the proxy alone on a forwarded message: `Content-Length` (it frames what it
    /// sends itself), `Host` and `Authorization` (the upstream's and the proxy's token), its
    /// own `X-Forwarded-Proto`/`-Host` and `x-request-id`. `Connection` cannot remove them (a
    /// client's `Connection: content-length` would otherwise unframe a body the proxy still
    /// sends) and a route's `set_headers`/`remove_headers` may not name them.
    Managed,
    /// `Transfer-Encoding`: hop-by-hop and managed at once.
    TransferEncoding,
    /// `X-Forwarded-For`: managed; the client's list is extended.
    ForwardedFor,
    /// `Expect`: answered on the hop it arrives on (RFC 9110 §10.1.1).
    Expect,
    /// `X-Original-URL`, `X-Rewrite-URL`: a path that IIS, Symfony and others serve instead
    /// of the request's, past the route's prefix. Never forwarded.
    PathOverride,
    /// `X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override`: a method frameworks
    /// serve instead of the request's. Not forwarded on routes that restrict `methods`.
    MethodOverride,
    Other,
}

#[inline]
pub fn classify(name: &[u8]) -> FieldClass {
    use FieldClass::*;
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    // CGI and PHP read `_` as `-` (`HTTP_X_ORIGINAL_URL`): the override fields are matched
    // in either spelling.
    let loose = |n: &[u8]| {
        name.len() == n.len()
            && name
                .iter()
                .zip(n)
                .all(|(a, b)| a.eq_ignore_ascii_case(b) || (*a == b'_' && *b == b'-'))
    };
    match name.len() {
        2 if is(b"te") => HopByHop,
        4 if is(b"host") => Managed,
        6 if is(b"expect") => Expect,
        7 if is(b"upgrade") || is(b"trailer") => HopByHop,
        10 if is(b"connection") || is(b"keep-alive") => HopByHop,
        12 if is(b"x-request-id") => Managed,
        13 if is(b"authorization") => Managed,
        13 if loose(b"x-rewrite-url") => PathOverride,
        13 if loose(b"x-http-method") => MethodOverride,
        14 if is(b"content-length") => Managed,
        14 if loose(b"x-original-url") => PathOverride,
        15 if is(b"x-forwarded-for") => ForwardedFor,
        16 if is(b"x-forwarded-host") => Managed,
        16 if is(b"proxy-connection") => HopByHop,
        17 if is(b"x-forwarded-proto") => Managed,
        17 if is(b"transfer-encoding") => TransferEncoding,
        17 if loose(b"x-method-override") => MethodOverride,
        18 if is(b"proxy-authenticate") => HopByHop,
        19 if is(b"proxy-authorization") => HopByHop,
        22 if loose(b"x-http-method-override") => MethodOverride,
        _ => Other,
    }
}

/// Connection-specific fields (`FieldClass::HopByHop`, and `Transfer-Encoding`).
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    matches!(
        classify(name),
        FieldClass::HopByHop | FieldClass::TransferEncoding
    )
}

/// Fields the proxy alone decides (`FieldClass::Managed`, `Transfer-Encoding` and
/// `X-Forwarded-For`).
pub fn is_managed(name: &[u8]) -> bool {
    matches!(
        classify(name),
        FieldClass::Managed | FieldClass::TransferEncoding | FieldClass::ForwardedFor
    )
}

/// Whether a field named in `Connection` is dropped: any field but the managed ones (which
/// stay whatever `Connection` says) and `close`/`keep-alive`, which are options, not names.
pub fn connection_drops(name: &[u8]) -> bool {
    !is_managed(name)
}

/// A `Host` field value (RFC 9112 §3.2, RFC 3986 §3.2.2): `uri-host [ ":" port ]`, where the
/// host is a reg-name, an IPv4 address or a bracketed IP literal. Empty is valid (a target
/// without an authority).
pub fn is_valid_host(value: &[u8]) -> bool {
    let (host, port) = match value {
        [b'[', rest @ ..] => match rest.iter().position(|&b| b == b']') {
            Some(end) => {
                let literal = &rest[..end];
                if literal.is_empty()
                    || !literal
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
                {
                    return false;
                }
                match &rest[end + 1..] {
                    [] => return true,
                    [b':', port @ ..] => (&[][..], port),
                    _ => return false,
                }
            }
            None => return false,
        },
        _ => match value.iter().rposition(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon + 1..]),
            None => (value, &[][..]),
        },
    };
    host.iter().all(|&b| REG_NAME[usize::from(b)])
        && port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
}

/// RFC 3986 reg-name bytes: unreserved, sub-delims and `%` (of pct-encoded).
static REG_NAME: [bool; 256] = byte_table(b"-._~!$&'()*+,;=%");

/// A byte-class table: ASCII letters and digits, and `extra`.
pub const fn byte_table(extra: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
}

/// Why a request's `Host` fields are refused (RFC 9112 §3.2: an HTTP/1.1 request has
/// exactly one, with a valid value; HTTP/1.0 and h2 requests may have none), or `None`.
pub fn host_fields_error(http11: bool, first: Option<&[u8]>, more: bool) -> Option<&'static str> {
    match first {
        None if http11 => Some("an HTTP/1.1 request must carry a Host field"),
        None => None,
        Some(_) if more => Some("a request must not carry more than one Host field"),
        Some(v) if !is_valid_host(v) => Some("the Host field is not a valid host[:port]"),
        Some(_) => None,
    }
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a response to HEAD, 1xx, 204 or 304.
    Empty,
    Length(u64),
    Chunked,
    /// Read until the upstream closes (no length, no chunked coding).
    Close,
}

/// The framing of an HTTP/1.1 response (RFC 9112 §6.3), or why it cannot be trusted.
///
/// Stricter than RFC 9112 lets a lone recipient be, because a proxy that guesses forwards its
/// guess to a client that may guess differently (§11.2): `Transfer-Encoding` with
/// `Content-Length`, a list-valued or repeated `Content-Length`, any coding but a lone
/// `chunked` (a gzip transfer coding would reach the client unlabelled once re-framed),
/// `Content-Length` or `Transfer-Encoding` on a 204, and a `101` nobody asked for are all
/// refused. The proxy then answers 502 and discards the upstream connection.
pub fn response_framing<'a>(
    head_request: bool,
    status: u16,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Framing, &'static str> {
    if !(100..=599).contains(&status) {
        return Err("a status code outside 100-599 (RFC 9110 §15)");
    }
    if status == 101 {
        return Err("101 Switching Protocols without an upgrade request");
    }
    let mut transfer_encoding = 0usize;
    let mut chunked = false;
    let mut length: Option<Result<u64, ()>> = None;
    for (name, value) in fields {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding += 1;
            chunked = trim(value).eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"content-length") {
            if length.is_some() {
                return Err("more than one Content-Length field");
            }
            length = Some(parse_length(trim(value)).ok_or(()));
        }
    }
    if status == 204 && (transfer_encoding > 0 || length.is_some()) {
        return Err("a 204 response with a body length");
    }
    if transfer_encoding > 0 && length.is_some() {
        return Err("both Transfer-Encoding and Content-Length");
    }
    if transfer_encoding > 1 || transfer_encoding == 1 && !chunked {
        return Err("a transfer coding other than chunked");
    }
    let length = match length {
        Some(Ok(n)) => Some(n),
        Some(Err(())) => return Err("malformed Content-Length"),
        None => None,
    };
    if has_no_body(head_request, status) {
        return Ok(Framing::Empty);
    }
    Ok(match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Close,
    })
}

/// A response to HEAD, or a 1xx, 204 or 304, never has a body (RFC 9112 §6.3).
pub fn has_no_body(head_request: bool, status: u16) -> bool {
    head_request || (100..200).contains(&status) || status == 204 || status == 304
}

/// A decimal length: digits only, at most 18 of them (no sign, no spaces, no list, no
/// overflow).
pub fn parse_length(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 18 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(text.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// The items of a comma-separated field value (RFC 9110 §5.6.1), trimmed of spaces and tabs.
pub fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(trim)
}

pub fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The most header fields a request may carry, on every transport (hyper's HTTP/1.1
/// default); more is `431 header_too_large`.
pub const MAX_FIELDS: usize = 100;

/// The request id field, passed on or generated.
pub static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The client's `x-request-id` when it is sane (visible ASCII, at most 128 bytes), else a new
/// random one.
pub fn request_id(headers: &http::HeaderMap) -> http::HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v) if is_sane_request_id(v.as_bytes()) => v.clone(),
        _ => new_request_id(),
    }
}

/// Visible ASCII, 1 to 128 bytes: safe to log and to pass on.
pub fn is_sane_request_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= 128 && id.iter().all(|c| c.is_ascii_graphic())
}

/// 128 random bits as 32 lowercase hex digits.
pub fn new_request_id() -> http::HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::random();
    let mut text = [0u8; 32];
    for (i, digit) in text.iter_mut().enumerate() {
        *digit = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    http::HeaderValue::from_bytes(&text).unwrap_or_else(|_| http::HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(head: bool, status: u16, fields: &[(&str, &str)]) -> Result<Framing, &'static str> {
        response_framing(
            head,
            status,
            fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        )
    }

    #[test]
    fn response_framing_follows_rfc_9112_and_refuses_what_is_ambiguous() {
        assert_eq!(
            framing(true, 200, &[("content-length", "5")]),
            Ok(Framing::Empty)
        );
        assert_eq!(
            framing(true, 200, &[("transfer-encoding", "chunked")]),
            Ok(Framing::Empty)
        );
        assert_eq!(framing(false, 204, &[]), Ok(Framing::Empty));
        assert_eq!(
            framing(false, 304, &[("content-length", "5")]),
            Ok(Framing::Empty)
        );
        assert_eq!(
            framing(false, 200, &[("Content-Length", "5")]),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing(false, 200, &[("Transfer-Encoding", "Chunked")]),
            Ok(Framing::Chunked)
        );
        assert_eq!(framing(false, 200, &[]), Ok(Framing::Close));
        for bad in [
            &[("content-length", "5, 5")][..],
            &[("content-length", "5, 6")],
            &[("content-length", "5"), ("content-length", "5")],
            &[("content-length", "-1")],
            &[("content-length", "+1")],
            &[("content-length", "")],
            &[("transfer-encoding", "chunked"), ("content-length", "9")],
            &[("content-length", "9"), ("transfer-encoding", "chunked")],
            &[("transfer-encoding", "gzip, chunked")],
            &[("transfer-encoding", "gzip")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "chunked, identity")],
        ] {
            assert!(framing(false, 200, bad).is_err(), "{bad:?}");
        }
        assert!(framing(false, 204, &[("content-length", "0")]).is_err());
        assert!(framing(false, 204, &[("transfer-encoding", "chunked")]).is_err());
        assert!(framing(false, 101, &[]).is_err());
        assert!(framing(false, 999, &[]).is_err());
        assert!(framing(false, 0, &[]).is_err());
    }

    #[test]
    fn host_values() {
        for good in [
            "app",
            "app:8080",
            "a.b-c.example",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:80",
            "",
            "xn--bcher-kva.example",
        ] {
            assert!(is_valid_host(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "a b",
            "a/b",
            "a@b",
            "app:80x",
            "app:123456",
            "[::1",
            "[::1]x",
            "[zz]",
            "a\"b",
            "a\tb",
            "[]",
        ] {
            assert!(!is_valid_host(bad.as_bytes()), "{bad:?}");
        }
        let hosts = |v: &[&'static str], http11| {
            host_fields_error(http11, v.first().map(|s| s.as_bytes()), v.len() > 1)
        };
        assert!(hosts(&[], true).is_some());
        assert!(hosts(&[], false).is_none());
        assert!(hosts(&["a", "a"], true).is_some());
        assert!(hosts(&["a b"], false).is_some());
        assert!(hosts(&["app:1"], true).is_none());
    }

    #[test]
    fn managed_fields_are_never_dropped_by_connection() {
        for name in [
            "Content-Length",
            "transfer-encoding",
            "HOST",
            "authorization",
            "x-forwarded-for",
            "X-Forwarded-Proto",
            "x-forwarded-host",
            "x-request-id",
        ] {
            assert!(is_managed(name.as_bytes()), "{name}");
            assert!(!connection_drops(name.as_bytes()), "{name}");
        }
        for name in ["cookie", "x-hop", "content-type", "x-forwarded"] {
            assert!(connection_drops(name.as_bytes()), "{name}");
        }
    }
    #[test]
    fn request_ids() {
        let mut h = http::HeaderMap::new();
        assert_eq!(request_id(&h).len(), 32);
        h.insert("x-request-id", http::HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", http::HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");
    }
}
