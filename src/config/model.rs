//! The compiled configuration: what `config::compile` produces and the runtime
//! consumes. Types here cannot hold bad states (durations are durations,
//! templates are compiled, schemas are compiled, references resolve), so
//! runtime code never re-checks configuration.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use crate::auth::InboundAuth;
use crate::breaker::BreakerConfig;
use crate::downstream::retry::RetryPolicy;
use crate::payload::PayloadSchema;
use crate::template::Template;

pub use super::raw::{Mode, OnFailure};
pub use crate::downstream::classify::StatusSet;
pub use crate::downstream::oauth2::{ClientAuth, ClientCredentials};

/// One immutable configuration generation.
#[derive(Debug, Default)]
pub struct Config {
    pub bots: BTreeMap<String, Arc<Bot>>,
    pub routes: BTreeMap<String, Arc<Route>>,
    /// SHA-256 (hex) over every route file and referenced schema file, path and content.
    pub hash: String,
    /// Masks the `${VAR}` values this configuration read, in text shown to
    /// people (`gateway render`).
    pub redactor: crate::config::redact::Redactor,
    /// Route files that were read.
    pub files: Vec<PathBuf>,
    /// Schema files that were read (their directories are watched too).
    pub schema_files: Vec<PathBuf>,
    /// Files read for `${file:…}` values and downstream `tls`, in path order:
    /// their content is in `hash` (keyed digests) and their directories are watched.
    pub referenced_files: Vec<PathBuf>,
}

impl Config {
    /// The route for `intent` (and `score`) on `bot`: exact intent unless the score is below the
    /// route's `min_score`, else the bot's default (`*`) route.
    pub fn route_for(
        &self,
        bot: &Bot,
        intent: Option<&str>,
        score: Option<f64>,
    ) -> Option<&Arc<Route>> {
        if let Some(name) = intent.and_then(|i| bot.routes.get(i)) {
            let route = &self.routes[name];
            let below = matches!((route.min_score, score), (Some(min), Some(s)) if s < min)
                || (route.min_score.is_some() && score.is_none());
            if !below {
                return Some(route);
            }
        }
        bot.default_route.as_ref().map(|name| &self.routes[name])
    }
}

/// Where something was defined, for messages and the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    pub line: u32,
}

#[derive(Debug)]
pub struct Bot {
    pub id: String,
    pub auth: InboundAuth,
    pub schema: Option<Arc<PayloadSchema>>,
    pub intent_path: String,
    pub score_path: String,
    /// Inbound webhooks per second (`rate_limit`), when limited.
    pub rate_limit: Option<crate::ratelimit::RateLimit>,
    /// intent → route name (exact-intent routes of this bot).
    pub routes: BTreeMap<String, String>,
    /// The `*` route.
    pub default_route: Option<String>,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    Exact(String),
    /// `*`: the bot's default route.
    Default,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// Bots served; every bot when the route named none.
    pub bots: Vec<String>,
    pub intent: Intent,
    pub min_score: Option<f64>,
    pub schema: Option<Arc<PayloadSchema>>,
    pub mode: Mode,
    pub deadline: Duration,
    pub idempotency_key: Option<Template>,
    pub strict: bool,
    /// Payload fields (JSON Pointers) this route opted to log.
    pub log_fields: Vec<String>,
    pub downstream: Downstream,
    pub body: Option<Template>,
    /// The URL or the body holds a `${VAR}` value: a stored delivery keeps them
    /// masked and the worker renders them again at send time (SPEC §7.4).
    pub secret_parts: bool,
    pub response: Option<ResponseSpec>,
    pub retry: RetryPolicy,
    pub breaker: BreakerConfig,
    /// Health probe run while the breaker is open.
    pub health: Option<HealthSettings>,
    pub fallback: Option<FallbackSpec>,
    pub on_failure: OnFailure,
    pub examples: Vec<Example>,
    /// The `also:` targets (SPEC §9), each an async route named `<route>/<name>`
    /// that is also in [`Config::routes`] (the same `Arc`).
    pub also: Vec<Arc<Route>>,
    /// For an `also` target: the route it belongs to. A target claims no
    /// intent; it is reached only through that route.
    pub also_of: Option<String>,
    pub source: Source,
}

#[derive(Debug)]
pub struct Downstream {
    pub method: http::Method,
    pub url: Template,
    /// The URL template as written, before `${VAR}` expansion: what admin
    /// answers show, so no environment value is ever shown (SPEC §7.4).
    pub url_shown: String,
    /// `scheme://host[:port]` fixed by the file; a rendered URL always starts with it.
    pub origin: String,
    /// `origin` + `/`, parsed once: rendered URLs are parsed relative to it, so
    /// the host is not parsed again on every request. `None` only when the origin
    /// could not be resolved (validate without the environment).
    pub base: Option<url::Url>,
    pub timeout: Duration,
    pub headers: Vec<HeaderSpec>,
    pub auth: OutboundAuth,
    pub success: StatusSet,
    pub max_in_flight: u32,
    /// Outbound token bucket settings (`rate_limit`), when limited.
    pub rate_limit: Option<crate::ratelimit::RateLimit>,
    /// `tls`: a private CA, a client certificate; `None`: the system's roots.
    pub tls: Option<Arc<DownstreamTls>>,
    /// [`Downstream::fingerprint`], computed once by [`Downstream::fingerprint_of`]
    /// when the route is compiled (every accept and every delivery reads it).
    pub fingerprint: String,
}

/// A downstream's `tls` block, read and checked at load (the certificates parse,
/// the key belongs to the client certificate).
#[derive(Clone)]
pub struct DownstreamTls {
    /// CA certificates trusted besides the system's.
    pub ca: Vec<reqwest::Certificate>,
    /// The client certificate chain and its key (mutual TLS).
    pub identity: Option<reqwest::Identity>,
    /// The files, as resolved (for messages; never their content).
    pub files: Vec<PathBuf>,
    /// The files and a keyed digest of their content: equal keys, equal
    /// settings (one HTTP client is built per key).
    pub key: String,
}

impl std::fmt::Debug for DownstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DownstreamTls")
            .field("files", &self.files)
            .field("ca", &self.ca.len())
            .field("identity", &self.identity.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Downstream {
    /// Where and how this downstream is called, as stored with each delivery
    /// at acceptance (SPEC §7.3: a stored delivery goes only to the origin,
    /// with the auth, that it was accepted for): the hex SHA-256 of the
    /// origin (scheme, host, port), the auth kind and, for OAuth2, the token
    /// endpoint (without its query) and client id. Never a secret value: a
    /// rotated bearer token or client secret keeps the fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The [`fingerprint`](Self::fingerprint) of a downstream at `base`
    /// (`origin` when `base` is unresolved) called with `auth`.
    pub fn fingerprint_of(base: Option<&url::Url>, origin: &str, auth: &OutboundAuth) -> String {
        use sha2::{Digest, Sha256};
        let origin = match base {
            Some(base) => origin_of(base),
            None => origin.to_owned(),
        };
        let auth = match auth {
            OutboundAuth::None => "none".to_owned(),
            OutboundAuth::Bearer(_) => "bearer".to_owned(),
            // the user name: another account is another destination; a new password is not
            OutboundAuth::Basic(user, _) => format!("basic {user}"),
            OutboundAuth::OAuth2(c) => format!(
                "oauth2 {}{} {}",
                origin_of(&c.token_url),
                c.token_url.path(),
                c.client_id
            ),
        };
        hex::encode(Sha256::digest(format!(
            "route-fingerprint-v1\n{origin}\n{auth}"
        )))
    }
}

/// `scheme://host:port` of a URL, the port always written (the scheme's default when absent).
pub fn origin_of(url: &url::Url) -> String {
    format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or_default()
    )
}

#[derive(Debug)]
pub struct HeaderSpec {
    pub name: http::HeaderName,
    pub value: Template,
    /// The value came from the environment: masked by `gateway render`.
    pub secret: bool,
}

#[derive(Debug, Clone)]
pub enum OutboundAuth {
    None,
    Bearer(SecretString),
    /// HTTP Basic: user name and password.
    Basic(String, SecretString),
    OAuth2(ClientCredentials),
}

impl OutboundAuth {
    /// The mode's name, for the admin API.
    pub fn kind(&self) -> &'static str {
        match self {
            OutboundAuth::None => "none",
            OutboundAuth::Bearer(_) => "bearer",
            OutboundAuth::Basic(..) => "basic",
            OutboundAuth::OAuth2(_) => "oauth2",
        }
    }

    /// The `Authorization` header of a static mode (bearer, basic), marked sensitive.
    pub fn static_header(&self) -> Option<http::HeaderValue> {
        use base64::Engine as _;
        use secrecy::ExposeSecret;
        let v = match self {
            OutboundAuth::Bearer(t) => format!("Bearer {}", t.expose_secret()),
            OutboundAuth::Basic(user, password) => {
                let pair = format!("{user}:{}", password.expose_secret());
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                )
            }
            OutboundAuth::None | OutboundAuth::OAuth2(_) => return None,
        };
        let mut v = http::HeaderValue::from_str(&v).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

#[derive(Debug)]
pub struct ResponseSpec {
    pub status: Option<u16>,
    pub body: Option<Template>,
}

#[derive(Debug)]
pub struct FallbackSpec {
    pub status: u16,
    pub body: Option<Template>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub url: String,
    pub interval: Duration,
    /// The URL is on the downstream's own origin (scheme, host, port): only
    /// then does the probe carry the route's credentials (SPEC §7.4).
    pub credentials: bool,
}

/// A route example, checked by `validate`.
#[derive(Debug)]
pub struct Example {
    pub name: String,
    pub payload: serde_json::Value,
    pub headers: Vec<(String, String)>,
    pub expect: Option<super::raw::Expect>,
}
