//! What is running: a [`Runtime`] built from one [`Config`] generation, plus
//! the per-route state that must outlive a reload (breaker, 429 pause,
//! bulkhead). Start-up is a build from nothing; a reload builds from the new
//! config and the previous runtime, carrying state over for routes whose
//! downstream and breaker are unchanged (see [`RouteState::key`]).
//!
//! Never parses configuration and never checks it again: `config` did.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

pub mod client;
pub mod gateway;
pub mod health;
pub mod reload;
pub mod watch;

pub use gateway::{EnvLookup, Gateway, ReloadReport};
pub use reload::ReloadOutcome;

use crate::breaker::Breaker;
use crate::config::model::{Config, DownstreamTls, OutboundAuth, Route};
use crate::downstream::oauth2::TokenCache;
use crate::ratelimit::TokenBucket;
use crate::telemetry::latency::RouteLatency;
use crate::telemetry::metrics::Metrics;

/// Things shared by every runtime generation: the HTTP client and token cache.
pub struct Shared {
    /// The client of every downstream without `tls` settings.
    pub client: reqwest::Client,
    pub tokens: TokenCache,
    pub limits: Limits,
    pub metrics: Metrics,
    /// One client per downstream `tls` settings (by [`DownstreamTls::key`]),
    /// built when a configuration is applied; keys no route uses are dropped.
    tls_clients: Mutex<HashMap<String, reqwest::Client>>,
}

/// Settings from flags/environment (never from route files).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest inbound body (SPEC default 2 MiB).
    pub max_body: usize,
    /// Deepest JSON nesting accepted (SPEC default 64).
    pub max_depth: usize,
    /// Largest downstream response body read.
    pub max_response: usize,
    /// Latency SLA for `/metrics/latency` and the status page.
    pub sla: Duration,
    /// Count metrics and record latency windows (off only to measure their cost).
    pub telemetry: bool,
    /// How long an idempotency key dedupes inbound duplicates (SPEC §5 step 7).
    pub dedupe_window: Duration,
    /// A request body not fully received by then → 408 `body_timeout` (SPEC §7.1).
    pub body_timeout: Duration,
    /// `--dead-retention`: dead letters older than this are purged (SPEC §7.3).
    pub dead_retention: Duration,
    /// `--max-pending`: accepts are refused while this many deliveries are pending (SPEC §7.3).
    pub max_pending: u64,
    /// An OAuth2 token younger than this is not replaced after a downstream
    /// 401: the 401 is the answer (SPEC §7.3). Not a flag; tests shorten it.
    pub token_refresh_min_age: Duration,
    /// `--egress-proxy`: every downstream, token and probe call goes through it (SPEC §8).
    pub egress_proxy: Option<EgressProxy>,
}

/// The HTTP proxy of `--egress-proxy` (`http://[user:password@]host:port`).
/// `Debug` shows no credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct EgressProxy(pub url::Url);

impl EgressProxy {
    /// An `http://` or `https://` URL with a host and nothing after the authority.
    pub fn parse(s: &str) -> Result<EgressProxy, String> {
        let url = url::Url::parse(s).map_err(|e| format!("not a URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err("expected http://host:port (an HTTP proxy)".into());
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err("expected http://host:port, without a path".into());
        }
        Ok(EgressProxy(url))
    }

    /// `scheme://host:port`, without credentials: for logs.
    pub fn shown(&self) -> String {
        let u = &self.0;
        match u.port_or_known_default() {
            Some(p) => format!("{}://{}:{p}", u.scheme(), u.host_str().unwrap_or_default()),
            None => format!("{}://{}", u.scheme(), u.host_str().unwrap_or_default()),
        }
    }
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EgressProxy({})", self.shown())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 2 * 1024 * 1024,
            max_depth: 64,
            max_response: 1024 * 1024,
            sla: Duration::from_secs(2),
            telemetry: true,
            dedupe_window: crate::store::DEFAULT_DEDUPE_WINDOW,
            body_timeout: Duration::from_secs(30),
            dead_retention: crate::store::DEFAULT_DEAD_RETENTION,
            max_pending: crate::store::DEFAULT_MAX_PENDING,
            token_refresh_min_age: crate::downstream::oauth2::MIN_REFRESH_AGE,
            egress_proxy: None,
        }
    }
}

impl Shared {
    pub fn new(limits: Limits) -> Self {
        let telemetry = limits.telemetry;
        let client = client_builder(&limits)
            .build()
            .expect("the HTTP client builds (is a rustls crypto provider installed?)");
        let tokens =
            TokenCache::new(client.clone()).with_min_refresh_age(limits.token_refresh_min_age);
        Shared {
            client,
            tokens,
            limits,
            metrics: Metrics {
                enabled: telemetry,
                ..Metrics::new()
            },
            tls_clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client for a downstream with these `tls` settings: the shared one
    /// without; `None` when its client could not be built (never sent without
    /// its TLS settings).
    pub fn client_for(&self, tls: Option<&DownstreamTls>) -> Option<reqwest::Client> {
        let Some(tls) = tls else {
            return Some(self.client.clone());
        };
        let mut clients = self.tls_clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&tls.key) {
            return Some(c.clone());
        }
        let c = build_tls_client(&self.limits, tls).ok()?;
        clients.insert(tls.key.clone(), c.clone());
        Some(c)
    }

    /// Builds the client of every `tls` setting of `config` not built yet, and
    /// drops those no route uses. `Err` names the files of one that cannot be built.
    pub fn prepare_clients(&self, config: &Config) -> Result<(), String> {
        let used: HashMap<&str, &DownstreamTls> = config
            .routes
            .values()
            .filter_map(|r| r.downstream.tls.as_deref())
            .map(|t| (t.key.as_str(), t))
            .collect();
        let mut clients = self.tls_clients.lock().unwrap_or_else(|e| e.into_inner());
        for (key, tls) in &used {
            if !clients.contains_key(*key) {
                let c = build_tls_client(&self.limits, tls).map_err(|e| {
                    let files: Vec<String> =
                        tls.files.iter().map(|f| f.display().to_string()).collect();
                    format!(
                        "the TLS settings of {} cannot be used: {e}",
                        files.join(", ")
                    )
                })?;
                clients.insert((*key).to_owned(), c);
            }
        }
        clients.retain(|k, _| used.contains_key(k.as_str()));
        Ok(())
    }
}

/// Every outbound client's settings: no redirects, no proxy from the
/// environment (only `--egress-proxy`, for every destination), pooled
/// keep-alive connections.
fn client_builder(limits: &Limits) -> reqwest::ClientBuilder {
    let b = reqwest::Client::builder()
        // Redirects are not followed: a CRM answering 3xx is a misconfiguration,
        // and following could carry credentials to another host.
        .redirect(reqwest::redirect::Policy::none())
        // Predictable on servers: proxies from the environment are not used
        // (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY are all ignored).
        .no_proxy()
        // reqwest's own retry layer (HTTP/2 and HTTP/3 refusals only) clones every
        // request before sending it in case it is needed; our retry rule
        // (`downstream::retry`) is the only one, and the clone is not made.
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256);
    match &limits.egress_proxy {
        // Plain HTTP is forwarded by the proxy, HTTPS tunnelled with CONNECT;
        // credentials in the proxy URL go as Proxy-Authorization.
        Some(p) => match reqwest::Proxy::all(p.0.clone()) {
            Ok(proxy) => b.proxy(proxy),
            // `EgressProxy::parse` accepted it: reqwest takes every such URL
            Err(_) => b,
        },
        None => b,
    }
}

/// A client trusting `tls.ca` besides the system's roots and presenting
/// `tls.identity` when the server asks for a client certificate.
fn build_tls_client(limits: &Limits, tls: &DownstreamTls) -> reqwest::Result<reqwest::Client> {
    let mut b = client_builder(limits);
    for ca in &tls.ca {
        b = b.add_root_certificate(ca.clone());
    }
    if let Some(id) = &tls.identity {
        b = b.identity(id.clone());
    }
    b.build()
}

/// One configuration generation with its per-route state.
pub struct Runtime {
    pub config: Arc<Config>,
    pub generation: u64,
    pub routes: HashMap<String, Arc<RouteState>>,
    /// The inbound token bucket of each bot with a `rate_limit`; kept across
    /// reloads while the bot's limit is unchanged.
    pub bot_limits: HashMap<String, Arc<TokenBucket>>,
}

/// State of one route that lives as long as the route is unchanged.
pub struct RouteState {
    pub route: Arc<Route>,
    pub breaker: Breaker,
    /// `max_in_flight` permits.
    pub bulkhead: Arc<Semaphore>,
    /// Paused by a 429 until this instant (shared with the previous generation's state).
    paused_until: Arc<Mutex<Option<Instant>>>,
    key: String,
    /// Identity of this state across generations; true once its health probe task runs.
    pub(crate) identity: Arc<std::sync::atomic::AtomicBool>,
    /// Sliding-window latencies (end to end, downstream).
    pub latency: Arc<RouteLatency>,
    /// Answer counts and the last error, for the status page.
    pub stats: Arc<RouteStats>,
    /// Pre-resolved metric handles (made on first use).
    metric_handles: Arc<std::sync::OnceLock<crate::telemetry::metrics::RouteMetrics>>,
    /// The downstream's outbound token bucket (`rate_limit`), kept across
    /// reloads while its limit is unchanged.
    pub outbound: Option<Arc<TokenBucket>>,
}

/// How long the latency windows of `/metrics/latency` and the status page reach back.
pub const LATENCY_WINDOW: Duration = Duration::from_secs(300);

/// Answers of one route, for the status page.
#[derive(Default)]
pub struct RouteStats {
    pub answered: std::sync::atomic::AtomicU64,
    /// Answers with a 5xx status (downstream failures, deadline, open/paused without fallback).
    pub errors: std::sync::atomic::AtomicU64,
    /// When and what the last error was.
    pub last_error: Mutex<Option<(std::time::SystemTime, u16, String)>>,
}

impl RouteStats {
    pub fn record(&self, status: u16, kind: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        self.answered.fetch_add(1, Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Relaxed);
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((std::time::SystemTime::now(), status, kind.to_owned()));
        }
    }
}

impl RouteState {
    fn new(route: Arc<Route>, now: Instant) -> Self {
        let key = Self::key(&route);
        RouteState {
            breaker: Breaker::new(route.breaker.clone(), now),
            bulkhead: Arc::new(Semaphore::new(route.downstream.max_in_flight as usize)),
            paused_until: Arc::new(Mutex::new(None)),
            key,
            identity: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            latency: Arc::new(RouteLatency::new(LATENCY_WINDOW, now)),
            stats: Arc::new(RouteStats::default()),
            metric_handles: Default::default(),
            outbound: route
                .downstream
                .rate_limit
                .map(|l| Arc::new(TokenBucket::new(l, now))),
            route,
        }
    }

    /// What a route's state depends on: its downstream (method, URL, auth identity,
    /// bulkhead) and its breaker settings. Equal keys across a reload keep the state.
    pub fn key(route: &Route) -> String {
        let ds = &route.downstream;
        let auth = match &ds.auth {
            OutboundAuth::OAuth2(c) => format!("oauth2 {} {}", c.token_url, c.client_id),
            OutboundAuth::Basic(user, _) => format!("basic {user}"),
            other => other.kind().to_string(),
        };
        format!(
            "{} {} {} {} {:?} {:?}",
            ds.method,
            ds.url.source(),
            auth,
            ds.max_in_flight,
            route.breaker.settings(),
            route.health
        )
    }

    /// This route's metric handles.
    pub fn metrics(&self, m: &Metrics) -> &crate::telemetry::metrics::RouteMetrics {
        self.metric_handles.get_or_init(|| {
            crate::telemetry::metrics::RouteMetrics::new(m, &self.route.name, &self.route.bots)
        })
    }

    /// When the route is paused by a 429, until when.
    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        let mut p = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        match *p {
            Some(t) if t > now => Some(t),
            Some(_) => {
                *p = None;
                None
            }
            None => None,
        }
    }

    /// Pauses the route until `until` (extends, never shortens, a pause).
    pub fn pause(&self, until: Instant) {
        let mut p = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none_or(|t| t < until) {
            *p = Some(until);
        }
    }
}

impl Runtime {
    /// Nothing running: generation 0, no bots, no routes (before the first load).
    pub fn empty() -> Runtime {
        Runtime {
            config: Arc::new(Config::default()),
            generation: 0,
            routes: HashMap::new(),
            bot_limits: HashMap::new(),
        }
    }

    /// Builds the runtime for `config`, keeping the state of unchanged routes from `prev`.
    pub fn build(config: Arc<Config>, prev: Option<&Runtime>, now: Instant) -> Runtime {
        let mut routes = HashMap::with_capacity(config.routes.len());
        for (name, route) in &config.routes {
            let state = match prev.and_then(|p| p.routes.get(name)) {
                Some(old) if old.key == RouteState::key(route) => Arc::new(RouteState {
                    route: route.clone(),
                    breaker: old.breaker.clone(),
                    bulkhead: old.bulkhead.clone(),
                    paused_until: old.paused_until.clone(),
                    key: old.key.clone(),
                    identity: old.identity.clone(),
                    latency: old.latency.clone(),
                    stats: old.stats.clone(),
                    // the bots served may have changed: resolve the handles again
                    metric_handles: Default::default(),
                    outbound: match (&old.outbound, route.downstream.rate_limit) {
                        (Some(b), Some(l)) if b.limit() == l => Some(b.clone()),
                        (_, l) => l.map(|l| Arc::new(TokenBucket::new(l, now))),
                    },
                }),
                _ => Arc::new(RouteState::new(route.clone(), now)),
            };
            routes.insert(name.clone(), state);
        }
        let mut bot_limits = HashMap::new();
        for (id, bot) in &config.bots {
            let Some(limit) = bot.rate_limit else {
                continue;
            };
            let bucket = match prev.and_then(|p| p.bot_limits.get(id)) {
                Some(old) if old.limit() == limit => old.clone(),
                _ => Arc::new(TokenBucket::new(limit, now)),
            };
            bot_limits.insert(id.clone(), bucket);
        }
        Runtime {
            config,
            generation: prev.map_or(1, |p| p.generation + 1),
            routes,
            bot_limits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EgressProxy;

    #[test]
    fn an_egress_proxy_is_an_http_url_shown_without_credentials() {
        let p = EgressProxy::parse("http://user:s3cret@proxy.corp:3128").unwrap();
        assert_eq!(p.shown(), "http://proxy.corp:3128");
        assert_eq!(format!("{p:?}"), "EgressProxy(http://proxy.corp:3128)");
        assert_eq!(
            EgressProxy::parse("https://proxy.corp/").unwrap().shown(),
            "https://proxy.corp:443"
        );
        for bad in [
            "proxy.corp:3128",
            "socks5://proxy.corp:1080",
            "http://proxy.corp:3128/path",
            "http://proxy.corp:3128/?q=1",
            "http://",
        ] {
            assert!(EgressProxy::parse(bad).is_err(), "{bad}");
        }
    }
}
