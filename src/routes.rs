//! The route table: (method, host, path) -> the first matching route. Pure and unit-tested.

use http::Method;

use crate::config::RouteConfig;

/// One route, prepared for matching.
#[derive(Debug)]
pub struct Route {
    pub config: RouteConfig,
    /// `path_prefix` without trailing slashes (`"/a/"` and `"/a"` are the same segment
    /// prefix); empty for `"/"`, which matches every path.
    prefix: String,
    /// The fast path's pool key (`crate::upstream::Pool`): the upstream authority, and the
    /// egress proxy with its credentials when connections are tunnels through one, so
    /// connections made through different proxies, or none, are never shared.
    pub pool_key: Box<str>,
}

impl Route {
    pub fn new(config: RouteConfig) -> Self {
        let prefix = config.path_prefix.trim_end_matches('/').to_owned();
        let target = &config.upstream;
        // Plain connections by authority alone; TLS ones by scheme and the roots that
        // verified them too (a connection checked against one route's `ca_file` never serves
        // a route that trusts other roots).
        let authority = match (target.scheme == http::uri::Scheme::HTTPS, &config.ca_file) {
            (true, None) => format!("https://{}", target.authority),
            (true, Some(ca)) => format!("https://{} ca {}", target.authority, ca.display()),
            (false, _) => target.authority.to_string(),
        };
        let pool_key = match &config.egress.proxy {
            None => authority.into(),
            Some(proxy) => format!("{authority} via {}", proxy.connection_key()).into(),
        };
        Route {
            config,
            prefix,
            pool_key,
        }
    }

    /// Segment-aware: prefix `/a` matches `/a` and `/a/x`, never `/ab`.
    pub fn matches_path(&self, path: &str) -> bool {
        match path.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    fn matches(&self, method: &Method, host: Option<&str>, path: &str) -> bool {
        if let Some(methods) = &self.config.methods {
            if !methods.contains(method) {
                return false;
            }
        }
        if self.config.host.is_some() && !host.is_some_and(|h| self.is_for_host(h)) {
            return false;
        }
        self.matches_path(path)
    }

    /// The route names a `host` and this `Host` is it (port aside).
    fn is_for_host(&self, host: &str) -> bool {
        self.config
            .host
            .as_ref()
            .is_some_and(|want| strip_port(host).eq_ignore_ascii_case(want))
    }

    /// The upstream path and query for `path` (already validated) and the raw `query`,
    /// byte for byte: base path + (path minus prefix if `strip_prefix`) + `?query`.
    pub fn upstream_path_and_query(&self, path: &str, query: Option<&str>) -> String {
        let tail = self.upstream_tail(path);
        let base = &self.config.upstream.base_path;
        let mut out =
            String::with_capacity(base.len() + tail.len() + query.map_or(0, |q| q.len() + 1) + 1);
        out.push_str(base);
        out.push_str(tail);
        if out.is_empty() {
            out.push('/');
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

impl Route {
    /// The part of `path` that follows the upstream base path: all of it, or what is left
    /// after the prefix with `strip_prefix`. Upstream path = base path + tail, or `/` when
    /// both are empty.
    pub fn upstream_tail<'a>(&self, path: &'a str) -> &'a str {
        if self.config.strip_prefix {
            // `matches_path` guarantees the prefix is there and ends at a segment boundary.
            path.get(self.prefix.len()..).unwrap_or("")
        } else {
            path
        }
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: "[::1]:8080" -> "[::1]"
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(configs: &[RouteConfig]) -> Self {
        RouteTable {
            routes: configs.iter().cloned().map(Route::new).collect(),
        }
    }

    /// Routes are tried in file order; the first match wins.
    /// Returns the route and its index in file order.
    pub fn find(&self, method: &Method, host: Option<&str>, path: &str) -> Option<(usize, &Route)> {
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(method, host, path))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// Some route is for this `Host` (its `host`, port aside).
    pub fn names_host(&self, host: &str) -> bool {
        self.routes.iter().any(|r| r.is_for_host(host))
    }
}

/// A one-route table for unit tests: profile `p`, every path to `upstream`, and `extra`
/// route lines.
#[cfg(test)]
pub(crate) fn test_table(upstream: &str, extra: &str) -> RouteTable {
    let text = format!(
        "[profiles.p]\nkind = \"client_app\"\ntoken_url = \"http://127.0.0.1:1/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n[[routes]]\npath_prefix = \"/\"\nupstream = \"{upstream}\"\nprofile = \"p\"\n{extra}\n"
    );
    let config = crate::config::Config::parse(&text, std::path::Path::new("."), &|_| None)
        .unwrap_or_else(|e| panic!("test config: {e}"));
    RouteTable::new(&config.routes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(routes: &str) -> RouteTable {
        let text = format!(
            "[profiles.p]\nkind = \"client_app\"\ntoken_url = \"http://127.0.0.1:1/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n{routes}"
        );
        let config = Config::parse(&text, std::path::Path::new("."), &|_| None).unwrap();
        RouteTable::new(&config.routes)
    }

    fn name<'a>(
        t: &'a RouteTable,
        method: &str,
        host: Option<&str>,
        path: &str,
    ) -> Option<&'a str> {
        t.find(&method.parse().unwrap(), host, path)
            .map(|(_, r)| r.config.name.as_str())
    }

    #[test]
    fn prefix_is_segment_aware_and_first_match_wins() {
        let t = table(
            r#"
[[routes]]
name = "a"
path_prefix = "/a"
upstream = "http://127.0.0.1:1"
profile = "p"
[[routes]]
name = "slash"
path_prefix = "/b/"
upstream = "http://127.0.0.1:1"
profile = "p"
[[routes]]
name = "all"
path_prefix = "/"
upstream = "http://127.0.0.1:1"
profile = "none"
"#,
        );
        assert_eq!(name(&t, "GET", None, "/a"), Some("a"));
        assert_eq!(name(&t, "GET", None, "/a/x"), Some("a"));
        assert_eq!(name(&t, "GET", None, "/ab"), Some("all"));
        assert_eq!(name(&t, "GET", None, "/b"), Some("slash"));
        assert_eq!(name(&t, "GET", None, "/b/c"), Some("slash"));
        assert_eq!(name(&t, "GET", None, "/bc"), Some("all"));
    }

    #[test]
    fn host_and_methods() {
        let t = table(
            r#"
[[routes]]
name = "h"
path_prefix = "/x"
host = "Portal.Internal"
methods = ["get", "POST"]
upstream = "http://127.0.0.1:1"
profile = "p"
"#,
        );
        assert_eq!(
            name(&t, "GET", Some("portal.internal:8080"), "/x"),
            Some("h")
        );
        assert_eq!(name(&t, "POST", Some("PORTAL.internal"), "/x/1"), Some("h"));
        assert_eq!(name(&t, "DELETE", Some("portal.internal"), "/x"), None);
        assert_eq!(name(&t, "GET", Some("other"), "/x"), None);
        assert_eq!(name(&t, "GET", None, "/x"), None);
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }

    #[test]
    fn upstream_path_joins() {
        let t = table(
            r#"
[[routes]]
name = "strip"
path_prefix = "/api/"
strip_prefix = true
upstream = "http://127.0.0.1:1/base/"
profile = "p"
[[routes]]
name = "keep"
path_prefix = "/keep"
upstream = "http://127.0.0.1:1/v1"
profile = "p"
[[routes]]
name = "root"
path_prefix = "/r"
strip_prefix = true
upstream = "http://127.0.0.1:1"
profile = "p"
"#,
        );
        let get = |p: &str| t.find(&Method::GET, None, p).unwrap().1;
        assert_eq!(
            get("/api/x/y").upstream_path_and_query("/api/x/y", Some("a=1&b=%20")),
            "/base/x/y?a=1&b=%20"
        );
        assert_eq!(get("/api").upstream_path_and_query("/api", None), "/base");
        assert_eq!(
            get("/keep/z").upstream_path_and_query("/keep/z", Some("")),
            "/v1/keep/z?"
        );
        assert_eq!(get("/r").upstream_path_and_query("/r", None), "/");
        assert_eq!(get("/r/").upstream_path_and_query("/r/", None), "/");
    }
}
