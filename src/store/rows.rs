//! Row mapping and SQL-side helpers shared by the two [`Store`] backends
//! (`sqlite.rs`, `postgres.rs`): times as stored milliseconds, new ids, the
//! column lists and the readers of delivery, summary, try, idempotency and
//! stats rows, and the [`SettlePlan`] a settle writes. Both backends store
//! the same columns with the same types, so one reader serves both.
//!
//! It never runs a query or opens a connection (each backend owns its SQL
//! and transactions), and never decides anything a backend must agree on
//! with the worker: it only maps values.
//!
//! [`Store`]: super::Store

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::api::{
    Attempt, AttemptRecord, Begin, Claimed, Delivery, DeliverySummary, Lease, Result, Settle,
    State, Stats, StoreError, StoredAnswer, StoredRequest,
};

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
         next_attempt_at, created_at, updated_at, lease_owner, leased_until, lease_seq, last_error, \
         route_fingerprint, render_again"
    };
}
pub(crate) use delivery_columns;

/// The columns of [`delivery_columns!`], in order (a test keeps the two equal).
pub(crate) const DELIVERY_COLUMNS: &[&str] = &[
    "id",
    "bot",
    "route",
    "payload",
    "method",
    "url",
    "headers",
    "body",
    "idempotency_key",
    "state",
    "attempts",
    "next_attempt_at",
    "created_at",
    "updated_at",
    "lease_owner",
    "leased_until",
    "lease_seq",
    "last_error",
    "route_fingerprint",
    "render_again",
];

/// Columns of [`DeliverySummary`].
macro_rules! summary_columns {
    () => {
        "id, bot, route, state, attempts, next_attempt_at, created_at, updated_at, last_error"
    };
}
pub(crate) use summary_columns;

/// The columns of one row by name, whatever the driver: sqlx rows (SQLite
/// reads, PostgreSQL) and rusqlite rows (the SQLite writer) read alike, so
/// one mapping serves every backend.
pub(crate) trait Cols {
    fn text(&self, col: &'static str) -> Result<String>;
    fn opt_text(&self, col: &'static str) -> Result<Option<String>>;
    fn int(&self, col: &'static str) -> Result<i64>;
    fn opt_int(&self, col: &'static str) -> Result<Option<i64>>;
    fn opt_blob(&self, col: &'static str) -> Result<Option<Vec<u8>>>;
}

macro_rules! sqlx_cols {
    ($row:ty) => {
        impl Cols for $row {
            fn text(&self, col: &'static str) -> Result<String> {
                sqlx::Row::try_get(self, col).map_err(StoreError::db("read a row"))
            }
            fn opt_text(&self, col: &'static str) -> Result<Option<String>> {
                sqlx::Row::try_get(self, col).map_err(StoreError::db("read a row"))
            }
            fn int(&self, col: &'static str) -> Result<i64> {
                sqlx::Row::try_get(self, col).map_err(StoreError::db("read a row"))
            }
            fn opt_int(&self, col: &'static str) -> Result<Option<i64>> {
                sqlx::Row::try_get(self, col).map_err(StoreError::db("read a row"))
            }
            fn opt_blob(&self, col: &'static str) -> Result<Option<Vec<u8>>> {
                sqlx::Row::try_get(self, col).map_err(StoreError::db("read a row"))
            }
        }
    };
}
sqlx_cols!(sqlx::sqlite::SqliteRow);
sqlx_cols!(sqlx::postgres::PgRow);

impl Cols for rusqlite::Row<'_> {
    fn text(&self, col: &'static str) -> Result<String> {
        self.get(col).map_err(StoreError::sqlite("read a row"))
    }
    fn opt_text(&self, col: &'static str) -> Result<Option<String>> {
        self.get(col).map_err(StoreError::sqlite("read a row"))
    }
    fn int(&self, col: &'static str) -> Result<i64> {
        self.get(col).map_err(StoreError::sqlite("read a row"))
    }
    fn opt_int(&self, col: &'static str) -> Result<Option<i64>> {
        self.get(col).map_err(StoreError::sqlite("read a row"))
    }
    fn opt_blob(&self, col: &'static str) -> Result<Option<Vec<u8>>> {
        self.get(col).map_err(StoreError::sqlite("read a row"))
    }
}

/// A rusqlite row of a statement that selects `columns`, in that order, read
/// by position. rusqlite finds a column by name by asking SQLite for each
/// column's name in turn and comparing it without case: for a claimed row of
/// 20 columns that was ~23k instructions per delivery (callgrind), more than
/// the claim's own statements.
pub(crate) struct ByPosition<'a, 'r> {
    row: &'a rusqlite::Row<'r>,
    columns: &'static [&'static str],
}

impl<'a, 'r> ByPosition<'a, 'r> {
    pub(crate) fn new(row: &'a rusqlite::Row<'r>, columns: &'static [&'static str]) -> Self {
        ByPosition { row, columns }
    }

    fn get<T: rusqlite::types::FromSql>(&self, col: &'static str) -> Result<T> {
        let read = StoreError::sqlite("read a row");
        let Some(i) = self.columns.iter().position(|c| *c == col) else {
            return Err(read(rusqlite::Error::InvalidColumnName(col.to_owned())));
        };
        debug_assert_eq!(
            self.row.as_ref().column_name(i).ok(),
            Some(col),
            "the statement selects these columns in this order"
        );
        self.row.get(i).map_err(read)
    }
}

impl Cols for ByPosition<'_, '_> {
    fn text(&self, col: &'static str) -> Result<String> {
        self.get(col)
    }
    fn opt_text(&self, col: &'static str) -> Result<Option<String>> {
        self.get(col)
    }
    fn int(&self, col: &'static str) -> Result<i64> {
        self.get(col)
    }
    fn opt_int(&self, col: &'static str) -> Result<Option<i64>> {
        self.get(col)
    }
    fn opt_blob(&self, col: &'static str) -> Result<Option<Vec<u8>>> {
        self.get(col)
    }
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
pub(crate) fn delivery_from_row(row: &impl Cols) -> Result<(Delivery, i64)> {
    let id = row.text("id")?;
    let headers = row.text("headers")?;
    let headers: Vec<(String, String)> =
        serde_json::from_str(&headers).map_err(|_| StoreError::Corrupt {
            id: id.clone(),
            what: "headers are not a JSON list of pairs",
        })?;
    let state = state_of(&id, &row.text("state")?)?;
    let attempts = count_of(&id, row.int("attempts")?)?;
    let seq = row.int("lease_seq")?;
    let d = Delivery {
        bot: row.text("bot")?,
        route: row.text("route")?,
        payload: row.text("payload")?,
        request: StoredRequest {
            method: row.text("method")?,
            url: row.text("url")?,
            headers,
            body: row.opt_text("body")?,
        },
        idempotency_key: row.opt_text("idempotency_key")?,
        state,
        attempts,
        next_attempt_at: from_ms(row.int("next_attempt_at")?),
        created_at: from_ms(row.int("created_at")?),
        updated_at: from_ms(row.int("updated_at")?),
        lease_owner: row.opt_text("lease_owner")?,
        leased_until: row.opt_int("leased_until")?.map(from_ms),
        last_error: row.opt_text("last_error")?,
        fingerprint: row.opt_text("route_fingerprint")?,
        render_again: row.int("render_again")? != 0,
        id,
    };
    Ok((d, seq))
}

/// A claimed row (selected with [`delivery_columns!`]) with its lease.
pub(crate) fn claimed_from_row(row: &impl Cols) -> Result<Claimed> {
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
pub(crate) fn summary_from_row(row: &impl Cols) -> Result<DeliverySummary> {
    let id = row.text("id")?;
    let state = row.text("state")?;
    Ok(DeliverySummary {
        state: state_of(&id, &state)?,
        attempts: count_of(&id, row.int("attempts")?)?,
        bot: row.text("bot")?,
        route: row.text("route")?,
        next_attempt_at: from_ms(row.int("next_attempt_at")?),
        created_at: from_ms(row.int("created_at")?),
        updated_at: from_ms(row.int("updated_at")?),
        last_error: row.opt_text("last_error")?,
        id,
    })
}

/// Reads an `attempts` row (`number, at, status, latency_ms, error`).
pub(crate) fn attempt_from_row(id: &str, row: &impl Cols) -> Result<Attempt> {
    let status = row.opt_int("status")?;
    Ok(Attempt {
        number: count_of(id, row.int("number")?)?,
        at: from_ms(row.int("at")?),
        status: status.and_then(|s| u16::try_from(s).ok()),
        latency: Duration::from_millis(row.int("latency_ms")?.max(0) as u64),
        error: row.opt_text("error")?,
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

/// Why a write about a claimed delivery was refused: its lease is no longer
/// the current claim (`exists`), or the delivery is gone.
pub(crate) fn lease_refusal(lease: &Lease, exists: bool) -> StoreError {
    let id = lease.id.clone();
    if exists {
        StoreError::LeaseLost { id }
    } else {
        StoreError::NotFound { id }
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

pub(crate) fn begin_from_row(row: &impl Cols) -> Result<Begin> {
    if row.text("state")? != "done" {
        return Ok(Begin::InProgress);
    }
    let status = row.opt_int("status")?;
    let body = row.opt_blob("body")?;
    Ok(Begin::Done(StoredAnswer {
        status: status.and_then(|s| u16::try_from(s).ok()).unwrap_or(200),
        body: body.unwrap_or_default(),
    }))
}

/// Whether a schema-1 idempotency record (no route; selected with `state`
/// and `locked_until`) still decides a request's fate at `now`: answered, or
/// in progress under a live lease. A stale one is forgotten by the caller.
pub(crate) fn legacy_still_answers(row: &impl Cols, now: i64) -> Result<bool> {
    let state = row.text("state")?;
    let locked_until = row.opt_int("locked_until")?;
    Ok(state == "done" || locked_until.is_some_and(|u| u > now))
}

pub(crate) const STATS_SQL: &str = "SELECT \
    (SELECT COUNT(*) FROM deliveries WHERE state = 'pending') AS pending, \
    (SELECT COUNT(*) FROM deliveries WHERE state = 'leased') AS leased, \
    (SELECT COUNT(*) FROM deliveries WHERE state = 'dead') AS dead, \
    (SELECT MIN(created_at) FROM deliveries WHERE state = 'pending') AS oldest_pending, \
    (SELECT MIN(created_at) FROM deliveries WHERE state = 'leased') AS oldest_leased";

pub(crate) fn stats_from_row(row: &impl Cols, now: SystemTime) -> Result<Stats> {
    let oldest = match (
        row.opt_int("oldest_pending")?,
        row.opt_int("oldest_leased")?,
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(Stats {
        pending: row.int("pending")?.max(0) as u64,
        leased: row.int("leased")?.max(0) as u64,
        dead: row.int("dead")?.max(0) as u64,
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
    fn the_delivery_column_list_is_the_selected_one() {
        assert_eq!(DELIVERY_COLUMNS.join(", "), delivery_columns!());
    }

    /// By position, as by name: every column, and a name the list lacks is an error.
    #[test]
    fn a_row_reads_the_same_by_position_as_by_name() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let mut stmt = conn
            .prepare("SELECT 'text' AS t, 7 AS i, NULL AS n, x'0102' AS b")
            .unwrap();
        let mut rows = stmt.query([]).unwrap();
        let row = rows.next().unwrap().unwrap();
        const COLS: &[&str] = &["t", "i", "n", "b"];
        let by_pos = ByPosition::new(row, COLS);
        assert_eq!(by_pos.text("t").unwrap(), row.text("t").unwrap());
        assert_eq!(by_pos.int("i").unwrap(), 7);
        assert_eq!(by_pos.opt_int("n").unwrap(), None);
        assert_eq!(by_pos.opt_text("n").unwrap(), row.opt_text("n").unwrap());
        assert_eq!(by_pos.opt_blob("b").unwrap(), Some(vec![1, 2]));
        assert!(by_pos.text("missing").is_err());
        assert!(
            by_pos.int("t").is_err(),
            "a type mismatch is an error, as by name"
        );
    }
}
