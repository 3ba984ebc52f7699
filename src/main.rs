//! The `egain-proxy` command line: argument parsing, logging set-up and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use egain_proxy::config::{Config, LogFormat};
use egain_proxy::mock::{MockEgain, MockOptions};
use egain_proxy::{Proxy, StartError};

#[derive(Parser)]
#[command(
    name = "egain-proxy",
    version,
    about = "Reverse proxy that injects eGain OAuth2 client-credentials tokens"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArg,
    /// Also reload when the config file changes (polled every second)
    #[arg(long)]
    watch: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

/// `--config`, on the commands that read a config file.
#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// Config file [default: $EGAIN_PROXY_CONFIG, then ./proxy.toml]
    #[arg(long = "config", value_name = "PATH")]
    path: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default when no command is given)
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Also reload when the config file changes (polled every second)
        #[arg(long)]
        watch: bool,
    },
    /// Validate the config fully and print a summary
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Fetch one token for a profile and describe it
    Token {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        profile: String,
        /// Also print the token itself
        #[arg(long)]
        show: bool,
    },
    /// Zero-setup demo: an embedded mock eGain and the proxy in front of it
    Demo {
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Run the mock eGain alone (token endpoints and a small API), for integration tests
    MockEgain {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
        /// Lifetime of issued tokens, in seconds
        #[arg(long, default_value_t = 3600)]
        token_ttl: u64,
        /// API calls allowed per token per minute; more get eGain's 429 (default: no limit)
        #[arg(long)]
        rate_limit: Option<u64>,
    },
}

const CONFIG_ERROR: u8 = 2;
const FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("egain-proxy: cannot start the runtime: {e}");
            return ExitCode::from(FAILURE);
        }
    };
    // `--config` after the command, or before it (`egain-proxy --config x check`).
    let path = |own: ConfigArg| {
        own.path
            .or_else(|| cli.config.path.clone())
            .unwrap_or_else(Config::default_path)
    };
    let command = cli.command.unwrap_or(Command::Run {
        config: ConfigArg { path: None },
        watch: false,
    });
    match command {
        Command::Run { config, watch } => runtime.block_on(run(path(config), watch || cli.watch)),
        Command::Check { config } => check(&path(config)),
        Command::Token {
            config,
            profile,
            show,
        } => runtime.block_on(token(&path(config), &profile, show)),
        Command::Demo { port } => runtime.block_on(demo(port)),
        Command::MockEgain {
            listen,
            token_ttl,
            rate_limit,
        } => runtime.block_on(mock_egain(listen, token_ttl, rate_limit)),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("egain-proxy: {e}");
        ExitCode::from(CONFIG_ERROR)
    })
}

async fn run(path: PathBuf, watch: bool) -> ExitCode {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    egain_proxy::init_logging(config.log.format, &config.log.level);
    let proxy = match Proxy::bind(config, Some(path)).await {
        Ok(p) => p,
        Err(e) => return start_failed(&e),
    };
    egain_proxy::spawn_sighup_reloader(proxy.shared());
    if watch {
        egain_proxy::spawn_file_watcher(proxy.shared(), Duration::from_secs(1));
    }
    proxy.run(egain_proxy::shutdown_signal()).await;
    ExitCode::SUCCESS
}

fn start_failed(e: &StartError) -> ExitCode {
    eprintln!("egain-proxy: {e}");
    tracing::error!(error = %e, "cannot start");
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(FAILURE))
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let s = &config.server;
    println!("{}: OK", path.display());
    let scheme = if s.tls.is_some() { "https" } else { "http" };
    for addr in &s.listen {
        println!("listen   {scheme}://{addr}");
    }
    match &s.access {
        Some(a) => println!(
            "access   {} API key(s) in {}, {} allowed network(s)",
            a.api_keys.len(),
            a.api_key_header,
            a.allow.len()
        ),
        None if s.open => println!("access   open (server.open = true)"),
        None => println!("access   loopback only"),
    }
    match &config.admin {
        Some(a) => println!("admin    http://{}", a.listen),
        None => println!("admin    disabled"),
    }
    for (name, p) in &config.profiles {
        let t = &p.token;
        println!(
            "profile  {name}: {} {} scopes [{}]{}",
            t.kind.as_str(),
            t.token_url,
            t.scopes.join(" "),
            t.egress
                .as_ref()
                .map(|e| format!(" via {e} ({})", p.egress_from))
                .unwrap_or_default()
        );
        if !config.uses_profile(name) {
            println!("         (not used by any route)");
        }
    }
    for r in &config.routes {
        let u = &r.upstream;
        println!(
            "route    {}: {}{} -> {}://{}{}{} (profile {}){}",
            r.name,
            r.path_prefix,
            r.host
                .as_ref()
                .map(|h| format!(" host {h}"))
                .unwrap_or_default(),
            u.scheme,
            u.authority,
            u.base_path,
            if r.strip_prefix {
                " (prefix stripped)"
            } else {
                ""
            },
            r.profile.as_deref().unwrap_or("none"),
            r.egress
                .proxy
                .as_ref()
                .map(|e| format!(" via {e} ({})", r.egress.from))
                .unwrap_or_default()
        );
    }
    if config.routes.is_empty() {
        println!("warning  no routes: every request will get 404");
    }
    let env = &config.egress_env;
    if !env.is_empty() {
        let var = |v: &Option<egain_proxy::config::egress::EnvProxy>| match v {
            None => "not set".to_owned(),
            Some(v) => match &v.proxy {
                Ok(p) => format!("{} ({})", p.redacted(), v.name),
                Err(_) => format!("unusable ({}; not needed by any route or profile)", v.name),
            },
        };
        println!(
            "egress   environment: https {}, http {}, no_proxy {}",
            var(&env.https),
            var(&env.http),
            env.no_proxy
                .as_ref()
                .map(|(name, list)| format!("{:?} ({name})", list.raw))
                .unwrap_or_else(|| "not set".to_owned())
        );
    }
    if let Some(c) = &config.token_cache {
        println!(
            "cache    {} prefix {:?}, key file {} (32-byte key read), timeout {} (Redis is not contacted by check)",
            c.redacted_url(),
            c.key_prefix,
            c.encryption_key_file.display(),
            humantime::format_duration(c.timeout)
        );
    }
    ExitCode::SUCCESS
}

async fn token(path: &std::path::Path, profile: &str, show: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    egain_proxy::init_logging(LogFormat::Text, "warn");
    let Some(p) = config.profiles.get(profile) else {
        let known: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
        eprintln!(
            "egain-proxy: {}: no profile {profile:?} (defined: {})",
            path.display(),
            known.join(", ")
        );
        return ExitCode::from(CONFIG_ERROR);
    };
    match egain_proxy::token::fetch_once(&p.token).await {
        Ok(t) => {
            println!("profile     {profile}");
            println!("kind        {}", p.token.kind.as_str());
            println!("token_url   {}", p.token.token_url);
            println!(
                "scopes      {}",
                t.scope.clone().unwrap_or_else(|| p.token.scopes.join(" "))
            );
            println!(
                "expires_in  {}s (from {})",
                t.lifetime.as_secs(),
                t.lifetime_source
            );
            println!(
                "fingerprint {}",
                egain_proxy::config::secrets::fingerprint(t.access_token.as_bytes())
            );
            if show {
                println!("token       {}", t.access_token);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("egain-proxy: profile {profile}: {e}");
            ExitCode::from(FAILURE)
        }
    }
}

async fn demo(port: u16) -> ExitCode {
    egain_proxy::init_logging(LogFormat::Text, "info");
    let mock = match MockEgain::start(([127, 0, 0, 1], 0).into(), MockOptions::default()).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("egain-proxy: cannot start the mock eGain: {e}");
            return ExitCode::from(FAILURE);
        }
    };
    let config = match Config::from_toml_str(&egain_proxy::demo::config_text(&mock, port)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("egain-proxy: demo config: {e}");
            return ExitCode::from(FAILURE);
        }
    };
    let proxy = match Proxy::bind(config, None).await {
        Ok(p) => p,
        Err(e @ StartError::Bind { .. }) => {
            eprintln!("egain-proxy: {e} (is something else on port {port}? try `egain-proxy demo --port 18080`)");
            return ExitCode::from(FAILURE);
        }
        Err(e) => return start_failed(&e),
    };
    let shared = proxy.shared();
    // Print the commands once the tokens are there, so the first curl already succeeds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !shared.load().unready_profiles().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = proxy
        .local_addrs()
        .first()
        .copied()
        .unwrap_or(([127, 0, 0, 1], port).into());
    println!(
        "{}",
        egain_proxy::demo::banner(addr, proxy.admin_addr(), &mock)
    );
    // SIGHUP is a reload, which the demo (no config file) refuses with a log line rather
    // than dying of the signal.
    egain_proxy::spawn_sighup_reloader(proxy.shared());
    proxy.run(egain_proxy::shutdown_signal()).await;
    ExitCode::SUCCESS
}

async fn mock_egain(listen: std::net::SocketAddr, ttl: u64, rate_limit: Option<u64>) -> ExitCode {
    egain_proxy::init_logging(LogFormat::Text, "info");
    let options = MockOptions {
        token_ttl: Duration::from_secs(ttl.max(1)),
        rate_limit_per_minute: rate_limit,
        ..MockOptions::default()
    };
    let mock = match MockEgain::start(listen, options).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("egain-proxy: cannot listen on {listen}: {e}");
            return ExitCode::from(FAILURE);
        }
    };
    let o = mock.options();
    println!("mock eGain listening on {}", mock.base_url());
    println!(
        "  client app token URL:  {}  (client_id {}, client_secret {})",
        mock.client_app_token_url(),
        o.client_app.0,
        o.client_app.1
    );
    println!(
        "  anonymous token URL:   {}?user_type=customer&domain_hint={}  (client_id {}, client_secret {})",
        mock.anonymous_token_url(),
        o.tenant,
        o.anonymous.0,
        o.anonymous.1
    );
    println!(
        "  API: any other path; requires a live bearer token it issued (token lifetime {ttl}s);\n\
         \x20      /knowledge/<module>/... and /core/<module>/... need a <family>.<module> scope (else 403 403-197);\n\
         \x20      a WebSocket upgrade on any API path echoes messages{}",
        rate_limit.map_or(String::new(), |n| format!("; {n} calls per token per minute, then 429"))
    );
    egain_proxy::shutdown_signal().await;
    ExitCode::SUCCESS
}
