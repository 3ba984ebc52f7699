//! The shared token cache (contract §10): replicas with equal token settings share one token
//! through Redis.
//!
//! - Key: `{prefix}:token:{id}` where `id` is an HMAC-SHA-256, under the cache key, of the
//!   whole token request (URL with query, client id, secret, scopes, client auth, extra
//!   params and headers, default lifetime). Without the key the name says nothing; different
//!   settings never share.
//! - Value: version byte, 12-byte random nonce, AES-256-GCM ciphertext of the token, its send
//!   time and lifetime; the Redis key is the associated data, so a value cannot be moved to
//!   another key. The Redis TTL is the token's remaining life.
//! - Single flight: `{prefix}:lock:{id}`, `SET NX PX` with this process's owner value,
//!   released by a compare-and-delete script, so only its owner releases it. Replicas that do
//!   not win wait for the winner's token by polling, up to the request wait of §4.
//! - After an upstream 401 the token is deleted only if it is still the one sent
//!   (compare-and-delete on the ciphertext).
//! - Any Redis trouble (down, slow, full, read-only) makes the caller fetch for itself; the
//!   change of state is logged once and every error counted by operation. For `RETRY_DOWN`
//!   after a failure the cache is not asked at all, so a Redis that hangs costs a refresh
//!   one `timeout` at most, not one per operation. A freshly fetched token is installed
//!   before it is written to Redis (`seal`, then `put`). The cache is back up only after a
//!   refresh whose operations all worked (`Trip`): a Redis that answers reads but refuses
//!   writes stays down, rather than going up and down with every refresh.
//! - A value that does not decrypt (garbage, another key's) is a counted miss
//!   (`op="decode"`) that the next store replaces; it says nothing of Redis's health.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::AccessToken;
use crate::config::{TokenCacheConfig, TokenSettings};
use crate::metrics::{Metrics, OpLabels};

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
/// How often a replica that lost the lock looks for the winner's token.
const POLL: Duration = Duration::from_millis(50);
/// How long a replica waits for the lock holder's token before fetching one itself: well
/// within a request's wait for a token (`super::WAIT_FOR_TOKEN`), so that a lock holder that
/// froze or died mid-fetch costs a waiting request time, not an error.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// After a failed operation, the cache is left alone for this long.
const RETRY_DOWN: Duration = Duration::from_secs(5);

/// Deletes KEYS[1] only when it still holds ARGV[1]: lock release and 401 purge.
const COMPARE_AND_DELETE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// What is encrypted: never stored in clear.
#[derive(Serialize, Deserialize)]
struct Stored {
    access_token: String,
    /// When the token request was sent, unix milliseconds: lifetimes count from there.
    sent_at_ms: u64,
    lifetime_ms: u64,
    scope: Option<String>,
}

/// A token read from (or written to) the cache, with the exact stored bytes for the 401 purge.
pub struct SharedToken {
    pub token: AccessToken,
    pub value: Arc<[u8]>,
    /// Past 80% of its life: the next refresh is due.
    pub refresh_due: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// No operation yet.
    Unknown,
    Up,
    Down {
        error: String,
        since: SystemTime,
    },
}

pub struct TokenCache {
    pub config: TokenCacheConfig,
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// The key (and its cipher) as last read from `encryption_key_file`.
    key: arc_swap::ArcSwap<Keyed>,
    /// Random per process: the lock's owner value.
    owner: String,
    health: Mutex<Health>,
    /// Until when the cache is left alone after a failure (`RETRY_DOWN`).
    resting_until: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

/// What the cache operations of one refresh met: the cache goes back up only after a refresh
/// whose operations all worked (`TokenCache::settle`).
#[derive(Default)]
pub struct Trip {
    worked: bool,
    failed: bool,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("redis", &self.config.redacted_url())
            .finish_non_exhaustive()
    }
}

/// Why a cache operation failed; the text never holds a token, key or password.
#[derive(Debug)]
pub struct CacheError {
    pub op: &'static str,
    pub message: String,
}

/// A token sealed for the cache (`TokenCache::seal_token`), not yet stored.
pub struct Sealed {
    key: String,
    pub value: Arc<[u8]>,
    /// When the token expires (and the value with it).
    expires: Instant,
}

/// The outcome of asking the cache before a token request.
pub enum Coordination {
    /// A valid shared token: no request needed.
    Taken(Box<SharedToken>),
    /// Fetch: holding the lock (`true`), or alone because the cache is unusable or the lock
    /// holder took too long (`false`).
    Fetch { locked: bool },
}

impl TokenCache {
    pub fn new(config: TokenCacheConfig, metrics: Arc<Metrics>) -> Result<TokenCache, String> {
        let client = match &config.ca_file {
            None => redis::Client::open(config.redis.expose()),
            Some(ca_file) => {
                let root_cert = std::fs::read(ca_file)
                    .map_err(|e| format!("token_cache.ca_file {}: {e}", ca_file.display()))?;
                redis::Client::build_with_tls(
                    config.redis.expose(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )
            }
        }
        .map_err(|e| format!("token_cache.redis {}: {e}", config.redacted_url()))?;
        let key = Keyed::new(config.key.0)?;
        let mut owner = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut owner);
        Ok(TokenCache {
            config,
            client,
            conn: tokio::sync::Mutex::new(None),
            key: arc_swap::ArcSwap::from_pointee(key),
            owner: hex(&owner),
            health: Mutex::new(Health::Unknown),
            resting_until: Mutex::new(None),
            metrics,
        })
    }

    /// Reads `encryption_key_file` again (a rotated key, a `..data` symlink swap); from then on
    /// values are sealed and opened with the new key. Values sealed with the old one become
    /// counted misses that the next store replaces.
    pub fn reread_key(&self) {
        let path = &self.config.encryption_key_file;
        match crate::config::secrets::read_key_file(path) {
            Ok(key) if key != self.key.load().key => match Keyed::new(key) {
                Ok(keyed) => {
                    tracing::info!(file = %path.display(), "token cache key file changed: using the new key");
                    self.key.store(Arc::new(keyed));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "token cache key unusable; keeping the last key")
                }
            },
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the token cache key file; keeping the last key")
            }
        }
    }

    pub fn health(&self) -> Health {
        lock(&self.health).clone()
    }

    /// A short digest of the encryption key (never the key): replicas that share tokens show
    /// the same one in `/status`. Replicas with different keys use different key names, so
    /// they share nothing; this is how an operator sees that.
    pub fn key_id(&self) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key.load().key)
            .expect("HMAC takes keys of any length");
        mac.update(b"egain-proxy token cache key id");
        hex(&mac.finalize().into_bytes()[..4])
    }

    /// Not resting after a failure (`RETRY_DOWN`): worth asking.
    fn awake(&self) -> bool {
        lock(&self.resting_until).map_or(true, |t| Instant::now() >= t)
    }

    /// After a refresh: the cache is up again when every operation of `trip` worked.
    pub fn settle(&self, trip: Trip) {
        if !trip.worked || trip.failed {
            return;
        }
        let mut health = lock(&self.health);
        if let Health::Down { since, .. } = &*health {
            let down_for = since.elapsed().unwrap_or_default();
            tracing::info!(
                redis = %self.config.redacted_url(),
                down_for_s = down_for.as_secs(),
                "token cache answering again: sharing tokens with other replicas"
            );
        }
        *health = Health::Up;
    }

    /// `{prefix}:token:{id}` and `{prefix}:lock:{id}` for `settings`.
    pub fn keys(&self, settings: &TokenSettings) -> (String, String) {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key.load().key)
            .expect("HMAC takes keys of any length");
        // Length-prefixed fields: no two different settings feed the same bytes.
        let mut field = |bytes: &[u8]| {
            mac.update(&(bytes.len() as u64).to_be_bytes());
            mac.update(bytes);
        };
        field(b"egain-proxy token cache v1");
        field(settings.kind.as_str().as_bytes());
        field(settings.token_url.as_bytes());
        field(settings.client_id.as_bytes());
        field(settings.client_secret.current().expose().as_bytes());
        field(format!("{:?}", settings.client_auth).as_bytes());
        field(&(settings.scopes.len() as u64).to_be_bytes());
        for scope in &settings.scopes {
            field(scope.as_bytes());
        }
        for list in [&settings.extra_params, &settings.extra_headers] {
            field(&(list.len() as u64).to_be_bytes());
            for (name, value) in list {
                field(name.as_bytes());
                field(value.as_bytes());
            }
        }
        field(&settings.default_ttl.as_millis().to_be_bytes());
        let id = hex(&mac.finalize().into_bytes()[..20]);
        let prefix = &self.config.key_prefix;
        (
            format!("{prefix}:token:{id}"),
            format!("{prefix}:lock:{id}"),
        )
    }

    /// Before a token request: a valid shared token, or the right to fetch. `rejected` is the
    /// value of a token an upstream refused, which is never taken again.
    pub async fn coordinate(
        &self,
        settings: &TokenSettings,
        rejected: Option<&[u8]>,
        trip: &mut Trip,
    ) -> Coordination {
        if !self.awake() {
            return Coordination::Fetch { locked: false };
        }
        let (key, lock_key) = self.keys(settings);
        let deadline = Instant::now() + LOCK_WAIT;
        let lock_ttl = settings.timeout + Duration::from_secs(2);
        loop {
            match self.get(&key, trip).await {
                Ok(Some(t)) if !t.refresh_due && rejected != Some(&t.value[..]) => {
                    return Coordination::Taken(Box::new(t))
                }
                Ok(_) => {}
                Err(_) => return Coordination::Fetch { locked: false },
            }
            match self.try_lock(&lock_key, lock_ttl, trip).await {
                Ok(true) => {
                    // Someone may have stored between our read and our lock.
                    if let Ok(Some(t)) = self.get(&key, trip).await {
                        if !t.refresh_due && rejected != Some(&t.value[..]) {
                            self.unlock(settings, trip).await;
                            return Coordination::Taken(Box::new(t));
                        }
                    }
                    return Coordination::Fetch { locked: true };
                }
                Ok(false) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
                Ok(false) => {
                    tracing::warn!(
                        waited_ms = LOCK_WAIT.as_millis() as u64,
                        "token cache: another replica holds the refresh lock and has stored no token; fetching here"
                    );
                    return Coordination::Fetch { locked: false };
                }
                Err(_) => return Coordination::Fetch { locked: false },
            }
        }
    }

    /// A freshly fetched token sealed for the other replicas (`put` stores it), so that its
    /// value is known before it is installed here (the 401 purge compares it).
    pub fn seal_token(
        &self,
        settings: &TokenSettings,
        access_token: &str,
        sent_at: Instant,
        lifetime: Duration,
        scope: Option<String>,
    ) -> Option<Sealed> {
        let (key, _) = self.keys(settings);
        let sent_at_ms =
            unix_ms(SystemTime::now()).saturating_sub(sent_at.elapsed().as_millis() as u64);
        let remaining = lifetime.saturating_sub(sent_at.elapsed());
        if remaining < Duration::from_millis(10) {
            return None;
        }
        let stored = Stored {
            access_token: access_token.to_owned(),
            sent_at_ms,
            lifetime_ms: lifetime.as_millis() as u64,
            scope,
        };
        let value: Arc<[u8]> = self.seal(&key, &stored)?.into();
        Some(Sealed {
            key,
            value,
            expires: Instant::now() + remaining,
        })
    }

    /// Stores a sealed token for the other replicas, to expire with it.
    pub async fn put(&self, sealed: &Sealed, trip: &mut Trip) {
        if !self.awake() {
            return;
        }
        let ttl = sealed.expires.saturating_duration_since(Instant::now());
        if ttl < Duration::from_millis(10) {
            return;
        }
        let mut cmd = redis::cmd("SET");
        cmd.arg(&sealed.key)
            .arg(&sealed.value[..])
            .arg("PX")
            .arg(ttl.as_millis() as u64);
        let _ = self.run::<()>("set", cmd, trip).await;
    }

    /// Releases the lock if this process still owns it.
    pub async fn unlock(&self, settings: &TokenSettings, trip: &mut Trip) {
        let (_, lock_key) = self.keys(settings);
        let _ = self
            .compare_and_delete("unlock", &lock_key, self.owner.as_bytes(), trip)
            .await;
    }

    /// After an upstream 401: deletes the shared token only if it is still `value`.
    pub async fn purge(&self, settings: &TokenSettings, value: &[u8], trip: &mut Trip) -> bool {
        if !self.awake() {
            return false;
        }
        let (key, _) = self.keys(settings);
        matches!(
            self.compare_and_delete("purge", &key, value, trip).await,
            Ok(1)
        )
    }

    async fn get(&self, key: &str, trip: &mut Trip) -> Result<Option<SharedToken>, CacheError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        let Some(value) = self.run::<Option<Vec<u8>>>("get", cmd, trip).await? else {
            return Ok(None);
        };
        match self.open(key, &value) {
            Ok(t) => Ok(t),
            Err(()) => {
                // Garbage, or a value sealed under another key (a replica with the previous
                // key file, mid-rotation): a miss that the next store overwrites, counted so
                // it does not go unseen. Redis itself answered.
                self.metrics
                    .token_cache_errors
                    .get_or_create(&OpLabels { op: "decode" })
                    .inc();
                tracing::debug!(
                    "token cache: a cached value could not be decrypted (another encryption key, or not written by egain-proxy)"
                );
                Ok(None)
            }
        }
    }

    async fn try_lock(
        &self,
        lock_key: &str,
        ttl: Duration,
        trip: &mut Trip,
    ) -> Result<bool, CacheError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(lock_key)
            .arg(&self.owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64);
        let answer: Option<String> = self.run("lock", cmd, trip).await?;
        Ok(answer.is_some())
    }

    async fn compare_and_delete(
        &self,
        op: &'static str,
        key: &str,
        value: &[u8],
        trip: &mut Trip,
    ) -> Result<i64, CacheError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(COMPARE_AND_DELETE).arg(1).arg(key).arg(value);
        self.run(op, cmd, trip).await
    }

    /// One command under the timeout, on the shared connection (made on first use, and again
    /// after any failure).
    async fn run<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: redis::Cmd,
        trip: &mut Trip,
    ) -> Result<T, CacheError> {
        let timeout = self.config.timeout;
        let result = tokio::time::timeout(timeout, async {
            let mut conn = self.connection().await.map_err(|m| ("connect", m))?;
            let answer = cmd
                .query_async::<T>(&mut conn)
                .await
                .map_err(|e| (op, describe(e)));
            if answer.is_err() {
                *self.conn.lock().await = None;
            }
            answer
        })
        .await;
        let result = match result {
            Ok(r) => r,
            Err(_) => {
                // A connection that timed out may be wedged: start afresh next time.
                if let Ok(mut conn) = self.conn.try_lock() {
                    *conn = None;
                }
                let waited = humantime::format_duration(timeout);
                Err((op, format!("no answer within {waited}")))
            }
        };
        match result {
            Ok(value) => {
                trip.worked = true;
                Ok(value)
            }
            Err((op, message)) => {
                trip.failed = true;
                let error = CacheError { op, message };
                self.failed(&error);
                Err(error)
            }
        }
    }

    async fn connection(&self) -> Result<MultiplexedConnection, String> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = &*slot {
            return Ok(conn.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(self.config.timeout)
            .set_response_timeout(self.config.timeout);
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(describe)?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    fn failed(&self, error: &CacheError) {
        self.metrics
            .token_cache_errors
            .get_or_create(&OpLabels { op: error.op })
            .inc();
        *lock(&self.resting_until) = Some(Instant::now() + RETRY_DOWN);
        let mut health = lock(&self.health);
        if !matches!(&*health, Health::Down { .. }) {
            tracing::warn!(
                redis = %self.config.redacted_url(),
                op = error.op,
                error = %error.message,
                "token cache unavailable: each replica fetches its own tokens until it answers"
            );
            *health = Health::Down {
                error: format!("{}: {}", error.op, error.message),
                since: SystemTime::now(),
            };
        }
    }

    fn seal(&self, key: &str, stored: &Stored) -> Option<Vec<u8>> {
        let plain = serde_json::to_vec(stored).ok()?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = self
            .key
            .load()
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: key.as_bytes(),
                },
            )
            .ok()?;
        let mut value = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        value.push(VERSION);
        value.extend_from_slice(&nonce);
        value.extend_from_slice(&sealed);
        Some(value)
    }

    /// Decrypts and checks a cached value; `None` for anything not sealed by this key for
    /// this Redis key, or no longer usable.
    /// The token in a stored value: `Err` when the value does not decrypt or parse (garbage,
    /// another key's); `Ok(None)` when it does but the token is past use.
    fn open(&self, key: &str, value: &[u8]) -> Result<Option<SharedToken>, ()> {
        let (&version, rest) = value.split_first().ok_or(())?;
        if version != VERSION || rest.len() < NONCE_LEN {
            return Err(());
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let plain = self
            .key
            .load()
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: key.as_bytes(),
                },
            )
            .map_err(|_| ())?;
        let stored: Stored = serde_json::from_slice(&plain).map_err(|_| ())?;
        let now_ms = unix_ms(SystemTime::now());
        let age = Duration::from_millis(now_ms.saturating_sub(stored.sent_at_ms));
        let lifetime = Duration::from_millis(stored.lifetime_ms);
        let Some(sent_at) = Instant::now().checked_sub(age) else {
            return Ok(None);
        };
        let Some(token) = AccessToken::new(&stored.access_token, lifetime, sent_at, stored.scope)
        else {
            return Err(());
        };
        if !token.is_usable(Instant::now()) {
            return Ok(None);
        }
        Ok(Some(SharedToken {
            refresh_due: Instant::now() >= token.refresh_at,
            token,
            value: value.into(),
        }))
    }
}

/// A key and its cipher, swapped together.
struct Keyed {
    key: [u8; 32],
    cipher: Aes256Gcm,
}

impl Keyed {
    fn new(key: [u8; 32]) -> Result<Keyed, String> {
        let cipher = Aes256Gcm::new_from_slice(&key)
            .map_err(|_| "token_cache: the encryption key must be 32 bytes".to_owned())?;
        Ok(Keyed { key, cipher })
    }
}

fn describe(e: redis::RedisError) -> String {
    // RedisError's text names the kind and the server's message, never our arguments.
    e.to_string()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> TokenCache {
        let config = TokenCacheConfig {
            redis: crate::config::Secret::new("redis://127.0.0.1:1/0".to_owned()),
            key_prefix: "t".into(),
            encryption_key_file: "unused".into(),
            key: crate::config::Secret32([7; 32]),
            timeout: Duration::from_millis(250),
            ca_file: None,
        };
        TokenCache::new(config, Arc::new(Metrics::new())).unwrap()
    }

    fn stored(age: Duration, lifetime: Duration) -> Stored {
        Stored {
            access_token: "a-token".into(),
            sent_at_ms: unix_ms(SystemTime::now()) - age.as_millis() as u64,
            lifetime_ms: lifetime.as_millis() as u64,
            scope: None,
        }
    }

    /// A value that decrypts but whose token is past use is a plain miss; only one that does
    /// not decrypt (garbage, another key's, another Redis key's) is an error, which `get`
    /// counts as `op="decode"` for operators watching for mismatched keys.
    #[test]
    fn stale_tokens_are_misses_and_only_undecryptable_values_errors() {
        let cache = cache();
        let hour = Duration::from_secs(3600);
        let live = cache.seal("k", &stored(Duration::ZERO, hour)).unwrap();
        assert!(matches!(cache.open("k", &live), Ok(Some(_))));
        let stale = cache
            .seal(
                "k",
                &stored(Duration::from_secs(10), Duration::from_secs(5)),
            )
            .unwrap();
        assert!(matches!(cache.open("k", &stale), Ok(None)));
        assert!(cache.open("other", &live).is_err());
        assert!(cache.open("k", b"garbage").is_err());
    }
}
