//! `gateway serve`: flags and `GATEWAY_*` → [`Settings`]; binds the two
//! listeners; SIGTERM/SIGINT → shutdown; errors → exit codes. Everything else
//! (the first load, worker, watcher, SIGHUP, listeners) is [`crate::server`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use secrecy::SecretString;

use crate::http::listener::ConnLimits;
use crate::http::tls::TlsFiles;
use crate::runtime::{EgressProxy, Limits};
use crate::server::{ServeError, Server, Settings};

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
    /// Host names the admin listener answers to, besides IP addresses and `localhost`
    /// (comma-separated): a request with any other `Host` is refused (DNS rebinding).
    #[arg(long, env = "GATEWAY_ADMIN_HOSTNAMES", value_delimiter = ',', value_name = "NAMES",
          value_parser = parse_hostname)]
    pub admin_hostnames: Vec<String>,
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
    /// How long the shutdown after SIGTERM/SIGINT may take: in-flight requests and delivery
    /// tries still under way then are cut off (their deliveries go back to pending). A duration
    /// (2s, 500ms) or whole seconds.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_grace)]
    pub shutdown_grace: Duration,
    /// Most deliveries pending (accepted, not yet delivered nor dead); async accepts over it
    /// answer 503 `queue_full` and store nothing.
    #[arg(long, env = "GATEWAY_MAX_PENDING", default_value_t = crate::store::DEFAULT_MAX_PENDING,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pending: u64,
    /// How long dead letters are kept, from when they died; older ones are purged (e.g. 30d, 12h).
    #[arg(long, env = "GATEWAY_DEAD_RETENTION", default_value = "30d", value_parser = parse_long_duration)]
    pub dead_retention: Duration,
    /// How long an idempotency key dedupes inbound duplicates, from its first request (at
    /// least 1s; e.g. 24h, 30m).
    #[arg(long, env = "GATEWAY_DEDUPE_WINDOW", default_value = "24h", value_parser = parse_dedupe_window)]
    pub dedupe_window: Duration,
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
    /// A connection that has not sent complete request headers by then is closed.
    #[arg(long, env = "GATEWAY_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// A request body not fully received by then is answered 408 `body_timeout`.
    #[arg(long, env = "GATEWAY_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    #[arg(long, env = "GATEWAY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Open connections per listener at most; more wait until one closes.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Serve the public listener over TLS (1.2+) with this PEM certificate chain; needs
    /// `--tls-key`. Read again when the file changes.
    #[arg(long, env = "GATEWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, env = "GATEWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Send every downstream, token and health-probe call through this HTTP proxy
    /// (`http://[user:password@]host:port`; CONNECT for https). Proxy variables of the
    /// environment are never used.
    #[arg(long, env = "GATEWAY_EGRESS_PROXY", value_parser = parse_proxy)]
    pub egress_proxy: Option<EgressProxy>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn run(args: ServeArgs) -> u8 {
    // Held until `run` returns: dropping it flushes the lines still queued.
    let _log_writer = init_tracing(args.log_format);
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
    let mut settings = Settings::new(
        args.routes.clone(),
        args.store.clone(),
        Box::new(super::process_env),
    );
    settings.limits = Limits {
        max_body: args.max_body,
        max_depth: args.max_depth,
        sla: args.sla,
        telemetry: args.telemetry == "on",
        body_timeout: args.body_timeout,
        dedupe_window: args.dedupe_window,
        dead_retention: args.dead_retention,
        max_pending: args.max_pending,
        egress_proxy: args.egress_proxy.clone(),
        ..Limits::default()
    };
    settings.connections = ConnLimits {
        header_timeout: args.header_timeout,
        idle_timeout: args.idle_timeout,
        max_connections: args.max_connections,
    };
    settings.admin_token = admin_token;
    settings.admin_hostnames = args.admin_hostnames.clone();
    settings.shutdown_grace = args.shutdown_grace;
    settings.watch = Some(Duration::from_millis(args.reload_debounce_ms));
    settings.poll = (args.reload_poll_secs > 0).then(|| Duration::from_secs(args.reload_poll_secs));
    settings.worker.lease = args.lease;
    settings.tls = match (args.tls_cert.clone(), args.tls_key.clone()) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => None,
    };
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
    let code = rt.block_on(async move {
        let server = match Server::start(settings).await {
            Ok(s) => s,
            Err(e) => return exit_code(e),
        };
        let public = match crate::http::listener::bind(args.listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("gateway serve: cannot listen on {}: {e}", args.listen);
                return 2;
            }
        };
        let admin = match crate::http::listener::bind(args.admin_listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("gateway serve: cannot listen on {}: {e}", args.admin_listen);
                return 2;
            }
        };
        match server.run(public, admin, shutdown_signal()).await {
            Ok(()) => 0,
            Err(e) => exit_code(e),
        }
    });
    // The shutdown was bounded by the grace: tasks still running (a request
    // cut off, a blocking reload) are not waited for.
    rt.shutdown_background();
    code
}

/// Errors → messages and exit codes (1: invalid configuration, 2: I/O).
fn exit_code(e: ServeError) -> u8 {
    let base = std::env::current_dir().unwrap_or_default();
    if let Some(text) = e.diagnostics_text(&base) {
        eprint!("{text}");
        eprintln!("gateway serve: {e}");
        return 1;
    }
    eprintln!("gateway serve: {e}");
    // SPEC §7.3: a store file another serve holds is a refusal, like a bad config.
    if matches!(e, ServeError::StoreInUse(_)) {
        return 1;
    }
    2
}

/// Logs to stderr through a writer thread: a request formats its line and
/// queues it, instead of writing to stderr under a lock (about 12% of a
/// webhook's CPU at the default `info` level, issue 18). Not lossy: when the
/// queue is full a request waits rather than a line being dropped. The thread
/// buffers what it finds queued and flushes when the queue is empty: one
/// `write` for a burst of lines instead of one per line (stderr itself is
/// unbuffered), and a lone line is written at once.
fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("gateway-log")
        .finish(crate::telemetry::log_redact::Masking(
            std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr()),
        ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal()) // no colour codes in files and pipes
        .with_timer(crate::telemetry::log_format::CachedSecondTime)
        // every line masked of `${VAR}` values (SPEC §7.4), on the writer thread
        .with_writer(writer);
    let _ = match format {
        // (the same text as the default field format, cheaper without colours)
        LogFormat::Text => builder
            .fmt_fields(crate::telemetry::log_format::PlainFields)
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    guard
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

fn parse_proxy(s: &str) -> Result<EgressProxy, String> {
    EgressProxy::parse(s)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::raw::Dur::parse(s)
        .ok_or_else(|| format!("expected a duration like 250ms, 5s, 2m or 1h, got `{s}`"))
}

/// `--shutdown-grace`: a duration, or (as before durations were accepted) whole seconds.
fn parse_grace(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => parse_duration(s),
    }
}

/// A duration flag that may also be given in days (`30d`).
fn parse_long_duration(s: &str) -> Result<Duration, String> {
    if let Some(days) = s.strip_suffix('d')
        && let Ok(n) = days.parse::<u64>()
    {
        return n
            .checked_mul(24 * 60 * 60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("`{s}` is too long"));
    }
    parse_duration(s)
        .map_err(|_| format!("expected a duration like 30d, 24h, 30m or 90s, got `{s}`"))
}

fn parse_dedupe_window(s: &str) -> Result<Duration, String> {
    let d = parse_long_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("the dedupe window must be at least 1s, got `{s}`"));
    }
    Ok(d)
}

/// One `--admin-hostnames` entry: a DNS name as the `Host` header carries it,
/// without scheme or port (IP addresses and `localhost` need no entry).
fn parse_hostname(s: &str) -> Result<String, String> {
    let name = s.trim().to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(name)
    } else {
        Err(format!(
            "expected a host name like gateway.internal (no scheme, port or path), got `{s}`"
        ))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_grace_is_a_duration_or_whole_seconds() {
        assert_eq!(parse_grace("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_grace("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_grace("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_grace("0"), Ok(Duration::ZERO));
        assert!(parse_grace("soon").is_err());
    }

    #[test]
    fn admin_hostnames_are_bare_names() {
        assert_eq!(
            parse_hostname(" Gateway.Internal "),
            Ok("gateway.internal".into())
        );
        assert_eq!(parse_hostname("ops-1"), Ok("ops-1".into()));
        for bad in [
            "",
            "gw.example:9090",
            "http://gw",
            "gw..example",
            "gw/x",
            "a b",
        ] {
            assert!(parse_hostname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retention_and_window_take_days() {
        assert_eq!(
            parse_long_duration("30d"),
            Ok(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(parse_long_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_long_duration("d").is_err());
        assert!(parse_dedupe_window("500ms").is_err());
        assert_eq!(parse_dedupe_window("1s"), Ok(Duration::from_secs(1)));
    }
}
