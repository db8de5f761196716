//! The HTTP surface (SPEC §5): the public listener (webhooks, health) and the
//! admin listener, built as axum routers over one shared [`Gateway`] (owned by `runtime`).
//!
//! `run` takes its listeners and a shutdown future as arguments (mini-redis
//! style), so tests bind `127.0.0.1:0` and stop the server cleanly.

pub mod admin;
pub mod admin_guard;
pub mod admin_session;
pub mod error;
pub mod listener;
pub mod ops;
pub mod outcome;
pub mod status_page;
pub mod tls;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::runtime::Gateway;

/// The public router: webhooks and health.
pub fn public_router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/webhooks/{bot}", post(webhook::handle))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(request_id))
        .with_state(gw)
}

/// 404 for an unknown path, on both listeners (a JSON body, as every error).
pub(crate) async fn not_found() -> error::ApiError {
    error::ApiError::NotFound
}

/// 405 for a known path and another method, on both listeners (`Allow` is set by the router).
pub(crate) async fn method_not_allowed() -> error::ApiError {
    error::ApiError::MethodNotAllowed
}

/// Request id of the current request (from `x-request-id` or made here).
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Takes `x-request-id` from the request (if sane) or makes one; puts it on every answer.
pub(crate) async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Serves both listeners until `shutdown` completes, then stops accepting and
/// lets in-flight requests finish for at most `grace`. The public listener
/// speaks TLS when `tls` is given.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    public: TcpListener,
    admin: TcpListener,
    gw: Arc<Gateway>,
    admin_opts: admin::AdminOptions,
    limits: listener::ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    tls: Option<Arc<tls::ServerTls>>,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let public_task = tokio::spawn(listener::serve(
        public,
        public_router(gw.clone()),
        limits,
        rx.clone(),
        tls,
    ));
    let admin_task = tokio::spawn(listener::serve(
        admin,
        admin::router(gw.clone(), admin_opts),
        limits,
        rx,
        None,
    ));
    shutdown.await;
    tracing::info!("shutdown requested: no new connections; finishing in-flight requests");
    let _ = tx.send(true);
    let both = async {
        let a = public_task.await;
        let b = admin_task.await;
        (a, b)
    };
    match tokio::time::timeout(grace, both).await {
        Ok((a, b)) => {
            a.map_err(std::io::Error::other)??;
            b.map_err(std::io::Error::other)??;
        }
        Err(_) => tracing::warn!(
            grace_secs = grace.as_secs(),
            "in-flight requests did not finish within the grace period"
        ),
    }
    Ok(())
}
