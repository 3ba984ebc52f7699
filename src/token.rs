//! Tokens: `AccessToken` (ready-made header + expiry), `TokenHolder` (one per distinct token
//! settings, read lock-free through `arc-swap`), and `Tokens` (profile name -> holder).
//!
//! Only the holder's background refresher (`refresh.rs`) ever requests a token, which makes
//! fetches single-flight by construction; requests only read, wait, or ask for a refresh.

pub mod cache;
pub mod fetch;
pub mod refresh;

use crate::error::TokenUnavailable;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use tokio::sync::Notify;

use crate::config::{Config, TokenSettings};
use crate::metrics::{Metrics, ProfileLabels};
pub use fetch::FetchError;

/// How long a request waits for a token before it gets 503 `token_unavailable`.
pub const WAIT_FOR_TOKEN: Duration = Duration::from_secs(5);
/// Forced refreshes after upstream 401s are limited to one per this interval per holder.
pub const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// Longest lifetime believed from a token response.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// A token ready to be sent: everything that changes together, behind one swap.
pub struct AccessToken {
    /// `Bearer <token>`, marked sensitive so hyper's HPACK never indexes it and Debug hides it.
    pub header: HeaderValue,
    /// Send time of the token request + lifetime (RFC 6749 §5.1 `expires_in` counts from
    /// issue, which is after we sent; so this is never later than the real expiry).
    pub expires_at: Instant,
    /// A little before `expires_at`, so a token is not sent in its last moments and expires
    /// on the wire.
    pub usable_until: Instant,
    pub refresh_at: Instant,
    pub fingerprint: String,
    pub scope: Option<String>,
    pub lifetime: Duration,
    pub obtained_at: SystemTime,
    /// The value stored in the shared cache for this token, for the compare-and-delete after
    /// an upstream 401; `None` when it is not shared.
    pub shared: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("fingerprint", &self.fingerprint)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl AccessToken {
    pub fn new(
        token: &str,
        lifetime: Duration,
        sent_at: Instant,
        scope: Option<String>,
    ) -> Option<Self> {
        // A server may claim any lifetime (expires_in, a JWT exp decades away); a year is
        // plenty and keeps every deadline computed from it far from overflow.
        let lifetime = lifetime.min(MAX_TOKEN_LIFETIME);
        let mut header = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        header.set_sensitive(true);
        // Safety margin against expiring in flight: a tenth of the lifetime, at most 2 s.
        let margin = (lifetime / 10).min(Duration::from_secs(2));
        Some(AccessToken {
            header,
            expires_at: sent_at + lifetime,
            usable_until: sent_at + lifetime - margin,
            // Refresh once 80% of the lifetime has passed.
            refresh_at: sent_at + lifetime.mul_f64(0.8),
            fingerprint: crate::config::secrets::fingerprint(token.as_bytes()),
            scope,
            lifetime,
            obtained_at: SystemTime::now(),
            shared: None,
        })
    }

    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderState {
    Empty,
    Valid,
    Refreshing,
    Failed,
}

impl HolderState {
    pub fn as_str(self) -> &'static str {
        match self {
            HolderState::Empty => "empty",
            HolderState::Valid => "valid",
            HolderState::Refreshing => "refreshing",
            HolderState::Failed => "failed",
        }
    }
}

/// What `/status` and 503 messages read; updated by the refresher, never on the hot path.
#[derive(Debug, Default, Clone)]
pub struct HolderStatus {
    pub fetching: bool,
    pub fetch_count: u64,
    pub failures_in_a_row: u32,
    pub last_error: Option<FetchError>,
    pub last_refresh: Option<SystemTime>,
    pub next_attempt: Option<Instant>,
    /// Tokens taken from the shared cache instead of the endpoint.
    pub cache_hits: u64,
    /// Where the current token came from: `endpoint` or `cache`.
    pub source: Option<&'static str>,
    /// The last `RECENT_FETCHES` token requests, oldest first.
    pub recent: std::collections::VecDeque<FetchRecord>,
}

/// How many token requests `/status` remembers per holder.
pub const RECENT_FETCHES: usize = 10;

/// One token request as `/status` shows it: when, how it ended, how long it took.
#[derive(Debug, Clone)]
pub struct FetchRecord {
    pub at: SystemTime,
    /// The `outcome` label of `egain_proxy_token_fetches_total`.
    pub outcome: &'static str,
    pub duration: Duration,
    /// The OAuth `error` code of a refusal (`invalid_client`, ...).
    pub oauth_error: Option<String>,
    /// The error's text (what `last_error` shows), for failures.
    pub error: Option<String>,
}

pub struct TokenHolder {
    pub settings: TokenSettings,
    /// Profiles sharing this holder (for logs and metrics); updated on reload.
    profiles: ArcSwap<Vec<String>>,
    current: ArcSwapOption<AccessToken>,
    /// Wakes requests waiting for a token.
    changed: Notify,
    /// Wakes the refresher: a token was invalidated or is missing.
    wake: Notify,
    status: Mutex<HolderStatus>,
    last_forced: Mutex<Option<Instant>>,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
    /// The shared cache of the current generation, if `[token_cache]` is set.
    cache: ArcSwapOption<cache::TokenCache>,
    /// The cached value of a token an upstream rejected, for the refresher to purge.
    rejected: Mutex<Option<Arc<[u8]>>>,
}

impl std::fmt::Debug for TokenHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenHolder")
            .field("profiles", &self.profiles.load())
            .finish_non_exhaustive()
    }
}

impl TokenHolder {
    pub fn new(
        settings: TokenSettings,
        profiles: Vec<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let client = token_client(&settings)?;
        Ok(Arc::new(TokenHolder {
            settings,
            profiles: ArcSwap::from_pointee(profiles),
            current: ArcSwapOption::empty(),
            changed: Notify::new(),
            wake: Notify::new(),
            status: Mutex::new(HolderStatus::default()),
            last_forced: Mutex::new(None),
            client,
            metrics,
            task: Mutex::new(None),
            cache: ArcSwapOption::empty(),
            rejected: Mutex::new(None),
        }))
    }

    /// Starts the background refresher (which fetches the first token right away).
    pub fn start(self: &Arc<Self>) {
        let mut task = lock(&self.task);
        if task.is_none() {
            let handle = tokio::spawn(refresh::run(Arc::clone(self)));
            *task = Some(handle.abort_handle());
        }
    }

    /// Stops the refresher; used when a reload drops the profile.
    pub fn stop(&self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }

    /// Shares this holder's tokens through `cache` (or stops sharing, with `None`).
    pub fn set_cache(&self, cache: Option<Arc<cache::TokenCache>>) {
        self.cache.store(cache);
    }

    pub fn profile_names(&self) -> Arc<Vec<String>> {
        self.profiles.load_full()
    }

    /// The profile name used in logs for this holder.
    pub fn label(&self) -> String {
        self.profiles.load().join(",")
    }

    /// The current token if it may still be sent. Lock-free.
    pub fn usable(&self) -> Option<Arc<AccessToken>> {
        let guard = self.current.load();
        match &*guard {
            Some(t) if t.is_usable(Instant::now()) => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// Installs a new current token and wakes requests waiting for one. The refresher is the
    /// normal writer; tests and benches use it to swap tokens directly.
    pub fn install(&self, token: AccessToken) {
        self.current.store(Some(Arc::new(token)));
        self.changed.notify_waiters();
    }

    /// The current token (possibly expired), for status and tests.
    pub fn current(&self) -> Option<Arc<AccessToken>> {
        self.current.load_full()
    }

    /// A usable token, waiting up to `WAIT_FOR_TOKEN` for the refresher when there is none.
    pub async fn get(&self, profile: &str) -> Result<Arc<AccessToken>, TokenUnavailable> {
        if let Some(t) = self.usable() {
            return Ok(t);
        }
        self.wake.notify_one();
        let deadline = tokio::time::Instant::now() + WAIT_FOR_TOKEN;
        let fetches_before = lock(&self.status).fetch_count;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(t) = self.usable() {
                return Ok(t);
            }
            {
                let s = lock(&self.status);
                // The request waits for the outcome of one fetch (the one in flight, or the
                // next one), not for a whole backoff schedule: once an attempt made while it
                // waited has failed, it answers 503 with Retry-After at once.
                let attempt_failed =
                    s.fetch_count > fetches_before && !s.fetching && s.last_error.is_some();
                // Nor is there any point waiting when the next attempt comes after the deadline.
                let too_late = s.next_attempt.is_some_and(|n| n > deadline.into_std());
                if attempt_failed || too_late {
                    drop(s);
                    return Err(self.unavailable(profile));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.unavailable(profile));
            }
        }
    }

    fn unavailable(&self, profile: &str) -> TokenUnavailable {
        let status = lock(&self.status);
        let retry_after = status
            .next_attempt
            .map(|n| n.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
            .max(Duration::from_secs(1));
        TokenUnavailable {
            profile: profile.to_owned(),
            // FetchError's text names the OAuth error code once, as the README shows.
            reason: status.last_error.as_ref().map(|e| e.to_string()),
            retry_after,
        }
    }

    /// After an upstream 401 for `sent`: invalidate it if it is still current (at most once per
    /// `FORCED_REFRESH_INTERVAL`) and wake the refresher. Returns true when a token other than
    /// `sent` is, or soon will be, available, i.e. a replay makes sense.
    pub fn invalidate(&self, sent: &Arc<AccessToken>) -> bool {
        // Held from the check to the swap: two 401s for the same token must not both see it
        // current, one swapping it out while the other, rate-limited, gives up on a replay.
        let mut last = lock(&self.last_forced);
        let current = self.current.load_full();
        match &current {
            Some(c) if Arc::ptr_eq(c, sent) => {}
            // Already replaced (or already invalidated and being refetched).
            _ => return true,
        }
        if last.is_some_and(|t| t.elapsed() < FORCED_REFRESH_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        let previous = self.current.compare_and_swap(&current, None);
        drop(last);
        let swapped = match (&*previous, &current) {
            (Some(p), Some(c)) => Arc::ptr_eq(p, c),
            _ => false,
        };
        if swapped {
            if let Some(value) = &sent.shared {
                *lock(&self.rejected) = Some(Arc::clone(value));
            }
            for profile in self.profile_names().iter() {
                self.metrics
                    .forced_refreshes
                    .get_or_create(&ProfileLabels {
                        profile: profile.clone(),
                    })
                    .inc();
            }
            tracing::warn!(
                profile = %self.label(),
                fingerprint = %sent.fingerprint,
                "upstream rejected the token (401); invalidated it and fetching a new one"
            );
            self.wake.notify_one();
        }
        true
    }

    pub fn status(&self) -> HolderStatus {
        lock(&self.status).clone()
    }

    pub fn state(&self) -> HolderState {
        let status = self.status();
        if status.fetching {
            HolderState::Refreshing
        } else if self.usable().is_some() {
            HolderState::Valid
        } else if status.last_error.is_some() {
            HolderState::Failed
        } else {
            HolderState::Empty
        }
    }

    /// Seconds until the current token expires, 0 when there is none.
    pub fn expiry_seconds(&self) -> f64 {
        self.current()
            .map(|t| {
                t.expires_at
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64()
            })
            .unwrap_or(0.0)
    }
}

/// The HTTP client for one token endpoint: its own TLS roots (`ca_file`), timeout and egress
/// proxy.
pub fn token_client(settings: &TokenSettings) -> Result<reqwest::Client, String> {
    // The token endpoint is spoken to over HTTP/1.1; one small POST gains nothing from h2.
    let tls = crate::tls::client_config(settings.ca_file.as_deref(), &[b"http/1.1"])?;
    // Whether to use a proxy was decided with the config (`config::egress`, the rule upstream
    // calls follow too): reqwest's own reading of the environment is off, and the decision is
    // given to it explicitly. The credentials go as a sensitive header rather than inside the
    // proxy URL, which reqwest writes to its debug log.
    let mut builder = reqwest::Client::builder().no_proxy();
    if let Some(proxy) = &settings.egress {
        let mut via =
            reqwest::Proxy::all(proxy.url()).map_err(|e| format!("egress proxy {proxy}: {e}"))?;
        if let Some(auth) = proxy.authorization() {
            via = via.custom_http_auth(auth);
        }
        builder = builder.proxy(via);
    }
    builder
        .use_preconfigured_tls((*tls).clone())
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        // A redirect from a token endpoint is a misconfiguration; following it could post the
        // secret somewhere unexpected.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("egain-proxy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the token client: {e}"))
}

/// One token request outside any holder (`egain-proxy token`).
pub async fn fetch_once(settings: &TokenSettings) -> Result<fetch::TokenResponse, FetchError> {
    let client = token_client(settings).map_err(FetchError::Connect)?;
    fetch::fetch(&client, settings).await
}

/// Locks a std mutex, recovering from poisoning: the data is plain status that stays
/// consistent even if a holder panicked mid-update.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Profile name -> holder for one config generation. Profiles with equal `TokenSettings`
/// share a holder; a reload keeps holders whose settings did not change.
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    by_profile: BTreeMap<String, Arc<TokenHolder>>,
}

impl Tokens {
    /// Builds the holders for `config`, reusing those of `previous` with identical settings.
    /// New holders are not started; call `start_all`.
    pub fn build(
        config: &Config,
        previous: Option<&Tokens>,
        metrics: &Arc<Metrics>,
    ) -> Result<Tokens, String> {
        let mut by_settings: HashMap<&TokenSettings, Vec<String>> = HashMap::new();
        for (name, profile) in &config.profiles {
            by_settings
                .entry(&profile.token)
                .or_default()
                .push(name.clone());
        }
        let reusable: HashMap<&TokenSettings, &Arc<TokenHolder>> = previous
            .map(|p| p.by_profile.values().map(|h| (&h.settings, h)).collect())
            .unwrap_or_default();
        let mut by_profile = BTreeMap::new();
        for (settings, names) in by_settings {
            let holder = match reusable.get(settings) {
                Some(h) => {
                    h.profiles.store(Arc::new(names.clone()));
                    Arc::clone(h)
                }
                None => {
                    let holder =
                        TokenHolder::new(settings.clone(), names.clone(), Arc::clone(metrics))?;
                    // Changed settings of the same client (a scope added, a secret rotated):
                    // its current token serves, while it is valid, until the new settings'
                    // token is in (the refresher asks for one at once), so a reload is never
                    // an outage, whatever the endpoint is doing.
                    let carried = previous
                        .and_then(|p| names.iter().find_map(|n| p.by_profile.get(n)))
                        .filter(|old| old.settings.same_client(settings))
                        .and_then(|old| old.usable());
                    if let Some(token) = carried {
                        tracing::info!(
                            profile = %names.join(","),
                            fingerprint = %token.fingerprint,
                            "profile settings changed: its current token serves until the new settings' token arrives"
                        );
                        holder.current.store(Some(token));
                        // `/status` and the admin page say so until the new settings' token.
                        lock(&holder.status).source = Some("previous_settings");
                    }
                    holder
                }
            };
            for name in names {
                by_profile.insert(name, Arc::clone(&holder));
            }
        }
        Ok(Tokens { by_profile })
    }

    pub fn start_all(&self) {
        for h in self.by_profile.values() {
            h.start();
        }
    }

    /// Stops holders of `self` that `next` no longer uses.
    pub fn retire_unused(&self, next: &Tokens) {
        for h in self.by_profile.values() {
            if !next.by_profile.values().any(|n| Arc::ptr_eq(n, h)) {
                h.stop();
            }
        }
    }

    pub fn stop_all(&self) {
        for h in self.by_profile.values() {
            h.stop();
        }
    }

    pub fn get(&self, profile: &str) -> Option<&Arc<TokenHolder>> {
        self.by_profile.get(profile)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<TokenHolder>)> {
        self.by_profile.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientAuth, ProfileKind, Secret};

    fn settings() -> TokenSettings {
        TokenSettings {
            kind: ProfileKind::ClientApp,
            token_url: "http://127.0.0.1:1/t".into(),
            client_id: "i".into(),
            client_secret: crate::config::secrets::ClientSecret::Inline(Secret::new("s")),
            scopes: vec![],
            client_auth: ClientAuth::Body,
            timeout: Duration::from_secs(1),
            ca_file: None,
            extra_params: vec![],
            extra_headers: vec![],
            default_ttl: Duration::from_secs(300),
            egress: None,
        }
    }

    /// 401s for one token arriving at once (from requests that were all sent with it): every
    /// one is told a new token is coming, so each replays, and the token is swapped out once.
    /// With the check made before the forced-refresh lock was taken, a later one could see the
    /// token still current, then the rate limit the first had just set, and pass its 401 on.
    #[test]
    fn concurrent_401s_for_one_token_all_replay() {
        for round in 0..300 {
            let metrics = Arc::new(Metrics::new());
            let holder = TokenHolder::new(settings(), vec!["p".into()], metrics).unwrap();
            let token = AccessToken::new(
                &format!("token-{round}"),
                Duration::from_secs(3600),
                Instant::now(),
                None,
            )
            .unwrap();
            holder.install(token);
            let sent = holder.current().unwrap();
            let start = std::sync::Barrier::new(4);
            let replays: Vec<bool> = std::thread::scope(|s| {
                let threads: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            holder.invalidate(&sent)
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            assert!(replays.iter().all(|r| *r), "round {round}: {replays:?}");
            assert!(holder.current().is_none(), "round {round}: not swapped out");
        }
    }
}
