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
//! # Inbound dedupe (SPEC §5 step 7)
//!
//! *Async routes*: [`Store::accept`] with a window checks (bot, idempotency
//! key) and inserts in one transaction. A key seen on a delivery accepted
//! less than `window` ago (strictly: `created_at > now - window`) is a
//! [`Accept::Duplicate`] carrying the first delivery's id, so the caller can
//! answer the first 202 again; an older one is forgotten and the new
//! delivery takes the key over. The window is measured from the first
//! delivery's acceptance, not extended by duplicates.
//!
//! *Sync routes*: [`Store::begin`] / [`Store::finish`] keep the first answer
//! (status and body) per (bot, key) for the window, with an in-progress
//! marker that expires after a lease, so a crashed request does not block
//! its key for the whole window. The two mechanisms are separate
//! namespaces: a route that changes mode within a window may handle one key
//! twice.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::render::OutboundRequest;

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
}

impl fmt::Debug for NewDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewDelivery")
            .field("bot", &self.bot)
            .field("route", &self.route)
            .field("payload", &format_args!("<{} bytes>", self.payload.len()))
            .field("request", &self.request)
            .field("idempotency_key", &self.idempotency_key.is_some())
            .finish()
    }
}

/// The answer of [`Store::accept`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accept {
    /// Committed: answer 202 with this id.
    Accepted { id: String },
    /// Same (bot, key) within the window: nothing was stored; `id` is the
    /// first delivery's, so the 202 is the first answer again.
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
    /// The last try's error (`status 503`, `timeout`, …) or why it was buried.
    pub last_error: Option<String>,
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

/// The answer of [`Store::begin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// First time within the window (or the previous holder's in-progress
    /// lease expired): go ahead, then [`Store::finish`] or [`Store::abandon`].
    New,
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
    #[error("stored delivery {id} is unreadable: {what}")]
    Corrupt { id: String, what: &'static str },
    #[error("the store is closed")]
    Closed,
    #[error("store {op}: {source}")]
    Db {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl StoreError {
    pub(crate) fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| StoreError::Db { op, source }
    }

    /// Whether trying the same operation later may succeed (the database
    /// is unreachable, busy or restarting): the HTTP layer answers 503.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Closed => true,
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
    /// idempotency key, a fresh (bot, key) is refused as a duplicate in the
    /// same transaction (see the module docs).
    fn accept(
        &self,
        delivery: NewDelivery,
        dedupe_window: Option<Duration>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Accept>>;

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

    /// Graceful shutdown: every delivery leased by `owner` goes back to
    /// `pending` at its `next_attempt_at`, attempts unchanged. Returns how many.
    fn release_owner<'a>(&'a self, owner: &'a str, now: SystemTime) -> BoxFuture<'a, Result<u64>>;

    /// Deliveries, newest first; all states or one.
    fn list(&self, state: Option<State>, limit: u32)
    -> BoxFuture<'_, Result<Vec<DeliverySummary>>>;

    /// One delivery with its tries.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<DeliveryDetail>>>;

    /// A dead or delivered delivery back to `pending`, due `now`, attempts
    /// reset to 0 (earlier tries stay in its history).
    fn replay<'a>(&'a self, id: &'a str, now: SystemTime) -> BoxFuture<'a, Result<()>>;

    /// Every dead delivery back to `pending` (as [`Store::replay`]). Returns how many.
    fn replay_dead(&self, now: SystemTime) -> BoxFuture<'_, Result<u64>>;

    fn stats(&self, now: SystemTime) -> BoxFuture<'_, Result<Stats>>;

    /// Sync-route idempotency (SPEC §5 step 7): registers (bot, key) as in
    /// progress for `lease`, unless it is already answered or in progress
    /// within `window` (from the first request). A stale in-progress marker
    /// (its lease expired: the request crashed) is taken over as `New`.
    fn begin<'a>(
        &'a self,
        bot: &'a str,
        key: &'a str,
        window: Duration,
        lease: Duration,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Begin>>;

    /// Records the answer for an in-progress (bot, key). `false` when there
    /// was none (already finished by a takeover, or expired): the first
    /// answer stays.
    fn finish<'a>(
        &'a self,
        bot: &'a str,
        key: &'a str,
        answer: StoredAnswer,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool>>;

    /// Forgets an in-progress (bot, key) whose answer should not be
    /// repeated (e.g. a 503 while the route was open). `false` when there was none.
    fn abandon<'a>(&'a self, bot: &'a str, key: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// Housekeeping: deletes up to `limit` delivered deliveries last updated
    /// before `before` (with their tries), and up to `limit` idempotency
    /// records created before it. Pass at most `now - dedupe window`, or
    /// duplicates of purged deliveries would be accepted again. Returns how
    /// many rows went.
    fn purge(&self, before: SystemTime, limit: u32) -> BoxFuture<'_, Result<u64>>;

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
    if let Some(rest) = url.strip_prefix("sqlite://") {
        let path = sqlite_path(rest)?;
        let store = super::sqlite::SqliteStore::open(path, Default::default()).await?;
        Ok(Arc::new(store))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = super::postgres::PgStore::open(url, Default::default()).await?;
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

// ---- helpers shared by the backends ----

/// Milliseconds since the Unix epoch (negative before it, saturating).
pub(crate) fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |m| -m),
    }
}

pub(crate) fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

pub(crate) fn dur_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `now - window` in stored milliseconds: keys created at or before it are expired.
pub(crate) fn cutoff_ms(now: SystemTime, window: Duration) -> i64 {
    to_ms(now).saturating_sub(dur_ms(window))
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The last-error text of a failed try: its error, else its status.
pub(crate) fn attempt_error(a: &AttemptRecord) -> Option<String> {
    a.error
        .clone()
        .or_else(|| a.status.map(|s| format!("status {s}")))
}

pub(crate) fn headers_json(headers: &[(String, String)]) -> String {
    serde_json::to_string(headers).expect("a list of string pairs serializes")
}

/// Columns of a full delivery row, in the order [`delivery_from_row`] reads them by name.
macro_rules! delivery_columns {
    () => {
        "id, bot, route, payload, method, url, headers, body, idempotency_key, state, attempts, \
         next_attempt_at, created_at, updated_at, lease_owner, leased_until, lease_seq, last_error"
    };
}
pub(crate) use delivery_columns;

/// Columns of [`DeliverySummary`].
macro_rules! summary_columns {
    () => {
        "id, bot, route, state, attempts, next_attempt_at, created_at, updated_at, last_error"
    };
}
pub(crate) use summary_columns;

fn get<'r, R, T>(row: &'r R, col: &'static str) -> Result<T>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    row.try_get(col).map_err(StoreError::db("read a row"))
}

fn state_of(id: &str, s: &str) -> Result<State> {
    State::parse(s).ok_or_else(|| StoreError::Corrupt {
        id: id.to_owned(),
        what: "unknown state",
    })
}

fn count_of(id: &str, n: i64) -> Result<u32> {
    u32::try_from(n).map_err(|_| StoreError::Corrupt {
        id: id.to_owned(),
        what: "attempts out of range",
    })
}

/// Reads a row selected with [`delivery_columns!`].
pub(crate) fn delivery_from_row<'r, R>(row: &'r R) -> Result<(Delivery, i64)>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: String = get(row, "id")?;
    let headers: String = get(row, "headers")?;
    let headers: Vec<(String, String)> =
        serde_json::from_str(&headers).map_err(|_| StoreError::Corrupt {
            id: id.clone(),
            what: "headers are not a JSON list of pairs",
        })?;
    let state: String = get(row, "state")?;
    let state = state_of(&id, &state)?;
    let attempts = count_of(&id, get(row, "attempts")?)?;
    let seq: i64 = get(row, "lease_seq")?;
    let d = Delivery {
        bot: get(row, "bot")?,
        route: get(row, "route")?,
        payload: get(row, "payload")?,
        request: StoredRequest {
            method: get(row, "method")?,
            url: get(row, "url")?,
            headers,
            body: get(row, "body")?,
        },
        idempotency_key: get(row, "idempotency_key")?,
        state,
        attempts,
        next_attempt_at: from_ms(get(row, "next_attempt_at")?),
        created_at: from_ms(get(row, "created_at")?),
        updated_at: from_ms(get(row, "updated_at")?),
        lease_owner: get(row, "lease_owner")?,
        leased_until: get::<_, Option<i64>>(row, "leased_until")?.map(from_ms),
        last_error: get(row, "last_error")?,
        id,
    };
    Ok((d, seq))
}

/// A claimed row (selected with [`delivery_columns!`]) with its lease.
pub(crate) fn claimed_from_row<'r, R>(row: &'r R) -> Result<Claimed>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let (delivery, seq) = delivery_from_row(row)?;
    let (Some(owner), Some(until)) = (delivery.lease_owner.clone(), delivery.leased_until) else {
        return Err(StoreError::Corrupt {
            id: delivery.id,
            what: "claimed without a lease",
        });
    };
    Ok(Claimed {
        lease: Lease {
            id: delivery.id.clone(),
            owner,
            seq,
            until,
        },
        delivery,
    })
}

/// Reads a row selected with [`summary_columns!`].
pub(crate) fn summary_from_row<'r, R>(row: &'r R) -> Result<DeliverySummary>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: String = get(row, "id")?;
    let state: String = get(row, "state")?;
    Ok(DeliverySummary {
        state: state_of(&id, &state)?,
        attempts: count_of(&id, get(row, "attempts")?)?,
        bot: get(row, "bot")?,
        route: get(row, "route")?,
        next_attempt_at: from_ms(get(row, "next_attempt_at")?),
        created_at: from_ms(get(row, "created_at")?),
        updated_at: from_ms(get(row, "updated_at")?),
        last_error: get(row, "last_error")?,
        id,
    })
}

/// Reads an `attempts` row (`number, at, status, latency_ms, error`).
pub(crate) fn attempt_from_row<'r, R>(id: &str, row: &'r R) -> Result<Attempt>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let status: Option<i64> = get(row, "status")?;
    Ok(Attempt {
        number: count_of(id, get(row, "number")?)?,
        at: from_ms(get(row, "at")?),
        status: status.and_then(|s| u16::try_from(s).ok()),
        latency: Duration::from_millis(get::<_, i64>(row, "latency_ms")?.max(0) as u64),
        error: get(row, "error")?,
    })
}

/// How a settle changes the row: (state, attempts increment, next_attempt_at,
/// due_at, last_error update, the try to record).
pub(crate) struct SettlePlan<'a> {
    pub state: State,
    pub increment: i64,
    /// `None`: keep the stored `next_attempt_at`.
    pub next_attempt_at: Option<i64>,
    pub due_at: Option<i64>,
    /// `Some(x)`: set last_error to x; `None`: keep it.
    pub last_error: Option<Option<String>>,
    pub attempt: Option<&'a AttemptRecord>,
}

impl<'a> SettlePlan<'a> {
    pub(crate) fn of(outcome: &'a Settle) -> Self {
        match outcome {
            Settle::Delivered(a) => SettlePlan {
                state: State::Delivered,
                increment: 1,
                next_attempt_at: None,
                due_at: None,
                last_error: Some(None),
                attempt: Some(a),
            },
            Settle::RetryAt { attempt, next_at } => SettlePlan {
                state: State::Pending,
                increment: 1,
                next_attempt_at: Some(to_ms(*next_at)),
                due_at: Some(to_ms(*next_at)),
                last_error: Some(attempt_error(attempt)),
                attempt: Some(attempt),
            },
            Settle::Dead { attempt, reason } => SettlePlan {
                state: State::Dead,
                increment: i64::from(attempt.is_some()),
                next_attempt_at: None,
                due_at: None,
                last_error: Some(
                    reason
                        .clone()
                        .or_else(|| attempt.as_ref().and_then(attempt_error)),
                ),
                attempt: attempt.as_ref(),
            },
            Settle::Postpone { until } => SettlePlan {
                state: State::Pending,
                increment: 0,
                next_attempt_at: Some(to_ms(*until)),
                due_at: Some(to_ms(*until)),
                last_error: None,
                attempt: None,
            },
        }
    }
}

pub(crate) fn not_replayable(id: &str, state: Option<String>) -> StoreError {
    match state.as_deref().and_then(State::parse) {
        Some(state) => StoreError::NotReplayable {
            id: id.to_owned(),
            state,
        },
        None => StoreError::NotFound { id: id.to_owned() },
    }
}

pub(crate) fn begin_from_row<'r, R>(row: &'r R) -> Result<Begin>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let err = StoreError::db("read an idempotency record");
    let state: String = row.try_get("state").map_err(err)?;
    if state != "done" {
        return Ok(Begin::InProgress);
    }
    let status: Option<i64> = row
        .try_get("status")
        .map_err(StoreError::db("read an idempotency record"))?;
    let body: Option<Vec<u8>> = row
        .try_get("body")
        .map_err(StoreError::db("read an idempotency record"))?;
    Ok(Begin::Done(StoredAnswer {
        status: status.and_then(|s| u16::try_from(s).ok()).unwrap_or(200),
        body: body.unwrap_or_default(),
    }))
}

pub(crate) const STATS_SQL: &str = "SELECT \
    (SELECT COUNT(*) FROM deliveries WHERE state = 'pending') AS pending, \
    (SELECT COUNT(*) FROM deliveries WHERE state = 'leased') AS leased, \
    (SELECT COUNT(*) FROM deliveries WHERE state = 'dead') AS dead, \
    (SELECT MIN(created_at) FROM deliveries WHERE state = 'pending') AS oldest_pending, \
    (SELECT MIN(created_at) FROM deliveries WHERE state = 'leased') AS oldest_leased";

pub(crate) fn stats_from_row<'r, R>(row: &'r R, now: SystemTime) -> Result<Stats>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let get = |c: &'static str| -> Result<i64> {
        row.try_get::<i64, _>(c)
            .map_err(StoreError::db("read stats"))
    };
    let opt = |c: &'static str| -> Result<Option<i64>> {
        row.try_get::<Option<i64>, _>(c)
            .map_err(StoreError::db("read stats"))
    };
    let oldest = match (opt("oldest_pending")?, opt("oldest_leased")?) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(Stats {
        pending: get("pending")?.max(0) as u64,
        leased: get("leased")?.max(0) as u64,
        dead: get("dead")?.max(0) as u64,
        oldest_pending_age: oldest.map(|ms| now.duration_since(from_ms(ms)).unwrap_or_default()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_trip_both_sides_of_the_epoch() {
        for ms in [0i64, 1, 1_700_000_000_123, -1, -86_400_000] {
            assert_eq!(to_ms(from_ms(ms)), ms);
        }
        assert_eq!(
            cutoff_ms(UNIX_EPOCH + Duration::from_secs(10), Duration::from_secs(4)),
            6000
        );
    }

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
        };
        let text = format!("{d:?}");
        for value in ["jane@", "C-1001", "cognigy-secretish", "k-123"] {
            assert!(!text.contains(value), "{text}");
        }
        assert!(text.contains("x-source"), "{text}");
    }
}
