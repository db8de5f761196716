//! `POST /webhooks/{bot}`: the pipeline of SPEC §5, one function per step,
//! in the SPEC's order: bot → body limit → auth → JSON → schemas and route →
//! idempotency → async: the delivery store → availability → tries.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant, SystemTime};

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use handlebars::Context;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::RequestId;
use super::error::{ApiError, retry_after_secs};
use super::outcome::Outcome;
use crate::config::model::{Bot, Mode, OnFailure, Route};
use crate::payload::JsonError;
use crate::runtime::Gateway;
use crate::runtime::client::{self, Answer, CallResult};
use crate::runtime::{RouteState, Runtime};
use crate::store::{
    Accept, Begin, Hold, NewDelivery, ScopedKey, StoreError, StoredAnswer, StoredRequest,
};
use crate::telemetry::log_field::Bounded;
use crate::template::RenderMeta;
use crate::trace::{self, TraceContext};

pub async fn handle(
    State(gw): State<Arc<Gateway>>,
    Path(bot_id): Path<String>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    // the request itself, not `HeaderMap` + `Body`: that extractor clones the headers
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let started = StdInstant::now();
    // SPEC §7.3: a sync call's deadline counts from here, the request's arrival.
    let arrived = Instant::now();
    let headers = Arc::new(headers);
    // The generation this request runs on, start to finish.
    let rt = gw.runtime.load_full();
    let mut log = Log {
        request_id,
        trace: TraceContext::from_headers(&headers),
        known_bot: false,
        bot: bot_id,
        route: None,
        intent: None,
        outcome: Outcome::Pending,
        tries: 0,
        fields: None,
    };
    let result = pipeline(&gw, &rt, &headers, body, arrived, &mut log).await;
    let resp = result.unwrap_or_else(|e| {
        if log.outcome == Outcome::Pending {
            log.outcome = Outcome::of_refusal(&e);
        }
        e.into_response()
    });
    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    let state = log.route.as_deref().and_then(|r| rt.routes.get(r));
    let m = &gw.shared.metrics;
    // Nothing taken from a request becomes a label: unknown bots count as one.
    let bot_label = if log.known_bot {
        log.bot.as_str()
    } else {
        "_unknown"
    };
    // the route's pre-resolved handles when there is a route; the label path otherwise
    let counted = m.enabled
        && state.is_some_and(|s| {
            s.metrics(m)
                .request(bot_label, status, elapsed.as_secs_f64())
        });
    if !counted {
        crate::telemetry::events::request(
            m,
            bot_label,
            log.route.as_deref().unwrap_or("-"),
            status,
            elapsed.as_secs_f64(),
        );
    }
    if let Some(state) = state {
        state.stats.record(status, log.outcome.as_str());
        if gw.shared.metrics.enabled {
            state.latency.end_to_end.record(elapsed, Instant::now());
        }
    }
    tracing::info!(
        request_id = %log.request_id,
        trace_id = %log.trace.trace_id_hex(),
        bot = %Bounded(&log.bot),
        route = log.route.as_deref().unwrap_or("-"),
        intent = %Bounded(log.intent.as_deref().unwrap_or("-")),
        outcome = log.outcome.as_str(),
        status = resp.status().as_u16(),
        tries = log.tries,
        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
        fields = %Bounded(log.fields.as_deref().unwrap_or("")),
        "webhook"
    );
    resp
}

/// What the one log line per webhook says.
struct Log {
    request_id: String,
    /// The inbound trace (`traceparent`), or one started here: every downstream
    /// try is a span of it (SPEC §8).
    trace: TraceContext,
    /// The bot is configured (else it is counted as `_unknown`).
    known_bot: bool,
    /// As requested (raw: bounded and escaped when logged).
    bot: String,
    route: Option<String>,
    intent: Option<String>,
    outcome: Outcome,
    tries: u32,
    /// The route's opted-in payload fields (`log_fields`), as JSON.
    fields: Option<String>,
}

async fn pipeline(
    gw: &Gateway,
    rt: &Runtime,
    headers: &Arc<HeaderMap>,
    body: Body,
    arrived: Instant,
    log: &mut Log,
) -> Result<Response, ApiError> {
    let bot = step1_bot(rt, &log.bot)?;
    log.known_bot = true;
    let limits = &gw.shared.limits;
    step2_length(headers, limits.max_body)?;
    // Credentials carried in headers are checked before the body is read
    // (SPEC §7.1): a wrong one is refused without waiting for the body.
    if !bot.auth.needs_body() {
        step3_auth(bot, headers, &[])?;
        step3_rate_limit(rt, bot)?;
    }
    let bytes = step2_body(body, limits.max_body, limits.body_timeout).await?;
    if bot.auth.needs_body() {
        step3_auth(bot, headers, &bytes)?;
        step3_rate_limit(rt, bot)?;
    }
    let payload = step4_json(headers, &bytes, gw.shared.limits.max_depth)?;
    let (route, state) = step5_6_schema_and_route(rt, bot, &payload, log)?;
    let ctx = Context::from(payload);
    let mut meta = RenderMeta::new(&bot.id, &route.name);
    meta.now = SystemTime::now();
    meta.headers = headers.clone();
    if route.mode == Mode::Async {
        let req = render(route, &ctx, &meta, log)?;
        // SPEC §9: the route's own delivery and its `also` targets, in one transaction
        let also = render_also(&bot.id, route, &ctx, &bytes, &meta, log)?;
        return step8_accept(gw, &bot.id, route, &bytes, &req, also, log).await;
    }
    // The whole sync call (reading the body, rendering and step 7 included)
    // ends within the route's deadline, counted from the request's arrival.
    let call = SyncCall {
        bot: &bot.id,
        body: &bytes,
        route,
        state,
        deadline_at: arrived + route.deadline,
    };
    if route.idempotency_key.is_none() {
        step8_also(gw, &bot.id, route, &ctx, &bytes, &meta, log).await?;
        return sync_call(gw, &call, ctx, &meta, None, log).await;
    }
    // Step 7 needs the key, so a route with one renders before step 9.
    let req = render(route, &ctx, &meta, log)?;
    let Some(key) = req.idempotency_key.clone() else {
        step8_also(gw, &bot.id, route, &ctx, &bytes, &meta, log).await?;
        return sync_call(gw, &call, ctx, &meta, Some(req), log).await;
    };
    let key = ScopedKey::new(&bot.id, &route.name, key);
    let hold = match step7_begin(gw, route, &key, log).await? {
        Ok(hold) => hold,
        Err(first) => return Ok(first),
    };
    let result = match step8_also(gw, &bot.id, route, &ctx, &bytes, &meta, log).await {
        Ok(()) => sync_call(gw, &call, ctx, &meta, Some(req), log).await,
        Err(e) => Err(e),
    };
    step7_settle(gw, &hold, result, log.outcome).await
}

/// The route's downstream request for this payload; a failure names the route and sends nothing.
/// It carries the request id and the trace (`traceparent`, `tracestate`) unless
/// the route sets those headers itself; each try sends a new span of the trace
/// (`client::attempt`), and an async delivery stores them with its request.
fn render(
    route: &Route,
    ctx: &Context,
    meta: &RenderMeta,
    log: &mut Log,
) -> Result<crate::config::render::OutboundRequest, ApiError> {
    let mut req = crate::config::render::build(route, ctx, meta).map_err(|e| {
        log.outcome = Outcome::RenderError;
        ApiError::Render {
            route: route.name.clone(),
            message: e.to_string(),
        }
    })?;
    let mut add = |name: http::HeaderName, value: Option<http::HeaderValue>| {
        if let Some(v) = value
            && !req.headers.iter().any(|(n, _, _)| *n == name)
        {
            req.headers.push((name, v, false));
        }
    };
    // the request id was checked to be visible ASCII (`http::request_id`)
    add(
        trace::X_REQUEST_ID,
        http::HeaderValue::from_str(&log.request_id).ok(),
    );
    add(trace::TRACEPARENT, Some(log.trace.traceparent()));
    add(trace::TRACESTATE, log.trace.state.clone());
    Ok(req)
}

/// What a sync call is about: its bot, route (and state), and when its deadline ends.
#[derive(Clone, Copy)]
struct SyncCall<'a> {
    bot: &'a str,
    /// The request's body (a delivery stores it as its payload).
    body: &'a [u8],
    route: &'a Route,
    state: &'a RouteState,
    /// The request's arrival + the route's `deadline`.
    deadline_at: Instant,
}

/// Steps 9–10 for a sync route (and `on_failure: queue`). `req` is the request
/// when it was already rendered (step 7 needs the key first).
async fn sync_call(
    gw: &Gateway,
    call: &SyncCall<'_>,
    mut ctx: Context,
    meta: &RenderMeta,
    req: Option<crate::config::render::OutboundRequest>,
    log: &mut Log,
) -> Result<Response, ApiError> {
    let SyncCall {
        bot,
        body,
        route,
        state,
        deadline_at,
    } = *call;
    // Step 9 before rendering: a route that will not be called costs no rendering.
    let now = Instant::now();
    let blocked = match (state.breaker.blocked_until(now), state.paused_until(now)) {
        (Some(until), _) => Some((until.saturating_duration_since(now), "open")),
        (None, Some(until)) => Some((until - now, "paused")),
        (None, None) => None,
    };
    if let Some((retry_after, why)) = blocked {
        log.outcome = Outcome::unavailable(why);
        crate::telemetry::events::rejected(&gw.shared.metrics, &route.name, why);
        if route.on_failure == OnFailure::Queue {
            let req = match req {
                Some(r) => r,
                None => render(route, &ctx, meta, log)?,
            };
            return step8_accept(gw, bot, route, body, &req, Vec::new(), log).await;
        }
        return step9_unavailable(route, &mut ctx, meta, retry_after, why);
    }
    let req = match req {
        Some(r) => r,
        None => render(route, &ctx, meta, log)?,
    };
    let permit = match state.bulkhead.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            log.outcome = Outcome::BulkheadFull;
            if route.on_failure == OnFailure::Queue {
                return step8_accept(gw, bot, route, body, &req, Vec::new(), log).await;
            }
            return step9_unavailable(
                route,
                &mut ctx,
                meta,
                std::time::Duration::from_secs(1),
                "max_in_flight",
            );
        }
    };
    let result = client::call(&gw.shared, state, &req, deadline_at).await;
    drop(permit);
    if route.on_failure == OnFailure::Queue && should_queue(&result) {
        // on_failure: queue: the call did not go through now; deliver it later instead.
        if let CallResult::Failed { tries, .. }
        | CallResult::DeadlineExceeded { tries }
        | CallResult::Token { tries, .. } = result
        {
            log.tries = tries;
        }
        return step8_accept(gw, bot, route, body, &req, Vec::new(), log).await;
    }
    step10_answer(route, result, &mut ctx, meta, log)
}

/// `on_failure: queue` (SPEC §7.3): store the call as a delivery when the
/// downstream did not get the request (open, paused, bulkhead: step 9; a
/// connect error), when the last try's outcome is one the retry rule would try
/// again (a timeout, 502–504, 429; a 500 or a broken connection only with an
/// idempotency key), or when the token endpoint failed. Otherwise (a 4xx, a
/// 500 without a key: the write may have been applied) answer as a sync route.
fn should_queue(result: &CallResult) -> bool {
    match result {
        CallResult::Unavailable { .. }
        | CallResult::DeadlineExceeded { .. }
        | CallResult::Token { .. } => true,
        CallResult::Failed { retryable, .. } => *retryable,
        CallResult::Delivered { .. } | CallResult::Refused { .. } => false,
    }
}

/// How long an in-progress idempotency key is held past the route's deadline
/// before another request may take it over (the first one crashed or was dropped).
const IN_PROGRESS_SLACK: std::time::Duration = std::time::Duration::from_secs(5);

/// Step 7 for a sync route, per (bot, route, key): `Ok(hold)` means this
/// request holds the key, and [`step7_settle`] must follow with that hold.
/// `Err(answer)` ends the request with the first request's answer again; 409
/// while that request is still under way.
async fn step7_begin(
    gw: &Gateway,
    route: &Route,
    key: &ScopedKey,
    log: &mut Log,
) -> Result<Result<Hold, Response>, ApiError> {
    let lease = route.deadline + IN_PROGRESS_SLACK;
    match gw
        .store
        .begin(
            key,
            gw.shared.limits.dedupe_window,
            lease,
            SystemTime::now(),
        )
        .await
    {
        Ok(Begin::New(hold)) => Ok(Ok(hold)),
        Ok(Begin::Done(first)) => {
            log.outcome = Outcome::Replayed;
            let mut resp = json_response(first.status, Bytes::from(first.body));
            resp.headers_mut().insert(
                IDEMPOTENT_REPLAYED,
                header::HeaderValue::from_static("true"),
            );
            Ok(Err(resp))
        }
        Ok(Begin::InProgress) => {
            log.outcome = Outcome::InProgress;
            Err(ApiError::InProgress {
                route: route.name.clone(),
            })
        }
        Err(e) => {
            tracing::error!(route = %route.name, error = %e, "delivery store: idempotency check failed");
            log.outcome = Outcome::StoreError;
            Err(ApiError::StoreUnavailable {
                message: "the idempotency key could not be checked; nothing was sent, try again",
            })
        }
    }
}

/// Marks a replayed answer (as Stripe and the IETF idempotency draft's users do).
const IDEMPOTENT_REPLAYED: header::HeaderName =
    header::HeaderName::from_static("idempotent-replayed");

/// After step 7: keeps the answer for duplicates when it is final — the
/// downstream answered (success set, or a refusal such as a 4xx that a repeat
/// would only get again), or the call was queued (202, its `delivery_id`).
/// Anything else (unavailable, failed tries, deadline, render errors) releases
/// the key, so the bot's retry is a real retry; the downstream still sees the
/// same `Idempotency-Key` on it.
async fn step7_settle(
    gw: &Gateway,
    hold: &Hold,
    result: Result<Response, ApiError>,
    outcome: Outcome,
) -> Result<Response, ApiError> {
    let resp = match result {
        Ok(resp) if outcome.is_final() => resp,
        other => {
            if let Err(e) = gw.store.abandon(hold).await {
                // the key stays in progress until its lease ends; then a retry takes it over
                tracing::warn!(error = %e, "delivery store: releasing an idempotency key failed");
            }
            return other;
        }
    };
    let (parts, body) = resp.into_parts();
    // (a body built from bytes: collecting it is a move, not a copy of a stream)
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let answer = StoredAnswer {
        status: parts.status.as_u16(),
        body: body.to_vec(),
    };
    if let Err(e) = gw.store.finish(hold, answer, SystemTime::now()).await {
        tracing::warn!(error = %e, "delivery store: keeping an idempotent answer failed");
    }
    Ok(Response::from_parts(parts, Body::from(body)))
}

/// The payload a delivery stores: the body as received, which parsed as JSON
/// (step 4) and so is UTF-8 text. Writing the parsed value out again instead
/// cost as much as parsing it (~17k instructions per async webhook, callgrind);
/// a replay parses the stored text to the same value.
fn stored_payload(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// The stored form of a rendered request for `route` (the route's own, or an `also` target's).
fn new_delivery(
    bot: &str,
    route: &Route,
    payload: String,
    req: &crate::config::render::OutboundRequest,
) -> NewDelivery {
    NewDelivery {
        bot: bot.to_owned(),
        route: route.name.clone(),
        payload,
        // a `${VAR}` value in the URL or body is never stored: masked here,
        // rendered again by the worker at send time (SPEC §7.4)
        request: if route.secret_parts {
            StoredRequest::from_outbound_masked(req, &crate::telemetry::log_redact::remembered())
        } else {
            StoredRequest::from_outbound(req)
        },
        idempotency_key: req.idempotency_key.clone(),
        // SPEC §7.3: sent only while the route keeps this origin and auth
        fingerprint: Some(route.downstream.fingerprint().to_owned()),
    }
}

/// The deliveries of the route's `also` targets for this payload (SPEC §9),
/// each rendered by its own target route; empty without targets. A target
/// that cannot render fails the request, and nothing is stored.
fn render_also(
    bot: &str,
    route: &Route,
    ctx: &Context,
    body: &[u8],
    meta: &RenderMeta,
    log: &mut Log,
) -> Result<Vec<NewDelivery>, ApiError> {
    let mut out = Vec::with_capacity(route.also.len());
    if route.also.is_empty() {
        return Ok(out);
    }
    let payload = stored_payload(body);
    for target in &route.also {
        let mut meta = meta.clone();
        meta.route = target.name.as_str().into();
        let req = render(target, ctx, &meta, log)?;
        out.push(new_delivery(bot, target, payload.clone(), &req));
    }
    Ok(out)
}

/// A sync route's `also` targets (SPEC §9): stored before the route's own call,
/// so the bot's answer stays the route's own and a crash after the call loses
/// none. Each target is deduped on its own key, so the bot's retry of a failed
/// call does not store a target twice. Nothing to do without targets.
async fn step8_also(
    gw: &Gateway,
    bot: &str,
    route: &Route,
    ctx: &Context,
    body: &[u8],
    meta: &RenderMeta,
    log: &mut Log,
) -> Result<(), ApiError> {
    let also = render_also(bot, route, ctx, body, meta, log)?;
    if also.is_empty() {
        return Ok(());
    }
    let accepted = commit(gw, route, also, log).await?;
    if accepted
        .iter()
        .any(|a| matches!(a, Accept::Accepted { .. }))
    {
        gw.delivery_wake.notify_one();
    }
    Ok(())
}

/// Step 8 (and `on_failure: queue`): commits the delivery (with `also`, the
/// deliveries of the route's targets, in the same transaction) to the store,
/// then answers 202 with the route's own delivery id. A duplicate (same bot,
/// route and idempotency key within the window) gets the first delivery's id
/// again and is not stored twice. With `--max-pending` deliveries pending: 503
/// `queue_full`, nothing stored.
async fn step8_accept(
    gw: &Gateway,
    bot: &str,
    route: &Route,
    body: &[u8],
    req: &crate::config::render::OutboundRequest,
    also: Vec<NewDelivery>,
    log: &mut Log,
) -> Result<Response, ApiError> {
    // the targets' deliveries carry the payload already
    let payload = match also.first() {
        Some(d) => d.payload.clone(),
        None => stored_payload(body),
    };
    let mut deliveries = Vec::with_capacity(1 + also.len());
    deliveries.push(new_delivery(bot, route, payload, req));
    deliveries.extend(also);
    let accepted = commit(gw, route, deliveries, log).await?;
    let own = &accepted[0];
    let duplicate = matches!(own, Accept::Duplicate { .. });
    log.outcome = if duplicate {
        Outcome::Duplicate
    } else {
        Outcome::Accepted
    };
    if accepted
        .iter()
        .any(|a| matches!(a, Accept::Accepted { .. }))
    {
        gw.delivery_wake.notify_one();
    }
    let body = json!({"delivery_id": own.id()}).to_string();
    Ok(json_response(202, Bytes::from(body)))
}

/// Stores `deliveries` in one transaction (one is the common case: a plain
/// `accept`); the answers in order, or the refusal as the bot gets it.
async fn commit(
    gw: &Gateway,
    route: &Route,
    mut deliveries: Vec<NewDelivery>,
    log: &mut Log,
) -> Result<Vec<Accept>, ApiError> {
    let window = Some(gw.shared.limits.dedupe_window);
    let now = SystemTime::now();
    let result = if deliveries.len() == 1 {
        let d = deliveries.pop().expect("one delivery");
        // (the store dedupes only deliveries that carry a key)
        gw.store.accept(d, window, now).await.map(|a| vec![a])
    } else {
        gw.store.accept_all(deliveries, window, now).await
    };
    result.map_err(|e| match e {
        StoreError::QueueFull { limit } => {
            tracing::warn!(route = %route.name, limit, "delivery queue full: accept refused");
            log.outcome = Outcome::QueueFull;
            ApiError::QueueFull { limit }
        }
        e => {
            tracing::error!(route = %route.name, error = %e, "delivery store: accept failed");
            log.outcome = Outcome::StoreError;
            ApiError::StoreUnavailable {
                message: "the delivery could not be stored; nothing was accepted, try again",
            }
        }
    })
}

fn step1_bot<'a>(rt: &'a Runtime, id: &str) -> Result<&'a Arc<Bot>, ApiError> {
    rt.config.bots.get(id).ok_or_else(|| ApiError::UnknownBot {
        bot: truncate(id, 64).to_owned(),
    })
}

/// Step 2, before anything else is read: an announced body over the limit → 413.
fn step2_length(headers: &HeaderMap, limit: usize) -> Result<(), ApiError> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ApiError::BodyTooLarge { limit });
    }
    Ok(())
}

/// Step 2: the body, read up to the limit and within the body timeout.
async fn step2_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::BodyTooLarge { limit };
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        return Err(ApiError::BodyTimeout { timeout });
    };
    read.map_err(|e| {
        let is_limit = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if is_limit {
            too_large()
        } else {
            ApiError::BodyRead
        }
    })
}

fn step3_auth(bot: &Bot, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    crate::auth::verify(&bot.auth, headers, body, SystemTime::now()).map_err(|e| {
        tracing::debug!(bot = %bot.id, reason = e.reason(), "inbound auth failed");
        ApiError::Unauthorized
    })
}

/// After auth: the bot's token bucket (`rate_limit`), when it has one.
fn step3_rate_limit(rt: &Runtime, bot: &Bot) -> Result<(), ApiError> {
    let Some(bucket) = rt.bot_limits.get(&bot.id) else {
        return Ok(());
    };
    bucket
        .try_take(Instant::now())
        .map_err(|retry_after| ApiError::RateLimited {
            bot: bot.id.clone(),
            retry_after,
        })
}

fn step4_json(headers: &HeaderMap, bytes: &[u8], max_depth: usize) -> Result<Value, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes());
    if let Some(media_type) = crate::payload::form_media_type(content_type) {
        return Err(ApiError::NotJsonMediaType { media_type });
    }
    crate::payload::parse_json(bytes, max_depth).map_err(|e| ApiError::InvalidJson {
        message: match e {
            JsonError::TooDeep(depth) => {
                format!("JSON nests deeper than {max_depth} levels (reached {depth})")
            }
            JsonError::Invalid(e) => format!("the body is not JSON: {e}"),
        },
    })
}

fn step5_6_schema_and_route<'a>(
    rt: &'a Runtime,
    bot: &Bot,
    payload: &Value,
    log: &mut Log,
) -> Result<(&'a Arc<Route>, &'a RouteState), ApiError> {
    if let Some(s) = &bot.schema {
        let violations = s.violations(payload);
        if !violations.is_empty() {
            return Err(ApiError::Schema {
                violations,
                route: None,
            });
        }
    }
    let intent = crate::payload::intent(payload, &bot.intent_path);
    log.intent = intent.map(|i| truncate(i, 200).to_owned());
    let score = crate::payload::score(payload, &bot.score_path);
    let Some(route) = rt.config.route_for(bot, intent, score) else {
        return Err(ApiError::NoRoute {
            intent: intent.map(str::to_owned),
        });
    };
    log.route = Some(route.name.clone());
    if !route.log_fields.is_empty() {
        let fields: serde_json::Map<String, Value> = route
            .log_fields
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    payload.pointer(p).cloned().unwrap_or(Value::Null),
                )
            })
            .collect();
        log.fields = Some(Value::Object(fields).to_string());
    }
    if let Some(s) = &route.schema {
        let violations = s.violations(payload);
        if !violations.is_empty() {
            return Err(ApiError::Schema {
                violations,
                route: Some(route.name.clone()),
            });
        }
    }
    let state = rt.routes.get(&route.name).expect("every route has state");
    Ok((route, state.as_ref()))
}

/// The route will not be called now: its fallback, or 503 with `Retry-After`.
fn step9_unavailable(
    route: &Route,
    ctx: &mut Context,
    meta: &RenderMeta,
    retry_after: std::time::Duration,
    why: &'static str,
) -> Result<Response, ApiError> {
    let secs = retry_after_secs(retry_after);
    let Some(fb) = &route.fallback else {
        return Err(ApiError::Unavailable {
            route: route.name.clone(),
            reason: why,
            retry_after,
        });
    };
    let body = match &fb.body {
        Some(t) if t.as_static().is_some() => {
            Bytes::copy_from_slice(t.as_static().unwrap_or_default().as_bytes())
        }
        Some(t) => {
            // (the payload moves: nothing after the fallback needs it)
            let payload = std::mem::take(ctx.data_mut());
            let fctx = Context::from(object([
                ("request", payload),
                ("retry_after", Value::from(secs)),
            ]));
            json_or_error(route, "fallback.body", t.render(&fctx, meta))?
        }
        None => Bytes::from_static(b"{}"),
    };
    let mut resp = json_response(fb.status, body);
    resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
    Ok(resp)
}

fn step10_answer(
    route: &Route,
    result: CallResult,
    ctx: &mut Context,
    meta: &RenderMeta,
    log: &mut Log,
) -> Result<Response, ApiError> {
    match result {
        CallResult::Delivered { answer, tries } => {
            log.tries = tries;
            log.outcome = Outcome::Delivered;
            match &route.response {
                Some(spec) => {
                    let status = spec.status.unwrap_or(answer.status);
                    let body = match &spec.body {
                        Some(t) => {
                            let payload = std::mem::take(ctx.data_mut());
                            let rctx = Context::from(object([
                                ("downstream", downstream_value(&answer)),
                                ("request", payload),
                            ]));
                            json_or_error(route, "response.body", t.render(&rctx, meta))?
                        }
                        None => passthrough_body(&answer),
                    };
                    Ok(json_response(status, body))
                }
                None => Ok(json_response(answer.status, passthrough_body(&answer))),
            }
        }
        CallResult::Refused { answer, tries } => {
            log.tries = tries;
            log.outcome = Outcome::Refused;
            Ok(json_response(answer.status, passthrough_body(&answer)))
        }
        CallResult::Failed {
            status,
            reason,
            tries,
            ..
        } => {
            log.tries = tries;
            log.outcome = Outcome::Failed;
            Err(ApiError::Downstream {
                route: route.name.clone(),
                status,
                reason,
                tries,
            })
        }
        CallResult::DeadlineExceeded { tries } => {
            log.tries = tries;
            log.outcome = Outcome::Deadline;
            Err(ApiError::Deadline {
                route: route.name.clone(),
                deadline: route.deadline,
            })
        }
        CallResult::Unavailable { retry_after, why } => {
            log.outcome = Outcome::unavailable(why);
            step9_unavailable(route, ctx, meta, retry_after, why)
        }
        CallResult::Token { error, tries } => {
            log.tries = tries;
            log.outcome = Outcome::TokenError;
            Err(ApiError::DownstreamAuth {
                route: route.name.clone(),
                message: error.to_string(),
            })
        }
    }
}

fn downstream_value(a: &Answer) -> Value {
    let headers: serde_json::Map<String, Value> = a
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), Value::from(v.to_str().ok()?))))
        .collect();
    let body = serde_json::from_slice(&a.body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&a.body).into_owned()));
    object([
        ("status", Value::from(a.status)),
        ("headers", Value::Object(headers)),
        ("body", body),
    ])
}

/// A JSON object of these members, the values moved in (`json!` would copy
/// each one through `to_value`: a whole payload, per request).
fn object<const N: usize>(members: [(&str, Value); N]) -> Value {
    Value::Object(
        members
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

/// The downstream body if it is JSON; otherwise wrapped as `{"body": "<text>"}`.
fn passthrough_body(a: &Answer) -> Bytes {
    if a.body.is_empty() {
        return Bytes::from_static(b"{}");
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(&a.body).is_ok() {
        return a.body.clone();
    }
    Bytes::from(json!({"body": String::from_utf8_lossy(&a.body)}).to_string())
}

fn json_or_error(
    route: &Route,
    part: &'static str,
    rendered: Result<String, String>,
) -> Result<Bytes, ApiError> {
    let text = rendered.map_err(|message| ApiError::AnswerTemplate {
        route: route.name.clone(),
        part,
        message,
    })?;
    if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_err() {
        return Err(ApiError::AnswerTemplate {
            route: route.name.clone(),
            part,
            message: "did not render to JSON".to_owned(),
        });
    }
    Ok(Bytes::from(text))
}

fn json_response(status: u16, body: Bytes) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
