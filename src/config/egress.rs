//! Egress proxies (contract §12): the `egress_proxy` setting of profiles and routes, the
//! `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` environment, and the one rule (`decide`) that
//! says, for each token endpoint and each upstream, whether its traffic leaves through a
//! forward proxy, and which. Token requests and upstream calls both take their answer from
//! here, at config time; the environment arrives as a look-up function, so tests never touch
//! the process's own.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use http::HeaderValue;
use percent_encoding::percent_decode_str;
use sha2::{Digest, Sha256};

use super::Secret;

mod no_proxy;
pub use no_proxy::NoProxy;

/// An HTTP forward proxy reached by `CONNECT` tunnels. `Debug` and `Display` show it with the
/// password as `***`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EgressProxy {
    /// Lower-case; an IPv6 literal keeps its brackets.
    host: String,
    port: u16,
    credentials: Option<ProxyCredentials>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct ProxyCredentials {
    /// Percent-decoded.
    user: String,
    /// Percent-decoded.
    password: Secret,
}

/// Without a port in the URL: 80, the http:// port, as Go, Python's requests and reqwest
/// assume (curl assumes 1080; write the port to be unambiguous).
pub const DEFAULT_PROXY_PORT: u16 = 80;

impl EgressProxy {
    /// Parses `http://[user[:password]@]host[:port][/]`. With `schemeless`, `host:port` alone
    /// is taken as http:// (as curl and Go read proxy environment variables). Errors never
    /// quote the credentials.
    pub fn parse(text: &str, schemeless: bool) -> Result<EgressProxy, String> {
        let text = text.trim();
        let rest = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(
                    "https:// egress proxies (TLS to the proxy itself) are not supported; use \
                     http://host:port: traffic to https:// upstreams and token endpoints stays \
                     end-to-end TLS inside the CONNECT tunnel"
                        .into(),
                )
            }
            Some((scheme, _)) => {
                return Err(format!(
                    "{:?} proxies are not supported: only http:// egress proxies (HTTP CONNECT)",
                    printable(scheme)
                ))
            }
            None if schemeless => text,
            None => {
                return Err(
                    "must be an http:// URL like \"http://proxy.corp:3128\" (or \"none\")".into(),
                )
            }
        };
        // The last `@` ends the credentials, so a password may hold `@`, `/` or `:` as they
        // come from `${VAR}`; percent-encoding them works too.
        let (userinfo, hostport) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let hostport = hostport.strip_suffix('/').unwrap_or(hostport);
        if hostport.contains(['/', '?', '#']) {
            return Err(format!(
                "{:?}: an egress proxy is http://[user:password@]host[:port], without a path",
                printable(hostport)
            ));
        }
        let authority: http::uri::Authority = hostport
            .parse()
            .map_err(|_| format!("{:?} is not a host[:port]", printable(hostport)))?;
        let host = authority.host().to_ascii_lowercase();
        if host.is_empty() {
            return Err("the egress proxy URL has no host".into());
        }
        // `Authority` checks the port's syntax, not its range: read it here.
        let port_text = match hostport.rsplit_once(':') {
            Some((before, p))
                if !before.ends_with(':')
                    && (!before.starts_with('[') || before.ends_with(']')) =>
            {
                Some(p)
            }
            _ => None,
        };
        let port = match port_text {
            None | Some("") => DEFAULT_PROXY_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => {
                    return Err(format!(
                        "{host}: {:?} is not a port (1-65535)",
                        printable(p)
                    ))
                }
                Ok(n) => n,
            },
        };
        let credentials = match userinfo {
            None => None,
            Some(userinfo) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let decode = |s: &str, what: &str| {
                    percent_decode_str(s)
                        .decode_utf8()
                        .map(|s| s.into_owned())
                        .map_err(|_| format!("the proxy {what} is not UTF-8 once percent-decoded"))
                };
                let user = decode(user, "user name")?;
                let password = decode(password, "password")?;
                // RFC 7617 §2: the user-id cannot hold a colon; control bytes cannot be sent.
                if user.contains(':') || user.chars().any(char::is_control) {
                    return Err(
                        "the proxy user name may not contain ':' or control characters".into(),
                    );
                }
                if password.chars().any(char::is_control) {
                    return Err("the proxy password may not contain control characters".into());
                }
                Some(ProxyCredentials {
                    user,
                    password: Secret::new(password),
                })
            }
        };
        Ok(EgressProxy {
            host,
            port,
            credentials,
        })
    }

    /// The host to dial; an IPv6 literal keeps its brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// `http://host:port`, without credentials (they go in `authorization`).
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// `Proxy-Authorization: Basic …` (RFC 7617), marked sensitive; `None` without credentials.
    pub fn authorization(&self) -> Option<HeaderValue> {
        let c = self.credentials.as_ref()?;
        let pair = format!("{}:{}", c.user, c.password.expose());
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
        let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// The URL with the password as `***`: what logs, errors, `check` and `/status` show.
    pub fn redacted(&self) -> String {
        match &self.credentials {
            Some(c) => format!(
                "http://{}:***@{}:{}",
                percent_encoding::utf8_percent_encode(&c.user, USERINFO),
                self.host,
                self.port
            ),
            None => self.url(),
        }
    }

    /// Tells connections through different proxies, or through one proxy with different
    /// credentials, apart (pool keys), without holding the password in clear.
    pub fn connection_key(&self) -> String {
        match &self.credentials {
            Some(c) => {
                let mut digest = Sha256::new();
                digest.update(c.user.as_bytes());
                digest.update([0]);
                digest.update(c.password.expose().as_bytes());
                let hex: String = digest
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!("{}:{} {hex}", self.host, self.port)
            }
            None => format!("{}:{}", self.host, self.port),
        }
    }
}

/// What may stay unencoded in a user name shown by `redacted`.
const USERINFO: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'%')
    .add(b'@')
    .add(b':')
    .add(b'/')
    .add(b'?')
    .add(b'#');

impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EgressProxy({})", self.redacted())
    }
}

impl fmt::Display for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A bounded, printable excerpt of configuration text for an error message.
fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(80).collect()
}

// ---------------------------------------------------------------------------------------------
// The setting, the environment, the rule.

/// A profile's or route's `egress_proxy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressSetting {
    /// `"none"`: straight to the target, whatever the environment says.
    Direct,
    Proxy(Arc<EgressProxy>),
}

impl EgressSetting {
    pub fn parse(text: &str) -> Result<EgressSetting, String> {
        if text.trim() == "none" {
            return Ok(EgressSetting::Direct);
        }
        EgressProxy::parse(text, false).map(|p| EgressSetting::Proxy(Arc::new(p)))
    }
}

/// One proxy variable as read from the environment.
#[derive(Debug, Clone)]
pub struct EnvProxy {
    /// Which variable it came from (`https_proxy`, `HTTPS_PROXY`, ...).
    pub name: &'static str,
    /// Parsed, or why it cannot be used (an error only if some target needs it).
    pub proxy: Result<Arc<EgressProxy>, String>,
}

/// `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY`, each in either case; the lower-case variable
/// wins when both are set (as in curl). A variable set to the empty string counts as unset.
#[derive(Debug, Clone, Default)]
pub struct EgressEnv {
    pub https: Option<EnvProxy>,
    pub http: Option<EnvProxy>,
    pub no_proxy: Option<(&'static str, NoProxy)>,
}

impl EgressEnv {
    pub fn read(env: &dyn Fn(&str) -> Option<String>) -> EgressEnv {
        let pick = |lower: &'static str, upper: &'static str| {
            [lower, upper].into_iter().find_map(|name| {
                env(name)
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| (name, v))
            })
        };
        let proxy = |lower, upper| {
            pick(lower, upper).map(|(name, value)| EnvProxy {
                name,
                proxy: EgressProxy::parse(&value, true).map(Arc::new),
            })
        };
        EgressEnv {
            https: proxy("https_proxy", "HTTPS_PROXY"),
            http: proxy("http_proxy", "HTTP_PROXY"),
            no_proxy: pick("no_proxy", "NO_PROXY").map(|(name, v)| (name, NoProxy::parse(&v))),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.https.is_none() && self.http.is_none() && self.no_proxy.is_none()
    }
}

/// Where the traffic to one token endpoint or upstream goes, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    /// `None`: straight to the target.
    pub proxy: Option<Arc<EgressProxy>>,
    /// Why: the setting's key path, the variable, or what exempted the target.
    pub from: String,
}

impl Egress {
    /// The proxy's redacted URL, or `direct`.
    pub fn describe(&self) -> String {
        match &self.proxy {
            Some(p) => p.redacted(),
            None => "direct".to_owned(),
        }
    }
}

/// The rule, for one target (`scheme`, `host`, effective `port`): the profile's or route's
/// own `egress_proxy` (at `key`) wins; without one, the environment's proxy for the scheme
/// (`HTTPS_PROXY` for https://, `HTTP_PROXY` for http://) unless `NO_PROXY` exempts the target.
/// Nothing else exempts a target: loopback hosts go through the proxy like any other.
pub fn decide(
    setting: Option<&EgressSetting>,
    key: &str,
    env: &EgressEnv,
    scheme: &str,
    host: &str,
    port: u16,
) -> Result<Egress, String> {
    match setting {
        Some(EgressSetting::Direct) => {
            return Ok(Egress {
                proxy: None,
                from: format!("{key} = \"none\""),
            })
        }
        Some(EgressSetting::Proxy(p)) => {
            return Ok(Egress {
                proxy: Some(Arc::clone(p)),
                from: key.to_owned(),
            })
        }
        None => {}
    }
    let (var, upper) = if scheme.eq_ignore_ascii_case("https") {
        (&env.https, "HTTPS_PROXY")
    } else {
        (&env.http, "HTTP_PROXY")
    };
    let Some(var) = var else {
        return Ok(Egress {
            proxy: None,
            from: format!("no {upper} set"),
        });
    };
    if let Some((name, no_proxy)) = &env.no_proxy {
        if let Some(entry) = no_proxy.matches(host, port) {
            return Ok(Egress {
                proxy: None,
                from: format!("{name} ({entry:?})"),
            });
        }
    }
    match &var.proxy {
        Ok(p) => Ok(Egress {
            proxy: Some(Arc::clone(p)),
            from: var.name.to_owned(),
        }),
        Err(e) => Err(format!(
            "this traffic would go through the egress proxy in the environment variable {}, \
             which cannot be used: {e} (fix it, exempt the host in NO_PROXY, or set \
             egress_proxy = \"none\")",
            var.name
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> EgressEnv {
        EgressEnv::read(&|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn proxy_urls_parse_with_decoded_credentials_and_default_port() {
        let p = EgressProxy::parse("http://us%40er:p%3Ass@word@Proxy.Corp:3128/", false).unwrap();
        assert_eq!((p.host(), p.port()), ("proxy.corp", 3128));
        let auth = p.authorization().unwrap();
        assert!(auth.is_sensitive());
        let b64 = auth.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(decoded, b"us@er:p:ss@word");
        assert_eq!(p.redacted(), "http://us%40er:***@proxy.corp:3128");
        assert_eq!(
            format!("{p:?}"),
            "EgressProxy(http://us%40er:***@proxy.corp:3128)"
        );
        assert!(!format!("{p:?} {p} {}", p.connection_key()).contains("word"));

        let p = EgressProxy::parse("http://10.0.0.1", false).unwrap();
        assert_eq!((p.port(), p.has_credentials()), (DEFAULT_PROXY_PORT, false));
        assert!(p.authorization().is_none());
        let p = EgressProxy::parse("http://[::1]:8080", false).unwrap();
        assert_eq!((p.host(), p.port()), ("[::1]", 8080));
        assert_eq!(p.url(), "http://[::1]:8080");

        // Environment values may leave out the scheme; config values may not.
        assert_eq!(
            EgressProxy::parse("proxy:3128", true).unwrap().url(),
            "http://proxy:3128"
        );
        let e = EgressProxy::parse("proxy:3128", false).unwrap_err();
        assert!(e.contains("http:// URL"), "{e}");
    }

    #[test]
    fn proxy_url_errors_are_clear_and_never_hold_the_password() {
        for (text, want) in [
            ("https://u:hunter2@proxy:443", "https:// egress proxies"),
            ("socks5://u:hunter2@proxy:1080", "only http://"),
            ("http://u:hunter2@proxy:3128/path", "without a path"),
            ("http://u:hunter2@proxy:99999", "not a port"),
            ("http://u:hunter2@proxy:0", "not a port"),
            ("http://u:hunter2@", "not a host[:port]"),
            ("http://a:b@u%FF:hunter2@proxy:1", "not UTF-8"),
            ("http://u%3Ax:hunter2@proxy:1", "may not contain ':'"),
        ] {
            let e = EgressProxy::parse(text, false).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains("hunter2"), "{text}: {e}");
        }
        assert_eq!(EgressSetting::parse("none").unwrap(), EgressSetting::Direct);
    }

    #[test]
    fn the_rule_setting_then_environment_then_no_proxy() {
        let e = env(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:2"),
            ("HTTP_PROXY", "plain:3"),
            ("NO_PROXY", ".corp"),
            ("no_proxy", ""),
        ]);
        let via = |setting: Option<&EgressSetting>, scheme: &str, host: &str| {
            decide(setting, "routes[0].egress_proxy", &e, scheme, host, 443).unwrap()
        };
        // Lower-case wins; an empty lower-case variable counts as unset.
        let d = via(None, "https", "api.example");
        assert_eq!(
            (d.describe(), d.from.as_str()),
            ("http://lower:2".into(), "https_proxy")
        );
        let d = via(None, "http", "127.0.0.1");
        assert_eq!(
            (d.describe(), d.from.as_str()),
            ("http://plain:3".into(), "HTTP_PROXY")
        );
        // NO_PROXY exempts; loopback does not.
        let d = via(None, "https", "x.corp");
        assert_eq!(
            (d.describe(), d.from.as_str()),
            ("direct".into(), "NO_PROXY (\".corp\")")
        );
        assert!(via(None, "https", "localhost").proxy.is_some());
        // The setting wins over the environment, NO_PROXY included.
        let d = via(Some(&EgressSetting::Direct), "https", "api.example");
        assert_eq!(d.describe(), "direct");
        assert_eq!(d.from, "routes[0].egress_proxy = \"none\"");
        let own = EgressSetting::parse("http://own:4").unwrap();
        assert_eq!(
            via(Some(&own), "https", "x.corp").describe(),
            "http://own:4"
        );
        // Nothing set: direct.
        let none = EgressEnv::default();
        let d = decide(None, "k", &none, "https", "h", 443).unwrap();
        assert_eq!(
            (d.describe(), d.from.as_str()),
            ("direct".into(), "no HTTPS_PROXY set")
        );
        // A broken variable is an error only for targets that would use it.
        let broken = env(&[("HTTPS_PROXY", "socks5://u:pw@s:1"), ("NO_PROXY", "ok")]);
        let err = decide(None, "k", &broken, "https", "h", 443).unwrap_err();
        assert!(err.contains("HTTPS_PROXY") && !err.contains("pw"), "{err}");
        assert!(decide(None, "k", &broken, "https", "ok", 443).is_ok());
        assert!(decide(None, "k", &broken, "http", "h", 80).is_ok());
    }
}
