//! `[token_cache]`: replicas share tokens through a real redis-server (started by the test on
//! an ephemeral loopback port). Replicas are separate in-process proxies with their own
//! holders, refreshers and Redis connections; they share nothing but Redis.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::redis_server::RedisServer;
use support::*;

const PREFIX: &str = "egain-proxy-test";

struct Scene {
    redis: RedisServer,
    tokens: TokenServer,
    upstream: Upstream,
    key_dir: tempfile::TempDir,
}

impl Scene {
    async fn new(ttl: u64) -> Scene {
        let redis = RedisServer::start();
        let tokens = TokenServer::healthy(ttl).await;
        let t = tokens.clone();
        // The upstream accepts only live tokens of the token server, like eGain.
        let upstream = Upstream::with(move |seen| {
            if t.is_live(seen.header("authorization")) {
                json_response(200, r#"{"ok":true}"#, &[])
            } else {
                json_response(
                    401,
                    r#"{"code":"401-104","developerMessage":"invalid token"}"#,
                    &[],
                )
            }
        })
        .await;
        let key_dir = tempfile::tempdir().unwrap();
        std::fs::write(key_dir.path().join("cache-key"), [42u8; 32]).unwrap();
        Scene {
            redis,
            tokens,
            upstream,
            key_dir,
        }
    }

    fn config(&self, scopes: &str) -> String {
        format!(
            "{HEAD}{}{}[token_cache]\nredis = \"{}\"\nkey_prefix = \"{PREFIX}\"\nencryption_key_file = \"{}\"\n",
            client_app_profile("portal", &self.tokens, &format!("scopes = [{scopes}]"))
                .replace("scopes = [\"knowledge.portalmgr.manage\"]\n", ""),
            route("r", "/", &self.upstream.url(), "portal", ""),
            self.redis.url(),
            self.key_dir.path().join("cache-key").display(),
        )
    }

    async fn replicas(&self, n: usize) -> Vec<TestProxy> {
        let config = self.config("\"knowledge.portalmgr.manage\"");
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(TestProxy::start(&config).await);
        }
        for p in &out {
            p.ready().await;
        }
        out
    }
}

fn bearer(proxy: &TestProxy) -> Option<String> {
    proxy
        .shared
        .load()
        .tokens
        .get("portal")
        .and_then(|h| h.current())
        .and_then(|t| t.header.to_str().ok().map(str::to_owned))
}

async fn cache_status(proxy: &TestProxy) -> serde_json::Value {
    proxy.status_json().await["token_cache"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_token_and_redis_reveals_nothing() {
    let scene = Scene::new(3600).await;
    let replicas = scene.replicas(3).await;
    let client = client();
    for p in &replicas {
        for _ in 0..5 {
            assert_eq!(status(client.get(p.url("/x"))).await, 200);
        }
    }
    assert_eq!(
        scene.tokens.count(),
        1,
        "three replicas asked for more than one token"
    );
    let sent: std::collections::HashSet<_> = scene
        .upstream
        .seen()
        .iter()
        .filter_map(|s| s.header("authorization").map(str::to_owned))
        .collect();
    assert_eq!(sent.len(), 1, "replicas sent different tokens: {sent:?}");

    // What Redis holds: one token key (the lock was released), opaque, expiring with the token.
    let entries = scene.redis.dump(PREFIX);
    assert_eq!(
        entries.len(),
        1,
        "{:?}",
        entries.iter().map(|e| &e.0).collect::<Vec<_>>()
    );
    let (key, value) = &entries[0];
    assert!(key.starts_with(&format!("{PREFIX}:token:")), "{key}");
    let token = sent
        .iter()
        .next()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_owned();
    let needles = [
        token.as_str(),
        "secret-portal",
        "id-portal",
        "knowledge.portalmgr",
    ];
    for needle in needles {
        assert!(!key.contains(needle), "the key reveals {needle}");
        assert!(
            !value.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the value reveals {needle}"
        );
    }
    let ttl = scene.redis.pttl(key);
    assert!((3_500_000..=3_600_000).contains(&ttl), "Redis TTL {ttl} ms");

    // Operators see the cache, and which replicas took the token rather than fetching.
    let cache = cache_status(&replicas[0]).await;
    assert_eq!(cache["state"], "up");
    assert_eq!(cache["key_prefix"], PREFIX);
    let sources: Vec<String> = {
        let mut v = Vec::new();
        for p in &replicas {
            v.push(
                p.status_json().await["profiles"]["portal"]["token_source"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        v
    };
    assert_eq!(
        sources.iter().filter(|s| *s == "endpoint").count(),
        1,
        "{sources:?}"
    );
    assert_eq!(
        sources.iter().filter(|s| *s == "cache").count(),
        2,
        "{sources:?}"
    );
    // The hits counter reads 0 on the replica that fetched (not nothing), 1 on the others.
    let mut hits = Vec::new();
    for p in &replicas {
        let metrics = p.metrics_text().await;
        let line = metrics
            .lines()
            .find_map(|l| l.strip_prefix("egain_proxy_token_cache_hits_total{profile=\"portal\"} "))
            .map(str::to_owned);
        hits.push(line);
    }
    hits.sort();
    assert_eq!(hits, [Some("0".into()), Some("1".into()), Some("1".into())]);
    for p in replicas {
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_tokens_refresh_once_per_lifetime_across_replicas() {
    let scene = Scene::new(3).await;
    let replicas = Arc::new(scene.replicas(3).await);
    let failures = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let run_for = Duration::from_secs(20);
    let mut tasks = Vec::new();
    for i in 0..3 {
        let replicas = Arc::clone(&replicas);
        let (failures, sent) = (Arc::clone(&failures), Arc::clone(&sent));
        tasks.push(tokio::spawn(async move {
            let client = client();
            while started.elapsed() < run_for {
                let s = status(client.get(replicas[i].url("/x"))).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if s != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "of {}",
        sent.load(Ordering::Relaxed)
    );
    // One refresh per 2.4 s (80% of 3 s) over 20 s is 9; three replicas on their own
    // would make about 27.
    let count = scene.tokens.count();
    assert!(
        (7..=11).contains(&count),
        "{count} token requests in 20 s for 3 replicas"
    );
    drop(replicas);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_is_purged_once_and_every_replica_takes_the_next() {
    let scene = Scene::new(3600).await;
    let replicas = scene.replicas(3).await;
    let client = client();
    assert_eq!(scene.tokens.count(), 1);
    let before = bearer(&replicas[0]);
    // eGain forgets every token: the next call through each replica gets a 401.
    scene.tokens.revoke_all();
    for p in &replicas {
        assert_eq!(status(client.get(p.url("/after-revoke"))).await, 200);
    }
    assert_eq!(
        scene.tokens.count(),
        2,
        "one replica fetches the next token; the others take it from Redis"
    );
    let after: Vec<_> = replicas.iter().map(bearer).collect();
    assert!(
        after.iter().all(|t| *t == after[0] && *t != before),
        "{after:?}"
    );
    // The token in Redis is the new one (the purge did not delete it).
    assert_eq!(scene.redis.dump(&format!("{PREFIX}:token:")).len(), 1);
    for p in replicas {
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_run_every_request_still_answers() {
    let mut scene = Scene::new(3).await;
    let replicas = Arc::new(scene.replicas(2).await);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..2 {
        let (replicas, stop, failures) = (
            Arc::clone(&replicas),
            Arc::clone(&stop),
            Arc::clone(&failures),
        );
        tasks.push(tokio::spawn(async move {
            let client = client();
            while !stop.load(Ordering::Relaxed) {
                if status(client.get(replicas[i].url("/x"))).await != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| scene.redis.kill());
    // Two refresh points pass with Redis gone: each replica fetches for itself.
    let during = scene.tokens.count();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        scene.tokens.count() > during,
        "no refresh while Redis was down"
    );
    assert_eq!(cache_status(&replicas[0]).await["state"], "down");
    let metrics = replicas[0].metrics_text().await;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("egain_proxy_token_cache_errors_total{op=\"") && !l.ends_with(" 0")
        ),
        "no cache error counted"
    );
    tokio::task::block_in_place(|| scene.redis.restart());
    // Sharing resumes: the replicas converge on one token again, and the cache reads "up".
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (a, b) = (bearer(&replicas[0]), bearer(&replicas[1]));
        let up = cache_status(&replicas[0]).await["state"] == "up"
            && cache_status(&replicas[1]).await["state"] == "up";
        if a == b && up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not share again after Redis returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed while Redis was away"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_differing_only_in_scopes_never_share() {
    let scene = Scene::new(3600).await;
    let a = TestProxy::start(&scene.config("\"knowledge.portalmgr.manage\"")).await;
    a.ready().await;
    let b = TestProxy::start(&scene.config("\"knowledge.portalmgr.read\"")).await;
    b.ready().await;
    assert_eq!(scene.tokens.count(), 2);
    let scopes: Vec<_> = scene
        .tokens
        .requests()
        .iter()
        .map(|r| r.form().get("scope").cloned().unwrap_or_default())
        .collect();
    assert_ne!(scopes[0], scopes[1]);
    assert_ne!(bearer(&a), bearer(&b));
    assert_eq!(scene.redis.dump(&format!("{PREFIX}:token:")).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_redis_is_a_counted_miss_and_gets_overwritten() {
    let scene = Scene::new(3600).await;
    let first = scene.replicas(1).await;
    let (key, _) = scene.redis.dump(PREFIX).pop().unwrap();
    for garbage in [&b"not a token"[..], &[1u8; 40][..], b""] {
        scene.redis.set(&key, garbage);
        let next = TestProxy::start(&scene.config("\"knowledge.portalmgr.manage\"")).await;
        next.ready().await;
        assert_eq!(status(client().get(next.url("/x"))).await, 200);
        let metrics = next.metrics_text().await;
        let decode_errors: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("egain_proxy_token_cache_errors_total{op=\"decode\"} "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(
            decode_errors >= 1.0,
            "{garbage:?}: the bad value was not counted"
        );
        // The replica's own token replaced the garbage.
        let (_, value) = scene.redis.dump(PREFIX).pop().unwrap();
        assert_ne!(value, garbage);
        next.stop().await;
    }
    assert_eq!(scene.tokens.count(), 4);
    drop(first);
}

/// A Redis password as generators make them (base64 has `/` and `+`, others `#`, `?`, `@`),
/// written in the URL as it is, through `${VAR}`: the replicas sign in and share, and the
/// password shows nowhere — not in `check`'s errors, `/status` or a failed reload's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_password_with_url_characters_is_used_as_written_and_never_shown() {
    const PASSWORD: &str = "Zq8/Kx+3W#m?@==";
    let scene = Scene::new(3600).await;
    scene
        .redis
        .command(&["CONFIG", "SET", "requirepass", PASSWORD]);
    let with_password = |url: &str| {
        scene.config("\"knowledge.portalmgr.manage\"").replace(
            &scene.redis.url(),
            &url.replace("redis://", &format!("redis://:{PASSWORD}@")),
        )
    };
    let config = with_password(&scene.redis.url());
    let replicas = [
        TestProxy::start(&config).await,
        TestProxy::start(&config).await,
    ];
    let client = client();
    for p in &replicas {
        p.ready().await;
        assert_eq!(status(client.get(p.url("/x"))).await, 200);
    }
    assert_eq!(scene.tokens.count(), 1, "the replicas did not share");
    for p in &replicas {
        let cache = cache_status(p).await;
        assert_eq!(cache["state"], "up", "{cache}");
        let text = cache.to_string();
        assert!(!text.contains("Zq8") && !text.contains("3W"), "{text}");
    }
    // A URL that does not parse (port out of range): named, the password hidden.
    let broken = with_password("redis://127.0.0.1:99999/0");
    let err = egain_proxy::Config::parse(&broken, std::path::Path::new("."), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("token_cache.redis"), "{err}");
    for fragment in ["Zq8", "Kx+", "3W"] {
        assert!(!err.contains(fragment), "{err}");
    }
    for p in replicas {
        p.stop().await;
    }
}

#[test]
fn the_table_is_checked_with_key_paths_and_no_secrets_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, [1u8; 32]).unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, "c2hvcnQ=").unwrap();
    let parse = |table: &str| {
        let text = format!(
            "[profiles.p]\nkind = \"client_app\"\ntoken_url = \"https://a.example/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n[token_cache]\n{table}"
        );
        egain_proxy::Config::parse(&text, dir.path(), &|_| None).map_err(|e| e.to_string())
    };
    let k = key.display();
    let ok = parse(&format!(
        "redis = \"redis://:hunter2@127.0.0.1:6379/0\"\nencryption_key_file = \"{k}\"\n"
    ))
    .unwrap();
    let c = ok.token_cache.unwrap();
    assert_eq!(c.key_prefix, "egain-proxy");
    assert_eq!(c.timeout, Duration::from_millis(250));
    assert_eq!(c.redacted_url(), "redis://:***@127.0.0.1:6379/0");
    assert!(!format!("{c:?}").contains("hunter2"));

    let err = parse(&format!(
        "redis = \"http://u:hunter2@h\"\nencryption_key_file = \"{k}\"\n"
    ))
    .unwrap_err();
    assert!(
        err.contains("token_cache.redis") && !err.contains("hunter2"),
        "{err}"
    );
    let err = parse(&format!(
        "redis = \"redis://h\"\nencryption_key_file = \"{}\"\n",
        short.display()
    ))
    .unwrap_err();
    assert!(
        err.contains("token_cache.encryption_key_file") && err.contains("32"),
        "{err}"
    );
    let err = parse("redis = \"redis://h\"\nencryption_key_file = \"missing\"\n").unwrap_err();
    assert!(err.contains("cannot read"), "{err}");
    let err = parse(&format!(
        "redis = \"redis://h\"\nencryption_key_file = \"{k}\"\nkey_prefix = \"a b\"\n"
    ))
    .unwrap_err();
    assert!(err.contains("token_cache.key_prefix"), "{err}");
    let err = parse(&format!(
        "redis = \"redis://h\"\nencryption_key_file = \"{k}\"\ntimeout = \"0s\"\n"
    ))
    .unwrap_err();
    assert!(err.contains("token_cache.timeout"), "{err}");
    let err = parse(&format!(
        "redis = \"redis://h\"\nencryption_key_file = \"{k}\"\nttl = \"1s\"\n"
    ))
    .unwrap_err();
    assert!(err.contains("ttl"), "{err}");
}

/// A Redis that hangs, with a `timeout` of 3 s: a replica starting now waits out one
/// operation, fetches its own token and serves within a request's wait for a token (5 s);
/// the token is installed before it is written to Redis, and a Redis that just failed is
/// not asked again for the next few seconds (the 401 that follows costs no timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_a_refresh_one_timeout() {
    let scene = Scene::new(3600).await;
    let config = scene
        .config("\"knowledge.portalmgr.manage\"")
        .replace("[token_cache]\n", "[token_cache]\ntimeout = \"3s\"\n");
    let port = scene.redis.port;
    let stall = std::thread::spawn(move || {
        let c = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
        let mut c = c.get_connection().unwrap();
        let _: redis::RedisResult<redis::Value> =
            redis::cmd("DEBUG").arg("SLEEP").arg("9").query(&mut c);
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let proxy = TestProxy::start(&config).await;
    let client = client();
    assert_eq!(status(client.get(proxy.url("/x"))).await, 200);
    let first = started.elapsed();
    assert!(
        first < Duration::from_secs(4),
        "first answer after {first:?}"
    );
    // A revoked token: the refresh skips the cache that just failed.
    scene.tokens.revoke_all();
    let started = Instant::now();
    assert_eq!(status(client.get(proxy.url("/x"))).await, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the 401's refresh waited {:?}",
        started.elapsed()
    );
    assert_eq!(scene.tokens.count(), 2);
    assert_eq!(cache_status(&proxy).await["state"], "down");
    tokio::task::spawn_blocking(move || stall.join().unwrap())
        .await
        .unwrap();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_lock_expires_and_only_its_owner_releases_it() {
    use egain_proxy::token::cache::{Coordination, TokenCache, Trip};
    let scene = Scene::new(3600).await;
    let config =
        egain_proxy::Config::parse(&scene.config("\"a\""), std::path::Path::new("."), &|_| None)
            .unwrap();
    let settings = config.profiles["portal"].token.clone();
    let cache_config = config.token_cache.unwrap();
    let metrics = Arc::new(egain_proxy::metrics::Metrics::new());
    let a = TokenCache::new(cache_config.clone(), Arc::clone(&metrics)).unwrap();
    let b = TokenCache::new(cache_config, metrics).unwrap();
    let (_, lock_key) = a.keys(&settings);
    assert_eq!(
        lock_key,
        b.keys(&settings).1,
        "same settings, same key on every replica"
    );
    let trip = &mut Trip::default();
    assert!(matches!(
        a.coordinate(&settings, None, trip).await,
        Coordination::Fetch { locked: true }
    ));
    let held = |redis: &RedisServer| redis.dump(&lock_key).len() == 1;
    assert!(held(&scene.redis));
    // The lock expires on its own if its owner dies: the endpoint timeout plus 2 s.
    let ttl = scene.redis.pttl(&lock_key);
    let limit = (settings.timeout + Duration::from_secs(2)).as_millis() as i64;
    assert!(ttl > 0 && ttl <= limit, "lock TTL {ttl} ms");
    // Another replica waits for the holder's token, but not for as long as a request waits
    // for a token (5 s): a holder that froze or died mid-fetch costs time, not an error.
    let started = Instant::now();
    assert!(matches!(
        b.coordinate(&settings, None, trip).await,
        Coordination::Fetch { locked: false }
    ));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(3),
        "waited {waited:?} for the lock holder"
    );
    // Another replica's release leaves it alone; the owner's removes it.
    b.unlock(&settings, trip).await;
    assert!(
        held(&scene.redis),
        "a replica released a lock it does not own"
    );
    a.unlock(&settings, trip).await;
    assert!(!held(&scene.redis));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_is_reloadable() {
    let scene = Scene::new(3600).await;
    let with_cache = scene.config("\"knowledge.portalmgr.manage\"");
    let without = with_cache[..with_cache.find("[token_cache]").unwrap()].to_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, &without).unwrap();
    let config = egain_proxy::Config::load(&path).unwrap();
    let proxy = TestProxy::start_config(config, Some(path.clone())).await;
    proxy.ready().await;
    let client = client();
    assert_eq!(cache_status(&proxy).await, serde_json::Value::Null);

    std::fs::write(&path, &with_cache).unwrap();
    assert_eq!(status(client.post(proxy.admin_url("/reload"))).await, 200);
    assert_eq!(cache_status(&proxy).await["redis"], scene.redis.url());
    assert_eq!(scene.tokens.count(), 1, "the reload kept the token");
    // The next token goes through Redis.
    scene.tokens.revoke_all();
    assert_eq!(status(client.get(proxy.url("/x"))).await, 200);
    assert_eq!(scene.redis.dump(&format!("{PREFIX}:token:")).len(), 1);
    assert_eq!(cache_status(&proxy).await["state"], "up");

    // And back off: the cache is no longer used.
    std::fs::write(&path, &without).unwrap();
    assert_eq!(status(client.post(proxy.admin_url("/reload"))).await, 200);
    assert_eq!(cache_status(&proxy).await, serde_json::Value::Null);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_full_redis_means_fetching_alone_and_serving() {
    let scene = Scene::new(3600).await;
    let replicas = scene.replicas(1).await;
    let proxy = &replicas[0];
    let client = client();
    assert_eq!(scene.tokens.count(), 1);

    // Slow: Redis stalls for 2 s; every operation gives up after 250 ms.
    let port = scene.redis.port;
    let stall = std::thread::spawn(move || {
        let c = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
        let mut c = c.get_connection().unwrap();
        let _: redis::RedisResult<redis::Value> =
            redis::cmd("DEBUG").arg("SLEEP").arg("2").query(&mut c);
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    scene.tokens.revoke_all();
    let started = Instant::now();
    assert_eq!(status(client.get(proxy.url("/x"))).await, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited for the stalled Redis"
    );
    assert_eq!(scene.tokens.count(), 2);
    assert_eq!(cache_status(proxy).await["state"], "down");
    tokio::task::spawn_blocking(move || stall.join().unwrap())
        .await
        .unwrap();

    // Full: writes are refused (OOM); a replica starting now fetches its own token, keeps
    // it, and serves.
    scene.redis.command(&["FLUSHALL"]);
    scene.redis.command(&["CONFIG", "SET", "maxmemory", "1"]);
    scene
        .redis
        .command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let late = scene.replicas(1).await.pop().unwrap();
    assert_eq!(status(client.get(late.url("/x"))).await, 200);
    assert_eq!(scene.tokens.count(), 3);
    let metrics = late.metrics_text().await;
    let set_errors = metrics
        .lines()
        .filter(|l| {
            l.starts_with("egain_proxy_token_cache_errors_total{op=\"lock\"}")
                || l.starts_with("egain_proxy_token_cache_errors_total{op=\"set\"}")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(
        set_errors >= 1.0,
        "the refused write was not counted:\n{metrics}"
    );
    assert!(scene.redis.dump(PREFIX).is_empty());
}

/// `rediss://` to a Redis whose certificate comes from a private CA: with `ca_file` the
/// replicas share through TLS; without it the certificate is refused (nothing shared, every
/// request still served); `#insecure`, which would skip the check, is refused by `check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_needs_its_ca_file() {
    let ca = support::tls::TestCa::new();
    let mut scene = Scene::new(3600).await;
    scene.redis = RedisServer::start_tls(&ca);
    let plain_url = scene.redis.url();
    let base = scene
        .config("\"knowledge.portalmgr.manage\"")
        .replace(&scene.redis.url(), &scene.redis.tls_url());
    let trusted = base.replace(
        "[token_cache]\n",
        &format!("[token_cache]\nca_file = \"{}\"\n", ca.ca_file()),
    );
    let client = client();

    let replicas = [
        TestProxy::start(&trusted).await,
        TestProxy::start(&trusted).await,
    ];
    for p in &replicas {
        p.ready().await;
        assert_eq!(status(client.get(p.url("/x"))).await, 200);
    }
    assert_eq!(
        scene.tokens.count(),
        1,
        "the replicas did not share over TLS"
    );
    assert_eq!(cache_status(&replicas[0]).await["state"], "up");
    for p in replicas {
        p.stop().await;
    }

    // The system's roots do not know the private CA: no sharing, still serving.
    let untrusted = TestProxy::start(&base).await;
    untrusted.ready().await;
    assert_eq!(status(client.get(untrusted.url("/x"))).await, 200);
    assert_eq!(scene.tokens.count(), 2);
    let cache = cache_status(&untrusted).await;
    assert_eq!(cache["state"], "down", "{cache}");
    untrusted.stop().await;

    let parse = |text: &str| {
        egain_proxy::Config::parse(text, std::path::Path::new("."), &|_| None)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let insecure = base.replace(
        &scene.redis.tls_url(),
        &format!("{}#insecure", scene.redis.tls_url()),
    );
    let e = parse(&insecure).unwrap_err();
    assert!(
        e.contains("token_cache.redis") && e.contains("ca_file"),
        "{e}"
    );
    let plain_with_ca = trusted.replace(&scene.redis.tls_url(), &plain_url);
    let e = parse(&plain_with_ca).unwrap_err();
    assert!(e.contains("token_cache.ca_file"), "{e}");
}
