//! Tokens under failure: every token request is counted and timestamped by a scripted server.

mod support;

use std::time::{Duration, Instant};

use support::transport::On;
use support::*;

fn raw(status: u16, body: &str) -> Reply {
    Reply::Raw {
        status,
        headers: vec![],
        body: body.to_owned(),
    }
}

/// An upstream that accepts only live tokens from `tokens`, answering like eGain otherwise.
async fn checking_upstream(tokens: &TokenServer) -> Upstream {
    let tokens = tokens.clone();
    Upstream::with(move |seen| {
        if tokens.is_live(seen.header("authorization")) {
            json_response(200, r#"{"ok":true}"#, &[])
        } else {
            json_response(401, r#"{"code":"401-101","developerMessage":"The access token is invalid or has expired."}"#, &[])
        }
    })
    .await
}

async fn error_body(response: reqwest::Response) -> serde_json::Value {
    response.json().await.unwrap()
}

fn gaps(tokens: &TokenServer) -> Vec<Duration> {
    let r = tokens.requests();
    r.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[tokio::test]
async fn token_endpoint_down_at_start_then_recovers_without_restart() {
    let tokens = TokenServer::start(|_| raw(503, "down")).await;
    let upstream = checking_upstream(&tokens).await;
    let proxy = proxy_for(&tokens, &upstream, "", "").await;

    let readyz = client()
        .get(proxy.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    let asked = Instant::now();
    let r = client().get(proxy.url("/a")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    // It waited for one failed attempt, not the whole 5 s.
    assert!(
        asked.elapsed() < Duration::from_millis(4500),
        "{:?}",
        asked.elapsed()
    );
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body = error_body(r).await;
    assert_eq!(body["error"], "token_unavailable");
    assert!(
        body["message"].as_str().unwrap().contains("portal"),
        "{body}"
    );
    assert!(
        upstream.seen().is_empty(),
        "a request was forwarded without a token"
    );

    tokens.set_behaviour(|_| Reply::Token { ttl: Some(3600) });
    proxy.ready().await;
    let r = client().get(proxy.url("/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(status(client().get(proxy.admin_url("/readyz"))).await, 200);
}

#[tokio::test]
async fn failures_back_off_exponentially_with_jitter() {
    let tokens = TokenServer::start(|_| raw(500, "oops")).await;
    let upstream = Upstream::start().await;
    let _proxy = proxy_for(&tokens, &upstream, "", "").await;
    eventually(Duration::from_secs(10), || tokens.count() >= 5).await;
    let g = gaps(&tokens);
    // 250 ms doubling, each within [0.8, 1.2) of its nominal value (plus scheduling slack).
    for (i, nominal) in [250u64, 500, 1000, 2000].iter().enumerate() {
        let ms = g[i].as_millis() as u64;
        assert!(
            ms >= nominal * 8 / 10,
            "gap {i} = {ms} ms, nominal {nominal}: {g:?}"
        );
        assert!(
            ms <= nominal * 12 / 10 + 250,
            "gap {i} = {ms} ms, nominal {nominal}: {g:?}"
        );
    }
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let tokens = TokenServer::start(|n| {
        if n == 0 {
            Reply::Raw {
                status: 429,
                headers: vec![("retry-after", "2".into())],
                body: "slow down".into(),
            }
        } else {
            Reply::Token { ttl: Some(3600) }
        }
    })
    .await;
    let upstream = Upstream::start().await;
    let proxy = proxy_for(&tokens, &upstream, "", "").await;
    proxy.ready().await;
    let g = gaps(&tokens);
    assert_eq!(g.len(), 1);
    assert!(g[0] >= Duration::from_secs(2), "retried after {:?}", g[0]);
}

async fn oauth_errors_are_named_in_the_503(on: On) {
    let tokens = TokenServer::start(|_| {
        raw(
            401,
            r#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
        )
    })
    .await;
    let upstream = Upstream::start().await;
    let proxy = on.proxy_for(&tokens, &upstream, "", "").await;
    eventually(Duration::from_secs(5), || tokens.count() >= 1).await;
    let r = on.client().get(on.url(&proxy, "/a")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body = error_body(r).await;
    let message = body["message"].as_str().unwrap();
    // The README's form: the profile, then the token endpoint's words, the code once.
    assert_eq!(
        message,
        "no valid token for profile \"portal\": the token endpoint refused the request (HTTP 401): invalid_client (Client authentication failed)"
    );
    assert!(!message.contains("secret-portal"));
}

#[tokio::test]
async fn malformed_answers_are_retried_and_never_forwarded() {
    for (status, body, expect, outcome) in [
        (
            200,
            "<html><body>Sign in</body></html>",
            "HTML",
            "bad_response",
        ),
        (200, "{\"access_token\": ", "invalid JSON", "bad_response"),
        (
            200,
            r#"{"token_type":"Bearer","expires_in":60}"#,
            "without access_token",
            "bad_response",
        ),
        (
            200,
            r#"{"access_token":"line\nbreak","expires_in":60}"#,
            "cannot go in a header",
            "bad_response",
        ),
        (502, "bad gateway", "HTTP 502", "http_error"),
        // Throttling with an OAuth-style body is a failure to retry, not a refusal.
        (
            429,
            r#"{"error":"slow_down","error_description":"too many"}"#,
            "answered HTTP 429: slow_down (too many)",
            "http_error",
        ),
    ] {
        let tokens = TokenServer::start(move |_| raw(status, body)).await;
        let upstream = Upstream::start().await;
        let proxy = proxy_for(&tokens, &upstream, "", "").await;
        eventually(Duration::from_secs(5), || tokens.count() >= 2).await;
        let r = client().get(proxy.url("/a")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        let message = error_body(r).await["message"].as_str().unwrap().to_owned();
        assert!(message.contains(expect), "{expect}: {message}");
        assert!(upstream.seen().is_empty());
        // /status and the metrics name the same outcome, once per token request.
        let status = proxy.status_json().await;
        let fetches = status["profiles"]["portal"]["recent_fetches"]
            .as_array()
            .unwrap()
            .clone();
        assert!(!fetches.is_empty(), "{status}");
        assert!(
            fetches.iter().all(|f| f["outcome"] == outcome),
            "{expect}: {fetches:?}"
        );
        let metrics = proxy.metrics_text().await;
        let line =
            format!("egain_proxy_token_fetches_total{{profile=\"portal\",outcome=\"{outcome}\"}}");
        assert!(metrics.contains(&line), "{expect}: {metrics}");
        assert!(!metrics.contains("outcome=\"oauth_error\""), "{metrics}");
    }
}

#[tokio::test]
async fn token_request_timeout_and_refused_connections_are_retried() {
    let tokens = TokenServer::start(|_| Reply::Slow(Duration::from_secs(5))).await;
    let upstream = Upstream::start().await;
    let proxy = proxy_for(&tokens, &upstream, "timeout = \"200ms\"", "").await;
    eventually(Duration::from_secs(5), || tokens.count() >= 3).await;
    let r = client().get(proxy.url("/a")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(error_body(r).await["message"]
        .as_str()
        .unwrap()
        .contains("did not answer within 200ms"));

    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = format!(
        "{HEAD}[profiles.p]\nkind = \"client_app\"\ntoken_url = \"http://{dead}/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n{}",
        route("r", "/", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    let r = client().get(proxy.url("/a")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(error_body(r).await["message"]
        .as_str()
        .unwrap()
        .contains("cannot reach the token endpoint"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_used_while_valid_during_failures_and_never_after() {
    let tokens = TokenServer::start(|n| {
        if n == 0 {
            Reply::Token { ttl: Some(3) }
        } else {
            raw(500, "down")
        }
    })
    .await;
    let upstream = checking_upstream(&tokens).await;
    let proxy = proxy_for(&tokens, &upstream, "", "").await;
    proxy.ready().await;
    let started = Instant::now();
    let (mut ok, mut unavailable) = (0, 0);
    while started.elapsed() < Duration::from_millis(4500) {
        let r = client().get(proxy.url("/a")).send().await.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            503 => unavailable += 1,
            other => {
                panic!("unexpected {other}: a request reached the upstream with an expired token")
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok > 10, "the still-valid token was not used: ok={ok}");
    assert!(unavailable > 0, "the expired token must not be used");
    assert!(upstream
        .seen()
        .iter()
        .all(|s| s.header("authorization").is_some()));
    assert!(tokens.count() > 2, "refreshes were not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_traffic_refreshes_at_eighty_percent_without_storms_or_gaps() {
    let tokens = TokenServer::healthy(4).await;
    let upstream = checking_upstream(&tokens).await;
    let proxy = proxy_for(&tokens, &upstream, "", "").await;
    proxy.ready().await;
    let started = Instant::now();
    let client = client();
    while started.elapsed() < Duration::from_secs(20) {
        let r = client.get(proxy.url("/a")).send().await.unwrap();
        assert_eq!(r.status(), 200, "gap in service at {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let g = gaps(&tokens);
    assert!(
        (6..=7).contains(&g.len()),
        "{} token requests in 20 s: {g:?}",
        g.len() + 1
    );
    for gap in &g {
        assert!(
            *gap >= Duration::from_millis(3150) && *gap <= Duration::from_millis(3600),
            "{g:?}"
        );
    }
}

async fn revocation_is_recovered_with_one_token_request_and_replays(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = checking_upstream(&tokens).await;
    let proxy = on.proxy_for(&tokens, &upstream, "", "").await;
    proxy.ready().await;
    assert_eq!(status(on.client().get(on.url(&proxy, "/warm"))).await, 200);
    tokens.revoke_all();

    let client = on.client();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let client = client.clone();
        let url = on.url(&proxy, &format!("/r/{i}"));
        tasks.push(tokio::spawn(async move {
            status(client.post(url).body(format!("body-{i}"))).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let status = t.await.unwrap();
        assert_eq!(
            status,
            200,
            "/r/{i}: {:?}",
            upstream
                .seen()
                .iter()
                .filter(|s| s.target == format!("/r/{i}"))
                .count()
        );
    }
    assert_eq!(
        tokens.count(),
        2,
        "one fetch at start, exactly one after the revocation"
    );
    // Every replay carried its own body, byte for byte.
    let seen = upstream.seen();
    for i in 0..50 {
        let bodies: Vec<_> = seen
            .iter()
            .filter(|s| s.target == format!("/r/{i}"))
            .map(|s| s.body.clone())
            .collect();
        assert!(
            !bodies.is_empty() && bodies.iter().all(|b| b == format!("body-{i}").as_bytes()),
            "{i}: {bodies:?}"
        );
    }
}

async fn replay_sends_the_identical_body_and_large_bodies_pass_the_401_through(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = checking_upstream(&tokens).await;
    let proxy = on.proxy_for(&tokens, &upstream, "", "").await;
    proxy.ready().await;

    tokens.revoke_all();
    let body: Vec<u8> = (0..60 * 1024).map(|i| (i % 256) as u8).collect();
    let r = on
        .client()
        .put(on.url(&proxy, "/small"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body, body);
    assert_eq!(seen[1].body, body);
    assert_ne!(
        seen[0].header("authorization"),
        seen[1].header("authorization")
    );
    assert_eq!(tokens.count(), 2);

    // Over 64 KiB: the client gets the upstream's 401, untouched, and the token is renewed.
    // (Forced refreshes are rate-limited to one per 5 s.)
    tokio::time::sleep(Duration::from_millis(5100)).await;
    tokens.revoke_all();
    let big = vec![7u8; 100 * 1024];
    let r = on
        .client()
        .put(on.url(&proxy, "/big"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_body(r).await["code"], "401-101");
    eventually(Duration::from_secs(5), || tokens.count() == 3).await;
    assert_eq!(status(on.client().get(on.url(&proxy, "/after"))).await, 200);
}

#[tokio::test]
async fn an_upstream_that_always_answers_401_forces_at_most_one_refresh_per_5s() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::with(|_| json_response(401, r#"{"code":"401-101"}"#, &[])).await;
    let proxy = proxy_for(&tokens, &upstream, "", "").await;
    proxy.ready().await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(6000) {
        let r = client().get(proxy.url("/a")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Start-up fetch + at most one forced refresh in each 5 s window (two windows in 6 s).
    assert!(tokens.count() <= 3, "{} token requests", tokens.count());
    assert!(tokens.count() >= 2, "the first 401 must force a refresh");
}

#[tokio::test]
async fn profiles_with_identical_settings_share_one_token() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let profile = |name: &str| {
        format!(
            "[profiles.{name}]\nkind = \"client_app\"\ntoken_url = \"{}\"\nclient_id = \"same\"\nclient_secret = \"same\"\nscopes = [\"a\"]\n",
            tokens.url("/t")
        )
    };
    let config = format!(
        "{HEAD}{}{}{}{}",
        profile("one"),
        profile("two"),
        route("r1", "/one", &upstream.url(), "one", ""),
        route("r2", "/two", &upstream.url(), "two", "")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    client().get(proxy.url("/one")).send().await.unwrap();
    client().get(proxy.url("/two")).send().await.unwrap();
    assert_eq!(tokens.count(), 1);
    let seen = upstream.seen();
    assert_eq!(
        seen[0].header("authorization"),
        seen[1].header("authorization")
    );
}

#[tokio::test]
async fn basic_client_auth_extra_params_and_headers() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{HEAD}[profiles.p]\nkind = \"client_app\"\ntoken_url = \"{}\"\nclient_id = \"my id\"\nclient_secret = \"p@ss:word\"\nclient_auth = \"basic\"\nscopes = [\"s\"]\nextra_params = {{ audience = \"https://api\" }}\nextra_headers = {{ \"X-Tenant\" = \"T1\" }}\n{}",
        tokens.url("/t"),
        route("r", "/", &upstream.url(), "p", "")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    let r = &tokens.requests()[0];
    use base64::Engine;
    let header = r.headers["authorization"].to_str().unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(header.strip_prefix("Basic ").unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), "my+id:p%40ss%3Aword");
    let form = r.form();
    assert!(
        !form.contains_key("client_secret") && !form.contains_key("client_id"),
        "{form:?}"
    );
    assert_eq!(form["audience"], "https://api");
    assert_eq!(r.headers["x-tenant"], "T1");
}

#[tokio::test]
async fn missing_expires_in_uses_default_ttl() {
    let tokens = TokenServer::start(|_| Reply::Token { ttl: None }).await;
    let upstream = Upstream::start().await;
    let proxy = proxy_for(&tokens, &upstream, "default_ttl = \"2s\"", "").await;
    proxy.ready().await;
    // Refreshed at 80% of 2 s.
    eventually(Duration::from_secs(5), || tokens.count() >= 2).await;
    let g = gaps(&tokens);
    assert!(
        g[0] >= Duration::from_millis(1550) && g[0] <= Duration::from_millis(2000),
        "{g:?}"
    );
}

/// With `retry_on_401 = false` the upstream's 401 passes straight through: no replay, and
/// the token is not retired.
async fn without_retry_on_401_the_401_passes_through(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = checking_upstream(&tokens).await;
    let proxy = on
        .proxy_for(&tokens, &upstream, "", "retry_on_401 = false")
        .await;
    proxy.ready().await;
    tokens.revoke_all();
    let r = on
        .client()
        .post(on.url(&proxy, "/x"))
        .body("b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_body(r).await["code"], "401-101");
    assert_eq!(upstream.seen().len(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(tokens.count(), 1, "no forced refresh");
}

on_every_transport!(
    without_retry_on_401_the_401_passes_through,
    oauth_errors_are_named_in_the_503,
    revocation_is_recovered_with_one_token_request_and_replays,
    replay_sends_the_identical_body_and_large_bodies_pass_the_401_through,
);
