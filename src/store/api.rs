//! The [`Store`] trait, the data it keeps, its errors, and [`open`].
//!
//! # Why a trait of boxed futures
//!
//! The gateway holds its store as `Arc<dyn Store>` chosen at start-up from
//! `--store`, and tests swap in either backend through the same suite. An
//! `async fn` in a trait is not object-safe, so every method returns a
//! [`BoxFuture`]; one allocation per call is nothing next to a commit. No
//! `async_trait` macro is needed for that. [`StoreExt`] adds the named
//! shorthands (`complete`, `retry_at`, `postpone`, `bury`) over the one
//! write path, [`Store::settle`].
//!
//! # Time
//!
//! Every operation that reads or writes a time takes `now` from the caller,
//! so tests are deterministic. Times are stored as milliseconds since the
//! Unix epoch. With PostgreSQL, instances compare each other's lease times:
//! keep their clocks synchronised (NTP); skew eats into the lease margin.
//!
//! # Leases
//!
//! [`Store::claim_due`] hands out deliveries with a [`Lease`]: an owner
//! name, a per-claim sequence number and an expiry. Every write about a
//! claimed delivery presents its lease, and is refused with
//! [`StoreError::LeaseLost`] unless the delivery is still leased *by that
//! very claim*. When a lease expires, the delivery may be claimed again (by
//! anyone, the same owner included); the old claim's writes are then refused,
//! so a slow worker never overwrites the result of the one that took over.
//! Leases are not renewed: a worker must end each try within its lease (the
//! gateway's worker cuts a try short to fit, see
//! [`try_budget`](super::worker::try_budget)), so a lease should be longer
//! than the longest downstream timeout plus a margin. [`DEFAULT_LEASE`] is
//! 60 s (`gateway serve --lease`).
//!
//! # Inbound dedupe (SPEC §5 step 7, §7.3)
//!
//! Keys are scoped per (bot, route, key): two routes of one bot whose keys
//! render the same value (one Cognigy `inputId` calling two routes) are two
//! requests, each sent or delivered.
//!
//! *Async routes*: [`Store::accept`] with a window checks (bot, route,
//! idempotency key) and inserts in one transaction. A key seen on a delivery
//! accepted less than `window` ago (strictly: `created_at > now - window`) is
//! a [`Accept::Duplicate`] carrying the first delivery's id, so the caller can
//! answer the first 202 again; an older one is forgotten and the new delivery
//! takes the key over. The window is measured from the first delivery's
//! acceptance, not extended by duplicates.
//!
//! *Sync routes*: [`Store::begin`] / [`Store::finish`] keep the first answer
//! (status and body) per [`ScopedKey`] for the window, with an in-progress
//! marker that expires after a lease, so a crashed request does not block
//! its key for the whole window. `begin` hands the request a [`Hold`] with a
//! token of its own; only that hold can [`finish`](Store::finish) or
//! [`abandon`](Store::abandon) the key, so a request whose hold expired and
//! was taken over cannot overwrite or free the new holder's record. The two
//! mechanisms are separate namespaces: a route that changes mode within a
//! window may handle one key twice.
//!
//! Sync records written by schema version 1 have no route (stored as the
//! empty route `''`): until they leave their window they answer for every
//! route of their bot, as they did when they were written.
//!
//! # The pending bound (`--max-pending`)
//!
//! With [`StoreOptions::max_pending`], an accept that would make more than
//! that many deliveries *live* (pending or leased: accepted, not yet
//! delivered nor dead) is refused with [`StoreError::QueueFull`] and stores
//! nothing. The count is a counter in the database, kept by every writing
//! transaction (PostgreSQL: triggers; SQLite: each writer transaction adds what
//! its operations moved, so other processes' writes — `gateway deliveries
//! replay` — are counted too) and read inside the accepting transaction, so the
//! bound is exact. A duplicate is still answered with its first delivery's id when the
//! queue is full: it stores nothing. Replays are not refused: replaying is
//! the operator's decision.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::render::OutboundRequest;

/// A boxed, sendable future: what every [`Store`] method returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The store URL when `--store` is not given (SPEC §4).
pub const DEFAULT_STORE_URL: &str = "sqlite://data/gateway.db";

/// The default of `gateway serve --lease`: long enough for any single try
/// (route timeouts are seconds) with a wide margin, short enough that a
/// dead instance's work resumes within a minute.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// SPEC §5 step 7's default dedupe window.
pub const DEFAULT_DEDUPE_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// Where a delivery is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Waiting for `next_attempt_at`, then claimable.
    Pending,
    /// Claimed by a worker until `leased_until`.
    Leased,
    /// A try succeeded.
    Delivered,
    /// Tries are used up or the last outcome is not retryable: a dead letter.
    Dead,
}

impl State {
    /// The stored (and displayed) name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Leased => "leased",
            State::Delivered => "delivered",
            State::Dead => "dead",
        }
    }

    /// Pending or leased: counted against `--max-pending`.
    pub fn is_live(self) -> bool {
        matches!(self, State::Pending | State::Leased)
    }

    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "pending" => State::Pending,
            "leased" => State::Leased,
            "delivered" => State::Delivered,
            "dead" => State::Dead,
            _ => return None,
        })
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rendered downstream request, as stored: everything but downstream
/// auth and secret headers, which the worker adds at send time from the
/// route's current configuration (secrets never reach the store).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredRequest {
    pub method: String,
    pub url: String,
    /// Header name and value, in order. Never a secret (see [`StoredRequest::from_outbound`]).
    pub headers: Vec<(String, String)>,
    /// The JSON body, when the route has one.
    pub body: Option<String>,
}

impl StoredRequest {
    /// The storable part of a rendered request: headers whose value came
    /// from the environment (`secret` in [`OutboundRequest::headers`]) are
    /// left out; the sender renders them again. Header values that are not
    /// UTF-8 are stored lossily (render refuses control characters already).
    /// [`from_outbound`](Self::from_outbound) with every `${VAR}` value in the
    /// URL and body masked by `redactor` (a route with `secret_parts`: its
    /// worker renders them again at send time, so the store never holds them).
    pub fn from_outbound_masked(
        req: &OutboundRequest,
        redactor: &crate::config::redact::Redactor,
    ) -> Self {
        let mut s = Self::from_outbound(req);
        s.url = redactor.redact(&s.url);
        s.body = s.body.map(|b| redactor.redact(&b));
        s
    }

    pub fn from_outbound(req: &OutboundRequest) -> Self {
        StoredRequest {
            method: req.method.as_str().to_owned(),
            url: req.url.clone(),
            headers: req
                .headers
                .iter()
                .filter(|(_, _, secret)| !secret)
                .map(|(n, v, _)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: req.body.clone(),
        }
    }
}

/// Shows the shape, not the values: URLs, header values and bodies carry
/// payload data, which must not reach logs through a stray `{:?}`.
impl fmt::Debug for StoredRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredRequest")
            .field("method", &self.method)
            .field("url", &format_args!("<{} bytes>", self.url.len()))
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field(
                "body",
                &format_args!("<{} bytes>", self.body.as_ref().map_or(0, |b| b.len())),
            )
            .finish()
    }
}

/// What the accept path stores (SPEC §5 step 8).
#[derive(Clone, PartialEq, Eq)]
pub struct NewDelivery {
    pub bot: String,
    pub route: String,
    /// The inbound payload, JSON text (kept for operators and replays).
    pub payload: String,
    pub request: StoredRequest,
    /// Rendered `idempotency_key`: the inbound dedupe key and the
    /// `Idempotency-Key` sent on every try.
    pub idempotency_key: Option<String>,
    /// The route's [`fingerprint`](crate::config::model::Downstream::fingerprint)
    /// at acceptance: the delivery is sent only while the route still has it
    /// (SPEC §7.3). No secret.
    pub fingerprint: Option<String>,
}

impl fmt::Debug for NewDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewDelivery")
            .field("bot", &self.bot)
            .field("route", &self.route)
            .field("payload", &format_args!("<{} bytes>", self.payload.len()))
            .field("request", &self.request)
            .field("idempotency_key", &self.idempotency_key.is_some())
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// How a store is opened beyond its URL (`gateway serve` flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// Refuse accepts while this many deliveries are live (see the module docs);
    /// `None`: unbounded.
    pub max_pending: Option<u64>,
}

/// The default of `gateway serve --max-pending` (SPEC §7.3).
pub const DEFAULT_MAX_PENDING: u64 = 1_000_000;

/// The default of `gateway serve --dead-retention` (SPEC §7.3): 30 days.
pub const DEFAULT_DEAD_RETENTION: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// The answer of [`Store::accept`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accept {
    /// Committed: answer 202 with this id.
    Accepted { id: String },
    /// Same (bot, route, key) within the window: nothing was stored; `id` is
    /// the first delivery's, so the 202 is the first answer again.
    Duplicate { id: String },
}

impl Accept {
    pub fn id(&self) -> &str {
        match self {
            Accept::Accepted { id } | Accept::Duplicate { id } => id,
        }
    }
}

/// One stored delivery.
#[derive(Clone, PartialEq, Eq)]
pub struct Delivery {
    /// UUIDv7, as text.
    pub id: String,
    pub bot: String,
    pub route: String,
    pub payload: String,
    pub request: StoredRequest,
    pub idempotency_key: Option<String>,
    pub state: State,
    /// Tries made (a postponement is not a try).
    pub attempts: u32,
    pub next_attempt_at: SystemTime,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub lease_owner: Option<String>,
    pub leased_until: Option<SystemTime>,
    /// The last try's error (`status 503`, `timeout`, …) or why it was buried
    /// (`route_removed`, `route_changed`, …).
    pub last_error: Option<String>,
    /// The route's fingerprint when the request was rendered; `None` for a
    /// delivery accepted before schema version 3 (then only the stored URL's
    /// origin is compared with the route's).
    pub fingerprint: Option<String>,
    /// Replayed: render the request again from the payload against the route
    /// as it is now, before the next try ([`Store::set_request`]).
    pub render_again: bool,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.id)
            .field("bot", &self.bot)
            .field("route", &self.route)
            .field("payload", &format_args!("<{} bytes>", self.payload.len()))
            .field("request", &self.request)
            .field("state", &self.state)
            .field("attempts", &self.attempts)
            .field("next_attempt_at", &self.next_attempt_at)
            .field("lease_owner", &self.lease_owner)
            .field("last_error", &self.last_error)
            .field("render_again", &self.render_again)
            .finish_non_exhaustive()
    }
}

/// A claim on one delivery, presented on every write about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub owner: String,
    /// Incremented by every claim of this delivery: tells this claim from a
    /// later one by the same owner after an expiry.
    pub seq: i64,
    pub until: SystemTime,
}

/// A delivery handed to a worker by [`Store::claim_due`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub delivery: Delivery,
    pub lease: Lease,
}

/// What one try of a delivery produced, as the worker saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// When the try started.
    pub at: SystemTime,
    /// The downstream's status, when it answered.
    pub status: Option<u16>,
    pub latency: Duration,
    /// Why it failed (`timeout`, `connect error`, `status 503`…); `None` on
    /// success. Never a payload value or a secret.
    pub error: Option<String>,
}

/// One stored try, as the operations API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first try; starts again at 1 after a replay.
    pub number: u32,
    pub at: SystemTime,
    pub status: Option<u16>,
    pub latency: Duration,
    pub error: Option<String>,
}

/// The outcome a worker writes for a claimed delivery ([`Store::settle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// The try succeeded: `delivered`.
    Delivered(AttemptRecord),
    /// The try failed and the schedule has another: `pending` until `next_at`.
    RetryAt {
        attempt: AttemptRecord,
        next_at: SystemTime,
    },
    /// Dead letter: after a final try (`attempt`), or without one (the route
    /// is gone) with a `reason` kept as the last error.
    Dead {
        attempt: Option<AttemptRecord>,
        reason: Option<String>,
    },
    /// The route is open or paused: back to `pending` until `until`, no try
    /// used and none recorded.
    Postpone { until: SystemTime },
}

/// A delivery in a list: no payload, no request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverySummary {
    pub id: String,
    pub bot: String,
    pub route: String,
    pub state: State,
    pub attempts: u32,
    pub next_attempt_at: SystemTime,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub last_error: Option<String>,
}

/// One delivery with its tries, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryDetail {
    pub delivery: Delivery,
    pub attempts: Vec<Attempt>,
}

/// Queue gauges for metrics and the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub pending: u64,
    pub leased: u64,
    pub dead: u64,
    /// Age of the oldest delivery not yet delivered nor dead (pending or
    /// leased), measured from its acceptance; `None` when there is none.
    pub oldest_pending_age: Option<Duration>,
}

/// A sync route's first answer, kept for duplicates.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl fmt::Debug for StoredAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredAnswer")
            .field("status", &self.status)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish()
    }
}

/// A sync route's idempotency key in its scope: (bot, route, key).
#[derive(Clone, PartialEq, Eq)]
pub struct ScopedKey {
    pub bot: String,
    pub route: String,
    /// The rendered `idempotency_key` (a payload value).
    pub key: String,
}

impl ScopedKey {
    pub fn new(bot: impl Into<String>, route: impl Into<String>, key: impl Into<String>) -> Self {
        ScopedKey {
            bot: bot.into(),
            route: route.into(),
            key: key.into(),
        }
    }
}

/// Names the scope, not the key: keys are payload values.
impl fmt::Debug for ScopedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopedKey")
            .field("bot", &self.bot)
            .field("route", &self.route)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .finish()
    }
}

/// One request's hold on a [`ScopedKey`], given by [`Store::begin`]: the
/// token tells this hold from a later one that took the key over after this
/// one's lease expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub key: ScopedKey,
    /// Unique per hold (a UUID); stored beside the in-progress marker.
    pub token: String,
}

/// The answer of [`Store::begin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// First time within the window (or the previous holder's in-progress
    /// lease expired): go ahead, then [`Store::finish`] or [`Store::abandon`]
    /// with this hold.
    New(Hold),
    /// Another request with this key is being handled right now.
    InProgress,
    /// Answered before within the window: answer this again.
    Done(StoredAnswer),
}

/// Why a store operation failed. Messages name deliveries by id and never
/// carry payload values, URLs or secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `--store` is not a URL we can use (the URL itself is not repeated: it may hold a password).
    #[error("store URL: {0}")]
    Url(&'static str),
    #[error("cannot create the directory of the SQLite store `{path}`: {source}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("delivery {id} not found")]
    NotFound { id: String },
    /// The delivery is no longer leased by this claim: its lease expired and
    /// another claim took it, or it was released.
    #[error("delivery {id}: lease lost (released, or claimed again after it expired)")]
    LeaseLost { id: String },
    #[error("delivery {id} is {state}; only dead or delivered deliveries can be replayed")]
    NotReplayable { id: String, state: State },
    #[error(
        "the store's schema is version {found}, newer than this gateway knows ({supported}); \
         run a newer gateway"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    /// A migration found a table other than the one this gateway's earlier
    /// versions created (the file was changed by hand, or by another program).
    #[error(
        "the store {path}: its schema was not written by this gateway: {what}; nothing was changed"
    )]
    ForeignSchema { path: String, what: &'static str },
    #[error("stored delivery {id} is unreadable: {what}")]
    Corrupt { id: String, what: &'static str },
    /// `--max-pending` deliveries are live: nothing was stored.
    #[error("the delivery queue is full ({limit} deliveries pending); nothing was stored")]
    QueueFull { limit: u64 },
    /// Another `gateway serve` holds the SQLite store (see [`lock_sqlite`]).
    #[error(
        "the SQLite store {path} is in use by another `gateway serve` (lock file {lock}); \
         one store file belongs to one serve process: stop the other one, or use a \
         postgres:// store to run several instances"
    )]
    InUse { path: String, lock: String },
    #[error("cannot lock the SQLite store {path} (lock file {lock}): {source}")]
    Lock {
        path: String,
        lock: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the store is closed")]
    Closed,
    /// The SQLite writer's thread could not be started (the process is out of threads).
    #[error("cannot start the SQLite store's writer thread: {0}")]
    WriterThread(#[source] std::io::Error),
    #[error("store {op}: {source}")]
    Db {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// A failure of the SQLite writer (rusqlite, see `store::sqlite`).
    #[error("store {op}: {source}")]
    Sqlite {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
}

impl StoreError {
    pub(crate) fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| StoreError::Db { op, source }
    }

    pub(crate) fn sqlite(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        move |source| StoreError::Sqlite { op, source }
    }

    /// A database failure (not a business refusal): the operation wrote
    /// nothing that stands.
    pub(crate) fn is_db(&self) -> bool {
        matches!(self, StoreError::Db { .. } | StoreError::Sqlite { .. })
    }

    /// Whether trying the same operation later may succeed (the database
    /// is unreachable, busy or restarting): the HTTP layer answers 503.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Closed => true,
            // SQLite: another process holds the file's lock (SQLITE_BUSY, SQLITE_LOCKED)
            StoreError::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            StoreError::Db { source, .. } => match source {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(e) => {
                    // SQLite: SQLITE_BUSY (5), SQLITE_LOCKED (6) and their extended codes.
                    // PostgreSQL: serialization failure, deadlock, admin shutdown, cannot connect now.
                    let code = e.code();
                    let code = code.as_deref().unwrap_or("");
                    matches!(code, "40001" | "40P01" | "57P01" | "57P03")
                        || code.parse::<i64>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
                }
                _ => false,
            },
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Durable storage of deliveries, their tries and inbound idempotency
/// records. Implemented by [`SqliteStore`](super::sqlite::SqliteStore) and
/// [`PgStore`](super::postgres::PgStore); held as `Arc<dyn Store>`.
pub trait Store: Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`, for logs and the status page.
    fn backend(&self) -> &'static str;

    /// Stores a new delivery, `pending` and due at `now`; resolves only
    /// after the commit is durable. With `dedupe_window` and an
    /// idempotency key, a fresh (bot, route, key) is answered as a duplicate
    /// in the same transaction (see the module docs). Refused with
    /// [`StoreError::QueueFull`] when the store was opened with
    /// [`StoreOptions::max_pending`] and that many deliveries are live.
    fn accept(
        &self,
        delivery: NewDelivery,
        dedupe_window: Option<Duration>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Accept>>;

    /// Stores several deliveries in one transaction, all or nothing (a route's
    /// own request and its `also` targets, SPEC §9), each as [`Store::accept`]
    /// would: deduped on its own (bot, route, key), so one may be a
    /// [`Accept::Duplicate`] while another is new. The answers are in order.
    /// When one is refused ([`StoreError::QueueFull`]), none is stored.
    fn accept_all(
        &self,
        deliveries: Vec<NewDelivery>,
        dedupe_window: Option<Duration>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Vec<Accept>>>;

    /// Leases up to `limit` deliveries due at `now` (pending and due, or
    /// leased with an expired lease) to `owner` until `now + lease`, oldest
    /// due first. Never hands one delivery to two claims with live leases.
    fn claim_due<'a>(
        &'a self,
        owner: &'a str,
        now: SystemTime,
        limit: u32,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Vec<Claimed>>>;

    /// Writes the outcome for a claimed delivery and ends the lease. Refused
    /// with [`StoreError::LeaseLost`] unless `lease` is still the current
    /// claim, or [`StoreError::NotFound`].
    fn settle<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: Settle,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<()>>;

    /// Replaces a claimed delivery's stored request and route fingerprint with
    /// ones rendered again from its payload (after a replay), and clears
    /// [`Delivery::render_again`]. Refused with [`StoreError::LeaseLost`]
    /// unless `lease` is still the current claim, or [`StoreError::NotFound`].
    fn set_request<'a>(
        &'a self,
        lease: &'a Lease,
        request: StoredRequest,
        fingerprint: String,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<()>>;

    /// Graceful shutdown: every delivery leased by `owner` goes back to
    /// `pending` at its `next_attempt_at`, attempts unchanged. Returns how many.
    fn release_owner<'a>(&'a self, owner: &'a str, now: SystemTime) -> BoxFuture<'a, Result<u64>>;

    /// Deliveries, newest first; all states or one.
    fn list(&self, state: Option<State>, limit: u32)
    -> BoxFuture<'_, Result<Vec<DeliverySummary>>>;

    /// One delivery with its tries.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<DeliveryDetail>>>;

    /// A dead or delivered delivery back to `pending`, due `now`, attempts
    /// reset to 0 (earlier tries stay in its history), marked
    /// [`render_again`](Delivery::render_again): its next try renders the
    /// request again from its payload against the route as it is then.
    fn replay<'a>(&'a self, id: &'a str, now: SystemTime) -> BoxFuture<'a, Result<()>>;

    /// Every dead delivery back to `pending` (as [`Store::replay`]). Returns how many.
    fn replay_dead(&self, now: SystemTime) -> BoxFuture<'_, Result<u64>>;

    fn stats(&self, now: SystemTime) -> BoxFuture<'_, Result<Stats>>;

    /// Sync-route idempotency (SPEC §5 step 7): registers `key` as in
    /// progress for `lease` under a new [`Hold`], unless it is already
    /// answered or in progress within `window` (from the first request). A
    /// stale in-progress marker (its lease expired: the request crashed or
    /// stalled) is taken over as `New` with a new hold.
    fn begin<'a>(
        &'a self,
        key: &'a ScopedKey,
        window: Duration,
        lease: Duration,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Begin>>;

    /// Records the answer of `hold`'s request. `false`, writing nothing, unless
    /// the key is still in progress under this very hold (it was taken over
    /// after the hold expired, or finished, or freed): the record stays.
    fn finish<'a>(
        &'a self,
        hold: &'a Hold,
        answer: StoredAnswer,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool>>;

    /// Frees the key of `hold`'s request, whose answer should not be repeated
    /// (e.g. a 503 while the route was open). `false`, freeing nothing, unless
    /// the key is in progress under this very hold.
    fn abandon<'a>(&'a self, hold: &'a Hold) -> BoxFuture<'a, Result<bool>>;

    /// Housekeeping: deletes up to `limit` delivered deliveries last updated
    /// before `before` (with their tries), and up to `limit` idempotency
    /// records created before it. Pass at most `now - dedupe window`, or
    /// duplicates of purged deliveries would be accepted again. Returns how
    /// many rows went.
    fn purge(&self, before: SystemTime, limit: u32) -> BoxFuture<'_, Result<u64>>;

    /// Housekeeping (`--dead-retention`): deletes up to `limit` dead letters
    /// that died (were last updated) before `before`, with their tries.
    /// Returns how many went.
    fn purge_dead(&self, before: SystemTime, limit: u32) -> BoxFuture<'_, Result<u64>>;

    /// Finishes queued writes and closes connections. Operations after it
    /// fail with [`StoreError::Closed`] (SQLite) or a pool error.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Named shorthands over [`Store::settle`].
pub trait StoreExt: Store {
    /// Delivered.
    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        attempt: AttemptRecord,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<()>> {
        self.settle(lease, Settle::Delivered(attempt), now)
    }

    /// Failed, try again at `next_at`.
    fn retry_at<'a>(
        &'a self,
        lease: &'a Lease,
        attempt: AttemptRecord,
        next_at: SystemTime,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<()>> {
        self.settle(lease, Settle::RetryAt { attempt, next_at }, now)
    }

    /// Not tried (route open or paused): wait until `until`, no try used.
    fn postpone<'a>(
        &'a self,
        lease: &'a Lease,
        until: SystemTime,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<()>> {
        self.settle(lease, Settle::Postpone { until }, now)
    }

    /// Dead letter after a final try.
    fn bury<'a>(
        &'a self,
        lease: &'a Lease,
        attempt: AttemptRecord,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<()>> {
        self.settle(
            lease,
            Settle::Dead {
                attempt: Some(attempt),
                reason: None,
            },
            now,
        )
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// Opens (creating when needed) the store named by `url` and brings its
/// schema up to date:
/// - `sqlite://relative/path.db`: relative to the working directory, parent
///   directories created; `sqlite:///abs/path.db` for an absolute path.
/// - `postgres://…` or `postgresql://…`: libpq-style URL (sqlx's parameters).
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    open_with(url, StoreOptions::default()).await
}

/// [`open`] with [`StoreOptions`].
pub async fn open_with(url: &str, opts: StoreOptions) -> Result<Arc<dyn Store>> {
    if let Some(rest) = url.strip_prefix("sqlite://") {
        let path = sqlite_path(rest)?;
        let sqlite = super::sqlite::SqliteOptions {
            max_pending: opts.max_pending,
            ..Default::default()
        };
        let store = super::sqlite::SqliteStore::open(path, sqlite).await?;
        Ok(Arc::new(store))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pg = super::postgres::PgOptions {
            max_pending: opts.max_pending,
            ..Default::default()
        };
        let store = super::postgres::PgStore::open(url, pg).await?;
        // no caller may cancel a PostgreSQL operation half-way (see `detached`)
        Ok(Arc::new(super::detached::Detached(Arc::new(store))))
    } else {
        Err(StoreError::Url(
            "must start with sqlite:// (e.g. sqlite://data/gateway.db) or postgres://",
        ))
    }
}

/// The database file a `sqlite://` URL names, or `None` for other URLs and
/// unusable ones (for tools that must not create a store by opening it).
pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    sqlite_path(url.strip_prefix("sqlite://")?).ok()
}

/// An exclusive lock on a SQLite store for the life of one `gateway serve`
/// (SPEC §7.3: one store file belongs to one serve process). Released when
/// dropped, or by the kernel when the process ends, however it ends.
#[derive(Debug)]
pub struct StoreLock {
    _file: std::fs::File,
    path: std::path::PathBuf,
}

impl StoreLock {
    /// The lock file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// For a `sqlite://` URL, takes the exclusive lock of its database file: a
/// `flock` on `<database>.lock` beside it (created when missing, with the
/// parent directories; never deleted, so two processes always lock the same
/// inode). [`StoreError::InUse`] when another process (or another
/// [`StoreLock`] of this one) holds it. `Ok(None)` for other URLs: PostgreSQL
/// is shared by design. The `gateway deliveries` commands do not lock: they
/// may read and replay beside a running `serve`.
pub fn lock_sqlite(url: &str) -> Result<Option<StoreLock>> {
    let Some(rest) = url.strip_prefix("sqlite://") else {
        return Ok(None);
    };
    let db = sqlite_path(rest)?;
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let lock = db.with_file_name(name);
    let err = |source| StoreError::Lock {
        path: db.display().to_string(),
        lock: lock.display().to_string(),
        source,
    };
    if let Some(parent) = lock.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
            path: parent.display().to_string(),
            source,
        })?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(err)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(StoreLock {
            _file: file,
            path: lock,
        })),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse {
            path: db.display().to_string(),
            lock: lock.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(err(e)),
    }
}

/// The file of a `sqlite://` URL (what follows the scheme).
fn sqlite_path(rest: &str) -> Result<std::path::PathBuf> {
    if rest.is_empty() || rest == "/" {
        return Err(StoreError::Url("sqlite:// needs a file path"));
    }
    if rest.contains(['?', '#']) {
        return Err(StoreError::Url(
            "sqlite:// takes a plain file path, without `?` or `#` parameters",
        ));
    }
    if rest.starts_with(':') {
        return Err(StoreError::Url(
            "an in-memory SQLite store would lose accepted deliveries; name a file",
        ));
    }
    Ok(std::path::PathBuf::from(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls() {
        assert_eq!(
            sqlite_path("data/gateway.db").unwrap(),
            std::path::PathBuf::from("data/gateway.db")
        );
        assert_eq!(
            sqlite_path("/abs/path.db").unwrap(),
            std::path::PathBuf::from("/abs/path.db")
        );
        for bad in ["", "/", ":memory:", "a.db?mode=rwc", "a.db#x"] {
            assert!(sqlite_path(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn open_refuses_other_schemes_without_echoing_the_url() {
        let e = open("mysql://user:hunter2@db/x").await.err().unwrap();
        assert!(matches!(e, StoreError::Url(_)));
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn a_sqlite_store_is_locked_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("sub/gateway.db").display());
        let held = lock_sqlite(&url).unwrap().expect("a sqlite URL is locked");
        assert_eq!(held.path(), dir.path().join("sub/gateway.db.lock"));
        let e = lock_sqlite(&url).unwrap_err();
        assert!(matches!(e, StoreError::InUse { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("gateway.db") && text.contains("in use"),
            "{text}"
        );
        drop(held);
        assert!(
            lock_sqlite(&url).unwrap().is_some(),
            "free again once dropped"
        );
        assert!(lock_sqlite("postgres://h/db").unwrap().is_none());
    }

    #[test]
    fn debug_output_hides_payload_values() {
        let d = NewDelivery {
            bot: "b".into(),
            route: "r".into(),
            payload: r#"{"email":"jane@example.com"}"#.into(),
            request: StoredRequest {
                method: "POST".into(),
                url: "https://crm.example.com/contacts/C-1001".into(),
                headers: vec![("x-source".into(), "cognigy-secretish".into())],
                body: Some(r#"{"email":"jane@example.com"}"#.into()),
            },
            idempotency_key: Some("k-123".into()),
            fingerprint: None,
        };
        let text = format!("{d:?}");
        for value in ["jane@", "C-1001", "cognigy-secretish", "k-123"] {
            assert!(!text.contains(value), "{text}");
        }
        assert!(text.contains("x-source"), "{text}");
    }
}
