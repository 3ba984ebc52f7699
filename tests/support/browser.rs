//! Headless Chromium, for tests that need a real browser (the admin page, a page of another
//! site using the proxy).

use std::path::PathBuf;
use std::process::Command;

pub fn chromium() -> PathBuf {
    let names = ["chromium", "chromium-browser", "google-chrome"];
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return path.into();
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "no Chromium found (looked for {names:?} on PATH and $CHROMIUM): install Debian's \
         chromium (`apt-get install chromium`); .ci/run does this"
    );
}

/// Runs headless Chromium on `url` with `extra` arguments; returns its stdout.
pub fn browse(url: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            // Virtual time runs the page's timers and waits for its fetches to finish.
            "--virtual-time-budget=5000",
            "--window-size=1280,820",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("cannot run chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
