//! OAuth2 client-credentials tokens for downstream calls
//! (`downstream.auth.oauth2` in a route file).
//!
//! Owns fetching access tokens from a token endpoint (RFC 6749 §4.4) and
//! caching them per (token URL, client id, scopes) until shortly before they
//! expire. However many requests need a token at once, at most one grant per
//! key is in flight; the others wait for its result, success or error. A
//! grant runs on its own task: a caller that stops waiting (its try's timeout)
//! does not cancel it, so a hanging token endpoint is asked once per grant
//! timeout, not once per caller.
//!
//! What protects a token endpoint (and the gateway) when something is wrong
//! (SPEC §7.3):
//! - a failed grant is remembered for a backoff (1 s, doubling to 30 s, reset
//!   by a success): a broken endpoint costs one grant per backoff period,
//!   however many webhooks arrive; callers meanwhile get the remembered error;
//! - a forced refresh after a downstream 401 is made only when the rejected
//!   token is older than [`MIN_REFRESH_AGE`]: a token that was just granted and
//!   is refused already (a revoked scope, a wrong audience) is not replaced by
//!   another one like it on every webhook; the 401 is the answer.
//!
//! It never logs, returns or prints a client secret or an access token:
//! [`ClientCredentials`], [`AccessToken`] and [`TokenCache`] redact them in
//! `Debug`, and a [`TokenError`] carries no secret, no token and no response
//! body (only a short OAuth `error` code such as `invalid_client`).
//!
//! Time comes from [`tokio::time::Instant`], so tests drive expiry with
//! `tokio::time::pause()` / `advance()`.
//!
//! Written by hand on purpose: the `oauth2` crate pulls in a second reqwest.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio::time::Instant;
use url::Url;

use super::retry::Backoff;

/// Lifetime assumed when the token response has no (usable) `expires_in`.
///
/// RFC 6749 only recommends `expires_in`. One hour is the most common
/// lifetime; if the real one is shorter, the downstream answers 401 and the
/// caller recovers through [`TokenCache::refresh_after_unauthorized`].
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(3600);

/// Upper bound of the refresh skew: a token is replaced
/// `min(60 s, 10 % of its lifetime)` before it expires.
pub const MAX_REFRESH_SKEW: Duration = Duration::from_secs(60);

/// Largest token response body read; a longer one is an invalid response.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Default timeout of one grant request (connect + answer). The caller's
/// own deadline still applies: dropping [`TokenCache::token`]'s future
/// cancels the grant, and the next waiter starts a fresh one.
pub const DEFAULT_GRANT_TIMEOUT: Duration = Duration::from_secs(10);

/// A token younger than this is not replaced after a downstream 401 (see the module docs).
pub const MIN_REFRESH_AGE: Duration = Duration::from_secs(5);

/// How long the first failed grant is remembered; doubled for each failure in
/// a row, up to [`FAILURE_BACKOFF_MAX`].
pub const FAILURE_BACKOFF: Duration = Duration::from_secs(1);

/// The longest a failed grant is remembered.
pub const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Lifetimes above this are clamped (no `Instant` overflow, re-grant at least yearly).
const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ClientAuth {
    /// `Authorization: Basic base64(urlencode(id) ":" urlencode(secret))`.
    #[default]
    Basic,
    /// `client_id` and `client_secret` as form fields of the request body.
    Body,
}

/// One route's `downstream.auth.oauth2` block, compiled.
#[derive(Clone)]
pub struct ClientCredentials {
    /// Without user info (config refuses it): reqwest would turn it into a
    /// second `Authorization` header.
    pub token_url: Url,
    pub client_id: String,
    pub client_secret: SecretString,
    /// Sent space-joined as `scope`, in this order; omitted when empty.
    pub scopes: Vec<String>,
    pub client_auth: ClientAuth,
    /// Extra form fields of the token request (`audience`, `resource`), in order.
    pub params: Vec<(String, String)>,
}

impl ClientCredentials {
    /// The cache key: token URL, client id and the *sorted, de-duplicated*
    /// scopes, so routes listing the same scopes in another order share a
    /// token. The extra `params` are part of the key (another `audience` is
    /// another token). The secret is not part of the key; a token obtained with
    /// another secret (rotated on reload) is not reused, see [`Cached`].
    fn cache_key(&self) -> CacheKey {
        let mut scopes: Vec<&str> = self.scopes.iter().map(String::as_str).collect();
        scopes.sort_unstable();
        scopes.dedup();
        let mut params = self.params.clone();
        params.sort();
        CacheKey {
            token_url: self.token_url.as_str().to_owned(),
            client_id: self.client_id.clone(),
            scopes: scopes.join(" "),
            params,
        }
    }
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("token_url", &redacted_url(&self.token_url))
            .field("client_id", &self.client_id)
            .field("client_secret", &"***")
            .field("scopes", &self.scopes)
            .field("client_auth", &self.client_auth)
            .field("params", &self.params)
            .finish()
    }
}

/// `scheme://host[:port]/path` — no user info, query or fragment, for logs.
fn redacted_url(url: &Url) -> String {
    let host = url.host_str().unwrap_or("");
    match url.port() {
        Some(port) => format!("{}://{host}:{port}{}", url.scheme(), url.path()),
        None => format!("{}://{host}{}", url.scheme(), url.path()),
    }
}

/// An access token. Cheap to clone; `Debug` prints `AccessToken(***)`, and
/// there is deliberately no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// `Bearer <token>`, marked sensitive (hyper does not log or index it).
    header: HeaderValue,
}

impl AccessToken {
    const PREFIX: &'static str = "Bearer ";

    /// `None` unless `token` is non-empty visible ASCII without spaces (what
    /// can travel in an `Authorization` header).
    pub fn new(token: &str) -> Option<Self> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        let mut header = HeaderValue::from_str(&format!("{}{token}", Self::PREFIX)).ok()?;
        header.set_sensitive(true);
        Some(Self { header })
    }

    /// The `Authorization` header value: `Bearer <token>`, marked sensitive.
    pub fn bearer_header(&self) -> HeaderValue {
        self.header.clone()
    }

    /// The raw token. Never log it.
    pub fn expose_secret(&self) -> &str {
        // Built from visible ASCII in `new`, so `to_str` cannot fail.
        let value = self.header.to_str().unwrap_or_default();
        value.strip_prefix(Self::PREFIX).unwrap_or_default()
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(***)")
    }
}

/// Why no token could be had. `Display` is a short reason fit for a 502 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The endpoint answered a non-2xx status (redirects are not followed:
    /// a 3xx lands here too). `error` is the OAuth `error` code of the
    /// answer, if it had a well-formed one.
    #[error("token endpoint answered {status}{}", error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default())]
    Endpoint { status: u16, error: Option<String> },
    /// No answer: `connect`, `timeout`, `request`, `body`, `redirect` or `other`.
    #[error("token request failed ({0})")]
    Transport(&'static str),
    /// A 2xx answer we cannot use: not JSON, no `access_token`, not a bearer token…
    #[error("token endpoint sent an invalid response: {0}")]
    InvalidResponse(String),
}

impl TokenError {
    /// Whether trying again later may help (transport errors, 5xx, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport(_) => true,
            Self::Endpoint { status, .. } => *status >= 500 || *status == 429,
            Self::InvalidResponse(_) => false,
        }
    }
}

/// Counters for metrics (`/metrics`: token refreshes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenCacheStats {
    /// Grant requests sent, successful or not.
    pub grants: u64,
    /// Grant requests that did not produce a token.
    pub grant_failures: u64,
    /// Credentials currently known to the cache.
    pub keys: usize,
}

/// Caches client-credentials tokens; share it (`Arc<TokenCache>`) between
/// routes and carry it over reloads, calling [`TokenCache::retain`] with
/// the new configuration's credentials.
pub struct TokenCache {
    /// The gateway's shared HTTP client (no redirects, see [`TokenCache::new`]).
    client: reqwest::Client,
    /// One slot per credentials key; slots are never replaced, only dropped.
    slots: Mutex<HashMap<CacheKey, Arc<Slot>>>,
    /// Timeout of one grant request.
    grant_timeout: Duration,
    /// A token younger than this is kept after a downstream 401.
    min_refresh_age: Duration,
    /// How long failed grants are remembered (per failure in a row).
    failure_backoff: Backoff,
    /// Shared with the grant tasks.
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    grants: AtomicU64,
    grant_failures: AtomicU64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    token_url: String,
    client_id: String,
    /// Sorted, de-duplicated, space-joined.
    scopes: String,
    /// Sorted.
    params: Vec<(String, String)>,
}

/// The state of one key.
#[derive(Default)]
struct Slot {
    /// Held only for quick reads and writes, never across an `.await`.
    state: Mutex<SlotState>,
}

/// What a grant produced, as its waiters see it.
type GrantResult = Result<AccessToken, TokenError>;

#[derive(Default)]
struct SlotState {
    cached: Option<Cached>,
    /// The last grants failed: their error is the answer until `until`.
    failure: Option<Failure>,
    /// The grant under way (the single flight): its result, once there is one.
    /// Its waiters take that result even if the token is already due for
    /// refresh (e.g. `expires_in: 0`): they do not start another grant.
    in_flight: Option<watch::Receiver<Option<GrantResult>>>,
}

struct Cached {
    token: AccessToken,
    /// When the grant that produced it started.
    obtained_at: Instant,
    /// `obtained_at + lifetime - skew`: from then on, a new grant is made.
    refresh_at: Instant,
    /// The secret the token was obtained with. A token is only handed out
    /// for the same secret, so a rotated secret gets a new token at once.
    secret: SecretString,
}

/// Failed grants in a row, remembered so that a broken endpoint is not asked
/// again by every caller.
struct Failure {
    error: TokenError,
    /// No new grant before this (for the same secret).
    until: Instant,
    /// Failures in a row (the backoff's exponent).
    streak: u32,
    /// The secret the grants were made with: a rotated secret tries at once.
    secret: SecretString,
}

fn same_secret(a: &SecretString, creds: &ClientCredentials) -> bool {
    a.expose_secret() == creds.client_secret.expose_secret()
}

impl SlotState {
    fn fresh_token(&self, creds: &ClientCredentials, now: Instant) -> Option<AccessToken> {
        let cached = self.cached.as_ref()?;
        (same_secret(&cached.secret, creds) && now < cached.refresh_at)
            .then(|| cached.token.clone())
    }

    /// The remembered error, while its backoff lasts.
    fn remembered_failure(&self, creds: &ClientCredentials, now: Instant) -> Option<TokenError> {
        let f = self.failure.as_ref()?;
        (same_secret(&f.secret, creds) && now < f.until).then(|| f.error.clone())
    }

    /// The grant under way, unless its task is gone without an answer (a panic).
    fn grant_under_way(&self) -> Option<watch::Receiver<Option<GrantResult>>> {
        let rx = self.in_flight.as_ref()?;
        (rx.has_changed().is_ok() || rx.borrow().is_some()).then(|| rx.clone())
    }
}

/// What a caller does next.
enum Lookup {
    /// Answered at once: a cached token, or a remembered failure.
    Ready(GrantResult),
    /// Wait for the grant under way.
    Wait(watch::Receiver<Option<GrantResult>>),
    /// After a 401: the rejected token is too young to replace.
    Keep,
}

impl Slot {
    fn lock_state(&self) -> MutexGuard<'_, SlotState> {
        // The state is always consistent between statements: a panic while
        // holding the lock cannot leave it half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How long before expiry a token is replaced: `min(60 s, lifetime / 10)`.
pub fn refresh_skew(lifetime: Duration) -> Duration {
    MAX_REFRESH_SKEW.min(lifetime / 10)
}

/// When a token obtained at `obtained_at` and valid for `lifetime` must be
/// replaced: `obtained_at + lifetime - refresh_skew(lifetime)`. A token is
/// fresh while `now < refresh_at`.
pub fn refresh_at(obtained_at: Instant, lifetime: Duration) -> Instant {
    let lifetime = lifetime.min(MAX_LIFETIME);
    obtained_at
        .checked_add(lifetime - refresh_skew(lifetime))
        .unwrap_or(obtained_at)
}

impl TokenCache {
    /// `client` is the gateway's shared client. It must not follow
    /// redirects (build it with `redirect::Policy::none()`): a token endpoint
    /// redirecting elsewhere would otherwise send our client secret along.
    /// A 3xx answer becomes [`TokenError::Endpoint`].
    pub fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            slots: Mutex::default(),
            grant_timeout: DEFAULT_GRANT_TIMEOUT,
            min_refresh_age: MIN_REFRESH_AGE,
            failure_backoff: Backoff::try_new(FAILURE_BACKOFF, FAILURE_BACKOFF_MAX)
                .expect("0 < 1 s <= 30 s"),
            counters: Arc::default(),
        }
    }

    /// Changes the timeout of one grant request (default 10 s).
    pub fn with_grant_timeout(mut self, timeout: Duration) -> Self {
        self.grant_timeout = timeout;
        self
    }

    /// Changes the age under which a token is kept after a 401 (default [`MIN_REFRESH_AGE`]).
    pub fn with_min_refresh_age(mut self, age: Duration) -> Self {
        self.min_refresh_age = age;
        self
    }

    /// Changes how long failed grants are remembered (default 1 s doubling to 30 s).
    pub fn with_failure_backoff(mut self, backoff: Backoff) -> Self {
        self.failure_backoff = backoff;
        self
    }

    /// A valid token for `creds`: the cached one while fresh, otherwise a
    /// new one from the token endpoint. However many callers ask at once,
    /// one grant per key is in flight and all of them get its result (a
    /// failed grant's error too: the waiters do not queue up one grant each).
    /// While a failed grant is remembered, its error is the answer.
    pub async fn token(&self, creds: &ClientCredentials) -> Result<AccessToken, TokenError> {
        self.token_via(creds, &self.client).await
    }

    /// [`TokenCache::token`], a grant it starts sent with `client` (a
    /// downstream's own client: its `tls` settings). The cache is the same.
    pub async fn token_via(
        &self,
        creds: &ClientCredentials,
        client: &reqwest::Client,
    ) -> Result<AccessToken, TokenError> {
        match self.lookup(creds, None, client) {
            Lookup::Ready(result) => result,
            Lookup::Wait(rx) => wait(rx).await,
            Lookup::Keep => unreachable!("only a rejection keeps a token"),
        }
    }

    /// After the downstream answered 401 to a request carrying `rejected`:
    /// `Ok(None)` when `rejected` is the cached token and younger than the
    /// minimum refresh age (a fresh token refused already: a new one would be
    /// refused too, so the 401 is the answer); otherwise forget that token
    /// (only if it is still the cached one) and return a newer one. If another
    /// caller already refreshed, its token is returned without a new grant.
    ///
    /// Callers do this **at most once per request**: retry the request once
    /// with the returned token, and if that is refused too, answer with the
    /// downstream's 401. Otherwise bad credentials turn every request into a
    /// loop of grants.
    pub async fn refresh_after_unauthorized(
        &self,
        creds: &ClientCredentials,
        rejected: &AccessToken,
    ) -> Result<Option<AccessToken>, TokenError> {
        self.refresh_after_unauthorized_via(creds, rejected, &self.client)
            .await
    }

    /// [`TokenCache::refresh_after_unauthorized`], a grant it starts sent with `client`.
    pub async fn refresh_after_unauthorized_via(
        &self,
        creds: &ClientCredentials,
        rejected: &AccessToken,
        client: &reqwest::Client,
    ) -> Result<Option<AccessToken>, TokenError> {
        match self.lookup(creds, Some(rejected), client) {
            Lookup::Ready(result) => result.map(Some),
            Lookup::Wait(rx) => wait(rx).await.map(Some),
            Lookup::Keep => Ok(None),
        }
    }

    /// Counters for metrics.
    pub fn stats(&self) -> TokenCacheStats {
        TokenCacheStats {
            grants: self.counters.grants.load(Ordering::Relaxed),
            grant_failures: self.counters.grant_failures.load(Ordering::Relaxed),
            keys: self.lock_slots().len(),
        }
    }

    /// Keep the tokens of these credentials and forget all others (after a
    /// reload: unchanged credentials keep their token). A grant in flight
    /// for a forgotten key finishes, but its token is not kept.
    pub fn retain<'a>(&self, keep: impl IntoIterator<Item = &'a ClientCredentials>) {
        let keep: std::collections::HashSet<CacheKey> =
            keep.into_iter().map(ClientCredentials::cache_key).collect();
        self.lock_slots().retain(|key, _| keep.contains(key));
    }

    fn lock_slots(&self) -> MutexGuard<'_, HashMap<CacheKey, Arc<Slot>>> {
        // Insert/remove only: a panic cannot leave the map inconsistent.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slot(&self, creds: &ClientCredentials) -> Arc<Slot> {
        Arc::clone(self.lock_slots().entry(creds.cache_key()).or_default())
    }

    /// Decides, under the slot's lock, what a caller does: take a cached
    /// token or a remembered failure, keep a young rejected token, or wait
    /// for the grant under way (starting one when there is none).
    fn lookup(
        &self,
        creds: &ClientCredentials,
        rejected: Option<&AccessToken>,
        client: &reqwest::Client,
    ) -> Lookup {
        let slot = self.slot(creds);
        let now = Instant::now();
        let mut state = slot.lock_state();
        if let Some(rejected) = rejected
            && let Some(cached) = &state.cached
            && cached.token == *rejected
        {
            if now.saturating_duration_since(cached.obtained_at) < self.min_refresh_age {
                return Lookup::Keep;
            }
            state.cached = None;
        }
        if let Some(token) = state.fresh_token(creds, now) {
            return Lookup::Ready(Ok(token));
        }
        if let Some(rx) = state.grant_under_way() {
            return Lookup::Wait(rx);
        }
        if let Some(error) = state.remembered_failure(creds, now) {
            return Lookup::Ready(Err(error));
        }
        // Single flight: the grant runs on its own task, so a caller that
        // stops waiting does not cancel it; its result lands in the slot.
        let (tx, rx) = watch::channel(None);
        state.in_flight = Some(rx.clone());
        drop(state);
        let grant = Grant {
            client: client.clone(),
            creds: creds.clone(),
            timeout: self.grant_timeout,
            backoff: self.failure_backoff,
            counters: Arc::clone(&self.counters),
        };
        tokio::spawn(grant.run(slot, tx));
        Lookup::Wait(rx)
    }
}

/// Waits for the result of the grant `rx` belongs to.
async fn wait(mut rx: watch::Receiver<Option<GrantResult>>) -> GrantResult {
    let result = rx
        .wait_for(Option::is_some)
        .await
        .map(|r| r.clone().expect("waited for a result"));
    // the grant task is gone without a result (the runtime is shutting down)
    result.unwrap_or(Err(TokenError::Transport("other")))
}

/// One grant, on its own task.
struct Grant {
    client: reqwest::Client,
    creds: ClientCredentials,
    timeout: Duration,
    backoff: Backoff,
    counters: Arc<Counters>,
}

impl Grant {
    /// Makes the token request, records its result in `slot` (the token, or
    /// the failure and its backoff) and hands it to the waiters.
    async fn run(self, slot: Arc<Slot>, tx: watch::Sender<Option<GrantResult>>) {
        let obtained_at = Instant::now();
        self.counters.grants.fetch_add(1, Ordering::Relaxed);
        let result = grant(&self.client, &self.creds, self.timeout).await;
        record_grant(&self.creds, &result, obtained_at.elapsed());
        let mut state = slot.lock_state();
        state.in_flight = None;
        let result = match result {
            Ok((token, lifetime)) => {
                state.cached = Some(Cached {
                    token: token.clone(),
                    obtained_at,
                    refresh_at: refresh_at(obtained_at, lifetime),
                    secret: self.creds.client_secret.clone(),
                });
                state.failure = None;
                Ok(token)
            }
            Err(error) => {
                self.counters.grant_failures.fetch_add(1, Ordering::Relaxed);
                let streak = match &state.failure {
                    Some(f) if same_secret(&f.secret, &self.creds) => f.streak.saturating_add(1),
                    _ => 1,
                };
                state.failure = Some(Failure {
                    error: error.clone(),
                    until: Instant::now() + self.backoff.ceiling(streak),
                    streak,
                    secret: self.creds.client_secret.clone(),
                });
                Err(error)
            }
        };
        drop(state);
        // (no waiter left is fine: the result is in the slot)
        let _ = tx.send(Some(result));
    }
}

/// The token request (RFC 6749 §4.4.2). Not async: the form serializer
/// is not `Send` and must not live across an `.await`.
fn grant_request(
    client: &reqwest::Client,
    creds: &ClientCredentials,
    timeout: Duration,
) -> Result<reqwest::RequestBuilder, TokenError> {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials");
    if !creds.scopes.is_empty() {
        form.append_pair("scope", &creds.scopes.join(" "));
    }
    for (k, v) in &creds.params {
        form.append_pair(k, v);
    }
    let mut request = client
        .post(creds.token_url.clone())
        .timeout(timeout)
        .header(ACCEPT, "application/json")
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded");
    match creds.client_auth {
        ClientAuth::Basic => {
            request = request.header(AUTHORIZATION, basic_auth(creds)?);
        }
        ClientAuth::Body => {
            form.append_pair("client_id", &creds.client_id);
            form.append_pair("client_secret", creds.client_secret.expose_secret());
        }
    }
    Ok(request.body(form.finish()))
}

/// One token request. Returns the token and its lifetime.
async fn grant(
    client: &reqwest::Client,
    creds: &ClientCredentials,
    timeout: Duration,
) -> Result<(AccessToken, Duration), TokenError> {
    let request = grant_request(client, creds, timeout)?;
    let mut response = request
        .send()
        .await
        .map_err(|e| TokenError::Transport(transport_kind(&e)))?;
    let status = response.status();
    let body = read_capped(&mut response, MAX_RESPONSE_BYTES).await;
    if !status.is_success() {
        // The error body is best effort: only its `error` code is used.
        let error = body.ok().flatten().and_then(|b| oauth_error_code(&b));
        return Err(TokenError::Endpoint {
            status: status.as_u16(),
            error,
        });
    }
    let body = body
        .map_err(|e| TokenError::Transport(transport_kind(&e)))?
        .ok_or_else(|| {
            TokenError::InvalidResponse(format!("body over {} KiB", MAX_RESPONSE_BYTES / 1024))
        })?;
    parse_token_response(&body)
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("stats", &self.stats())
            .field("grant_timeout", &self.grant_timeout)
            .finish_non_exhaustive()
    }
}

/// RFC 6749 §2.3.1: id and secret are form-urlencoded before base64.
fn basic_auth(creds: &ClientCredentials) -> Result<HeaderValue, TokenError> {
    let id: String = url::form_urlencoded::byte_serialize(creds.client_id.as_bytes()).collect();
    let secret: String =
        url::form_urlencoded::byte_serialize(creds.client_secret.expose_secret().as_bytes())
            .collect();
    let encoded = BASE64.encode(format!("{id}:{secret}"));
    // base64 output is always a valid header value.
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .map_err(|_| TokenError::Transport("request"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// The body, or `Ok(None)` when it is longer than `limit`.
async fn read_capped(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// A fixed word for a reqwest error. reqwest's own message is not used: it
/// can name the URL, and says nothing a bot's operator can act on.
fn transport_kind(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else if error.is_redirect() {
        "redirect"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else if error.is_request() || error.is_builder() {
        "request"
    } else {
        "other"
    }
}

/// `Some(word)` if `value` is a short, plain code (`invalid_client`,
/// `mac`) that is safe to repeat in an error message.
fn short_code(value: &str) -> Option<String> {
    let plain = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    plain.then(|| value.to_owned())
}

/// The `error` field of an OAuth error answer (RFC 6749 §5.2), if plain.
/// `error_description` and the rest are deliberately dropped.
fn oauth_error_code(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ErrorResponse {
        error: Option<String>,
    }
    let parsed: ErrorResponse = serde_json::from_slice(body).ok()?;
    short_code(parsed.error.as_deref()?)
}

/// The successful token answer (RFC 6749 §5.1). No `Debug`: it holds the token.
#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
}

/// Token and lifetime from a 2xx body. Lenient where servers differ in
/// practice: `token_type` may be missing or any case of `bearer`;
/// `expires_in` may be an integer, a fraction or a numeric string. A missing
/// or unusable `expires_in` means [`DEFAULT_EXPIRES_IN`].
fn parse_token_response(body: &[u8]) -> Result<(AccessToken, Duration), TokenError> {
    let invalid = |what: &str| TokenError::InvalidResponse(what.to_owned());
    let parsed: TokenResponse =
        serde_json::from_slice(body).map_err(|_| invalid("not a JSON token object"))?;
    if let Some(token_type) = parsed.token_type.as_deref()
        && !token_type.eq_ignore_ascii_case("bearer")
    {
        return Err(TokenError::InvalidResponse(match short_code(token_type) {
            Some(code) => format!("token_type {code:?} is not bearer"),
            None => "token_type is not bearer".to_owned(),
        }));
    }
    let token = match parsed.access_token.as_deref() {
        None | Some("") => return Err(invalid("no access_token")),
        Some(token) => AccessToken::new(token)
            .ok_or_else(|| invalid("access_token is not a header-safe string"))?,
    };
    let lifetime = match parsed.expires_in.as_ref().map(lifetime_seconds) {
        None => DEFAULT_EXPIRES_IN,
        Some(Some(lifetime)) => lifetime,
        Some(None) => {
            tracing::warn!(
                default_secs = DEFAULT_EXPIRES_IN.as_secs(),
                "oauth2 token response has an unusable expires_in; assuming the default"
            );
            DEFAULT_EXPIRES_IN
        }
    };
    Ok((token, lifetime))
}

/// A non-negative number of seconds, as a JSON number or numeric string.
fn lifetime_seconds(value: &serde_json::Value) -> Option<Duration> {
    let secs = match value {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0)
        .then(|| Duration::from_secs_f64(secs.min(MAX_LIFETIME.as_secs_f64())))
}

/// The one place a grant is logged (the counters are in [`TokenCacheStats`]).
fn record_grant(
    creds: &ClientCredentials,
    result: &Result<(AccessToken, Duration), TokenError>,
    elapsed: Duration,
) {
    let token_url = redacted_url(&creds.token_url);
    let elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    match result {
        Ok((_, lifetime)) => tracing::info!(
            %token_url,
            client_id = %creds.client_id,
            lifetime_secs = lifetime.as_secs(),
            elapsed_ms,
            "oauth2 token obtained"
        ),
        Err(error) => tracing::warn!(
            %token_url,
            client_id = %creds.client_id,
            elapsed_ms,
            %error,
            "oauth2 token request failed"
        ),
    }
}

#[cfg(test)]
mod tests;
