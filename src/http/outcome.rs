//! How one webhook ended, as a type: what its log line says (`outcome=`), what
//! the status page counts, and what step 7 keeps for duplicates. One enum, so
//! a misspelt outcome cannot silently change idempotency.

/// The outcome of one webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not decided yet (the pipeline is still running).
    Pending,
    // Refused before a route was called (steps 1–6).
    UnknownBot,
    BodyTooLarge,
    BodyRead,
    BodyTimeout,
    Unauthorized,
    RateLimited,
    InvalidJson,
    Schema,
    NoRoute,
    /// The route's request could not be rendered: nothing was sent.
    RenderError,
    // Step 7.
    /// A duplicate of a finished request: the first answer again.
    Replayed,
    /// A duplicate of a request still under way: 409.
    InProgress,
    // Step 8 (and `on_failure: queue`).
    /// Committed to the store: 202.
    Accepted,
    /// A duplicate of a stored delivery: its id again.
    Duplicate,
    /// The store did not answer: nothing accepted.
    StoreError,
    /// `--max-pending` deliveries are pending: nothing accepted.
    QueueFull,
    // Step 9: not called.
    Open,
    Paused,
    HalfOpen,
    BulkheadFull,
    /// The downstream's outbound rate limit had no token within the deadline.
    OutboundRateLimited,
    // Step 10.
    /// A status in the route's `success` set.
    Delivered,
    /// A non-success answer that retrying will not fix, passed to the bot.
    Refused,
    /// The last try failed.
    Failed,
    /// The deadline ran out first.
    Deadline,
    /// The OAuth2 token endpoint failed.
    TokenError,
}

impl Outcome {
    /// The `outcome` field of the webhook log line.
    pub fn as_str(self) -> &'static str {
        use Outcome::*;
        match self {
            Pending => "pending",
            UnknownBot => "unknown_bot",
            BodyTooLarge => "body_too_large",
            BodyRead => "body_read",
            BodyTimeout => "body_timeout",
            Unauthorized => "unauthorized",
            RateLimited => "rate_limited",
            InvalidJson => "invalid_json",
            Schema => "schema",
            NoRoute => "no_route",
            RenderError => "render_error",
            Replayed => "replayed",
            InProgress => "in_progress",
            Accepted => "accepted",
            Duplicate => "duplicate",
            StoreError => "store_error",
            QueueFull => "queue_full",
            Open => "open",
            Paused => "paused",
            HalfOpen => "half_open",
            BulkheadFull => "bulkhead_full",
            OutboundRateLimited => "outbound_rate_limited",
            Delivered => "delivered",
            Refused => "refused",
            Failed => "failed",
            Deadline => "deadline",
            TokenError => "token_error",
        }
    }

    /// Step 7: is this answer final, so that a duplicate gets it again? True
    /// when the downstream answered (a success, or a refusal a repeat would only
    /// get again) or the call was stored (202). Anything else frees the key so
    /// the bot's retry is a real retry.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Outcome::Delivered | Outcome::Refused | Outcome::Accepted | Outcome::Duplicate
        )
    }

    /// The outcome of a request refused with `e` (when no step set one).
    pub fn of_refusal(e: &super::error::ApiError) -> Outcome {
        use super::error::ApiError as E;
        match e {
            E::UnknownBot { .. } | E::NotFound | E::MethodNotAllowed => Outcome::UnknownBot,
            E::BodyTooLarge { .. } => Outcome::BodyTooLarge,
            E::BodyRead => Outcome::BodyRead,
            E::BodyTimeout { .. } => Outcome::BodyTimeout,
            E::Unauthorized | E::AdminUnauthorized | E::Forbidden { .. } => Outcome::Unauthorized,
            E::RateLimited { .. } => Outcome::RateLimited,
            E::InvalidJson { .. } | E::NotJsonMediaType { .. } => Outcome::InvalidJson,
            E::Schema { .. } => Outcome::Schema,
            E::NoRoute { .. } => Outcome::NoRoute,
            E::Render { .. } | E::AnswerTemplate { .. } => Outcome::RenderError,
            E::InProgress { .. } => Outcome::InProgress,
            E::StoreUnavailable { .. } => Outcome::StoreError,
            E::QueueFull { .. } => Outcome::QueueFull,
            E::Unavailable { reason, .. } => Outcome::unavailable(reason),
            E::Downstream { .. } => Outcome::Failed,
            E::Deadline { .. } => Outcome::Deadline,
            E::DownstreamAuth { .. } => Outcome::TokenError,
            E::BadState | E::UnknownDelivery { .. } | E::UnknownRoute { .. } => Outcome::NoRoute,
        }
    }

    /// Step 9's reason for a route that will not be called now.
    pub fn unavailable(why: &str) -> Outcome {
        match why {
            "open" => Outcome::Open,
            "paused" => Outcome::Paused,
            "half_open" => Outcome::HalfOpen,
            "rate_limited" => Outcome::OutboundRateLimited,
            _ => Outcome::BulkheadFull,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Outcome::{self, *};

    const ALL: [Outcome; 27] = [
        Pending,
        UnknownBot,
        BodyTooLarge,
        BodyRead,
        BodyTimeout,
        Unauthorized,
        RateLimited,
        InvalidJson,
        Schema,
        NoRoute,
        RenderError,
        Replayed,
        InProgress,
        Accepted,
        Duplicate,
        StoreError,
        QueueFull,
        Open,
        Paused,
        HalfOpen,
        BulkheadFull,
        OutboundRateLimited,
        Delivered,
        Refused,
        Failed,
        Deadline,
        TokenError,
    ];

    #[test]
    fn only_answers_from_the_downstream_or_the_store_are_kept() {
        let kept: Vec<_> = ALL.iter().filter(|o| o.is_final()).collect();
        assert_eq!(kept, [&Accepted, &Duplicate, &Delivered, &Refused]);
    }

    #[test]
    fn log_names_are_distinct() {
        let mut names: Vec<_> = ALL.iter().map(|o| o.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }
}
