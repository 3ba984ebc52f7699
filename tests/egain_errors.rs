//! eGain's own errors (contract §14): a 403 with `403-197` (scope not assigned) passes through
//! untouched, is never replayed, is counted per route and profile and warned about once; a
//! 429 passes through with `Retry-After` and `X-RateLimit-*`. On every inbound transport.

mod support;

use std::time::Duration;

use support::binary::Running;
use support::transport::On;
use support::*;

const SCOPE_ERROR: &str = r#"{"code":"403-197","developerMessage":"The scope required for this API is not assigned to the client application."}"#;

fn scope_upstream_reply(seen: &Seen) -> http::Response<egain_proxy::ProxyBody> {
    if seen.target.starts_with("/other") {
        json_response(
            403,
            r#"{"code":"403-100","developerMessage":"forbidden"}"#,
            &[],
        )
    } else {
        json_response(403, SCOPE_ERROR, &[("x-egain-trace", "t-1".into())])
    }
}

fn scope_errors(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "egain_proxy_upstream_scope_errors_total{route=\"r\",profile=\"portal\"} ",
            )
        })
        .and_then(|v| v.parse().ok())
        .expect("no scope error series")
}

async fn scope_error_passes_through_untouched_and_is_counted(on: On) {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::with(scope_upstream_reply).await;
    let proxy = on.proxy_for(&tokens, &upstream, "", "").await;
    proxy.ready().await;
    let client = on.client();
    assert_eq!(scope_errors(&proxy.metrics_text().await), 0.0);
    for _ in 0..2 {
        let r = client
            .get(on.url(&proxy, "/knowledge/contentmgr/v4/articles"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()["x-egain-trace"], "t-1");
        assert_eq!(r.text().await.unwrap(), SCOPE_ERROR);
    }
    // Another 403 code is passed through and not counted.
    assert_eq!(status(client.get(on.url(&proxy, "/other"))).await, 403);
    assert_eq!(scope_errors(&proxy.metrics_text().await), 2.0);
    // Never replayed, and the token was not thrown away.
    assert_eq!(upstream.seen().len(), 3);
    assert_eq!(tokens.count(), 1);
}

async fn rate_limited_answers_pass_with_their_headers(on: On) {
    use egain_proxy::mock::{MockEgain, MockOptions};
    let mock = MockEgain::start(
        ([127, 0, 0, 1], 0).into(),
        MockOptions {
            rate_limit_per_minute: Some(2),
            ..MockOptions::default()
        },
    )
    .await
    .unwrap();
    let config = egain_proxy::demo::config_text(&mock, 0);
    // The demo's own [server] and [admin] give way to the transport's.
    let config = &config[config.find("[log]").unwrap()..];
    let proxy = on.proxy(config).await;
    proxy.ready().await;
    let client = on.client();
    let url = on.url(&proxy, "/knowledge/portalmgr/v4/portals");
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(client.get(&url).send().await.unwrap());
    }
    assert_eq!(answers[0].status(), 200);
    assert_eq!(answers[1].headers()["x-ratelimit-remaining"], "0");
    let limited = answers.pop().unwrap();
    // The minute may turn between requests; then the third is the first of a new minute.
    if limited.status() == 200 {
        return;
    }
    assert_eq!(limited.status(), 429);
    let h = limited.headers();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(h["x-ratelimit-limit"], "2");
    assert_eq!(h["x-ratelimit-remaining"], "0");
    assert!(h["x-ratelimit-reset"].to_str().unwrap().ends_with('Z'));
    assert!(limited.text().await.unwrap().contains("\"429\""));
    // A 429 is not a token problem: one token request in all.
    assert_eq!(
        mock.token_requests(),
        2,
        "one per profile of the demo config"
    );
}

on_every_transport!(
    scope_error_passes_through_untouched_and_is_counted,
    rate_limited_answers_pass_with_their_headers
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_warning_per_route_and_profile_naming_profile_scopes_and_code() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::with(scope_upstream_reply).await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n{}{}{}",
        client_app_profile("portal", &tokens, ""),
        route("r", "/a", &upstream.url(), "portal", ""),
        route("s", "/b", &upstream.url(), "portal", ""),
    );
    let running = Running::start(&config, &[]);
    let addr = running.addr("proxy listening").await;
    let admin = running.addr("admin listening").await;
    eventually(Duration::from_secs(10), || tokens.count() == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = admin;
    for path in ["/a/1", "/a/2", "/a/3", "/b/1", "/b/2"] {
        assert_eq!(
            status(client().get(format!("http://{addr}{path}"))).await,
            403
        );
    }
    running.wait_for_log("\"route\":\"s\"").await;
    let warnings: Vec<serde_json::Value> = running
        .logs()
        .iter()
        .filter(|l| l.contains("scope this API needs"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(warnings.len(), 2, "one per route: {warnings:?}");
    for w in &warnings {
        assert_eq!(w["level"], "WARN");
        assert_eq!(w["profile"], "portal");
        assert_eq!(w["scopes"], "knowledge.portalmgr.manage");
        assert_eq!(w["code"], "403-197");
    }
}
