//! The proxy's own errors: one variant per situation, mapped to a status and a JSON body in
//! one place (contract §5). Upstream responses never pass through here.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::ProxyBody;

/// Why a request could not get a token; becomes 503 `token_unavailable`.
#[derive(Debug, Clone)]
pub struct TokenUnavailable {
    pub profile: String,
    /// The last token fetch's failure, as `token::FetchError` words it.
    pub reason: Option<String>,
    pub retry_after: Duration,
}

impl std::fmt::Display for TokenUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no valid token for profile {:?}: ", self.profile)?;
        match &self.reason {
            Some(reason) => f.write_str(reason),
            None => f.write_str("the token request has not completed yet"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadRequest(String),
    #[error("this proxy requires an API key in the {0} header")]
    ProxyAuthRequired(String),
    #[error("your address is not allowed to use this proxy")]
    Forbidden,
    /// A browser's request made for a page of another site (`crate::pipeline::browser`).
    #[error("refused {0}")]
    BrowserRequest(String),
    #[error("no route matches {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("{0} is not supported: this is a reverse proxy that adds credentials; CONNECT would make it a forward proxy and TRACE (or TRACK) would reflect its token")]
    MethodNotAllowed(String),
    #[error("the upstream of route {route:?} could not be reached: {detail}")]
    UpstreamUnreachable { route: String, detail: String },
    #[error("{0}")]
    TokenUnavailable(TokenUnavailable),
    #[error("the upstream of route {route:?} did not answer within {}", humantime::format_duration(*timeout))]
    UpstreamTimeout { route: String, timeout: Duration },
    #[error("the request body stalled: no bytes for {}", humantime::format_duration(*.0))]
    RequestTimeout(Duration),
    /// A request head over `max_header_bytes` or with more than `http::MAX_FIELDS` fields.
    #[error("{0}")]
    HeadTooLarge(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::ProxyAuthRequired(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden | ProxyError::BrowserRequest(_) => StatusCode::FORBIDDEN,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::TokenUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::ProxyAuthRequired(_) => "proxy_auth_required",
            ProxyError::Forbidden | ProxyError::BrowserRequest(_) => "forbidden",
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::UpstreamUnreachable { .. } => "upstream_unreachable",
            ProxyError::TokenUnavailable(_) => "token_unavailable",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::RequestTimeout(_) => "request_timeout",
            ProxyError::HeadTooLarge(_) => "header_too_large",
        }
    }

    pub fn into_response(self, request_id: &HeaderValue) -> Response<ProxyBody> {
        let (status, headers, body) = self.into_parts(request_id);
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }

    /// Status, headers (content type, request id, and per error `Retry-After`,
    /// `WWW-Authenticate` or `Allow`) and the JSON body.
    pub fn into_parts(self, request_id: &HeaderValue) -> (StatusCode, HeaderMap, Vec<u8>) {
        let id = request_id.to_str().unwrap_or("");
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "request_id": id,
        });
        let bytes = json_bytes(&body);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(crate::http::X_REQUEST_ID.clone(), request_id.clone());
        match &self {
            ProxyError::TokenUnavailable(t) => {
                let secs = t.retry_after.as_secs_f64().ceil().max(1.0) as u64;
                headers.insert(RETRY_AFTER, HeaderValue::from(secs));
            }
            ProxyError::ProxyAuthRequired(_) => {
                // RFC 9110 §11.6.1: a 401 carries a challenge. A custom scheme keeps browsers
                // from popping up a password dialog.
                headers.insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("ProxyKey"),
                );
            }
            ProxyError::MethodNotAllowed(_) => {
                headers.insert(
                    http::header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            _ => {}
        }
        (self.status(), headers, bytes)
    }
}

pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(full(json_bytes(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A JSON body as every answer of the proxy's own has it: one line.
fn json_bytes(body: &serde_json::Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An error and its sources on one line, each cause once: the top line of a client error
/// ("error sending request") rarely says what went wrong; the chain does (refused, DNS, TLS).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}
