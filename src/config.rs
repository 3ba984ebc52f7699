//! `proxy.toml`: serde types (raw), then validation into one typed, resolved `Config`.
//!
//! Loading is three steps, each with errors that name where the problem is:
//! 1. TOML syntax (`line:column`),
//! 2. `${VAR}` interpolation of every string value (key path),
//! 3. shape and validation (`deny_unknown_fields`, key path via `serde_path_to_error`).

pub mod egress;
mod resolve;
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

pub use egress::{Egress, EgressEnv, EgressProxy};
pub use resolve::{is_loopback_host, prefix_scope};
pub use secrets::{ClientSecret, Secret};

use resolve::{resolve, RawConfig};

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
    /// `[token_cache]`: tokens shared with other replicas through Redis.
    pub token_cache: Option<TokenCacheConfig>,
    /// The proxy variables of the environment the config was read with (contract §12).
    pub egress_env: EgressEnv,
}

/// `[token_cache]` (contract §10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenCacheConfig {
    /// `redis://` or `rediss://`; may carry a password, hence a `Secret`.
    pub redis: Secret,
    pub key_prefix: String,
    pub encryption_key_file: PathBuf,
    /// The 32-byte AEAD key read from `encryption_key_file`.
    pub key: Secret32,
    /// The longest wait for one Redis operation.
    pub timeout: Duration,
    /// PEM roots that a `rediss://` server's certificate must chain to, instead of the
    /// system's (a private CA).
    pub ca_file: Option<PathBuf>,
}

/// The URL with the characters of its credentials (before the last `@`) that would end them
/// early — `/`, `?`, `#`, `@`, brackets, spaces, controls, non-ASCII — percent-encoded, so
/// a password from `${VAR}` can be written as it is (as egress proxy URLs take it). A `%`
/// is left alone: credentials already percent-encoded stay as they were.
pub fn encode_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host_and_tail)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    let userinfo = percent_encoding::utf8_percent_encode(userinfo, USERINFO_ENDS);
    format!("{scheme}://{userinfo}@{host_and_tail}")
}

/// What `encode_userinfo` encodes: all but RFC 3986's unreserved and sub-delims characters,
/// `:` and `%`.
const USERINFO_ENDS: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'%');

/// A 32-byte key that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret32(pub [u8; 32]);

impl std::fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret32([redacted])")
    }
}

impl TokenCacheConfig {
    /// The Redis URL with any password replaced by `***`, for `/status`, logs and `check`.
    pub fn redacted_url(&self) -> String {
        redact_url_password(self.redis.expose())
    }
}

/// `scheme://user:pass@host` -> `scheme://user:***@host`; other text unchanged.
///
/// The credentials end at the last `@`, wherever it is: a password from `${VAR}` may hold
/// `/`, `?`, `#` or `@` as they are (which `encode_userinfo` makes a URL of). A URL with an
/// `@` after its host loses more than its password here, never less.
pub fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host_and_tail)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                // `redis://password@host` is a password alone.
                "***".to_owned()
            };
            format!("{scheme}://{masked}@{host_and_tail}")
        }
        None => url.to_owned(),
    }
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
    /// The longest wait for the next bytes of a request body (a stalled upload gets 408 and
    /// its connection closes instead of holding a connection slot for ever).
    pub body_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// Origins (`scheme://host[:port]`, lower case) whose pages a browser may use the proxy
    /// from (`crate::pipeline::browser`).
    pub allowed_origins: Vec<String>,
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
    pub client_secret: ClientSecret,
    /// Final scopes, already prefixed for the anonymous flow.
    pub scopes: Vec<String>,
    pub client_auth: ClientAuth,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub extra_params: Vec<(String, String)>,
    pub extra_headers: Vec<(String, String)>,
    pub default_ttl: Duration,
    /// The forward proxy token requests go through; `None`: direct (`config::egress`).
    pub egress: Option<std::sync::Arc<EgressProxy>>,
}

impl TokenSettings {
    /// The same client at the same endpoint (a token of one stands for the other), whatever
    /// else differs: scopes, secret, timeouts, egress.
    pub fn same_client(&self, other: &TokenSettings) -> bool {
        self.kind == other.kind
            && self.token_url == other.token_url
            && self.client_id == other.client_id
    }
}

#[derive(Debug, Clone)]
pub struct ProfileConfig {
    pub name: String,
    pub token: TokenSettings,
    /// Why token requests go the way `token.egress` says (for `/status` and `check`).
    pub egress_from: String,
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
    /// Where upstream connections go: through a forward proxy or direct, and why.
    pub egress: Egress,
}

impl Config {
    /// Where `run`, `check` and `token` look for the file: `--config`, then
    /// `$EGAIN_PROXY_CONFIG`, then `./proxy.toml`.
    pub fn default_path() -> PathBuf {
        std::env::var_os("EGAIN_PROXY_CONFIG")
            .filter(|v| !v.is_empty())
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
                // One line, as every error is: toml puts what it expected on a second one.
                let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
                ConfigError::at(location, format!("TOML syntax error: {message}"))
            })?;
        interpolate_tree(&mut value, &mut String::new(), env)?;
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            // toml appends "in `<table>`" on a second line; the key path already says where.
            let message = e.into_inner().to_string();
            ConfigError::at(path, message.lines().next().unwrap_or_default().to_owned())
        })?;
        resolve(raw, base, env)
    }

    pub fn uses_profile(&self, name: &str) -> bool {
        self.routes
            .iter()
            .any(|r| r.profile.as_deref() == Some(name))
    }
}

fn line_col(text: &str, offset: usize) -> String {
    // Never slice inside a UTF-8 character, whatever offset the parser reports.
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
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
        assert_eq!(anon.client_secret.current().expose(), "s3cret");
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
        let e = parse("[server]\nlisten = [\"a\"\n").unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
        let e = parse("[server]\nshutdown_grace = \"900000000y\"\n").unwrap_err();
        assert_eq!(e.location, "server.shutdown_grace");
        assert!(e.message.contains("longer than a year"), "{e}");
        let e = parse("# é\n[server]\nlisten = \"é\nx").unwrap_err();
        assert!(e.location.starts_with("3:"), "{e}");

        let e = parse(
            &GOOD
                .replace("shutdown_grace", "x")
                .replace("listen = \"127.0.0.1:8080\"", "shutdown_grace = \"soon\""),
        )
        .unwrap_err();
        assert_eq!(e.location, "server.shutdown_grace");

        // What the proxy writes into a token request is not the config's to add twice.
        let scopes = "scopes = [\"knowledge.portalmgr.manage\"]";
        for (extra, key) in [
            (
                "extra_headers = { Host = \"evil.example\" }",
                "extra_headers.Host",
            ),
            (
                "extra_headers = { \"Content-Type\" = \"text/plain\" }",
                "extra_headers.Content-Type",
            ),
            (
                "client_auth = \"basic\"\nextra_headers = { Authorization = \"Bearer x\" }",
                "extra_headers.Authorization",
            ),
            (
                "extra_params = { client_secret = \"x\" }",
                "extra_params.client_secret",
            ),
        ] {
            let e = parse(&GOOD.replace(scopes, &format!("{scopes}\n{extra}"))).unwrap_err();
            assert_eq!(e.location, format!("profiles.portal.{key}"), "{e}");
            assert!(e.message.contains("set by the proxy itself"), "{e}");
        }
        // An API gateway's own credential beside a secret sent in the body is the operator's.
        assert!(parse(&GOOD.replace(
            scopes,
            &format!("{scopes}\nextra_headers = {{ Authorization = \"Bearer gw\" }}")
        ))
        .is_ok());
        // Origins as browsers send them.
        let origins = |list: &str| {
            parse(&GOOD.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\nallowed_origins = {list}"),
            ))
        };
        let c = origins("[\"https://Tool.Corp\", \"http://127.0.0.1:3000\"]").unwrap();
        assert_eq!(
            c.server.allowed_origins,
            ["https://tool.corp", "http://127.0.0.1:3000"]
        );
        assert!(origins("[\"null\", \"app://desk-tool\"]").is_ok());
        for bad in [
            "tool.corp",
            "https://tool.corp/",
            "https://tool.corp/app",
            "Null",
        ] {
            let e = origins(&format!("[\"{bad}\"]")).unwrap_err();
            assert_eq!(e.location, "server.allowed_origins[0]", "{bad}: {e}");
        }
    }

    /// Settings `check` must refuse because the proxy could never work with them.
    #[test]
    fn refuses_settings_that_cannot_work() {
        let listen = "listen = \"127.0.0.1:8080\"";
        let route = "profile = \"portal\"";
        for (from, to, location) in [
            (
                listen,
                "listen = [\"127.0.0.1:8080\", \"127.0.0.1:8080\"]",
                "server.listen",
            ),
            (
                listen,
                "listen = \"127.0.0.1:8080\"\n[admin]\nlisten = \"127.0.0.1:8080\"",
                "admin.listen",
            ),
            (
                listen,
                "listen = \"127.0.0.1:8080\"\n[admin]\nlisten = \"0.0.0.0:8080\"",
                "admin.listen",
            ),
            (
                listen,
                "listen = [\"0.0.0.0:8080\", \"[::]:8080\"]\nopen = true",
                "server.listen",
            ),
            (
                route,
                "profile = \"portal\"\nname = \"none\"",
                "routes[0].name",
            ),
            (route, "profile = \"portal\"\nname = \"\"", "routes[0].name"),
            (
                route,
                "profile = \"portal\"\nhost = \"*.example.com\"",
                "routes[0].host",
            ),
            (
                listen,
                "listen = \"127.0.0.1:8080\"\nheader_read_timeout = \"0s\"",
                "server.header_read_timeout",
            ),
            (
                listen,
                "listen = \"127.0.0.1:8080\"\nbody_read_timeout = \"0s\"",
                "server.body_read_timeout",
            ),
            (
                listen,
                "listen = \"127.0.0.1:8080\"\nmax_header_bytes = 100",
                "server.max_header_bytes",
            ),
            (
                listen,
                "listen = \"127.0.0.1:8080\"\nmax_connections = 0",
                "server.max_connections",
            ),
            (
                route,
                "profile = \"portal\"\ntimeout = \"0s\"",
                "routes[0].timeout",
            ),
            (
                route,
                "profile = \"portal\"\nconnect_timeout = \"0ms\"",
                "routes[0].connect_timeout",
            ),
            (
                route,
                "profile = \"portal\"\nhost = \"api.example:443\"",
                "routes[0].host",
            ),
            (
                route,
                "profile = \"portal\"\nhost = \"[::1]:443\"",
                "routes[0].host",
            ),
            (
                route,
                "profile = \"portal\"\nhost = \"a b/c\"",
                "routes[0].host",
            ),
            (
                route,
                "profile = \"portal\"\nname = \"cu\\\"st\"",
                "routes[0].name",
            ),
            (
                route,
                "profile = \"portal\"\nname = \"a\\nb\"",
                "routes[0].name",
            ),
            (
                "[profiles.portal]",
                "[profiles.\"po\\\\rtal\"]",
                "profiles.\"po\\\\rtal\"",
            ),
        ] {
            let e = parse(&GOOD.replace(from, to)).unwrap_err();
            assert_eq!(e.location, location, "{to}: {e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        // Port 0 (any free port) may be given twice, and IP hosts in brackets are hosts.
        let ok = GOOD.replace(
            listen,
            "listen = [\"127.0.0.1:0\", \"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"",
        );
        assert!(parse(&ok).is_ok());
        for host in [
            "api.example",
            "API.example",
            "[::1]",
            "::1",
            "10.0.0.1",
            "my-host.local",
        ] {
            let c = parse(&GOOD.replace(route, &format!("{route}\nhost = \"{host}\"")));
            assert!(c.is_ok(), "{host}: {:?}", c.err());
        }
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
    fn egress_proxy_settings_are_checked_with_key_paths() {
        let profile_line = "scopes = [\"knowledge.portalmgr.manage\"]";
        let e = parse(&GOOD.replace(
            profile_line,
            "scopes = []\negress_proxy = \"https://u:${SECRET}@p:443\"",
        ))
        .unwrap_err();
        assert_eq!(e.location, "profiles.portal.egress_proxy");
        assert!(e.message.contains("https:// egress proxies"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let route_line = "profile = \"portal\"";
        let e = parse(&GOOD.replace(
            route_line,
            "profile = \"portal\"\negress_proxy = \"p.corp:3128\"",
        ))
        .unwrap_err();
        assert_eq!(e.location, "routes[0].egress_proxy");
        assert!(e.message.contains("http:// URL"), "{e}");

        let c = parse(&GOOD.replace(
            route_line,
            "profile = \"portal\"\negress_proxy = \"http://u:${SECRET}@P.corp:3128\"",
        ))
        .unwrap();
        let egress = &c.routes[0].egress;
        assert_eq!(egress.describe(), "http://u:***@p.corp:3128");
        assert_eq!(egress.from, "routes[0].egress_proxy");
        assert!(!format!("{c:?}").contains("s3cret"));
        // The route's setting is the route's: profiles follow the (empty) environment.
        assert!(c.profiles["portal"].token.egress.is_none());

        // The environment, through the same look-up as `${VAR}`.
        let with = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
                    .or_else(|| env(name))
            }
        };
        let vars = with(&[
            ("HTTPS_PROXY", "http://corp-proxy:3128"),
            ("NO_PROXY", "api.ai.egain.cloud"),
        ]);
        let c = Config::parse(GOOD, Path::new("."), &vars).unwrap();
        assert_eq!(
            c.profiles["portal"].token.egress.as_ref().map(|p| p.url()),
            Some("http://corp-proxy:3128".into())
        );
        assert_eq!(c.profiles["portal"].egress_from, "HTTPS_PROXY");
        assert!(c.profiles["customer"].token.egress.is_none());
        assert_eq!(
            c.profiles["customer"].egress_from,
            "NO_PROXY (\"api.ai.egain.cloud\")"
        );
        assert!(c.routes[0].egress.proxy.is_none());

        let vars = with(&[("https_proxy", "socks5://u:pw@s:1080")]);
        let e = Config::parse(GOOD, Path::new("."), &vars).unwrap_err();
        assert_eq!(e.location, "profiles.customer.token_url");
        assert!(
            e.message.contains("https_proxy") && !e.message.contains("pw"),
            "{e}"
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
            resolve::add_anonymous_query("https://x/t?a=1", "T"),
            "https://x/t?a=1&user_type=customer&domain_hint=T"
        );
    }
}
