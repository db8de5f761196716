//! `GET /healthz` (the process answers) and `GET /readyz` (a configuration is loaded
//! and the delivery store answers).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::json;
use std::time::Duration;
use tokio::time::Instant;

use crate::runtime::Gateway;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// How long `/readyz` reuses its last store check.
const READINESS_TTL: Duration = Duration::from_secs(1);

/// Ready when a configuration is loaded (always, once serving) and the delivery
/// store answered its last check (made at most once a second). The body never
/// carries the store's error text: that goes to the log.
pub async fn readyz(State(gw): State<Arc<Gateway>>) -> (StatusCode, Json<serde_json::Value>) {
    let (generation, routes) = {
        let rt = gw.runtime.load();
        (rt.generation, rt.routes.len())
    };
    let store_ok = {
        let mut last = gw.readiness.lock().await;
        let now = Instant::now();
        match *last {
            Some((at, ok)) if now.duration_since(at) < READINESS_TTL => ok,
            _ => {
                let ok = match gw.store.stats(std::time::SystemTime::now()).await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "readyz: the delivery store did not answer");
                        false
                    }
                };
                *last = Some((Instant::now(), ok));
                ok
            }
        }
    };
    if store_ok {
        (
            StatusCode::OK,
            Json(
                json!({"status": "ready", "generation": generation, "routes": routes, "store": gw.store.backend()}),
            ),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": "the delivery store did not answer"})),
        )
    }
}
