//! The admin listener: status, routes with breaker states, breaker reset.
//! Protected by `GATEWAY_ADMIN_TOKEN` (constant-time compare) when set.
//! Never shows a secret: routes are described by name, URL template and
//! auth *kind* only.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use super::Gateway;
use super::error::ApiError;
use crate::config::model::OutboundAuth;

pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(super::ops::healthz))
        .route("/admin/status", get(status))
        .route("/admin/routes", get(routes))
        .route("/admin/breakers/{route}/reset", post(reset_breaker))
        .route("/admin/reload", post(reload))
        .layer(axum::middleware::from_fn_with_state(
            gw.clone(),
            require_token,
        ))
        .with_state(gw)
}

async fn require_token(
    State(gw): State<Arc<Gateway>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(expected) = &gw.admin_token {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok: bool = sha(presented).ct_eq(&sha(expected.expose_secret())).into();
        if !ok || presented.is_empty() {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "admin token required: Authorization: Bearer <GATEWAY_ADMIN_TOKEN>",
            ));
        }
    }
    Ok(next.run(req).await)
}

fn sha(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}

async fn status(State(gw): State<Arc<Gateway>>) -> Json<Value> {
    let rt = gw.runtime.load();
    let last = gw
        .last_reload
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
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
        let auth = match &r.downstream.auth {
            OutboundAuth::None => "none",
            OutboundAuth::Bearer(_) => "bearer",
            OutboundAuth::OAuth2(_) => "oauth2",
        };
        out.push(json!({
            "name": name,
            "bots": r.bots,
            "intent": match &r.intent { crate::config::model::Intent::Exact(i) => i.as_str(), crate::config::model::Intent::Default => "*" },
            "mode": format!("{:?}", r.mode).to_lowercase(),
            "method": r.downstream.method.as_str(),
            "url": r.downstream.url.source(),
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
            "in_flight": r.downstream.max_in_flight as usize - state.bulkhead.available_permits(),
            "source": format!("{}:{}", r.source.file.display(), r.source.line),
        }));
    }
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(json!({"generation": rt.generation, "routes": out}))
}

async fn reload(State(gw): State<Arc<Gateway>>) -> (StatusCode, Json<Value>) {
    let report = tokio::task::spawn_blocking(move || gw.reload())
        .await
        .unwrap_or_else(|_| unreachable!("reload does not panic"));
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (
        status,
        Json(serde_json::to_value(report).unwrap_or_default()),
    )
}

async fn reset_breaker(
    State(gw): State<Arc<Gateway>>,
    Path(route): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let rt = gw.runtime.load();
    let state = rt.routes.get(&route).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_route",
            format!("no route `{route}`"),
        )
    })?;
    let t = state.breaker.reset(Instant::now());
    tracing::info!(route = %route, transition = ?t.map(|t| (t.from.as_str(), t.to.as_str())), "breaker reset by admin");
    Ok(Json(
        json!({"route": route, "state": state.breaker.state(Instant::now()).state.as_str()}),
    ))
}
