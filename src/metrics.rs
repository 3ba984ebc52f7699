//! Prometheus metrics (prometheus-client). Label values are bounded: route and profile names
//! come from the config, methods are folded to the standard set, statuses are numbers; never
//! a path.

pub mod recent;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub route: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    pub profile: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProfileLabels {
    pub profile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteProfileLabels {
    pub route: String,
    pub profile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

/// The `op` label of `egain_proxy_token_cache_errors_total`.
pub const TOKEN_CACHE_OPS: [&str; 7] =
    ["get", "set", "lock", "unlock", "purge", "decode", "connect"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// The `kind` label of `egain_proxy_upstream_errors_total`.
pub const UPSTREAM_ERROR_KINDS: [&str; 3] = ["connect", "timeout", "protocol"];

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub token_fetches: Family<FetchLabels, Counter>,
    pub token_expiry: Family<ProfileLabels, Gauge<f64, AtomicU64>>,
    pub forced_refreshes: Family<ProfileLabels, Counter>,
    pub config_reloads: Family<OutcomeLabels, Counter>,
    pub inflight: Gauge,
    pub replays: Family<RouteLabels, Counter>,
    pub token_cache_errors: Family<OpLabels, Counter>,
    pub upstream_scope_errors: Family<RouteProfileLabels, Counter>,
    pub upgrades: Family<RouteLabels, Counter>,
    pub token_cache_hits: Family<ProfileLabels, Counter>,
    /// The last minutes per route, for the admin page.
    pub recent: recent::Recent,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "egain_proxy_requests",
            "Requests answered, by route, method and status",
            requests.clone(),
        );
        let request_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 18))
        });
        registry.register(
            "egain_proxy_request_duration_seconds",
            "Time from request head received to response head sent, by route",
            request_duration.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "egain_proxy_upstream_errors",
            "Upstream failures by route and kind (connect, timeout, protocol)",
            upstream_errors.clone(),
        );
        let token_fetches = Family::<FetchLabels, Counter>::default();
        registry.register(
            "egain_proxy_token_fetches",
            "Token requests by profile and outcome (success, oauth_error, http_error, timeout, connect, bad_response)",
            token_fetches.clone(),
        );
        let token_expiry = Family::<ProfileLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "egain_proxy_token_expiry_seconds",
            "Seconds until the current token of a profile expires (0 when there is none)",
            token_expiry.clone(),
        );
        let forced_refreshes = Family::<ProfileLabels, Counter>::default();
        registry.register(
            "egain_proxy_token_forced_refreshes",
            "Tokens invalidated after an upstream 401",
            forced_refreshes.clone(),
        );
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "egain_proxy_config_reloads",
            "Config reloads by outcome (success, error)",
            config_reloads.clone(),
        );
        let inflight = Gauge::default();
        registry.register(
            "egain_proxy_inflight_requests",
            "Requests being served now",
            inflight.clone(),
        );
        let replays = Family::<RouteLabels, Counter>::default();
        registry.register(
            "egain_proxy_replays",
            "Requests replayed with a fresh token after an upstream 401",
            replays.clone(),
        );
        let token_cache_errors = Family::<OpLabels, Counter>::default();
        registry.register(
            "egain_proxy_token_cache_errors",
            "Failed shared token cache operations by op (get, set, lock, unlock, purge, decode, connect)",
            token_cache_errors.clone(),
        );
        let token_cache_hits = Family::<ProfileLabels, Counter>::default();
        registry.register(
            "egain_proxy_token_cache_hits",
            "Tokens taken from the shared cache instead of the token endpoint",
            token_cache_hits.clone(),
        );
        let upstream_scope_errors = Family::<RouteProfileLabels, Counter>::default();
        registry.register(
            "egain_proxy_upstream_scope_errors",
            "eGain 403 answers with code 403-197 (scope not assigned to the client), by route and profile",
            upstream_scope_errors.clone(),
        );
        let upgrades = Family::<RouteLabels, Counter>::default();
        registry.register(
            "egain_proxy_upgrades",
            "Upgraded connections (WebSocket tunnels) opened, by route",
            upgrades.clone(),
        );
        Metrics {
            registry,
            token_cache_errors,
            upstream_scope_errors,
            upgrades,
            token_cache_hits,
            requests,
            request_duration,
            upstream_errors,
            token_fetches,
            token_expiry,
            forced_refreshes,
            config_reloads,
            inflight,
            replays,
            recent: recent::Recent::default(),
        }
    }

    /// Creates every series whose labels are known from the config at 0, so alerts on
    /// `increase()` see the first failure (a series born at 1 has no increase): reload
    /// outcomes, forced refreshes per profile, replays, upgrades and upstream errors per route
    /// and kind, and eGain scope errors per route and its profile.
    pub fn prepare<'a>(
        &self,
        routes: impl Iterator<Item = (&'a str, Option<&'a str>)>,
        profiles: impl Iterator<Item = &'a str>,
    ) {
        for outcome in ["success", "error"] {
            let _ = self
                .config_reloads
                .get_or_create(&OutcomeLabels { outcome });
        }
        for profile in profiles {
            let labels = ProfileLabels {
                profile: profile.to_owned(),
            };
            let _ = self.forced_refreshes.get_or_create(&labels);
        }
        for (route, profile) in routes {
            if let Some(profile) = profile {
                let _ = self
                    .upstream_scope_errors
                    .get_or_create(&RouteProfileLabels {
                        route: route.to_owned(),
                        profile: profile.to_owned(),
                    });
            }
            let labels = RouteLabels {
                route: route.to_owned(),
            };
            let _ = self.replays.get_or_create(&labels);
            let _ = self.upgrades.get_or_create(&labels);
            for kind in UPSTREAM_ERROR_KINDS {
                let _ = self.upstream_errors.get_or_create(&UpstreamErrorLabels {
                    route: route.to_owned(),
                    kind,
                });
            }
        }
    }

    /// With `[token_cache]`: the shared cache's series at 0, so the first failure shows as an
    /// increase: its errors by operation, and per profile its hits (a replica that never takes
    /// a token from Redis shows 0, not nothing).
    pub fn prepare_token_cache<'a>(&self, profiles: impl Iterator<Item = &'a str>) {
        for op in TOKEN_CACHE_OPS {
            let _ = self.token_cache_errors.get_or_create(&OpLabels { op });
        }
        for profile in profiles {
            let _ = self.token_cache_hits.get_or_create(&ProfileLabels {
                profile: profile.to_owned(),
            });
        }
    }

    /// Counts one failed upstream exchange of `route`: `connect`, `timeout` or `protocol`.
    pub fn upstream_error(&self, route: &str, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                route: route.to_owned(),
                kind,
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Folds methods to a fixed set so a client cannot grow the label space.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}
