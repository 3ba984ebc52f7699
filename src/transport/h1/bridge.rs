//! `https://` upstreams from the fast path: the client side stays on the fast path (parse in
//! place, write the response straight to the socket), the upstream side is hyper's pooled
//! client, which negotiates h2 or HTTP/1.1 by ALPN over rustls.
//!
//! The upstream request is the one the fast path writes for plain upstreams, read back into
//! a hyper request, so both kinds of upstream get exactly the same fields.

use std::io;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Frame;

use super::body::{self, Framing};
use super::write_field;
use crate::error::ProxyError;
use crate::routes::Route;
use crate::upstream::UpstreamBody;
use crate::ProxyBody;

/// A response from hyper's client whose head went to the client; its body follows.
pub(super) struct Relay {
    pub(super) body: UpstreamBody,
    pub(super) framing: Framing,
    /// The body is complete (and its end written to the client's buffer).
    pub(super) done: bool,
}

/// The hyper request for `raw`, an upstream request (head and body) as
/// `RequestParts::write` wrote it. `Host` is left to the client, which sets it (or h2's
/// `:authority`) from the URI.
pub(super) fn hyper_request(raw: &[u8], route: &Route) -> Result<Request<ProxyBody>, ProxyError> {
    let internal = |what: &str| ProxyError::UpstreamUnreachable {
        route: route.config.name.clone(),
        detail: format!("could not build the upstream request: {what}"),
    };
    let lines = raw.windows(2).filter(|w| w == b"\r\n").count();
    let mut fields = vec![httparse::EMPTY_HEADER; lines];
    let mut parsed = httparse::Request::new(&mut fields);
    let head_len = match parsed.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(internal("head")),
    };
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes())
        .map_err(|_| internal("method"))?;
    let upstream = &route.config.upstream;
    let uri = Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(parsed.path.unwrap_or("/"))
        .build()
        .map_err(|_| internal("target"))?;
    let mut request = Request::new(crate::error::full(Bytes::copy_from_slice(&raw[head_len..])));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    for field in parsed.headers.iter() {
        if field.name.eq_ignore_ascii_case("host") {
            continue;
        }
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| internal("field"))?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| internal("field"))?;
        headers.append(name, value);
    }
    Ok(request)
}

/// The client's response head for a response from hyper's client whose hop-by-hop fields
/// are already gone.
pub(super) fn write_head(
    out: &mut Vec<u8>,
    response: &Response<UpstreamBody>,
    framing: Framing,
    close: bool,
) {
    let status = response.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    // hyper keeps a non-standard reason phrase from an HTTP/1.1 upstream.
    match response.extensions().get::<hyper::ext::ReasonPhrase>() {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        // The proxy frames what it sends; a bodiless answer (HEAD, 304) passes the upstream's
        // length on, as the length a GET would have had.
        if name == CONTENT_LENGTH && framing != Framing::Empty {
            continue;
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    body::end_head(out, framing, close);
}

/// Waits for the next piece of a relayed body, then takes whatever else is ready; see
/// `take_ready`.
pub(super) async fn next_piece(relay: &mut Relay, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    let frame = relay.body.frame().await;
    if append(relay, frame, out)? {
        take_ready(relay, out)?;
    }
    Ok(())
}

/// Appends to `out`, framed for the client, what of the body is there without waiting, so a
/// small response leaves in one write with its head.
pub(super) fn take_ready(relay: &mut Relay, out: &mut Vec<u8>) -> io::Result<()> {
    while !relay.done {
        match relay.body.frame().now_or_never() {
            None => break,
            Some(frame) => {
                if !append(relay, frame, out)? {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Appends one frame (`None`: the end); `false` once the body is complete.
fn append(
    relay: &mut Relay,
    frame: Option<Result<Frame<Bytes>, crate::BoxError>>,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    let chunked = relay.framing == Framing::Chunked;
    let Some(frame) = frame else {
        if chunked {
            out.extend_from_slice(body::LAST_CHUNK);
        }
        relay.done = true;
        return Ok(false);
    };
    let frame = frame.map_err(io::Error::other)?;
    match frame.into_data() {
        Ok(data) => match relay.framing {
            Framing::Chunked => body::write_chunk(out, &data),
            Framing::Length(_) | Framing::Close => out.extend_from_slice(&data),
            Framing::Empty => {}
        },
        Err(frame) => {
            // Trailers end the body; only a chunked body can carry them on.
            if let (Ok(trailers), true) = (frame.into_trailers(), chunked) {
                out.extend_from_slice(b"0\r\n");
                for (name, value) in &trailers {
                    write_field(out, name.as_str().as_bytes(), value.as_bytes());
                }
                out.extend_from_slice(b"\r\n");
                relay.done = true;
                return Ok(false);
            }
        }
    }
    Ok(true)
}
