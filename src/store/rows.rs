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
        fingerprint: get(row, "route_fingerprint")?,
        render_again: get::<_, i64>(row, "render_again")? != 0,
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

/// Whether a schema-1 idempotency record (no route; selected with `state`
/// and `locked_until`) still decides a request's fate at `now`: answered, or
/// in progress under a live lease. A stale one is forgotten by the caller.
pub(crate) fn legacy_still_answers<'r, R>(row: &'r R, now: i64) -> Result<bool>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let err = || StoreError::db("read an idempotency record");
    let state: String = row.try_get("state").map_err(err())?;
    let locked_until: Option<i64> = row.try_get("locked_until").map_err(err())?;
    Ok(state == "done" || locked_until.is_some_and(|u| u > now))
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
}
