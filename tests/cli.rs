//! The command line, run as a user would: `check`, `token`, exit codes and one-line errors.

use std::process::{Command, Output};

use egain_proxy::mock::{MockEgain, MockOptions};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_egain-proxy"));
    c.env_remove("RUST_LOG").env_remove("EGAIN_PROXY_CONFIG");
    c
}

fn repo_file(name: &str) -> String {
    format!("{}/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn with_egain_env(c: &mut Command) -> &mut Command {
    c.env("EGAIN_CLIENT_ID", "id")
        .env("EGAIN_CLIENT_SECRET", "very-secret-value")
        .env("EGAIN_ANON_CLIENT_ID", "anon-id")
        .env("EGAIN_ANON_CLIENT_SECRET", "anon-secret-value")
        .env("EGAIN_TENANT", "TMPRODB88619984")
}

#[test]
fn check_accepts_the_repo_config() {
    let out = with_egain_env(&mut bin())
        .args(["check", "--config", &repo_file("proxy.toml")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "route    portal: /knowledge/ -> https://api.ai.egain.cloud (profile portal)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("anonymous/token?user_type=customer&domain_hint=TMPRODB88619984"),
        "{stdout}"
    );
    assert!(!stdout.contains("very-secret-value"));
}

fn check_fails(config: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let mut c = bin();
    for (k, v) in env {
        c.env(k, v);
    }
    let out: Output = c
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("proxy.toml"), "names the file: {stderr}");
    (out.status.code().unwrap(), stderr)
}

const BASE: &str = r#"
[profiles.portal]
kind = "client_app"
token_url = "https://ai.egain.cloud/system/auth/T-U/oauth2/token"
client_id = "id"
client_secret = "${MY_SECRET}"
scopes = ["knowledge.portalmgr.manage"]

[[routes]]
path_prefix = "/knowledge/"
upstream = "https://api.ai.egain.cloud"
profile = "portal"
"#;

#[test]
fn check_rejects_an_unknown_key() {
    let (code, err) = check_fails(
        &BASE.replace("scopes =", "scopse = [\"x\"]\nscopes ="),
        &[("MY_SECRET", "s")],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("profiles.portal.scopse") && err.contains("unknown field"),
        "{err}"
    );
}

#[test]
fn check_rejects_an_unset_variable() {
    let (code, err) = check_fails(BASE, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("profiles.portal.client_secret: environment variable MY_SECRET is not set"),
        "{err}"
    );
}

#[test]
fn check_rejects_a_route_to_a_missing_profile() {
    let (code, err) = check_fails(
        &BASE.replace("profile = \"portal\"", "profile = \"portl\""),
        &[("MY_SECRET", "s")],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("routes[0].profile") && err.contains("portl"),
        "{err}"
    );
}

#[test]
fn check_rejects_a_toml_syntax_error_with_line_and_column() {
    let (code, err) = check_fails(
        &BASE.replace("client_id = \"id\"", "client_id = \"id"),
        &[("MY_SECRET", "s")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("proxy.toml:5:"), "{err}");
    assert!(err.contains("TOML syntax error"), "{err}");
}

#[test]
fn check_rejects_a_missing_file() {
    let out = bin()
        .args(["check", "--config", "/nonexistent/proxy.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/proxy.toml"));
}

/// `--config` goes after the command or before it; commands that read no config file do
/// not offer it.
#[test]
fn config_is_offered_where_it_is_read() {
    for args in [
        ["check", "--config", "/nonexistent/proxy.toml"],
        ["--config", "/nonexistent/proxy.toml", "check"],
    ] {
        let out = bin().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains("/nonexistent/proxy.toml"),
            "{args:?}"
        );
    }
    for command in ["demo", "mock-egain"] {
        let out = bin().args([command, "--help"]).output().unwrap();
        assert!(!text(&out.stdout).contains("--config"), "{command}");
        assert!(!text(&out.stdout).contains("--watch"), "{command}");
    }
}

#[test]
fn token_command_fetches_and_hides_the_token_unless_asked() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mock = rt
        .block_on(MockEgain::start(
            ([127, 0, 0, 1], 0).into(),
            MockOptions::default(),
        ))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, egain_proxy::demo::config_text(&mock, 0)).unwrap();
    let out = bin()
        .args([
            "token",
            "--profile",
            "customer",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("anonymous_customer"), "{stdout}");
    assert!(stdout.contains("expires_in  3600s"), "{stdout}");
    assert!(
        stdout.contains("https://api.ai.egain.cloud/auth/knowledge.portalmgr.read"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("mock-anon-"),
        "token printed without --show: {stdout}"
    );
    let out = bin()
        .args([
            "token",
            "--profile",
            "portal",
            "--show",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(text(&out.stdout).contains("token       mock-app-"));
    let out = bin()
        .args([
            "token",
            "--profile",
            "nope",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    drop(mock);
    let out = bin()
        .args([
            "token",
            "--profile",
            "portal",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach the token endpoint"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn version_and_help() {
    let out = bin().arg("--version").output().unwrap();
    assert!(text(&out.stdout).starts_with("egain-proxy "));
    let out = bin().arg("--help").output().unwrap();
    for cmd in ["run", "check", "token", "demo", "mock-egain"] {
        assert!(text(&out.stdout).contains(cmd));
    }
}
