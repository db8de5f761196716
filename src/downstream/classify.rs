//! Response classification, beside the retry policy: what one send produced
//! (a status, or a transport error) and whether the request carried an
//! idempotency key → the retry policy's [`TryOutcome`], whether another try is
//! allowed, the breaker's outcome, the metrics label, and the route's 429
//! pause. A pure function with a table test of every row; `client::attempt`
//! only applies it.
//!
//! Never does I/O, never reads a clock.

use std::time::Duration;

use super::retry::{RATE_LIMIT_PAUSE, TryOutcome, is_retryable};
use crate::breaker::Outcome;

/// A set of HTTP statuses (100–599): a route's `success:` statuses.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    pub fn insert(&mut self, status: u16) {
        if status < 640 {
            self.0[(status / 64) as usize] |= 1 << (status % 64);
        }
    }
    pub fn insert_class(&mut self, class: u8) {
        for s in (class as u16 * 100)..(class as u16 * 100 + 100) {
            self.insert(s);
        }
    }
    pub fn contains(&self, status: u16) -> bool {
        status < 640 && self.0[(status / 64) as usize] & (1 << (status % 64)) != 0
    }
}

impl std::fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set()
            .entries((100..600).filter(|s| self.contains(*s)))
            .finish()
    }
}

/// What one send produced, as far as classification cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The downstream answered with this status (and `Retry-After`, parsed).
    Answer {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// The connection could not be made: nothing reached the downstream.
    ConnectError,
    /// The per-try timeout fired.
    Timeout,
    /// The request may have reached the downstream but failed (reset, unreadable body).
    Broken,
}

/// How one try is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    /// For the retry policy.
    pub outcome: TryOutcome,
    /// Whether another try may be made (SPEC §7.3's rule, [`is_retryable`]):
    /// also what `on_failure: queue` asks of the last try.
    pub retryable: bool,
    /// For logs and the stored try: `success`, `status`, `rate_limited`,
    /// `connect`, `timeout` or `broken`.
    pub reason: &'static str,
    /// For the breaker; `None`: not counted (a 429 is not a failure).
    pub breaker: Option<Outcome>,
    /// The `outcome` label of the try metric: `success`, `failure`, `refused`, `rate_limited`.
    pub label: &'static str,
    /// Pause the route this long (a 429: its `Retry-After`, else 1 s, capped).
    pub pause: Option<Duration>,
}

/// Classifies one send for a route whose success set is `success` and whose
/// cap on an honoured `Retry-After` is `retry_after_max`; `idempotent`: the
/// request carried an `Idempotency-Key` (every try of a stored delivery does).
pub fn classify(
    sent: Sent,
    success: &StatusSet,
    retry_after_max: Duration,
    idempotent: bool,
) -> Class {
    let failure = |outcome, reason| Class {
        outcome,
        retryable: is_retryable(&outcome, idempotent),
        reason,
        breaker: Some(Outcome::Failure),
        label: "failure",
        pause: None,
    };
    match sent {
        Sent::Answer { status, .. } if success.contains(status) => Class {
            outcome: TryOutcome::Success,
            retryable: false,
            reason: "success",
            breaker: Some(Outcome::Success),
            label: "success",
            pause: None,
        },
        Sent::Answer {
            status,
            retry_after,
        } => {
            let outcome = TryOutcome::Status {
                code: status,
                retry_after,
            };
            if status == 429 {
                // Not a failure: the downstream asks us to slow down. Pause the route.
                Class {
                    outcome,
                    retryable: is_retryable(&outcome, idempotent),
                    reason: "rate_limited",
                    breaker: None,
                    label: "rate_limited",
                    pause: Some(retry_after.unwrap_or(RATE_LIMIT_PAUSE).min(retry_after_max)),
                }
            } else if status >= 500 {
                failure(outcome, "status")
            } else {
                // A refusal (4xx, or a 3xx the route does not count as success):
                // the downstream is healthy.
                Class {
                    outcome,
                    retryable: is_retryable(&outcome, idempotent),
                    reason: "status",
                    breaker: Some(Outcome::Success),
                    label: "refused",
                    pause: None,
                }
            }
        }
        Sent::ConnectError => failure(TryOutcome::ConnectError, "connect"),
        Sent::Timeout => failure(TryOutcome::Timeout, "timeout"),
        Sent::Broken => failure(TryOutcome::OtherError, "broken"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn success() -> StatusSet {
        let mut s = StatusSet::default();
        s.insert_class(2);
        s.insert(409);
        s
    }

    fn answer(status: u16, retry_after: Option<u64>) -> Sent {
        Sent::Answer {
            status,
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    /// Every row: what was sent → reason, breaker outcome, metric label,
    /// pause (seconds), retryable with an idempotency key, retryable without.
    #[test]
    fn every_kind_of_answer_is_classified() {
        use Outcome::{Failure as F, Success as S};
        let max = Duration::from_secs(30);
        type Row = (
            Sent,
            &'static str,
            Option<Outcome>,
            &'static str,
            Option<u64>,
            bool,
            bool,
        );
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            (answer(200, None),      "success",      Some(S), "success",      None,     false, false),
            (answer(204, None),      "success",      Some(S), "success",      None,     false, false),
            (answer(409, None),      "success",      Some(S), "success",      None,     false, false),
            (answer(301, None),      "status",       Some(S), "refused",      None,     false, false),
            (answer(400, None),      "status",       Some(S), "refused",      None,     false, false),
            (answer(401, None),      "status",       Some(S), "refused",      None,     false, false),
            (answer(404, None),      "status",       Some(S), "refused",      None,     false, false),
            (answer(422, None),      "status",       Some(S), "refused",      None,     false, false),
            (answer(429, None),      "rate_limited", None,    "rate_limited", Some(1),  true,  true),
            (answer(429, Some(7)),   "rate_limited", None,    "rate_limited", Some(7),  true,  true),
            (answer(429, Some(999)), "rate_limited", None,    "rate_limited", Some(30), true,  true),
            // the write may have been applied: retried only with a key (SPEC 7.3)
            (answer(500, None),      "status",       Some(F), "failure",      None,     true,  false),
            (answer(501, None),      "status",       Some(F), "failure",      None,     false, false),
            (answer(502, None),      "status",       Some(F), "failure",      None,     true,  true),
            (answer(503, Some(5)),   "status",       Some(F), "failure",      None,     true,  true),
            (answer(504, None),      "status",       Some(F), "failure",      None,     true,  true),
            (Sent::ConnectError,     "connect",      Some(F), "failure",      None,     true,  true),
            (Sent::Timeout,          "timeout",      Some(F), "failure",      None,     true,  true),
            // dropped after the request was sent: as a 500
            (Sent::Broken,           "broken",       Some(F), "failure",      None,     true,  false),
        ];
        for (sent, reason, breaker, label, pause, keyed, unkeyed) in rows {
            let with_key = classify(sent, &success(), max, true);
            let without = classify(sent, &success(), max, false);
            assert_eq!(
                (
                    with_key.reason,
                    with_key.breaker,
                    with_key.label,
                    with_key.pause.map(|d| d.as_secs()),
                    with_key.retryable,
                    without.retryable,
                ),
                (reason, breaker, label, pause, keyed, unkeyed),
                "{sent:?}"
            );
            // the key changes nothing but the retry decision
            assert_eq!(
                (
                    without.reason,
                    without.breaker,
                    without.label,
                    without.pause
                ),
                (
                    with_key.reason,
                    with_key.breaker,
                    with_key.label,
                    with_key.pause
                ),
                "{sent:?}"
            );
            // and the policy agrees with the row
            assert_eq!(is_retryable(&with_key.outcome, true), keyed, "{sent:?}");
            assert_eq!(is_retryable(&without.outcome, false), unkeyed, "{sent:?}");
        }
    }

    #[test]
    fn a_success_status_wins_over_its_class() {
        // 503 in the success set (a route that says so) is a success.
        let mut s = StatusSet::default();
        s.insert(503);
        let c = classify(answer(503, None), &s, Duration::from_secs(1), true);
        assert_eq!(c.outcome, TryOutcome::Success);
        assert!(!c.retryable);
    }
}
