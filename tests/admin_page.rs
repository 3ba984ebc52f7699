//! The admin page (`GET /` on the admin listener), loaded in a real browser: Debian's headless
//! Chromium runs the page's script against a running proxy, and the test reads the DOM the
//! script built. A screenshot is saved as `target/admin-page.png` for a person to look at.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::browser::browse;
use support::*;

/// Two token servers (one refusing with `invalid_client`), two profiles, two routes, traffic
/// on both.
async fn scene() -> (TestProxy, TokenServer, TokenServer, Upstream) {
    let good = TokenServer::healthy(3600).await;
    let broken = TokenServer::start(|_| Reply::Raw {
        status: 401,
        headers: vec![],
        // Markup in the description must reach the page as text, never as elements.
        body: r#"{"error":"invalid_client","error_description":"client authentication failed <b id=\"injected\">x</b>"}"#
            .into(),
    })
    .await;
    let upstream = Upstream::start().await;
    let config = format!(
        "{HEAD}{}{}{}{}",
        client_app_profile("knowledge", &good, ""),
        client_app_profile("chat", &broken, "scopes = [\"core.conversation.read\"]")
            .replace("scopes = [\"knowledge.portalmgr.manage\"]\n", ""),
        route("kb", "/knowledge", &upstream.url(), "knowledge", ""),
        route("conversations", "/chat", &upstream.url(), "chat", ""),
    );
    let proxy = TestProxy::start(&config).await;
    eventually(Duration::from_secs(10), || {
        let g = proxy.shared.load();
        g.tokens
            .get("knowledge")
            .is_some_and(|h| h.usable().is_some())
            && g.tokens
                .get("chat")
                .is_some_and(|h| h.status().fetch_count > 0)
    })
    .await;
    let client = client();
    for _ in 0..20 {
        assert_eq!(
            status(client.get(proxy.url("/knowledge/articles"))).await,
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(status(client.get(proxy.url("/chat/x"))).await, 503);
    }
    (proxy, good, broken, upstream)
}

/// The opening tag and contents of the `<tr>` carrying `attribute`.
fn row<'a>(dom: &'a str, attribute: &str) -> (&'a str, &'a str) {
    let at = dom
        .find(attribute)
        .unwrap_or_else(|| panic!("no {attribute} in the DOM:\n{dom}"));
    let start = dom[..at].rfind("<tr").expect("row start");
    let head_end = at + dom[at..].find('>').expect("tag end");
    let end = at + dom[at..].find("</tr>").expect("row end");
    (&dom[start..=head_end], &dom[head_end + 1..end])
}

fn attribute<'a>(tag: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=\"");
    let from = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {tag}"))
        + key.len();
    &tag[from..from + tag[from..].find('"').expect("closing quote")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_tokens_routes_and_failures_in_a_browser() {
    let (proxy, good, _broken, upstream) = scene().await;
    // A reload whose file asks for a restart: the page says so.
    let mut config = (*proxy.shared.load().config).clone();
    config.server.max_connections += 1;
    proxy.shared.install(config).await.unwrap();
    let url = proxy.admin_url("/");
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || browse(&url, &["--dump-dom"])
    })
    .await
    .unwrap();

    // The script ran and read /status at least once.
    let body_at = dom.find("<body").expect("a body");
    let body_tag = &dom[body_at..body_at + dom[body_at..].find('>').unwrap()];
    let loads: u32 = attribute(body_tag, "data-loads").parse().unwrap();
    assert!(loads >= 1, "the page never loaded /status: {body_tag}");

    // Both profiles, the good one valid with about an hour to go.
    let (tag, cells) = row(&dom, "data-profile=\"knowledge\"");
    assert_eq!(attribute(tag, "data-state"), "valid");
    let left: f64 = attribute(cells, "data-expires-in").parse().unwrap();
    assert!((3000.0..=3600.0).contains(&left), "expires in {left}");
    assert!(cells.contains(" m "), "no countdown text: {cells}");
    // The broken one failed, with its OAuth error.
    let (tag, cells) = row(&dom, "data-profile=\"chat\"");
    assert_eq!(attribute(tag, "data-state"), "failed");
    assert!(cells.contains("invalid_client"), "{cells}");
    assert!(cells.contains("core.conversation.read"), "{cells}");
    assert!(
        !dom.contains("<b id=\"injected\">"),
        "server text became markup"
    );
    assert!(cells.contains("&lt;b id=\"injected\"&gt;"), "{cells}");

    // Both routes with their request counts.
    let (tag, _) = row(&dom, "data-route=\"kb\"");
    assert_eq!(attribute(tag, "data-requests-total"), "20");
    let (tag, _) = row(&dom, "data-route=\"conversations\"");
    assert_eq!(attribute(tag, "data-requests-total"), "3");
    // The config generation is shown, and what needs a restart.
    assert!(dom.contains("data-generation=\"2\""));
    assert!(
        dom.contains("data-restart-needed=\"server.max_connections\""),
        "{dom}"
    );

    // No token and no secret, neither in the page nor in what its script built.
    let html = client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sent: Vec<String> = upstream
        .seen()
        .iter()
        .filter_map(|s| s.header("authorization").map(str::to_owned))
        .collect();
    assert!(!sent.is_empty());
    for text in [&dom, &html] {
        for token in &sent {
            let bare = token.trim_start_matches("Bearer ");
            assert!(!text.contains(bare), "a token is on the page");
        }
        assert!(!text.contains("secret-knowledge") && !text.contains("secret-chat"));
    }
    assert!(good.count() >= 1);

    // A picture for people: target/admin-page.png.
    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/admin-page.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let arg = format!("--screenshot={}", shot.display());
    tokio::task::spawn_blocking(move || browse(&url, &[&arg]))
        .await
        .unwrap();
    let png = std::fs::read(&shot).expect("chromium wrote no screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_one_self_contained_document_only_on_the_admin_listener() {
    let (proxy, ..) = scene().await;
    let client = client();
    let r = client.get(proxy.admin_url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let html = r.text().await.unwrap();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["x-frame-options"], "DENY");
    // Only the page's own inline script and style may run; it may talk to itself only.
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'sha256-"),
        "{csp}"
    );
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe"), "{csp}");
    // Nothing loaded from elsewhere, nothing built from server text as HTML.
    for needle in [
        " src=",
        "<link",
        "@import",
        "url(",
        "innerHTML",
        "outerHTML",
        "eval(",
    ] {
        assert!(!html.contains(needle), "the page contains {needle}");
    }
    // HEAD works, other methods do not.
    assert_eq!(status(client.head(proxy.admin_url("/"))).await, 200);
    assert_eq!(status(client.post(proxy.admin_url("/"))).await, 405);
    // The proxy listener does not serve it: `/` there is an ordinary unrouted path.
    let r = client.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(!r.text().await.unwrap().contains("<html"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_has_what_the_page_draws() {
    let (proxy, ..) = scene().await;
    let status: serde_json::Value = proxy.status_json().await;
    let chat = &status["profiles"]["chat"];
    assert_eq!(chat["state"], "failed");
    assert_eq!(chat["oauth_error"], "invalid_client");
    let fetches = chat["recent_fetches"].as_array().unwrap();
    assert!(!fetches.is_empty());
    assert_eq!(fetches[0]["outcome"], "oauth_error");
    assert_eq!(fetches[0]["oauth_error"], "invalid_client");
    assert!(fetches[0]["duration_ms"].as_f64().unwrap() >= 0.0);
    let knowledge = &status["profiles"]["knowledge"];
    assert_eq!(knowledge["recent_fetches"][0]["outcome"], "success");
    assert_eq!(knowledge["lifetime_seconds"], 3600.0);

    let routes = status["routes"].as_array().unwrap();
    let kb = routes.iter().find(|r| r["name"] == "kb").unwrap();
    assert_eq!(kb["recent"]["requests_total"], 20);
    assert_eq!(kb["recent"]["last_minute"]["requests"], 20);
    assert_eq!(kb["recent"]["last_minute"]["error_rate"], 0.0);
    assert!(kb["recent"]["last_minute"]["p99_ms"].as_f64().unwrap() > 0.0);
    let chat_route = routes
        .iter()
        .find(|r| r["name"] == "conversations")
        .unwrap();
    assert_eq!(chat_route["recent"]["last_minute"]["server_errors"], 3);
    assert_eq!(chat_route["recent"]["last_minute"]["error_rate"], 1.0);
    let points = kb["recent"]["points"].as_array().unwrap();
    assert_eq!(
        points
            .iter()
            .map(|p| p["requests"].as_u64().unwrap())
            .sum::<u64>(),
        20
    );
    // No reload yet; after a failed one, its error.
    assert_eq!(status["reload"], serde_json::Value::Null);
    assert_eq!(
        client()
            .post(proxy.admin_url("/reload"))
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    let status: serde_json::Value = proxy.status_json().await;
    assert_eq!(status["reload"]["outcome"], "error");
    assert!(status["reload"]["error"]
        .as_str()
        .unwrap()
        .contains("no config file"));
    proxy.stop().await;
}
