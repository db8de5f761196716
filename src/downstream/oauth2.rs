//! OAuth2 client-credentials tokens for downstream calls
//! (`downstream.auth.oauth2` in a route file).
//!
//! Owns fetching access tokens from a token endpoint (RFC 6749 §4.4) and
//! caching them per (token URL, client id, scopes) until shortly before they
//! expire. However many requests need a token at once, at most one grant per
//! key is in flight; the others wait for its result, success or error.
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
use tokio::time::Instant;
use url::Url;

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
}

impl ClientCredentials {
    /// The cache key: token URL, client id and the *sorted, de-duplicated*
    /// scopes, so routes listing the same scopes in another order share a
    /// token. The secret is not part of the key; a token obtained with
    /// another secret (rotated on reload) is not reused, see [`Cached`].
    fn cache_key(&self) -> CacheKey {
        let mut scopes: Vec<&str> = self.scopes.iter().map(String::as_str).collect();
        scopes.sort_unstable();
        scopes.dedup();
        CacheKey {
            token_url: self.token_url.as_str().to_owned(),
            client_id: self.client_id.clone(),
            scopes: scopes.join(" "),
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
    grants: AtomicU64,
    grant_failures: AtomicU64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    token_url: String,
    client_id: String,
    /// Sorted, de-duplicated, space-joined.
    scopes: String,
}

/// The state of one key.
#[derive(Default)]
struct Slot {
    /// Held only for quick reads and writes, never across an `.await`.
    state: Mutex<SlotState>,
    /// Held for the whole grant: the single-flight lock.
    grant: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct SlotState {
    cached: Option<Cached>,
    /// Bumped when a grant completes (success or failure). A caller that
    /// waited for the grant lock and sees it changed takes that grant's
    /// result instead of sending another request.
    generation: u64,
    /// The result of the last completed grant, shared with its waiters
    /// (even a token that is already due for refresh, e.g. `expires_in: 0`:
    /// they waited for this grant, they do not start another one).
    last_result: Option<Result<AccessToken, TokenError>>,
}

struct Cached {
    token: AccessToken,
    /// `obtained_at + lifetime - skew`: from then on, a new grant is made.
    refresh_at: Instant,
    /// The secret the token was obtained with. A token is only handed out
    /// for the same secret, so a rotated secret gets a new token at once.
    secret: SecretString,
}

impl SlotState {
    fn fresh_token(&self, creds: &ClientCredentials, now: Instant) -> Option<AccessToken> {
        let cached = self.cached.as_ref()?;
        let same_secret = cached.secret.expose_secret() == creds.client_secret.expose_secret();
        (same_secret && now < cached.refresh_at).then(|| cached.token.clone())
    }
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
            grants: AtomicU64::new(0),
            grant_failures: AtomicU64::new(0),
        }
    }

    /// Changes the timeout of one grant request (default 10 s).
    pub fn with_grant_timeout(mut self, timeout: Duration) -> Self {
        self.grant_timeout = timeout;
        self
    }

    /// A valid token for `creds`: the cached one while fresh, otherwise a
    /// new one from the token endpoint. However many callers ask at once,
    /// one grant per key is in flight and all of them get its result (a
    /// failed grant's error too: the waiters do not queue up one grant each).
    pub async fn token(&self, creds: &ClientCredentials) -> Result<AccessToken, TokenError> {
        self.obtain(creds, None).await
    }

    /// After the downstream answered 401 to a request carrying `rejected`:
    /// forget that token (only if it is still the cached one) and return a
    /// newer one. If another caller already refreshed, its token is
    /// returned without a new grant.
    ///
    /// Callers do this **at most once per request**: retry the request once
    /// with the returned token, and if that is refused too, answer with the
    /// downstream's 401. Otherwise bad credentials turn every request into a
    /// loop of grants.
    pub async fn refresh_after_unauthorized(
        &self,
        creds: &ClientCredentials,
        rejected: &AccessToken,
    ) -> Result<AccessToken, TokenError> {
        self.obtain(creds, Some(rejected)).await
    }

    /// Counters for metrics.
    pub fn stats(&self) -> TokenCacheStats {
        TokenCacheStats {
            grants: self.grants.load(Ordering::Relaxed),
            grant_failures: self.grant_failures.load(Ordering::Relaxed),
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

    async fn obtain(
        &self,
        creds: &ClientCredentials,
        rejected: Option<&AccessToken>,
    ) -> Result<AccessToken, TokenError> {
        let slot = self.slot(creds);
        let seen_generation = {
            let mut state = slot.lock_state();
            if let Some(rejected) = rejected
                && state.cached.as_ref().is_some_and(|c| c.token == *rejected)
            {
                state.cached = None;
            }
            if let Some(token) = state.fresh_token(creds, Instant::now()) {
                return Ok(token);
            }
            state.generation
        };

        // Single flight: one caller per key gets past this point at a time.
        // If it is cancelled mid-grant, nothing is recorded and the next
        // waiter makes its own grant.
        let _in_flight = slot.grant.lock().await;
        {
            let state = slot.lock_state();
            if let Some(token) = state.fresh_token(creds, Instant::now()) {
                return Ok(token);
            }
            if state.generation != seen_generation
                && let Some(result) = &state.last_result
            {
                return result.clone();
            }
        }

        let obtained_at = Instant::now();
        self.grants.fetch_add(1, Ordering::Relaxed);
        let result = self.grant(creds).await;
        record_grant(creds, &result, obtained_at.elapsed());

        let result = result.map(|(token, lifetime)| {
            let cached = Cached {
                token: token.clone(),
                refresh_at: refresh_at(obtained_at, lifetime),
                secret: creds.client_secret.clone(),
            };
            (token, cached)
        });
        let mut state = slot.lock_state();
        state.generation = state.generation.wrapping_add(1);
        let result = match result {
            Ok((token, cached)) => {
                state.cached = Some(cached);
                Ok(token)
            }
            Err(error) => {
                self.grant_failures.fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        };
        state.last_result = Some(result.clone());
        result
    }

    /// The token request (RFC 6749 §4.4.2). Not async: the form serializer
    /// is not `Send` and must not live across an `.await`.
    fn grant_request(
        &self,
        creds: &ClientCredentials,
    ) -> Result<reqwest::RequestBuilder, TokenError> {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if !creds.scopes.is_empty() {
            form.append_pair("scope", &creds.scopes.join(" "));
        }
        let mut request = self
            .client
            .post(creds.token_url.clone())
            .timeout(self.grant_timeout)
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
        &self,
        creds: &ClientCredentials,
    ) -> Result<(AccessToken, Duration), TokenError> {
        let request = self.grant_request(creds)?;
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
mod tests {
    use super::*;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use tokio::sync::{Notify, Semaphore};

    const SECRET: &str = "s3cr&t p@ss:word";
    /// Every token the test endpoint issues contains this marker.
    const TOKEN_MARK: &str = "TOKENVALUE";

    // ---------- a real token endpoint on 127.0.0.1:0 ----------

    #[derive(Clone)]
    enum Reply {
        /// A valid token answer; `expires_in` as given (None = omitted).
        Token {
            expires_in: Option<serde_json::Value>,
        },
        /// Anything else, verbatim.
        Raw {
            status: u16,
            headers: Vec<(&'static str, String)>,
            body: String,
        },
    }

    struct Received {
        authorization: Option<String>,
        content_type: Option<String>,
        form: Vec<(String, String)>,
    }

    struct EndpointState {
        grants: AtomicU64,
        received: Mutex<Vec<Received>>,
        reply: Mutex<Reply>,
        /// Each request takes (and forgets) one permit before answering.
        gate: Semaphore,
        /// Signalled when a request arrives.
        arrived: Notify,
    }

    struct TestEndpoint {
        url: Url,
        state: Arc<EndpointState>,
    }

    impl TestEndpoint {
        async fn start(reply: Reply) -> Self {
            Self::start_gated(reply, Semaphore::MAX_PERMITS).await
        }

        /// `permits` requests are answered at once; later ones wait for `release`.
        async fn start_gated(reply: Reply, permits: usize) -> Self {
            let state = Arc::new(EndpointState {
                grants: AtomicU64::new(0),
                received: Mutex::default(),
                reply: Mutex::new(reply),
                gate: Semaphore::new(permits),
                arrived: Notify::new(),
            });
            let app = axum::Router::new()
                .route("/oauth/token", axum::routing::post(handle))
                .with_state(Arc::clone(&state));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            let url = Url::parse(&format!("http://{addr}/oauth/token")).unwrap();
            Self { url, state }
        }

        fn grants(&self) -> u64 {
            self.state.grants.load(Ordering::SeqCst)
        }

        fn set_reply(&self, reply: Reply) {
            *self.state.reply.lock().unwrap() = reply;
        }

        fn release(&self, permits: usize) {
            self.state.gate.add_permits(permits);
        }

        fn creds(&self, client_auth: ClientAuth) -> ClientCredentials {
            ClientCredentials {
                token_url: self.url.clone(),
                client_id: "gateway client".to_owned(),
                client_secret: SecretString::from(SECRET),
                scopes: vec!["crm:write".to_owned(), "crm:read".to_owned()],
                client_auth,
            }
        }

        fn last_received(&self) -> Received {
            self.state
                .received
                .lock()
                .unwrap()
                .pop()
                .expect("a request")
        }
    }

    async fn handle(
        State(state): State<Arc<EndpointState>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let n = state.grants.fetch_add(1, Ordering::SeqCst) + 1;
        let header = |name| {
            headers
                .get(name)
                .map(|v: &HeaderValue| v.to_str().unwrap().to_owned())
        };
        state.received.lock().unwrap().push(Received {
            authorization: header(AUTHORIZATION),
            content_type: header(CONTENT_TYPE),
            form: url::form_urlencoded::parse(&body).into_owned().collect(),
        });
        state.arrived.notify_one();
        state.gate.acquire().await.unwrap().forget();
        let reply = state.reply.lock().unwrap().clone();
        match reply {
            Reply::Token { expires_in } => {
                let mut body = serde_json::json!({
                    "access_token": format!("tok-{n}-{TOKEN_MARK}"),
                    "token_type": "Bearer",
                });
                if let Some(expires_in) = expires_in {
                    body["expires_in"] = expires_in;
                }
                axum::Json(body).into_response()
            }
            Reply::Raw {
                status,
                headers,
                body,
            } => {
                let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
                for (name, value) in headers {
                    response
                        .headers_mut()
                        .insert(name, HeaderValue::from_str(&value).unwrap());
                }
                response
            }
        }
    }

    fn token_reply(expires_in: u64) -> Reply {
        Reply::Token {
            expires_in: Some(expires_in.into()),
        }
    }

    fn raw(status: u16, body: &str) -> Reply {
        Reply::Raw {
            status,
            headers: vec![("content-type", "application/json".to_owned())],
            body: body.to_owned(),
        }
    }

    fn cache() -> TokenCache {
        // reqwest is built with `rustls-no-provider`; the binary installs
        // ring in main, tests do it here (a second install is a no-op error).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        TokenCache::new(client)
    }

    fn number(token: &AccessToken) -> u64 {
        let raw = token.expose_secret();
        raw.split('-').nth(1).unwrap().parse().unwrap()
    }

    // ---------- single flight and caching ----------

    #[tokio::test]
    async fn hundred_concurrent_cold_calls_make_one_grant() {
        let endpoint = TestEndpoint::start_gated(token_reply(3600), 0).await;
        let cache = Arc::new(cache());
        let creds = Arc::new(endpoint.creds(ClientAuth::Basic));
        let callers: Vec<_> = (0..100)
            .map(|_| {
                let (cache, creds) = (Arc::clone(&cache), Arc::clone(&creds));
                tokio::spawn(async move { cache.token(&creds).await })
            })
            .collect();
        // The grant is in flight (held by the gate) while every caller waits.
        endpoint.state.arrived.notified().await;
        endpoint.release(1);
        for caller in callers {
            let token = caller.await.unwrap().unwrap();
            assert_eq!(number(&token), 1);
        }
        assert_eq!(endpoint.grants(), 1);
        assert_eq!(cache.stats().grants, 1);
    }

    #[tokio::test]
    async fn cached_token_is_reused() {
        let endpoint = TestEndpoint::start(token_reply(3600)).await;
        let cache = cache();
        let creds = endpoint.creds(ClientAuth::Basic);
        let first = cache.token(&creds).await.unwrap();
        for _ in 0..5 {
            assert_eq!(cache.token(&creds).await.unwrap(), first);
        }
        // Same scopes in another order: same key, same token.
        let reordered = ClientCredentials {
            scopes: vec!["crm:read".into(), "crm:write".into(), "crm:read".into()],
            ..creds.clone()
        };
        assert_eq!(cache.token(&reordered).await.unwrap(), first);
        assert_eq!(endpoint.grants(), 1);
        // Other scopes: another key.
        let other = ClientCredentials {
            scopes: vec!["crm:admin".into()],
            ..creds
        };
        assert_ne!(cache.token(&other).await.unwrap(), first);
        assert_eq!(endpoint.grants(), 2);
        assert_eq!(
            cache.stats(),
            TokenCacheStats {
                grants: 2,
                grant_failures: 0,
                keys: 2
            }
        );
    }

    #[tokio::test]
    async fn waiters_share_a_failed_grant() {
        let endpoint = TestEndpoint::start_gated(raw(503, "{}"), 0).await;
        let cache = Arc::new(cache());
        let creds = Arc::new(endpoint.creds(ClientAuth::Basic));
        let callers: Vec<_> = (0..10)
            .map(|_| {
                let (cache, creds) = (Arc::clone(&cache), Arc::clone(&creds));
                tokio::spawn(async move { cache.token(&creds).await })
            })
            .collect();
        endpoint.state.arrived.notified().await;
        endpoint.release(1);
        for caller in callers {
            let error = caller.await.unwrap().unwrap_err();
            assert_eq!(
                error,
                TokenError::Endpoint {
                    status: 503,
                    error: None
                }
            );
        }
        assert_eq!(endpoint.grants(), 1);
        assert_eq!(cache.stats().grant_failures, 1);

        // A caller arriving after the failure tries again.
        endpoint.set_reply(token_reply(3600));
        endpoint.release(Semaphore::MAX_PERMITS / 2);
        assert_eq!(number(&cache.token(&creds).await.unwrap()), 2);
    }

    #[tokio::test]
    async fn waiters_take_the_grant_they_waited_for_even_if_already_due() {
        // `expires_in: 0`: the token is due for refresh as soon as it arrives,
        // yet the callers that waited for that grant do not start their own.
        let endpoint = TestEndpoint::start_gated(token_reply(0), 0).await;
        let cache = Arc::new(cache());
        let creds = Arc::new(endpoint.creds(ClientAuth::Basic));
        let callers: Vec<_> = (0..10)
            .map(|_| {
                let (cache, creds) = (Arc::clone(&cache), Arc::clone(&creds));
                tokio::spawn(async move { cache.token(&creds).await })
            })
            .collect();
        endpoint.state.arrived.notified().await;
        endpoint.release(Semaphore::MAX_PERMITS / 2);
        for caller in callers {
            assert_eq!(number(&caller.await.unwrap().unwrap()), 1);
        }
        assert_eq!(endpoint.grants(), 1);
        // A later caller does grant again.
        assert_eq!(number(&cache.token(&creds).await.unwrap()), 2);
    }

    #[tokio::test]
    async fn a_cancelled_grant_lets_the_next_caller_grant() {
        let endpoint = TestEndpoint::start_gated(token_reply(3600), 0).await;
        let cache = cache();
        let creds = endpoint.creds(ClientAuth::Basic);
        {
            let first = cache.token(&creds);
            tokio::pin!(first);
            tokio::select! {
                _ = &mut first => panic!("the gate holds the answer"),
                () = endpoint.state.arrived.notified() => {}
            }
            // `first` is dropped here: the caller gave up (its deadline).
        }
        endpoint.release(Semaphore::MAX_PERMITS / 2);
        let token = cache.token(&creds).await.unwrap();
        assert_eq!(endpoint.grants(), 2);
        assert_eq!(number(&token), 2);
    }

    #[tokio::test]
    async fn rotated_secret_gets_a_new_token_and_retain_forgets_keys() {
        let endpoint = TestEndpoint::start(token_reply(3600)).await;
        let cache = cache();
        let creds = endpoint.creds(ClientAuth::Basic);
        let first = cache.token(&creds).await.unwrap();
        let rotated = ClientCredentials {
            client_secret: SecretString::from("new secret"),
            ..creds.clone()
        };
        let second = cache.token(&rotated).await.unwrap();
        assert_ne!(first, second);
        assert_eq!(cache.token(&rotated).await.unwrap(), second);
        assert_eq!(endpoint.grants(), 2);

        let other = ClientCredentials {
            client_id: "other".into(),
            ..creds.clone()
        };
        cache.token(&other).await.unwrap();
        assert_eq!(cache.stats().keys, 2);
        // Reload keeps `rotated` (same key as creds) and drops `other`.
        cache.retain([&rotated]);
        assert_eq!(cache.stats().keys, 1);
        assert_eq!(cache.token(&rotated).await.unwrap(), second);
        assert_eq!(endpoint.grants(), 3);
        cache.retain([]);
        assert_eq!(cache.stats().keys, 0);
        cache.token(&rotated).await.unwrap();
        assert_eq!(endpoint.grants(), 4);
    }

    // ---------- refresh timing ----------

    #[test]
    fn skew_is_ten_percent_capped_at_a_minute() {
        let s = Duration::from_secs;
        assert_eq!(refresh_skew(s(3600)), s(60));
        assert_eq!(refresh_skew(s(600)), s(60));
        assert_eq!(refresh_skew(s(100)), s(10));
        assert_eq!(refresh_skew(s(1)), Duration::from_millis(100));
        assert_eq!(refresh_skew(Duration::ZERO), Duration::ZERO);
        assert_eq!(refresh_skew(Duration::MAX), s(60));
    }

    #[test]
    fn refresh_at_is_lifetime_minus_skew() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(refresh_at(t0, s(3600)), t0 + s(3540));
        assert_eq!(refresh_at(t0, s(100)), t0 + s(90));
        assert_eq!(refresh_at(t0, Duration::ZERO), t0);
        // Absurd lifetimes are clamped, never overflow.
        assert_eq!(refresh_at(t0, Duration::MAX), t0 + MAX_LIFETIME - s(60));
    }

    /// Drives the cache on paused time: just before `lifetime - skew` the
    /// cached token is used, at that instant a new grant is made.
    async fn check_refresh_boundary(lifetime: u64, skew: u64) {
        let endpoint = TestEndpoint::start(token_reply(lifetime)).await;
        let cache = cache();
        let creds = endpoint.creds(ClientAuth::Basic);
        let t0 = Instant::now();
        let first = cache.token(&creds).await.unwrap();
        assert_eq!(endpoint.grants(), 1);
        // `obtained_at` is taken when the grant starts, at or after t0.
        let boundary = t0 + Duration::from_secs(lifetime - skew);
        let just_before = boundary - Duration::from_millis(1);
        tokio::time::advance(just_before.saturating_duration_since(Instant::now())).await;
        assert_eq!(cache.token(&creds).await.unwrap(), first);
        assert_eq!(endpoint.grants(), 1, "no grant before the boundary");

        let obtained_at = t0; // no auto-advance happened while granting
        tokio::time::advance(
            refresh_at(obtained_at, Duration::from_secs(lifetime))
                .saturating_duration_since(Instant::now()),
        )
        .await;
        let second = cache.token(&creds).await.unwrap();
        assert_ne!(second, first);
        assert_eq!(endpoint.grants(), 2, "one grant at the boundary");
        assert_eq!(cache.token(&creds).await.unwrap(), second);
        assert_eq!(endpoint.grants(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_boundary_for_an_hour_long_token() {
        check_refresh_boundary(3600, 60).await;
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_boundary_for_a_100_second_token() {
        check_refresh_boundary(100, 10).await;
    }

    #[tokio::test(start_paused = true)]
    async fn missing_expires_in_means_an_hour() {
        let endpoint = TestEndpoint::start(Reply::Token { expires_in: None }).await;
        let cache = cache();
        let creds = endpoint.creds(ClientAuth::Basic);
        cache.token(&creds).await.unwrap();
        tokio::time::advance(Duration::from_secs(3539)).await;
        cache.token(&creds).await.unwrap();
        assert_eq!(endpoint.grants(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        cache.token(&creds).await.unwrap();
        assert_eq!(endpoint.grants(), 2);
    }

    // ---------- 401 from the downstream ----------

    #[tokio::test]
    async fn refresh_after_unauthorized_replaces_the_rejected_token() {
        let endpoint = TestEndpoint::start(token_reply(3600)).await;
        let cache = cache();
        let creds = endpoint.creds(ClientAuth::Basic);
        let rejected = cache.token(&creds).await.unwrap();
        let fresh = cache
            .refresh_after_unauthorized(&creds, &rejected)
            .await
            .unwrap();
        assert_ne!(fresh, rejected);
        assert_eq!(endpoint.grants(), 2);
        assert_eq!(cache.token(&creds).await.unwrap(), fresh);
    }

    #[tokio::test]
    async fn stale_rejection_after_another_refresh_does_not_grant_again() {
        let endpoint = TestEndpoint::start(token_reply(3600)).await;
        let cache = cache();
        let creds = endpoint.creds(ClientAuth::Basic);
        let rejected = cache.token(&creds).await.unwrap();
        // Two requests used `rejected` and both got a 401; the first refreshes…
        let by_first = cache
            .refresh_after_unauthorized(&creds, &rejected)
            .await
            .unwrap();
        // …the second finds the new token already there.
        let by_second = cache
            .refresh_after_unauthorized(&creds, &rejected)
            .await
            .unwrap();
        assert_eq!(by_first, by_second);
        assert_eq!(endpoint.grants(), 2);
    }

    #[tokio::test]
    async fn concurrent_rejections_make_one_refresh() {
        let endpoint = TestEndpoint::start_gated(token_reply(3600), 1).await;
        let cache = Arc::new(cache());
        let creds = Arc::new(endpoint.creds(ClientAuth::Basic));
        let rejected = cache.token(&creds).await.unwrap();
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let (cache, creds, rejected) =
                    (Arc::clone(&cache), Arc::clone(&creds), rejected.clone());
                tokio::spawn(
                    async move { cache.refresh_after_unauthorized(&creds, &rejected).await },
                )
            })
            .collect();
        endpoint.state.arrived.notified().await; // the first grant's arrival
        endpoint.state.arrived.notified().await; // the refresh, now held
        endpoint.release(1);
        let tokens: Vec<AccessToken> = futures_join(callers).await;
        assert!(tokens.iter().all(|t| number(t) == 2));
        assert_eq!(endpoint.grants(), 2);
    }

    async fn futures_join(
        handles: Vec<tokio::task::JoinHandle<Result<AccessToken, TokenError>>>,
    ) -> Vec<AccessToken> {
        let mut tokens = Vec::new();
        for handle in handles {
            tokens.push(handle.await.unwrap().unwrap());
        }
        tokens
    }

    // ---------- what is sent ----------

    #[tokio::test]
    async fn basic_client_auth_is_urlencoded_then_base64() {
        let endpoint = TestEndpoint::start(token_reply(3600)).await;
        let cache = cache();
        cache
            .token(&endpoint.creds(ClientAuth::Basic))
            .await
            .unwrap();
        let got = endpoint.last_received();
        let expected = BASE64.encode("gateway+client:s3cr%26t+p%40ss%3Aword");
        assert_eq!(got.authorization, Some(format!("Basic {expected}")));
        assert_eq!(
            got.content_type.as_deref(),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(
            got.form,
            [
                ("grant_type".to_owned(), "client_credentials".to_owned()),
                ("scope".to_owned(), "crm:write crm:read".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn body_client_auth_sends_form_fields() {
        let endpoint = TestEndpoint::start(token_reply(3600)).await;
        let cache = cache();
        let creds = ClientCredentials {
            scopes: vec![],
            ..endpoint.creds(ClientAuth::Body)
        };
        cache.token(&creds).await.unwrap();
        let got = endpoint.last_received();
        assert_eq!(got.authorization, None);
        assert_eq!(
            got.form,
            [
                ("grant_type".to_owned(), "client_credentials".to_owned()),
                ("client_id".to_owned(), "gateway client".to_owned()),
                ("client_secret".to_owned(), SECRET.to_owned()),
            ]
        );
    }

    #[test]
    fn bearer_header_is_sensitive() {
        let token = AccessToken::new("abc.DEF-123_~+/=").unwrap();
        let header = token.bearer_header();
        assert_eq!(header, "Bearer abc.DEF-123_~+/=");
        assert!(header.is_sensitive());
        assert_eq!(token.expose_secret(), "abc.DEF-123_~+/=");
        for bad in ["", "a b", "a\r\nb", "tök"] {
            assert!(AccessToken::new(bad).is_none(), "{bad:?}");
        }
    }

    // ---------- errors ----------

    async fn error_for(reply: Reply) -> TokenError {
        let endpoint = TestEndpoint::start(reply).await;
        cache()
            .token(&endpoint.creds(ClientAuth::Basic))
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn endpoint_errors_are_clear() {
        let e = error_for(raw(500, "boom")).await;
        assert_eq!(e.to_string(), "token endpoint answered 500");
        assert!(e.is_transient());

        let e = error_for(raw(
            401,
            r#"{"error":"invalid_client","error_description":"secret s3cr&t is wrong"}"#,
        ))
        .await;
        assert_eq!(
            e,
            TokenError::Endpoint {
                status: 401,
                error: Some("invalid_client".into())
            }
        );
        assert_eq!(
            e.to_string(),
            "token endpoint answered 401 (invalid_client)"
        );
        assert!(!e.is_transient());

        // An `error` that is not a plain code is not repeated.
        let e = error_for(raw(400, r#"{"error":"<script>alert(1)</script>"}"#)).await;
        assert_eq!(e.to_string(), "token endpoint answered 400");

        // Redirects are not followed (the secret would go along).
        let e = error_for(Reply::Raw {
            status: 302,
            headers: vec![("location", "http://127.0.0.1:9/steal".to_owned())],
            body: String::new(),
        })
        .await;
        assert_eq!(e.to_string(), "token endpoint answered 302");
    }

    #[tokio::test]
    async fn invalid_token_answers_are_clear() {
        let e = error_for(raw(200, "<html>login</html>")).await;
        assert_eq!(
            e.to_string(),
            "token endpoint sent an invalid response: not a JSON token object"
        );
        let e = error_for(raw(200, r#"{"token_type":"bearer"}"#)).await;
        assert_eq!(
            e.to_string(),
            "token endpoint sent an invalid response: no access_token"
        );
        let e = error_for(raw(200, r#"{"access_token":"x","token_type":"mac"}"#)).await;
        assert_eq!(
            e.to_string(),
            "token endpoint sent an invalid response: token_type \"mac\" is not bearer"
        );
        let big = format!(r#"{{"access_token":"{}"}}"#, "a".repeat(MAX_RESPONSE_BYTES));
        let e = error_for(raw(200, &big)).await;
        assert_eq!(
            e.to_string(),
            "token endpoint sent an invalid response: body over 64 KiB"
        );
        assert!(!e.is_transient());
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_a_transport_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let creds = ClientCredentials {
            token_url: Url::parse(&format!("http://{addr}/token")).unwrap(),
            client_id: "id".into(),
            client_secret: SecretString::from(SECRET),
            scopes: vec![],
            client_auth: ClientAuth::Basic,
        };
        let e = cache().token(&creds).await.unwrap_err();
        assert_eq!(e, TokenError::Transport("connect"));
        assert_eq!(e.to_string(), "token request failed (connect)");
        assert!(e.is_transient());
    }

    #[tokio::test(start_paused = true)]
    async fn slow_endpoint_times_out() {
        let endpoint = TestEndpoint::start_gated(token_reply(3600), 0).await;
        let cache = cache().with_grant_timeout(Duration::from_millis(50));
        let e = cache
            .token(&endpoint.creds(ClientAuth::Basic))
            .await
            .unwrap_err();
        assert_eq!(e, TokenError::Transport("timeout"));
    }

    #[test]
    fn token_response_parsing_is_lenient_where_servers_differ() {
        let parse = |body: &str| parse_token_response(body.as_bytes());
        let s = Duration::from_secs;
        let (token, lifetime) =
            parse(r#"{"access_token":"t","token_type":"BEARER","expires_in":120}"#).unwrap();
        assert_eq!((token.expose_secret(), lifetime), ("t", s(120)));
        let cases = [
            (r#"{"access_token":"t"}"#, DEFAULT_EXPIRES_IN),
            (
                r#"{"access_token":"t","token_type":"bearer","expires_in":"300"}"#,
                s(300),
            ),
            (
                r#"{"access_token":"t","expires_in":299.5}"#,
                Duration::from_millis(299_500),
            ),
            (
                r#"{"access_token":"t","expires_in":-5}"#,
                DEFAULT_EXPIRES_IN,
            ),
            (
                r#"{"access_token":"t","expires_in":null}"#,
                DEFAULT_EXPIRES_IN,
            ),
            (
                r#"{"access_token":"t","expires_in":"soon"}"#,
                DEFAULT_EXPIRES_IN,
            ),
            (r#"{"access_token":"t","expires_in":1e300}"#, MAX_LIFETIME),
            (
                r#"{"access_token":"t","expires_in":0,"refresh_token":"r"}"#,
                Duration::ZERO,
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(parse(body).unwrap().1, expected, "{body}");
        }
        for body in [
            r#"{"access_token":""}"#,
            r#"{"access_token":null}"#,
            r#"{"access_token":"a b"}"#,
            r#"{"access_token":42}"#,
            r#"[]"#,
            "",
        ] {
            assert!(
                matches!(parse(body), Err(TokenError::InvalidResponse(_))),
                "{body}"
            );
        }
    }

    // ---------- no secret, no token in any output ----------

    #[tokio::test]
    async fn debug_and_display_never_show_secrets_or_tokens() {
        let endpoint = TestEndpoint::start(token_reply(3600)).await;
        let cache = cache();
        let mut creds = endpoint.creds(ClientAuth::Basic);
        creds.token_url.set_username("user").unwrap();
        creds.token_url.set_password(Some(SECRET)).unwrap();
        creds.token_url.query_pairs_mut().append_pair("key", SECRET);
        let token = cache.token(&creds).await.unwrap();
        assert!(token.expose_secret().contains(TOKEN_MARK));

        let errors = [
            error_for(raw(
                401,
                &format!(r#"{{"error":"{SECRET}","error_description":"{TOKEN_MARK}"}}"#),
            ))
            .await,
            error_for(raw(
                200,
                &format!(r#"{{"access_token":"{TOKEN_MARK}","token_type":"{TOKEN_MARK} x"}}"#),
            ))
            .await,
            TokenError::Transport("connect"),
        ];
        let mut outputs = vec![
            format!("{creds:?}"),
            format!("{token:?}"),
            format!("{:?}", token.bearer_header()),
            format!("{cache:?}"),
            format!("{:?}", cache.stats()),
        ];
        for e in &errors {
            outputs.push(format!("{e:?}"));
            outputs.push(e.to_string());
        }
        let encoded_secret: String =
            url::form_urlencoded::byte_serialize(SECRET.as_bytes()).collect();
        for output in outputs {
            assert!(!output.contains(SECRET), "{output}");
            assert!(!output.contains(&encoded_secret), "{output}");
            assert!(!output.contains("s3cr"), "{output}");
            assert!(!output.contains(TOKEN_MARK), "{output}");
        }
        assert_eq!(format!("{token:?}"), "AccessToken(***)");
    }
}
