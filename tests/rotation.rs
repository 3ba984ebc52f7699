//! Secrets that rotate (contract §13): `client_secret_file` laid out as Kubernetes mounts a
//! Secret (`client-secret -> ..data/client-secret`, `..data -> ..<timestamp>`), swapped the
//! way the kubelet does it (a new timestamped folder, a new `..data` link renamed over the
//! old one, the old folder removed).

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

/// A Secret volume with one key, `client-secret`.
struct Mounted {
    dir: tempfile::TempDir,
    version: AtomicUsize,
}

impl Mounted {
    fn new(secret: &str) -> Mounted {
        let m = Mounted {
            dir: tempfile::tempdir().unwrap(),
            version: AtomicUsize::new(0),
        };
        m.write_version(secret);
        std::os::unix::fs::symlink(
            Path::new("..data").join("client-secret"),
            m.dir.path().join("client-secret"),
        )
        .unwrap();
        m
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("client-secret")
    }

    /// What the kubelet does on an update: write a new folder, point a fresh link at it,
    /// rename that link over `..data` (atomic), remove the old folder.
    fn write_version(&self, secret: &str) {
        let n = self.version.fetch_add(1, Ordering::SeqCst);
        let folder = format!("..2026_11_25_{n:02}");
        std::fs::create_dir(self.dir.path().join(&folder)).unwrap();
        std::fs::write(self.dir.path().join(&folder).join("client-secret"), secret).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&folder, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
        if n > 0 {
            let old = self.dir.path().join(format!("..2026_11_25_{:02}", n - 1));
            std::fs::remove_dir_all(old).unwrap();
        }
    }
}

fn secret_of(r: &TokenRequest) -> String {
    r.form().get("client_secret").cloned().unwrap_or_default()
}

fn invalid_client(retry_after: Option<u64>) -> Reply {
    Reply::Raw {
        status: 401,
        headers: retry_after
            .map(|s| vec![("retry-after", s.to_string())])
            .unwrap_or_default(),
        body: r#"{"error":"invalid_client","error_description":"client authentication failed"}"#
            .into(),
    }
}

async fn live_upstream(tokens: &TokenServer) -> Upstream {
    let t = tokens.clone();
    Upstream::with(move |seen| {
        if t.is_live(seen.header("authorization")) {
            json_response(200, "{}", &[])
        } else {
            json_response(401, r#"{"code":"401-104"}"#, &[])
        }
    })
    .await
}

fn config(tokens: &TokenServer, upstream: &Upstream, secret: &Path) -> String {
    format!(
        "{HEAD}{}{}",
        client_app_profile("portal", tokens, "")
            .replace("client_secret = \"secret-portal\"\n", "")
            .replace(
                "[profiles.portal]\n",
                &format!(
                    "[profiles.portal]\nclient_secret_file = \"{}\"\n",
                    secret.display()
                )
            ),
        route("r", "/", &upstream.url(), "portal", "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_symlink_swap_mid_run_keeps_every_request_200() {
    let mounted = Mounted::new("first-secret");
    let accepted = Arc::new(Mutex::new("first-secret".to_owned()));
    let tokens = TokenServer::healthy(2).await;
    let a = Arc::clone(&accepted);
    tokens.answer_by_request(move |r| {
        if secret_of(r) == *a.lock().unwrap() {
            Reply::Token { ttl: Some(2) }
        } else {
            invalid_client(None)
        }
    });
    let upstream = live_upstream(&tokens).await;
    let proxy = TestProxy::start(&config(&tokens, &upstream, &mounted.path())).await;
    proxy.ready().await;

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let (stop, failures, url) = (Arc::clone(&stop), Arc::clone(&failures), proxy.url("/x"));
        tokio::spawn(async move {
            let client = client();
            while !stop.load(Ordering::Relaxed) {
                if status(client.get(&url)).await != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // eGain gets the new secret and forgets the old one and its tokens; the mount follows.
    *accepted.lock().unwrap() = "second-secret".to_owned();
    mounted.write_version("second-secret");
    tokens.revoke_all();
    let at_swap = tokens.count();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();

    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed across the rotation"
    );
    let after: Vec<String> = tokens.requests()[at_swap..].iter().map(secret_of).collect();
    assert!(after.len() >= 2, "refreshes after the swap: {after:?}");
    assert!(
        after.iter().all(|s| s == "second-secret"),
        "the old secret was sent after the swap: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_client_right_after_a_rotation_rereads_the_file_before_backing_off() {
    let mounted = Arc::new(Mounted::new("first-secret"));
    let tokens = TokenServer::healthy(3600).await;
    let upstream = live_upstream(&tokens).await;
    let proxy = TestProxy::start(&config(&tokens, &upstream, &mounted.path())).await;
    proxy.ready().await;

    // The rotation lands while a token request with the old secret is on the wire: the
    // endpoint swaps the mount, then refuses the old secret with a long Retry-After (which
    // a plain backoff would honour: the request would get 503).
    let m = Arc::clone(&mounted);
    tokens.answer_by_request(move |r| match secret_of(r).as_str() {
        "second-secret" => Reply::Token { ttl: Some(3600) },
        _ => {
            if m.version.load(Ordering::SeqCst) == 1 {
                m.write_version("second-secret");
            }
            invalid_client(Some(30))
        }
    });
    tokens.revoke_all();
    let before = tokens.count();
    assert_eq!(status(client().get(proxy.url("/x"))).await, 200);
    let secrets: Vec<String> = tokens.requests()[before..].iter().map(secret_of).collect();
    assert_eq!(secrets, ["first-secret", "second-secret"]);
}

/// The endpoint takes the new secret first and the mount changes a little later (a secret
/// store syncing to Kubernetes): the refresher, backing off after `invalid_client` with a long
/// `Retry-After`, tries the new secret as soon as the file holds it, not 30 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_that_changes_on_disk_during_the_backoff_is_tried_at_once() {
    let mounted = Mounted::new("first-secret");
    let tokens = TokenServer::healthy(3600).await;
    let upstream = live_upstream(&tokens).await;
    let proxy = TestProxy::start(&config(&tokens, &upstream, &mounted.path())).await;
    proxy.ready().await;
    tokens.answer_by_request(|r| match secret_of(r).as_str() {
        "second-secret" => Reply::Token { ttl: Some(3600) },
        _ => invalid_client(Some(30)),
    });
    tokens.revoke_all();
    let before = tokens.count();
    // The upstream's 401 sends the refresher to the endpoint, which refuses the old secret
    // (the client gets the 401: no token to replay with).
    assert_eq!(status(client().get(proxy.url("/x"))).await, 401);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mounted.write_version("second-secret");
    let changed = std::time::Instant::now();
    let mut served = false;
    while changed.elapsed() < Duration::from_secs(5) {
        if status(client().get(proxy.url("/x"))).await == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served,
        "still backing off 5 s after the secret changed on disk"
    );
    let secrets: Vec<String> = tokens.requests()[before..].iter().map(secret_of).collect();
    assert_eq!(
        secrets.last().map(String::as_str),
        Some("second-secret"),
        "{secrets:?}"
    );
    assert!(
        secrets.iter().filter(|s| *s == "first-secret").count() <= 2,
        "{secrets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_secret_file_mid_swap_keeps_the_last_secret() {
    let mounted = Mounted::new("first-secret");
    let tokens = TokenServer::healthy(3600).await;
    let upstream = live_upstream(&tokens).await;
    let proxy = TestProxy::start(&config(&tokens, &upstream, &mounted.path())).await;
    proxy.ready().await;
    // `..data` points nowhere for a moment.
    std::fs::remove_file(mounted.dir.path().join("..data")).unwrap();
    tokens.revoke_all();
    assert_eq!(status(client().get(proxy.url("/x"))).await, 200);
    assert_eq!(secret_of(&tokens.requests()[1]), "first-secret");
}
