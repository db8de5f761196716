//! Calling a route's downstream with everything SPEC §5 step 10, §6 and §7.3
//! ask: [`attempt`] makes one try (the route's 429 pause and breaker permit,
//! an OAuth2 token with at most one forced refresh after a 401, the send with
//! its timeout, classification, breaker outcome, metrics), all of it within
//! the try's timeout; [`call`] is the sync try loop within a deadline; the
//! async delivery worker calls [`attempt`] once per claimed delivery.
//!
//! Decisions about *whether* and *when* to retry are the pure
//! [`RetryPolicy`](crate::downstream::retry::RetryPolicy)'s; what an answer counts as is
//! the pure [`classify`]'s; the breaker is [`crate::breaker`]'s. This module
//! only orchestrates. Never logs payload values or credentials.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, header};
use tokio::time::Instant;

use crate::breaker::Rejected;
use crate::config::model::OutboundAuth;
use crate::config::render::{IDEMPOTENCY_KEY, OutboundRequest};
use crate::downstream::classify::{Class, Sent, classify};
use crate::downstream::oauth2::{AccessToken, TokenError};
use crate::downstream::retry::{
    Decision, GiveUpReason, RATE_LIMIT_PAUSE, TryOutcome, parse_retry_after,
};
use crate::runtime::{RouteState, Shared};
use crate::telemetry::events;

/// A downstream answer, its body capped.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How a sync call ended.
#[derive(Debug)]
pub enum CallResult {
    /// A status in the route's `success` set.
    Delivered { answer: Answer, tries: u32 },
    /// A non-success answer that retrying will not fix (e.g. 400, 404, 422): passed to the bot.
    Refused { answer: Answer, tries: u32 },
    /// The last try failed (connect error, its own timeout, 5xx, a broken connection).
    Failed {
        status: Option<u16>,
        reason: &'static str,
        tries: u32,
        /// The last try's outcome is one the retry rule would try again
        /// (SPEC §7.3): what `on_failure: queue` asks.
        retryable: bool,
    },
    /// The deadline ran out before an answer.
    DeadlineExceeded { tries: u32 },
    /// The route would not be called: open, paused by a 429, or half-open with no probe slot.
    Unavailable {
        retry_after: Duration,
        why: &'static str,
    },
    /// The OAuth2 token endpoint failed.
    Token { error: TokenError, tries: u32 },
}

/// What one [`attempt`] did.
#[derive(Debug)]
pub enum Attempt {
    /// Not tried: the route is open, paused by a 429, or half-open with every probe slot taken.
    Blocked {
        retry_after: Duration,
        why: &'static str,
    },
    /// Not tried, or a 401 whose token refresh failed: the OAuth2 token endpoint failed.
    Token(TokenError),
    /// Getting a token (or refreshing it after a 401) used up the try's time.
    OutOfTime,
    /// One try (a forced token refresh after a 401 and its resend count as one).
    Tried(Tried),
}

/// One try's result.
#[derive(Debug)]
pub struct Tried {
    /// For the retry policy.
    pub outcome: TryOutcome,
    /// Another try is allowed by SPEC §7.3's rule (the request's idempotency key counted).
    pub retryable: bool,
    /// The downstream's answer, when there was one.
    pub answer: Option<Answer>,
    /// `success`, `status`, `rate_limited`, `connect`, `timeout` or `broken`.
    pub reason: &'static str,
    pub latency: Duration,
}

/// What one send produced.
enum Try {
    Answer(Answer),
    ConnectError,
    Timeout,
    /// The request may have reached the downstream but failed (reset, unreadable body).
    Broken,
}

/// Whether `req` carries an `Idempotency-Key` (the rendered key, a header the
/// route sets, or a stored delivery's id): then a 500 or a dropped connection
/// may be tried again (SPEC §7.3).
pub fn is_idempotent(req: &OutboundRequest) -> bool {
    req.headers
        .iter()
        .any(|(name, _, _)| *name == IDEMPOTENCY_KEY)
}

/// Makes one try of `req` on the route of `state`, all of it (token, the send,
/// a refresh after a 401 and its resend) within `timeout`.
pub async fn attempt(
    shared: &Shared,
    state: &RouteState,
    req: &OutboundRequest,
    body: Option<Bytes>,
    timeout: Duration,
) -> Attempt {
    let route = &state.route;
    let now = Instant::now();
    if let Some(until) = state.paused_until(now) {
        events::rejected(&shared.metrics, &route.name, "paused");
        return Attempt::Blocked {
            retry_after: until - now,
            why: "paused",
        };
    }
    // The downstream's outbound rate limit (SPEC §9): no token, no try. The
    // caller decides: a sync call waits while its deadline allows, the worker
    // postpones the delivery without using a try.
    if let Some(bucket) = &state.outbound
        && let Err(wait) = bucket.try_take(now)
    {
        return Attempt::Blocked {
            retry_after: wait,
            why: "rate_limited",
        };
    }
    let permit = match state.breaker.try_acquire(now) {
        Ok(p) => {
            if let Some(t) = p.transition() {
                events::breaker_transition(&shared.metrics, &route.name, &t);
            }
            p
        }
        Err(rejected) => {
            let (retry_after, why) = match rejected {
                Rejected::Open { until } => (until.saturating_duration_since(now), "open"),
                Rejected::ProbesBusy { .. } => (Duration::from_secs(1), "half_open"),
            };
            events::rejected(&shared.metrics, &route.name, why);
            return Attempt::Blocked { retry_after, why };
        }
    };
    let Some(client) = shared.client_for(route.downstream.tls.as_deref()) else {
        // its TLS settings could not be built: never sent without them
        permit.cancel();
        return Attempt::Token(TokenError::Transport("tls"));
    };
    let started = Instant::now();
    let mut token = match &route.downstream.auth {
        OutboundAuth::OAuth2(creds) => {
            match tokio::time::timeout(timeout, shared.tokens.token_via(creds, &client)).await {
                Ok(Ok(t)) => Some(t),
                Ok(Err(e)) => {
                    permit.cancel();
                    return Attempt::Token(e);
                }
                Err(_) => {
                    permit.cancel();
                    return Attempt::OutOfTime;
                }
            }
        }
        _ => None,
    };
    let mut result = send(
        shared,
        &client,
        timeout.saturating_sub(started.elapsed()),
        req,
        body.clone(),
        token.as_ref(),
        &route.downstream.auth,
    )
    .await;
    // At most one forced token refresh after a 401, then one resend (never a
    // loop); none when the token is too young for a refresh to help (the 401
    // is the answer). The refresh is bounded by what is left of the try.
    if let (Try::Answer(a), Some(t), OutboundAuth::OAuth2(creds)) =
        (&result, &token, &route.downstream.auth)
        && a.status == 401
    {
        let left = timeout.saturating_sub(started.elapsed());
        let refreshed = tokio::time::timeout(
            left,
            shared
                .tokens
                .refresh_after_unauthorized_via(creds, t, &client),
        )
        .await;
        match refreshed {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(fresh))) => {
                token = Some(fresh);
                let left = timeout.saturating_sub(started.elapsed());
                result = send(
                    shared,
                    &client,
                    left,
                    req,
                    body,
                    token.as_ref(),
                    &route.downstream.auth,
                )
                .await;
            }
            Ok(Err(e)) => {
                permit.cancel();
                return Attempt::Token(e);
            }
            Err(_) => {
                permit.cancel();
                return Attempt::OutOfTime;
            }
        }
    }
    let latency = started.elapsed();
    let (sent, answer) = match result {
        Try::Answer(a) => {
            let retry_after = a
                .headers
                .get(header::RETRY_AFTER)
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            let sent = Sent::Answer {
                status: a.status,
                retry_after,
            };
            (sent, Some(a))
        }
        Try::ConnectError => (Sent::ConnectError, None),
        Try::Timeout => (Sent::Timeout, None),
        Try::Broken => (Sent::Broken, None),
    };
    let class = classify(
        sent,
        &route.downstream.success,
        route.retry.retry_after_max,
        is_idempotent(req),
    );
    if let Some(pause) = class.pause {
        state.pause(Instant::now() + pause);
    }
    let Class {
        outcome,
        retryable,
        reason,
        breaker,
        label,
        ..
    } = class;
    match breaker {
        Some(o) => {
            if let Some(t) = permit.record(o, latency, Instant::now()) {
                events::breaker_transition(&shared.metrics, &route.name, &t);
            }
        }
        None => permit.cancel(),
    }
    if shared.metrics.enabled {
        state
            .metrics(&shared.metrics)
            .try_outcome(label, latency.as_secs_f64());
        state.latency.downstream.record(latency, Instant::now());
    }
    Attempt::Tried(Tried {
        outcome,
        retryable,
        answer,
        reason,
        latency,
    })
}

/// Calls the route's downstream for `req`: tries within `deadline_at` (the sync path).
///
/// A 429 pauses the route (its `Retry-After`, else 1 s): the call waits the
/// pause out and tries again when the pause ends before the deadline and a
/// try is left; otherwise it answers as a paused route (SPEC §5 step 9), never
/// as a failed call (SPEC §7.3).
pub async fn call(
    shared: &Shared,
    state: &RouteState,
    req: &OutboundRequest,
    deadline_at: Instant,
) -> CallResult {
    let route = &state.route;
    let body = req.body.as_ref().map(|b| Bytes::from(b.clone()));
    let idempotent = is_idempotent(req);
    let mut tries = 0u32;
    // The last try's status, reason and retryability, once a try was made.
    let mut last: Option<(Option<u16>, &'static str, bool)> = None;
    loop {
        let remaining = deadline_at.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return CallResult::DeadlineExceeded { tries };
        }
        let cut_by_deadline = remaining < route.downstream.timeout;
        let timeout = remaining.min(route.downstream.timeout);
        let tried = match attempt(shared, state, req, body.clone(), timeout).await {
            Attempt::Blocked {
                retry_after,
                why: "rate_limited",
            } => {
                // Wait for a token while the deadline allows (no try is used).
                if retry_after < deadline_at.saturating_duration_since(Instant::now()) {
                    events::rate_limit_wait(&shared.metrics, &route.name);
                    tokio::time::sleep(retry_after).await;
                    continue;
                }
                events::rejected(&shared.metrics, &route.name, "rate_limited");
                return match last {
                    Some((status, reason, retryable)) if status != Some(429) => {
                        CallResult::Failed {
                            status,
                            reason,
                            tries,
                            retryable,
                        }
                    }
                    _ => CallResult::Unavailable {
                        retry_after,
                        why: "rate_limited",
                    },
                };
            }
            Attempt::Blocked { retry_after, why } => {
                return match last {
                    // the route stopped taking calls between our tries: the last try's answer
                    Some((status, reason, retryable)) if status != Some(429) => {
                        CallResult::Failed {
                            status,
                            reason,
                            tries,
                            retryable,
                        }
                    }
                    _ => CallResult::Unavailable { retry_after, why },
                };
            }
            Attempt::Token(error) => return CallResult::Token { error, tries },
            Attempt::OutOfTime if cut_by_deadline => return CallResult::DeadlineExceeded { tries },
            // the token endpoint took the whole try (its own timeout): a token failure
            Attempt::OutOfTime => {
                return CallResult::Token {
                    error: TokenError::Transport("timeout"),
                    tries,
                };
            }
            Attempt::Tried(t) => t,
        };
        tries += 1;
        if tries > 1 && shared.metrics.enabled {
            state.metrics(&shared.metrics).retry();
        }
        if matches!(tried.outcome, TryOutcome::Timeout) && cut_by_deadline {
            return CallResult::DeadlineExceeded { tries };
        }
        let status = tried.answer.as_ref().map(|a| a.status);
        last = Some((status, tried.reason, tried.retryable));
        if matches!(tried.outcome, TryOutcome::Success) {
            let answer = tried.answer.expect("a success has an answer");
            return CallResult::Delivered { answer, tries };
        }
        let now = Instant::now();
        let remaining = deadline_at.saturating_duration_since(now);
        // (bound first: the thread-local RNG must not live across the sleep below)
        let decision = route.retry.next_sync(
            tries,
            &tried.outcome,
            idempotent,
            remaining,
            &mut rand::rng(),
        );
        // A retry waits at least until the route's pause ends (this 429's, or
        // a longer one another call set meanwhile); if that is past the
        // deadline, give up now.
        let decision = match (decision, state.paused_until(now)) {
            (Decision::RetryAfter(wait), Some(until)) => {
                let wait = wait.max(until - now);
                if wait < remaining {
                    Decision::RetryAfter(wait)
                } else {
                    Decision::GiveUp(GiveUpReason::Deadline)
                }
            }
            (decision, _) => decision,
        };
        match decision {
            Decision::RetryAfter(wait) => tokio::time::sleep(wait).await,
            Decision::GiveUp(_) if status == Some(429) => {
                // The route is paused by this 429: answer like any paused call (SPEC §5 step 9).
                let now = Instant::now();
                let retry_after = state
                    .paused_until(now)
                    .map_or(RATE_LIMIT_PAUSE, |t| t - now);
                return CallResult::Unavailable {
                    retry_after,
                    why: "paused",
                };
            }
            Decision::GiveUp(GiveUpReason::NotRetryable) if status.is_some_and(|s| s < 500) => {
                let answer = tried.answer.expect("a status has an answer");
                return CallResult::Refused { answer, tries };
            }
            Decision::GiveUp(_) => {
                return CallResult::Failed {
                    status,
                    reason: tried.reason,
                    tries,
                    retryable: tried.retryable,
                };
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn send(
    shared: &Shared,
    client: &reqwest::Client,
    timeout: Duration,
    req: &OutboundRequest,
    body: Option<Bytes>,
    token: Option<&AccessToken>,
    auth: &OutboundAuth,
) -> Try {
    let mut headers = HeaderMap::with_capacity(req.headers.len() + 4);
    for (name, value, _) in &req.headers {
        headers.insert(name.clone(), value.clone());
    }
    // Every try is a new span of the request's trace (SPEC §8): same trace id,
    // new parent id; a request without one (a replay) starts a trace and an id.
    let span = crate::trace::next_span(headers.get(crate::trace::TRACEPARENT));
    headers.insert(crate::trace::TRACEPARENT, span);
    if !headers.contains_key(crate::trace::X_REQUEST_ID)
        && let Ok(v) = http::HeaderValue::from_str(&uuid::Uuid::now_v7().to_string())
    {
        headers.insert(crate::trace::X_REQUEST_ID, v);
    }
    match (auth.static_header(), token) {
        (_, Some(t)) => {
            headers.insert(header::AUTHORIZATION, t.bearer_header());
        }
        (Some(v), None) => {
            headers.insert(header::AUTHORIZATION, v);
        }
        (None, None) => {}
    }
    // A `Request` handed to `execute`: a `RequestBuilder` would copy the headers once more.
    let mut request = reqwest::Request::new(req.method.clone(), req.target.clone());
    *request.headers_mut() = headers;
    *request.body_mut() = body.map(reqwest::Body::from);
    let max = shared.limits.max_response;
    let sent = client.execute(request);
    let fut = async move {
        let mut resp = match sent.await {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Try::ConnectError,
            Err(e) if e.is_timeout() => return Try::Timeout,
            Err(_) => return Try::Broken,
        };
        let status = resp.status().as_u16();
        let headers = std::mem::take(resp.headers_mut());
        let mut buf = BytesMut::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = max.saturating_sub(buf.len());
                    buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if chunk.len() > room {
                        break; // capped: the rest is not read
                    }
                }
                Ok(None) => break,
                Err(_) => return Try::Broken,
            }
        }
        Try::Answer(Answer {
            status,
            headers,
            body: buf.freeze(),
        })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(t) => t,
        Err(_) => Try::Timeout,
    }
}
