//! `GET /healthz` (the process answers) and `GET /readyz` (a configuration is loaded
//! and the delivery store answers).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::json;

use crate::runtime::Gateway;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when a configuration is loaded (always, once serving) and the delivery store answers.
pub async fn readyz(State(gw): State<Arc<Gateway>>) -> (StatusCode, Json<serde_json::Value>) {
    let (generation, routes) = {
        let rt = gw.runtime.load();
        (rt.generation, rt.routes.len())
    };
    match gw.store.stats(std::time::SystemTime::now()).await {
        Ok(_) => (
            StatusCode::OK,
            Json(
                json!({"status": "ready", "generation": generation, "routes": routes, "store": gw.store.backend()}),
            ),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": format!("delivery store: {e}")})),
        ),
    }
}
