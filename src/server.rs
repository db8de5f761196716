//! The library entry point of `gateway serve`: [`serve`] (or [`Server::start`]
//! then [`Server::run`]) opens the store, builds the gateway, applies the first
//! load (start-up is a reload from nothing), starts the delivery worker, the
//! file watcher, the SIGHUP handler and the health probes, and serves both
//! listeners until `shutdown` completes.
//!
//! The binary (`cli::serve`) only turns flags into [`Settings`] and errors into
//! exit codes; the integration tests start the gateway through this same code.
//! Listeners and the shutdown future are arguments (mini-redis style), so tests
//! bind `127.0.0.1:0` and stop the server cleanly.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use tokio::net::TcpListener;

use crate::config::diagnostic::{Diagnostic, Format};
use crate::delivery::worker::{self, WorkerOptions};
use crate::http::listener::ConnLimits;
use crate::http::tls::{ServerTls, TlsFiles};
use crate::runtime::{EnvLookup, Gateway, Limits, ReloadOutcome, Shared};

/// Everything `serve` needs; settings that need a restart (never route files).
pub struct Settings {
    /// The routes directory.
    pub routes: PathBuf,
    /// The delivery store URL (`sqlite://…` or `postgres://…`).
    pub store: String,
    /// Body, depth, response and SLA limits; telemetry on/off; dedupe window.
    pub limits: Limits,
    /// `GATEWAY_ADMIN_TOKEN`.
    pub admin_token: Option<SecretString>,
    /// `--admin-hostnames`: names (besides IP literals and `localhost`) the
    /// admin listener answers to; any other `Host` gets 403 (DNS rebinding).
    pub admin_hostnames: Vec<String>,
    /// Where `${VAR}` values come from (the process environment in the binary).
    pub env: EnvLookup,
    /// How long the whole shutdown may take once it begins: in-flight requests
    /// and delivery tries finish within it, or are cut off (their deliveries
    /// go back to pending).
    pub shutdown_grace: Duration,
    /// Reload on file changes with this debounce; `None`: no file watcher.
    pub watch: Option<Duration>,
    /// Also rescan the routes directory this often (filesystems without events).
    pub poll: Option<Duration>,
    /// Reload on SIGHUP (the binary; tests reload through the admin API instead).
    pub sighup: bool,
    /// The delivery worker's lease, batch and poll interval.
    pub worker: WorkerOptions,
    /// Header and idle timeouts, connection cap of both listeners.
    pub connections: ConnLimits,
    /// `--tls-cert`/`--tls-key`: the public listener speaks TLS (the files are
    /// watched and read again when they change); `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
}

impl Settings {
    /// The binary's defaults for `routes`, with `env` as the `${VAR}` source.
    pub fn new(routes: PathBuf, store: String, env: EnvLookup) -> Self {
        Settings {
            routes,
            store,
            limits: Limits::default(),
            admin_token: None,
            admin_hostnames: Vec::new(),
            env,
            shutdown_grace: Duration::from_secs(10),
            watch: Some(Duration::from_millis(250)),
            poll: None,
            sighup: true,
            worker: WorkerOptions::default(),
            connections: ConnLimits::default(),
            tls: None,
        }
    }
}

/// Why the gateway did not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The first load was rejected: the diagnostics say why.
    #[error("the configuration is invalid; not starting")]
    InvalidConfig(Vec<Diagnostic>),
    #[error("routes directory {path}: {source}")]
    RoutesDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the delivery store: {0}")]
    Store(crate::store::StoreError),
    /// Another `serve` holds the SQLite store (SPEC §7.3): exit status 1.
    #[error("{0}")]
    StoreInUse(crate::store::StoreError),
    /// `--tls-cert`/`--tls-key` cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ServeError {
    /// `validate`'s text output of a rejected first load.
    pub fn diagnostics_text(&self, base: &std::path::Path) -> Option<String> {
        match self {
            ServeError::InvalidConfig(d) => {
                Some(crate::config::diagnostic::render(d, Format::Text, base))
            }
            _ => None,
        }
    }
}

/// A gateway whose first load is applied, ready to serve.
pub struct Server {
    gw: Arc<Gateway>,
    settings: Settings,
    /// The public listener's TLS, when set.
    tls: Option<Arc<ServerTls>>,
    /// A SQLite store's exclusive lock, held until the server is gone.
    lock: Option<crate::store::StoreLock>,
}

impl Server {
    /// Opens the store, builds the gateway and applies the first load. Must run
    /// inside a tokio runtime.
    pub async fn start(mut settings: Settings) -> Result<Server, ServeError> {
        std::fs::metadata(&settings.routes).map_err(|source| ServeError::RoutesDir {
            path: settings.routes.clone(),
            source,
        })?;
        let tls = match settings.tls.clone() {
            Some(files) => Some(ServerTls::load(files).map_err(ServeError::Tls)?),
            None => None,
        };
        // One SQLite file belongs to one serve process: lock it before opening
        // (the worker takes back the leases of the fixed owner at start).
        let lock = crate::store::lock_sqlite(&settings.store).map_err(|e| match e {
            crate::store::StoreError::InUse { .. } => ServeError::StoreInUse(e),
            e => ServeError::Store(e),
        })?;
        let opts = crate::store::StoreOptions {
            max_pending: Some(settings.limits.max_pending),
        };
        let store = crate::store::open_with(&settings.store, opts)
            .await
            .map_err(ServeError::Store)?;
        let env = std::mem::replace(&mut settings.env, Box::new(|_| None));
        let gw = Gateway::new(
            Shared::new(settings.limits.clone()),
            settings.admin_token.clone(),
            settings.routes.clone(),
            env,
            store,
        );
        let g = gw.clone();
        let first = tokio::task::spawn_blocking(move || g.reload())
            .await
            .map_err(std::io::Error::other)?;
        if let ReloadOutcome::Rejected { diagnostics, .. } = first {
            gw.store.close().await;
            return Err(ServeError::InvalidConfig(diagnostics));
        }
        worker::warn_about_short_lease(&gw.runtime.load().config, settings.worker.lease);
        Ok(Server {
            gw,
            settings,
            tls,
            lock,
        })
    }

    /// The running gateway (its runtime, store and metrics).
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gw
    }

    /// Starts the worker, watcher and SIGHUP handler, serves both listeners
    /// until `shutdown` completes, then stops: no new connections, in-flight
    /// requests finish within the grace, leased deliveries go back to the store.
    pub async fn run(
        self,
        public: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Server {
            gw,
            settings,
            tls,
            lock,
        } = self;
        let sighup = settings
            .sighup
            .then(|| spawn_sighup(gw.clone(), tls.clone()));
        // The certificate and key are read again when their files change.
        let _tls_watch = match (&tls, settings.watch) {
            (Some(t), Some(debounce)) => match t.watch(debounce) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the TLS files; reload them with SIGHUP");
                    None
                }
            },
            _ => None,
        };
        let _watch = settings.watch.and_then(|debounce| {
            match crate::runtime::watch::spawn(gw.clone(), debounce, settings.poll) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the routes directory; reload with SIGHUP or POST /admin/reload");
                    None
                }
            }
        });
        let worker = worker::spawn(gw.clone(), settings.worker.clone());
        // Logged once SIGHUP, the watcher and the worker are in place: a signal or
        // a file change after this line is never missed.
        {
            let cfg = gw.runtime.load();
            tracing::info!(
                listen = %public.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                bots = cfg.config.bots.len(),
                routes = cfg.config.routes.len(),
                generation = cfg.generation,
                hash = %cfg.config.hash,
                tls = tls.is_some(),
                egress_proxy = %gw
                    .shared
                    .limits
                    .egress_proxy
                    .as_ref()
                    .map_or_else(|| "off".to_owned(), |p| p.shown()),
                "gateway serving"
            );
        }
        // SIGTERM ends within the grace (SPEC §7.3), the worker included: the
        // listeners and the worker stop together, both by the grace less a
        // reserve in which the worker returns its leases and the store closes.
        let grace = settings.shutdown_grace;
        let reserve = shutdown_reserve(grace);
        let (began_tx, began_rx) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            shutdown.await;
            let _ = began_tx.send(tokio::time::Instant::now());
        };
        let worker_stopped = async move {
            let began = began_rx
                .await
                .unwrap_or_else(|_| tokio::time::Instant::now());
            let tries_by = began + grace.saturating_sub(reserve);
            let stop = worker.stop_by(tries_by);
            let end = (began + grace).max(tries_by + MIN_RESERVE);
            if tokio::time::timeout_at(end, stop).await.is_err() {
                tracing::warn!(
                    "the delivery worker did not stop within the shutdown grace (the store did \
                     not answer); its leases expire on their own"
                );
            }
        };
        let public_grace = grace.saturating_sub(reserve);
        let (served, ()) = tokio::join!(
            crate::http::run(
                public,
                admin,
                gw.clone(),
                crate::http::admin::AdminOptions {
                    hostnames: settings.admin_hostnames.clone(),
                },
                settings.connections,
                shutdown,
                public_grace,
                tls,
            ),
            worker_stopped
        );
        if let Some(h) = sighup {
            h.abort();
        }
        // Queued deliveries stay in the store; leased ones went back to it.
        if tokio::time::timeout(reserve.max(MIN_RESERVE), gw.store.close())
            .await
            .is_err()
        {
            tracing::warn!("the delivery store did not close within the shutdown grace");
        }
        drop(lock);
        served?;
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// The end of the shutdown grace kept for returning leases and closing the
/// store: a tenth of the grace, at most 500 ms.
fn shutdown_reserve(grace: Duration) -> Duration {
    (grace / 10).min(Duration::from_millis(500))
}

/// The least time given to returning leases, and to closing the store, even
/// with a grace of (nearly) zero.
const MIN_RESERVE: Duration = Duration::from_millis(100);

/// Starts the gateway of `settings` and serves `public` and `admin` until `shutdown`.
pub async fn serve(
    settings: Settings,
    public: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    Server::start(settings)
        .await?
        .run(public, admin, shutdown)
        .await
}

/// Reloads on each SIGHUP, through the one reload path (and the TLS files).
/// The handler is installed before this returns (a SIGHUP right after start-up
/// reloads instead of ending the process).
fn spawn_sighup(gw: Arc<Gateway>, tls: Option<Arc<ServerTls>>) -> tokio::task::JoinHandle<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let hup = signal(SignalKind::hangup());
        tokio::spawn(async move {
            let Ok(mut hup) = hup else {
                tracing::warn!("cannot handle SIGHUP; reload with POST /admin/reload");
                return;
            };
            while hup.recv().await.is_some() {
                let gw = gw.clone();
                let tls = tls.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    gw.reload();
                    if let Some(t) = tls {
                        t.reload_logged();
                    }
                })
                .await;
            }
        })
    }
    #[cfg(not(unix))]
    tokio::spawn(async move { drop((gw, tls)) })
}
