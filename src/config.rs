//! `proxy.toml`: serde types (raw), then validation into one typed, resolved `Config`.
//!
//! Loading is three steps, each with errors that name where the problem is:
//! 1. TOML syntax (`line:column`),
//! 2. `${VAR}` interpolation of every string value (key path),
//! 3. shape and validation (`deny_unknown_fields`, key path via `serde_path_to_error`).

pub mod secrets;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{Method, Uri};
use ipnet::IpNet;
use serde::Deserialize;

pub use secrets::Secret;

pub const DEFAULT_ANON_TOKEN_URL: &str =
    "https://api.ai.egain.cloud/core/authmgr/v3/oauth2/v2.0/anonymous/token";
pub const DEFAULT_SCOPE_PREFIX: &str = "https://api.ai.egain.cloud/auth/";

/// A configuration error: where (file, key path or line:column) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub location: String,
    pub message: String,
}

impl ConfigError {
    fn at(location: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            location: location.into(),
            message: message.into(),
        }
    }

    /// An error about the configuration as a whole (no single key to name).
    pub fn general(message: impl Into<String>) -> Self {
        ConfigError::at("", message)
    }

    fn in_file(mut self, file: &Path) -> Self {
        self.file = Some(file.to_owned());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}:", file.display())?;
            // `line:column` locations join the file name without a space, like a compiler.
            if !self.location.starts_with(|c: char| c.is_ascii_digit()) {
                f.write_str(" ")?;
            }
        }
        if self.location.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.location, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Raw, as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    admin: Option<RawAdmin>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    profiles: BTreeMap<String, RawProfile>,
    #[serde(default)]
    routes: Vec<RawRoute>,
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
    max_header_bytes: Option<usize>,
    max_connections: Option<usize>,
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
}

/// A duration written as `"250ms"`, `"30s"`, `"5m"`.
#[derive(Debug, Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); use e.g. \"250ms\", \"30s\", \"5m\""
            ))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Resolved, as used.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileKind {
    ClientApp,
    AnonymousCustomer,
}

impl ProfileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileKind::ClientApp => "client_app",
            ProfileKind::AnonymousCustomer => "anonymous_customer",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body (what eGain documents).
    Body,
    /// HTTP Basic, RFC 6749 §2.3.1.
    Basic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    pub log: LogConfig,
    pub profiles: BTreeMap<String, ProfileConfig>,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub shutdown_grace: Duration,
    pub open: bool,
    pub tls: Option<TlsFiles>,
    pub access: Option<AccessConfig>,
    /// Slowloris guard: the whole request head must arrive within this time.
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AccessConfig {
    pub api_keys: Vec<Secret>,
    pub api_key_header: HeaderName,
    pub allow: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// Everything needed to obtain a token. Two profiles whose settings are equal share one holder.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenSettings {
    pub kind: ProfileKind,
    /// Full token URL including the query (eGain's anonymous flow puts
    /// `user_type=customer&domain_hint=<tenant>` there).
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// Final scopes, already prefixed for the anonymous flow.
    pub scopes: Vec<String>,
    pub client_auth: ClientAuth,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub extra_params: Vec<(String, String)>,
    pub extra_headers: Vec<(String, String)>,
    pub default_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct ProfileConfig {
    pub name: String,
    pub token: TokenSettings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Without a trailing slash; empty for the root.
    pub base_path: String,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    pub host: Option<String>,
    pub methods: Option<Vec<Method>>,
    pub upstream: UpstreamTarget,
    /// `None` for `profile = "none"`: forwarded without a token.
    pub profile: Option<String>,
    pub strip_prefix: bool,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub remove_headers: Vec<HeaderName>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub retry_on_401: bool,
    pub ca_file: Option<PathBuf>,
}

impl Config {
    /// Where `run`, `check` and `token` look for the file: `--config`, then
    /// `$EGAIN_PROXY_CONFIG`, then `./proxy.toml`.
    pub fn default_path() -> PathBuf {
        std::env::var_os("EGAIN_PROXY_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("proxy.toml"))
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::at("", format!("cannot read config: {e}")).in_file(path))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base, &|name| std::env::var(name).ok()).map_err(|e| e.in_file(path))
    }

    /// Parses with the process environment; relative paths are taken from the working directory.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("."), &|name| std::env::var(name).ok())
    }

    /// Pure core: `env` answers `${VAR}` look-ups; relative file paths resolve against `base`.
    pub fn parse(
        text: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Value = text
            .parse::<toml::Table>()
            .map(toml::Value::Table)
            .map_err(|e| {
                let location = e
                    .span()
                    .map(|span| line_col(text, span.start))
                    .unwrap_or_default();
                ConfigError::at(
                    location,
                    format!("TOML syntax error: {}", e.message().trim()),
                )
            })?;
        interpolate_tree(&mut value, &mut String::new(), env)?;
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            // toml appends "in `<table>`" on a second line; the key path already says where.
            let message = e.into_inner().to_string();
            ConfigError::at(path, message.lines().next().unwrap_or_default().to_owned())
        })?;
        resolve(raw, base)
    }

    pub fn uses_profile(&self, name: &str) -> bool {
        self.routes
            .iter()
            .any(|r| r.profile.as_deref() == Some(name))
    }
}

fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("{line}:{column}")
}

fn interpolate_tree(
    value: &mut toml::Value,
    path: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) => {
            *s = secrets::interpolate(s, env).map_err(|m| ConfigError::at(path.clone(), m))?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                interpolate_tree(item, path, env)?;
                path.truncate(len);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                interpolate_tree(item, path, env)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn resolve(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
    let file = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };

    // [server]
    let listen_strings = match raw.server.listen {
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
    let mut listen = Vec::new();
    for s in &listen_strings {
        listen.push(parse_socket_addr(s).map_err(|m| ConfigError::at("server.listen", m))?);
    }
    let access = match raw.server.access {
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
    if access.is_none() && !raw.server.open {
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
    let tls = match raw.server.tls {
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
    let server = ServerConfig {
        listen,
        shutdown_grace: raw
            .server
            .shutdown_grace
            .map_or(Duration::from_secs(30), |d| d.0),
        open: raw.server.open,
        tls,
        access,
        header_read_timeout: raw
            .server
            .header_read_timeout
            .map_or(Duration::from_secs(10), |d| d.0),
        max_header_bytes: raw.server.max_header_bytes.unwrap_or(64 * 1024).max(8192),
        max_connections: raw.server.max_connections.unwrap_or(10_000).max(1),
    };

    let admin = match raw.admin {
        None => None,
        Some(a) => {
            let s = a.listen.as_deref().unwrap_or("127.0.0.1:9901");
            Some(AdminConfig {
                listen: parse_socket_addr(s).map_err(|m| ConfigError::at("admin.listen", m))?,
            })
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

    // [profiles.*]
    let mut profiles = BTreeMap::new();
    for (name, p) in raw.profiles {
        let at = |key: &str| format!("profiles.{name}.{key}");
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
            (Some(s), None) => Secret::new(s),
            (None, Some(path)) => secrets::read_secret_file(&file(&path))
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
            if HeaderName::from_bytes(k.as_bytes()).is_err() || HeaderValue::from_str(v).is_err() {
                return Err(ConfigError::at(
                    format!("profiles.{name}.extra_headers.{k}"),
                    "is not a valid header",
                ));
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
        };
        profiles.insert(name.clone(), ProfileConfig { name, token });
    }

    // [[routes]]
    let mut routes = Vec::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        let at = |key: &str| format!("routes[{i}].{key}");
        let name = r.name.unwrap_or_else(|| format!("route{i}"));
        if name.is_empty() || routes.iter().any(|x: &RouteConfig| x.name == name) {
            return Err(ConfigError::at(
                at("name"),
                format!("{name:?} is empty or used by another route"),
            ));
        }
        if !r.path_prefix.starts_with('/') {
            return Err(ConfigError::at(
                at("path_prefix"),
                format!("{:?} must start with /", r.path_prefix),
            ));
        }
        if r.path_prefix.contains(['?', '#']) || crate::proxy::path::has_dot_segment(&r.path_prefix)
        {
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
        let upstream =
            parse_upstream(&r.upstream).map_err(|m| ConfigError::at(at("upstream"), m))?;
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
            if name == http::header::AUTHORIZATION
                || name == http::header::HOST
                || crate::proxy::headers::is_hop_by_hop(&name)
            {
                return Err(ConfigError::at(
                    format!("routes[{i}].set_headers.{k}"),
                    "is managed by the proxy and cannot be set",
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
            remove_headers.push(HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                ConfigError::at(
                    format!("routes[{i}].remove_headers[{j}]"),
                    format!("{k:?} is not a valid header name"),
                )
            })?);
        }
        if let Some(ca) = &r.ca_file {
            crate::tls::read_pem_certs(&file(ca)).map_err(|m| ConfigError::at(at("ca_file"), m))?;
        }
        let host = r.host.map(|h| h.to_ascii_lowercase());
        routes.push(RouteConfig {
            name,
            path_prefix: r.path_prefix,
            host,
            methods,
            upstream,
            profile,
            strip_prefix: r.strip_prefix,
            set_headers,
            remove_headers,
            timeout: r.timeout.map_or(Duration::from_secs(60), |d| d.0),
            connect_timeout: r.connect_timeout.map_or(Duration::from_secs(5), |d| d.0),
            retry_on_401: r.retry_on_401.unwrap_or(true),
            ca_file: r.ca_file.map(|c| file(&c)),
        });
    }

    Ok(Config {
        server,
        admin,
        log,
        profiles,
        routes,
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
fn add_anonymous_query(base: &str, tenant: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "ID" => Some("client-id".into()),
            "SECRET" => Some("s3cret".into()),
            _ => None,
        }
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"

[profiles.portal]
kind = "client_app"
token_url = "https://ai.egain.cloud/system/auth/T1-U/oauth2/token"
client_id = "${ID}"
client_secret = "${SECRET}"
scopes = ["knowledge.portalmgr.manage"]

[profiles.customer]
kind = "anonymous_customer"
tenant = "T1"
client_id = "${ID}"
client_secret = "${SECRET}"
scopes = ["knowledge.portalmgr.read", "https://api.ai.egain.cloud/auth/core.aiservices.read"]

[[routes]]
path_prefix = "/knowledge/"
upstream = "https://api.ai.egain.cloud/base/"
profile = "portal"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("."), &env)
    }

    #[test]
    fn resolves_defaults_and_egain_specifics() {
        let c = parse(GOOD).unwrap();
        let anon = &c.profiles["customer"].token;
        assert_eq!(
            anon.token_url,
            "https://api.ai.egain.cloud/core/authmgr/v3/oauth2/v2.0/anonymous/token?user_type=customer&domain_hint=T1"
        );
        assert_eq!(
            anon.scopes,
            [
                "https://api.ai.egain.cloud/auth/knowledge.portalmgr.read",
                "https://api.ai.egain.cloud/auth/core.aiservices.read"
            ]
        );
        assert_eq!(anon.client_secret.expose(), "s3cret");
        let route = &c.routes[0];
        assert_eq!(route.name, "route0");
        assert_eq!(route.upstream.base_path, "/base");
        assert!(route.retry_on_401);
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
        assert!(c.admin.is_none());
    }

    #[test]
    fn errors_name_the_culprit() {
        let e = parse(&GOOD.replace(
            "scopes = [\"knowledge.portalmgr.manage\"]",
            "scopes = [\"a\"]\nscopez = 1",
        ))
        .unwrap_err();
        assert_eq!(e.location, "profiles.portal.scopez");
        assert!(e.message.contains("unknown field `scopez`"), "{e}");

        let e = parse(&GOOD.replace("${SECRET}", "${NOPE}")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "profiles.customer.client_secret: environment variable NOPE is not set"
        );

        let e = parse(&GOOD.replace("profile = \"portal\"", "profile = \"ghost\"")).unwrap_err();
        assert_eq!(e.location, "routes[0].profile");
        assert!(e.message.contains("ghost"));

        let e = parse("[server]\nlisten = \n").unwrap_err();
        assert_eq!(e.location, "2:10");

        let e = parse(
            &GOOD
                .replace("shutdown_grace", "x")
                .replace("listen = \"127.0.0.1:8080\"", "shutdown_grace = \"soon\""),
        )
        .unwrap_err();
        assert_eq!(e.location, "server.shutdown_grace");
    }

    #[test]
    fn refuses_insecure_defaults() {
        let e = parse(&GOOD.replace("127.0.0.1:8080", "0.0.0.0:8080")).unwrap_err();
        assert_eq!(e.location, "server.listen");
        assert!(parse(&GOOD.replace("127.0.0.1:8080\"", "0.0.0.0:8080\"\nopen = true")).is_ok());

        let e = parse(&GOOD.replace("https://ai.egain", "http://ai.egain")).unwrap_err();
        assert_eq!(e.location, "profiles.portal.token_url");
        let e = parse(&GOOD.replace("https://api.ai.egain.cloud/base/", "http://10.1.2.3/"))
            .unwrap_err();
        assert_eq!(e.location, "routes[0].upstream");
        assert!(
            parse(&GOOD.replace("https://api.ai.egain.cloud/base/", "http://127.0.0.1:9/")).is_ok()
        );
    }

    #[test]
    fn scope_prefixing() {
        assert_eq!(
            prefix_scope(DEFAULT_SCOPE_PREFIX, "a.b"),
            "https://api.ai.egain.cloud/auth/a.b"
        );
        assert_eq!(prefix_scope("https://x/auth", "a"), "https://x/auth/a");
        assert_eq!(
            prefix_scope(DEFAULT_SCOPE_PREFIX, "https://y/a"),
            "https://y/a"
        );
        assert_eq!(
            add_anonymous_query("https://x/t?a=1", "T"),
            "https://x/t?a=1&user_type=customer&domain_hint=T"
        );
    }
}
