//! The embedded store: one SQLite file (the default, `sqlite://data/gateway.db`).
//!
//! Durability: WAL journal with `synchronous=FULL`, so a commit is on disk
//! (the WAL fsynced) before [`Store::accept`] resolves and the 202 goes out.
//!
//! Group commit: every write — accepts, claims, settles, replays — goes to
//! one writer task over a channel. The task takes everything queued (up to
//! [`SqliteOptions::max_batch`]), runs it in one `BEGIN IMMEDIATE`
//! transaction, commits once and then answers every caller. While one batch
//! is being fsynced the next one queues up, so under load one fsync serves
//! many requests, and SQLite never sees two writers (no `SQLITE_BUSY`
//! between our own writes). Reads (`list`, `get`, `stats`) use a separate
//! pool of connections; WAL lets them run beside the writer.
//!
//! A failing statement rolls its whole batch back; the batch is then run
//! again one operation per transaction, so one bad operation cannot fail
//! its neighbours. That is safe because an operation that fails for a
//! business reason ([`StoreError::LeaseLost`], …) has written nothing.
//!
//! Every `LIMIT` is written `LIMIT ?n + 0`, never `LIMIT ?n`: SQLite's planner
//! reads a bare bound LIMIT and marks the statement to be prepared again
//! whenever that parameter is bound, so every claim re-parsed and re-planned
//! its statement (about 330k instructions, a fifth of the writer thread's work
//! under async load; callgrind). An expression is not read, so the cached
//! statement is reused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use tokio::sync::{mpsc, oneshot};

use super::api::{
    Accept, Begin, BoxFuture, Claimed, DeliveryDetail, DeliverySummary, Hold, Lease, NewDelivery,
    Result, ScopedKey, Settle, State, Stats, Store, StoreError, StoredAnswer, StoredRequest,
};
use super::rows::{
    STATS_SQL, SettlePlan, attempt_from_row, begin_from_row, claimed_from_row, cutoff_ms,
    delivery_columns, delivery_from_row, dur_ms, headers_json, lease_refusal, legacy_still_answers,
    new_id, not_replayable, stats_from_row, summary_columns, summary_from_row, to_ms,
};

/// The schema, one migration per version (version = index + 1). Applied in
/// one transaction at open; never edit a released entry, append a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deliveries (
    id              TEXT PRIMARY KEY NOT NULL,
    bot             TEXT NOT NULL,
    route           TEXT NOT NULL,
    payload         TEXT NOT NULL,
    method          TEXT NOT NULL,
    url             TEXT NOT NULL,
    headers         TEXT NOT NULL,      -- JSON [[name, value], ...], never secrets
    body            TEXT,
    idempotency_key TEXT,
    dedupe_key      TEXT,               -- the key while inside its dedupe window, else NULL
    state           TEXT NOT NULL CHECK (state IN ('pending', 'leased', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,   -- ms since the Unix epoch, like every time here
    due_at          INTEGER,            -- claimable from: next_attempt_at (pending),
                                        -- leased_until (leased), NULL (delivered, dead)
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    lease_owner     TEXT,
    leased_until    INTEGER,
    lease_seq       INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT
);
CREATE UNIQUE INDEX deliveries_dedupe ON deliveries (bot, dedupe_key);
CREATE INDEX deliveries_due ON deliveries (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX deliveries_state ON deliveries (state, created_at);

CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id TEXT NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    number      INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    status      INTEGER,
    latency_ms  INTEGER NOT NULL,
    error       TEXT
);
CREATE INDEX attempts_delivery ON attempts (delivery_id, id);

CREATE TABLE idempotency (
    bot          TEXT NOT NULL,
    key          TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('in_progress', 'done')),
    status       INTEGER,
    body         BLOB,
    created_at   INTEGER NOT NULL,
    locked_until INTEGER,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (bot, key)
);
CREATE INDEX idempotency_created ON idempotency (created_at);
"#,
    r#"
-- v2 (SPEC §7.3): inbound dedupe per (bot, route, key); a token per sync hold;
-- the count of live (pending or leased) deliveries behind --max-pending.
DROP INDEX deliveries_dedupe;
CREATE UNIQUE INDEX deliveries_dedupe ON deliveries (bot, route, dedupe_key);

CREATE TABLE idempotency_v2 (
    bot          TEXT NOT NULL,
    route        TEXT NOT NULL,     -- '' on records of schema 1: any route of the bot
    key          TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('in_progress', 'done')),
    status       INTEGER,
    body         BLOB,
    created_at   INTEGER NOT NULL,
    locked_until INTEGER,
    updated_at   INTEGER NOT NULL,
    holder       TEXT,              -- the token of the hold while in progress
    PRIMARY KEY (bot, route, key)
);
INSERT INTO idempotency_v2
    (bot, route, key, state, status, body, created_at, locked_until, updated_at)
    SELECT bot, '', key, state, status, body, created_at, locked_until, updated_at
    FROM idempotency;
DROP TABLE idempotency;
ALTER TABLE idempotency_v2 RENAME TO idempotency;
CREATE INDEX idempotency_created ON idempotency (created_at);

CREATE TABLE live_count (
    id   INTEGER PRIMARY KEY CHECK (id = 0),
    live INTEGER NOT NULL
);
INSERT INTO live_count (id, live)
    SELECT 0, COUNT(*) FROM deliveries WHERE state IN ('pending', 'leased');
CREATE TRIGGER deliveries_live_insert AFTER INSERT ON deliveries
    WHEN NEW.state IN ('pending', 'leased')
    BEGIN UPDATE live_count SET live = live + 1; END;
CREATE TRIGGER deliveries_live_delete AFTER DELETE ON deliveries
    WHEN OLD.state IN ('pending', 'leased')
    BEGIN UPDATE live_count SET live = live - 1; END;
CREATE TRIGGER deliveries_live_update AFTER UPDATE OF state ON deliveries
    WHEN (OLD.state IN ('pending', 'leased')) <> (NEW.state IN ('pending', 'leased'))
    BEGIN
        UPDATE live_count
        SET live = live + CASE WHEN NEW.state IN ('pending', 'leased') THEN 1 ELSE -1 END;
    END;
"#,
    r#"
-- v3 (SPEC §7.3): a delivery is sent only to the origin, with the auth, of its
-- route at acceptance; a replay renders the request again from the payload.
ALTER TABLE deliveries ADD COLUMN route_fingerprint TEXT;   -- NULL: accepted before v3
ALTER TABLE deliveries ADD COLUMN render_again INTEGER NOT NULL DEFAULT 0;
"#,
];

/// Tuning of the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Most operations committed together. `1` is one transaction per
    /// operation (no group commit; for comparison in the benchmark).
    pub max_batch: usize,
    /// Operations waiting for the writer; callers wait beyond it (backpressure).
    pub queue: usize,
    /// Connections for reads (`list`, `get`, `stats`).
    pub read_connections: u32,
    /// How long a connection waits for a lock held by another process.
    pub busy_timeout: Duration,
    /// `--max-pending` (see [`StoreOptions`](super::StoreOptions)).
    pub max_pending: Option<u64>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            max_batch: 256,
            queue: 4096,
            read_connections: 4,
            busy_timeout: Duration::from_secs(5),
            max_pending: None,
        }
    }
}

/// The SQLite [`Store`].
pub struct SqliteStore {
    writer: mpsc::Sender<Msg>,
    reader: SqlitePool,
    commits: Arc<AtomicU64>,
    path: PathBuf,
    max_pending: Option<u64>,
}

impl SqliteStore {
    /// Opens (creating it and its parent directories when missing) the file
    /// at `path`, relative to the working directory unless absolute, and
    /// brings its schema up to date. Starts the writer task on the current
    /// tokio runtime.
    pub async fn open(path: impl AsRef<Path>, opts: SqliteOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|source| StoreError::CreateDir {
                    path: parent.display().to_string(),
                    source,
                })?;
        }
        let connect = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(opts.busy_timeout)
            .foreign_keys(true);
        // The writer's page cache: 16 MiB instead of SQLite's 2 MiB default, so the
        // index pages that random idempotency keys touch stay in memory under load.
        // (Measured with bench/load.sh e: 3.9k -> 4.5k accepted/s, p99 of the 202
        // 68 -> 17 ms; peak RSS under async load 30 -> 45 MiB. A larger WAL
        // autocheckpoint did not help.)
        let writer = connect.clone().pragma("cache_size", "-16384");
        let mut conn = SqliteConnection::connect_with(&writer)
            .await
            .map_err(StoreError::db("open the SQLite file"))?;
        migrate(&mut conn).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(opts.read_connections.max(1))
            .connect_lazy_with(connect);
        let commits = Arc::new(AtomicU64::new(0));
        let (writer_tx, rx) = mpsc::channel(opts.queue.max(1));
        let writer_conn = Writer {
            conn: Some(conn),
            connect: writer,
        };
        tokio::spawn(write_loop(
            writer_conn,
            rx,
            opts.max_batch.max(1),
            commits.clone(),
        ));
        Ok(SqliteStore {
            writer: writer_tx,
            reader,
            commits,
            path,
            max_pending: opts.max_pending,
        })
    }

    /// Transactions committed by the writer so far (for tests and the benchmark).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write(&self, op: Op) -> Result<Reply> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Msg::Job(Job { op, reply }))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

async fn migrate(conn: &mut SqliteConnection) -> Result<()> {
    // A current schema needs no write lock: a `deliveries` command opening the
    // file beside a busy `serve` then never waits for the writer.
    let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
        .fetch_one(&mut *conn)
        .await
        .ok()
        .flatten();
    if current == Some(SCHEMA_VERSION) {
        return Ok(());
    }
    let err = StoreError::db("migrate the schema");
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(err)?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_version \
         (version INTEGER PRIMARY KEY NOT NULL, applied_at INTEGER NOT NULL)",
    )
    .execute(&mut *tx)
    .await
    .map_err(StoreError::db("migrate the schema"))?;
    let found: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::db("migrate the schema"))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        sqlx::raw_sql(*sql)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("migrate the schema"))?;
        sqlx::query("INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)")
            .bind(i as i64 + 1)
            .bind(to_ms(SystemTime::now()))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("migrate the schema"))?;
    }
    tx.commit()
        .await
        .map_err(StoreError::db("migrate the schema"))
}

// ---- the writer task ----

// Nearly every message is a `Job`: boxing it would add an allocation per write for nothing.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Job(Job),
    Close(oneshot::Sender<()>),
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Reply>>,
}

/// A write, with times already in stored milliseconds.
enum Op {
    Accept {
        delivery: NewDelivery,
        /// Dedupe cutoff (`now - window`), when deduping.
        cutoff: Option<i64>,
        max_pending: Option<u64>,
        now: i64,
    },
    /// Several deliveries, all or nothing (a route and its `also` targets).
    AcceptAll {
        deliveries: Vec<NewDelivery>,
        cutoff: Option<i64>,
        max_pending: Option<u64>,
        now: i64,
    },
    Claim {
        owner: String,
        now: i64,
        until: i64,
        limit: i64,
    },
    Settle {
        lease: Lease,
        outcome: Settle,
        now: i64,
    },
    SetRequest {
        lease: Lease,
        request: StoredRequest,
        fingerprint: String,
        now: i64,
    },
    Release {
        owner: String,
        now: i64,
    },
    Replay {
        id: String,
        now: i64,
    },
    ReplayDead {
        now: i64,
    },
    Begin {
        hold: Hold,
        cutoff: i64,
        until: i64,
        now: i64,
    },
    Finish {
        hold: Hold,
        answer: StoredAnswer,
        now: i64,
    },
    Abandon {
        hold: Hold,
    },
    Purge {
        before: i64,
        limit: i64,
    },
    PurgeDead {
        before: i64,
        limit: i64,
    },
}

enum Reply {
    Accept(Accept),
    AcceptAll(Vec<Accept>),
    Claimed(Vec<Claimed>),
    Unit,
    Count(u64),
    Begin(Begin),
    Bool(bool),
}

/// The writer's connection, opened again after a failed transaction.
///
/// When a write fails for an I/O reason (disk full, file read-only, a device
/// error), SQLite may roll the transaction back by itself, and sqlx's idea of
/// the connection's transaction depth is then wrong: every later `BEGIN` is
/// refused, and the store would stay unavailable until a restart. So after
/// any failed transaction the connection is closed, and the next write opens
/// a fresh one: once the file system takes writes again, the store works
/// again by itself (SPEC §7.3).
struct Writer {
    conn: Option<SqliteConnection>,
    connect: SqliteConnectOptions,
}

impl Writer {
    /// Runs `ops` in one transaction (see [`run_batch`]), on a fresh
    /// connection if the last transaction failed.
    async fn run(&mut self, ops: &[Op], commits: &AtomicU64) -> Result<Vec<Result<Reply>>> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self.conn.insert(
                SqliteConnection::connect_with(&self.connect)
                    .await
                    .map_err(StoreError::db("open the SQLite file again"))?,
            ),
        };
        let result = run_batch(conn, ops, commits).await;
        if result.is_err()
            && let Some(conn) = self.conn.take()
        {
            let _ = conn.close().await;
        }
        result
    }

    async fn close(self) {
        if let Some(conn) = self.conn {
            let _ = conn.close().await;
        }
    }
}

async fn write_loop(
    mut writer: Writer,
    mut rx: mpsc::Receiver<Msg>,
    max_batch: usize,
    commits: Arc<AtomicU64>,
) {
    let mut msgs = Vec::with_capacity(max_batch);
    let mut closing = None;
    while closing.is_none() && rx.recv_many(&mut msgs, max_batch).await > 0 {
        let mut ops = Vec::with_capacity(msgs.len());
        let mut replies = Vec::with_capacity(msgs.len());
        for m in msgs.drain(..) {
            match m {
                Msg::Job(j) => {
                    ops.push(j.op);
                    replies.push(j.reply);
                }
                Msg::Close(done) => closing = Some(done),
            }
        }
        if ops.is_empty() {
            continue;
        }
        let results = match writer.run(&ops, &commits).await {
            Ok(results) => results,
            // A statement failed and the batch rolled back: run each alone so
            // only the operation at fault fails.
            Err(_) if ops.len() > 1 => {
                let mut results = Vec::with_capacity(ops.len());
                for op in &ops {
                    results.push(match writer.run(std::slice::from_ref(op), &commits).await {
                        Ok(mut r) => r.pop().expect("one result per operation"),
                        Err(e) => Err(e),
                    });
                }
                results
            }
            Err(e) => vec![Err(e)],
        };
        for (reply, result) in replies.into_iter().zip(results) {
            // The caller may have gone (its request was cancelled); the write stands.
            let _ = reply.send(result);
        }
    }
    // Every sender dropped, or close(): queued jobs are dropped (their callers see Closed).
    rx.close();
    writer.close().await;
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// Runs `ops` in one transaction. `Err` when a statement failed (all rolled
/// back); otherwise one result per op, business refusals included.
async fn run_batch(
    conn: &mut SqliteConnection,
    ops: &[Op],
    commits: &AtomicU64,
) -> Result<Vec<Result<Reply>>> {
    let mut tx = conn
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(StoreError::db("begin a transaction"))?;
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        match run_op(&mut tx, op).await {
            Err(e @ StoreError::Db { .. }) => return Err(e), // dropping tx rolls back
            r => results.push(r),
        }
    }
    tx.commit().await.map_err(StoreError::db("commit"))?;
    commits.fetch_add(1, Ordering::Relaxed);
    Ok(results)
}

async fn run_op(conn: &mut SqliteConnection, op: &Op) -> Result<Reply> {
    match op {
        Op::Accept {
            delivery,
            cutoff,
            max_pending,
            now,
        } => accept(conn, delivery, *cutoff, *max_pending, *now)
            .await
            .map(Reply::Accept),
        Op::AcceptAll {
            deliveries,
            cutoff,
            max_pending,
            now,
        } => {
            // A savepoint: a refusal of one (the queue is full) takes back the
            // others, while the rest of the writer's batch stands.
            let mut sp = conn
                .begin()
                .await
                .map_err(StoreError::db("begin a savepoint"))?;
            let mut accepted = Vec::with_capacity(deliveries.len());
            for d in deliveries {
                match accept(&mut sp, d, *cutoff, *max_pending, *now).await {
                    Ok(a) => accepted.push(a),
                    Err(e) => {
                        sp.rollback()
                            .await
                            .map_err(StoreError::db("roll back a savepoint"))?;
                        return Err(e);
                    }
                }
            }
            sp.commit()
                .await
                .map_err(StoreError::db("release a savepoint"))?;
            Ok(Reply::AcceptAll(accepted))
        }
        Op::Claim {
            owner,
            now,
            until,
            limit,
        } => {
            let rows = sqlx::query(concat!(
                "UPDATE deliveries SET state = 'leased', lease_owner = ?1, leased_until = ?2, \
                 due_at = ?2, lease_seq = lease_seq + 1, updated_at = ?3 \
                 WHERE id IN (SELECT id FROM deliveries WHERE due_at <= ?3 \
                              ORDER BY due_at, id LIMIT ?4 + 0) \
                 RETURNING ",
                delivery_columns!()
            ))
            .bind(owner)
            .bind(until)
            .bind(now)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::db("claim deliveries"))?;
            let mut claimed = rows
                .iter()
                .map(claimed_from_row)
                .collect::<Result<Vec<_>>>()?;
            claimed.sort_by(|a, b| {
                (a.delivery.next_attempt_at, &a.delivery.id)
                    .cmp(&(b.delivery.next_attempt_at, &b.delivery.id))
            });
            Ok(Reply::Claimed(claimed))
        }
        Op::Settle {
            lease,
            outcome,
            now,
        } => settle(conn, lease, outcome, *now)
            .await
            .map(|()| Reply::Unit),
        Op::SetRequest {
            lease,
            request,
            fingerprint,
            now,
        } => {
            let r = sqlx::query(
                "UPDATE deliveries SET method = ?1, url = ?2, headers = ?3, body = ?4, \
                 route_fingerprint = ?5, render_again = 0, updated_at = ?6 \
                 WHERE id = ?7 AND state = 'leased' AND lease_owner = ?8 AND lease_seq = ?9",
            )
            .bind(&request.method)
            .bind(&request.url)
            .bind(headers_json(&request.headers))
            .bind(&request.body)
            .bind(fingerprint)
            .bind(now)
            .bind(&lease.id)
            .bind(&lease.owner)
            .bind(lease.seq)
            .execute(&mut *conn)
            .await
            .map_err(StoreError::db("store a request rendered again"))?;
            if r.rows_affected() == 1 {
                return Ok(Reply::Unit);
            }
            let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM deliveries WHERE id = ?1")
                .bind(&lease.id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(StoreError::db("store a request rendered again"))?;
            Err(lease_refusal(lease, exists.is_some()))
        }
        Op::Release { owner, now } => {
            let r = sqlx::query(
                "UPDATE deliveries SET state = 'pending', due_at = next_attempt_at, \
                 lease_owner = NULL, leased_until = NULL, updated_at = ?2 \
                 WHERE state = 'leased' AND lease_owner = ?1",
            )
            .bind(owner)
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(StoreError::db("release leases"))?;
            Ok(Reply::Count(r.rows_affected()))
        }
        Op::Replay { id, now } => {
            let r = sqlx::query(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?2, \
                 due_at = ?2, last_error = NULL, lease_owner = NULL, leased_until = NULL, \
                 render_again = 1, updated_at = ?2 WHERE id = ?1 AND state IN ('dead', 'delivered')",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(StoreError::db("replay a delivery"))?;
            if r.rows_affected() == 1 {
                return Ok(Reply::Unit);
            }
            let state: Option<String> =
                sqlx::query_scalar("SELECT state FROM deliveries WHERE id = ?1")
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(StoreError::db("replay a delivery"))?;
            Err(not_replayable(id, state))
        }
        Op::ReplayDead { now } => {
            let r = sqlx::query(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?1, \
                 due_at = ?1, last_error = NULL, render_again = 1, updated_at = ?1 \
                 WHERE state = 'dead'",
            )
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(StoreError::db("replay dead deliveries"))?;
            Ok(Reply::Count(r.rows_affected()))
        }
        Op::Begin {
            hold,
            cutoff,
            until,
            now,
        } => begin(conn, hold, *cutoff, *until, *now)
            .await
            .map(Reply::Begin),
        Op::Finish { hold, answer, now } => {
            let k = &hold.key;
            let r = sqlx::query(
                "UPDATE idempotency SET state = 'done', status = ?5, body = ?6, \
                 locked_until = NULL, holder = NULL, updated_at = ?7 \
                 WHERE bot = ?1 AND route = ?2 AND key = ?3 AND state = 'in_progress' \
                 AND holder = ?4",
            )
            .bind(&k.bot)
            .bind(&k.route)
            .bind(&k.key)
            .bind(&hold.token)
            .bind(i64::from(answer.status))
            .bind(&answer.body)
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(StoreError::db("record an answer"))?;
            Ok(Reply::Bool(r.rows_affected() == 1))
        }
        Op::Abandon { hold } => {
            let k = &hold.key;
            let r = sqlx::query(
                "DELETE FROM idempotency WHERE bot = ?1 AND route = ?2 AND key = ?3 \
                 AND state = 'in_progress' AND holder = ?4",
            )
            .bind(&k.bot)
            .bind(&k.route)
            .bind(&k.key)
            .bind(&hold.token)
            .execute(&mut *conn)
            .await
            .map_err(StoreError::db("abandon a key"))?;
            Ok(Reply::Bool(r.rows_affected() == 1))
        }
        Op::PurgeDead { before, limit } => {
            let r = sqlx::query(
                "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries \
                 WHERE state = 'dead' AND updated_at < ?1 LIMIT ?2 + 0)",
            )
            .bind(before)
            .bind(limit)
            .execute(&mut *conn)
            .await
            .map_err(StoreError::db("purge dead letters"))?;
            Ok(Reply::Count(r.rows_affected()))
        }
        Op::Purge { before, limit } => {
            let err = StoreError::db("purge");
            let d = sqlx::query(
                "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries \
                 WHERE state = 'delivered' AND updated_at < ?1 LIMIT ?2 + 0)",
            )
            .bind(before)
            .bind(limit)
            .execute(&mut *conn)
            .await
            .map_err(err)?;
            let i = sqlx::query(
                "DELETE FROM idempotency WHERE (bot, key) IN (SELECT bot, key FROM idempotency \
                 WHERE created_at < ?1 LIMIT ?2 + 0)",
            )
            .bind(before)
            .bind(limit)
            .execute(&mut *conn)
            .await
            .map_err(StoreError::db("purge"))?;
            Ok(Reply::Count(d.rows_affected() + i.rows_affected()))
        }
    }
}

async fn accept(
    conn: &mut SqliteConnection,
    d: &NewDelivery,
    cutoff: Option<i64>,
    max_pending: Option<u64>,
    now: i64,
) -> Result<Accept> {
    let err = || StoreError::db("accept a delivery");
    let dedupe_key = cutoff.and(d.idempotency_key.as_deref());
    if let Some(limit) = max_pending {
        // Read inside the writer's transaction: exact.
        let live: i64 = sqlx::query_scalar("SELECT live FROM live_count")
            .fetch_one(&mut *conn)
            .await
            .map_err(err())?;
        if live >= i64::try_from(limit).unwrap_or(i64::MAX) {
            // A duplicate stores nothing: it still gets the first answer.
            let first: Option<(String, i64)> = sqlx::query_as(
                "SELECT id, created_at FROM deliveries \
                 WHERE bot = ?1 AND route = ?2 AND dedupe_key = ?3",
            )
            .bind(&d.bot)
            .bind(&d.route)
            .bind(dedupe_key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(err())?;
            return match first {
                Some((id, created_at)) if cutoff.is_some_and(|c| created_at > c) => {
                    Ok(Accept::Duplicate { id })
                }
                _ => Err(StoreError::QueueFull { limit }),
            };
        }
    }
    let id = new_id();
    let headers = headers_json(&d.request.headers);
    // The common case (a fresh key, or no dedupe) is this one statement. On a
    // conflict, an expired holder lets go of its key and we insert again
    // (the writer is alone, so at most twice).
    for _ in 0..2 {
        let r = sqlx::query(
            "INSERT INTO deliveries (id, bot, route, payload, method, url, headers, body, \
             idempotency_key, dedupe_key, state, attempts, next_attempt_at, due_at, created_at, \
             updated_at, route_fingerprint) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'pending', 0, ?11, ?11, ?11, ?11, ?12) \
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
        .execute(&mut *conn)
        .await
        .map_err(err())?;
        if r.rows_affected() == 1 {
            return Ok(Accept::Accepted { id });
        }
        let (first, created_at): (String, i64) = sqlx::query_as(
            "SELECT id, created_at FROM deliveries \
             WHERE bot = ?1 AND route = ?2 AND dedupe_key = ?3",
        )
        .bind(&d.bot)
        .bind(&d.route)
        .bind(dedupe_key)
        .fetch_one(&mut *conn)
        .await
        .map_err(err())?;
        if cutoff.is_some_and(|c| created_at > c) {
            return Ok(Accept::Duplicate { id: first });
        }
        // Older than the window: forgotten, the new delivery takes the key.
        sqlx::query("UPDATE deliveries SET dedupe_key = NULL WHERE id = ?1")
            .bind(&first)
            .execute(&mut *conn)
            .await
            .map_err(err())?;
    }
    unreachable!("the single writer's second insert cannot conflict")
}

async fn settle(
    conn: &mut SqliteConnection,
    lease: &Lease,
    outcome: &Settle,
    now: i64,
) -> Result<()> {
    let plan = SettlePlan::of(outcome);
    let attempts: Option<i64> = sqlx::query_scalar(
        "UPDATE deliveries SET state = ?1, attempts = attempts + ?2, \
         next_attempt_at = COALESCE(?3, next_attempt_at), due_at = ?4, \
         last_error = CASE WHEN ?5 THEN ?6 ELSE last_error END, \
         lease_owner = NULL, leased_until = NULL, updated_at = ?7 \
         WHERE id = ?8 AND state = 'leased' AND lease_owner = ?9 AND lease_seq = ?10 \
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
    .fetch_optional(&mut *conn)
    .await
    .map_err(StoreError::db("settle a delivery"))?;
    let Some(number) = attempts else {
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM deliveries WHERE id = ?1")
            .bind(&lease.id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(StoreError::db("settle a delivery"))?;
        return Err(lease_refusal(lease, exists.is_some()));
    };
    if let Some(a) = plan.attempt {
        sqlx::query(
            "INSERT INTO attempts (delivery_id, number, at, status, latency_ms, error) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&lease.id)
        .bind(number)
        .bind(to_ms(a.at))
        .bind(a.status.map(i64::from))
        .bind(dur_ms(a.latency))
        .bind(&a.error)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::db("record a try"))?;
    }
    Ok(())
}

async fn begin(
    conn: &mut SqliteConnection,
    hold: &Hold,
    cutoff: i64,
    until: i64,
    now: i64,
) -> Result<Begin> {
    let err = || StoreError::db("begin an idempotent request");
    let k = &hold.key;
    // Records past their window go: this route's, and a schema-1 record (route '').
    sqlx::query(
        "DELETE FROM idempotency WHERE bot = ?1 AND route IN (?2, '') AND key = ?3 \
         AND created_at <= ?4",
    )
    .bind(&k.bot)
    .bind(&k.route)
    .bind(&k.key)
    .bind(cutoff)
    .execute(&mut *conn)
    .await
    .map_err(err())?;
    // A schema-1 record answers for every route of its bot, as when it was written.
    let legacy = sqlx::query(
        "SELECT state, status, body, locked_until FROM idempotency \
         WHERE bot = ?1 AND route = '' AND key = ?2",
    )
    .bind(&k.bot)
    .bind(&k.key)
    .fetch_optional(&mut *conn)
    .await
    .map_err(err())?;
    if let Some(row) = legacy {
        if legacy_still_answers(&row, now)? {
            return begin_from_row(&row);
        }
        // Its request is gone (its lease ended): forget it.
        sqlx::query("DELETE FROM idempotency WHERE bot = ?1 AND route = '' AND key = ?2")
            .bind(&k.bot)
            .bind(&k.key)
            .execute(&mut *conn)
            .await
            .map_err(err())?;
    }
    let r = sqlx::query(
        "INSERT INTO idempotency \
         (bot, route, key, state, created_at, locked_until, updated_at, holder) \
         VALUES (?1, ?2, ?3, 'in_progress', ?4, ?5, ?4, ?6) \
         ON CONFLICT (bot, route, key) DO NOTHING",
    )
    .bind(&k.bot)
    .bind(&k.route)
    .bind(&k.key)
    .bind(now)
    .bind(until)
    .bind(&hold.token)
    .execute(&mut *conn)
    .await
    .map_err(err())?;
    if r.rows_affected() == 1 {
        return Ok(Begin::New(hold.clone()));
    }
    // A stale in-progress marker (its request crashed or stalled) is taken
    // over under this hold: the old holder can no longer finish or free it.
    let r = sqlx::query(
        "UPDATE idempotency SET locked_until = ?4, updated_at = ?5, holder = ?6 \
         WHERE bot = ?1 AND route = ?2 AND key = ?3 AND state = 'in_progress' \
         AND locked_until <= ?5",
    )
    .bind(&k.bot)
    .bind(&k.route)
    .bind(&k.key)
    .bind(until)
    .bind(now)
    .bind(&hold.token)
    .execute(&mut *conn)
    .await
    .map_err(err())?;
    if r.rows_affected() == 1 {
        return Ok(Begin::New(hold.clone()));
    }
    let row = sqlx::query(
        "SELECT state, status, body FROM idempotency WHERE bot = ?1 AND route = ?2 AND key = ?3",
    )
    .bind(&k.bot)
    .bind(&k.route)
    .bind(&k.key)
    .fetch_one(&mut *conn)
    .await
    .map_err(err())?;
    begin_from_row(&row)
}

// ---- reads, on the reader pool ----

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn accept(
        &self,
        delivery: NewDelivery,
        dedupe_window: Option<Duration>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Accept>> {
        Box::pin(async move {
            let op = Op::Accept {
                delivery,
                cutoff: dedupe_window.map(|w| cutoff_ms(now, w)),
                max_pending: self.max_pending,
                now: to_ms(now),
            };
            match self.write(op).await? {
                Reply::Accept(a) => Ok(a),
                _ => unreachable!("accept answers Accept"),
            }
        })
    }

    fn accept_all(
        &self,
        deliveries: Vec<NewDelivery>,
        dedupe_window: Option<Duration>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Vec<Accept>>> {
        Box::pin(async move {
            let op = Op::AcceptAll {
                deliveries,
                cutoff: dedupe_window.map(|w| cutoff_ms(now, w)),
                max_pending: self.max_pending,
                now: to_ms(now),
            };
            match self.write(op).await? {
                Reply::AcceptAll(a) => Ok(a),
                _ => unreachable!("accept_all answers AcceptAll"),
            }
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
            let op = Op::Claim {
                owner: owner.to_owned(),
                now: to_ms(now),
                until: to_ms(now).saturating_add(dur_ms(lease)),
                limit: i64::from(limit),
            };
            match self.write(op).await? {
                Reply::Claimed(c) => Ok(c),
                _ => unreachable!("claim answers Claimed"),
            }
        })
    }

    fn settle<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: Settle,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let op = Op::Settle {
                lease: lease.clone(),
                outcome,
                now: to_ms(now),
            };
            self.write(op).await.map(|_| ())
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
            let op = Op::SetRequest {
                lease: lease.clone(),
                request,
                fingerprint,
                now: to_ms(now),
            };
            self.write(op).await.map(|_| ())
        })
    }

    fn release_owner<'a>(&'a self, owner: &'a str, now: SystemTime) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let op = Op::Release {
                owner: owner.to_owned(),
                now: to_ms(now),
            };
            match self.write(op).await? {
                Reply::Count(n) => Ok(n),
                _ => unreachable!("release answers Count"),
            }
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
                    " FROM deliveries WHERE state = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2 + 0"
                ))
                .bind(s.as_str()),
                None => sqlx::query(concat!(
                    "SELECT ",
                    summary_columns!(),
                    " FROM deliveries WHERE ?1 IS NULL ORDER BY created_at DESC, id DESC LIMIT ?2 + 0"
                ))
                .bind(None::<String>),
            };
            let rows = q
                .bind(i64::from(limit))
                .fetch_all(&self.reader)
                .await
                .map_err(StoreError::db("list deliveries"))?;
            rows.iter().map(summary_from_row).collect()
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<DeliveryDetail>>> {
        Box::pin(async move {
            let err = || StoreError::db("read a delivery");
            // One read transaction: the delivery and its tries from one snapshot.
            let mut tx = self.reader.begin().await.map_err(err())?;
            let Some(row) = sqlx::query(concat!(
                "SELECT ",
                delivery_columns!(),
                " FROM deliveries WHERE id = ?1"
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
                 WHERE delivery_id = ?1 ORDER BY id",
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
            let op = Op::Replay {
                id: id.to_owned(),
                now: to_ms(now),
            };
            self.write(op).await.map(|_| ())
        })
    }

    fn replay_dead(&self, now: SystemTime) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            match self.write(Op::ReplayDead { now: to_ms(now) }).await? {
                Reply::Count(n) => Ok(n),
                _ => unreachable!("replay_dead answers Count"),
            }
        })
    }

    fn stats(&self, now: SystemTime) -> BoxFuture<'_, Result<Stats>> {
        Box::pin(async move {
            let row = sqlx::query(STATS_SQL)
                .fetch_one(&self.reader)
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
            let op = Op::Begin {
                hold: Hold {
                    key: key.clone(),
                    token: new_id(),
                },
                cutoff: cutoff_ms(now, window),
                until: to_ms(now).saturating_add(dur_ms(lease)),
                now: to_ms(now),
            };
            match self.write(op).await? {
                Reply::Begin(b) => Ok(b),
                _ => unreachable!("begin answers Begin"),
            }
        })
    }

    fn finish<'a>(
        &'a self,
        hold: &'a Hold,
        answer: StoredAnswer,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let op = Op::Finish {
                hold: hold.clone(),
                answer,
                now: to_ms(now),
            };
            match self.write(op).await? {
                Reply::Bool(b) => Ok(b),
                _ => unreachable!("finish answers Bool"),
            }
        })
    }

    fn abandon<'a>(&'a self, hold: &'a Hold) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let op = Op::Abandon { hold: hold.clone() };
            match self.write(op).await? {
                Reply::Bool(b) => Ok(b),
                _ => unreachable!("abandon answers Bool"),
            }
        })
    }

    fn purge_dead(&self, before: SystemTime, limit: u32) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let op = Op::PurgeDead {
                before: to_ms(before),
                limit: i64::from(limit),
            };
            match self.write(op).await? {
                Reply::Count(n) => Ok(n),
                _ => unreachable!("purge_dead answers Count"),
            }
        })
    }

    fn purge(&self, before: SystemTime, limit: u32) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let op = Op::Purge {
                before: to_ms(before),
                limit: i64::from(limit),
            };
            match self.write(op).await? {
                Reply::Count(n) => Ok(n),
                _ => unreachable!("purge answers Count"),
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (done, rx) = oneshot::channel();
            if self.writer.send(Msg::Close(done)).await.is_ok() {
                let _ = rx.await;
            }
            self.reader.close().await;
        })
    }
}
