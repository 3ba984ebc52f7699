//! egain-proxy: a reverse proxy that obtains eGain OAuth2 client-credentials tokens, keeps them
//! fresh, injects `Authorization: Bearer …` and streams each call to the right eGain API.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod coalesce;
pub mod config;
pub mod demo;
pub mod error;
pub mod http;
pub mod metrics;
pub mod mock;
pub mod pipeline;
pub mod routes;
pub mod server;
pub mod state;
pub mod tls;
pub mod token;
pub mod transport;
pub mod upstream;

pub use config::{Config, ConfigError};
pub use server::{Proxy, StartError};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response the proxy produces.
pub type ProxyBody = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;

/// Resolves when the process is asked to stop (SIGTERM or SIGINT/Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// Reloads the configuration on every SIGHUP, for the life of the process.
pub fn spawn_sighup_reloader(shared: std::sync::Arc<state::Shared>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot install the SIGHUP handler; use POST /reload");
            return;
        };
        while hup.recv().await.is_some() {
            // The demo (an in-memory config) has nothing to reload: not a failed reload.
            if shared.config_path.is_none() {
                tracing::info!("SIGHUP received: this instance has no config file to reload");
                continue;
            }
            tracing::info!("SIGHUP received: reloading configuration");
            let _ = shared.reload().await;
        }
    });
    #[cfg(not(unix))]
    let _ = shared;
}

/// `run --watch`: reloads when the config file's modification time or size changes. Polling
/// works on every filesystem, including mounted secrets and ConfigMaps that are swapped by a
/// symlink change. A half-written file fails validation and leaves the old config serving;
/// the next change is picked up again.
pub fn spawn_file_watcher(shared: std::sync::Arc<state::Shared>, every: std::time::Duration) {
    let Some(path) = shared.config_path.clone() else {
        return;
    };
    tokio::spawn(async move {
        let stamp = |m: std::fs::Metadata| (m.modified().ok(), m.len());
        let mut last = tokio::fs::metadata(&path).await.ok().map(stamp);
        loop {
            tokio::time::sleep(every).await;
            let now = tokio::fs::metadata(&path).await.ok().map(stamp);
            if now != last {
                last = now;
                if now.is_some() {
                    tracing::info!(path = %path.display(), "config file changed: reloading");
                    let _ = shared.reload().await;
                }
            }
        }
    });
}

/// Sets up `tracing` on stderr: `text` or `json` (one object per line); `RUST_LOG` wins over
/// the configured level.
pub fn init_logging(format: config::LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    // An empty RUST_LOG (`RUST_LOG=`, compose's `${RUST_LOG:-}`) is unset, not "log nothing".
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let from_env = env.as_deref().map(EnvFilter::try_new);
    // Set but unusable: said once logging is up, rather than silently ignored.
    let bad_env = match (&from_env, &env) {
        (Some(Err(e)), Some(value)) => Some((value.clone(), e.to_string())),
        _ => None,
    };
    let filter = match from_env {
        Some(Ok(filter)) => filter,
        _ => EnvFilter::new(level),
    };
    use std::io::IsTerminal;
    // Colours only for a person at a terminal; log files and journald get plain text.
    // A log line that cannot be written (stderr's reader gone: a log shipper or journald
    // restarting, `| head`) is dropped. tracing-subscriber would report it with `eprintln!`,
    // which panics on that same broken stderr, in whatever task was logging: a token
    // refresh never installed its token.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        config::LogFormat::Text => builder.try_init(),
        config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    if let Some((value, error)) = bad_env {
        tracing::warn!(rust_log = %value, %error, level, "RUST_LOG is not a valid filter: using [log] level");
    }
}
