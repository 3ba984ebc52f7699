//! From the raw, as-written serde shape of `proxy.toml` to the typed, resolved `Config`:
//! defaults, eGain specifics (anonymous token URL and scope prefix), secrets, and every check
//! that names a key path.

use super::egress::{decide, EgressSetting};
use super::*;

// ---------------------------------------------------------------------------------------------
// Raw, as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    server: RawServer,
    admin: Option<RawAdmin>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    profiles: BTreeMap<String, RawProfile>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    token_cache: Option<RawTokenCache>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenCache {
    redis: String,
    key_prefix: Option<String>,
    encryption_key_file: PathBuf,
    timeout: Option<Dur>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<OneOrMany>,
    shutdown_grace: Option<Dur>,
    #[serde(default)]
    open: bool,
    tls: Option<RawTls>,
    access: Option<RawAccess>,
    header_read_timeout: Option<Dur>,
    body_read_timeout: Option<Dur>,
    max_header_bytes: Option<usize>,
    max_connections: Option<usize>,
    #[serde(default)]
    allowed_origins: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    #[serde(default)]
    api_keys: Vec<String>,
    api_key_header: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    kind: ProfileKind,
    token_url: Option<String>,
    tenant: Option<String>,
    scope_prefix: Option<String>,
    client_id: String,
    client_secret: Option<String>,
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    scopes: Vec<String>,
    client_auth: Option<ClientAuth>,
    timeout: Option<Dur>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    extra_params: BTreeMap<String, String>,
    #[serde(default)]
    extra_headers: BTreeMap<String, String>,
    default_ttl: Option<Dur>,
    #[serde(default)]
    allow_insecure_http: bool,
    egress_proxy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    path_prefix: String,
    host: Option<String>,
    methods: Option<Vec<String>>,
    upstream: String,
    profile: String,
    #[serde(default)]
    strip_prefix: bool,
    #[serde(default)]
    set_headers: BTreeMap<String, String>,
    #[serde(default)]
    remove_headers: Vec<String>,
    timeout: Option<Dur>,
    connect_timeout: Option<Dur>,
    retry_on_401: Option<bool>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    allow_insecure_http: bool,
    egress_proxy: Option<String>,
}

/// A duration written as `"250ms"`, `"30s"`, `"5m"`.
#[derive(Debug, Clone, Copy)]
struct Dur(Duration);

const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); use e.g. \"250ms\", \"30s\", \"5m\""
            ))
        })?;
        // Deadlines are computed as now + duration; absurd values must not overflow them.
        if d > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "duration {s:?} is longer than a year"
            )));
        }
        Ok(Dur(d))
    }
}

pub(super) fn resolve(
    raw: RawConfig,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let egress_env = EgressEnv::read(env);
    let server = resolve_server(raw.server, base)?;
    let admin = match raw.admin {
        None => None,
        Some(a) => {
            let s = a.listen.as_deref().unwrap_or("127.0.0.1:9901");
            let listen = parse_socket_addr(s).map_err(|m| ConfigError::at("admin.listen", m))?;
            if let Some(other) = server.listen.iter().find(|a| overlaps(**a, listen)) {
                return Err(ConfigError::at(
                    "admin.listen",
                    format!("{listen} overlaps {other} in server.listen: the admin endpoints need an address of their own"),
                ));
            }
            Some(AdminConfig { listen })
        }
    };

    let log = LogConfig {
        format: raw.log.format.unwrap_or_default(),
        level: raw.log.level.unwrap_or_else(|| "info".to_owned()),
    };
    if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
        return Err(ConfigError::at(
            "log.level",
            format!(
                "invalid level {:?}; use error, warn, info, debug or trace",
                log.level
            ),
        ));
    }

    let mut profiles = BTreeMap::new();
    for (name, p) in raw.profiles {
        profiles.insert(name.clone(), resolve_profile(name, p, base, &egress_env)?);
    }
    let mut routes = Vec::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        let route = resolve_route(i, r, &profiles, &routes, base, &egress_env)?;
        routes.push(route);
    }
    let token_cache = raw
        .token_cache
        .map(|c| resolve_token_cache(c, base))
        .transpose()?;
    Ok(Config {
        server,
        admin,
        log,
        profiles,
        routes,
        token_cache,
        egress_env,
    })
}

/// `egress_proxy` (at `key`) and the environment, applied to `url` (already validated).
fn resolve_egress(
    setting: Option<&str>,
    key: &str,
    env: &EgressEnv,
    url: &str,
    url_key: &str,
) -> Result<Egress, ConfigError> {
    let setting = setting
        .map(EgressSetting::parse)
        .transpose()
        .map_err(|m| ConfigError::at(key, m))?;
    let uri: Uri = url
        .parse()
        .map_err(|_| ConfigError::at(url_key, format!("{url:?} is not a URL")))?;
    let scheme = uri.scheme_str().unwrap_or("https");
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "http" { 80 } else { 443 });
    decide(
        setting.as_ref(),
        key,
        env,
        scheme,
        uri.host().unwrap_or_default(),
        port,
    )
    .map_err(|m| ConfigError::at(url_key, m))
}

/// `[token_cache]`: the URL's shape, the prefix, the key file, the timeout.
fn resolve_token_cache(raw: RawTokenCache, base: &Path) -> Result<TokenCacheConfig, ConfigError> {
    let at = |key: &str| format!("token_cache.{key}");
    let scheme = raw.redis.split_once("://").map(|(s, _)| s);
    if !matches!(scheme, Some("redis" | "rediss")) {
        return Err(ConfigError::at(
            at("redis"),
            format!(
                "{} is not a redis:// or rediss:// URL",
                redact_url_password(&raw.redis)
            ),
        ));
    }
    let redis = crate::config::encode_userinfo(&raw.redis);
    // redis-rs reads a `#insecure` fragment as "skip certificate checks"; this proxy never
    // skips them (and its redis-rs is built without that switch).
    if scheme == Some("rediss") && redis.contains("#insecure") {
        return Err(ConfigError::at(
            at("redis"),
            "#insecure would turn certificate checks off, which egain-proxy never does; for a private CA set token_cache.ca_file",
        ));
    }
    let ca_file = match &raw.ca_file {
        None => None,
        Some(_) if scheme != Some("rediss") => {
            return Err(ConfigError::at(
                at("ca_file"),
                "applies to rediss:// (TLS) only",
            ))
        }
        Some(path) => {
            let path = in_dir(base, path);
            crate::tls::read_pem_certs(&path).map_err(|m| ConfigError::at(at("ca_file"), m))?;
            Some(path)
        }
    };
    // The client's own parser decides what it can connect to; its message never holds the URL.
    if let Err(e) = redis::Client::open(redis.as_str()) {
        return Err(ConfigError::at(
            at("redis"),
            format!("{}: {e}", redact_url_password(&raw.redis)),
        ));
    }
    let key_prefix = raw.key_prefix.unwrap_or_else(|| "egain-proxy".to_owned());
    if key_prefix.is_empty()
        || !key_prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
    {
        return Err(ConfigError::at(
            at("key_prefix"),
            format!("{key_prefix:?} must be non-empty printable ASCII without spaces or braces"),
        ));
    }
    let timeout = raw.timeout.map_or(Duration::from_millis(250), |d| d.0);
    if timeout.is_zero() || timeout > Duration::from_secs(10) {
        return Err(ConfigError::at(
            at("timeout"),
            "must be more than 0 and at most 10s (it bounds every Redis operation)",
        ));
    }
    let encryption_key_file = in_dir(base, &raw.encryption_key_file);
    let key = secrets::read_key_file(&encryption_key_file)
        .map_err(|m| ConfigError::at(at("encryption_key_file"), m))?;
    Ok(TokenCacheConfig {
        redis: Secret::new(redis),
        key_prefix,
        encryption_key_file,
        key: Secret32(key),
        timeout,
        ca_file,
    })
}

/// A path from the config, relative to the config file's folder.
fn in_dir(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

/// `[server]`, with `[server.tls]` and `[server.access]`.
fn resolve_server(raw: RawServer, base: &Path) -> Result<ServerConfig, ConfigError> {
    let file = |p: &Path| in_dir(base, p);
    let listen_strings = match raw.listen {
        None => vec!["127.0.0.1:8080".to_owned()],
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if listen_strings.is_empty() {
        return Err(ConfigError::at(
            "server.listen",
            "needs at least one address",
        ));
    }
    let mut listen: Vec<SocketAddr> = Vec::new();
    for s in &listen_strings {
        let addr = parse_socket_addr(s).map_err(|m| ConfigError::at("server.listen", m))?;
        if let Some(other) = listen.iter().find(|a| overlaps(**a, addr)) {
            return Err(ConfigError::at(
                "server.listen",
                format!("{addr} overlaps {other}: both cannot be bound (\"[::]:PORT\" alone takes IPv4 and IPv6)"),
            ));
        }
        listen.push(addr);
    }
    let access = match raw.access {
        None => None,
        Some(a) => {
            let api_key_header = a.api_key_header.as_deref().unwrap_or("x-proxy-key");
            let api_key_header =
                HeaderName::from_bytes(api_key_header.as_bytes()).map_err(|_| {
                    ConfigError::at(
                        "server.access.api_key_header",
                        format!("{api_key_header:?} is not a valid header name"),
                    )
                })?;
            let mut allow = Vec::new();
            for (i, cidr) in a.allow.iter().enumerate() {
                allow.push(
                    parse_cidr(cidr)
                        .map_err(|m| ConfigError::at(format!("server.access.allow[{i}]"), m))?,
                );
            }
            for (i, key) in a.api_keys.iter().enumerate() {
                if key.len() < 16 {
                    return Err(ConfigError::at(
                        format!("server.access.api_keys[{i}]"),
                        "API keys must be at least 16 characters",
                    ));
                }
            }
            if a.api_keys.is_empty() && allow.is_empty() {
                return Err(ConfigError::at(
                    "server.access",
                    "set api_keys, allow, or both (an empty table would admit everyone)",
                ));
            }
            Some(AccessConfig {
                api_keys: a.api_keys.into_iter().map(Secret::new).collect(),
                api_key_header,
                allow,
            })
        }
    };
    if access.is_none() && !raw.open {
        if let Some(addr) = listen.iter().find(|a| !a.ip().is_loopback()) {
            return Err(ConfigError::at(
                "server.listen",
                format!(
                    "{addr} is not a loopback address: anyone who reaches it would use the proxy's eGain credentials; \
                     add [server.access] (api_keys and/or allow) or set server.open = true"
                ),
            ));
        }
    }
    let tls = match raw.tls {
        None => None,
        Some(t) => {
            let files = TlsFiles {
                cert: file(&t.cert),
                key: file(&t.key),
            };
            // Load them now so `check` catches a missing file or a key that does not fit.
            crate::tls::server_config(&files.cert, &files.key)
                .map_err(|m| ConfigError::at("server.tls", m))?;
            Some(files)
        }
    };
    let allowed_origins = raw
        .allowed_origins
        .iter()
        .enumerate()
        .map(|(i, o)| {
            origin(o).map_err(|m| ConfigError::at(format!("server.allowed_origins[{i}]"), m))
        })
        .collect::<Result<_, _>>()?;
    Ok(ServerConfig {
        allowed_origins,
        listen,
        shutdown_grace: raw.shutdown_grace.map_or(Duration::from_secs(30), |d| d.0),
        open: raw.open,
        tls,
        access,
        header_read_timeout: positive(
            "server.header_read_timeout",
            raw.header_read_timeout,
            Duration::from_secs(10),
        )?,
        body_read_timeout: positive(
            "server.body_read_timeout",
            raw.body_read_timeout,
            Duration::from_secs(30),
        )?,
        max_header_bytes: match raw.max_header_bytes.unwrap_or(64 * 1024) {
            n if n < 8192 => {
                return Err(ConfigError::at(
                    "server.max_header_bytes",
                    format!("{n} is too small: at least 8192 (browsers alone send more)"),
                ))
            }
            n => n,
        },
        max_connections: match raw.max_connections.unwrap_or(10_000) {
            0 => {
                return Err(ConfigError::at(
                    "server.max_connections",
                    "must be at least 1",
                ))
            }
            n => n,
        },
    })
}

/// Two listen addresses the same port cannot both be bound to: equal, or one of them the
/// unspecified address (`0.0.0.0`, `[::]`, which on Linux takes IPv4 too). Port 0 (any free
/// port) never overlaps.
pub fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// A duration that must be more than zero (a zero timeout would end every wait at once).
fn positive(key: &str, value: Option<Dur>, default: Duration) -> Result<Duration, ConfigError> {
    match value.map_or(default, |d| d.0) {
        d if d.is_zero() => Err(ConfigError::at(key, "must be more than zero")),
        d => Ok(d),
    }
}

/// A profile's or route's name: it becomes a metrics label value, a log field and part of
/// error messages, so no quotes, backslashes or control characters.
fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::at(key, "must not be empty"));
    }
    if name
        .chars()
        .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        return Err(ConfigError::at(
            key,
            format!("{name:?} is not a usable name: it appears in metrics, logs and errors, so no quotes, backslashes or control characters"),
        ));
    }
    Ok(())
}

/// An origin as browsers send it in `Origin` (RFC 6454 §6.1): `scheme://host[:port]`, in
/// lower case, with no path (an app's own scheme too, as Electron apps send), or `null`
/// (what sandboxed frames and `file:` pages send: listing it admits every such page).
fn origin(text: &str) -> Result<String, String> {
    let usage = || {
        format!("{text:?} is not an origin: write it as a browser sends it, scheme://host[:port] (e.g. https://tool.corp)")
    };
    if text == "null" {
        return Ok(text.to_owned());
    }
    let uri: http::Uri = text.parse().map_err(|_| usage())?;
    let plain = uri.scheme_str().is_some()
        && uri.authority().is_some_and(|a| !a.as_str().contains('@'))
        && !text.ends_with('/')
        && uri.path() == "/"
        && uri.query().is_none();
    if plain {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(usage())
    }
}

/// One `[profiles.NAME]`: eGain's flavour, token URL, secret and scopes.
fn resolve_profile(
    name: String,
    p: RawProfile,
    base: &Path,
    env: &EgressEnv,
) -> Result<ProfileConfig, ConfigError> {
    let file = |p: &Path| in_dir(base, p);
    let at = |key: &str| format!("profiles.{name}.{key}");
    check_name(&format!("profiles.{name:?}"), &name)?;
    if name == "none" {
        return Err(ConfigError::at(
            format!("profiles.{name}"),
            "\"none\" is reserved (a route's profile = \"none\" means no token)",
        ));
    }
    let (token_url, url_key) = match p.kind {
        ProfileKind::ClientApp => {
            let url = p.token_url.ok_or_else(|| {
                ConfigError::at(at("token_url"), "is required for kind = \"client_app\"")
            })?;
            if p.tenant.is_some() {
                return Err(ConfigError::at(
                    at("tenant"),
                    "only applies to kind = \"anonymous_customer\"",
                ));
            }
            (url, "token_url")
        }
        ProfileKind::AnonymousCustomer => {
            let tenant = p.tenant.ok_or_else(|| {
                ConfigError::at(
                    at("tenant"),
                    "is required for kind = \"anonymous_customer\" (sent as domain_hint)",
                )
            })?;
            if tenant.is_empty()
                || !tenant
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::at(
                    at("tenant"),
                    format!("{tenant:?} is not a tenant id (letters, digits, - and _)"),
                ));
            }
            let base = p
                .token_url
                .unwrap_or_else(|| DEFAULT_ANON_TOKEN_URL.to_owned());
            (add_anonymous_query(&base, &tenant), "token_url")
        }
    };
    check_url(&token_url, p.allow_insecure_http, false)
        .map_err(|m| ConfigError::at(at(url_key), m))?;
    let egress = resolve_egress(
        p.egress_proxy.as_deref(),
        &at("egress_proxy"),
        env,
        &token_url,
        &at(url_key),
    )?;
    let client_secret = match (p.client_secret, p.client_secret_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::at(
                at("client_secret"),
                "set client_secret or client_secret_file, not both",
            ));
        }
        (None, None) => {
            return Err(ConfigError::at(
                at("client_secret"),
                "missing (set client_secret or client_secret_file)",
            ));
        }
        (Some(s), None) if s.is_empty() => {
            return Err(ConfigError::at(at("client_secret"), "is empty"));
        }
        (Some(s), None) => ClientSecret::Inline(Secret::new(s)),
        (None, Some(path)) => ClientSecret::from_file(file(&path))
            .map_err(|m| ConfigError::at(at("client_secret_file"), m))?,
    };
    if p.client_id.is_empty() {
        return Err(ConfigError::at(at("client_id"), "is empty"));
    }
    let scopes = match p.kind {
        ProfileKind::ClientApp => p.scopes,
        ProfileKind::AnonymousCustomer => {
            let prefix = p
                .scope_prefix
                .unwrap_or_else(|| DEFAULT_SCOPE_PREFIX.to_owned());
            p.scopes
                .into_iter()
                .map(|s| prefix_scope(&prefix, &s))
                .collect()
        }
    };
    for (i, s) in scopes.iter().enumerate() {
        if s.is_empty() || s.contains(char::is_whitespace) {
            return Err(ConfigError::at(
                format!("profiles.{name}.scopes[{i}]"),
                format!("{s:?} is not a scope (no spaces; list scopes separately)"),
            ));
        }
    }
    if let Some(ca) = &p.ca_file {
        crate::tls::read_pem_certs(&file(ca)).map_err(|m| ConfigError::at(at("ca_file"), m))?;
    }
    for (k, v) in &p.extra_headers {
        let at = || format!("profiles.{name}.extra_headers.{k}");
        let Ok(header) = HeaderName::from_bytes(k.as_bytes()) else {
            return Err(ConfigError::at(at(), "is not a valid header"));
        };
        if HeaderValue::from_str(v).is_err() {
            return Err(ConfigError::at(at(), "is not a valid header"));
        }
        // The request's framing, its target and its credentials are the proxy's: a second
        // `Authorization` or `Content-Type` would reach the endpoint beside the proxy's own.
        let basic = p.client_auth == Some(ClientAuth::Basic);
        let managed = matches!(
            header.as_str(),
            "host"
                | "content-type"
                | "content-length"
                | "transfer-encoding"
                | "connection"
                | "proxy-authorization"
        ) || (basic && header == http::header::AUTHORIZATION);
        if managed {
            return Err(ConfigError::at(at(), "is set by the proxy itself"));
        }
    }
    for k in p.extra_params.keys() {
        if ["grant_type", "client_id", "client_secret", "scope"].contains(&k.as_str()) {
            return Err(ConfigError::at(
                format!("profiles.{name}.extra_params.{k}"),
                "is set by the proxy itself",
            ));
        }
    }
    let timeout = p.timeout.map_or(Duration::from_secs(10), |d| d.0);
    if timeout.is_zero() {
        return Err(ConfigError::at(at("timeout"), "must be more than zero"));
    }
    let default_ttl = p.default_ttl.map_or(Duration::from_secs(300), |d| d.0);
    if default_ttl < Duration::from_secs(1) {
        return Err(ConfigError::at(at("default_ttl"), "must be at least 1s"));
    }
    let token = TokenSettings {
        kind: p.kind,
        token_url,
        client_id: p.client_id,
        client_secret,
        scopes,
        client_auth: p.client_auth.unwrap_or(ClientAuth::Body),
        timeout,
        ca_file: p.ca_file.map(|c| file(&c)),
        extra_params: p.extra_params.into_iter().collect(),
        extra_headers: p.extra_headers.into_iter().collect(),
        default_ttl,
        egress: egress.proxy,
    };
    Ok(ProfileConfig {
        name,
        token,
        egress_from: egress.from,
    })
}

/// One `[[routes]]` entry; `earlier` are the routes before it (names must be unique).
fn resolve_route(
    i: usize,
    r: RawRoute,
    profiles: &BTreeMap<String, ProfileConfig>,
    earlier: &[RouteConfig],
    base: &Path,
    env: &EgressEnv,
) -> Result<RouteConfig, ConfigError> {
    let file = |p: &Path| in_dir(base, p);
    let at = |key: &str| format!("routes[{i}].{key}");
    let name = r.name.unwrap_or_else(|| format!("route{i}"));
    check_name(&at("name"), &name)?;
    if name == "none" {
        return Err(ConfigError::at(
            at("name"),
            "\"none\" is reserved (the route label of requests no route matched)",
        ));
    }
    if earlier.iter().any(|x| x.name == name) {
        return Err(ConfigError::at(
            at("name"),
            format!("{name:?} is used by another route"),
        ));
    }
    if !r.path_prefix.starts_with('/') {
        return Err(ConfigError::at(
            at("path_prefix"),
            format!("{:?} must start with /", r.path_prefix),
        ));
    }
    if r.path_prefix.contains(['?', '#']) || crate::http::path::has_dot_segment(&r.path_prefix) {
        return Err(ConfigError::at(
            at("path_prefix"),
            format!(
                "{:?} must be a plain path (no query, fragment, . or .. segments)",
                r.path_prefix
            ),
        ));
    }
    let profile = if r.profile == "none" {
        None
    } else if profiles.contains_key(&r.profile) {
        Some(r.profile.clone())
    } else {
        let known: Vec<&str> = profiles.keys().map(String::as_str).collect();
        return Err(ConfigError::at(
            at("profile"),
            format!(
                "unknown profile {:?} (defined: {}; or \"none\")",
                r.profile,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        ));
    };
    check_url(&r.upstream, r.allow_insecure_http, true)
        .map_err(|m| ConfigError::at(at("upstream"), m))?;
    let upstream = parse_upstream(&r.upstream).map_err(|m| ConfigError::at(at("upstream"), m))?;
    let egress = resolve_egress(
        r.egress_proxy.as_deref(),
        &at("egress_proxy"),
        env,
        &r.upstream,
        &at("upstream"),
    )?;
    let methods = match r.methods {
        None => None,
        Some(list) => {
            let mut out = Vec::new();
            for (j, m) in list.iter().enumerate() {
                let method =
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                        ConfigError::at(
                            format!("routes[{i}].methods[{j}]"),
                            format!("{m:?} is not an HTTP method"),
                        )
                    })?;
                out.push(method);
            }
            Some(out)
        }
    };
    let mut set_headers = Vec::new();
    for (k, v) in &r.set_headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
            ConfigError::at(
                format!("routes[{i}].set_headers.{k}"),
                "is not a valid header name",
            )
        })?;
        if is_proxy_field(&name) {
            return Err(ConfigError::at(
                format!("routes[{i}].set_headers.{k}"),
                MANAGED_FIELD,
            ));
        }
        let value = HeaderValue::from_str(v).map_err(|_| {
            ConfigError::at(
                format!("routes[{i}].set_headers.{k}"),
                "is not a valid header value",
            )
        })?;
        set_headers.push((name, value));
    }
    let mut remove_headers = Vec::new();
    for (j, k) in r.remove_headers.iter().enumerate() {
        let at = || format!("routes[{i}].remove_headers[{j}]");
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| ConfigError::at(at(), format!("{k:?} is not a valid header name")))?;
        if is_proxy_field(&name) {
            return Err(ConfigError::at(at(), format!("{k:?} {MANAGED_FIELD}")));
        }
        remove_headers.push(name);
    }
    if let Some(ca) = &r.ca_file {
        crate::tls::read_pem_certs(&file(ca)).map_err(|m| ConfigError::at(at("ca_file"), m))?;
    }
    // A bare IPv6 address is written in brackets, as a request's Host carries it.
    let host = r.host.map(|h| match h.parse::<std::net::Ipv6Addr>() {
        Ok(ip) => format!("[{ip}]"),
        Err(_) => h.to_ascii_lowercase(),
    });
    if let Some(h) = &host {
        if h.contains('*') {
            return Err(ConfigError::at(
                at("host"),
                format!("{h:?}: hosts are matched exactly (no wildcards); write a route per host"),
            ));
        }
        // Matched against the request's host without its port, so a port here never matches.
        let port = match h.strip_prefix('[') {
            Some(rest) => rest
                .split_once(']')
                .is_some_and(|(_, after)| !after.is_empty()),
            None => h.contains(':'),
        };
        if h.is_empty() || port || !crate::http::is_valid_host(h.as_bytes()) {
            return Err(ConfigError::at(
                at("host"),
                format!("{h:?} is not a host name or IP address without a port (requests are matched on their host, whatever the port; a name outside ASCII is written in its xn-- form)"),
            ));
        }
    }
    Ok(RouteConfig {
        name,
        path_prefix: r.path_prefix,
        host,
        methods,
        upstream,
        profile,
        strip_prefix: r.strip_prefix,
        set_headers,
        remove_headers,
        timeout: positive(&at("timeout"), r.timeout, Duration::from_secs(60))?,
        connect_timeout: positive(
            &at("connect_timeout"),
            r.connect_timeout,
            Duration::from_secs(5),
        )?,
        retry_on_401: r.retry_on_401.unwrap_or(true),
        ca_file: r.ca_file.map(|c| file(&c)),
        egress,
    })
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let s = s
        .strip_prefix("localhost:")
        .map(|port| format!("127.0.0.1:{port}"))
        .unwrap_or_else(|| s.to_owned());
    s.parse()
        .map_err(|_| format!("{s:?} is not an address like \"127.0.0.1:8080\" or \"[::1]:8080\""))
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not a CIDR block like \"10.0.0.0/8\" or an address"))
}

/// eGain's anonymous-customer flow needs `user_type=customer&domain_hint=<tenant>` on the URL;
/// anything the operator already put in the query is kept.
pub(super) fn add_anonymous_query(base: &str, tenant: &str) -> String {
    let (url, query) = match base.split_once('?') {
        Some((u, q)) => (u, q),
        None => (base, ""),
    };
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    let has = |pairs: &[String], key: &str| pairs.iter().any(|p| p.split('=').next() == Some(key));
    if !has(&pairs, "user_type") {
        pairs.push("user_type=customer".to_owned());
    }
    if !has(&pairs, "domain_hint") {
        pairs.push(format!("domain_hint={tenant}"));
    }
    format!("{url}?{}", pairs.join("&"))
}

/// Prefixes a scope with eGain's resource URL unless it already is a URL.
pub fn prefix_scope(prefix: &str, scope: &str) -> String {
    if scope.starts_with("https://") || scope.starts_with("http://") || scope.starts_with("api://")
    {
        scope.to_owned()
    } else if prefix.ends_with('/') || prefix.is_empty() {
        format!("{prefix}{scope}")
    } else {
        format!("{prefix}/{scope}")
    }
}

/// Only `https://`, or `http://` to a loopback host, unless the operator opted in.
fn check_url(url: &str, allow_insecure_http: bool, is_upstream: bool) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let host = uri.host().ok_or_else(|| format!("{url:?} has no host"))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!("{url:?}: credentials in the URL are not allowed"));
    }
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if allow_insecure_http || is_loopback_host(host) => Ok(()),
        Some("http") => Err(format!(
            "{url:?} uses http:// to a non-loopback host: {} would cross the network in clear text; \
             use https:// or set allow_insecure_http = true",
            if is_upstream { "tokens" } else { "the client secret and tokens" }
        )),
        _ => Err(format!("{url:?} must start with https:// (or http:// for loopback)")),
    }
}

pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn parse_upstream(url: &str) -> Result<UpstreamTarget, String> {
    let uri: Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("{url:?} needs a scheme"))?;
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{url:?} needs a host"))?;
    if uri.query().is_some() || url.contains('#') {
        return Err(format!(
            "{url:?}: an upstream is scheme://authority[/base-path], without query or fragment"
        ));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok(UpstreamTarget {
        scheme,
        authority,
        base_path,
    })
}

/// A route may not set or remove what frames a message, names its target or carries
/// credentials, nor connection-specific fields: those are the proxy's alone (RFC 9112 §11.2,
/// request smuggling).
fn is_proxy_field(name: &HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    crate::http::is_managed(name) || crate::http::is_hop_by_hop(name)
}

const MANAGED_FIELD: &str = "is managed by the proxy (message framing, Host, Authorization, \
     X-Forwarded-*, x-request-id and connection-specific fields) and cannot be set or removed \
     by a route";
