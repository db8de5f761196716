//! The application context: the one [`Gateway`] that the listeners, the
//! delivery worker, the file watcher, the signal handler and the health probes
//! share. It holds what is running (the current [`Runtime`], swapped whole on
//! reload), what every generation shares ([`Shared`]), the store, and what a
//! reload needs (routes directory, `${VAR}` lookup, parse cache, the lock that
//! serialises reloads).
//!
//! A gateway starts with nothing running (generation 0, no bots, no routes):
//! start-up is the first [`Gateway::reload`], the same path as every later
//! reload. Never serves HTTP itself: `http` and `delivery::worker` depend on
//! this module, never the reverse.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use secrecy::SecretString;

use super::reload::ReloadOutcome;
use super::{Runtime, Shared};
use crate::config::compile::ParseCache;
use crate::store::Store;

/// A `${VAR}` lookup (the process environment in `serve`; a map in tests).
pub type EnvLookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Everything the running parts share.
pub struct Gateway {
    /// The running configuration; swapped whole on reload, so a request keeps
    /// the generation it started with. Generation 0 (empty) until the first load.
    pub runtime: ArcSwap<Runtime>,
    /// What every generation shares: HTTP client, token cache, limits, metrics.
    pub shared: Arc<Shared>,
    /// Protects the admin listener when set (`GATEWAY_ADMIN_TOKEN`).
    pub admin_token: Option<SecretString>,
    /// Outcome of the last load (start-up or reload), for `/admin/status`.
    pub last_reload: Mutex<ReloadReport>,
    /// The routes directory, for reloads.
    pub routes_dir: PathBuf,
    /// Where `${VAR}` values come from at each load.
    pub env: EnvLookup,
    /// Parsed route files of earlier loads: a reload re-parses only changed files.
    pub parse_cache: ParseCache,
    /// Durable deliveries (async routes, `on_failure: queue`).
    pub store: Arc<dyn Store>,
    /// Wakes the delivery worker when a delivery is accepted.
    pub delivery_wake: tokio::sync::Notify,
    /// Held for the whole of a reload (load, build, swap, report), so reloads
    /// from the watcher, SIGHUP, the admin API and start-up run one at a time
    /// and can never store out of order.
    pub(super) reload_lock: Mutex<()>,
    /// `/readyz`'s last store check: when, and whether the store answered.
    /// Refreshed at most once a second, so the unauthenticated probe cannot
    /// load the store (SPEC §7.1).
    pub readiness: tokio::sync::Mutex<Option<(tokio::time::Instant, bool)>>,
}

/// What the last load did (`/admin/status`, the status page, `POST /admin/reload`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadReport {
    /// When it ran (RFC 3339, UTC).
    pub at: String,
    /// `applied`, `unchanged` or `rejected`.
    pub result: &'static str,
    /// False only when rejected.
    pub ok: bool,
    /// The generation serving after it.
    pub generation: u64,
    /// The hash of the configuration serving after it.
    pub hash: String,
    /// Every diagnostic of the load (errors and warnings), as text.
    pub diagnostics: Vec<String>,
}

impl Gateway {
    /// A gateway with nothing running yet: call [`Gateway::reload`] to load the
    /// routes directory (a `Rejected` first load means the gateway cannot start).
    pub fn new(
        shared: Shared,
        admin_token: Option<SecretString>,
        routes_dir: PathBuf,
        env: EnvLookup,
        store: Arc<dyn Store>,
    ) -> Arc<Self> {
        Arc::new(Gateway {
            runtime: ArcSwap::from_pointee(Runtime::empty()),
            shared: Arc::new(shared),
            admin_token,
            last_reload: Mutex::new(ReloadReport {
                at: String::new(),
                result: "none",
                ok: true,
                generation: 0,
                hash: String::new(),
                diagnostics: vec![],
            }),
            routes_dir,
            env,
            parse_cache: ParseCache::default(),
            store,
            delivery_wake: tokio::sync::Notify::new(),
            reload_lock: Mutex::new(()),
            readiness: tokio::sync::Mutex::new(None),
        })
    }

    /// Loads the routes directory and applies it when it is valid and changed
    /// (then starts the health probes of new route states). Blocking (file I/O):
    /// call it from `spawn_blocking` inside a tokio runtime.
    pub fn reload(self: &Arc<Self>) -> ReloadOutcome {
        let outcome = super::reload::apply(self);
        super::health::start_probes(self);
        outcome
    }

    /// True once a configuration is running (the first load was applied).
    pub fn is_running(&self) -> bool {
        self.runtime.load().generation > 0
    }

    /// The last load's report.
    pub fn last_reload(&self) -> ReloadReport {
        self.last_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
