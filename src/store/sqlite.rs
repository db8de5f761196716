//! The embedded store: one SQLite file (the default, `sqlite://data/gateway.db`).
//!
//! Durability: WAL journal with `synchronous=FULL`, so a commit is on disk
//! (the WAL fsynced) before [`Store::accept`] resolves and the 202 goes out.
//!
//! Group commit: every write — accepts, claims, settles, replays — goes to
//! one writer thread over a channel (`writer`: rusqlite on a thread of its
//! own, one hop per operation instead of sqlx's two per statement). It takes
//! everything queued (up to [`SqliteOptions::max_batch`]), runs it in one
//! `BEGIN IMMEDIATE` transaction, commits once and then answers every caller. While one batch
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
//! statement is reused. Nor does any statement a webhook runs build a
//! temporary b-tree (an `IN` list of more than two values, a sort, RETURNING):
//! the `state` CHECK is written as comparisons since migration 4. The
//! writer's tests hold its statements to both rules.

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

mod writer;
use writer::{Job, Msg, Op, Reply};

use super::api::{
    Accept, Begin, BoxFuture, Claimed, DeliveryDetail, DeliverySummary, Hold, Lease, NewDelivery,
    Result, ScopedKey, Settle, State, Stats, Store, StoreError, StoredAnswer, StoredRequest,
};
use super::rows::{
    STATS_SQL, attempt_from_row, cutoff_ms, delivery_columns, delivery_from_row, dur_ms, new_id,
    stats_from_row, summary_columns, summary_from_row, to_ms,
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
    r#"
-- v4: the state CHECK as comparisons. SQLite evaluates `IN` with more than two
-- values by building a temporary b-tree, on every INSERT and every UPDATE of
-- the row: three per delivered webhook, about a tenth of the instructions of an
-- async webhook (callgrind, bench/callgrind.sh e). The predicate is the same,
-- so every stored row satisfies it: SQLite documents editing sqlite_schema for
-- such a change (https://www.sqlite.org/lang_altertable.html#otheralter); the
-- schema cookie is bumped by `migrate` after the migrations.
PRAGMA writable_schema = ON;
UPDATE sqlite_schema SET sql = replace(sql,
    'CHECK (state IN (''pending'', ''leased'', ''delivered'', ''dead''))',
    'CHECK (state = ''pending'' OR state = ''leased'' OR state = ''delivered'' OR state = ''dead'')')
WHERE type = 'table' AND name = 'deliveries';
PRAGMA writable_schema = RESET;
"#,
    r#"
-- v5: the live count is kept by the writer, once per transaction (see
-- `writer::Live`), not by triggers: a statement that fires a trigger keeps a
-- statement journal and runs the trigger's program, on every accept, claim and
-- settle. Counted again here, from the rows.
DROP TRIGGER deliveries_live_insert;
DROP TRIGGER deliveries_live_delete;
DROP TRIGGER deliveries_live_update;
UPDATE live_count SET live =
    (SELECT COUNT(*) FROM deliveries WHERE state IN ('pending', 'leased'));
"#,
];

/// What the `deliveries` table's `state` CHECK reads once migrated (v4).
const STATE_CHECK: &str =
    "CHECK (state = 'pending' OR state = 'leased' OR state = 'delivered' OR state = 'dead')";

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
        // Migrations on a sqlx connection (as the readers use), then the
        // writer's own connection on its thread (`writer`).
        let mut conn = SqliteConnection::connect_with(&connect)
            .await
            .map_err(StoreError::db("open the SQLite file"))?;
        migrate(&mut conn, &path).await?;
        let _ = conn.close().await;
        let writer_connect = writer::Connect {
            path: path.clone(),
            busy_timeout: opts.busy_timeout,
        };
        let (writer_connect, writer_conn) = tokio::task::spawn_blocking(move || {
            let conn = writer_connect.open();
            (writer_connect, conn)
        })
        .await
        .map_err(|_| StoreError::Closed)?;
        let writer_conn = writer_conn?;
        let reader = SqlitePoolOptions::new()
            .max_connections(opts.read_connections.max(1))
            .connect_lazy_with(connect);
        let commits = Arc::new(AtomicU64::new(0));
        let (writer_tx, rx) = mpsc::channel(opts.queue.max(1));
        writer::spawn(
            writer_conn,
            writer_connect,
            rx,
            opts.max_batch.max(1),
            commits.clone(),
        )
        .map_err(StoreError::WriterThread)?;
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

async fn migrate(conn: &mut SqliteConnection, path: &Path) -> Result<()> {
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
    // v4 edits sqlite_schema directly: the table must read as intended, and the
    // schema cookie goes up so that every other connection reads it again.
    let table: String = sqlx::query_scalar(
        "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'deliveries'",
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(StoreError::db("migrate the schema"))?;
    if !table.contains(STATE_CHECK) {
        // (dropping `tx` rolls every migration back)
        return Err(StoreError::ForeignSchema {
            path: path.display().to_string(),
            what: "the deliveries table's state CHECK is not the one migration 4 rewrites",
        });
    }
    let cookie: i64 = sqlx::query_scalar("PRAGMA schema_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::db("migrate the schema"))?;
    // (an integer read just above: nothing to inject)
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "PRAGMA schema_version = {}",
        cookie + 1
    )))
    .execute(&mut *tx)
    .await
    .map_err(StoreError::db("migrate the schema"))?;
    tx.commit()
        .await
        .map_err(StoreError::db("migrate the schema"))
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
