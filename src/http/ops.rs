//! `GET /healthz` (the process answers) and `GET /readyz` (a configuration is loaded).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::json;

use super::Gateway;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(gw): State<Arc<Gateway>>) -> (StatusCode, Json<serde_json::Value>) {
    let rt = gw.runtime.load();
    (
        StatusCode::OK,
        Json(json!({"status": "ready", "generation": rt.generation, "routes": rt.routes.len()})),
    )
}
