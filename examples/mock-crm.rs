//! A mock CRM for trying the gateway on a laptop: `cargo run --example mock-crm`.
//!
//! It listens on `127.0.0.1:8081` (or `MOCK_CRM_ADDR`), where the example
//! routes in `routes/` send their requests by default (the `:-` defaults of
//! their `${…_BASE_URL}` variables). It prints every request it receives, with
//! credentials masked, and answers like a CRM:
//! - `POST …/token` (an OAuth2 token endpoint): `200` with an access token;
//! - `GET …/health`, `GET …/healthz`: `200 {"status": "ok"}`;
//! - `POST`: `201` with a new `id` and what it received; `GET`, `PUT`, `PATCH`,
//!   `DELETE`: `200` likewise;
//! - a request whose `Idempotency-Key` it has seen before: the first answer again.
//!
//! `MOCK_CRM_STATUS=503` (or any status) makes every CRM call (not tokens, not
//! health) answer that status instead, to watch retries, the breaker, `fallback`
//! and `on_failure: queue` at work.
//!
//! Not for production: it keeps everything in memory and checks no credentials.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Largest request body read (the gateway sends at most a rendered template).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Headers worth printing, in this order; the others are left out.
const SHOWN_HEADERS: &[&str] = &[
    "content-type",
    "authorization",
    "x-api-key",
    "idempotency-key",
    "x-request-id",
    "traceparent",
    "x-source",
];

#[derive(Default)]
struct Mock {
    /// Requests answered so far: numbers the ids.
    count: u64,
    /// Tokens issued so far.
    tokens: u64,
    /// First answer per (method, path, Idempotency-Key).
    answers: HashMap<(String, String, String), (StatusCode, Value)>,
}

type Shared = Arc<Mutex<Mock>>;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr: SocketAddr = std::env::var("MOCK_CRM_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8081".into())
        .parse()
        .expect("MOCK_CRM_ADDR must be an address like 127.0.0.1:8081");
    let forced = std::env::var("MOCK_CRM_STATUS").ok().map(|s| {
        s.parse::<u16>()
            .ok()
            .and_then(|n| StatusCode::from_u16(n).ok())
            .expect("MOCK_CRM_STATUS must be an HTTP status like 503")
    });
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mock-crm: cannot listen on {addr}: {e} (set MOCK_CRM_ADDR for another)");
            std::process::exit(2);
        }
    };
    println!("mock-crm listening on http://{addr} (Ctrl-C to stop)");
    if let Some(s) = forced {
        println!("mock-crm: every CRM call answers {s} (MOCK_CRM_STATUS)");
    }
    let app = Router::new()
        .fallback(move |state: State<Shared>, req: Request| handle(state, req, forced))
        .with_state(Shared::default());
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .expect("serve");
}

async fn handle(State(mock): State<Shared>, req: Request, forced: Option<StatusCode>) -> Response {
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let bytes = match to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response(),
    };

    if method == Method::POST && path.ends_with("/token") {
        let n = {
            let mut m = mock.lock().unwrap();
            m.tokens += 1;
            m.tokens
        };
        println!("{method} {path}  -> 200, access token #{n} issued (client credentials)\n");
        return json_answer(
            StatusCode::OK,
            json!({"access_token": format!("mock-access-token-{n}"), "token_type": "Bearer", "expires_in": 3600}),
        );
    }
    if method == Method::GET && (path.ends_with("/health") || path.ends_with("/healthz")) {
        println!("{method} {path}  -> 200 (health)\n");
        return json_answer(StatusCode::OK, json!({"status": "ok"}));
    }

    let target = if query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{query}")
    };
    let mut printed = format!("{method} {target}\n");
    for name in SHOWN_HEADERS {
        if let Some(v) = parts.headers.get(*name) {
            let v = v.to_str().unwrap_or("(not text)");
            printed.push_str(&format!("  {name}: {}\n", mask(name, v)));
        }
    }
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    if !body.is_null() {
        let pretty = serde_json::to_string_pretty(&body).unwrap_or_default();
        for line in pretty.lines() {
            printed.push_str(&format!("  {line}\n"));
        }
    }

    let key =
        idempotency_key(&parts.headers).map(|k| (method.to_string(), target.clone(), k.to_owned()));
    let mut m = mock.lock().unwrap();
    if let Some((status, answer)) = key.as_ref().and_then(|k| m.answers.get(k)).cloned() {
        println!(
            "{printed}  -> {} (a repeat of this Idempotency-Key: the first answer again)\n",
            status.as_u16()
        );
        return json_answer(status, answer);
    }
    m.count += 1;
    let id = format!("mock-{:04}", m.count);
    let (status, answer) = match forced {
        Some(s) => (
            s,
            json!({"error": "mock_failure", "message": format!("MOCK_CRM_STATUS={}", s.as_u16())}),
        ),
        None => {
            let status = if method == Method::POST {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let received =
                json!({"method": method.as_str(), "path": path, "query": query, "body": body});
            (status, json!({"id": id, "received": received}))
        }
    };
    if let Some(k) = key
        && status.is_success()
    {
        m.answers.insert(k, (status, answer.clone()));
    }
    drop(m);
    println!("{printed}  -> {} {answer}\n", status.as_u16());
    json_answer(status, answer)
}

fn idempotency_key(headers: &HeaderMap) -> Option<&str> {
    headers.get("idempotency-key").and_then(|v| v.to_str().ok())
}

/// Credentials are shown by their scheme only.
fn mask(name: &str, value: &str) -> String {
    match name {
        "authorization" => match value.split_once(' ') {
            Some((scheme, _)) => format!("{scheme} ***"),
            None => "***".into(),
        },
        "x-api-key" => "***".into(),
        _ => value.to_owned(),
    }
}

fn json_answer(status: StatusCode, body: Value) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}
