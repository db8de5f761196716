//! The route-file model exactly as authors write it: a serde + schemars mirror
//! of the YAML of SPEC §3.
//!
//! Every `///` comment here becomes a description in
//! `schemas/route-file.schema.json`, which editors show while typing, so they
//! are written for route authors. Nothing here is validated beyond shape:
//! `config::compile` turns these into types that cannot hold bad states.
//! "Exactly one of" blocks are structs of `Option`s with min/max one property.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer};

/// One route file. All files under the routes directory are loaded together.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
#[schemars(title = "cognigy-gateway route file")]
pub struct RouteFile {
    /// Bots that call the gateway; each is served at `POST /webhooks/{id}`.
    pub bots: Vec<Bot>,
    /// Routes: which downstream call to make for which bot and intent.
    pub routes: Vec<Route>,
    /// Defaults for every route (at most one file may hold this block).
    pub defaults: Option<Defaults>,
}

/// A bot: a path, a secret, a payload schema.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Bot {
    /// Unique bot id; the bot posts to `/webhooks/{id}`. Letters, digits, `-`, `_`, `.`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"))]
    pub id: String,
    /// How the bot proves who it is: exactly one of the modes.
    pub auth: InboundAuth,
    /// JSON Schema every payload of this bot must satisfy; path relative to this file.
    pub schema: Option<String>,
    /// JSON Pointer to the intent in the payload (default `/intent`).
    pub intent_path: Option<String>,
    /// JSON Pointer to the intent score in the payload (default `/intentScore`).
    pub score_path: Option<String>,
    /// Most webhooks accepted from this bot (per instance, after auth): a token
    /// bucket; over it → 429 `rate_limited` with `Retry-After`.
    pub rate_limit: Option<RateLimit>,
    /// Lint warnings of `gateway validate` not to give for this bot, e.g.
    /// `{ allow: [none-auth] }`.
    pub lint: Option<Lint>,
}

/// Lint settings of one bot or route.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lint {
    /// Lint rules not to warn about here: `none-auth` (a bot with `none: {}`),
    /// `literal-secret` (a key, token, password, client secret or credential header
    /// written literally instead of as `${VAR}`), `http-credentials` (credentials sent
    /// over `http://` to a host that is not loopback), `no-idempotency-key` (an async,
    /// POST, PUT or PATCH route without `idempotency_key`), `optional-key-field`
    /// (`idempotency_key` reads a payload field the payload schemas do not require).
    pub allow: Vec<LintRule>,
}

/// A lint rule of `gateway validate`, as named in its warnings (`[lint:none-auth]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LintRule {
    NoneAuth,
    LiteralSecret,
    HttpCredentials,
    NoIdempotencyKey,
    OptionalKeyField,
}

impl LintRule {
    /// The rule's name, as written in `allow` and in warnings.
    pub fn name(self) -> &'static str {
        match self {
            LintRule::NoneAuth => "none-auth",
            LintRule::LiteralSecret => "literal-secret",
            LintRule::HttpCredentials => "http-credentials",
            LintRule::NoIdempotencyKey => "no-idempotency-key",
            LintRule::OptionalKeyField => "optional-key-field",
        }
    }

    /// Whether the rule can fire on a bot (the others fire on routes).
    pub fn applies_to_bots(self) -> bool {
        matches!(self, LintRule::NoneAuth | LintRule::LiteralSecret)
    }
}

/// A token bucket: `burst` calls at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Tokens added per second (e.g. `50`, or `0.5` for one every two seconds).
    #[schemars(range(min = 0.001, max = 1000000.0))]
    pub per_second: f64,
    /// Most tokens held: the largest burst let through at once (default: `per_second`, at least 1).
    #[schemars(range(min = 1, max = 1000000))]
    pub burst: Option<u32>,
}

/// Inbound authentication: exactly one mode.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct InboundAuth {
    /// A static key in a header (Cognigy's `X-API-Key` or `Authorization: ApiKey …` options).
    pub api_key: Option<ApiKeyAuth>,
    /// `Authorization: Bearer <token>`.
    pub bearer: Option<BearerInAuth>,
    /// HTTP Basic authentication.
    pub basic: Option<BasicAuth>,
    /// Hex HMAC-SHA256 of the raw body in a header; a `sha256=` prefix is accepted.
    pub hmac: Option<HmacAuth>,
    /// Standard Webhooks signatures (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
    pub standard_webhooks: Option<StandardWebhooksAuth>,
    /// No authentication: an explicit opt-out.
    pub none: Option<Empty>,
}

/// An empty block, `{}`.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyAuth {
    /// Header carrying the key (default `X-API-Key`). With `Authorization`, `ApiKey <key>` is accepted too.
    pub header: Option<String>,
    /// Accepted keys; several allow rotation. Use `${VAR}` rather than literal secrets.
    #[schemars(length(min = 1))]
    pub keys: Vec<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BearerInAuth {
    /// Accepted bearer tokens; several allow rotation.
    #[schemars(length(min = 1))]
    pub tokens: Vec<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    /// Expected user name.
    pub username: String,
    /// Expected password (use `${VAR}`).
    pub password: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HmacAuth {
    /// Shared secrets; a signature made with any one is accepted.
    #[schemars(length(min = 1))]
    pub secrets: Vec<String>,
    /// Header carrying the hex signature (default `X-Cognigy-Signature`).
    pub header: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StandardWebhooksAuth {
    /// Signing secrets, `whsec_` followed by base64.
    #[schemars(length(min = 1))]
    pub secrets: Vec<String>,
    /// How far `webhook-timestamp` may be from now, either way (default 5m).
    pub tolerance: Option<Dur>,
}

/// A route: one downstream call for a bot's intent.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique route name; shown in metrics, logs and the admin API.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"))]
    pub name: String,
    /// The bot this route serves. Omit both `bot` and `bots` for every bot.
    pub bot: Option<String>,
    /// The bots this route serves. An empty list is an error: it would mean no bot,
    /// not every bot (for every bot, omit both `bot` and `bots`).
    pub bots: Option<Vec<String>>,
    /// Intent this route handles (exact match); `"*"` makes it the bot's default route, which
    /// gets every intent no other route matches, and null, absent or empty intents.
    pub intent: String,
    /// Minimum intent score (number or numeric string at the bot's `score_path`); below it the
    /// call goes to the default route.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_score: Option<f64>,
    /// Extra JSON Schema for this route's payloads, checked after the bot's; relative to this file.
    pub schema: Option<String>,
    /// `sync` answers the bot with the downstream's answer; `async` stores the call and answers 202.
    pub mode: Option<Mode>,
    /// Sync: total time budget for all tries (default 7s, under Cognigy's 8s timeout; at most 1h).
    pub deadline: Option<Budget>,
    /// Template of an idempotency key: inbound duplicates are answered once, and the value is sent
    /// downstream as `Idempotency-Key` (unless the route sets that header).
    pub idempotency_key: Option<String>,
    /// When true, a template reading a field the payload lacks is an error instead of `""`.
    pub strict: Option<bool>,
    /// Payload fields (JSON Pointers, e.g. `/sessionId`) to include in this route's log line.
    /// Payload values are never logged otherwise.
    pub log_fields: Option<Vec<String>>,
    /// The call to make.
    pub downstream: Downstream,
    /// Handlebars template of the JSON request body. `{{x}}` is escaped for the inside of a JSON
    /// string and may stand only inside one; a JSON value takes `{{json x}}`, which may not stand
    /// inside a string. Block helpers (`#if`, `#each`, …) may stand anywhere.
    pub body: Option<String>,
    /// Sync: the answer to the bot (default: the downstream's status and JSON body).
    pub response: Option<ResponseSpec>,
    /// Retry policy.
    pub retry: Option<Retry>,
    /// Circuit breaker.
    pub breaker: Option<Breaker>,
    /// Sync: the answer while the route is open or paused (default 503 with Retry-After).
    pub fallback: Option<Fallback>,
    /// Sync: `respond` (default) answers the failure; `queue` stores the call for async delivery
    /// when the route is open or paused or tries run out, and answers 202 (or the fallback).
    pub on_failure: Option<OnFailure>,
    /// Extra targets (fan-out): each is an async delivery of its own, accepted in the same store
    /// transaction as the route's own request, with its own breaker, retry schedule and dedupe,
    /// known as `<route>/<name>`. The bot's answer is the route's own.
    pub also: Option<Vec<AlsoTarget>>,
    /// Example payloads with the request they should produce; checked by `gateway validate`.
    pub examples: Option<Vec<Example>>,
    /// Lint warnings of `gateway validate` not to give for this route, e.g.
    /// `{ allow: [no-idempotency-key] }`.
    pub lint: Option<Lint>,
}

/// An extra target of a route (`also:`): one more downstream call for the same payload,
/// always delivered asynchronously.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlsoTarget {
    /// Name, unique within the route; the target is known as `<route>/<name>` in metrics, logs,
    /// the status page and `/admin/deliveries`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"))]
    pub name: String,
    /// The call to make (as a route's `downstream`; the `defaults:` block applies).
    pub downstream: Downstream,
    /// Template of the JSON request body (default: the route's `body`).
    pub body: Option<String>,
    /// Template of the idempotency key: this target's dedupe key and `Idempotency-Key`
    /// (default: the route's `idempotency_key`).
    pub idempotency_key: Option<String>,
    /// Retry policy (default: the route's, field by field over `defaults:`).
    pub retry: Option<Retry>,
    /// Circuit breaker settings (default: the route's); the state is this target's own.
    pub breaker: Option<Breaker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Sync,
    Async,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    Respond,
    Queue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum Method {
    GET,
    POST,
    PUT,
    PATCH,
    DELETE,
}

/// The downstream call.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Downstream {
    /// HTTP method (default POST).
    pub method: Option<Method>,
    /// URL template. Scheme, host and port are fixed by the file; each `{{…}}` in the path or
    /// query is percent-encoded as one segment or value.
    pub url: String,
    /// Timeout of one try (default 5s; at most 1h).
    pub timeout: Option<Budget>,
    /// Extra request headers; values are templates. CR, LF or NUL in a rendered value is refused.
    pub headers: Option<BTreeMap<String, String>>,
    /// Downstream authentication: exactly one mode (default none).
    pub auth: Option<OutboundAuth>,
    /// Statuses that count as delivered, e.g. `[2xx, 409]` (default `[2xx]`).
    pub success: Option<Vec<StatusPattern>>,
    /// Outbound rate limit of this downstream (per instance): a token bucket. A sync call waits
    /// for a token while its deadline allows, else answers as an open route (`rate_limited`);
    /// an async delivery is postponed without using a try.
    pub rate_limit: Option<RateLimit>,
    /// Bulkhead: most calls in flight at once; over it the call is answered 503 at once (default 64).
    #[schemars(range(min = 1, max = 100000))]
    pub max_in_flight: Option<u32>,
    /// TLS to this downstream: a private CA, a client certificate (mutual TLS). Used for the
    /// route's requests, its OAuth2 token requests and its health probes.
    pub tls: Option<DownstreamTls>,
}

/// `downstream` settings a `defaults:` block may give (everything but the URL).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DownstreamDefaults {
    /// HTTP method (default POST).
    pub method: Option<Method>,
    /// Timeout of one try (default 5s; at most 1h).
    pub timeout: Option<Budget>,
    /// Headers added to every route's request (a route's own header of the same name wins).
    pub headers: Option<BTreeMap<String, String>>,
    /// Downstream authentication for routes that set none.
    pub auth: Option<OutboundAuth>,
    /// Statuses that count as delivered.
    pub success: Option<Vec<StatusPattern>>,
    /// Outbound rate limit for routes that set none.
    pub rate_limit: Option<RateLimit>,
    /// Bulkhead size.
    #[schemars(range(min = 1, max = 100000))]
    pub max_in_flight: Option<u32>,
    /// TLS settings for routes that set none.
    pub tls: Option<DownstreamTls>,
}

/// TLS to a downstream. Files are PEM, paths relative to this file; they are read and
/// checked at every load (and watched: a renewed certificate is picked up without a restart).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DownstreamTls {
    /// CA certificates trusted for this downstream besides the system's (a private CA).
    pub ca_file: Option<String>,
    /// Client certificate chain for mutual TLS (the leaf first); needs `client_key_file`.
    pub client_cert_file: Option<String>,
    /// Private key of the client certificate (PKCS#8, PKCS#1 or SEC1); needs `client_cert_file`.
    pub client_key_file: Option<String>,
}

/// Downstream authentication: exactly one mode.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct OutboundAuth {
    /// OAuth2 client-credentials grant; tokens are cached and refreshed before they expire.
    pub oauth2: Option<OAuth2>,
    /// A static bearer token.
    pub bearer: Option<BearerOutAuth>,
    /// HTTP Basic authentication (Zendesk, ServiceNow, …).
    pub basic: Option<BasicOutAuth>,
    /// No authentication.
    pub none: Option<Empty>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicOutAuth {
    /// User name (no `:`).
    pub username: String,
    /// Password (use `${VAR}` or `${file:PATH}`).
    pub password: String,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OAuth2 {
    /// Token endpoint URL.
    pub token_url: String,
    /// Client id.
    pub client_id: String,
    /// Client secret (use `${VAR}`).
    pub client_secret: String,
    /// Scopes to request.
    pub scopes: Option<Vec<String>>,
    /// How the client authenticates at the token endpoint: `basic` (default) or `body`.
    pub client_auth: Option<ClientAuth>,
    /// Extra form fields of the token request, e.g. `audience` (Auth0) or `resource`
    /// (Azure AD v1). Not `grant_type`, `scope`, `client_id` or `client_secret`.
    pub params: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Basic,
    Body,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BearerOutAuth {
    /// The token (use `${VAR}`).
    pub token: String,
}

/// The answer to the bot for a sync route.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResponseSpec {
    /// Status to answer with (default: the downstream's).
    #[schemars(range(min = 100, max = 599))]
    pub status: Option<u16>,
    /// JSON template (`{{x}}` inside strings, `{{json x}}` for values); its root is
    /// `{downstream: {status, headers, body}, request: <payload>}`.
    pub body: Option<String>,
}

/// Retry policy.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Sync: total tries, the first included (default 3).
    #[schemars(range(min = 1, max = 20))]
    pub attempts: Option<u32>,
    /// Exponential backoff with full jitter between sync tries.
    pub backoff: Option<Backoff>,
    /// Cap on an honoured `Retry-After` (429, 503); default 30s.
    pub retry_after_max: Option<Dur>,
    /// Async: waits between tries; 1 + its length tries in all.
    pub schedule: Option<Vec<Dur>>,
}

#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// First wait's upper bound (default 200ms).
    pub initial: Option<Dur>,
    /// Largest wait (default 2s).
    pub max: Option<Dur>,
}

/// Circuit breaker, one per route.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Breaker {
    /// Sliding time window of outcomes (default 60s).
    pub window: Option<Dur>,
    /// No rate decision below this many calls in the window (default 10).
    #[schemars(range(min = 1, max = 1000000))]
    pub min_calls: Option<u32>,
    /// Open when the share of failures in the window is at least this (default 0.5).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub failure_rate: Option<f64>,
    /// Or open after this many failures in a row (default 5).
    #[schemars(range(min = 1, max = 1000000))]
    pub consecutive_failures: Option<u32>,
    /// Slow calls: latency above `threshold`; open when their share is at least `rate`.
    pub slow_call: Option<SlowCall>,
    /// First open period (default 30s); doubles on each re-open from half-open.
    pub open_for: Option<Dur>,
    /// Cap of the open period (default 5m).
    pub open_for_max: Option<Dur>,
    /// Concurrent trial calls while half-open (default 3).
    #[schemars(range(min = 1, max = 1000))]
    pub half_open_probes: Option<u32>,
    /// Successful probes that close the breaker (default 3).
    #[schemars(range(min = 1, max = 1000))]
    pub close_after: Option<u32>,
    /// Optional health probe (GET) run only while open; a success moves to half-open early.
    pub health: Option<Health>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlowCall {
    /// Latency above which a call is slow.
    pub threshold: Dur,
    /// Open when the share of slow calls is at least this.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub rate: f64,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// URL to GET (no templates). The route's credentials (bearer or OAuth2 token) are sent only
    /// when it is on the downstream URL's origin (scheme, host, port); another origin is probed
    /// without them.
    pub url: String,
    /// Time between probes (default 10s).
    pub interval: Option<Dur>,
}

/// Answer while the route is open or paused.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    /// Status (default 200).
    #[schemars(range(min = 100, max = 599))]
    pub status: Option<u16>,
    /// JSON template (`{{x}}` inside strings, `{{json x}}` for values); its root is
    /// `{request: <payload>, retry_after: <seconds>}`.
    pub body: Option<String>,
}

/// Defaults for every route.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Downstream settings for every route (not the URL).
    pub downstream: Option<DownstreamDefaults>,
    /// Retry policy for every route; a route's own fields win one by one.
    pub retry: Option<Retry>,
    /// Breaker settings for every route; a route's own fields win one by one.
    pub breaker: Option<Breaker>,
    /// Default sync deadline (at most 1h).
    pub deadline: Option<Budget>,
}

/// An example run by `gateway validate`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Example {
    /// Name shown in diagnostics.
    pub name: String,
    /// Payload: a JSON file path relative to this file, or the payload inline.
    pub payload: ExamplePayload,
    /// Inbound headers for the `header` helper.
    pub headers: Option<BTreeMap<String, String>>,
    /// What the route should send.
    pub expect: Option<Expect>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ExamplePayload {
    /// Path of a JSON file, relative to the route file.
    Path(String),
    /// The payload itself.
    Inline(serde_json::Map<String, serde_json::Value>),
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Expected method.
    pub method: Option<Method>,
    /// Expected URL, exactly.
    pub url: Option<String>,
    /// Expected headers (names case-insensitive); others may be present.
    pub headers: Option<BTreeMap<String, String>>,
    /// Expected body: every key given must be present with this value (subset match).
    pub body: Option<serde_json::Value>,
    /// Set to true when the route should refuse this payload (e.g. schema violation).
    pub error: Option<bool>,
    /// What each `also` target should send, by target name (`method`, `url`, `headers`, `body`).
    pub also: Option<BTreeMap<String, Expect>>,
}

/// The longest duration a route file or flag accepts (SPEC §7.1): 7 days.
/// Longer values are typos, and the bound keeps every sum of durations and
/// every `Instant + Duration` far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The longest time budget of one call (`deadline`, downstream `timeout`): 1h.
pub const MAX_BUDGET: Duration = Duration::from_secs(60 * 60);

/// Why a duration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationError {
    /// Not a whole number followed by `ms`, `s`, `m` or `h`.
    Malformed,
    /// Well-formed, but longer than `max` (however many digits it has).
    TooLong { max: Duration },
}

impl std::fmt::Display for DurationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DurationError::Malformed => f.write_str("expected a duration like 250ms, 5s, 2m or 1h"),
            DurationError::TooLong { max } if *max == MAX_DURATION => {
                f.write_str("must be at most 168h (7 days)")
            }
            DurationError::TooLong { max } => {
                write!(f, "must be at most {}", humantime::format_duration(*max))
            }
        }
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h` and refuses anything longer than `max`.
/// Never panics and never overflows, whatever the input (a number too large
/// for any integer type is [`DurationError::TooLong`]).
pub fn parse_duration(s: &str, max: Duration) -> Result<Duration, DurationError> {
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or(DurationError::Malformed)?;
    let (num, unit) = s.split_at(split);
    let millis_per_unit: u128 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(DurationError::Malformed),
    };
    if num.is_empty() {
        return Err(DurationError::Malformed);
    }
    // All ASCII digits: only overflow can fail the parse, and that is too long.
    let n: u64 = num.parse().unwrap_or(u64::MAX);
    // u64::MAX * 3_600_000 fits in a u128 with room to spare.
    let millis = u128::from(n) * millis_per_unit;
    if millis > max.as_millis() {
        return Err(DurationError::TooLong { max });
    }
    // millis <= max.as_millis(), which fits in a u64 for both bounds.
    Ok(Duration::from_millis(millis as u64))
}

/// A duration: `250ms`, `5s`, `2m`, `1h`; at most [`MAX_DURATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

pub const DURATION_PATTERN: &str = r"^[0-9]+(ms|s|m|h)$";

impl Dur {
    /// The duration, or `None` when malformed or longer than [`MAX_DURATION`].
    pub fn parse(s: &str) -> Option<Duration> {
        parse_duration(s, MAX_DURATION).ok()
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s, MAX_DURATION)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Dur {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration: a whole number and a unit, ms, s, m or h (250ms, 5s, 2m, 1h); at most 168h (7 days).",
        })
    }
}

/// The time budget of one call (`deadline`, downstream `timeout`): a duration
/// of at most [`MAX_BUDGET`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget(pub Duration);

impl<'de> Deserialize<'de> for Budget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s, MAX_BUDGET)
            .map(Budget)
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Budget {
    fn schema_name() -> Cow<'static, str> {
        "TimeBudget".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "The time budget of a call: a whole number and a unit, ms, s, m or h (250ms, 5s, 2m, 1h); at most 1h.",
        })
    }
}

/// A status or a status class: `409`, `2xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusPattern {
    Exact(u16),
    Class(u8),
}

pub const STATUS_CLASS_PATTERN: &str = r"^([1-5]xx|[1-5][0-9][0-9])$";

impl StatusPattern {
    pub fn parse(s: &str) -> Option<Self> {
        if let Some(c) = s.strip_suffix("xx") {
            let d: u8 = c.parse().ok()?;
            return (1..=5).contains(&d).then_some(StatusPattern::Class(d));
        }
        let n: u16 = s.parse().ok()?;
        (100..=599).contains(&n).then_some(StatusPattern::Exact(n))
    }
}

impl<'de> Deserialize<'de> for StatusPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let s = match &v {
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::String(s) => s.clone(),
            _ => String::new(),
        };
        StatusPattern::parse(&s).ok_or_else(|| {
            serde::de::Error::custom("expected a status like 409 or a class like 2xx")
        })
    }
}

impl JsonSchema for StatusPattern {
    fn schema_name() -> Cow<'static, str> {
        "Status".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "An HTTP status (409) or a status class (2xx).",
            "anyOf": [
                { "type": "integer", "minimum": 100, "maximum": 599 },
                { "type": "string", "pattern": STATUS_CLASS_PATTERN }
            ]
        })
    }
}

/// The JSON Schema of route files, as `gateway schema` prints it.
pub fn route_file_schema() -> serde_json::Value {
    let mut settings = schemars::generate::SchemaSettings::draft2020_12();
    settings.meta_schema = Some("https://json-schema.org/draft/2020-12/schema".into());
    let schema = settings
        .into_generator()
        .into_root_schema_for::<RouteFile>();
    let mut v = serde_json::to_value(schema).expect("schema serializes");
    strip_null(&mut v);
    v
}

/// An omitted key means "use the default"; an explicit null is refused. Removing
/// the `null` alternatives schemars adds for `Option` also means an error inside an
/// optional block is reported at its own key, not as "matches no anyOf" on the block.
fn strip_null(v: &mut serde_json::Value) {
    use serde_json::Value;
    let Value::Object(map) = v else {
        if let Value::Array(items) = v {
            items.iter_mut().for_each(strip_null);
        }
        return;
    };
    if let Some(Value::Array(types)) = map.get_mut("type") {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let only = types.remove(0);
            map.insert("type".into(), only);
        }
    }
    if let Some(Value::Array(alts)) = map.get("anyOf") {
        let non_null: Vec<Value> = alts
            .iter()
            .filter(|a| a.get("type").is_none_or(|t| t != "null"))
            .cloned()
            .collect();
        if non_null.len() == 1 && alts.len() == 2 {
            map.remove("anyOf");
            if let Value::Object(inner) = &non_null[0] {
                for (k, val) in inner {
                    map.entry(k.clone()).or_insert_with(|| val.clone());
                }
            }
        }
    }
    map.values_mut().for_each(strip_null);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(Dur::parse("5s"), Some(Duration::from_secs(5)));
        assert_eq!(Dur::parse("2m"), Some(Duration::from_secs(120)));
        assert_eq!(Dur::parse("1h"), Some(Duration::from_secs(3600)));
        for bad in [
            "", "5", "s", "5 s", "1.5s", "-1s", "+1s", "5sec", "5d", "ms", "٣s",
        ] {
            assert_eq!(Dur::parse(bad), None, "{bad}");
            assert_eq!(
                parse_duration(bad, MAX_DURATION),
                Err(DurationError::Malformed),
                "{bad}"
            );
        }
    }

    /// SPEC §7.1: at most 7 days; a time budget at most 1h; absurd numbers are
    /// "too long", never an overflow.
    #[test]
    fn durations_are_bounded() {
        let week = Duration::from_secs(7 * 24 * 3600);
        assert_eq!(parse_duration("168h", MAX_DURATION), Ok(week));
        assert_eq!(parse_duration("10080m", MAX_DURATION), Ok(week));
        assert_eq!(parse_duration("604800000ms", MAX_DURATION), Ok(week));
        let too_long = Err(DurationError::TooLong { max: MAX_DURATION });
        for s in [
            "169h",
            "10081m",
            "604800001ms",
            "5000000000000000h",
            "18446744073709551615h",
            "18446744073709551616ms",
            "99999999999999999999999999999999999999999999s",
        ] {
            assert_eq!(parse_duration(s, MAX_DURATION), too_long, "{s}");
            assert_eq!(Dur::parse(s), None, "{s}");
        }
        assert_eq!(parse_duration("1h", MAX_BUDGET), Ok(MAX_BUDGET));
        assert_eq!(parse_duration("3600000ms", MAX_BUDGET), Ok(MAX_BUDGET));
        assert_eq!(
            parse_duration("61m", MAX_BUDGET),
            Err(DurationError::TooLong { max: MAX_BUDGET })
        );
        assert_eq!(
            DurationError::TooLong { max: MAX_DURATION }.to_string(),
            "must be at most 168h (7 days)"
        );
        assert_eq!(
            DurationError::TooLong { max: MAX_BUDGET }.to_string(),
            "must be at most 1h"
        );
    }

    proptest::proptest! {
        /// Any text: no panic, and whatever parses is within the bound.
        #[test]
        fn parse_duration_never_panics_and_stays_bounded(s in "\\PC{0,40}") {
            for max in [MAX_DURATION, MAX_BUDGET] {
                if let Ok(d) = parse_duration(&s, max) {
                    proptest::prop_assert!(d <= max, "{s:?} gave {d:?}");
                }
            }
        }

        /// Well-formed text: accepted exactly when its value is within the bound
        /// (computed here without any integer limit), else "too long".
        #[test]
        fn well_formed_durations_are_accepted_iff_within_bound(
            digits in "[0-9]{1,45}",
            unit in proptest::sample::select(vec!["ms", "s", "m", "h"]),
        ) {
            let s = format!("{digits}{unit}");
            let per_unit: u32 = match unit { "ms" => 1, "s" => 1_000, "m" => 60_000, _ => 3_600_000 };
            // digits * per_unit <= max_ms, compared as decimal big numbers
            for max in [MAX_DURATION, MAX_BUDGET] {
                let limit = max.as_millis() / u128::from(per_unit);
                let trimmed = digits.trim_start_matches('0');
                let within = trimmed.len() <= 38
                    && trimmed.parse::<u128>().unwrap_or(0) <= limit;
                match parse_duration(&s, max) {
                    Ok(d) => {
                        proptest::prop_assert!(within, "{s} accepted as {d:?}");
                        proptest::prop_assert_eq!(
                            d.as_millis(),
                            trimmed.parse::<u128>().unwrap_or(0) * u128::from(per_unit)
                        );
                    }
                    Err(e) => {
                        proptest::prop_assert!(!within, "{s} refused: {e}");
                        proptest::prop_assert_eq!(e, DurationError::TooLong { max });
                    }
                }
            }
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(StatusPattern::parse("2xx"), Some(StatusPattern::Class(2)));
        assert_eq!(StatusPattern::parse("409"), Some(StatusPattern::Exact(409)));
        for bad in ["6xx", "0xx", "99", "600", "2XX", "abc"] {
            assert_eq!(StatusPattern::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_property_has_a_description() {
        fn walk(v: &serde_json::Value, at: &str, missing: &mut Vec<String>) {
            if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                for (k, p) in props {
                    if p.get("description").is_none() && p.get("$ref").is_none() {
                        missing.push(format!("{at}.{k}"));
                    }
                    walk(p, &format!("{at}.{k}"), missing);
                }
            }
            if let Some(defs) = v.get("$defs").and_then(|p| p.as_object()) {
                for (k, d) in defs {
                    walk(d, k, missing);
                }
            }
        }
        let mut missing = vec![];
        walk(&route_file_schema(), "", &mut missing);
        assert!(missing.is_empty(), "undocumented fields: {missing:?}");
    }
}
