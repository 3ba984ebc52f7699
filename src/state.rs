//! The running state: one `Generation` (config + route table + clients + token holders)
//! behind an `ArcSwap`. A request loads one snapshot and finishes on it; a reload builds the
//! next generation beside it and swaps.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Mutex;

use crate::access::Access;
use crate::config::{Config, ConfigError};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::routes::RouteTable;
use crate::token::cache::TokenCache;
use crate::token::Tokens;
use crate::upstream::Upstreams;

pub struct Generation {
    pub number: u64,
    pub config: Arc<Config>,
    pub routes: RouteTable,
    pub upstreams: Upstreams,
    pub tokens: Tokens,
    pub access: Option<Access>,
    /// `[token_cache]`: shared with every holder of this generation.
    pub token_cache: Option<Arc<TokenCache>>,
    /// The inbound TLS certificate and key (`[server.tls]`), read again at each reload: a
    /// certificate renewed in place is served from the next connection on.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Generation {
    fn build(
        number: u64,
        config: Config,
        previous: Option<&Generation>,
        metrics: &Arc<Metrics>,
    ) -> Result<Generation, ConfigError> {
        let err = |m: String| ConfigError::general(m);
        let upstreams = Upstreams::build(&config, previous.map(|p| &p.upstreams)).map_err(err)?;
        let tokens = Tokens::build(&config, previous.map(|p| &p.tokens), metrics).map_err(err)?;
        // Keep the cache (its connection and health) when its settings did not change.
        let token_cache = match (
            &config.token_cache,
            previous.and_then(|p| p.token_cache.as_ref()),
        ) {
            (None, _) => None,
            (Some(c), Some(old)) if old.config == *c => Some(Arc::clone(old)),
            (Some(c), _) => Some(Arc::new(
                TokenCache::new(c.clone(), Arc::clone(metrics)).map_err(err)?,
            )),
        };
        if token_cache.is_some() {
            metrics.prepare_token_cache(config.profiles.keys().map(String::as_str));
        }
        // A listener is TLS or not for the life of the process: a config that drops
        // `[server.tls]` keeps the running certificate (and `restart_needed` says so).
        let tls = match &config.server.tls {
            Some(files) => Some(
                crate::tls::server_config(&files.cert, &files.key)
                    .map_err(|m| ConfigError::general(format!("server.tls: {m}")))?,
            ),
            None => previous.and_then(|p| p.tls.clone()),
        };
        metrics.prepare(
            config
                .routes
                .iter()
                .map(|r| (r.name.as_str(), r.profile.as_deref())),
            config.profiles.keys().map(String::as_str),
        );
        Ok(Generation {
            number,
            routes: RouteTable::new(&config.routes),
            access: config.server.access.as_ref().map(Access::new),
            config: Arc::new(config),
            upstreams,
            tokens,
            token_cache,
            tls,
        })
    }

    /// Points every holder at this generation's shared cache (or none).
    fn share_tokens(&self) {
        for (_, holder) in self.tokens.iter() {
            holder.set_cache(self.token_cache.clone());
        }
    }

    /// Profiles used by at least one route that have no usable token.
    pub fn unready_profiles(&self) -> Vec<String> {
        self.tokens
            .iter()
            .filter(|(name, holder)| self.config.uses_profile(name) && holder.usable().is_none())
            .map(|(name, _)| name.clone())
            .collect()
    }
}

pub struct Shared {
    current: ArcSwap<Generation>,
    pub metrics: Arc<Metrics>,
    /// Where reloads read from; `None` for in-memory configs (demo, tests).
    pub config_path: Option<PathBuf>,
    /// The config the process started with: listeners, limits and logging as they run
    /// (they change only with a restart).
    running: Arc<Config>,
    next_number: AtomicU64,
    reload_lock: Mutex<()>,
    /// Upstream connections (HTTP/1.1 keep-alive, and h2), shared by every transport and
    /// kept across reloads.
    pub h1_pool: Arc<crate::upstream::Pool>,
    /// The outcome of the last reload, for `/status` and the admin page.
    last_reload: std::sync::Mutex<Option<ReloadRecord>>,
    pub started: std::time::SystemTime,
    /// Open upgrade tunnels (WebSocket), closed at the end of a shutdown.
    pub tunnels: crate::pipeline::upgrade::Tunnels,
    /// (route, profile) pairs already warned about eGain's 403-197.
    scope_warned: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

/// One reload attempt as `/status` shows it.
#[derive(Debug, Clone)]
pub struct ReloadRecord {
    pub at: std::time::SystemTime,
    /// The generation installed; `None` when the reload failed.
    pub generation: Option<u64>,
    pub error: Option<String>,
}

impl Shared {
    /// Builds generation 1 and starts its token refreshers (tokens are fetched at start-up).
    pub fn start(config: Config, config_path: Option<PathBuf>) -> Result<Arc<Shared>, ConfigError> {
        let metrics = Arc::new(Metrics::new());
        let generation = Generation::build(1, config, None, &metrics)?;
        generation.share_tokens();
        generation.tokens.start_all();
        Ok(Arc::new(Shared {
            running: Arc::clone(&generation.config),
            current: ArcSwap::from_pointee(generation),
            metrics,
            config_path,
            next_number: AtomicU64::new(2),
            reload_lock: Mutex::new(()),
            h1_pool: Arc::default(),
            last_reload: std::sync::Mutex::new(None),
            started: std::time::SystemTime::now(),
            scope_warned: Default::default(),
            tunnels: Default::default(),
        }))
    }

    /// True the first time (route, profile) is seen with a scope error.
    pub fn first_scope_error(&self, route: &str, profile: &str) -> bool {
        self.scope_warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((route.to_owned(), profile.to_owned()))
    }

    pub fn last_reload(&self) -> Option<ReloadRecord> {
        self.last_reload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn load(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Re-reads the config file (SIGHUP, `POST /reload`). On any error the old generation
    /// keeps serving and the error is returned.
    pub async fn reload(&self) -> Result<u64, ConfigError> {
        let result = match &self.config_path {
            Some(path) => {
                let path = path.clone();
                match tokio::task::spawn_blocking(move || Config::load(&path)).await {
                    Ok(r) => r,
                    Err(e) => Err(ConfigError::general(format!("reload task failed: {e}"))),
                }
            }
            None => Err(ConfigError::general(
                "this instance has no config file to reload",
            )),
        };
        let result = match result {
            Ok(config) => self.install(config).await,
            Err(e) => Err(e),
        };
        let outcome = if result.is_ok() { "success" } else { "error" };
        self.metrics
            .config_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(ReloadRecord {
            at: std::time::SystemTime::now(),
            generation: result.as_ref().ok().copied(),
            error: result.as_ref().err().map(|e| e.to_string()),
        });
        match &result {
            Ok(n) => tracing::info!(generation = n, "configuration reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; still serving the previous configuration")
            }
        }
        result
    }

    /// Swaps in `config`, keeping token holders and upstream pools whose settings are unchanged.
    pub async fn install(&self, config: Config) -> Result<u64, ConfigError> {
        let _serial = self.reload_lock.lock().await;
        let old = self.load();
        let pending = restart_only_changes(&self.running, &config);
        if !pending.is_empty() {
            tracing::warn!(
                settings = %pending.join(", "),
                "these settings differ from the ones running and need a restart to apply"
            );
        }
        let number = self.next_number.fetch_add(1, Ordering::Relaxed);
        let next = Generation::build(number, config, Some(&old), &self.metrics)?;
        next.share_tokens();
        next.tokens.start_all();
        old.tokens.retire_unused(&next.tokens);
        self.current.store(Arc::new(next));
        Ok(number)
    }

    /// Settings of the current config that differ from those running (`/status`).
    pub fn restart_needed(&self) -> Vec<&'static str> {
        restart_only_changes(&self.running, &self.load().config)
    }

    pub fn shutdown(&self) {
        self.load().tokens.stop_all();
    }
}

/// The settings that take effect only at start-up (listeners, server limits, TLS, admin,
/// logging) that differ between the running config and `new`.
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&running.server, &new.server);
    [
        ("server.listen", o.listen != n.listen),
        // Certificate files are read again at each reload; TLS on or off needs a restart.
        ("server.tls", o.tls.is_some() != n.tls.is_some()),
        (
            "server.shutdown_grace",
            o.shutdown_grace != n.shutdown_grace,
        ),
        (
            "server.header_read_timeout",
            o.header_read_timeout != n.header_read_timeout,
        ),
        (
            "server.max_header_bytes",
            o.max_header_bytes != n.max_header_bytes,
        ),
        (
            "server.max_connections",
            o.max_connections != n.max_connections,
        ),
        (
            "admin.listen",
            running.admin.as_ref().map(|a| a.listen) != new.admin.as_ref().map(|a| a.listen),
        ),
        (
            "log",
            !running.log.level.eq_ignore_ascii_case(&new.log.level)
                || running.log.format != new.log.format,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}
