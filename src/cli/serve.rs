//! `gateway serve`: settings from flags and `GATEWAY_*`, start-up as a load
//! that must succeed, the two listeners, SIGHUP reload, SIGTERM/SIGINT shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use secrecy::SecretString;

use crate::config::compile::{LoadOptions, load};
use crate::config::diagnostic::{self, Format};
use crate::http::Gateway;
use crate::runtime::{Limits, Runtime, Shared};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Routes directory (route files at any depth).
    #[arg(long, env = "GATEWAY_ROUTES", default_value = "routes")]
    pub routes: PathBuf,
    /// Public listener (webhooks, health).
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Admin listener (status, routes, reload, breaker reset).
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// Delivery store: `sqlite://relative/path.db`, `sqlite:///absolute/path.db` or `postgres://…`.
    #[arg(
        long,
        env = "GATEWAY_STORE",
        default_value = "sqlite://data/gateway.db"
    )]
    pub store: String,
    /// Largest inbound body in bytes.
    #[arg(long, env = "GATEWAY_MAX_BODY", default_value_t = 2 * 1024 * 1024)]
    pub max_body: usize,
    /// Deepest JSON nesting accepted.
    #[arg(long, env = "GATEWAY_MAX_DEPTH", default_value_t = 64)]
    pub max_depth: usize,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT, in seconds.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", default_value_t = 10)]
    pub shutdown_grace: u64,
    /// Debounce of file-change reloads, in milliseconds.
    #[arg(long, env = "GATEWAY_RELOAD_DEBOUNCE_MS", default_value_t = 250)]
    pub reload_debounce_ms: u64,
    /// Also rescan every N seconds (for filesystems without change events); 0 = off.
    #[arg(long, env = "GATEWAY_RELOAD_POLL_SECS", default_value_t = 0)]
    pub reload_poll_secs: u64,
    /// Latency SLA for `/metrics/latency` and the status page (e.g. 2s, 500ms).
    #[arg(long, env = "GATEWAY_SLA", default_value = "2s", value_parser = parse_duration)]
    pub sla: Duration,
    /// How long a claimed async delivery is exclusive to this instance (at least 1s). An
    /// instance that dies holding deliveries leaves them to the others after it; each try is
    /// cut short to end a tenth of the lease before the lease does.
    #[arg(long, env = "GATEWAY_LEASE", default_value = "60s", value_parser = parse_lease)]
    pub lease: Duration,
    /// Metrics and latency windows: `on`, or `off` to measure what they cost.
    #[arg(long, env = "GATEWAY_TELEMETRY", default_value = "on", value_parser = ["on", "off"])]
    pub telemetry: String,
    /// Log format.
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn run(args: ServeArgs) -> u8 {
    init_tracing(args.log_format);
    let admin_token = std::env::var("GATEWAY_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .map(SecretString::from);
    if admin_token.is_none() && !args.admin_listen.ip().is_loopback() {
        eprintln!(
            "gateway serve: GATEWAY_ADMIN_TOKEN is required when the admin listener ({}) is not on loopback",
            args.admin_listen
        );
        return 2;
    }
    if let Err(e) = std::fs::metadata(&args.routes) {
        eprintln!(
            "gateway serve: routes directory {}: {e}",
            args.routes.display()
        );
        return 2;
    }
    let loaded = load(
        std::slice::from_ref(&args.routes),
        &LoadOptions {
            env: &super::process_env,
            require_env: true,
            check_examples: false,
            cache: None,
        },
    );
    let base = std::env::current_dir().unwrap_or_default();
    let Some(config) = loaded.config else {
        eprint!(
            "{}",
            diagnostic::render(&loaded.diagnostics, Format::Text, &base)
        );
        eprintln!("gateway serve: the configuration is invalid; not starting");
        return 1;
    };
    for d in &loaded.diagnostics {
        tracing::warn!(diagnostic = %d.to_text(&base), "configuration warning");
    }
    crate::delivery::worker::warn_about_short_lease(&config, args.lease);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway serve: cannot start the runtime: {e}");
            return 2;
        }
    };
    rt.block_on(async move {
        let limits = Limits {
            max_body: args.max_body,
            max_depth: args.max_depth,
            sla: args.sla,
            telemetry: args.telemetry == "on",
            ..Limits::default()
        };
        let runtime = Runtime::build(Arc::new(config), None, tokio::time::Instant::now());
        let store = match crate::delivery::open(&args.store).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("gateway serve: cannot open the delivery store: {e}");
                return 2;
            }
        };
        let gw = Gateway::new(
            runtime,
            Shared::new(limits),
            admin_token,
            args.routes.clone(),
            Box::new(super::process_env),
            store,
        );
        let public = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("gateway serve: cannot listen on {}: {e}", args.listen);
                return 2;
            }
        };
        let admin = match tokio::net::TcpListener::bind(args.admin_listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("gateway serve: cannot listen on {}: {e}", args.admin_listen);
                return 2;
            }
        };
        let cfg = gw.runtime.load();
        tracing::info!(
            listen = %public.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            bots = cfg.config.bots.len(),
            routes = cfg.config.routes.len(),
            hash = %cfg.config.hash,
            "gateway serving"
        );
        drop(cfg);
        spawn_sighup(gw.clone());
        let poll = (args.reload_poll_secs > 0).then(|| Duration::from_secs(args.reload_poll_secs));
        let _watch = match crate::runtime::watch::spawn(gw.clone(), Duration::from_millis(args.reload_debounce_ms), poll) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the routes directory; reload with SIGHUP or POST /admin/reload");
                None
            }
        };
        let worker = crate::delivery::worker::spawn(
            gw.clone(),
            crate::delivery::worker::WorkerOptions {
                lease: args.lease,
                ..Default::default()
            },
        );
        let served = crate::http::run(public, admin, gw.clone(), shutdown_signal(), Duration::from_secs(args.shutdown_grace)).await;
        // Queued deliveries stay in the store; leased ones go back to it.
        worker.stop().await;
        gw.store.close().await;
        match served {
            Ok(()) => {
                tracing::info!("gateway stopped");
                0
            }
            Err(e) => {
                eprintln!("gateway serve: {e}");
                2
            }
        }
    })
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal()) // no colour codes in files and pipes
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn spawn_sighup(gw: Arc<Gateway>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let gw = gw.clone();
            let _ = tokio::task::spawn_blocking(move || gw.reload()).await;
        }
    });
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::raw::Dur::parse(s)
        .ok_or_else(|| format!("expected a duration like 250ms, 5s, 2m or 1h, got `{s}`"))
}

/// The shortest `--lease`: below it a try's budget (the lease less a tenth) is
/// too small for any real downstream, and leases would expire while claims run.
const MIN_LEASE: Duration = Duration::from_secs(1);

fn parse_lease(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_LEASE {
        return Err(format!("the lease must be at least 1s, got `{s}`"));
    }
    Ok(d)
}
