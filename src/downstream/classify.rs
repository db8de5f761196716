//! Response classification, beside the retry policy: what one send produced
//! (a status, or a transport error) → the retry policy's [`TryOutcome`], the
//! breaker's outcome, the metrics label, and the route's 429 pause. A pure
//! function with a table test of every row; `client::attempt` only applies it.
//!
//! Never does I/O, never reads a clock.

use std::time::Duration;

use super::retry::TryOutcome;
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
/// cap on an honoured `Retry-After` is `retry_after_max`.
pub fn classify(sent: Sent, success: &StatusSet, retry_after_max: Duration) -> Class {
    let failure = |outcome, reason| Class {
        outcome,
        reason,
        breaker: Some(Outcome::Failure),
        label: "failure",
        pause: None,
    };
    match sent {
        Sent::Answer { status, .. } if success.contains(status) => Class {
            outcome: TryOutcome::Success,
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
                    reason: "rate_limited",
                    breaker: None,
                    label: "rate_limited",
                    pause: Some(
                        retry_after
                            .unwrap_or(Duration::from_secs(1))
                            .min(retry_after_max),
                    ),
                }
            } else if status >= 500 {
                failure(outcome, "status")
            } else {
                // A refusal (4xx, or a 3xx the route does not count as success):
                // the downstream is healthy.
                Class {
                    outcome,
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
    use crate::downstream::retry::is_retryable;

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
    /// pause (seconds), retryable by the policy.
    #[test]
    fn every_kind_of_answer_is_classified() {
        use Outcome::{Failure as F, Success as S};
        let max = Duration::from_secs(30);
        #[rustfmt::skip]
        type Row = (Sent, &'static str, Option<Outcome>, &'static str, Option<u64>, bool);
        let rows: Vec<Row> = vec![
            (
                answer(200, None),
                "success",
                Some(S),
                "success",
                None,
                false,
            ),
            (
                answer(204, None),
                "success",
                Some(S),
                "success",
                None,
                false,
            ),
            (
                answer(409, None),
                "success",
                Some(S),
                "success",
                None,
                false,
            ),
            (answer(301, None), "status", Some(S), "refused", None, false),
            (answer(400, None), "status", Some(S), "refused", None, false),
            (answer(401, None), "status", Some(S), "refused", None, false),
            (answer(404, None), "status", Some(S), "refused", None, false),
            (answer(422, None), "status", Some(S), "refused", None, false),
            (
                answer(429, None),
                "rate_limited",
                None,
                "rate_limited",
                Some(1),
                true,
            ),
            (
                answer(429, Some(7)),
                "rate_limited",
                None,
                "rate_limited",
                Some(7),
                true,
            ),
            (
                answer(429, Some(999)),
                "rate_limited",
                None,
                "rate_limited",
                Some(30),
                true,
            ),
            (answer(500, None), "status", Some(F), "failure", None, false),
            (answer(502, None), "status", Some(F), "failure", None, true),
            (
                answer(503, Some(5)),
                "status",
                Some(F),
                "failure",
                None,
                true,
            ),
            (answer(504, None), "status", Some(F), "failure", None, true),
            (
                Sent::ConnectError,
                "connect",
                Some(F),
                "failure",
                None,
                true,
            ),
            (Sent::Timeout, "timeout", Some(F), "failure", None, true),
            (Sent::Broken, "broken", Some(F), "failure", None, false),
        ];
        for (sent, reason, breaker, label, pause, retryable) in rows {
            let c = classify(sent, &success(), max);
            assert_eq!(
                (
                    c.reason,
                    c.breaker,
                    c.label,
                    c.pause.map(|d| d.as_secs()),
                    is_retryable(&c.outcome)
                ),
                (reason, breaker, label, pause, retryable),
                "{sent:?}"
            );
        }
    }

    #[test]
    fn a_success_status_wins_over_its_class() {
        // 503 in the success set (a route that says so) is a success.
        let mut s = StatusSet::default();
        s.insert(503);
        let c = classify(answer(503, None), &s, Duration::from_secs(1));
        assert_eq!(c.outcome, TryOutcome::Success);
    }
}
