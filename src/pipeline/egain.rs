//! eGain's own errors (contract §14). A 401 is the 401 rule's (`replay.rs`). A 403 whose
//! `code` is `403-197` means the scope the API needs is not assigned to the client: a
//! configuration problem that no new token or replay can fix. It passes through untouched;
//! the proxy says once per route and profile what it asked for, and counts it. A 429 passes
//! through like any answer, `Retry-After` and `X-RateLimit-*` included.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};

use super::Admitted;
use crate::metrics::RouteProfileLabels;
use crate::state::Shared;
use crate::upstream::UpstreamBody;

/// eGain's "scope not assigned to the client" code.
pub const SCOPE_NOT_ASSIGNED: &str = "403-197";
/// How much of a 403's body is looked at; eGain's error bodies are a few hundred bytes.
pub const INSPECT: usize = 8 * 1024;

/// Whether `body` (the start of a 403's body, possibly with chunk framing around it) carries
/// `"code": "403-197"`.
pub fn is_scope_error(body: &[u8]) -> bool {
    let body = &body[..body.len().min(INSPECT)];
    let mut rest = body;
    while let Some(at) = find(rest, b"\"code\"") {
        let after = skip_ws(&rest[at + 6..]);
        if let Some(value) = after.strip_prefix(b":") {
            let value = skip_ws(value);
            let quoted = format!("\"{SCOPE_NOT_ASSIGNED}\"");
            if value.starts_with(quoted.as_bytes()) {
                return true;
            }
        }
        rest = &rest[at + 6..];
    }
    false
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn skip_ws(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

/// After a 403 whose body starts with `body`: when it is eGain's scope error, one warning
/// per route and profile (naming the profile, the scopes it asked for and the code) and a
/// count in `egain_proxy_upstream_scope_errors_total`.
pub(crate) fn after_403(shared: &Shared, admitted: &Admitted<'_>, body: &[u8]) {
    if !is_scope_error(body) {
        return;
    }
    let Some((profile, holder)) = admitted.holder else {
        return;
    };
    let route = admitted.route.config.name.as_str();
    shared
        .metrics
        .upstream_scope_errors
        .get_or_create(&RouteProfileLabels {
            route: route.to_owned(),
            profile: profile.to_owned(),
        })
        .inc();
    if shared.first_scope_error(route, profile) {
        tracing::warn!(
            route,
            profile,
            scopes = %holder.settings.scopes.join(" "),
            code = SCOPE_NOT_ASSIGNED,
            "eGain refused the call: the scope this API needs is not assigned to the profile's client \
             (add it to the client application in eGain, and to `scopes`); passed through, not replayed"
        );
    }
}

/// For responses hyper's client read: a 403's body is read up to `INSPECT` bytes, looked at,
/// and then sent on whole (the bytes read first, then the rest as it comes).
pub(crate) async fn inspect(
    shared: &Shared,
    admitted: &Admitted<'_>,
    response: Response<UpstreamBody>,
) -> Response<crate::ProxyBody> {
    use http_body_util::BodyExt;
    if response.status() != http::StatusCode::FORBIDDEN || admitted.holder.is_none() {
        return super::into_proxy_response(response);
    }
    let (parts, mut body) = response.into_parts();
    let mut seen = Vec::new();
    let mut frames = VecDeque::new();
    let mut ended = false;
    while seen.len() < INSPECT {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    seen.extend_from_slice(data);
                }
                frames.push_back(Ok(frame));
            }
            Some(Err(e)) => {
                frames.push_back(Err(e));
                ended = true;
                break;
            }
            None => {
                ended = true;
                break;
            }
        }
    }
    after_403(shared, admitted, &seen);
    let rest = (!ended).then_some(body);
    Response::from_parts(parts, Replayed { frames, rest }.boxed())
}

/// Frames already read, then the rest of the body.
struct Replayed {
    frames: VecDeque<Result<Frame<Bytes>, crate::BoxError>>,
    rest: Option<UpstreamBody>,
}

impl Body for Replayed {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(frame));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().map_or(true, |r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .frames
            .iter()
            .filter_map(|f| f.as_ref().ok().and_then(|f| f.data_ref()))
            .map(|d| d.len() as u64)
            .sum();
        match &self.rest {
            None => SizeHint::with_exact(buffered),
            Some(rest) => {
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + buffered);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_scope_code_and_nothing_else() {
        assert!(is_scope_error(
            br#"{"code":"403-197","developerMessage":"x"}"#
        ));
        assert!(is_scope_error(
            b"{ \"developerMessage\": \"x\",\n \"code\" :  \"403-197\" }"
        ));
        // Chunk framing around it, as the fast path sees the first bytes.
        assert!(is_scope_error(
            b"2a\r\n{\"code\":\"403-197\",\"developerMessage\":\"x\"}\r\n"
        ));
        assert!(!is_scope_error(
            br#"{"code":"403-100","developerMessage":"403-197"}"#
        ));
        assert!(!is_scope_error(br#"{"code":"403-1970"}"#));
        assert!(!is_scope_error(br#"{"error":"403-197"}"#));
        assert!(!is_scope_error(b""));
        assert!(!is_scope_error(b"\"code\""));
        let mut far = vec![b' '; INSPECT];
        far.extend_from_slice(br#"{"code":"403-197"}"#);
        assert!(
            !is_scope_error(&far),
            "only the start of the body is looked at"
        );
    }
}
