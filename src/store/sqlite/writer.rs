//! The SQLite store's writer: one OS thread that owns the only writing
//! connection and runs every write (accepts, claims, settles, replays, the
//! sync idempotency records, purges) in batches, one `BEGIN IMMEDIATE`
//! transaction and one commit (one fsync) per batch, then answers each
//! caller.
//!
//! # Why a thread of its own, with rusqlite
//!
//! A profile of `bench/load.sh` scenario e on sqlx's SQLite driver showed
//! its worker threads at 41% of the gateway's CPU, most of it context
//! switches: sqlx runs every *statement* on the connection's worker thread
//! and hands the answer back to the async task, two thread wake-ups per
//! statement and five or six statements per accepted webhook (accept, claim,
//! settle, the try). Here a whole batch runs on this thread without a hop:
//! the async side pays one channel send and one wake-up per *operation*, and
//! statements come from rusqlite's prepared-statement cache.
//!
//! A failing statement rolls its whole batch back; the batch is then run
//! again one operation per transaction, so one bad operation cannot fail its
//! neighbours (an operation refused for a business reason, e.g.
//! [`StoreError::LeaseLost`], has written nothing). After a failed
//! transaction the connection is opened again: SQLite may roll a transaction
//! back by itself on an I/O error (disk full, read-only file), and a fresh
//! connection lets the store work again once the file system takes writes
//! (SPEC §7.3).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::super::api::{
    Accept, Begin, Claimed, Hold, Lease, NewDelivery, Result, Settle, StoreError, StoredAnswer,
    StoredRequest,
};
use super::super::rows::{
    ByPosition, DELIVERY_COLUMNS, SettlePlan, begin_from_row, claimed_from_row, dur_ms,
    headers_json, lease_refusal, legacy_still_answers, new_id, not_replayable, to_ms,
};

// Nearly every message is a `Job`: boxing it would add an allocation per write for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Msg {
    Job(Job),
    Close(oneshot::Sender<()>),
}

pub(super) struct Job {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Reply>>,
}

/// A write, with times already in stored milliseconds.
pub(super) enum Op {
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

pub(super) enum Reply {
    Accept(Accept),
    AcceptAll(Vec<Accept>),
    Claimed(Vec<Claimed>),
    Unit,
    Count(u64),
    Begin(Begin),
    Bool(bool),
}

/// The statements every accepted and delivered webhook runs (accept, claim,
/// settle), by name: a test holds each to the rules of `super` (no statement
/// prepared again on every run, no temporary b-tree).
pub(super) mod sql {
    use crate::store::rows::delivery_columns;

    pub const ACCEPT: &str = "INSERT INTO deliveries (id, bot, route, payload, method, url, \
        headers, body, idempotency_key, dedupe_key, state, attempts, next_attempt_at, due_at, \
        created_at, updated_at, route_fingerprint) \
        VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'pending', 0, ?11, ?11, ?11, ?11, ?12) \
        ON CONFLICT (bot, route, dedupe_key) DO NOTHING";
    /// The rows due, read from the `due_at` index in its own order (oldest due
    /// first, then the first stored: no sort). `LIMIT ?2 + 0`, see `super`.
    pub const DUE: &str = "SELECT rowid FROM deliveries WHERE due_at <= ?1 \
        ORDER BY due_at, rowid LIMIT ?2 + 0";
    pub const LEASE: &str = "UPDATE deliveries SET state = 'leased', lease_owner = ?1, \
        leased_until = ?2, due_at = ?2, lease_seq = lease_seq + 1, updated_at = ?3 \
        WHERE rowid = ?4";
    pub const READ_CLAIMED: &str = concat!(
        "SELECT ",
        delivery_columns!(),
        " FROM deliveries WHERE rowid = ?1"
    );
    pub const SETTLE: &str = "UPDATE deliveries SET state = ?1, attempts = attempts + ?2, \
        next_attempt_at = COALESCE(?3, next_attempt_at), due_at = ?4, \
        last_error = CASE WHEN ?5 THEN ?6 ELSE last_error END, \
        lease_owner = NULL, leased_until = NULL, updated_at = ?7 \
        WHERE id = ?8 AND state = 'leased' AND lease_owner = ?9 AND lease_seq = ?10";
    pub const RECORD_TRY: &str = "INSERT INTO attempts \
        (delivery_id, number, at, status, latency_ms, error) \
        SELECT id, attempts, ?2, ?3, ?4, ?5 FROM deliveries WHERE id = ?1";
    pub const LIVE: &str = "SELECT live FROM live_count";
    pub const ADD_LIVE: &str = "UPDATE live_count SET live = live + ?1";
    pub const KEY_HOLDER: &str = "SELECT id, created_at FROM deliveries \
        WHERE bot = ?1 AND route = ?2 AND dedupe_key = ?3";

    /// Every statement above.
    #[cfg(test)]
    pub const ALL: &[&str] = &[
        ACCEPT,
        DUE,
        LEASE,
        READ_CLAIMED,
        SETTLE,
        RECORD_TRY,
        LIVE,
        ADD_LIVE,
        KEY_HOLDER,
    ];
}

/// How the writer's connection is opened (again, after a failed transaction).
pub(super) struct Connect {
    pub path: PathBuf,
    pub busy_timeout: Duration,
}

impl Connect {
    /// WAL with `synchronous=FULL`: a commit is on disk (the WAL fsynced)
    /// before its callers are answered. A 4 MiB page cache instead of
    /// SQLite's 2 MiB, for the index pages that random idempotency keys
    /// touch. (On the old sqlx writer 16 MiB had paid: 3.9k -> 4.5k
    /// accepted/s. On this one, bench/load.sh e measured 16 MiB against
    /// 4 MiB at 5,857/5,681 against 6,120/6,175 accepted/s, and peak RSS
    /// 50 against 38 MiB: the smaller cache is as fast and fits issue 18's
    /// 40 MiB.)
    pub fn open(&self) -> Result<Connection> {
        let err = StoreError::sqlite;
        let conn = Connection::open(&self.path).map_err(err("open the SQLite file"))?;
        conn.busy_timeout(self.busy_timeout)
            .map_err(err("open the SQLite file"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
             PRAGMA foreign_keys = ON; PRAGMA cache_size = -4096;",
        )
        .map_err(err("open the SQLite file"))?;
        // every statement of this module, with room to spare
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    }
}

/// The writer's connection, opened again after a failed transaction.
struct Writer {
    conn: Option<Connection>,
    connect: Connect,
}

impl Writer {
    /// Runs `ops` in one transaction (see [`run_batch`]), on a fresh
    /// connection if the last transaction failed.
    fn run(&mut self, ops: &[Op], commits: &AtomicU64) -> Result<Vec<Result<Reply>>> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self.conn.insert(self.connect.open()?),
        };
        let result = run_batch(conn, ops, commits);
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

/// Starts the writer thread on `conn`; it ends when every sender is dropped
/// or on [`Msg::Close`].
pub(super) fn spawn(
    conn: Connection,
    connect: Connect,
    rx: mpsc::Receiver<Msg>,
    max_batch: usize,
    commits: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let writer = Writer {
        conn: Some(conn),
        connect,
    };
    std::thread::Builder::new()
        .name("sqlite-writer".into())
        .spawn(move || write_loop(writer, rx, max_batch, &commits))
        .map(drop)
}

fn write_loop(
    mut writer: Writer,
    mut rx: mpsc::Receiver<Msg>,
    max_batch: usize,
    commits: &AtomicU64,
) {
    let mut msgs = Vec::with_capacity(max_batch);
    let mut closing = None;
    while closing.is_none() {
        // Wait for one, then take what queued meanwhile (group commit: while a
        // batch is being fsynced, the next one queues up).
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        msgs.push(first);
        while msgs.len() < max_batch {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
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
        let results = match writer.run(&ops, commits) {
            Ok(results) => results,
            // A statement failed and the batch rolled back: run each alone so
            // only the operation at fault fails.
            Err(_) if ops.len() > 1 => ops
                .iter()
                .map(|op| match writer.run(std::slice::from_ref(op), commits) {
                    Ok(mut r) => r.pop().expect("one result per operation"),
                    Err(e) => Err(e),
                })
                .collect(),
            Err(e) => vec![Err(e)],
        };
        for (reply, result) in replies.into_iter().zip(results) {
            // The caller may have gone (its request was cancelled); the write stands.
            let _ = reply.send(result);
        }
    }
    // Every sender dropped, or close(): queued jobs are dropped (their callers see Closed).
    rx.close();
    drop(writer);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// The count of live (pending or leased) deliveries behind `--max-pending`,
/// as a batch changes it: `live_count` is read at most once per transaction
/// and written once, before the commit.
///
/// Why not the triggers that kept it per row until migration 5: a statement
/// that fires a trigger may fail halfway, so SQLite keeps a statement journal
/// (a copy of every page it changes) for it, and runs the trigger's program:
/// on every accept, claim and settle. Every write to `deliveries` is an
/// operation of this writer (in whichever process runs it), so each operation
/// counts what it moves in or out of the live states.
#[derive(Default)]
struct Live {
    /// `live_count.live` as this transaction found it, once read.
    stored: Option<i64>,
    /// What this transaction's operations added (or took away) so far.
    delta: i64,
}

impl Live {
    /// The live deliveries now, this transaction's writes included.
    fn current(&mut self, conn: &Connection) -> rusqlite::Result<i64> {
        let stored = match self.stored {
            Some(n) => n,
            None => *self.stored.insert(
                conn.prepare_cached(sql::LIVE)?
                    .query_row([], |r| r.get(0))?,
            ),
        };
        Ok(stored + self.delta)
    }

    /// Writes the batch's change (before its commit).
    fn write(&self, conn: &Connection) -> Result<()> {
        if self.delta != 0 {
            conn.prepare_cached(sql::ADD_LIVE)
                .and_then(|mut s| s.execute(params![self.delta]))
                .map_err(StoreError::sqlite("count live deliveries"))?;
        }
        Ok(())
    }
}

/// Runs `ops` in one transaction. `Err` when a statement failed (all rolled
/// back); otherwise one result per op, business refusals included.
fn run_batch(conn: &mut Connection, ops: &[Op], commits: &AtomicU64) -> Result<Vec<Result<Reply>>> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(StoreError::sqlite("begin a transaction"))?;
    let mut results = Vec::with_capacity(ops.len());
    let mut live = Live::default();
    for op in ops {
        match run_op(&mut tx, op, &mut live) {
            Err(e) if e.is_db() => return Err(e), // dropping tx rolls back
            r => results.push(r),
        }
    }
    live.write(&tx)?;
    tx.commit().map_err(StoreError::sqlite("commit"))?;
    commits.fetch_add(1, Ordering::Relaxed);
    Ok(results)
}

/// Runs one operation; `live` counts what it moves in or out of the live states.
fn run_op(tx: &mut Transaction<'_>, op: &Op, live: &mut Live) -> Result<Reply> {
    let db = StoreError::sqlite;
    match op {
        Op::Accept {
            delivery,
            cutoff,
            max_pending,
            now,
        } => accept(tx, delivery, *cutoff, *max_pending, *now, live).map(Reply::Accept),
        Op::AcceptAll {
            deliveries,
            cutoff,
            max_pending,
            now,
        } => {
            // A savepoint: a refusal of one (the queue is full) takes back the
            // others, while the rest of the batch stands.
            let sp = tx.savepoint().map_err(db("begin a savepoint"))?;
            let mut accepted = Vec::with_capacity(deliveries.len());
            let before = live.delta;
            for d in deliveries {
                match accept(&sp, d, *cutoff, *max_pending, *now, live) {
                    Ok(a) => accepted.push(a),
                    Err(e) => {
                        // dropping `sp` rolls the group back: its count too
                        live.delta = before;
                        return Err(e);
                    }
                }
            }
            sp.commit().map_err(db("release a savepoint"))?;
            Ok(Reply::AcceptAll(accepted))
        }
        Op::Claim {
            owner,
            now,
            until,
            limit,
        } => {
            // Point statements only: the rows due (read from the `due_at`
            // index in its own order, oldest due first and then the first
            // stored, no sort), then each leased and read by rowid. The one
            // `UPDATE … WHERE id IN (SELECT … ORDER BY due_at, id) RETURNING …`
            // this replaces built temporary b-trees on every claim (the IN
            // list, the tie-break sort, RETURNING's buffer). The writer is
            // alone, so nothing changes between these statements.
            let err = || db("claim deliveries");
            let due: Vec<i64> = tx
                .prepare_cached(sql::DUE)
                .and_then(|mut s| {
                    s.query_map(params![now, limit], |r| r.get(0))?
                        .collect::<rusqlite::Result<_>>()
                })
                .map_err(err())?;
            let mut lease = tx.prepare_cached(sql::LEASE).map_err(err())?;
            let mut read = tx.prepare_cached(sql::READ_CLAIMED).map_err(err())?;
            let mut claimed = Vec::with_capacity(due.len());
            for rowid in due {
                lease
                    .execute(params![owner, until, now, rowid])
                    .map_err(err())?;
                let mut rows = read.query(params![rowid]).map_err(err())?;
                let row = rows.next().map_err(err())?.ok_or(StoreError::Corrupt {
                    id: rowid.to_string(),
                    what: "a claimed row vanished",
                })?;
                claimed.push(claimed_from_row(&ByPosition::new(row, DELIVERY_COLUMNS))?);
            }
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
        } => settle(tx, lease, outcome, *now, live).map(|()| Reply::Unit),
        Op::SetRequest {
            lease,
            request,
            fingerprint,
            now,
        } => {
            let err = || db("store a request rendered again");
            let n = tx
                .prepare_cached(
                    "UPDATE deliveries SET method = ?1, url = ?2, headers = ?3, body = ?4, \
                     route_fingerprint = ?5, render_again = 0, updated_at = ?6 \
                     WHERE id = ?7 AND state = 'leased' AND lease_owner = ?8 AND lease_seq = ?9",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        request.method,
                        request.url,
                        headers_json(&request.headers),
                        request.body,
                        fingerprint,
                        now,
                        lease.id,
                        lease.owner,
                        lease.seq
                    ])
                })
                .map_err(err())?;
            if n == 1 {
                return Ok(Reply::Unit);
            }
            Err(lease_refusal(lease, exists(tx, &lease.id).map_err(err())?))
        }
        Op::Release { owner, now } => {
            let n = tx
                .prepare_cached(
                    "UPDATE deliveries SET state = 'pending', due_at = next_attempt_at, \
                     lease_owner = NULL, leased_until = NULL, updated_at = ?2 \
                     WHERE state = 'leased' AND lease_owner = ?1",
                )
                .and_then(|mut s| s.execute(params![owner, now]))
                .map_err(db("release leases"))?;
            Ok(Reply::Count(n as u64))
        }
        Op::Replay { id, now } => {
            let err = || db("replay a delivery");
            let n = tx
                .prepare_cached(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?2, \
                     due_at = ?2, last_error = NULL, lease_owner = NULL, leased_until = NULL, \
                     render_again = 1, updated_at = ?2 \
                     WHERE id = ?1 AND state IN ('dead', 'delivered')",
                )
                .and_then(|mut s| s.execute(params![id, now]))
                .map_err(err())?;
            if n == 1 {
                live.delta += 1; // dead or delivered -> pending
                return Ok(Reply::Unit);
            }
            let state: Option<String> = tx
                .prepare_cached("SELECT state FROM deliveries WHERE id = ?1")
                .and_then(|mut s| s.query_row(params![id], |r| r.get(0)).optional())
                .map_err(err())?;
            Err(not_replayable(id, state))
        }
        Op::ReplayDead { now } => {
            let n = tx
                .prepare_cached(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?1, \
                     due_at = ?1, last_error = NULL, render_again = 1, updated_at = ?1 \
                     WHERE state = 'dead'",
                )
                .and_then(|mut s| s.execute(params![now]))
                .map_err(db("replay dead deliveries"))?;
            live.delta += n as i64; // dead -> pending
            Ok(Reply::Count(n as u64))
        }
        Op::Begin {
            hold,
            cutoff,
            until,
            now,
        } => begin(tx, hold, *cutoff, *until, *now).map(Reply::Begin),
        Op::Finish { hold, answer, now } => {
            let k = &hold.key;
            let n = tx
                .prepare_cached(
                    "UPDATE idempotency SET state = 'done', status = ?5, body = ?6, \
                     locked_until = NULL, holder = NULL, updated_at = ?7 \
                     WHERE bot = ?1 AND route = ?2 AND key = ?3 AND state = 'in_progress' \
                     AND holder = ?4",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        k.bot,
                        k.route,
                        k.key,
                        hold.token,
                        i64::from(answer.status),
                        answer.body,
                        now
                    ])
                })
                .map_err(db("record an answer"))?;
            Ok(Reply::Bool(n == 1))
        }
        Op::Abandon { hold } => {
            let k = &hold.key;
            let n = tx
                .prepare_cached(
                    "DELETE FROM idempotency WHERE bot = ?1 AND route = ?2 AND key = ?3 \
                     AND state = 'in_progress' AND holder = ?4",
                )
                .and_then(|mut s| s.execute(params![k.bot, k.route, k.key, hold.token]))
                .map_err(db("abandon a key"))?;
            Ok(Reply::Bool(n == 1))
        }
        Op::PurgeDead { before, limit } => {
            let n = tx
                .prepare_cached(
                    "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries \
                     WHERE state = 'dead' AND updated_at < ?1 LIMIT ?2 + 0)",
                )
                .and_then(|mut s| s.execute(params![before, limit]))
                .map_err(db("purge dead letters"))?;
            Ok(Reply::Count(n as u64))
        }
        Op::Purge { before, limit } => {
            let d = tx
                .prepare_cached(
                    "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries \
                     WHERE state = 'delivered' AND updated_at < ?1 LIMIT ?2 + 0)",
                )
                .and_then(|mut s| s.execute(params![before, limit]))
                .map_err(db("purge"))?;
            let i = tx
                .prepare_cached(
                    "DELETE FROM idempotency WHERE (bot, key) IN (SELECT bot, key FROM idempotency \
                     WHERE created_at < ?1 LIMIT ?2 + 0)",
                )
                .and_then(|mut s| s.execute(params![before, limit]))
                .map_err(db("purge"))?;
            Ok(Reply::Count((d + i) as u64))
        }
    }
}

/// Whether the delivery `id` exists (to tell a lost lease from a missing delivery).
fn exists(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM deliveries WHERE id = ?1")?
        .exists(params![id])
}

/// The first delivery holding (bot, route, key): its id and acceptance time.
fn key_holder(
    conn: &Connection,
    d: &NewDelivery,
    dedupe_key: Option<&str>,
) -> rusqlite::Result<Option<(String, i64)>> {
    conn.prepare_cached(sql::KEY_HOLDER)?
        .query_row(params![d.bot, d.route, dedupe_key], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
}

fn accept(
    conn: &Connection,
    d: &NewDelivery,
    cutoff: Option<i64>,
    max_pending: Option<u64>,
    now: i64,
    live: &mut Live,
) -> Result<Accept> {
    let err = || StoreError::sqlite("accept a delivery");
    let dedupe_key = cutoff.and(d.idempotency_key.as_deref());
    if let Some(limit) = max_pending {
        // Read inside the writer's transaction: exact.
        if live.current(conn).map_err(err())? >= i64::try_from(limit).unwrap_or(i64::MAX) {
            // A duplicate stores nothing: it still gets the first answer.
            return match key_holder(conn, d, dedupe_key).map_err(err())? {
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
        let n = conn
            .prepare_cached(sql::ACCEPT)
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    d.bot,
                    d.route,
                    d.payload,
                    d.request.method,
                    d.request.url,
                    headers,
                    d.request.body,
                    d.idempotency_key,
                    dedupe_key,
                    now,
                    d.fingerprint
                ])
            })
            .map_err(err())?;
        if n == 1 {
            live.delta += 1; // stored pending
            return Ok(Accept::Accepted { id });
        }
        let (first, created_at) =
            key_holder(conn, d, dedupe_key)
                .map_err(err())?
                .ok_or_else(|| StoreError::Corrupt {
                    id: id.clone(),
                    what: "an insert conflicted with no row",
                })?;
        if cutoff.is_some_and(|c| created_at > c) {
            return Ok(Accept::Duplicate { id: first });
        }
        // Older than the window: forgotten, the new delivery takes the key.
        conn.prepare_cached("UPDATE deliveries SET dedupe_key = NULL WHERE id = ?1")
            .and_then(|mut s| s.execute(params![first]))
            .map_err(err())?;
    }
    unreachable!("the single writer's second insert cannot conflict")
}

fn settle(
    conn: &Connection,
    lease: &Lease,
    outcome: &Settle,
    now: i64,
    live: &mut Live,
) -> Result<()> {
    let err = || StoreError::sqlite("settle a delivery");
    let plan = SettlePlan::of(outcome);
    // Without RETURNING (which buffers its rows in a temporary b-tree): the
    // update, then the try recorded with the count it left.
    let n = conn
        .prepare_cached(sql::SETTLE)
        .and_then(|mut s| {
            s.execute(params![
                plan.state.as_str(),
                plan.increment,
                plan.next_attempt_at,
                plan.due_at,
                plan.last_error.is_some(),
                plan.last_error.clone().flatten(),
                now,
                lease.id,
                lease.owner,
                lease.seq
            ])
        })
        .map_err(err())?;
    if n == 0 {
        return Err(lease_refusal(
            lease,
            exists(conn, &lease.id).map_err(err())?,
        ));
    }
    if !plan.state.is_live() {
        live.delta -= 1; // leased -> delivered or dead
    }
    if let Some(a) = plan.attempt {
        // numbered with the try count just updated, read by the insert itself
        conn.prepare_cached(sql::RECORD_TRY)
            .and_then(|mut s| {
                s.execute(params![
                    lease.id,
                    to_ms(a.at),
                    a.status.map(i64::from),
                    dur_ms(a.latency),
                    a.error
                ])
            })
            .map_err(StoreError::sqlite("record a try"))?;
    }
    Ok(())
}

fn begin(conn: &Connection, hold: &Hold, cutoff: i64, until: i64, now: i64) -> Result<Begin> {
    let err = || StoreError::sqlite("begin an idempotent request");
    let k = &hold.key;
    // Records past their window go: this route's, and a schema-1 record (route '').
    conn.prepare_cached(
        "DELETE FROM idempotency WHERE bot = ?1 AND route IN (?2, '') AND key = ?3 \
         AND created_at <= ?4",
    )
    .and_then(|mut s| s.execute(params![k.bot, k.route, k.key, cutoff]))
    .map_err(err())?;
    // A schema-1 record answers for every route of its bot, as when it was written.
    {
        let mut stmt = conn
            .prepare_cached(
                "SELECT state, status, body, locked_until FROM idempotency \
                 WHERE bot = ?1 AND route = '' AND key = ?2",
            )
            .map_err(err())?;
        let mut rows = stmt.query(params![k.bot, k.key]).map_err(err())?;
        if let Some(row) = rows.next().map_err(err())? {
            if legacy_still_answers(row, now)? {
                return begin_from_row(row);
            }
            drop(rows);
            // Its request is gone (its lease ended): forget it.
            conn.prepare_cached(
                "DELETE FROM idempotency WHERE bot = ?1 AND route = '' AND key = ?2",
            )
            .and_then(|mut s| s.execute(params![k.bot, k.key]))
            .map_err(err())?;
        }
    }
    let n = conn
        .prepare_cached(
            "INSERT INTO idempotency \
             (bot, route, key, state, created_at, locked_until, updated_at, holder) \
             VALUES (?1, ?2, ?3, 'in_progress', ?4, ?5, ?4, ?6) \
             ON CONFLICT (bot, route, key) DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![k.bot, k.route, k.key, now, until, hold.token]))
        .map_err(err())?;
    if n == 1 {
        return Ok(Begin::New(hold.clone()));
    }
    // A stale in-progress marker (its request crashed or stalled) is taken
    // over under this hold: the old holder can no longer finish or free it.
    let n = conn
        .prepare_cached(
            "UPDATE idempotency SET locked_until = ?4, updated_at = ?5, holder = ?6 \
             WHERE bot = ?1 AND route = ?2 AND key = ?3 AND state = 'in_progress' \
             AND locked_until <= ?5",
        )
        .and_then(|mut s| s.execute(params![k.bot, k.route, k.key, until, now, hold.token]))
        .map_err(err())?;
    if n == 1 {
        return Ok(Begin::New(hold.clone()));
    }
    let mut stmt = conn
        .prepare_cached(
            "SELECT state, status, body FROM idempotency \
             WHERE bot = ?1 AND route = ?2 AND key = ?3",
        )
        .map_err(err())?;
    let mut rows = stmt.query(params![k.bot, k.route, k.key]).map_err(err())?;
    match rows.next().map_err(err())? {
        Some(row) => begin_from_row(row),
        None => Err(StoreError::Corrupt {
            // (the key is a payload value: named by its scope)
            id: format!("idempotency record of {}/{}", k.bot, k.route),
            what: "an idempotency insert conflicted with no row",
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rusqlite::StatementStatus;

    use super::super::super::api::{AttemptRecord, Store};
    use super::super::{SqliteOptions, SqliteStore};
    use super::*;

    /// A migrated store file, and the writer's own kind of connection to it.
    async fn writer_conn(dir: &tempfile::TempDir) -> Connection {
        let path = dir.path().join("gateway.db");
        let store = SqliteStore::open(&path, SqliteOptions::default())
            .await
            .unwrap();
        store.close().await;
        Connect {
            path,
            busy_timeout: Duration::from_secs(1),
        }
        .open()
        .unwrap()
    }

    fn delivery(key: &str) -> NewDelivery {
        NewDelivery {
            bot: "bot".into(),
            route: "route".into(),
            payload: r#"{"intent":"x"}"#.into(),
            request: StoredRequest {
                method: "POST".into(),
                url: "http://127.0.0.1:9/x".into(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: Some("{}".into()),
            },
            idempotency_key: Some(key.into()),
            fingerprint: Some("f".into()),
        }
    }

    fn run(conn: &mut Connection, ops: &[Op]) -> Vec<Result<Reply>> {
        run_batch(conn, ops, &AtomicU64::new(0)).unwrap()
    }

    /// SQLite builds a temporary b-tree for an `IN` list of more than two
    /// values (the `state` CHECK before migration 4), a sort the index does
    /// not give, or RETURNING: on every run of the statement. None of the
    /// statements each webhook runs may need one (their triggers included:
    /// EXPLAIN lists their programs too).
    #[tokio::test]
    async fn statements_of_every_webhook_build_no_temporary_btree() {
        let dir = tempfile::tempdir().unwrap();
        let conn = writer_conn(&dir).await;
        for sql in sql::ALL {
            let mut stmt = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
            let nulls = std::iter::repeat_n(rusqlite::types::Null, stmt.parameter_count());
            let ops: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(1))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            for op in ["OpenEphemeral", "SorterOpen", "OpenAutoindex"] {
                assert!(!ops.iter().any(|o| o == op), "{op} in {sql}");
            }
        }
        // the CHECK still refuses what it refused
        let bad = conn.execute(
            "INSERT INTO deliveries (id, bot, route, payload, method, url, headers, state, \
             next_attempt_at, created_at, updated_at) \
             VALUES ('x', 'b', 'r', '{}', 'POST', 'u', '[]', 'lost', 0, 0, 0)",
            [],
        );
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("CHECK constraint failed"),
            "a state outside the four is refused"
        );
    }

    fn try_record() -> AttemptRecord {
        AttemptRecord {
            at: SystemTime::UNIX_EPOCH,
            status: Some(503),
            latency: Duration::from_millis(1),
            error: Some("status 503".into()),
        }
    }

    /// `live_count`, and the live rows counted.
    fn live_counts(conn: &Connection) -> (i64, i64) {
        conn.query_row(
            "SELECT (SELECT live FROM live_count), (SELECT COUNT(*) FROM deliveries \
             WHERE state IN ('pending', 'leased'))",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    /// `live_count` (kept by the writer since migration 5) against the rows,
    /// after every batch of a pseudo-random run of every operation that moves
    /// deliveries between states: accepts alone and in groups (some refused
    /// whole by `--max-pending`, some duplicates), claims, the four settles,
    /// releases, replays, purges.
    #[tokio::test]
    async fn the_live_count_follows_every_operation() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = writer_conn(&dir).await;
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut leases: Vec<Lease> = Vec::new();
        let (mut refused, mut moved) = (0, 0);
        for round in 0..300i64 {
            let now = 1_000_000 + round * 10;
            let mut ops = Vec::new();
            for _ in 0..=next(4) {
                let key = format!("k{}", next(200)); // repeats: duplicates
                let max_pending = Some(next(3) * 10 + 5);
                ops.push(match next(9) {
                    0 | 1 => Op::Accept {
                        delivery: delivery(&key),
                        cutoff: Some(now - 50),
                        max_pending,
                        now,
                    },
                    2 => Op::AcceptAll {
                        deliveries: vec![delivery(&key), delivery(&format!("{key}-also"))],
                        cutoff: Some(now - 50),
                        max_pending,
                        now,
                    },
                    3 => Op::Claim {
                        owner: "w".into(),
                        now,
                        until: now + 15,
                        limit: next(5) as i64 + 1,
                    },
                    4 | 5 if !leases.is_empty() => {
                        let lease = leases.swap_remove(next(leases.len() as u64) as usize);
                        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(now as u64 + 5);
                        let outcome = match next(4) {
                            0 => Settle::Delivered(try_record()),
                            1 => Settle::RetryAt {
                                attempt: try_record(),
                                next_at: at,
                            },
                            2 => Settle::Dead {
                                attempt: Some(try_record()),
                                reason: None,
                            },
                            _ => Settle::Postpone { until: at },
                        };
                        Op::Settle {
                            lease,
                            outcome,
                            now,
                        }
                    }
                    6 => Op::Release {
                        owner: "w".into(),
                        now,
                    },
                    7 => Op::ReplayDead { now },
                    _ => Op::Purge {
                        before: now - 100,
                        limit: 3,
                    },
                });
            }
            for r in run(&mut conn, &ops) {
                match r {
                    Ok(Reply::Claimed(c)) => leases.extend(c.into_iter().map(|c| c.lease)),
                    Ok(Reply::Count(n)) => moved += n,
                    Err(StoreError::QueueFull { .. }) => refused += 1,
                    // a lease lost to a release or an expiry, claimed again
                    // (and the delivery since settled, perhaps purged)
                    Err(StoreError::LeaseLost { .. } | StoreError::NotFound { .. }) => {}
                    Ok(_) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            let (stored, counted) = live_counts(&conn);
            assert_eq!(stored, counted, "after round {round}");
        }
        // a group whose second delivery finds the queue full takes its first back
        let (_, counted) = live_counts(&conn);
        let r = run(
            &mut conn,
            &[Op::AcceptAll {
                deliveries: vec![delivery("edge-1"), delivery("edge-2")],
                cutoff: None,
                max_pending: Some(counted as u64 + 1),
                now: 9_000_000,
            }],
        );
        assert!(matches!(r[..], [Err(StoreError::QueueFull { .. })]));
        assert_eq!(live_counts(&conn), (counted, counted));
        assert!(
            refused > 0 && moved > 0,
            "the run reached the queue limit ({refused}) and moved rows ({moved})"
        );
    }

    /// A statement whose plan reads a bound parameter (a bare `LIMIT ?n`) is
    /// prepared again, parsed and planned, every time that parameter is bound.
    #[tokio::test]
    async fn accept_claim_and_settle_are_never_prepared_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = writer_conn(&dir).await;
        let now = 1_000_000;
        for (i, limit) in [1, 2, 3, 1].into_iter().enumerate() {
            let i = i as i64;
            let accepts: Vec<Op> = (0..limit)
                .map(|n| Op::Accept {
                    delivery: delivery(&format!("k{i}-{n}")),
                    cutoff: Some(now - 1),
                    max_pending: Some(1000),
                    now: now + i,
                })
                .collect();
            run(&mut conn, &accepts);
            let claimed = match run(
                &mut conn,
                &[Op::Claim {
                    owner: "w".into(),
                    now: now + i,
                    until: now + i + 30_000,
                    limit,
                }],
            )
            .pop()
            {
                Some(Ok(Reply::Claimed(c))) => c,
                other => panic!("{:?}", other.map(|r| r.map(|_| ()))),
            };
            assert_eq!(claimed.len(), limit as usize);
            let settles: Vec<Op> = claimed
                .into_iter()
                .map(|c| Op::Settle {
                    lease: c.lease,
                    outcome: Settle::Delivered(AttemptRecord {
                        at: SystemTime::UNIX_EPOCH,
                        status: Some(200),
                        latency: Duration::from_millis(3),
                        error: None,
                    }),
                    now: now + i,
                })
                .collect();
            for r in run(&mut conn, &settles) {
                r.unwrap();
            }
        }
        for sql in sql::ALL {
            let stmt = conn.prepare_cached(sql).unwrap();
            assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0, "{sql}");
        }
    }
}
