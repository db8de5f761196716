//! One synchronous downstream call with everything SPEC §5 step 10 and §6 ask
//! of it: tries within the route's deadline, a breaker permit per try, a 429
//! pausing the route, OAuth2 tokens with one forced refresh after a 401,
//! classification of every try, and a capped response body.
//!
//! Owns the try loop. Decisions about *whether* and *when* to retry are the
//! pure [`RetryPolicy`](super::retry::RetryPolicy)'s; the breaker is
//! [`crate::breaker`]'s. Never logs payload values or credentials.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header};
use tokio::time::Instant;

use super::oauth2::{AccessToken, TokenError};
use super::retry::{Decision, GiveUpReason, TryOutcome, parse_retry_after};
use crate::breaker::{Outcome, Rejected};
use crate::config::model::OutboundAuth;
use crate::render::OutboundRequest;
use crate::runtime::{RouteState, Shared};

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
    /// The last try failed (connect error, its own timeout, 5xx, exhausted 429s).
    Failed {
        status: Option<u16>,
        reason: &'static str,
        tries: u32,
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

/// What one try produced.
enum Try {
    Answer(Answer),
    ConnectError,
    Timeout,
    /// The request may have reached the downstream but failed (reset, unreadable body).
    Broken,
}

/// Calls the route's downstream for `req`, within `deadline_at`.
pub async fn call(
    shared: &Shared,
    state: &RouteState,
    req: &OutboundRequest,
    deadline_at: Instant,
) -> CallResult {
    let route = &state.route;
    let policy = &route.retry;
    let body = req.body.as_ref().map(|b| Bytes::from(b.clone()));
    let mut tries = 0u32;
    let mut refreshed = false;
    let mut last_status: Option<u16> = None;
    let mut last_reason = "no try made";
    loop {
        let now = Instant::now();
        if let Some(until) = state.paused_until(now) {
            return if tries == 0 {
                CallResult::Unavailable {
                    retry_after: until - now,
                    why: "paused",
                }
            } else {
                CallResult::Failed {
                    status: last_status,
                    reason: last_reason,
                    tries,
                }
            };
        }
        let permit = match state.breaker.try_acquire(now) {
            Ok(p) => p,
            Err(rejected) => {
                return if tries == 0 {
                    let (retry_after, why) = match rejected {
                        Rejected::Open { until } => (until.saturating_duration_since(now), "open"),
                        Rejected::ProbesBusy { .. } => (Duration::from_secs(1), "half_open"),
                    };
                    CallResult::Unavailable { retry_after, why }
                } else {
                    CallResult::Failed {
                        status: last_status,
                        reason: last_reason,
                        tries,
                    }
                };
            }
        };
        let remaining = deadline_at.saturating_duration_since(now);
        if remaining.is_zero() {
            permit.cancel();
            return CallResult::DeadlineExceeded { tries };
        }
        let cut_by_deadline = remaining < route.downstream.timeout;
        let timeout = remaining.min(route.downstream.timeout);

        let token = match &route.downstream.auth {
            OutboundAuth::OAuth2(creds) => {
                match tokio::time::timeout(timeout, shared.tokens.token(creds)).await {
                    Ok(Ok(t)) => Some(t),
                    Ok(Err(error)) => {
                        permit.cancel();
                        return CallResult::Token { error, tries };
                    }
                    Err(_) => {
                        permit.cancel();
                        return CallResult::DeadlineExceeded { tries };
                    }
                }
            }
            _ => None,
        };

        tries += 1;
        let started = Instant::now();
        let result = send(
            shared,
            route.downstream.timeout.min(timeout),
            req,
            body.clone(),
            token.as_ref(),
            &route.downstream.auth,
        )
        .await;
        let latency = started.elapsed();

        // One forced token refresh after a 401, then the same try again (never a loop).
        if let (Try::Answer(a), Some(t), OutboundAuth::OAuth2(creds)) =
            (&result, &token, &route.downstream.auth)
            && a.status == 401
            && !refreshed
        {
            refreshed = true;
            permit.record(Outcome::Success, latency, Instant::now());
            tries -= 1;
            if let Err(error) = shared.tokens.refresh_after_unauthorized(creds, t).await {
                return CallResult::Token {
                    error,
                    tries: tries + 1,
                };
            }
            continue;
        }

        let outcome = match &result {
            Try::Answer(a) if route.downstream.success.contains(a.status) => {
                permit.record(Outcome::Success, latency, Instant::now());
                TryOutcome::Success
            }
            Try::Answer(a) => {
                let retry_after = a
                    .headers
                    .get(header::RETRY_AFTER)
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                if a.status == 429 {
                    // Not a failure: the downstream asks us to slow down. Pause the route.
                    permit.cancel();
                    let pause = retry_after
                        .unwrap_or(Duration::from_secs(1))
                        .min(policy.retry_after_max);
                    state.pause(Instant::now() + pause);
                } else if a.status >= 500 {
                    permit.record(Outcome::Failure, latency, Instant::now());
                } else {
                    permit.record(Outcome::Success, latency, Instant::now());
                }
                last_status = Some(a.status);
                last_reason = if a.status == 429 {
                    "rate_limited"
                } else {
                    "status"
                };
                TryOutcome::Status {
                    code: a.status,
                    retry_after,
                }
            }
            Try::ConnectError => {
                permit.record(Outcome::Failure, latency, Instant::now());
                last_status = None;
                last_reason = "connect";
                TryOutcome::ConnectError
            }
            Try::Timeout => {
                permit.record(Outcome::Failure, latency, Instant::now());
                if cut_by_deadline {
                    return CallResult::DeadlineExceeded { tries };
                }
                last_status = None;
                last_reason = "timeout";
                TryOutcome::Timeout
            }
            Try::Broken => {
                permit.record(Outcome::Failure, latency, Instant::now());
                last_status = None;
                last_reason = "broken";
                TryOutcome::OtherError
            }
        };

        let remaining = deadline_at.saturating_duration_since(Instant::now());
        let decision = policy.next_sync(tries, &outcome, remaining, &mut rand::rng());
        match (decision, result) {
            (_, Try::Answer(answer)) if matches!(outcome, TryOutcome::Success) => {
                return CallResult::Delivered { answer, tries };
            }
            (Decision::RetryAfter(wait), _) => tokio::time::sleep(wait).await,
            (Decision::GiveUp(GiveUpReason::NotRetryable), Try::Answer(answer))
                if answer.status < 500 && answer.status != 429 =>
            {
                return CallResult::Refused { answer, tries };
            }
            (Decision::GiveUp(_), _) => {
                return CallResult::Failed {
                    status: last_status,
                    reason: last_reason,
                    tries,
                };
            }
        }
    }
}

async fn send(
    shared: &Shared,
    timeout: Duration,
    req: &OutboundRequest,
    body: Option<Bytes>,
    token: Option<&AccessToken>,
    auth: &OutboundAuth,
) -> Try {
    let mut headers = HeaderMap::with_capacity(req.headers.len() + 2);
    for (name, value, _) in &req.headers {
        headers.insert(name.clone(), value.clone());
    }
    match (auth, token) {
        (_, Some(t)) => {
            headers.insert(header::AUTHORIZATION, t.bearer_header());
        }
        (OutboundAuth::Bearer(secret), None) => {
            use secrecy::ExposeSecret;
            if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", secret.expose_secret()))
            {
                v.set_sensitive(true);
                headers.insert(header::AUTHORIZATION, v);
            }
        }
        _ => {}
    }
    let mut builder = shared
        .client
        .request(req.method.clone(), &req.url)
        .headers(headers);
    if let Some(b) = body {
        builder = builder.body(b);
    }
    let max = shared.limits.max_response;
    let fut = async move {
        let mut resp = match builder.send().await {
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
