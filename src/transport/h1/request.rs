//! The request side of the fast path: parsing a request head in place, and what it takes
//! and what it leaves to hyper. What the upstream request becomes is the pipeline's
//! (`crate::pipeline::plan`).

use std::ops::Range;

use http::header::HeaderValue;
use http::Method;

use super::{body, MAX_HEADERS};
use crate::error::ProxyError;
use crate::http::{is_sane_request_id, new_request_id};
use crate::pipeline::plan::{is_connection_option, Plan, RawHead};
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
    let plan = Plan {
        route,
        conn: ConnInfo {
            peer: ([127, 0, 0, 1], 50000).into(),
            tls: false,
        },
        request_id: &request_id,
        key_header: None,
    };
    let body = &raw[head.head_len..head.head_len + head.body_len];
    plan.encode_h1(&head.raw(raw, &spans), token, body, out);
    true
}

/// One header field of the current request: where its name and value are in the read
/// buffer.
#[derive(Clone)]
pub(super) struct Span {
    pub(super) name: Range<usize>,
    pub(super) value: Range<usize>,
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
    /// A `Connection` field names other fields (`RawHead::connection_names`).
    pub(super) connection_names: bool,
}

impl Head {
    /// The head as the pipeline's encoder reads it, from the buffer it was parsed from.
    pub(super) fn raw<'a>(
        &'a self,
        buf: &'a [u8],
        spans: &'a [Span],
    ) -> RawHead<'a, impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone> {
        RawHead {
            method: self.method.as_str(),
            path: text(&buf[self.path.clone()]),
            query: self.query.clone().map(|q| text(&buf[q])),
            host: self.host.clone().map(|h| &buf[h]),
            fields: spans
                .iter()
                .map(|s| (&buf[s.name.clone()], &buf[s.value.clone()])),
            body_len: self.has_length.then_some(self.body_len),
            connection_names: self.connection_names,
        }
    }
}

pub(super) enum Parsed {
    Complete(Head),
    Partial,
    HandOver,
    /// Not HTTP/1.x as httparse (and so hyper) reads it, or too many fields.
    Refused(ProxyError),
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

pub(super) static TARGET_BYTES: [bool; 256] = crate::http::byte_table(b"-._~!$&'()*+,;=:@/?%");

pub(super) fn parse_request(buf: &[u8], spans: &mut Vec<Span>) -> Parsed {
    // Left uninitialised: httparse fills what it uses (saves a 3 KiB memset per request).
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let head_len = match request.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Refused(ProxyError::HeadTooLarge(format!(
                "the request has more than {MAX_HEADERS} header fields"
            )))
        }
        // h2's preface (`PRI * HTTP/2.0`) is hyper's to serve.
        Err(httparse::Error::Version) if buf.starts_with(b"PRI ") => return Parsed::HandOver,
        // What hyper would refuse too (it parses with httparse), with the proxy's JSON.
        Err(e) => {
            return Parsed::Refused(ProxyError::BadRequest(format!(
                "the request head is not valid HTTP/1.1: {e}"
            )))
        }
    };
    if request.version != Some(1) {
        return Parsed::HandOver;
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Parsed::HandOver;
    };
    if method == "CONNECT" || !target.starts_with('/') || !target.bytes().all(is_target_byte) {
        // A target hyper cannot parse either gets the proxy's 400; the rest (absolute-form,
        // `*`, authority-form, unusual bytes) hyper parses and the pipeline decides.
        if method != "CONNECT" && http::Uri::try_from(target).is_err() {
            return Parsed::Refused(ProxyError::BadRequest(
                "the request target is not a valid URI path".into(),
            ));
        }
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
        connection_names: false,
    };
    let mut content_length = None;
    spans.clear();
    for h in request.headers.iter() {
        let name = h.name;
        let value = range(h.value);
        match Known::of(name) {
            Some(Known::ContentLength) => {
                // Anything but one length (a list, even of one length repeated, as hyper
                // also refuses) is framing no one can trust (RFC 9112 §6.3): the proxy's
                // 400, and the connection closes. Two equal fields go to hyper, which takes
                // them.
                let Some(n) = body::parse_length(h.value) else {
                    return Parsed::Refused(ProxyError::BadRequest(
                        "the Content-Length field is not valid".into(),
                    ));
                };
                if content_length.is_some_and(|m| m as u64 != n) {
                    return Parsed::Refused(ProxyError::BadRequest(
                        "the Content-Length fields disagree".into(),
                    ));
                }
                if content_length.is_some() || n > REPLAY_LIMIT as u64 {
                    return Parsed::HandOver;
                }
                content_length = Some(n as usize);
            }
            Some(Known::Host) => {
                // Two Host fields or an invalid one: hyper's path answers 400 (the pipeline's
                // rule, `crate::http::host_fields_error`).
                if head.host.is_some() || !crate::http::is_valid_host(h.value) {
                    return Parsed::HandOver;
                }
                head.host = Some(value.clone());
            }
            Some(Known::Connection) => {
                for token in body::list_items(h.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        head.close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return Parsed::HandOver;
                    } else if !is_connection_option(token) {
                        head.connection_names = true;
                    }
                }
            }
            Some(Known::HandOver) => return Parsed::HandOver,
            Some(Known::RequestId) if head.request_id.is_none() => {
                head.request_id = Some(value.clone());
            }
            Some(Known::RequestId) | None => {}
        }
        spans.push(Span {
            name: range(name.as_bytes()),
            value,
        });
    }
    if head.host.is_none() {
        return Parsed::HandOver;
    }
    head.has_length = content_length.is_some();
    head.body_len = content_length.unwrap_or(0);
    Parsed::Complete(head)
}

/// Request header fields the fast path reads while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Known {
    ContentLength,
    Host,
    Connection,
    RequestId,
    /// `Transfer-Encoding`, `Expect`, `Upgrade`: hyper serves such requests.
    HandOver,
}

impl Known {
    /// By length first: one or two comparisons per field instead of a handful.
    fn of(name: &str) -> Option<Known> {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        Some(match name.len() {
            4 if is("host") => Known::Host,
            6 if is("expect") => Known::HandOver,
            7 if is("upgrade") => Known::HandOver,
            10 if is("connection") => Known::Connection,
            12 if is("x-request-id") => Known::RequestId,
            14 if is("content-length") => Known::ContentLength,
            17 if is("transfer-encoding") => Known::HandOver,
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
        crate::routes::test_table(
            "http://127.0.0.1:1/base",
            "set_headers = { x-team = \"t\" }\nremove_headers = [\"cookie\"]",
        )
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
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        ] {
            assert!(handed_over(raw, &mut spans), "{raw:?}");
        }
        // What no HTTP/1.1 server reads: the proxy's own 400 or 431.
        for (raw, status) in [
            ("GET / HTTP/1.1\r\nBad Header: x\r\n\r\n".to_owned(), 400),
            ("GARBAGE\r\n\r\n".to_owned(), 400),
            ("GET / HTTP/1.2\r\nHost: x\r\n\r\n".to_owned(), 400),
            ("GET / http/1.1\r\nHost: x\r\n\r\n".to_owned(), 400),
            ("GET api/x HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), 400),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n".to_owned(),
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n".to_owned(),
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1,1\r\n\r\n".to_owned(),
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n".to_owned(),
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
                    .to_owned(),
                400,
            ),
            (
                format!(
                    "GET / HTTP/1.1\r\n{}\r\n",
                    "X: 1\r\n".repeat(MAX_HEADERS + 1)
                ),
                431,
            ),
        ] {
            match parse_request(raw.as_bytes(), &mut spans) {
                Parsed::Refused(e) => assert_eq!(e.status().as_u16(), status, "{raw:?}"),
                _ => panic!("{raw:?} was not refused"),
            }
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
        assert!(!head.close);
        assert!(matches!(
            parse_request(&raw.as_bytes()[..20], &mut spans),
            Parsed::Partial
        ));
    }
}
