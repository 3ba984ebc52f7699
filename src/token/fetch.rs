//! One client-credentials token request (RFC 6749 §4.4), in eGain's two flavours, and the
//! parsing of its answer. Parsing is a pure function so every odd answer is unit-tested.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde_json::Value;

use crate::config::{ClientAuth, TokenSettings};

/// The most of a token response that is read; real ones are a few KiB.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// A `Retry-After` longer than this is treated as this: the proxy keeps trying.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Why a token request failed. Each variant maps to one `outcome` label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    Connect(String),
    Timeout(Duration),
    /// A non-2xx answer that is not a refusal: 429 or 5xx (whatever its body says, a
    /// `temporarily_unavailable` or `server_error` included) or a status without an OAuth
    /// error body. `detail` is the OAuth error the body named, if any.
    Http {
        status: u16,
        detail: Option<String>,
        retry_after: Option<Duration>,
    },
    OAuth {
        status: u16,
        error: String,
        description: Option<String>,
        retry_after: Option<Duration>,
    },
    BadResponse(String),
}

impl FetchError {
    /// The `outcome` label of `egain_proxy_token_fetches_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            FetchError::Connect(_) => "connect",
            FetchError::Timeout(_) => "timeout",
            FetchError::Http { .. } => "http_error",
            FetchError::OAuth { .. } => "oauth_error",
            FetchError::BadResponse(_) => "bad_response",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Http { retry_after, .. } | FetchError::OAuth { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    pub fn oauth_error(&self) -> Option<&str> {
        match self {
            FetchError::OAuth { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Connect(e) => write!(f, "cannot reach the token endpoint: {e}"),
            FetchError::Timeout(d) => write!(
                f,
                "the token endpoint did not answer within {}",
                humantime::format_duration(*d)
            ),
            FetchError::Http { status, detail, .. } => {
                write!(f, "the token endpoint answered HTTP {status}")?;
                if let Some(d) = detail {
                    write!(f, ": {d}")?;
                }
                Ok(())
            }
            FetchError::OAuth {
                status,
                error,
                description,
                ..
            } => {
                write!(
                    f,
                    "the token endpoint refused the request (HTTP {status}): {error}"
                )?;
                if let Some(d) = description {
                    write!(f, " ({d})")?;
                }
                Ok(())
            }
            FetchError::BadResponse(why) => write!(f, "unusable token response: {why}"),
        }
    }
}

impl std::error::Error for FetchError {}

/// A token as the endpoint described it.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenResponse {
    pub access_token: String,
    pub lifetime: Duration,
    /// Where the lifetime came from: `expires_in`, `jwt_exp` or `default_ttl`.
    pub lifetime_source: &'static str,
    pub scope: Option<String>,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"[redacted]")
            .field("lifetime", &self.lifetime)
            .field("lifetime_source", &self.lifetime_source)
            .field("scope", &self.scope)
            .finish()
    }
}

/// The form body of the token request. The secret is included only for `client_auth = "body"`.
pub fn form_body(s: &TokenSettings) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials");
    if !s.scopes.is_empty() {
        form.append_pair("scope", &s.scopes.join(" "));
    }
    if s.client_auth == ClientAuth::Body {
        form.append_pair("client_id", &s.client_id);
        form.append_pair("client_secret", s.client_secret.current().expose());
    }
    for (k, v) in &s.extra_params {
        form.append_pair(k, v);
    }
    form.finish()
}

/// RFC 6749 §2.3.1: id and secret are form-encoded, then joined with `:` and base64-encoded.
pub fn basic_authorization(s: &TokenSettings) -> HeaderValue {
    let enc = |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
    let pair = format!(
        "{}:{}",
        enc(&s.client_id),
        enc(s.client_secret.current().expose())
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(pair);
    let mut value = HeaderValue::from_str(&format!("Basic {b64}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    value.set_sensitive(true);
    value
}

/// Words a connection failure through the egress proxy as the upstream path does. reqwest's
/// tunnel error does not carry the proxy's answer, so one `CONNECT` of our own
/// (`crate::upstream::egress`, the upstreams' handshake) asks the proxy again: its refusal,
/// with the status, is the explanation; if the tunnel opens, the failure was beyond the
/// proxy (TLS, the endpoint) and reqwest's own error stands.
async fn through_proxy(
    detail: String,
    proxy: &crate::config::EgressProxy,
    s: &TokenSettings,
) -> String {
    let target = s.token_url.parse::<http::Uri>().ok().and_then(|uri| {
        let host = uri.host()?.to_owned();
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("http") {
                80
            } else {
                443
            });
        Some((host, port))
    });
    if let Some((host, port)) = target {
        let probe = crate::upstream::egress::connect(&host, port, Some(proxy), s.timeout);
        if let Err(e) = probe.await {
            return e.to_string();
        }
    }
    format!("{detail} (through the egress proxy {proxy})")
}

/// One token request to the endpoint; a failure through an egress proxy names the proxy.
pub async fn fetch(
    client: &reqwest::Client,
    s: &TokenSettings,
) -> Result<TokenResponse, FetchError> {
    let mut request = client
        .post(&s.token_url)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json");
    if s.client_auth == ClientAuth::Basic {
        request = request.header(AUTHORIZATION, basic_authorization(s));
    }
    for (k, v) in &s.extra_headers {
        request = request.header(k.as_str(), v.as_str());
    }
    let mut response = match request.body(form_body(s)).send().await {
        Ok(response) => response,
        Err(e) => {
            return Err(match (classify(e, s.timeout), &s.egress) {
                (FetchError::Connect(detail), Some(proxy)) => {
                    FetchError::Connect(through_proxy(detail, proxy, s).await)
                }
                (e, _) => e,
            })
        }
    };
    let status = response.status().as_u16();
    // Only a proxy answers 407 (RFC 9110 §15.5.8): for an http:// token URL the egress proxy
    // forwards the request rather than tunnel it, and refuses it this way.
    if let (407, Some(proxy)) = (status, &s.egress) {
        return Err(FetchError::Connect(format!(
            "the egress proxy {proxy} answered 407 Proxy Authentication Required{}",
            proxy_auth_hint(proxy)
        )));
    }
    let headers = response.headers().clone();
    let mut body = Vec::new();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            // Some proxies (tinyproxy) refuse wrong credentials with a 401 and close with
            // the request body unread: the rest of that answer is theirs, not the endpoint's.
            Err(_) if status == 401 && s.egress.is_some() => break,
            Err(e) => return Err(classify(e, s.timeout)),
        };
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(FetchError::BadResponse(format!(
                "response larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    if let (401, Some(proxy)) = (status, &s.egress) {
        // A token endpoint's 401 is an OAuth error (RFC 6749 §5.2); one without is the
        // forwarding proxy's (tinyproxy answers wrong credentials with 401, not 407).
        if !is_oauth_error(&body) {
            return Err(FetchError::Connect(format!(
                "the egress proxy {proxy} answered 401 Unauthorized, not an OAuth error from the token endpoint{}",
                proxy_auth_hint(proxy)
            )));
        }
    }
    parse_response(status, &headers, &body, s.default_ttl, SystemTime::now())
}

fn classify(e: reqwest::Error, timeout: Duration) -> FetchError {
    if e.is_timeout() {
        return FetchError::Timeout(timeout);
    }
    let e = e.without_url();
    let detail = crate::error::chain(&e);
    if e.is_decode() || e.is_body() {
        return FetchError::BadResponse(detail);
    }
    FetchError::Connect(detail)
}

/// A JSON object with a string `error`, as token endpoints refuse requests.
fn is_oauth_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v.get("error").is_some_and(|e| e.is_string()))
}

fn proxy_auth_hint(proxy: &crate::config::EgressProxy) -> &'static str {
    if proxy.has_credentials() {
        " (the proxy did not accept the credentials in the egress proxy URL)"
    } else {
        " (the proxy requires credentials: give them as http://user:password@host:port)"
    }
}

/// Keeps text from the endpoint printable and short before it reaches logs and 503 messages.
fn sanitize(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

pub fn parse_response(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    default_ttl: Duration,
    now: SystemTime,
) -> Result<TokenResponse, FetchError> {
    let retry_after = retry_after(headers, now);
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let object = json.as_ref().and_then(Value::as_object);

    // RFC 6749 §5.2: an error response carries `error` (and maybe `error_description`).
    let error = object.and_then(|o| o.get("error")).and_then(Value::as_str);
    let description = object
        .and_then(|o| o.get("error_description"))
        .and_then(Value::as_str)
        .map(|d| sanitize(d, 300));
    // Throttled or failing (429, 5xx) is transient whatever the body calls it: retried
    // with backoff and logged as a failure, not as a refusal of the credentials.
    let transient = status == 429 || status >= 500;
    if let (Some(error), false) = (error, transient) {
        return Err(FetchError::OAuth {
            status,
            error: sanitize(error, 80),
            description,
            retry_after,
        });
    }
    if transient || !(200..300).contains(&status) {
        let detail = error.map(|e| match description {
            Some(d) => format!("{} ({d})", sanitize(e, 80)),
            None => sanitize(e, 80),
        });
        return Err(FetchError::Http {
            status,
            detail,
            retry_after,
        });
    }
    let Some(object) = object else {
        let content_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        let looks_html = content_type.contains("html")
            || body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'<');
        let encoding = headers
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .filter(|e| !e.trim().eq_ignore_ascii_case("identity"));
        let why = if let Some(encoding) = encoding {
            // The request asked for no coding (no Accept-Encoding): a compressed answer is
            // the endpoint's (or a middlebox's) mistake, and reads as noise here.
            format!(
                "a body with Content-Encoding {}, which the request did not accept",
                sanitize(encoding, 30)
            )
        } else if looks_html {
            format!(
                "an HTML page instead of JSON (content-type {})",
                sanitize(content_type, 60)
            )
        } else if json.is_some() {
            "JSON that is not an object".to_owned()
        } else {
            match serde_json::from_slice::<Value>(body) {
                Err(e) => format!("invalid JSON ({e})"),
                Ok(_) => "invalid JSON".to_owned(),
            }
        };
        return Err(FetchError::BadResponse(why));
    };
    let access_token = match object.get("access_token") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        Some(_) => {
            return Err(FetchError::BadResponse(
                "access_token is not a non-empty string".into(),
            ))
        }
        None => return Err(FetchError::BadResponse("JSON without access_token".into())),
    };
    if !access_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FetchError::BadResponse(
            "access_token has characters that cannot go in a header".into(),
        ));
    }
    // RFC 6750 bearer tokens are what the proxy sends. Token types that need a proof with each
    // request (MAC, DPoP, PoP) cannot work that way; anything else is accepted, since servers
    // in the wild send "bearer", "Bearer", "BEARER" or vendor strings.
    if let Some(kind) = object.get("token_type").and_then(Value::as_str) {
        if ["mac", "dpop", "pop"]
            .iter()
            .any(|k| kind.eq_ignore_ascii_case(k))
        {
            return Err(FetchError::BadResponse(format!(
                "token_type {:?} is not a bearer token",
                sanitize(kind, 40)
            )));
        }
    }
    let expires_in = match object.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64(),
        // Some servers send it as a string ("3600").
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    let (lifetime, source) = match (object.get("expires_in"), expires_in) {
        (Some(v), None) if !v.is_null() => {
            return Err(FetchError::BadResponse("expires_in is not a number".into()));
        }
        (_, Some(secs)) if secs < 1.0 || !secs.is_finite() => {
            return Err(FetchError::BadResponse(format!(
                "expires_in {secs} is not a positive lifetime"
            )));
        }
        (_, Some(secs)) => (Duration::from_secs_f64(secs.min(1e9)), "expires_in"),
        (_, None) => match jwt_exp(&access_token) {
            Some(exp) => {
                let now_unix = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                if exp <= now_unix {
                    return Err(FetchError::BadResponse(
                        "the token is a JWT that has already expired".into(),
                    ));
                }
                (Duration::from_secs(exp - now_unix), "jwt_exp")
            }
            None => (default_ttl, "default_ttl"),
        },
    };
    let scope = object
        .get("scope")
        .and_then(Value::as_str)
        .map(|s| sanitize(s, 1000));
    Ok(TokenResponse {
        access_token,
        lifetime,
        lifetime_source: source,
        scope,
    })
}

/// The `exp` claim of a JWT (RFC 7519 §4.1.4), read without verifying the signature: the
/// proxy only uses it to schedule a refresh, never to trust the token.
fn jwt_exp(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    exp.as_u64()
        .or_else(|| exp.as_f64().filter(|f| *f > 0.0).map(|f| f as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ProfileKind, Secret};

    const TTL: Duration = Duration::from_secs(300);

    fn parse(status: u16, ct: &str, body: &str) -> Result<TokenResponse, FetchError> {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        parse_response(
            status,
            &h,
            body.as_bytes(),
            TTL,
            UNIX_EPOCH + Duration::from_secs(1_000_000),
        )
    }

    #[test]
    fn parses_a_normal_answer() {
        let t = parse(
            200,
            "application/json",
            r#"{"access_token":"abc","token_type":"Bearer","expires_in":3600,"scope":"a b"}"#,
        )
        .unwrap();
        assert_eq!(t.access_token, "abc");
        assert_eq!(t.lifetime, Duration::from_secs(3600));
        assert_eq!(t.scope.as_deref(), Some("a b"));
        let t = parse(
            200,
            "application/json",
            r#"{"access_token":"abc","expires_in":"60"}"#,
        )
        .unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(60));
    }

    #[test]
    fn lifetime_falls_back_to_jwt_exp_then_default() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1000120}"#);
        let jwt = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
        let t = parse(
            200,
            "application/json",
            &format!(r#"{{"access_token":"{jwt}"}}"#),
        )
        .unwrap();
        assert_eq!(
            (t.lifetime, t.lifetime_source),
            (Duration::from_secs(120), "jwt_exp")
        );
        let t = parse(200, "application/json", r#"{"access_token":"opaque"}"#).unwrap();
        assert_eq!((t.lifetime, t.lifetime_source), (TTL, "default_ttl"));
    }

    #[test]
    fn classifies_bad_answers() {
        let e = parse(200, "text/html", "<html>login</html>").unwrap_err();
        assert!(
            matches!(&e, FetchError::BadResponse(m) if m.contains("HTML")),
            "{e}"
        );
        assert_eq!(
            parse(200, "application/json", "{nope")
                .unwrap_err()
                .outcome(),
            "bad_response"
        );
        let e = parse(200, "application/json", r#"{"token":"x"}"#).unwrap_err();
        assert_eq!(
            e,
            FetchError::BadResponse("JSON without access_token".into())
        );
        assert_eq!(
            parse(
                200,
                "application/json",
                r#"{"access_token":"a","expires_in":0}"#
            )
            .unwrap_err()
            .outcome(),
            "bad_response"
        );
        assert_eq!(
            parse(
                200,
                "application/json",
                r#"{"access_token":"a","token_type":"mac"}"#
            )
            .unwrap_err()
            .outcome(),
            "bad_response"
        );
        assert_eq!(
            parse(502, "text/plain", "bad gateway").unwrap_err(),
            FetchError::Http {
                status: 502,
                detail: None,
                retry_after: None
            }
        );
        // Throttling is not a refusal, whatever the body calls it.
        let e = parse(
            429,
            "application/json",
            r#"{"error":"slow_down","error_description":"too many requests"}"#,
        )
        .unwrap_err();
        assert_eq!((e.outcome(), e.oauth_error()), ("http_error", None));
        assert_eq!(
            e.to_string(),
            "the token endpoint answered HTTP 429: slow_down (too many requests)"
        );
        let e = parse(
            503,
            "application/json",
            r#"{"error":"temporarily_unavailable"}"#,
        )
        .unwrap_err();
        assert_eq!(e.outcome(), "http_error");
        let e = parse(
            401,
            "application/json",
            r#"{"error":"invalid_client","error_description":"bad\nsecret"}"#,
        )
        .unwrap_err();
        assert_eq!(e.oauth_error(), Some("invalid_client"));
        assert_eq!(
            e.to_string(),
            "the token endpoint refused the request (HTTP 401): invalid_client (badsecret)"
        );
    }

    #[test]
    fn reads_retry_after() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let e = parse_response(429, &h, b"", TTL, SystemTime::now()).unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_470);
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        let e = parse_response(503, &h, b"", TTL, now).unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(10)));
    }

    #[test]
    fn a_compressed_answer_is_named_as_such() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_static("gzip"),
        );
        let e = parse_response(200, &h, b"\x1f\x8b\x08\x00", TTL, SystemTime::now()).unwrap_err();
        assert!(e.to_string().contains("Content-Encoding gzip"), "{e}");
    }

    fn settings(auth: ClientAuth) -> TokenSettings {
        TokenSettings {
            kind: ProfileKind::ClientApp,
            token_url: "https://x/t".into(),
            client_id: "id:1".into(),
            client_secret: crate::config::secrets::ClientSecret::Inline(Secret::new("s&e cret")),
            scopes: vec!["a.read".into(), "b.write".into()],
            client_auth: auth,
            timeout: Duration::from_secs(1),
            ca_file: None,
            extra_params: vec![("audience".into(), "x y".into())],
            extra_headers: vec![],
            default_ttl: TTL,
            egress: None,
        }
    }

    #[test]
    fn builds_the_form_and_basic_credentials() {
        assert_eq!(
            form_body(&settings(ClientAuth::Body)),
            "grant_type=client_credentials&scope=a.read+b.write&client_id=id%3A1&client_secret=s%26e+cret&audience=x+y"
        );
        let basic = settings(ClientAuth::Basic);
        assert_eq!(
            form_body(&basic),
            "grant_type=client_credentials&scope=a.read+b.write&audience=x+y"
        );
        let header = basic_authorization(&basic);
        assert!(header.is_sensitive());
        let b64 = header.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(decoded, b"id%3A1:s%26e+cret");
    }
}
