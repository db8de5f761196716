//! The delivery worker: claims due deliveries from the store with a lease,
//! makes one try each through the same downstream code, breaker and retry
//! policy as sync calls ([`client::attempt`]), and settles the result:
//! delivered; tried again on the route's async `schedule`; postponed without
//! using a try while the route is open or paused; or dead after the last try.
//!
//! Never sends a delivery without a live lease, and returns its leased work to
//! the store when stopped. Leases are not renewed: a try is cut short so that
//! it ends within its lease (see [`try_budget`]), so no other instance can
//! claim a delivery while this one is still sending it. Should a settle come
//! too late all the same (the process stalled, or clocks differ by more than
//! the margin), the store refuses it as `LeaseLost` and the delivery is tried
//! again by whoever claimed it: at least once, with the same idempotency key.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use handlebars::Context;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::model::{Downstream, Route, origin_of};
use crate::config::render::{IDEMPOTENCY_KEY, OutboundRequest, header_value};
use crate::downstream::retry::TryOutcome;
use crate::runtime::Gateway;
use crate::runtime::client::{self, Attempt};
use crate::store::{AttemptRecord, Claimed, Delivery, Settle, StoredRequest};
use crate::template::RenderMeta;

/// How the worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// This instance's name in leases.
    pub owner: String,
    /// Most deliveries claimed (and tried concurrently) at once.
    pub batch: u32,
    /// How long a claim is exclusive; an instance that dies holding it loses it
    /// after this. A try is cut short to end [`lease_margin`] before its lease does.
    pub lease: Duration,
    /// How often to look for due deliveries when nothing wakes the worker.
    pub poll: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            owner: format!("gw-{}", uuid::Uuid::now_v7()),
            batch: 64,
            lease: crate::store::DEFAULT_LEASE,
            poll: Duration::from_millis(500),
        }
    }
}

/// A running worker.
pub struct WorkerHandle {
    stop: watch::Sender<Run>,
    task: tokio::task::JoinHandle<()>,
}

/// What the worker is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Going,
    /// Stop claiming; tries under way may finish until `by` (`None`: however long they take).
    Stop {
        by: Option<Instant>,
    },
}

impl WorkerHandle {
    /// Stops claiming, finishes the tries under way, returns leased work to the store.
    pub async fn stop(self) {
        let _ = self.stop.send(Run::Stop { by: None });
        let _ = self.task.await;
    }

    /// Stops claiming and lets the tries under way finish until `by`; those
    /// still in flight then are abandoned (their connections dropped, no try
    /// recorded), and every delivery this worker leased goes back to pending,
    /// due as it was, to be sent again (by this store's next worker). Resolves
    /// once that release is written (or failed: the leases then expire).
    pub async fn stop_by(self, by: Instant) {
        let _ = self.stop.send(Run::Stop { by: Some(by) });
        let _ = self.task.await;
    }
}

/// The owner name of the one worker of an embedded (SQLite) store.
pub const LOCAL_OWNER: &str = "local";

/// Starts the worker of `gw`.
///
/// With the embedded SQLite store only one process ever works on the file, so the
/// worker takes the fixed owner [`LOCAL_OWNER`] and first returns whatever that owner
/// still holds: the leases of a predecessor that was killed. With PostgreSQL, owners
/// are per instance and a dead instance's leases expire instead.
pub fn spawn(gw: Arc<Gateway>, mut opts: WorkerOptions) -> WorkerHandle {
    let (stop, mut stopped) = watch::channel(Run::Going);
    if gw.store.backend() == "sqlite" {
        opts.owner = LOCAL_OWNER.to_owned();
    }
    let task = tokio::spawn(async move {
        if opts.owner == LOCAL_OWNER {
            match gw.store.release_owner(LOCAL_OWNER, SystemTime::now()).await {
                Ok(n) if n > 0 => {
                    tracing::info!(released = n, "took back deliveries leased before a crash")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "delivery store: release at start failed"),
            }
        }
        let mut next_purge = tokio::time::Instant::now();
        // Up to `batch` tries in flight; more are claimed as slots free up (a
        // quarter of the batch at least, so a fast drain is not one claim per
        // delivery), so one hanging downstream never holds up the rest.
        let refill = (opts.batch / 4).max(1) as usize;
        let margin = lease_margin(opts.lease);
        let mut tries = tokio::task::JoinSet::new();
        let by = loop {
            if let Run::Stop { by } = *stopped.borrow() {
                break by;
            }
            if tokio::time::Instant::now() >= next_purge {
                next_purge += PURGE_EVERY;
                purge(&gw).await;
            }
            let free = opts.batch as usize - tries.len();
            let mut got = 0;
            if free >= refill.min(opts.batch as usize) || tries.is_empty() {
                match gw
                    .store
                    .claim_due(&opts.owner, SystemTime::now(), free as u32, opts.lease)
                    .await
                {
                    Ok(claimed) => {
                        got = claimed.len();
                        for c in claimed {
                            let gw = gw.clone();
                            tries.spawn(async move { deliver(&gw, c, margin).await });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "delivery store: claim failed"),
                }
                if got == free {
                    continue; // a full claim: more may be due
                }
            }
            let slots_left = tries.len() < opts.batch as usize;
            tokio::select! {
                Some(_) = tries.join_next(), if !tries.is_empty() => {
                    while tries.try_join_next().is_some() {}
                }
                _ = gw.delivery_wake.notified(), if slots_left => {}
                _ = tokio::time::sleep(opts.poll), if slots_left => {}
                _ = stopped.changed() => {}
            }
        };
        let drain = async { while tries.join_next().await.is_some() {} };
        let drained = match by {
            Some(by) => tokio::time::timeout_at(by, drain).await.is_ok(),
            None => {
                drain.await;
                true
            }
        };
        if !drained {
            let abandoned = tries.len();
            tries.abort_all();
            while tries.join_next().await.is_some() {}
            tracing::warn!(
                abandoned,
                "delivery tries still under way at the end of the shutdown grace were abandoned; \
                 their deliveries go back to pending and are sent again after a restart"
            );
        }
        match gw.store.release_owner(&opts.owner, SystemTime::now()).await {
            Ok(n) if n > 0 => {
                tracing::info!(released = n, "returned leased deliveries to the store")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "delivery store: release failed (leases expire on their own)")
            }
        }
    });
    WorkerHandle { stop, task }
}

/// How often the worker removes what the dedupe window no longer needs.
pub const PURGE_EVERY: Duration = Duration::from_secs(600);

/// Housekeeping: delivered deliveries and idempotency records older than the
/// dedupe window go, and dead letters that died longer than `--dead-retention`
/// ago (in bounded batches, so the store is never locked for long). With
/// several instances each purges; the deletes are idempotent.
async fn purge(gw: &Gateway) {
    let now = SystemTime::now();
    let limits = &gw.shared.limits;
    if let Some(before) = now.checked_sub(limits.dedupe_window) {
        let removed = purge_batches(|| gw.store.purge(before, PURGE_BATCH)).await;
        if removed > 0 {
            tracing::info!(
                removed,
                "purged deliveries and idempotency records past the dedupe window"
            );
        }
    }
    if let Some(before) = now.checked_sub(limits.dead_retention) {
        let removed = purge_batches(|| gw.store.purge_dead(before, PURGE_BATCH)).await;
        if removed > 0 {
            tracing::info!(
                removed,
                "purged dead letters past the dead-letter retention"
            );
        }
    }
}

const PURGE_BATCH: u32 = 1000;

/// Runs one purge in batches until a batch comes back short; how many rows went.
async fn purge_batches<'a>(
    mut batch: impl FnMut() -> crate::store::BoxFuture<'a, crate::store::Result<u64>>,
) -> u64 {
    let mut total = 0;
    loop {
        match batch().await {
            Ok(n) => {
                total += n;
                if n < u64::from(PURGE_BATCH) {
                    return total;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "delivery store: purge failed");
                return total;
            }
        }
    }
}

/// What a try leaves unused at the end of its lease: time for the settle to
/// commit, and for clock differences between instances (PostgreSQL).
pub fn lease_margin(lease: Duration) -> Duration {
    lease / 10
}

/// How long a try that starts at `now` may take: what is left of its lease
/// less `margin`. Zero when the lease is (nearly) over already.
pub fn try_budget(until: SystemTime, now: SystemTime, margin: Duration) -> Duration {
    until
        .duration_since(now)
        .unwrap_or_default()
        .saturating_sub(margin)
}

/// Logs a warning for each route that uses the worker (`mode: async` or
/// `on_failure: queue`) and whose downstream timeout does not fit in what
/// `lease` leaves a try: its async tries will be cut short.
pub fn warn_about_short_lease(config: &crate::config::model::Config, lease: Duration) {
    let budget = lease.saturating_sub(lease_margin(lease));
    for route in config.routes.values() {
        let queued = route.mode == crate::config::model::Mode::Async
            || route.on_failure == crate::config::model::OnFailure::Queue;
        if queued && route.downstream.timeout > budget {
            tracing::warn!(
                route = %route.name,
                timeout = ?route.downstream.timeout,
                lease = ?lease,
                "the route's timeout is longer than a lease leaves a try; async tries are cut at {budget:?} (raise --lease)"
            );
        }
    }
}

/// Longest wait for a slot under the route's `max_in_flight` before a delivery
/// goes back to pending (and how long it then waits).
const BULKHEAD_WAIT: Duration = Duration::from_secs(1);

/// One try of one claimed delivery, and its settlement.
async fn deliver(gw: &Gateway, claimed: Claimed, margin: Duration) {
    let Claimed { delivery: d, lease } = claimed;
    let lease_until = lease.until;
    let rt = gw.runtime.load_full();
    let now = SystemTime::now();
    let lease = &lease;
    let settle = |outcome: Settle| async move {
        if let Err(e) = gw.store.settle(lease, outcome, SystemTime::now()).await {
            tracing::warn!(delivery = %lease.id, error = %e, "delivery store: settle refused");
        }
    };
    // SPEC §7.3: a stored delivery goes only to the origin, with the auth, of
    // the route it was accepted for; a replay renders it again (`render_again`).
    let Some(state) = rt.routes.get(&d.route) else {
        tracing::warn!(delivery = %d.id, route = %d.route, "route removed; the delivery is a dead letter");
        return settle(Settle::Dead {
            attempt: None,
            reason: Some(ROUTE_REMOVED.to_owned()),
        })
        .await;
    };
    let route = &state.route;
    let fingerprint = route.downstream.fingerprint();
    let stored = if d.render_again {
        match render_again(route, &d) {
            Ok(stored) => {
                // kept before it is sent: every later try sends the same request
                let set = gw
                    .store
                    .set_request(
                        lease,
                        stored.clone(),
                        fingerprint.to_owned(),
                        SystemTime::now(),
                    )
                    .await;
                if let Err(e) = set {
                    // not sent; the lease runs out and the delivery is claimed again
                    tracing::warn!(delivery = %d.id, error = %e, "delivery store: keeping a replayed request failed");
                    return;
                }
                stored
            }
            Err(reason) => {
                tracing::warn!(delivery = %d.id, route = %d.route, %reason, "a replayed delivery does not render; it is a dead letter");
                return settle(Settle::Dead {
                    attempt: None,
                    reason: Some(reason),
                })
                .await;
            }
        }
    } else if !still_pinned(&d, &route.downstream, fingerprint) {
        tracing::warn!(delivery = %d.id, route = %d.route, "the route's origin or auth changed; the delivery is a dead letter (replay renders it for the route as it is now)");
        return settle(Settle::Dead {
            attempt: None,
            reason: Some(ROUTE_CHANGED.to_owned()),
        })
        .await;
    } else {
        d.request.clone()
    };
    // SPEC §7.3: every try carries `Idempotency-Key`: the rendered key, else the delivery id.
    let key = d.idempotency_key.clone().unwrap_or_else(|| d.id.clone());
    let req = match rebuild(route, &stored, &d.payload, &d.bot, key) {
        Ok(r) => r,
        Err(reason) => {
            return settle(Settle::Dead {
                attempt: None,
                reason: Some(reason),
            })
            .await;
        }
    };
    let budget = try_budget(lease_until, SystemTime::now(), margin);
    if budget.is_zero() {
        // Claimed too long ago (the process stalled): sending now could overlap
        // a takeover. Back to pending at once, no try used.
        return settle(Settle::Postpone { until: now }).await;
    }
    // The route's `max_in_flight` holds for queued work too (sync calls share
    // it): wait a while for a slot, within the lease; else back to pending, no try used.
    let wait = (budget / 2).min(BULKHEAD_WAIT);
    let Ok(Ok(_permit)) = tokio::time::timeout(wait, state.bulkhead.clone().acquire_owned()).await
    else {
        return settle(Settle::Postpone {
            until: SystemTime::now() + BULKHEAD_WAIT,
        })
        .await;
    };
    let budget = try_budget(lease_until, SystemTime::now(), margin);
    let body = req.body.clone().map(Bytes::from);
    // The per-try timeout, capped by the budget. A hard stop half a margin
    // later also bounds a token refresh after a 401 (it has no timeout of its
    // own); it comes after the per-try timeout, so a slow answer ends as that
    // (a timeout the breaker counts), not as a cancelled call.
    let timeout = route.downstream.timeout.min(budget);
    let attempt = tokio::time::timeout(
        budget + margin / 2,
        client::attempt(&gw.shared, state, &req, body, timeout),
    )
    .await
    .unwrap_or(Attempt::OutOfTime);
    let (outcome, record) = match attempt {
        Attempt::Blocked { retry_after, why } => {
            tracing::debug!(delivery = %d.id, route = %d.route, why, "route not taking calls; delivery waits");
            // A health probe or an admin reset can end the open period early: look again
            // at least every probe interval (or 30 s) rather than only when it was due to end.
            let cap = route
                .health
                .as_ref()
                .map_or(Duration::from_secs(30), |h| h.interval)
                .min(Duration::from_secs(30));
            return settle(Settle::Postpone {
                until: now + retry_after.min(cap),
            })
            .await;
        }
        Attempt::Token(e) => (
            TryOutcome::ConnectError,
            AttemptRecord {
                at: now,
                status: None,
                latency: Duration::ZERO,
                error: Some(e.to_string()),
            },
        ),
        Attempt::OutOfTime => (
            TryOutcome::Timeout,
            AttemptRecord {
                at: now,
                status: None,
                latency: timeout,
                error: Some("timeout (token)".into()),
            },
        ),
        Attempt::Tried(t) => {
            let status = t.answer.as_ref().map(|a| a.status);
            let error = (!matches!(t.outcome, TryOutcome::Success)).then(|| t.reason.to_string());
            (
                t.outcome,
                AttemptRecord {
                    at: now,
                    status,
                    latency: t.latency,
                    error,
                },
            )
        }
    };
    if route.also_of.is_some() {
        // An `also` target answers no bot: its status-page counts are its tries
        // (a failed one counts as an error, whatever the status).
        let success = matches!(outcome, TryOutcome::Success);
        let status = match record.status {
            Some(s) if success || s >= 500 => s,
            _ if success => 200,
            _ => 502,
        };
        let kind = record.error.as_deref().unwrap_or("delivered");
        state.stats.record(status, kind);
    }
    if matches!(outcome, TryOutcome::Success) {
        return settle(Settle::Delivered(record)).await;
    }
    // every try carries an idempotency key (the rendered one, else the delivery id)
    match route.retry.next_async(d.attempts + 1, &outcome, true) {
        Some(wait) => {
            settle(Settle::RetryAt {
                attempt: record,
                next_at: SystemTime::now() + wait,
            })
            .await
        }
        None => {
            tracing::warn!(delivery = %d.id, route = %d.route, tries = d.attempts + 1, "delivery is dead");
            settle(Settle::Dead {
                attempt: Some(record),
                reason: None,
            })
            .await
        }
    }
}

/// The dead-letter reason of a delivery whose route is no longer configured.
pub const ROUTE_REMOVED: &str = "route_removed";

/// The dead-letter reason of a delivery whose route now has another origin or auth.
pub const ROUTE_CHANGED: &str = "route_changed";

/// Whether a stored delivery may still be sent on `downstream`: the route's
/// fingerprint (origin and auth identity) is the one stored at acceptance.
/// A delivery accepted before fingerprints were stored (schema version 2 or
/// older) has only its URL to go by: its origin must be the route's.
fn still_pinned(d: &Delivery, downstream: &Downstream, fingerprint: &str) -> bool {
    match &d.fingerprint {
        Some(stored) => stored == fingerprint,
        None => {
            let stored = url::Url::parse(&d.request.url).ok();
            match (&downstream.base, stored) {
                (Some(base), Some(url)) => origin_of(base) == origin_of(&url),
                (None, _) => d.request.url.starts_with(&downstream.origin),
                (_, None) => false,
            }
        }
    }
}

/// A replayed delivery's request, rendered again from its payload against
/// `route` as it is now (new URL, headers, body). It keeps the delivery's
/// idempotency key: the route's key is not rendered again, and [`rebuild`]
/// adds the delivery's own as `Idempotency-Key` at send time (unless the route
/// sets the header itself). Inbound headers are not stored: `{{header …}}`
/// renders empty.
fn render_again(route: &Route, d: &Delivery) -> Result<StoredRequest, String> {
    let payload: serde_json::Value =
        serde_json::from_str(&d.payload).map_err(|_| "stored payload is not JSON".to_string())?;
    let ctx = Context::from(payload);
    let meta = RenderMeta::new(&d.bot, &route.name);
    let req = crate::config::render::build_replayed(route, &ctx, &meta)
        .map_err(|e| format!("render_failed: {e}"))?;
    Ok(if route.secret_parts {
        StoredRequest::from_outbound_masked(&req, &crate::telemetry::log_redact::remembered())
    } else {
        StoredRequest::from_outbound(&req)
    })
}

/// The request to send for a stored delivery: what was rendered at acceptance
/// (same URL, body and idempotency key on every try), plus the headers whose
/// values come from the environment, which are never stored and are rendered
/// again from the current route. It carries `Idempotency-Key`: the stored
/// header (the rendered key, or the route's own header), else `idempotency_key`
/// (the caller passes the delivery's key, else its id).
pub fn rebuild(
    route: &Route,
    stored: &StoredRequest,
    payload: &str,
    bot: &str,
    idempotency_key: String,
) -> Result<OutboundRequest, String> {
    let method = http::Method::from_bytes(stored.method.as_bytes())
        .map_err(|_| "stored method is invalid".to_string())?;
    // A route whose URL or body holds a `${VAR}` value stored them masked:
    // render them again now, in memory only (SPEC §7.4). The fingerprint check
    // before this made sure the route keeps the origin and auth it had.
    let again = if route.secret_parts {
        let value: serde_json::Value =
            serde_json::from_str(payload).map_err(|_| "stored payload is not JSON".to_string())?;
        let meta = RenderMeta::new(bot, &route.name);
        let req = crate::config::render::build_replayed(route, &Context::from(value), &meta)
            .map_err(|e| format!("render_failed: {e}"))?;
        Some((req.url, req.target, req.body))
    } else {
        None
    };
    let (url, target, body) = match again {
        Some(parts) => parts,
        None => (
            stored.url.clone(),
            crate::config::render::parse_stored(&route.downstream, &stored.url)
                .map_err(|_| "stored URL is invalid".to_string())?,
            stored.body.clone(),
        ),
    };
    let mut headers = Vec::with_capacity(stored.headers.len() + 2);
    for (k, v) in &stored.headers {
        let name = http::HeaderName::try_from(k.as_str())
            .map_err(|_| "stored header name is invalid".to_string())?;
        headers.push((name, header_value(v)?, false));
    }
    let secret: Vec<_> = route
        .downstream
        .headers
        .iter()
        .filter(|h| h.secret)
        .collect();
    if !secret.is_empty() {
        let value: serde_json::Value =
            serde_json::from_str(payload).map_err(|_| "stored payload is not JSON".to_string())?;
        let ctx = Context::from(value);
        let meta = RenderMeta::new(bot, &route.name);
        for h in secret {
            let v = h.value.render(&ctx, &meta)?;
            headers.retain(|(n, _, _)| *n != h.name);
            headers.push((h.name.clone(), header_value(&v)?, true));
        }
    }
    if !headers.iter().any(|(n, _, _)| *n == IDEMPOTENCY_KEY) {
        headers.push((IDEMPOTENCY_KEY, header_value(&idempotency_key)?, false));
    }
    Ok(OutboundRequest {
        method,
        url,
        target,
        headers,
        body,
        idempotency_key: Some(idempotency_key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_try_ends_a_tenth_of_the_lease_before_the_lease() {
        let lease = Duration::from_secs(10);
        let margin = lease_margin(lease);
        assert_eq!(margin, Duration::from_secs(1));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let until = t0 + lease;
        assert_eq!(try_budget(until, t0, margin), Duration::from_secs(9));
        assert_eq!(
            try_budget(until, t0 + Duration::from_secs(4), margin),
            Duration::from_secs(5)
        );
        // nearly over, over, and long over: nothing left to try with
        assert_eq!(
            try_budget(until, t0 + Duration::from_millis(9_500), margin),
            Duration::ZERO
        );
        assert_eq!(try_budget(until, until, margin), Duration::ZERO);
        assert_eq!(try_budget(until, until + lease, margin), Duration::ZERO);
    }
}
