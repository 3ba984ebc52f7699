//! Operations: admin endpoints, metrics, reload (SIGHUP and POST /reload), graceful shutdown,
//! and logs. Signal tests run the real binary as a child process.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::binary::Running;
use support::*;

// ---------------------------------------------------------------------------------------------
// In-process

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_token_validity() {
    let tokens = TokenServer::start(|n| match n {
        0 => Reply::Raw {
            status: 503,
            headers: vec![],
            body: "down".into(),
        },
        1 => Reply::Token { ttl: Some(2) },
        _ => Reply::Raw {
            status: 500,
            headers: vec![],
            body: "down again".into(),
        },
    })
    .await;
    let upstream = Upstream::start().await;
    let proxy = proxy_for(&tokens, &upstream, "", "").await;
    let client = client();

    let r = client.get(proxy.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["not_ready"], serde_json::json!(["portal"]));

    proxy.ready().await;
    assert_eq!(status(client.get(proxy.admin_url("/readyz"))).await, 200);
    assert_eq!(
        client
            .get(proxy.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok"
    );

    // The 2 s token expires and cannot be refreshed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = status(client.get(proxy.admin_url("/readyz"))).await;
        if status == 503 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readyz stayed 200 after the token expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Minimal Prometheus text parser: (name, labels, value) per sample line.
fn parse_prometheus(text: &str) -> Vec<(String, String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n.to_owned(), l.trim_end_matches('}').to_owned()),
            None => (series.to_owned(), String::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        samples.push((name, labels, value));
    }
    samples
}

#[tokio::test]
async fn metrics_count_what_was_served() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{HEAD}{}{}",
        client_app_profile("portal", &tokens, ""),
        route("api", "/api", &upstream.url(), "portal", "")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    let client = client();
    for i in 0..7 {
        client
            .get(proxy.url(&format!("/api/{i}")))
            .send()
            .await
            .unwrap();
    }
    for _ in 0..3 {
        client.post(proxy.url("/nope")).send().await.unwrap();
    }
    let text = client
        .get(proxy.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = parse_prometheus(&text);
    let value = |name: &str, labels: &[&str]| -> f64 {
        samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|want| l.contains(want)))
            .map(|(_, _, v)| v)
            .sum()
    };
    assert_eq!(value("egain_proxy_requests_total", &[]), 10.0, "{text}");
    assert_eq!(
        value(
            "egain_proxy_requests_total",
            &["route=\"api\"", "method=\"GET\"", "status=\"200\""]
        ),
        7.0
    );
    assert_eq!(
        value(
            "egain_proxy_requests_total",
            &["route=\"none\"", "status=\"404\""]
        ),
        3.0
    );
    assert_eq!(
        value(
            "egain_proxy_request_duration_seconds_count",
            &["route=\"api\""]
        ),
        7.0
    );
    assert_eq!(
        value(
            "egain_proxy_token_fetches_total",
            &["profile=\"portal\"", "outcome=\"success\""]
        ),
        1.0
    );
    let expiry = value("egain_proxy_token_expiry_seconds", &["profile=\"portal\""]);
    assert!(expiry > 3500.0 && expiry <= 3600.0, "{expiry}");
    assert_eq!(value("egain_proxy_inflight_requests", &[]), 0.0);
    assert!(!text.contains("/api/"), "paths must not become labels");
    // Series with labels known from the config exist from the start, at 0, so alerts on
    // increase() fire on the first event.
    let present = |name: &str, labels: &[&str]| {
        samples
            .iter()
            .any(|(n, l, v)| n == name && labels.iter().all(|want| l.contains(want)) && *v == 0.0)
    };
    for (name, labels) in [
        (
            "egain_proxy_config_reloads_total",
            &["outcome=\"success\""][..],
        ),
        ("egain_proxy_config_reloads_total", &["outcome=\"error\""]),
        (
            "egain_proxy_token_forced_refreshes_total",
            &["profile=\"portal\""],
        ),
        ("egain_proxy_replays_total", &["route=\"api\""]),
        (
            "egain_proxy_upstream_errors_total",
            &["route=\"api\"", "kind=\"connect\""],
        ),
        (
            "egain_proxy_upstream_errors_total",
            &["route=\"api\"", "kind=\"timeout\""],
        ),
        (
            "egain_proxy_upstream_errors_total",
            &["route=\"api\"", "kind=\"protocol\""],
        ),
    ] {
        assert!(present(name, labels), "{name} {labels:?} at 0:\n{text}");
    }
}

#[tokio::test]
async fn status_lists_profiles_and_never_secrets_or_tokens() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{HEAD}{}{}{}",
        client_app_profile("portal", &tokens, ""),
        client_app_profile("unused", &tokens, "scopes = [\"other\"]")
            .replace("scopes = [\"knowledge.portalmgr.manage\"]\n", ""),
        route("r", "/", &upstream.url(), "portal", "")
    );
    let proxy = TestProxy::start(&config).await;
    proxy.ready().await;
    client().get(proxy.url("/x")).send().await.unwrap();
    let token = upstream
        .last()
        .header("authorization")
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_owned();
    let text = client()
        .get(proxy.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status["profiles"]["portal"]["state"], "valid");
    assert_eq!(status["profiles"]["portal"]["kind"], "client_app");
    assert_eq!(status["profiles"]["portal"]["fetch_count"], 1);
    assert!(
        status["profiles"]["portal"]["expires_in_seconds"]
            .as_f64()
            .unwrap()
            > 3000.0
    );
    assert!(status["profiles"]["portal"]["last_refresh"].is_string());
    assert!(status["profiles"]["unused"].is_object());
    assert_eq!(status["routes"][0]["name"], "r");
    assert_eq!(status["generation"], 1);
    assert!(!text.contains(&token), "token in /status");
    assert!(
        !text.contains("secret-portal") && !text.contains("secret-unused"),
        "secret in /status"
    );
}

/// A proxy started from `config` written to a file, so it can be reloaded.
async fn file_backed_proxy(config: &str) -> (TestProxy, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let loaded = egain_proxy::Config::load(&path).unwrap();
    let proxy = TestProxy::start_config(loaded, Some(path.clone())).await;
    (proxy, path, dir)
}

#[tokio::test]
async fn post_reload_swaps_routes_keeps_tokens_and_rejects_bad_files() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let base = format!(
        "{HEAD}{}{}",
        client_app_profile("portal", &tokens, ""),
        route("one", "/one", &upstream.url(), "portal", "")
    );
    let (proxy, path, _dir) = file_backed_proxy(&base).await;
    proxy.ready().await;
    let client = client();
    assert_eq!(status(client.get(proxy.url("/two"))).await, 404);

    std::fs::write(
        &path,
        format!(
            "{base}{}",
            route("two", "/two", &upstream.url(), "portal", "")
        ),
    )
    .unwrap();
    let r = client
        .post(proxy.admin_url("/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["generation"],
        2
    );
    assert_eq!(status(client.get(proxy.url("/two"))).await, 200);
    assert_eq!(
        tokens.count(),
        1,
        "an unchanged profile must keep its token"
    );

    std::fs::write(
        &path,
        format!("{base}\n[[routes]]\npath_prefix = \"/three\"\nupstreem = \"x\"\n"),
    )
    .unwrap();
    let r = client
        .post(proxy.admin_url("/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("routes[1].upstreem"),
        "{body}"
    );
    assert_eq!(
        status(client.get(proxy.url("/two"))).await,
        200,
        "old config must keep serving"
    );
    let state: serde_json::Value = client
        .get(proxy.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["generation"], 2);

    // A changed secret is a new token.
    std::fs::write(&path, base.replace("secret-portal", "rotated-secret")).unwrap();
    assert_eq!(status(client.post(proxy.admin_url("/reload"))).await, 200);
    eventually(Duration::from_secs(5), || tokens.count() == 2).await;
    assert_eq!(
        tokens.requests()[1].form()["client_secret"],
        "rotated-secret"
    );
    let metrics = client
        .get(proxy.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("egain_proxy_config_reloads_total{outcome=\"success\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("egain_proxy_config_reloads_total{outcome=\"error\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn watch_reloads_when_the_file_changes() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let base = format!(
        "{HEAD}{}{}",
        client_app_profile("portal", &tokens, ""),
        route("one", "/one", &upstream.url(), "portal", "")
    );
    let (proxy, path, _dir) = file_backed_proxy(&base).await;
    egain_proxy::spawn_file_watcher(
        std::sync::Arc::clone(&proxy.shared),
        Duration::from_millis(50),
    );
    proxy.ready().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(
        &path,
        format!(
            "{base}{}",
            route("two", "/two", &upstream.url(), "portal", "")
        ),
    )
    .unwrap();
    eventually(Duration::from_secs(5), || proxy.shared.load().number == 2).await;
    assert_eq!(status(client().get(proxy.url("/two"))).await, 200);
    assert_eq!(tokens.count(), 1);
}

// ---------------------------------------------------------------------------------------------
// The real binary

const JSON_HEAD: &str = "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"10s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_route_without_a_new_token_and_survives_a_bad_file() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let base = format!(
        "{JSON_HEAD}{}{}",
        client_app_profile("portal", &tokens, ""),
        route("one", "/one", &upstream.url(), "portal", "")
    );
    let proc = Running::start(&base, &[]);
    let addr = proc.addr("proxy listening").await;
    proc.wait_for_log("token fetched").await;
    let client = client();
    assert_eq!(status(client.get(format!("http://{addr}/one"))).await, 200);
    assert_eq!(status(client.get(format!("http://{addr}/two"))).await, 404);

    std::fs::write(
        &proc.path,
        format!(
            "{base}{}",
            route("two", "/two", &upstream.url(), "portal", "")
        ),
    )
    .unwrap();
    proc.signal("HUP");
    proc.wait_for_log("configuration reloaded").await;
    assert_eq!(status(client.get(format!("http://{addr}/two"))).await, 200);
    assert_eq!(tokens.count(), 1);

    std::fs::write(&proc.path, "this is [not toml").unwrap();
    proc.signal("HUP");
    proc.wait_for_log("configuration reload failed").await;
    assert_eq!(status(client.get(format!("http://{addr}/two"))).await, 200);
    assert_eq!(status(client.get(format!("http://{addr}/one"))).await, 200);
}

/// The binary in front of an upstream that holds each request for `hold`, with one request
/// in flight through it (at the upstream) when this returns.
struct InFlight {
    proc: Running,
    addr: std::net::SocketAddr,
    response: tokio::task::JoinHandle<reqwest::Response>,
    _tokens: TokenServer,
    _upstream: AbortOnDrop,
}

async fn a_request_in_flight(hold: Duration) -> InFlight {
    let tokens = TokenServer::healthy(3600).await;
    let arrived = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&arrived);
    let (upstream, guard) = serve(move |_req: http::Request<hyper::body::Incoming>| {
        let flag = Arc::clone(&flag);
        async move {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(hold).await;
            json_response(200, r#"{"slow":true}"#, &[])
        }
    })
    .await;
    let config = format!(
        "{JSON_HEAD}{}{}",
        client_app_profile("portal", &tokens, ""),
        route("r", "/", &format!("http://{upstream}"), "portal", "")
    );
    let proc = Running::start(&config, &[]);
    let addr = proc.addr("proxy listening").await;
    proc.wait_for_log("token fetched").await;
    let response = tokio::spawn(async move {
        client()
            .get(format!("http://{addr}/slow"))
            .send()
            .await
            .unwrap()
    });
    eventually(Duration::from_secs(10), || {
        arrived.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    InFlight {
        proc,
        addr,
        response,
        _tokens: tokens,
        _upstream: guard,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_zero() {
    let InFlight {
        mut proc,
        addr,
        response: in_flight,
        ..
    } = a_request_in_flight(Duration::from_millis(1500)).await;
    // SIGTERM once the request is at the upstream, i.e. truly in flight through the proxy.
    proc.signal("TERM");
    let response = in_flight.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), r#"{"slow":true}"#);
    assert_eq!(proc.exit_code().await, Some(0));
    // New connections are refused once it stopped.
    assert!(client()
        .get(format!("http://{addr}/x"))
        .send()
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_carry_no_secret_or_token_and_json_is_one_object_per_line() {
    let tokens = TokenServer::start(|n| match n {
        0 => Reply::Raw {
            status: 400,
            headers: vec![],
            body: r#"{"error":"invalid_scope","error_description":"nope"}"#.into(),
        },
        _ => Reply::Token { ttl: Some(3600) },
    })
    .await;
    let checker = tokens.clone();
    let seen_tokens = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = Arc::clone(&seen_tokens);
    let revoked = std::sync::atomic::AtomicBool::new(false);
    let upstream = Upstream::with(move |seen| {
        if let Some(a) = seen.header("authorization") {
            record
                .lock()
                .unwrap()
                .push(a.trim_start_matches("Bearer ").to_owned());
        }
        if seen.target == "/revoke" && !revoked.swap(true, std::sync::atomic::Ordering::SeqCst) {
            checker.revoke_all();
        }
        if checker.is_live(seen.header("authorization")) {
            json_response(200, "{}", &[])
        } else {
            json_response(401, r#"{"code":"401-101"}"#, &[])
        }
    })
    .await;
    let secret = "Sup3r-Secret-Value-That-Must-Not-Leak";
    let config = format!(
        "{}{}{}",
        JSON_HEAD.replace("format = \"json\"", "format = \"json\"\nlevel = \"trace\""),
        client_app_profile("portal", &tokens, "").replace("secret-portal", "${THE_SECRET}"),
        route("r", "/", &upstream.url(), "portal", "")
    );
    let proc = Running::start(&config, &[("THE_SECRET", secret)]);
    let addr = proc.addr("proxy listening").await;
    proc.wait_for_log("token fetched").await;
    let client = client();
    assert_eq!(
        status(
            client
                .get(format!("http://{addr}/a"))
                .header("authorization", "Bearer client-own-token")
        )
        .await,
        200
    );
    // Revocation: the request sees a 401 and is replayed with a new token.
    assert_eq!(
        status(client.post(format!("http://{addr}/revoke")).body("x")).await,
        200
    );
    assert_eq!(
        status(client.post(format!("http://{addr}/b")).body("x")).await,
        200
    );
    client
        .get(format!("http://{addr}/missing/../x"))
        .send()
        .await
        .unwrap();
    proc.wait_for_log("\"replayed\":true").await;
    proc.wait_for_log("\"path\":\"/x\"").await;

    let logs = proc.logs();
    assert!(logs.len() > 10);
    let tokens_sent = seen_tokens.lock().unwrap().clone();
    assert!(tokens_sent.len() >= 3);
    for line in &logs {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.is_object());
        assert!(!line.contains(secret), "secret in log: {line}");
        assert!(
            !line.contains("client-own-token"),
            "client credential in log: {line}"
        );
        for t in &tokens_sent {
            assert!(!line.contains(t.as_str()), "token in log: {line}");
        }
    }
    assert!(logs
        .iter()
        .any(|l| l.contains("invalid_scope") && l.contains("error_description")));
    assert!(logs.iter().any(|l| l.contains("\"replayed\":true")));
}

/// Logs go to stderr; when its reader goes away (a log shipper or journald restarting,
/// `| head`), lines are dropped and the proxy goes on: tokens are fetched and installed,
/// requests served on HTTP/1.1 and h2c. (A failed write used to panic the logging task:
/// tokens were fetched but never installed, while /healthz said 200.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_does_not_stop_the_proxy() {
    use std::io::{BufRead, BufReader};
    // The endpoint refuses until stderr is closed: the token comes after.
    let tokens = TokenServer::start(|_| Reply::Raw {
        status: 503,
        headers: vec![],
        body: "down".into(),
    })
    .await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "{JSON_HEAD}{}{}",
            client_app_profile("portal", &tokens, ""),
            route("r", "/", &upstream.url(), "portal", "")
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_egain-proxy"));
    cmd.args(["run", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for var in support::binary::PROXY_VARS {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "no listen line");
        if line.contains("proxy listening") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            break v["addr"].as_str().unwrap().to_owned();
        }
    };
    drop(stderr);
    tokens.set_behaviour(|_| Reply::Token { ttl: Some(3600) });
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut ok = false;
    for _ in 0..100 {
        let h1 = status(client().get(format!("http://{addr}/a"))).await;
        let h2 = status(h2.get(format!("http://{addr}/b"))).await;
        if (h1, h2) == (200, 200) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "requests did not succeed after stderr closed");
    assert!(upstream.seen().len() >= 2);
}

/// Settings that need a restart are compared with the ones running, not with the last
/// reload's: `/status` lists them while they differ, through later reloads, and not once
/// the file is back to what runs.
#[tokio::test]
async fn restart_only_changes_are_listed_until_the_file_matches_what_runs() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = |limits: &str, extra_route: bool| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{limits}\n[admin]\nlisten = \"127.0.0.1:0\"\n{}{}{}",
            client_app_profile("portal", &tokens, ""),
            route("one", "/one", &upstream.url(), "portal", ""),
            if extra_route {
                route("two", "/two", &upstream.url(), "portal", "")
            } else {
                String::new()
            }
        )
    };
    let (proxy, path, _dir) = file_backed_proxy(&config("", false)).await;
    assert!(proxy.shared.restart_needed().is_empty());
    std::fs::write(&path, config("max_connections = 5", false)).unwrap();
    proxy.shared.reload().await.unwrap();
    assert_eq!(proxy.shared.restart_needed(), ["server.max_connections"]);
    // Another reload that changes only routes: still pending.
    std::fs::write(&path, config("max_connections = 5", true)).unwrap();
    proxy.shared.reload().await.unwrap();
    assert_eq!(proxy.shared.restart_needed(), ["server.max_connections"]);
    let status = proxy.status_json().await;
    assert_eq!(
        status["restart_needed"],
        serde_json::json!(["server.max_connections"])
    );
    // Back to what runs: nothing pending.
    std::fs::write(&path, config("", true)).unwrap();
    proxy.shared.reload().await.unwrap();
    assert!(proxy.shared.restart_needed().is_empty());
}

/// A reload that changes a profile's settings but not its client (a scope added) keeps the
/// current token serving until the new settings' token is in: with the endpoint down, no
/// request fails. Another client (a new client_id) never gets the old client's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_profile_keeps_serving_its_token_until_the_new_one_is_in() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = |extra: &str| {
        format!(
            "{HEAD}{}{}",
            client_app_profile("portal", &tokens, "")
                .replace("scopes = [\"knowledge.portalmgr.manage\"]", extra),
            route("r", "/", &upstream.url(), "portal", "")
        )
    };
    let (proxy, path, _dir) =
        file_backed_proxy(&config("scopes = [\"knowledge.portalmgr.manage\"]")).await;
    proxy.ready().await;
    assert_eq!(status(client().get(proxy.url("/before"))).await, 200);
    let first = upstream.last().header("authorization").unwrap().to_owned();
    fn down(_: usize) -> Reply {
        Reply::Raw {
            status: 503,
            headers: vec![],
            body: "down".into(),
        }
    }
    tokens.set_behaviour(down);
    std::fs::write(
        &path,
        config("scopes = [\"knowledge.portalmgr.manage\", \"core.aiservices.read\"]"),
    )
    .unwrap();
    proxy.shared.reload().await.unwrap();
    for i in 0..5 {
        assert_eq!(
            status(client().get(proxy.url(&format!("/during{i}")))).await,
            200
        );
        assert_eq!(
            upstream.last().header("authorization"),
            Some(first.as_str())
        );
    }
    assert_eq!(
        proxy.status_json().await["profiles"]["portal"]["token_source"],
        "previous_settings"
    );
    // The new settings' token replaces it as soon as the endpoint answers.
    tokens.set_behaviour(|_| Reply::Token { ttl: Some(3600) });
    eventually(Duration::from_secs(10), || {
        proxy
            .shared
            .load()
            .tokens
            .get("portal")
            .unwrap()
            .current()
            .is_some_and(|t| t.header.to_str().unwrap() != first)
    })
    .await;
    let asked = tokens.requests().last().unwrap().form()["scope"].clone();
    assert!(asked.contains("core.aiservices.read"), "{asked}");

    // Another client: its requests wait for its own token.
    tokens.set_behaviour(down);
    std::fs::write(
        &path,
        config("scopes = [\"knowledge.portalmgr.manage\"]").replace("id-portal", "id-other"),
    )
    .unwrap();
    proxy.shared.reload().await.unwrap();
    assert_eq!(status(client().get(proxy.url("/other"))).await, 503);
}

/// A RUST_LOG that is not a valid filter is said, not silently ignored; an empty one is unset.
#[tokio::test]
async fn an_invalid_rust_log_is_reported() {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{JSON_HEAD}{}{}",
        client_app_profile("portal", &tokens, ""),
        route("r", "/", &upstream.url(), "portal", "")
    );
    let proc = Running::start(&config, &[("RUST_LOG", "bogus[[")]);
    let line = proc.wait_for_log("RUST_LOG is not a valid filter").await;
    assert!(line.contains("bogus[["), "{line}");
    proc.addr("proxy listening").await;
    // An empty one is unset (it turned every line off, errors included).
    let proc = Running::start(&config, &[("RUST_LOG", "")]);
    proc.addr("proxy listening").await;
}

/// An h2 client that resets its stream before the answer (it gave up) leaves the request
/// counted and logged as 499, not lost from the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_client_gave_up_on_is_counted_as_499() {
    let tokens = TokenServer::healthy(3600).await;
    let (slow, _guard) = serve(|_| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        json_response(200, "{}", &[])
    })
    .await;
    let on = support::transport::On::new(support::transport::Transport::H2c);
    let proxy = on
        .proxy(&format!(
            "{}{}",
            client_app_profile("portal", &tokens, ""),
            route("slow", "/", &format!("http://{slow}"), "portal", "")
        ))
        .await;
    proxy.ready().await;
    let conn = on.connect(&proxy).await;
    let support::transport::Conn::H2 { send, .. } = &conn else {
        unreachable!()
    };
    let mut send = send.clone().ready().await.unwrap();
    let request = http::Request::get("http://app/gave-up").body(()).unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    // Gone before the answer: the h2 client resets the stream (CANCEL).
    let _ = tokio::time::timeout(Duration::from_millis(300), response).await;
    let line = "egain_proxy_requests_total{route=\"slow\",method=\"GET\",status=\"499\"} 1";
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = proxy.metrics_text().await;
        if metrics.contains(line) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(metrics.contains(line), "{metrics}");
}

/// A second SIGTERM during the drain ends it at once (shutdown_grace here is 10 s; the
/// request in flight would hold the process for 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_grace_period() {
    let InFlight { mut proc, .. } = a_request_in_flight(Duration::from_secs(60)).await;
    proc.signal("TERM");
    proc.wait_for_log("draining in-flight requests").await;
    let started = std::time::Instant::now();
    proc.signal("TERM");
    assert_eq!(proc.exit_code().await, Some(0));
    // Well before the 10 s grace period would have ended.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    proc.wait_for_log("second shutdown signal").await;
}
