//! The admin listener: status, routes with breaker states, breaker reset.
//! Protected by `GATEWAY_ADMIN_TOKEN` (constant-time compare) when set, and
//! always by [`admin_guard`] (Host allow-list, cross-site refusal, answer
//! headers). Browsers sign in at `/login` for a session cookie
//! ([`admin_session`]). Never shows a secret: routes are described by name,
//! URL template as written (before `${VAR}` expansion) and auth *kind* only.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{FromRef, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use super::admin_guard::{self, AllowedHosts};
use super::admin_session::{self, Sessions};
use super::error::ApiError;
use crate::runtime::Gateway;

/// What the admin listener takes from start-up besides the gateway.
#[derive(Debug, Clone, Default)]
pub struct AdminOptions {
    /// Names (besides IP literals and `localhost`) the listener answers to
    /// (`--admin-hostnames`): any other `Host` is refused (DNS rebinding).
    pub hostnames: Vec<String>,
}

/// The admin router's state: the gateway, and the sign-in sessions of this
/// listener (their key is made when the router is, at start-up).
#[derive(Clone)]
struct AdminState {
    gw: Arc<Gateway>,
    sessions: Arc<Sessions>,
}

impl FromRef<AdminState> for Arc<Gateway> {
    fn from_ref(s: &AdminState) -> Self {
        s.gw.clone()
    }
}

pub fn router(gw: Arc<Gateway>, opts: AdminOptions) -> Router {
    let state = AdminState {
        gw,
        sessions: Arc::new(Sessions::random()),
    };
    let allowed = Arc::new(AllowedHosts::new(&opts.hostnames));
    let protected = Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/metrics/latency", get(latency))
        .route("/admin/status", get(status))
        .route("/admin/routes", get(routes))
        .route("/admin/breakers/{route}/reset", post(reset_breaker))
        .route("/admin/reload", post(reload))
        .route("/admin/deliveries", get(deliveries))
        .route("/admin/deliveries/{id}", get(delivery))
        .route("/admin/deliveries/{id}/replay", post(replay_delivery))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(super::ops::healthz))
        .route("/login", get(login_form).post(login))
        .merge(protected)
        .fallback(super::not_found)
        .method_not_allowed_fallback(super::method_not_allowed)
        // before the token: a cross-site or rebound request is refused unread
        .layer(axum::middleware::from_fn_with_state(
            allowed,
            admin_guard::guard,
        ))
        .layer(axum::middleware::from_fn(super::request_id))
        .with_state(state)
}

async fn require_token(
    State(st): State<AdminState>,
    req: Request,
    next: Next,
) -> Result<Response, Response> {
    let Some(expected) = &st.gw.admin_token else {
        return Ok(next.run(req).await);
    };
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| !t.is_empty() && token_matches(t, expected.expose_secret()));
    let signed_in = || {
        admin_session::cookie_value(headers)
            .is_some_and(|c| st.sessions.verify(c, std::time::SystemTime::now()))
    };
    if bearer || signed_in() {
        return Ok(next.run(req).await);
    }
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html && req.method() == axum::http::Method::GET {
        return Err(axum::response::Redirect::to("/login").into_response());
    }
    Err(ApiError::AdminUnauthorized.into_response())
}

fn token_matches(presented: &str, expected: &str) -> bool {
    sha(presented).ct_eq(&sha(expected)).into()
}

async fn login_form() -> axum::response::Html<&'static str> {
    axum::response::Html(super::status_page::LOGIN)
}

/// Signs a browser in: the right token gets a session cookie (never the token
/// itself: see [`admin_session`]).
async fn login(State(st): State<AdminState>, body: String) -> Response {
    let token = url::form_urlencoded::parse(body.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    match &st.gw.admin_token {
        Some(expected) if !token.is_empty() && token_matches(&token, expected.expose_secret()) => {
            let cookie = st.sessions.set_cookie(std::time::SystemTime::now());
            let mut resp = axum::response::Redirect::to("/").into_response();
            if let Ok(v) = axum::http::HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Some(_) => (
            StatusCode::UNAUTHORIZED,
            axum::response::Html(super::status_page::LOGIN),
        )
            .into_response(),
        None => axum::response::Redirect::to("/").into_response(),
    }
}

async fn status_page(State(gw): State<Arc<Gateway>>) -> axum::response::Html<String> {
    let now = std::time::SystemTime::now();
    let deliveries = match (
        gw.store.stats(now).await,
        gw.store.list(Some(crate::store::State::Dead), 20).await,
    ) {
        (Ok(stats), Ok(dead)) => Some(super::status_page::Deliveries { stats, dead }),
        _ => None,
    };
    axum::response::Html(super::status_page::render(&gw, deliveries))
}

async fn latency(State(gw): State<Arc<Gateway>>) -> Json<Value> {
    let rt = gw.runtime.load();
    let now = Instant::now();
    let sla = gw.shared.limits.sla;
    let mut out: Vec<Value> = rt
        .routes
        .iter()
        .map(|(name, s)| {
            json!({
                "route": name,
                "end_to_end": s.latency.end_to_end.summary(sla, now),
                "downstream": s.latency.downstream.summary(sla, now),
            })
        })
        .collect();
    out.sort_by(|a, b| a["route"].as_str().cmp(&b["route"].as_str()));
    Json(json!({
        "window_seconds": crate::runtime::LATENCY_WINDOW.as_secs(),
        "sla_ms": sla.as_millis() as u64,
        "routes": out,
    }))
}

fn sha(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> impl axum::response::IntoResponse {
    let m = &gw.shared.metrics;
    let rt = gw.runtime.load();
    let now = Instant::now();
    for (name, state) in &rt.routes {
        crate::telemetry::events::breaker_state(m, name, state.breaker.state(now).state);
    }
    m.config_generation.set(rt.generation as i64);
    drop(rt);
    if let Ok(s) = gw.store.stats(std::time::SystemTime::now()).await {
        use crate::telemetry::metrics::StateOnlyLabels;
        m.queue_depth
            .get_or_create(&StateOnlyLabels {
                state: "pending".into(),
            })
            .set(s.pending as i64);
        m.queue_depth
            .get_or_create(&StateOnlyLabels {
                state: "leased".into(),
            })
            .set(s.leased as i64);
        m.oldest_pending_age
            .set(s.oldest_pending_age.map_or(0, |d| d.as_secs() as i64));
        m.dead_letters.set(s.dead as i64);
    }
    let stats = gw.shared.tokens.stats();
    for (result, total) in [
        ("ok", stats.grants - stats.grant_failures),
        ("error", stats.grant_failures),
    ] {
        let c = m
            .token_grants
            .get_or_create(&crate::telemetry::metrics::ResultLabels {
                result: result.into(),
            });
        c.inc_by(total.saturating_sub(c.get()));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn status(State(gw): State<Arc<Gateway>>) -> Json<Value> {
    let rt = gw.runtime.load();
    let last = gw.last_reload();
    Json(json!({
        "generation": rt.generation,
        "hash": rt.config.hash,
        "bots": rt.config.bots.len(),
        "routes": rt.config.routes.len(),
        "last_reload": last,
    }))
}

async fn routes(State(gw): State<Arc<Gateway>>) -> Json<Value> {
    let rt = gw.runtime.load();
    let now = Instant::now();
    let mut out = Vec::new();
    for (name, state) in &rt.routes {
        let r = &state.route;
        let view = state.breaker.state(now);
        let auth = r.downstream.auth.kind();
        out.push(json!({
            "name": name,
            "bots": r.bots,
            "intent": match &r.intent { crate::config::model::Intent::Exact(i) => i.as_str(), crate::config::model::Intent::Default => "*" },
            "mode": format!("{:?}", r.mode).to_lowercase(),
            "method": r.downstream.method.as_str(),
            // as written: `${VAR}` values are never shown (SPEC §7.4)
            "url": r.downstream.url_shown,
            "auth": auth,
            "breaker": {
                "state": view.state.as_str(),
                "half_open_in_ms": view.half_open_in.map(|d| d.as_millis() as u64),
                "window_calls": view.window_calls,
                "window_failures": view.window_failures,
                "window_slow": view.window_slow,
                "consecutive_failures": view.consecutive_failures,
                "open_for_ms": view.open_for.as_millis() as u64,
                "probes_in_flight": view.probes_in_flight,
            },
            "paused_for_ms": state.paused_until(now).map(|t| (t - now).as_millis() as u64),
            // SPEC §9: the route an `also` target belongs to, and a route's targets
            "also_of": r.also_of,
            "also": r.also.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            "rate_limit": state.outbound.as_ref().map(|b| json!({
                "per_second": b.limit().per_second(),
                "burst": b.limit().burst(),
                "available": b.available(now),
            })),
            "in_flight": r.downstream.max_in_flight as usize - state.bulkhead.available_permits(),
            "source": format!("{}:{}", r.source.file.display(), r.source.line),
        }));
    }
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(json!({"generation": rt.generation, "routes": out}))
}

async fn reload(State(gw): State<Arc<Gateway>>) -> (StatusCode, Json<Value>) {
    let outcome = tokio::task::spawn_blocking(move || gw.reload())
        .await
        .unwrap_or_else(|_| unreachable!("reload does not panic"));
    let status = if outcome.is_rejected() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    let report = outcome.report();
    (
        status,
        Json(serde_json::to_value(report).unwrap_or_default()),
    )
}

#[derive(serde::Deserialize)]
struct DeliveryQuery {
    /// `pending`, `leased`, `delivered` or `dead`.
    state: Option<String>,
    limit: Option<u32>,
}

/// A submission of one of the status page's forms.
fn is_form(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"))
}

/// The store failed: logged here, never shown (its text may name files or hosts).
fn store_error(e: crate::store::StoreError) -> ApiError {
    tracing::warn!(error = %e, "delivery store: admin request failed");
    ApiError::StoreUnavailable {
        message: "the delivery store did not answer; try again",
    }
}

async fn deliveries(
    State(gw): State<Arc<Gateway>>,
    axum::extract::Query(q): axum::extract::Query<DeliveryQuery>,
) -> Result<Json<Value>, ApiError> {
    let state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(crate::store::State::parse(s).ok_or(ApiError::BadState)?),
    };
    let list = gw
        .store
        .list(state, q.limit.unwrap_or(100).min(1000))
        .await
        .map_err(store_error)?;
    let stats = gw
        .store
        .stats(std::time::SystemTime::now())
        .await
        .map_err(store_error)?;
    let rows: Vec<Value> = list
        .iter()
        .map(|d| {
            json!({
                "id": d.id, "bot": d.bot, "route": d.route, "state": d.state.as_str(), "attempts": d.attempts,
                "created_at": humantime::format_rfc3339_seconds(d.created_at).to_string(),
                "next_attempt_at": humantime::format_rfc3339_seconds(d.next_attempt_at).to_string(),
                "last_error": d.last_error,
            })
        })
        .collect();
    Ok(Json(json!({
        "pending": stats.pending, "leased": stats.leased, "dead": stats.dead,
        "oldest_pending_age_seconds": stats.oldest_pending_age.map(|d| d.as_secs()),
        "deliveries": rows,
    })))
}

async fn delivery(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let d = gw
        .store
        .get(&id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::UnknownDelivery {
            id: super::status_page::esc(&id),
        })?;
    let attempts: Vec<Value> = d
        .attempts
        .iter()
        .map(|a| json!({"number": a.number, "at": humantime::format_rfc3339_millis(a.at).to_string(), "status": a.status, "latency_ms": a.latency.as_millis() as u64, "error": a.error}))
        .collect();
    let s = &d.delivery;
    // The payload and request are not shown: they may hold personal data.
    Ok(Json(
        json!({"id": s.id, "bot": s.bot, "route": s.route, "state": s.state.as_str(), "attempts": attempts, "last_error": s.last_error}),
    ))
}

async fn replay_delivery(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    gw.store
        .replay(&id, std::time::SystemTime::now())
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound { .. } => ApiError::UnknownDelivery {
                id: super::status_page::esc(&id),
            },
            e => store_error(e),
        })?;
    gw.delivery_wake.notify_one();
    if is_form(&headers) {
        return Ok(axum::response::Redirect::to("/").into_response());
    }
    Ok(Json(json!({"id": id, "state": "pending"})).into_response())
}

async fn reset_breaker(
    State(gw): State<Arc<Gateway>>,
    Path(route): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let rt = gw.runtime.load();
    let state = rt
        .routes
        .get(&route)
        .ok_or_else(|| ApiError::UnknownRoute {
            route: super::status_page::esc(&route),
        })?;
    if let Some(t) = state.breaker.reset(Instant::now()) {
        crate::telemetry::events::breaker_transition(&gw.shared.metrics, &route, &t);
    }
    tracing::info!(route = %route, "breaker reset by admin");
    let from_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    if from_form {
        // the status page's Reset button: back to the page
        return Ok(axum::response::Redirect::to("/").into_response());
    }
    Ok(
        Json(json!({"route": route, "state": state.breaker.state(Instant::now()).state.as_str()}))
            .into_response(),
    )
}
