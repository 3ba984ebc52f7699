//! The first phase, on the request head alone (before any body byte is read): is the request
//! well-formed, is the client allowed, which route takes it, which token holder serves it.

use std::sync::Arc;

use http::Method;

use super::{ConnInfo, RequestLog};
use crate::error::ProxyError;
use crate::routes::Route;
use crate::state::Generation;
use crate::token::{AccessToken, TokenHolder};

/// What the pipeline reads of a request head, whatever transport carried it.
pub(crate) struct HeadFacts<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    /// The target was in absolute form (`GET http://host/x`), HTTP/1.x only.
    pub absolute_form: bool,
    /// HTTP/1.1 (exactly one `Host` is required, RFC 9112 §3.2).
    pub http11: bool,
    /// The first `Host` field, and whether there was more than one.
    pub host: Option<&'a [u8]>,
    pub more_hosts: bool,
    /// h2's `:authority`: the request's host (RFC 9113 §8.3.1), before any `Host`.
    pub authority: Option<&'a str>,
    /// The value of the API key header, if `[server.access]` names one and it was sent.
    pub api_key: Option<&'a [u8]>,
    /// The API key header came more than once: no key is taken (which one would count?).
    pub more_api_keys: bool,
    /// Where a browser says the request comes from.
    pub provenance: super::browser::Provenance<'a>,
    /// How many header fields the request carries.
    pub fields: usize,
}

/// A request admitted to a route.
pub(crate) struct Admitted<'g> {
    /// The configuration it was admitted under (and finishes on).
    pub generation: &'g Generation,
    /// The route's position in the table (its upstream client is per route).
    pub index: usize,
    pub route: &'g Route,
    /// The profile and its token holder; `None` for `profile = "none"`.
    pub holder: Option<(&'g str, &'g Arc<TokenHolder>)>,
}

/// Decides, on the head alone, whether and where the request goes (contract §3, §5, §8).
pub(crate) fn admit<'g>(
    generation: &'g Generation,
    conn: ConnInfo,
    head: &HeadFacts<'_>,
    log: &mut RequestLog,
) -> Result<Admitted<'g>, ProxyError> {
    // One limit on header fields for every transport: the fast path's parser stops at it,
    // and h2 has no count of its own.
    if head.fields > crate::http::MAX_FIELDS {
        return Err(ProxyError::HeadTooLarge(format!(
            "the request has more than {} header fields",
            crate::http::MAX_FIELDS
        )));
    }
    // No open proxy: CONNECT and absolute-form targets are refused (RFC 9112 §3.2.2 lets a
    // server accept absolute-form, but a reverse proxy that did could be aimed elsewhere).
    // TRACE reflects the request back, the proxy's bearer token included (RFC 9110 §9.3.8
    // lets a proxy refuse it), and so does IIS's TRACK.
    if *head.method == Method::CONNECT
        || *head.method == Method::TRACE
        || head.method.as_str().eq_ignore_ascii_case("TRACK")
    {
        return Err(ProxyError::MethodNotAllowed(head.method.to_string()));
    }
    // A standard method in the wrong case is another method to this proxy (methods are
    // case-sensitive) but may be the standard one to a lenient upstream: `head` answered
    // without a body would desync the connection.
    if is_miscased_standard(head.method) {
        return Err(ProxyError::BadRequest(format!(
            "{:?} is not {:?}: methods are case-sensitive",
            head.method.as_str(),
            head.method.as_str().to_ascii_uppercase()
        )));
    }
    if head.absolute_form {
        return Err(ProxyError::BadRequest(
            "absolute-form request targets are not accepted: this is a reverse proxy; send the path only".into(),
        ));
    }
    if let Some(e) = crate::http::host_fields_error(head.http11, head.host, head.more_hosts) {
        return Err(ProxyError::BadRequest(e.into()));
    }
    // h2: the host is `:authority`'s, which must be a valid host[:port] (no userinfo); a
    // `Host` that names another is a malformed request (RFC 9113 §8.3.1), or the route (and
    // so the token) would be chosen by a field other front ends do not read.
    if let Some(authority) = head.authority {
        if !crate::http::is_valid_host(authority.as_bytes()) {
            return Err(ProxyError::BadRequest(
                ":authority is not a valid host[:port]".into(),
            ));
        }
        // Compared after scheme-based normalization (RFC 3986 §6.2.3): `x` and `x:443`
        // over TLS are one host.
        let default_port: &[u8] = if conn.tls { b":443" } else { b":80" };
        let normal = |h: &[u8]| -> Vec<u8> {
            let h = h.strip_suffix(default_port).unwrap_or(h);
            h.to_ascii_lowercase()
        };
        if head
            .host
            .is_some_and(|h| normal(h) != normal(authority.as_bytes()))
        {
            return Err(ProxyError::BadRequest(
                "the Host field names another host than :authority".into(),
            ));
        }
    }
    crate::http::path::validate(head.path)
        .map_err(|e| ProxyError::BadRequest(e.message().into()))?;
    if let Some(access) = &generation.access {
        let key = if head.more_api_keys {
            None
        } else {
            head.api_key
        };
        access.check_key(conn.peer.ip(), key)?;
    }
    // Host values are checked above (visible ASCII), so this is the whole value.
    let host = head
        .authority
        .or_else(|| head.host.and_then(|h| std::str::from_utf8(h).ok()));
    // Before the route: a page of another site learns nothing of which paths are routed.
    super::browser::check(
        &head.provenance,
        &generation.config.server.allowed_origins,
        host,
        super::browser::HostRule::Own(&|h| generation.routes.names_host(h)),
    )?;
    let (index, route) = generation
        .routes
        .find(head.method, host, head.path)
        .ok_or_else(|| ProxyError::NoRoute {
            method: head.method.to_string(),
            path: head.path.to_owned(),
        })?;
    log.route = Some(route.config.name.clone());
    log.profile = route.config.profile.clone();
    let holder = match &route.config.profile {
        Some(profile) => match generation.tokens.get(profile) {
            Some(holder) => Some((profile.as_str(), holder)),
            None => {
                return Err(ProxyError::UpstreamUnreachable {
                    route: route.config.name.clone(),
                    detail: format!("profile {profile} has no token holder"),
                })
            }
        },
        None => None,
    };
    Ok(Admitted {
        generation,
        index,
        route,
        holder,
    })
}

fn is_miscased_standard(method: &Method) -> bool {
    // The standard methods parse to their own constants: only extensions need a look.
    if matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::DELETE
            | Method::PATCH
            | Method::OPTIONS
            | Method::CONNECT
            | Method::TRACE
    ) {
        return false;
    }
    let method = method.as_str();
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    STANDARD
        .iter()
        .any(|s| s.eq_ignore_ascii_case(method) && *s != method)
}

/// The second phase: the route's token, waiting for a fetch in flight (contract §4); a
/// request is never forwarded without one.
pub(crate) async fn token(
    admitted: &Admitted<'_>,
    log: &mut RequestLog,
) -> Result<Option<Arc<AccessToken>>, ProxyError> {
    let Some((profile, holder)) = admitted.holder else {
        return Ok(None);
    };
    let token = holder
        .get(profile)
        .await
        .map_err(ProxyError::TokenUnavailable)?;
    log.fingerprint = Some(token.fingerprint.clone());
    Ok(Some(token))
}
