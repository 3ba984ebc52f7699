//! Request bodies on their way upstream (the rules, whatever carried them): a body must keep
//! arriving (`stall`), the proxy frames what it forwards, and bodies small enough are kept
//! for a replay after a 401.

use bytes::{Bytes, BytesMut};
use http::header::HeaderValue;
use http::Method;
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, BodyStream, StreamBody};

use super::{stall, REPLAY_LIMIT};
use crate::error::ProxyError;
use crate::{BoxError, ProxyBody};

/// The proxy frames the body it forwards (RFC 9112 §6.3, §11.2): hyper's client writes
/// `Content-Length` from the body's exact size, else the chunked coding, so no framing field
/// of the client's is passed on (`Plan::fate` drops them). hyper assumes a GET or HEAD of
/// unknown size has no body; one that has one is sent chunked rather than dropped.
pub(crate) fn frame(head: &mut http::HeaderMap, method: &Method, body: &ProxyBody) {
    let unknown_size = !body.is_end_stream() && body.size_hint().exact().is_none();
    if unknown_size && matches!(*method, Method::GET | Method::HEAD) {
        head.insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
}

pub(crate) enum Prepared {
    /// The whole body, small enough to send twice.
    Replayable(Bytes),
    Stream(ProxyBody),
}

/// Keeps bodies up to `REPLAY_LIMIT` in memory so a 401 can be replayed; anything larger (by
/// `Content-Length`, or found while reading) streams on without further buffering.
pub(crate) async fn prepare(
    mut body: ProxyBody,
    declared: Option<u64>,
) -> Result<Prepared, ProxyError> {
    if body.is_end_stream() {
        return Ok(Prepared::Replayable(Bytes::new()));
    }
    if declared.is_some_and(|n| n > REPLAY_LIMIT as u64) {
        return Ok(Prepared::Stream(body));
    }
    let mut buffered = BytesMut::new();
    let mut prefix: Vec<Frame<Bytes>> = Vec::new();
    loop {
        match body.frame().await {
            None => return Ok(Prepared::Replayable(buffered.freeze())),
            Some(Err(e)) => {
                if let Some(idle) = stall::is_stall(&*e) {
                    return Err(ProxyError::RequestTimeout(idle));
                }
                return Err(ProxyError::BadRequest(format!(
                    "could not read the request body: {e}"
                )));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    buffered.extend_from_slice(&data);
                    if buffered.len() > REPLAY_LIMIT {
                        prefix.push(Frame::data(buffered.split().freeze()));
                        break;
                    }
                }
                Err(trailers) => {
                    // Trailers end the body; keep everything as a stream (not replayable).
                    prefix.push(Frame::data(buffered.split().freeze()));
                    prefix.push(trailers);
                    break;
                }
            },
        }
    }
    let head_frames = futures_util::stream::iter(prefix.into_iter().map(Ok::<_, BoxError>));
    let rest = BodyStream::new(body);
    let stream = futures_util::StreamExt::chain(head_frames, rest);
    Ok(Prepared::Stream(StreamBody::new(stream).boxed()))
}
