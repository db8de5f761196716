//! Every refusal the HTTP surface gives, as one enum, and its one mapping to a
//! response: the status and the `error` kind are decided here and nowhere
//! else. The body is JSON `{"error": "<kind>", "message": "…", …}` with
//! `Retry-After` where the client should come back later.
//!
//! Never carries a secret, a store's or a payload's text: messages are built
//! from names (bot, route), limits and statuses.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::payload::Violation;

/// A refusal of either listener.
#[derive(Debug)]
pub enum ApiError {
    /// No such endpoint (either listener).
    NotFound,
    /// The endpoint exists, not for this method (the router adds `Allow`).
    MethodNotAllowed,
    /// Step 1: no bot with this id (the id is cut and escaped by the caller).
    UnknownBot { bot: String },
    /// Step 2: the body is over `--max-body`.
    BodyTooLarge { limit: usize },
    /// Step 2: the body could not be read (the client went away, bad framing).
    BodyRead,
    /// Step 2: the body was not fully received within `--body-timeout`.
    BodyTimeout { timeout: Duration },
    /// Step 3: missing or wrong credentials (says nothing about the secret).
    Unauthorized,
    /// After step 3: the bot is over its `rate_limit`.
    RateLimited { bot: String, retry_after: Duration },
    /// Step 4: not JSON, or nested too deep.
    InvalidJson { message: String },
    /// Step 4: a form body (`application/x-www-form-urlencoded` or
    /// `multipart/form-data`), what Cognigy's HTTP Request node sends unless its
    /// payload type is set to JSON. `media_type` is one of those two names,
    /// never the header as sent.
    NotJsonMediaType { media_type: &'static str },
    /// Step 5: the bot's or the route's payload schema failed.
    Schema {
        violations: Vec<Violation>,
        route: Option<String>,
    },
    /// Step 6: no route for the intent.
    NoRoute { intent: Option<String> },
    /// The route's request could not be rendered from this payload: nothing was sent.
    Render { route: String, message: String },
    /// The route's `response.body` or `fallback.body` did not render to JSON.
    AnswerTemplate {
        route: String,
        part: &'static str,
        message: String,
    },
    /// Step 7: a request with this idempotency key is under way.
    InProgress { route: String },
    /// The delivery store did not answer: nothing was accepted.
    StoreUnavailable { message: &'static str },
    /// Step 8: `--max-pending` deliveries are pending: nothing was accepted.
    QueueFull { limit: u64 },
    /// Step 9: the route is open, paused or full, and has no fallback.
    Unavailable {
        route: String,
        reason: &'static str,
        retry_after: Duration,
    },
    /// Step 10: the last try failed.
    Downstream {
        route: String,
        status: Option<u16>,
        reason: &'static str,
        tries: u32,
    },
    /// Step 10: the deadline ran out first.
    Deadline { route: String, deadline: Duration },
    /// Step 10: the OAuth2 token endpoint failed.
    DownstreamAuth { route: String, message: String },
    /// Admin: no or a wrong admin token.
    AdminUnauthorized,
    /// Admin: refused before any other check: a cross-site request to change
    /// state (CSRF), or a `Host` the listener does not answer to (DNS
    /// rebinding). The message says which, never the header's value.
    Forbidden { message: &'static str },
    /// Admin: a bad `state` filter.
    BadState,
    /// Admin: no such delivery.
    UnknownDelivery { id: String },
    /// Admin: no such route.
    UnknownRoute { route: String },
}

impl ApiError {
    /// The HTTP status of this refusal.
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            NotFound | UnknownBot { .. } | UnknownDelivery { .. } | UnknownRoute { .. } => {
                StatusCode::NOT_FOUND
            }
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            NotJsonMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyRead | InvalidJson { .. } | BadState => StatusCode::BAD_REQUEST,
            BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Unauthorized | AdminUnauthorized => StatusCode::UNAUTHORIZED,
            Forbidden { .. } => StatusCode::FORBIDDEN,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Schema { .. } | NoRoute { .. } | Render { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AnswerTemplate { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            InProgress { .. } => StatusCode::CONFLICT,
            StoreUnavailable { .. } | QueueFull { .. } | Unavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Downstream { .. } | DownstreamAuth { .. } => StatusCode::BAD_GATEWAY,
            Deadline { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `error` field: a stable, machine-readable kind.
    pub fn kind(&self) -> &'static str {
        use ApiError::*;
        match self {
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            UnknownBot { .. } => "unknown_bot",
            BodyTooLarge { .. } => "body_too_large",
            BodyRead => "body_read",
            BodyTimeout { .. } => "body_timeout",
            Unauthorized | AdminUnauthorized => "unauthorized",
            Forbidden { .. } => "forbidden",
            RateLimited { .. } => "rate_limited",
            InvalidJson { .. } => "invalid_json",
            NotJsonMediaType { .. } => "unsupported_media_type",
            Schema { .. } => "schema",
            NoRoute { .. } => "no_route",
            Render { .. } | AnswerTemplate { .. } => "render",
            InProgress { .. } => "in_progress",
            StoreUnavailable { .. } => "store_unavailable",
            QueueFull { .. } => "queue_full",
            Unavailable { .. } => "unavailable",
            Downstream { .. } => "downstream",
            Deadline { .. } => "deadline",
            DownstreamAuth { .. } => "downstream_auth",
            BadState => "bad_state",
            UnknownDelivery { .. } => "unknown_delivery",
            UnknownRoute { .. } => "unknown_route",
        }
    }

    /// Seconds for `Retry-After`, where the client should come back later.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::InProgress { .. } | ApiError::StoreUnavailable { .. } => Some(1),
            // The queue drains at the downstream's pace: come back well later.
            ApiError::QueueFull { .. } => Some(QUEUE_FULL_RETRY_AFTER.as_secs()),
            ApiError::Unavailable { retry_after, .. }
            | ApiError::RateLimited { retry_after, .. } => Some(retry_after_secs(*retry_after)),
            _ => None,
        }
    }

    /// The human message and the extra fields of the body.
    fn message_and_fields(self) -> (String, Map<String, Value>) {
        use ApiError::*;
        let mut extra = Map::new();
        let message = match self {
            NotFound => "no such endpoint".to_owned(),
            MethodNotAllowed => "this endpoint does not take this method (see Allow)".to_owned(),
            UnknownBot { bot } => format!("no bot `{bot}` is configured"),
            BodyTooLarge { limit } => {
                extra.insert("limit".into(), limit.into());
                format!("the body is larger than {limit} bytes")
            }
            BodyRead => "the request body could not be read".to_owned(),
            BodyTimeout { timeout } => format!(
                "the request body was not received within {}",
                humantime::format_duration(timeout)
            ),
            Unauthorized => "missing or invalid credentials".to_owned(),
            RateLimited { bot, .. } => format!("bot `{bot}` is over its rate limit; slow down"),
            InvalidJson { message } => message,
            NotJsonMediaType { media_type } => {
                extra.insert("content_type".into(), media_type.into());
                format!(
                    "the body is {media_type}, not JSON: set the HTTP Request node's payload \
                     type to JSON (Content-Type: application/json)"
                )
            }
            Schema { violations, route } => {
                let n = violations.len();
                extra.insert(
                    "violations".into(),
                    serde_json::to_value(violations).unwrap_or_default(),
                );
                if let Some(r) = route {
                    extra.insert("route".into(), r.into());
                }
                format!(
                    "the payload violates the schema ({n} problem{})",
                    if n == 1 { "" } else { "s" }
                )
            }
            NoRoute { intent } => {
                extra.insert("intent".into(), intent.map_or(Value::Null, Value::from));
                "no route handles this intent and the bot has no default (`*`) route".to_owned()
            }
            Render { route, message } => {
                extra.insert("route".into(), route.into());
                message
            }
            AnswerTemplate {
                route,
                part,
                message,
            } => format!("route `{route}`: {part}: {message}"),
            InProgress { route } => {
                extra.insert("route".into(), route.into());
                "a request with this idempotency key is being handled now; try again".to_owned()
            }
            StoreUnavailable { message } => message.to_owned(),
            QueueFull { limit } => {
                extra.insert("limit".into(), limit.into());
                format!(
                    "the delivery queue is full ({limit} deliveries pending); nothing was \
                     accepted, try again later"
                )
            }
            Unavailable { route, reason, .. } => {
                let message = format!("route `{route}` is not taking calls now ({reason})");
                extra.insert("route".into(), route.into());
                extra.insert("reason".into(), reason.into());
                message
            }
            Downstream {
                route,
                status,
                reason,
                tries,
            } => {
                let message = match status {
                    Some(s) => format!(
                        "route `{route}`: the downstream answered {s} on the last of {tries} tries"
                    ),
                    None => format!("route `{route}`: the last of {tries} tries failed ({reason})"),
                };
                extra.insert("status".into(), status.map_or(Value::Null, Value::from));
                extra.insert("reason".into(), reason.into());
                extra.insert("route".into(), route.into());
                message
            }
            Deadline { route, deadline } => {
                let message = format!(
                    "route `{route}`: no answer within the deadline of {}",
                    humantime::format_duration(deadline)
                );
                extra.insert("route".into(), route.into());
                message
            }
            DownstreamAuth { route, message } => {
                let message = format!("route `{route}`: {message}");
                extra.insert("route".into(), route.into());
                message
            }
            AdminUnauthorized => {
                "admin token required: Authorization: Bearer <GATEWAY_ADMIN_TOKEN>".to_owned()
            }
            Forbidden { message } => message.to_owned(),
            BadState => "state must be pending, leased, delivered or dead".to_owned(),
            UnknownDelivery { id } => format!("no delivery `{id}`"),
            UnknownRoute { route } => format!("no route `{route}`"),
        };
        (message, extra)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let kind = self.kind();
        let retry_after = self.retry_after();
        let (message, extra) = self.message_and_fields();
        let mut body = Map::new();
        body.insert("error".into(), kind.into());
        body.insert("message".into(), message.into());
        body.extend(extra);
        let mut resp = (status, Json(Value::Object(body))).into_response();
        if let Some(s) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// A JSON error body for a refusal made outside a handler (e.g. a middleware).
pub fn json_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, Json(json!({"error": kind, "message": message}))).into_response()
}

/// `Retry-After` of a `queue_full` refusal.
pub const QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind has one status, decided here (a table of the SPEC §5 steps).
    #[test]
    fn each_refusal_has_its_status_and_kind() {
        let d = Duration::from_millis(1500);
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (ApiError::NotFound, 404, "not_found"),
            (ApiError::MethodNotAllowed, 405, "method_not_allowed"),
            (ApiError::UnknownBot { bot: "x".into() }, 404, "unknown_bot"),
            (ApiError::BodyTooLarge { limit: 1 }, 413, "body_too_large"),
            (ApiError::BodyRead, 400, "body_read"),
            (ApiError::BodyTimeout { timeout: d }, 408, "body_timeout"),
            (ApiError::Unauthorized, 401, "unauthorized"),
            (
                ApiError::RateLimited {
                    bot: "b".into(),
                    retry_after: d,
                },
                429,
                "rate_limited",
            ),
            (
                ApiError::InvalidJson {
                    message: "m".into(),
                },
                400,
                "invalid_json",
            ),
            (
                ApiError::NotJsonMediaType {
                    media_type: "application/x-www-form-urlencoded",
                },
                415,
                "unsupported_media_type",
            ),
            (
                ApiError::Schema {
                    violations: vec![],
                    route: None,
                },
                422,
                "schema",
            ),
            (ApiError::NoRoute { intent: None }, 422, "no_route"),
            (
                ApiError::Render {
                    route: "r".into(),
                    message: "m".into(),
                },
                422,
                "render",
            ),
            (
                ApiError::AnswerTemplate {
                    route: "r".into(),
                    part: "response.body",
                    message: "m".into(),
                },
                500,
                "render",
            ),
            (
                ApiError::InProgress { route: "r".into() },
                409,
                "in_progress",
            ),
            (
                ApiError::StoreUnavailable { message: "m" },
                503,
                "store_unavailable",
            ),
            (ApiError::QueueFull { limit: 5 }, 503, "queue_full"),
            (
                ApiError::Unavailable {
                    route: "r".into(),
                    reason: "open",
                    retry_after: d,
                },
                503,
                "unavailable",
            ),
            (
                ApiError::Downstream {
                    route: "r".into(),
                    status: Some(500),
                    reason: "status",
                    tries: 3,
                },
                502,
                "downstream",
            ),
            (
                ApiError::Deadline {
                    route: "r".into(),
                    deadline: d,
                },
                504,
                "deadline",
            ),
            (
                ApiError::DownstreamAuth {
                    route: "r".into(),
                    message: "m".into(),
                },
                502,
                "downstream_auth",
            ),
            (ApiError::AdminUnauthorized, 401, "unauthorized"),
            (ApiError::Forbidden { message: "m" }, 403, "forbidden"),
            (ApiError::BadState, 400, "bad_state"),
            (
                ApiError::UnknownDelivery { id: "i".into() },
                404,
                "unknown_delivery",
            ),
            (
                ApiError::UnknownRoute { route: "r".into() },
                404,
                "unknown_route",
            ),
        ];
        for (e, status, kind) in cases {
            assert_eq!((e.status().as_u16(), e.kind()), (status, kind), "{e:?}");
        }
    }

    #[test]
    fn a_full_queue_says_when_to_come_back() {
        let resp = ApiError::QueueFull { limit: 5 }.into_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "30");
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let e = ApiError::Unavailable {
            route: "r".into(),
            reason: "paused",
            retry_after: Duration::from_millis(1500),
        };
        let resp = e.into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
