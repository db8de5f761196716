//! The shared store: PostgreSQL (`--store postgres://…`), for several
//! gateway instances working off one queue.
//!
//! Each operation is one transaction on a pooled connection, except
//! accepts and settles: they are grouped (`group_loop`: whatever queued
//! while the last group committed, up to 256) into one transaction with one
//! multi-row statement over `UNNEST(…)` arrays, so a burst of webhooks, or of
//! deliveries ending, costs a few round trips, one commit and one run of the
//! live-count trigger instead of a transaction each. Four groups of each kind
//! run at once, so one waiting for its commit never stops the next from
//! gathering.
//!
//! Claims run on a connection of their own (a [`Lane`]: no pool pings) that
//! plans each claim with its parameters ([`planned_each_run`]). They take
//! due rows with `SELECT … FOR UPDATE SKIP LOCKED` and mark them leased in
//! the same statement: two instances claiming at once get
//! disjoint rows, and a row whose lease expired (its instance died) is due
//! again. Inbound dedupe rests on the unique index over (bot, route, dedupe_key):
//! of two transactions inserting the same fresh key, the second waits for
//! the first and then finds the conflict (`ON CONFLICT DO NOTHING`), so two
//! instances never both accept one key. Keys older than the window are
//! expired (set to NULL) in the accepting transaction itself.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use super::api::{
    Accept, AttemptRecord, Begin, BoxFuture, Claimed, DeliveryDetail, DeliverySummary, Hold, Lease,
    NewDelivery, Result, ScopedKey, Settle, State, Stats, Store, StoreError, StoredAnswer,
    StoredRequest,
};
use super::rows::{
    STATS_SQL, SettlePlan, attempt_from_row, begin_from_row, claimed_from_row, cutoff_ms,
    delivery_columns, delivery_from_row, dur_ms, headers_json, lease_refusal, legacy_still_answers,
    new_id, not_replayable, stats_from_row, summary_columns, summary_from_row, to_ms,
};

/// The schema, one migration per version (version = index + 1); see the
/// SQLite twin for the meaning of each column. Times are milliseconds since
/// the Unix epoch (BIGINT), like in SQLite, so both backends share row code.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deliveries (
    id              TEXT PRIMARY KEY,
    bot             TEXT NOT NULL,
    route           TEXT NOT NULL,
    payload         TEXT NOT NULL,
    method          TEXT NOT NULL,
    url             TEXT NOT NULL,
    headers         TEXT NOT NULL,
    body            TEXT,
    idempotency_key TEXT,
    dedupe_key      TEXT,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'leased', 'delivered', 'dead')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    due_at          BIGINT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    lease_owner     TEXT,
    leased_until    BIGINT,
    lease_seq       BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT
);
CREATE UNIQUE INDEX deliveries_dedupe ON deliveries (bot, dedupe_key);
CREATE INDEX deliveries_due ON deliveries (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX deliveries_state ON deliveries (state, created_at);

CREATE TABLE attempts (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id TEXT NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    number      BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    status      BIGINT,
    latency_ms  BIGINT NOT NULL,
    error       TEXT
);
CREATE INDEX attempts_delivery ON attempts (delivery_id, id);

CREATE TABLE idempotency (
    bot          TEXT NOT NULL,
    key          TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('in_progress', 'done')),
    status       BIGINT,
    body         BYTEA,
    created_at   BIGINT NOT NULL,
    locked_until BIGINT,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (bot, key)
);
CREATE INDEX idempotency_created ON idempotency (created_at);
"#,
    r#"
-- v2 (SPEC §7.3): inbound dedupe per (bot, route, key); a token per sync hold;
-- the count of live (pending or leased) deliveries behind --max-pending.
DROP INDEX deliveries_dedupe;
CREATE UNIQUE INDEX deliveries_dedupe ON deliveries (bot, route, dedupe_key);

-- '' on records of schema 1: they answer for any route of their bot.
ALTER TABLE idempotency ADD COLUMN route TEXT NOT NULL DEFAULT '';
ALTER TABLE idempotency ALTER COLUMN route DROP DEFAULT;
ALTER TABLE idempotency ADD COLUMN holder TEXT;
ALTER TABLE idempotency DROP CONSTRAINT idempotency_pkey;
ALTER TABLE idempotency ADD PRIMARY KEY (bot, route, key);

-- Sharded by backend, so concurrent transactions rarely update the same row.
CREATE TABLE live_count (shard INT PRIMARY KEY, live BIGINT NOT NULL);
INSERT INTO live_count (shard, live) SELECT g, 0 FROM generate_series(0, 15) AS g;
UPDATE live_count
    SET live = (SELECT COUNT(*) FROM deliveries WHERE state IN ('pending', 'leased'))
    WHERE shard = 0;
CREATE FUNCTION deliveries_count_live() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta BIGINT := 0;
    n BIGINT;
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT COUNT(*) INTO n FROM new_rows WHERE state IN ('pending', 'leased');
        delta := delta + n;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT COUNT(*) INTO n FROM old_rows WHERE state IN ('pending', 'leased');
        delta := delta - n;
    END IF;
    IF delta <> 0 THEN
        UPDATE live_count SET live = live + delta WHERE shard = pg_backend_pid() % 16;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER deliveries_live_insert AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION deliveries_count_live();
CREATE TRIGGER deliveries_live_update AFTER UPDATE ON deliveries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION deliveries_count_live();
CREATE TRIGGER deliveries_live_delete AFTER DELETE ON deliveries
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION deliveries_count_live();
"#,
    r#"
-- v3 (SPEC §7.3): a delivery is sent only to the origin, with the auth, of its
-- route at acceptance; a replay renders the request again from the payload.
ALTER TABLE deliveries ADD COLUMN route_fingerprint TEXT;   -- NULL: accepted before v3
ALTER TABLE deliveries ADD COLUMN render_again BIGINT NOT NULL DEFAULT 0;
"#,
    r#"
-- v4: a transaction adds its delta to a shard row that no other transaction
-- holds. The shard was `pg_backend_pid() % 16` alone: with 16 pooled
-- connections and the claims' lane, two backends always shared a row, and one
-- waited for the other's commit (fsync included) on every accept, claim and
-- settle it made while the other was in flight: `bench/load.sh` f measured up
-- to 300 ms in this trigger's UPDATE. The backend's own row is still the
-- first choice; when another transaction holds it, any free row does; only
-- when all 64 are held does it wait for its own. Any row will do: the count
-- is their sum.
INSERT INTO live_count (shard, live) SELECT g, 0 FROM generate_series(16, 63) AS g;
CREATE OR REPLACE FUNCTION deliveries_count_live() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta BIGINT := 0;
    n BIGINT;
    s INT;
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT COUNT(*) INTO n FROM new_rows WHERE state IN ('pending', 'leased');
        delta := delta + n;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT COUNT(*) INTO n FROM old_rows WHERE state IN ('pending', 'leased');
        delta := delta - n;
    END IF;
    IF delta <> 0 THEN
        SELECT shard INTO s FROM live_count WHERE shard = pg_backend_pid() % 64
            FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            -- the rows after its own first, so that backends spread out
            SELECT shard INTO s FROM live_count
                ORDER BY (shard - pg_backend_pid() % 64 + 64) % 64
                LIMIT 1 FOR UPDATE SKIP LOCKED;
        END IF;
        IF NOT FOUND THEN
            s := pg_backend_pid() % 64;
        END IF;
        UPDATE live_count SET live = live + delta WHERE shard = s;
    END IF;
    RETURN NULL;
END
$$;
"#,
];

/// The options of a connection whose statements are planned each time they
/// run, with their parameters: the claims' lane.
///
/// By default PostgreSQL switches a prepared statement to a generic plan
/// after five runs and keeps it until the table's statistics change. The
/// claim's generic plan, made while the queue table was empty (a new store,
/// before autovacuum first analyses it), scanned the whole table once it held
/// 50,000 rows: 20–45 ms a claim, and the worker of `bench/load.sh` f fell
/// behind by 25,000 deliveries. Planning the claim each time costs ~0.25 ms.
/// (Written `id IN (SELECT …)`, as before, the claim had the same fault on
/// pooled connections.)
pub fn planned_each_run(connect: PgConnectOptions) -> PgConnectOptions {
    connect.options([("plan_cache_mode", "force_custom_plan")])
}

/// The statements of every async webhook (accept, claim, settle). Each is
/// written so that a generic plan, made without the parameters' values,
/// reads no more than it must; the claim is also planned on each run
/// ([`planned_each_run`]). `tests/it/store.rs` checks
/// the plans on a table of 20,000 rows.
pub mod sql {
    use crate::store::rows::delivery_columns;

    /// A group of accepts: one row per element of the arrays; a key already
    /// taken inserts nothing (its id is not returned).
    pub const ACCEPT_GROUP: &str = "INSERT INTO deliveries (id, bot, route, payload, method, \
         url, headers, body, idempotency_key, dedupe_key, state, attempts, next_attempt_at, \
         due_at, created_at, updated_at, route_fingerprint) \
         SELECT id, bot, route, payload, method, url, headers, body, ikey, dkey, 'pending', 0, \
         now, now, now, now, fp \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::text[], $8::text[], $9::text[], $10::text[], $11::bigint[], $12::text[]) \
         AS t(id, bot, route, payload, method, url, headers, body, ikey, dkey, now, fp) \
         ON CONFLICT (bot, route, dedupe_key) DO NOTHING \
         RETURNING id";

    /// Up to `$4` due deliveries, leased to `$1` until `$2`. The ids are
    /// taken first (an `ARRAY(…)` subquery, run once) and the rows then
    /// found by primary key: written as `id IN (SELECT …)`, the generic plan
    /// was a hash join over a sequential scan of the whole table (39 ms per
    /// claim at 50,000 rows, against 2 ms).
    pub const CLAIM: &str = concat!(
        "UPDATE deliveries SET state = 'leased', lease_owner = $1, leased_until = $2, \
         due_at = $2, lease_seq = lease_seq + 1, updated_at = $3 \
         WHERE id = ANY(ARRAY(SELECT id FROM deliveries WHERE due_at <= $3 \
                              ORDER BY due_at, id LIMIT $4 FOR UPDATE SKIP LOCKED)) \
         RETURNING ",
        delivery_columns!()
    );

    /// A group of settles: each row still matched on its lease (id, owner,
    /// claim sequence); returns the number of each settled one's try.
    pub const SETTLE_GROUP: &str = "UPDATE deliveries AS d SET state = s.state, \
         attempts = d.attempts + s.inc, \
         next_attempt_at = COALESCE(s.next_at, d.next_attempt_at), due_at = s.due_at, \
         last_error = CASE WHEN s.set_error THEN s.err ELSE d.last_error END, \
         lease_owner = NULL, leased_until = NULL, updated_at = s.now \
         FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], \
         $6::bigint[], $7::bigint[], $8::bool[], $9::text[], $10::bigint[]) \
         AS s(id, owner, seq, state, inc, next_at, due_at, set_error, err, now) \
         WHERE d.id = s.id AND d.state = 'leased' AND d.lease_owner = s.owner \
         AND d.lease_seq = s.seq \
         RETURNING d.id, d.attempts";

    /// The tries of a settled group, numbered by [`SETTLE_GROUP`].
    pub const RECORD_TRIES: &str = "INSERT INTO attempts (delivery_id, number, at, status, \
         latency_ms, error) \
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], \
         $5::bigint[], $6::text[])";

    /// Every statement above (tests explain each).
    pub const ALL: &[&str] = &[ACCEPT_GROUP, CLAIM, SETTLE_GROUP, RECORD_TRIES];
}

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Serialises schema migrations of instances starting together
/// (`pg_advisory_xact_lock` key; "cgw-schema" in ASCII).
const MIGRATION_LOCK: i64 = 0x6367_772d_7363_6865;

/// `pg_advisory_xact_lock` key of the pending bound ("cgw-queu" in ASCII):
/// every bounded accept holds it shared; one near the bound holds it alone.
const QUEUE_LOCK: i64 = 0x6367_772d_7175_6575;

/// Tuning of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections in this instance's pool.
    pub max_connections: u32,
    /// How long an operation waits for a free connection before failing (transient).
    pub acquire_timeout: Duration,
    /// `--max-pending` (see [`StoreOptions`](super::StoreOptions)).
    pub max_pending: Option<u64>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            max_pending: None,
        }
    }
}

/// The PostgreSQL [`Store`].
///
/// The pending bound is exact across instances without serialising every
/// accept: each bounded accept holds [`QUEUE_LOCK`] *shared* while it reads
/// the live count and inserts. Transactions in flight at once are at most the
/// server's `max_connections` (`slack`), so while the count read is below
/// `limit - slack` the accepts under way cannot take it to `limit`. Closer to
/// the bound an accept takes the lock *exclusively*: it waits for the shared
/// holders to commit, and then counts and inserts alone.
pub struct PgStore {
    pool: PgPool,
    max_pending: Option<u64>,
    /// The server's `max_connections`: the most accepts that can be in flight at once.
    slack: i64,
    /// Accepts waiting for a group (see [`group_loop`] and [`accept_group`]).
    accepts: GroupSender<AcceptJob, Accept>,
    /// Settles waiting for a group ([`settle_group`]).
    settles: GroupSender<SettleJob, ()>,
    /// The claims' connection (one worker per instance claims, one claim at a time).
    claims: tokio::sync::Mutex<Lane>,
}

/// One accept, as its group stores it.
struct AcceptJob {
    delivery: NewDelivery,
    cutoff: Option<i64>,
    now: i64,
}

/// One settle, as its group writes it.
struct SettleJob {
    lease: Lease,
    outcome: Settle,
    now: i64,
}

/// A job waiting for its group, and where its answer goes.
struct Grouped<I, O> {
    input: I,
    reply: tokio::sync::oneshot::Sender<Result<O>>,
}

type GroupSender<I, O> = tokio::sync::mpsc::Sender<Grouped<I, O>>;

/// What runs one group: every job's answer, in order.
type GroupFn<I, O> =
    for<'a> fn(&'a PgPool, &'a [I], Option<Bound>) -> BoxFuture<'a, Vec<Result<O>>>;

/// A connection of its own for one hot loop (today: the claims), outside
/// the pool, so nothing pings it when it is lent or taken back (sqlx's pool
/// pings on both). It is opened when first needed and dropped after any
/// error, since it may then be broken or in a failed transaction; the next
/// operation opens a new one. A connection that died (a server restart)
/// costs the one operation that finds it dead, whose error the caller sees
/// as it would from the pool.
pub(crate) struct Lane {
    connect: PgConnectOptions,
    timeout: Duration,
    conn: Option<PgConnection>,
}

impl Lane {
    fn new(connect: PgConnectOptions, timeout: Duration) -> Self {
        Lane {
            connect,
            timeout,
            conn: None,
        }
    }

    /// The lane's connection, opened if it has none (within the acquire timeout).
    async fn conn(&mut self) -> Result<&mut PgConnection> {
        let err = || StoreError::db("connect to PostgreSQL");
        if self.conn.is_none() {
            let opened =
                tokio::time::timeout(self.timeout, PgConnection::connect_with(&self.connect))
                    .await
                    .map_err(|_| err()(sqlx::Error::PoolTimedOut))?
                    .map_err(err())?;
            self.conn = Some(opened);
        }
        Ok(self.conn.as_mut().expect("opened above"))
    }

    /// Passes `result` of an operation on the lane's connection through;
    /// after an error the connection is dropped.
    fn after<T>(&mut self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

/// Most jobs in one group (one transaction, one multi-row statement).
const GROUP_SIZE: usize = 256;

/// Groups of one kind running at once: while one commits, the next gathers.
const GROUP_LOOPS: usize = 4;

impl PgStore {
    /// Connects to `url` and brings the schema up to date (tables go in the
    /// connection's `search_path`, normally `public`).
    pub async fn open(url: &str, opts: PgOptions) -> Result<Self> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|_| StoreError::Url("not a valid postgres:// URL"))?;
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .acquire_timeout(opts.acquire_timeout)
            .connect_with(connect.clone())
            .await
            .map_err(StoreError::db("connect to PostgreSQL"))?;
        migrate(&pool).await?;
        let slack: String = sqlx::query_scalar("SHOW max_connections")
            .fetch_one(&pool)
            .await
            .map_err(StoreError::db("read max_connections"))?;
        let slack = slack.parse().unwrap_or(10_000);
        let bound = opts.max_pending.map(|limit| Bound { limit, slack });
        let claims = Lane::new(planned_each_run(connect), opts.acquire_timeout);
        Ok(PgStore {
            claims: tokio::sync::Mutex::new(claims),
            accepts: start_groups(&pool, bound, |p, j, b| Box::pin(accept_group(p, j, b))),
            settles: start_groups(&pool, bound, |p, j, _| Box::pin(settle_group(p, j))),
            pool,
            max_pending: opts.max_pending,
            slack,
        })
    }

    /// The connection pool (tests use it to look behind the API).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

async fn migrate(pool: &PgPool) -> Result<()> {
    let err = || StoreError::db("migrate the schema");
    let mut tx = pool.begin().await.map_err(err())?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(err())?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_version \
         (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *tx)
    .await
    .map_err(err())?;
    let found: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(err())?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(err())?;
        sqlx::query("INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)")
            .bind(i as i64 + 1)
            .bind(to_ms(SystemTime::now()))
            .execute(&mut *tx)
            .await
            .map_err(err())?;
    }
    tx.commit().await.map_err(err())
}

/// The pending bound of one accept: `limit`, and the `slack` below it under
/// which the shared lock suffices (see [`PgStore`]).
#[derive(Clone, Copy)]
struct Bound {
    limit: u64,
    slack: i64,
}

/// Starts [`GROUP_LOOPS`] loops that run jobs of one kind in groups (see
/// [`group_loop`]); the sender takes the jobs ([`submit`]).
fn start_groups<I: Send + Sync + 'static, O: Send + 'static>(
    pool: &PgPool,
    bound: Option<Bound>,
    run: GroupFn<I, O>,
) -> GroupSender<I, O> {
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..GROUP_LOOPS {
        tokio::spawn(group_loop(pool.clone(), rx.clone(), bound, run));
    }
    tx
}

/// Takes the jobs that queued while the previous group committed (up to
/// [`GROUP_SIZE`]) and runs them as one group: a few round trips and one
/// commit for all of them instead of a transaction each. Ends when the store
/// is dropped.
async fn group_loop<I, O>(
    pool: PgPool,
    rx: std::sync::Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Grouped<I, O>>>>,
    bound: Option<Bound>,
    run: GroupFn<I, O>,
) {
    let mut jobs = Vec::with_capacity(GROUP_SIZE);
    loop {
        let n = rx.lock().await.recv_many(&mut jobs, GROUP_SIZE).await;
        if n == 0 {
            return;
        }
        let (inputs, replies): (Vec<I>, Vec<_>) =
            jobs.drain(..).map(|j| (j.input, j.reply)).unzip();
        let results = run(&pool, &inputs, bound).await;
        for (reply, result) in replies.into_iter().zip(results) {
            // the caller may have gone; what was committed stands
            let _ = reply.send(result);
        }
    }
}

/// Hands `input` to its group and waits for the group's commit.
async fn submit<I, O>(groups: &GroupSender<I, O>, input: I) -> Result<O> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    groups
        .send(Grouped { input, reply })
        .await
        .map_err(|_| StoreError::Closed)?;
    answer.await.map_err(|_| StoreError::Closed)?
}

/// Runs one job alone, in its own transaction.
type OneFn<I, O> =
    for<'a> fn(&'a mut PgConnection, &'a I, Option<Bound>) -> BoxFuture<'a, Result<O>>;

/// Runs `one` for each job on a connection of its own (its own transaction).
async fn one_by_one<I, O>(
    pool: &PgPool,
    jobs: &[I],
    bound: Option<Bound>,
    one: OneFn<I, O>,
) -> Vec<Result<O>> {
    let mut out = Vec::with_capacity(jobs.len());
    for j in jobs {
        out.push(match pool.acquire().await {
            Ok(mut conn) => one(&mut conn, j, bound).await,
            Err(e) => Err(StoreError::db("get a connection")(e)),
        });
    }
    out
}

/// Stores a group of accepts: one `INSERT … SELECT FROM UNNEST(…) ON
/// CONFLICT DO NOTHING RETURNING id` for all of them in one transaction;
/// a delivery whose key conflicted (a duplicate, or a key past its window)
/// then goes the one-by-one way of [`accept`] in the same transaction. Near
/// the `--max-pending` bound, or when the group's transaction fails, each is
/// accepted alone, so the bound stays exact and a failure is its own.
async fn accept_group(
    pool: &PgPool,
    jobs: &[AcceptJob],
    bound: Option<Bound>,
) -> Vec<Result<Accept>> {
    if jobs.len() > 1
        && let Ok(Some(results)) = try_accept_group(pool, jobs, bound).await
    {
        return results;
    }
    one_by_one(pool, jobs, bound, |c, j, b| {
        Box::pin(accept(c, &j.delivery, j.cutoff, b, j.now))
    })
    .await
}

/// [`accept_group`]'s one transaction; `None` when near the bound.
async fn try_accept_group(
    pool: &PgPool,
    jobs: &[AcceptJob],
    bound: Option<Bound>,
) -> Result<Option<Vec<Result<Accept>>>> {
    let err = || StoreError::db("accept deliveries");
    let mut conn = pool
        .acquire()
        .await
        .map_err(StoreError::db("get a connection"))?;
    let mut tx = conn.begin().await.map_err(err())?;
    if let Some(Bound { limit, slack }) = bound {
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(QUEUE_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(err())?;
        let room = i64::try_from(limit).unwrap_or(i64::MAX);
        let n = i64::try_from(jobs.len()).unwrap_or(i64::MAX);
        if live_count(&mut tx)
            .await?
            .saturating_add(slack)
            .saturating_add(n)
            >= room
        {
            return Ok(None);
        }
    }
    let ids: Vec<String> = jobs.iter().map(|_| new_id()).collect();
    let col = |f: fn(&AcceptJob) -> &str| jobs.iter().map(f).collect::<Vec<&str>>();
    let opt = |f: fn(&AcceptJob) -> Option<&str>| jobs.iter().map(f).collect::<Vec<Option<&str>>>();
    let headers: Vec<String> = jobs
        .iter()
        .map(|j| headers_json(&j.delivery.request.headers))
        .collect();
    let nows: Vec<i64> = jobs.iter().map(|j| j.now).collect();
    let inserted: Vec<String> = sqlx::query_scalar(sql::ACCEPT_GROUP)
        .bind(&ids)
        .bind(col(|j| &j.delivery.bot))
        .bind(col(|j| &j.delivery.route))
        .bind(col(|j| &j.delivery.payload))
        .bind(col(|j| &j.delivery.request.method))
        .bind(col(|j| &j.delivery.request.url))
        .bind(&headers)
        .bind(opt(|j| j.delivery.request.body.as_deref()))
        .bind(opt(|j| j.delivery.idempotency_key.as_deref()))
        .bind(opt(|j| j.cutoff.and(j.delivery.idempotency_key.as_deref())))
        .bind(&nows)
        .bind(opt(|j| j.delivery.fingerprint.as_deref()))
        .fetch_all(&mut *tx)
        .await
        .map_err(err())?;
    let inserted: std::collections::HashSet<String> = inserted.into_iter().collect();
    let mut results = Vec::with_capacity(jobs.len());
    for (j, id) in jobs.iter().zip(ids) {
        if inserted.contains(&id) {
            results.push(Ok(Accept::Accepted { id }));
        } else {
            // its key was taken: a duplicate, or a holder past its window (in a savepoint)
            results.push(Ok(
                accept(&mut tx, &j.delivery, j.cutoff, None, j.now).await?
            ));
        }
    }
    tx.commit().await.map_err(err())?;
    Ok(Some(results))
}

/// Writes a group of settles: one `UPDATE … FROM UNNEST(…)` (each row still
/// matched on its lease: id, owner and claim sequence), one multi-row insert
/// of the tries, one commit. A settle whose lease no longer holds is refused
/// as it would be alone. A group that fails, or names one delivery twice, is
/// written one by one.
async fn settle_group(pool: &PgPool, jobs: &[SettleJob]) -> Vec<Result<()>> {
    let ids: std::collections::HashSet<&str> = jobs.iter().map(|j| j.lease.id.as_str()).collect();
    if jobs.len() > 1
        && ids.len() == jobs.len()
        && let Ok(results) = try_settle_group(pool, jobs).await
    {
        return results;
    }
    one_by_one(pool, jobs, None, |c, j, _| {
        Box::pin(settle(c, &j.lease, &j.outcome, j.now))
    })
    .await
}

/// [`settle_group`]'s one transaction.
async fn try_settle_group(pool: &PgPool, jobs: &[SettleJob]) -> Result<Vec<Result<()>>> {
    let err = || StoreError::db("settle deliveries");
    let plans: Vec<SettlePlan> = jobs.iter().map(|j| SettlePlan::of(&j.outcome)).collect();
    let mut conn = pool
        .acquire()
        .await
        .map_err(StoreError::db("get a connection"))?;
    let mut tx = conn.begin().await.map_err(err())?;
    let settled: Vec<(String, i64)> = sqlx::query_as(sql::SETTLE_GROUP)
        .bind(jobs.iter().map(|j| j.lease.id.as_str()).collect::<Vec<_>>())
        .bind(
            jobs.iter()
                .map(|j| j.lease.owner.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(jobs.iter().map(|j| j.lease.seq).collect::<Vec<_>>())
        .bind(plans.iter().map(|p| p.state.as_str()).collect::<Vec<_>>())
        .bind(plans.iter().map(|p| p.increment).collect::<Vec<_>>())
        .bind(plans.iter().map(|p| p.next_attempt_at).collect::<Vec<_>>())
        .bind(plans.iter().map(|p| p.due_at).collect::<Vec<_>>())
        .bind(
            plans
                .iter()
                .map(|p| p.last_error.is_some())
                .collect::<Vec<_>>(),
        )
        .bind(
            plans
                .iter()
                .map(|p| p.last_error.clone().flatten())
                .collect::<Vec<_>>(),
        )
        .bind(jobs.iter().map(|j| j.now).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await
        .map_err(err())?;
    let numbers: std::collections::HashMap<String, i64> = settled.into_iter().collect();
    // the tries of the settled ones
    let tried: Vec<(&str, i64, &AttemptRecord)> = jobs
        .iter()
        .zip(&plans)
        .filter_map(|(j, p)| Some((j.lease.id.as_str(), *numbers.get(&j.lease.id)?, p.attempt?)))
        .collect();
    if !tried.is_empty() {
        sqlx::query(sql::RECORD_TRIES)
            .bind(tried.iter().map(|t| t.0).collect::<Vec<_>>())
            .bind(tried.iter().map(|t| t.1).collect::<Vec<_>>())
            .bind(tried.iter().map(|t| to_ms(t.2.at)).collect::<Vec<_>>())
            .bind(
                tried
                    .iter()
                    .map(|t| t.2.status.map(i64::from))
                    .collect::<Vec<_>>(),
            )
            .bind(
                tried
                    .iter()
                    .map(|t| dur_ms(t.2.latency))
                    .collect::<Vec<_>>(),
            )
            .bind(
                tried
                    .iter()
                    .map(|t| t.2.error.as_deref())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("record tries"))?;
    }
    let mut results = Vec::with_capacity(jobs.len());
    for j in jobs {
        if numbers.contains_key(&j.lease.id) {
            results.push(Ok(()));
            continue;
        }
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM deliveries WHERE id = $1")
            .bind(&j.lease.id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err())?;
        results.push(Err(lease_refusal(&j.lease, exists.is_some())));
    }
    tx.commit().await.map_err(err())?;
    Ok(results)
}

async fn live_count(tx: &mut PgConnection) -> Result<i64> {
    sqlx::query_scalar("SELECT COALESCE(SUM(live), 0)::BIGINT FROM live_count")
        .fetch_one(tx)
        .await
        .map_err(StoreError::db("count pending deliveries"))
}

async fn accept(
    conn: &mut PgConnection,
    d: &NewDelivery,
    cutoff: Option<i64>,
    bound: Option<Bound>,
    now: i64,
) -> Result<Accept> {
    let err = || StoreError::db("accept a delivery");
    let dedupe_key = cutoff.and(d.idempotency_key.as_deref());
    let id = new_id();
    let headers = headers_json(&d.request.headers);
    let mut tx = conn.begin().await.map_err(err())?;
    if let Some(Bound { limit, slack }) = bound {
        let limit_i = i64::try_from(limit).unwrap_or(i64::MAX);
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(QUEUE_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(err())?;
        if live_count(&mut tx).await?.saturating_add(slack) >= limit_i {
            // Near the bound: count and insert alone.
            tx.rollback().await.map_err(err())?;
            tx = conn.begin().await.map_err(err())?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(QUEUE_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(err())?;
            if live_count(&mut tx).await? >= limit_i {
                // A duplicate stores nothing: it still gets the first answer.
                let first: Option<(String, i64)> = sqlx::query_as(
                    "SELECT id, created_at FROM deliveries \
                     WHERE bot = $1 AND route = $2 AND dedupe_key = $3",
                )
                .bind(&d.bot)
                .bind(&d.route)
                .bind(dedupe_key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(err())?;
                tx.commit().await.map_err(err())?;
                return match first {
                    Some((id, created_at)) if cutoff.is_some_and(|c| created_at > c) => {
                        Ok(Accept::Duplicate { id })
                    }
                    _ => Err(StoreError::QueueFull { limit }),
                };
            }
        }
    }
    // The common case (a fresh key, or no dedupe) is one INSERT. On a
    // conflict (after waiting for a concurrent inserter of the same key to
    // finish), an expired holder lets go of its key and we insert again. A
    // few rounds at most: each round either finishes or sees a key that
    // another transaction just took, which is then fresh.
    for _ in 0..4 {
        let r = sqlx::query(
            "INSERT INTO deliveries (id, bot, route, payload, method, url, headers, body, \
             idempotency_key, dedupe_key, state, attempts, next_attempt_at, due_at, created_at, \
             updated_at, route_fingerprint) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'pending', 0, $11, $11, $11, $11, $12) \
             ON CONFLICT (bot, route, dedupe_key) DO NOTHING",
        )
        .bind(&id)
        .bind(&d.bot)
        .bind(&d.route)
        .bind(&d.payload)
        .bind(&d.request.method)
        .bind(&d.request.url)
        .bind(&headers)
        .bind(&d.request.body)
        .bind(&d.idempotency_key)
        .bind(dedupe_key)
        .bind(now)
        .bind(&d.fingerprint)
        .execute(&mut *tx)
        .await
        .map_err(err())?;
        if r.rows_affected() == 1 {
            tx.commit().await.map_err(err())?;
            return Ok(Accept::Accepted { id });
        }
        // Read committed: this statement sees the committed row we conflicted with.
        let holder: Option<(String, i64)> = sqlx::query_as(
            "SELECT id, created_at FROM deliveries \
             WHERE bot = $1 AND route = $2 AND dedupe_key = $3",
        )
        .bind(&d.bot)
        .bind(&d.route)
        .bind(dedupe_key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err())?;
        match holder {
            Some((first, created_at)) if cutoff.is_some_and(|c| created_at > c) => {
                tx.commit().await.map_err(err())?;
                return Ok(Accept::Duplicate { id: first });
            }
            Some((first, _)) => {
                // Older than the window: forgotten. The row lock makes two
                // accepters take turns; the second then conflicts with the
                // first's new delivery and finds it fresh.
                sqlx::query(
                    "UPDATE deliveries SET dedupe_key = NULL \
                     WHERE id = $1 AND dedupe_key = $2 AND created_at <= $3",
                )
                .bind(&first)
                .bind(dedupe_key)
                .bind(cutoff)
                .execute(&mut *tx)
                .await
                .map_err(err())?;
            }
            // The holder let go between our insert and our look-up: insert again.
            None => {}
        }
    }
    Err(StoreError::Db {
        op: "accept a delivery",
        source: sqlx::Error::Protocol("dedupe key kept changing; try again".into()),
    })
}

async fn settle(conn: &mut PgConnection, lease: &Lease, outcome: &Settle, now: i64) -> Result<()> {
    let err = || StoreError::db("settle a delivery");
    let plan = SettlePlan::of(outcome);
    let mut tx = conn.begin().await.map_err(err())?;
    let attempts: Option<i64> = sqlx::query_scalar(
        "UPDATE deliveries SET state = $1, attempts = attempts + $2, \
         next_attempt_at = COALESCE($3, next_attempt_at), due_at = $4, \
         last_error = CASE WHEN $5 THEN $6 ELSE last_error END, \
         lease_owner = NULL, leased_until = NULL, updated_at = $7 \
         WHERE id = $8 AND state = 'leased' AND lease_owner = $9 AND lease_seq = $10 \
         RETURNING attempts",
    )
    .bind(plan.state.as_str())
    .bind(plan.increment)
    .bind(plan.next_attempt_at)
    .bind(plan.due_at)
    .bind(plan.last_error.is_some())
    .bind(plan.last_error.clone().flatten())
    .bind(now)
    .bind(&lease.id)
    .bind(&lease.owner)
    .bind(lease.seq)
    .fetch_optional(&mut *tx)
    .await
    .map_err(err())?;
    let Some(number) = attempts else {
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM deliveries WHERE id = $1")
            .bind(&lease.id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err())?;
        return Err(lease_refusal(lease, exists.is_some()));
    };
    if let Some(a) = plan.attempt {
        sqlx::query(
            "INSERT INTO attempts (delivery_id, number, at, status, latency_ms, error) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&lease.id)
        .bind(number)
        .bind(to_ms(a.at))
        .bind(a.status.map(i64::from))
        .bind(dur_ms(a.latency))
        .bind(&a.error)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("record a try"))?;
    }
    tx.commit().await.map_err(err())
}

async fn begin(
    conn: &mut PgConnection,
    hold: &Hold,
    cutoff: i64,
    until: i64,
    now: i64,
) -> Result<Begin> {
    let err = || StoreError::db("begin an idempotent request");
    let k = &hold.key;
    for _ in 0..3 {
        let mut tx = conn.begin().await.map_err(err())?;
        // Records past their window go: this route's, and a schema-1 record (route '').
        sqlx::query(
            "DELETE FROM idempotency WHERE bot = $1 AND route IN ($2, '') AND key = $3 \
             AND created_at <= $4",
        )
        .bind(&k.bot)
        .bind(&k.route)
        .bind(&k.key)
        .bind(cutoff)
        .execute(&mut *tx)
        .await
        .map_err(err())?;
        // A schema-1 record answers for every route of its bot, as when it was written.
        let legacy = sqlx::query(
            "SELECT state, status, body, locked_until FROM idempotency \
             WHERE bot = $1 AND route = '' AND key = $2 FOR UPDATE",
        )
        .bind(&k.bot)
        .bind(&k.key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err())?;
        if let Some(row) = legacy {
            if legacy_still_answers(&row, now)? {
                tx.commit().await.map_err(err())?;
                return begin_from_row(&row);
            }
            // Its request is gone (its lease ended): forget it.
            sqlx::query("DELETE FROM idempotency WHERE bot = $1 AND route = '' AND key = $2")
                .bind(&k.bot)
                .bind(&k.key)
                .execute(&mut *tx)
                .await
                .map_err(err())?;
        }
        let r = sqlx::query(
            "INSERT INTO idempotency \
             (bot, route, key, state, created_at, locked_until, updated_at, holder) \
             VALUES ($1, $2, $3, 'in_progress', $4, $5, $4, $6) \
             ON CONFLICT (bot, route, key) DO NOTHING",
        )
        .bind(&k.bot)
        .bind(&k.route)
        .bind(&k.key)
        .bind(now)
        .bind(until)
        .bind(&hold.token)
        .execute(&mut *tx)
        .await
        .map_err(err())?;
        let taken = r.rows_affected() == 1 || {
            // A stale in-progress marker (its request crashed or stalled) is
            // taken over under this hold; the row lock makes two takers take
            // turns, and the second finds it fresh.
            sqlx::query(
                "UPDATE idempotency SET locked_until = $4, updated_at = $5, holder = $6 \
                 WHERE bot = $1 AND route = $2 AND key = $3 AND state = 'in_progress' \
                 AND locked_until <= $5",
            )
            .bind(&k.bot)
            .bind(&k.route)
            .bind(&k.key)
            .bind(until)
            .bind(now)
            .bind(&hold.token)
            .execute(&mut *tx)
            .await
            .map_err(err())?
            .rows_affected()
                == 1
        };
        if taken {
            tx.commit().await.map_err(err())?;
            return Ok(Begin::New(hold.clone()));
        }
        let row = sqlx::query(
            "SELECT state, status, body FROM idempotency \
             WHERE bot = $1 AND route = $2 AND key = $3",
        )
        .bind(&k.bot)
        .bind(&k.route)
        .bind(&k.key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err())?;
        tx.commit().await.map_err(err())?;
        if let Some(row) = row {
            return begin_from_row(&row);
        }
        // The conflicting record was deleted (abandoned, or expired by
        // another) after our insert saw it: go round again.
    }
    Err(StoreError::Db {
        op: "begin an idempotent request",
        source: sqlx::Error::Protocol("idempotency record kept changing; try again".into()),
    })
}

impl PgStore {
    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        self.pool
            .acquire()
            .await
            .map_err(StoreError::db("get a connection"))
    }
}

impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn accept(
        &self,
        delivery: NewDelivery,
        dedupe_window: Option<Duration>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Accept>> {
        Box::pin(async move {
            let job = AcceptJob {
                delivery,
                cutoff: dedupe_window.map(|w| cutoff_ms(now, w)),
                now: to_ms(now),
            };
            submit(&self.accepts, job).await
        })
    }

    fn accept_all(
        &self,
        deliveries: Vec<NewDelivery>,
        dedupe_window: Option<Duration>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Vec<Accept>>> {
        Box::pin(async move {
            let err = || StoreError::db("accept deliveries");
            let mut conn = self.conn().await?;
            let cutoff = dedupe_window.map(|w| cutoff_ms(now, w));
            let bound = self.max_pending.map(|limit| Bound {
                limit,
                slack: self.slack,
            });
            // One transaction; each `accept` runs in a savepoint of it. A
            // refusal (the queue is full) drops it: nothing is stored.
            let mut tx = conn.begin().await.map_err(err())?;
            let mut accepted = Vec::with_capacity(deliveries.len());
            for d in &deliveries {
                accepted.push(accept(&mut tx, d, cutoff, bound, to_ms(now)).await?);
            }
            tx.commit().await.map_err(err())?;
            Ok(accepted)
        })
    }

    fn claim_due<'a>(
        &'a self,
        owner: &'a str,
        now: SystemTime,
        limit: u32,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Vec<Claimed>>> {
        Box::pin(async move {
            let now_ms = to_ms(now);
            let until = now_ms.saturating_add(dur_ms(lease));
            // On the claims' lane: one round trip, committed when it returns.
            let mut lane = self.claims.lock().await;
            let rows = match lane.conn().await {
                Ok(conn) => sqlx::query(sql::CLAIM)
                    .bind(owner)
                    .bind(until)
                    .bind(now_ms)
                    .bind(i64::from(limit))
                    .fetch_all(conn)
                    .await
                    .map_err(StoreError::db("claim deliveries")),
                Err(e) => Err(e),
            };
            let rows = lane.after(rows)?;
            drop(lane);
            let mut claimed = rows
                .iter()
                .map(claimed_from_row)
                .collect::<Result<Vec<_>>>()?;
            claimed.sort_by(|a, b| {
                (a.delivery.next_attempt_at, &a.delivery.id)
                    .cmp(&(b.delivery.next_attempt_at, &b.delivery.id))
            });
            Ok(claimed)
        })
    }

    fn settle<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: Settle,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let job = SettleJob {
                lease: lease.clone(),
                outcome,
                now: to_ms(now),
            };
            submit(&self.settles, job).await
        })
    }

    fn set_request<'a>(
        &'a self,
        lease: &'a Lease,
        request: StoredRequest,
        fingerprint: String,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let err = || StoreError::db("store a request rendered again");
            let r = sqlx::query(
                "UPDATE deliveries SET method = $1, url = $2, headers = $3, body = $4, \
                 route_fingerprint = $5, render_again = 0, updated_at = $6 \
                 WHERE id = $7 AND state = 'leased' AND lease_owner = $8 AND lease_seq = $9",
            )
            .bind(&request.method)
            .bind(&request.url)
            .bind(headers_json(&request.headers))
            .bind(&request.body)
            .bind(&fingerprint)
            .bind(to_ms(now))
            .bind(&lease.id)
            .bind(&lease.owner)
            .bind(lease.seq)
            .execute(&self.pool)
            .await
            .map_err(err())?;
            if r.rows_affected() == 1 {
                return Ok(());
            }
            let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM deliveries WHERE id = $1")
                .bind(&lease.id)
                .fetch_optional(&self.pool)
                .await
                .map_err(err())?;
            Err(lease_refusal(lease, exists.is_some()))
        })
    }

    fn release_owner<'a>(&'a self, owner: &'a str, now: SystemTime) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let r = sqlx::query(
                "UPDATE deliveries SET state = 'pending', due_at = next_attempt_at, \
                 lease_owner = NULL, leased_until = NULL, updated_at = $2 \
                 WHERE state = 'leased' AND lease_owner = $1",
            )
            .bind(owner)
            .bind(to_ms(now))
            .execute(&self.pool)
            .await
            .map_err(StoreError::db("release leases"))?;
            Ok(r.rows_affected())
        })
    }

    fn list(
        &self,
        state: Option<State>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<DeliverySummary>>> {
        Box::pin(async move {
            let q = match state {
                Some(s) => sqlx::query(concat!(
                    "SELECT ",
                    summary_columns!(),
                    " FROM deliveries WHERE state = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
                ))
                .bind(s.as_str()),
                None => sqlx::query(concat!(
                    "SELECT ",
                    summary_columns!(),
                    " FROM deliveries WHERE $1::text IS NULL \
                     ORDER BY created_at DESC, id DESC LIMIT $2"
                ))
                .bind(None::<String>),
            };
            let rows = q
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::db("list deliveries"))?;
            rows.iter().map(summary_from_row).collect()
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<DeliveryDetail>>> {
        Box::pin(async move {
            let err = || StoreError::db("read a delivery");
            let mut conn = self.conn().await?;
            // One snapshot for the delivery and its tries.
            let mut tx = conn
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(err())?;
            let Some(row) = sqlx::query(concat!(
                "SELECT ",
                delivery_columns!(),
                " FROM deliveries WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err())?
            else {
                return Ok(None);
            };
            let (delivery, _) = delivery_from_row(&row)?;
            let rows = sqlx::query(
                "SELECT number, at, status, latency_ms, error FROM attempts \
                 WHERE delivery_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&mut *tx)
            .await
            .map_err(err())?;
            tx.commit().await.map_err(err())?;
            let attempts = rows
                .iter()
                .map(|r| attempt_from_row(id, r))
                .collect::<Result<_>>()?;
            Ok(Some(DeliveryDetail { delivery, attempts }))
        })
    }

    fn replay<'a>(&'a self, id: &'a str, now: SystemTime) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let err = || StoreError::db("replay a delivery");
            let r = sqlx::query(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = $2, \
                 due_at = $2, last_error = NULL, lease_owner = NULL, leased_until = NULL, \
                 render_again = 1, updated_at = $2 WHERE id = $1 AND state IN ('dead', 'delivered')",
            )
            .bind(id)
            .bind(to_ms(now))
            .execute(&self.pool)
            .await
            .map_err(err())?;
            if r.rows_affected() == 1 {
                return Ok(());
            }
            let state: Option<String> =
                sqlx::query_scalar("SELECT state FROM deliveries WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(err())?;
            Err(not_replayable(id, state))
        })
    }

    fn replay_dead(&self, now: SystemTime) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let r = sqlx::query(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = $1, \
                 due_at = $1, last_error = NULL, render_again = 1, updated_at = $1 \
                 WHERE state = 'dead'",
            )
            .bind(to_ms(now))
            .execute(&self.pool)
            .await
            .map_err(StoreError::db("replay dead deliveries"))?;
            Ok(r.rows_affected())
        })
    }

    fn stats(&self, now: SystemTime) -> BoxFuture<'_, Result<Stats>> {
        Box::pin(async move {
            let row = sqlx::query(STATS_SQL)
                .fetch_one(&self.pool)
                .await
                .map_err(StoreError::db("read stats"))?;
            stats_from_row(&row, now)
        })
    }

    fn begin<'a>(
        &'a self,
        key: &'a ScopedKey,
        window: Duration,
        lease: Duration,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Begin>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let now_ms = to_ms(now);
            let until = now_ms.saturating_add(dur_ms(lease));
            let hold = Hold {
                key: key.clone(),
                token: new_id(),
            };
            begin(&mut conn, &hold, cutoff_ms(now, window), until, now_ms).await
        })
    }

    fn finish<'a>(
        &'a self,
        hold: &'a Hold,
        answer: StoredAnswer,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let k = &hold.key;
            let r = sqlx::query(
                "UPDATE idempotency SET state = 'done', status = $5, body = $6, \
                 locked_until = NULL, holder = NULL, updated_at = $7 \
                 WHERE bot = $1 AND route = $2 AND key = $3 AND state = 'in_progress' \
                 AND holder = $4",
            )
            .bind(&k.bot)
            .bind(&k.route)
            .bind(&k.key)
            .bind(&hold.token)
            .bind(i64::from(answer.status))
            .bind(&answer.body)
            .bind(to_ms(now))
            .execute(&self.pool)
            .await
            .map_err(StoreError::db("record an answer"))?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn abandon<'a>(&'a self, hold: &'a Hold) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let k = &hold.key;
            let r = sqlx::query(
                "DELETE FROM idempotency WHERE bot = $1 AND route = $2 AND key = $3 \
                 AND state = 'in_progress' AND holder = $4",
            )
            .bind(&k.bot)
            .bind(&k.route)
            .bind(&k.key)
            .bind(&hold.token)
            .execute(&self.pool)
            .await
            .map_err(StoreError::db("abandon a key"))?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn purge_dead(&self, before: SystemTime, limit: u32) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let r = sqlx::query(
                "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries \
                 WHERE state = 'dead' AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(to_ms(before))
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await
            .map_err(StoreError::db("purge dead letters"))?;
            Ok(r.rows_affected())
        })
    }

    fn purge(&self, before: SystemTime, limit: u32) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let err = || StoreError::db("purge");
            let mut conn = self.conn().await?;
            let mut tx = conn.begin().await.map_err(err())?;
            let d = sqlx::query(
                "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries \
                 WHERE state = 'delivered' AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(to_ms(before))
            .bind(i64::from(limit))
            .execute(&mut *tx)
            .await
            .map_err(err())?;
            let i = sqlx::query(
                "DELETE FROM idempotency WHERE (bot, key) IN (SELECT bot, key FROM idempotency \
                 WHERE created_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(to_ms(before))
            .bind(i64::from(limit))
            .execute(&mut *tx)
            .await
            .map_err(err())?;
            tx.commit().await.map_err(err())?;
            Ok(d.rows_affected() + i.rows_affected())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.pool.close().await })
    }
}
