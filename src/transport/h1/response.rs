//! The response side of the fast path: reading the upstream's response head, the client's
//! version of it, and the proxy's own error responses.

use std::io;

use http::header::HeaderValue;
use tokio::io::AsyncReadExt;

use super::body::{self, Framing};
use super::{write_field, UpstreamError, MAX_HEADERS, MAX_RESPONSE_HEAD, READ_CHUNK};
use crate::error::ProxyError;
use crate::pipeline::plan::response_field_passes;

pub(super) struct ResponseHead {
    pub(super) status: u16,
    pub(super) head_len: usize,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
}

/// Reads the upstream's response head into `up` and writes the client's version of it into
/// `out` (the request there has been sent).
pub(super) async fn read_response_head(
    stream: &mut crate::upstream::stream::UpStream,
    up: &mut Vec<u8>,
    out: &mut Vec<u8>,
    head_request: bool,
    client_close: bool,
) -> Result<ResponseHead, UpstreamError> {
    loop {
        if !up.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(up) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = response.code.unwrap_or(0);
                    if (100..200).contains(&status) && status != 101 {
                        // Interim responses (100, 103) are not passed on; the final one follows.
                        up.drain(..n);
                        continue;
                    }
                    let fields = response
                        .headers
                        .iter()
                        .map(|h| (h.name.as_bytes(), h.value));
                    let framing = crate::http::response_framing(head_request, status, fields)
                        .map_err(UpstreamError::Protocol)?;
                    // A connection that answered without a body (HEAD, 204, 304) is not kept:
                    // upstreams that wrongly send one anyway would have it read as the next
                    // client's response.
                    let keep_alive = response.version == Some(1)
                        && framing != Framing::Empty
                        && !has_token(response.headers, "connection", b"close");
                    out.clear();
                    write_client_head(out, &response, framing, client_close);
                    return Ok(ResponseHead {
                        status,
                        head_len: n,
                        framing,
                        keep_alive,
                    });
                }
                Ok(httparse::Status::Partial) if up.len() > MAX_RESPONSE_HEAD => {
                    return Err(UpstreamError::Protocol("response head too large"));
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(UpstreamError::Protocol(
                        "more than 100 header fields in the response head",
                    ))
                }
                Err(_) => return Err(UpstreamError::Protocol("malformed response head")),
            }
        }
        up.reserve(READ_CHUNK);
        match stream.read_buf(up).await {
            Ok(0) => {
                return Err(UpstreamError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection without a response",
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(UpstreamError::Io(e)),
        }
    }
}

/// Whether a comma-separated field `name` contains `token` (case-insensitive).
fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &[u8]) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| body::list_items(h.value))
        .any(|t| t.eq_ignore_ascii_case(token))
}

/// The client's response head: the upstream's status line and end-to-end fields, framed
/// for this connection.
fn write_client_head(
    out: &mut Vec<u8>,
    response: &httparse::Response<'_, '_>,
    framing: Framing,
    close: bool,
) {
    let status = response.code.unwrap_or(502);
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse accepts exactly three digits.
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let headers = &*response.headers;
    let has_connection = headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("connection"));
    let mut has_date = false;
    for h in headers {
        let name = h.name.as_bytes();
        has_date |= name.eq_ignore_ascii_case(b"date");
        let named = || has_connection && has_token(headers, "connection", name);
        if !response_field_passes(name, named) {
            continue;
        }
        // The proxy frames what it sends; only a bodiless answer (HEAD, 304) passes the
        // upstream's length on, as the length a GET would have had.
        if name.eq_ignore_ascii_case(b"content-length") && framing != Framing::Empty {
            continue;
        }
        write_field(out, name, h.value);
    }
    // A proxy with a clock adds the `Date` an upstream left out (RFC 9110 §6.6.1), as
    // hyper's server does on the other transports.
    if !has_date {
        write_field(
            out,
            b"date",
            httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes(),
        );
    }
    body::end_head(out, framing, close);
}

/// The proxy's own JSON error response; returns its status.
pub(super) fn write_error(
    out: &mut Vec<u8>,
    e: ProxyError,
    request_id: &HeaderValue,
    close: bool,
    head_request: bool,
) -> u16 {
    let (status, headers, body) = e.into_parts(request_id);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &headers {
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // An answer to HEAD has no body (RFC 9110 §9.3.2); its length is the one a GET would get.
    if !head_request {
        out.extend_from_slice(&body);
    }
    status.as_u16()
}
