//! The background refresher of one `TokenHolder`: fetch at start-up, refresh at 80% of the
//! lifetime, back off on failure (250 ms doubling to 30 s, with jitter, at least
//! `Retry-After`), refetch at once when a 401 invalidated the token.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;

use super::cache::{Coordination, Trip};
use super::{fetch, lock, AccessToken, FetchError, TokenHolder};
use crate::metrics::{FetchLabels, ProfileLabels};

const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Delay before attempt `failures + 1`: 250 ms doubling per failure, capped at 30 s, each
/// scaled by a random factor in [0.8, 1.2) (then capped again) so that many proxies restarted
/// together do not hit the endpoint in lock-step. A `Retry-After` is a floor.
pub fn backoff(failures: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_CAP);
    let jittered = base.mul_f64(jitter.clamp(0.8, 1.2)).min(BACKOFF_CAP);
    match retry_after {
        Some(r) => jittered.max(r),
        None => jittered,
    }
}

/// While backing off, how often the secret file is looked at (`rest`).
const SECRET_LOOK: Duration = Duration::from_secs(1);

pub async fn run(holder: Arc<TokenHolder>) {
    loop {
        if let Err(delay) = attempt(&holder).await {
            rest(&holder, delay).await;
            continue;
        }
        // Wait for the refresh point, or an early wake-up because the token was invalidated.
        loop {
            let Some(token) = holder.current() else { break };
            let now = Instant::now();
            if now >= token.refresh_at || !token.is_usable(now) {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(token.refresh_at.into()) => break,
                _ = holder.wake.notified() => {
                    // Spurious unless the token is gone or no longer usable: check again.
                }
            }
        }
    }
}

/// Waits out a backoff `delay`, or less when the client secret file changes meanwhile: a
/// secret rotated at the token endpoint first (`invalid_client`) and on disk a little later,
/// as a secret store syncing to Kubernetes does, is tried as soon as it is there, not after
/// a backoff of up to 30 s (or a longer `Retry-After`).
async fn rest(holder: &TokenHolder, delay: Duration) {
    let until = tokio::time::Instant::now() + delay;
    if !matches!(
        holder.settings.client_secret,
        crate::config::secrets::ClientSecret::File { .. }
    ) {
        tokio::time::sleep_until(until).await;
        return;
    }
    while tokio::time::Instant::now() < until {
        tokio::time::sleep_until(until.min(tokio::time::Instant::now() + SECRET_LOOK)).await;
        if holder.settings.client_secret.changed_on_disk() {
            tracing::info!(
                profile = %holder.label(),
                "client secret file changed during the backoff: trying the new secret now"
            );
            return;
        }
    }
}

/// One token request; installs the token on success, else returns the delay before the next
/// attempt (also recorded in the status before waiters are woken, for their Retry-After).
async fn attempt(holder: &TokenHolder) -> Result<(), Duration> {
    {
        let mut s = lock(&holder.status);
        s.fetching = true;
        s.next_attempt = None;
    }
    let profile = holder.label();
    // A rotated secret file is used from this request on.
    holder.settings.client_secret.reread();
    let cache = holder.cache.load_full();
    let mut locked = false;
    let mut trip = Trip::default();
    if let Some(cache) = &cache {
        cache.reread_key();
        let rejected = lock(&holder.rejected).take();
        if let Some(value) = &rejected {
            // Only if it is still the one the upstream refused: never a newer token.
            cache.purge(&holder.settings, value, &mut trip).await;
        }
        match cache
            .coordinate(&holder.settings, rejected.as_deref(), &mut trip)
            .await
        {
            Coordination::Taken(shared) => {
                let shared = *shared;
                let mut token = shared.token;
                token.shared = Some(shared.value);
                tracing::info!(
                    profile = %profile,
                    fingerprint = %token.fingerprint,
                    expires_in_s = token.expires_at.saturating_duration_since(Instant::now()).as_secs(),
                    "token taken from the shared cache"
                );
                for name in holder.profile_names().iter() {
                    holder
                        .metrics
                        .token_cache_hits
                        .get_or_create(&ProfileLabels {
                            profile: name.clone(),
                        })
                        .inc();
                }
                let mut s = lock(&holder.status);
                s.fetching = false;
                s.cache_hits += 1;
                s.source = Some("cache");
                s.failures_in_a_row = 0;
                s.last_error = None;
                s.last_refresh = Some(SystemTime::now());
                drop(s);
                holder.install(token);
                cache.settle(trip);
                return Ok(());
            }
            Coordination::Fetch { locked: l } => locked = l,
        }
    }
    // The lifetime counts from the moment the request is sent, not from the answer.
    let mut sent_at = Instant::now();
    let mut result = fetch::fetch(&holder.client, &holder.settings).await;
    // `invalid_client` just after the secret file changed: read it again and try the new
    // secret at once rather than back off with the old one (contract §13).
    if matches!(&result, Err(e) if e.oauth_error() == Some("invalid_client"))
        && holder.settings.client_secret.reread()
    {
        if let Err(e) = &result {
            record_fetch(holder, sent_at, Err(e));
        }
        tracing::warn!(
            profile = %profile,
            "token endpoint answered invalid_client and the secret file has changed: retrying with the new secret"
        );
        sent_at = Instant::now();
        result = fetch::fetch(&holder.client, &holder.settings).await;
    }
    let token = result.and_then(|r| {
        AccessToken::new(&r.access_token, r.lifetime, sent_at, r.scope.clone())
            .map(|t| (t, r.lifetime_source, r))
            .ok_or_else(|| {
                FetchError::BadResponse("access_token cannot be sent in a header".into())
            })
    });
    // Sealed for the other replicas now (its value is what a 401 purges), stored in Redis
    // after it is installed here, so a slow Redis never holds this replica's requests.
    let (token, sealed) = match (token, &cache) {
        (Ok((mut t, source, r)), Some(cache)) => {
            let sealed = cache.seal_token(
                &holder.settings,
                &r.access_token,
                sent_at,
                r.lifetime,
                r.scope,
            );
            t.shared = sealed.as_ref().map(|s| Arc::clone(&s.value));
            (Ok((t, source)), sealed)
        }
        (Ok((t, source, _)), None) => (Ok((t, source)), None),
        (Err(e), _) => (Err(e), None),
    };
    let outcome = record_fetch(holder, sent_at, token.as_ref().map(|_| ()));
    let result = installed(holder, &profile, outcome, sent_at, token);
    // Then shared, before the lock is released, so the replicas waiting on it find it.
    if let Some(cache) = cache {
        if let Some(sealed) = &sealed {
            cache.put(sealed, &mut trip).await;
        }
        if locked {
            cache.unlock(&holder.settings, &mut trip).await;
        }
        cache.settle(trip);
    }
    result
}

/// Installs a fetched token, or records the failure and the delay before the next attempt.
fn installed(
    holder: &TokenHolder,
    profile: &str,
    outcome: &'static str,
    sent_at: Instant,
    token: Result<(AccessToken, &'static str), FetchError>,
) -> Result<(), Duration> {
    let mut s = lock(&holder.status);
    s.fetching = false;
    match token {
        Ok((token, source)) => {
            tracing::info!(
                profile = %profile,
                outcome,
                fingerprint = %token.fingerprint,
                expires_in_s = token.lifetime.as_secs(),
                lifetime_from = source,
                elapsed_ms = sent_at.elapsed().as_millis() as u64,
                "token fetched"
            );
            let missing = not_granted(&holder.settings.scopes, token.scope.as_deref());
            if !missing.is_empty() {
                tracing::warn!(
                    profile = %profile,
                    missing = %missing.join(" "),
                    granted = token.scope.as_deref().unwrap_or(""),
                    "the token endpoint granted fewer scopes than asked: calls that need the missing ones will be refused (eGain: 403 with code 403-197)"
                );
            }
            s.failures_in_a_row = 0;
            s.last_error = None;
            s.last_refresh = Some(SystemTime::now());
            s.source = Some("endpoint");
            drop(s);
            holder.install(token);
            Ok(())
        }
        Err(e) => {
            s.failures_in_a_row += 1;
            let jitter = rand::thread_rng().gen_range(0.8..1.2);
            let delay = backoff(s.failures_in_a_row, e.retry_after(), jitter);
            s.next_attempt = Some(Instant::now() + delay);
            let still_valid = holder.usable().is_some();
            let retry_in_ms = delay.as_millis() as u64;
            match &e {
                FetchError::OAuth {
                    error,
                    description,
                    status,
                    ..
                } => tracing::error!(
                    profile = %profile,
                    outcome,
                    status,
                    error = %error,
                    error_description = description.as_deref().unwrap_or(""),
                    current_token_still_valid = still_valid,
                    failures = s.failures_in_a_row,
                    retry_in_ms,
                    "token endpoint refused the request"
                ),
                _ => tracing::warn!(
                    profile = %profile,
                    outcome,
                    error = %e,
                    current_token_still_valid = still_valid,
                    failures = s.failures_in_a_row,
                    retry_in_ms,
                    "token fetch failed"
                ),
            }
            s.last_error = Some(e);
            drop(s);
            // Waiters re-check: they answer 503 now rather than sit out the backoff.
            holder.changed.notify_waiters();
            Err(delay)
        }
    }
}

/// The scopes asked for that a token response's `scope` (RFC 6749 §5.1: present when it
/// differs from the request) does not list. A scope counts as granted under its full name
/// or its last path segment (an endpoint may answer `knowledge.portalmgr.manage` to a
/// request for `https://api.ai.egain.cloud/auth/knowledge.portalmgr.manage`).
fn not_granted<'a>(asked: &'a [String], granted: Option<&str>) -> Vec<&'a str> {
    let Some(granted) = granted else {
        return Vec::new();
    };
    fn last(s: &str) -> &str {
        s.rsplit('/').next().unwrap_or(s)
    }
    let granted: Vec<&str> = granted.split_whitespace().collect();
    asked
        .iter()
        .map(String::as_str)
        .filter(|a| !granted.iter().any(|g| g == a || last(g) == last(a)))
        .collect()
}

/// One token request in the status (`fetch_count`, `recent_fetches`) and in
/// `egain_proxy_token_fetches_total`, under one outcome, which it returns.
fn record_fetch(
    holder: &TokenHolder,
    sent_at: Instant,
    result: Result<(), &FetchError>,
) -> &'static str {
    let outcome = match result {
        Ok(()) => "success",
        Err(e) => e.outcome(),
    };
    count_fetch(holder, outcome);
    let mut s = lock(&holder.status);
    s.fetch_count += 1;
    if s.recent.len() == super::RECENT_FETCHES {
        s.recent.pop_front();
    }
    s.recent.push_back(super::FetchRecord {
        at: SystemTime::now(),
        outcome,
        duration: sent_at.elapsed(),
        oauth_error: result
            .err()
            .and_then(|e| e.oauth_error())
            .map(str::to_owned),
        error: result.err().map(|e| e.to_string()),
    });
    outcome
}

/// One token request in `egain_proxy_token_fetches_total`, for every profile of the holder.
fn count_fetch(holder: &TokenHolder, outcome: &'static str) {
    for name in holder.profile_names().iter() {
        holder
            .metrics
            .token_fetches
            .get_or_create(&FetchLabels {
                profile: name.clone(),
                outcome,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_not_granted() {
        let asked = vec![
            "https://api.ai.egain.cloud/auth/knowledge.portalmgr.manage".to_owned(),
            "https://api.ai.egain.cloud/auth/core.user.read".to_owned(),
        ];
        assert!(not_granted(&asked, None).is_empty());
        assert!(not_granted(&asked, Some(&asked.join(" "))).is_empty());
        assert!(not_granted(&asked, Some("core.user.read knowledge.portalmgr.manage")).is_empty());
        assert_eq!(
            not_granted(&asked, Some("knowledge.portalmgr.manage")),
            [asked[1].as_str()]
        );
    }

    #[test]
    fn backoff_doubles_caps_and_honours_retry_after() {
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(backoff(1, None, 1.0)), 250);
        assert_eq!(ms(backoff(2, None, 1.0)), 500);
        assert_eq!(ms(backoff(3, None, 1.0)), 1000);
        assert_eq!(ms(backoff(8, None, 1.0)), 30_000);
        assert_eq!(ms(backoff(100, None, 1.19)), 30_000);
        assert_eq!(ms(backoff(1, None, 0.8)), 200);
        assert_eq!(
            backoff(1, Some(Duration::from_secs(3)), 1.0),
            Duration::from_secs(3)
        );
        assert_eq!(
            backoff(9, Some(Duration::from_secs(3)), 1.0),
            Duration::from_secs(30)
        );
    }
}
