//! Retry policy: owns the decision "try again or not, and after how long",
//! for synchronous tries inside a request's deadline and for stored async
//! deliveries on their schedule.
//!
//! It never sleeps, never does I/O and never reads a clock: the caller
//! passes the outcome of the last try, what is left of the deadline, the
//! current wall-clock time (for `Retry-After` HTTP-dates) and an RNG (for
//! jitter). That keeps every rule here a pure function, tested alone.
//!
//! What counts as retryable is decided once, in [`is_retryable`]: failures
//! where the request most likely had no effect downstream, or where the
//! downstream asked us to come back (429, 503); and, when the request carries
//! an idempotency key, a 500 or a connection dropped after sending (SPEC §7.3).

use std::time::{Duration, SystemTime};

use rand::{Rng, RngExt};

/// How long a 429 without a (usable) `Retry-After` pauses its route, and how
/// long a sync call waits before trying again after one (SPEC §7.3).
pub const RATE_LIMIT_PAUSE: Duration = Duration::from_secs(1);

/// Validated exponential backoff bounds: `0 < initial <= max`.
///
/// The ceiling of the wait after try `n` is `min(max, initial * 2^(n-1))`;
/// the actual wait is drawn uniformly from `[0, ceiling]` ("full jitter"),
/// so that callers failing together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the wait after the first try.
    initial: Duration,
    /// The ceiling never grows beyond this.
    max: Duration,
}

impl Backoff {
    /// `initial` must be above zero and `max` at least `initial`.
    pub fn try_new(initial: Duration, max: Duration) -> Result<Self, &'static str> {
        if initial.is_zero() {
            return Err("backoff.initial must be above zero");
        }
        if max < initial {
            return Err("backoff.max must be at least backoff.initial");
        }
        Ok(Self { initial, max })
    }

    pub fn initial(&self) -> Duration {
        self.initial
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// Upper bound of the wait after `attempt` tries (`0` is treated as `1`):
    /// `min(max, initial * 2^(attempt-1))`, without overflow for any `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exponent = attempt.max(1) - 1;
        2u32.checked_pow(exponent)
            .and_then(|factor| self.initial.checked_mul(factor))
            .map_or(self.max, |d| d.min(self.max))
    }

    /// A wait drawn uniformly from `[0, ceiling(attempt)]` (full jitter).
    pub fn jittered(&self, attempt: u32, rng: &mut (impl Rng + ?Sized)) -> Duration {
        let ceiling = self.ceiling(attempt).as_nanos();
        let nanos = rng.random_range(0..=ceiling);
        duration_from_nanos(nanos)
    }
}

/// `Duration::from_nanos` for `u128`; exact for every value a `Duration` can
/// hold (callers only pass values at most a `Duration`'s own nanoseconds).
fn duration_from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 10^9, so it fits in a u32.
    let subsec = (nanos % NANOS_PER_SEC) as u32;
    Duration::new(secs, subsec)
}

/// The route's compiled retry settings (`retry:` in a route file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Sync: total tries, the first one included. Config guarantees `>= 1`;
    /// `0` behaves like `1` (no retry).
    pub attempts: u32,
    /// Sync: waits between tries.
    pub backoff: Backoff,
    /// Cap on an honoured `Retry-After` (sync and async).
    pub retry_after_max: Duration,
    /// Async: the waits between tries; `1 + schedule.len()` tries in all.
    pub schedule: Vec<Duration>,
}

/// What one try produced, as classified by the downstream client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    /// A status the route counts as success (its `success:` set).
    Success,
    /// The connection could not be made: nothing reached the downstream.
    ConnectError,
    /// The per-try timeout fired (connect, send or while waiting for the answer).
    Timeout,
    /// A status the route does *not* count as success.
    Status {
        code: u16,
        /// The answer's `Retry-After`, already parsed with
        /// [`parse_retry_after`]; only honoured on 429 and 503.
        retry_after: Option<Duration>,
    },
    /// Any other failure: the request could not be built, TLS was refused,
    /// the connection broke after the request was sent, the answer's body
    /// was unreadable… The downstream may have acted on it: retried only when
    /// the request carries an idempotency key.
    OtherError,
}

impl TryOutcome {
    /// A non-success status without a `Retry-After`.
    pub fn status(code: u16) -> Self {
        Self::Status {
            code,
            retry_after: None,
        }
    }

    /// The `Retry-After` to honour: on a 429 (where a missing one means
    /// [`RATE_LIMIT_PAUSE`], the route's pause) or a 503 (when present).
    fn honoured_retry_after(&self) -> Option<Duration> {
        match *self {
            Self::Status {
                code: 429,
                retry_after,
            } => Some(retry_after.unwrap_or(RATE_LIMIT_PAUSE)),
            Self::Status {
                code: 503,
                retry_after,
            } => retry_after,
            _ => None,
        }
    }
}

/// Why no further try will be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GiveUpReason {
    /// The outcome is a success or a failure that retrying will not fix.
    NotRetryable,
    /// All `attempts` tries are used.
    Attempts,
    /// The wait would not fit in what is left of the deadline.
    Deadline,
}

impl GiveUpReason {
    /// Stable snake_case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotRetryable => "not_retryable",
            Self::Attempts => "attempts",
            Self::Deadline => "deadline",
        }
    }
}

impl std::fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do after a synchronous try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Wait this long, then try again. Always shorter than the remaining deadline.
    RetryAfter(Duration),
    /// Stop; the last outcome is the answer.
    GiveUp(GiveUpReason),
}

impl RetryPolicy {
    /// Decide after a synchronous try.
    ///
    /// `attempt` is the number of tries made so far (1 after the first;
    /// `0` is treated as `1`); `idempotent`: the request carries an
    /// idempotency key (see [`is_retryable`]); `remaining` is what is left of
    /// the request's deadline now. The order of the checks: not retryable, then
    /// attempts exhausted, then the wait — a honoured `Retry-After` (429/503,
    /// capped at `retry_after_max`; a 429 without one waits
    /// [`RATE_LIMIT_PAUSE`]) replaces the jittered backoff — which must be
    /// strictly shorter than `remaining`: a retry that could only start at or
    /// after the deadline is pointless, so we give up (`deadline`) instead of
    /// sleeping past it.
    pub fn next_sync(
        &self,
        attempt: u32,
        outcome: &TryOutcome,
        idempotent: bool,
        remaining: Duration,
        rng: &mut (impl Rng + ?Sized),
    ) -> Decision {
        if !is_retryable(outcome, idempotent) {
            return Decision::GiveUp(GiveUpReason::NotRetryable);
        }
        if attempt.max(1) >= self.attempts {
            return Decision::GiveUp(GiveUpReason::Attempts);
        }
        let wait = match outcome.honoured_retry_after() {
            Some(retry_after) => retry_after.min(self.retry_after_max),
            None => self.backoff.jittered(attempt, rng),
        };
        if wait >= remaining {
            return Decision::GiveUp(GiveUpReason::Deadline);
        }
        Decision::RetryAfter(wait)
    }

    /// The wait before try number `attempt + 1` of a stored delivery, or
    /// `None` when the delivery is finished with (dead letter or done).
    ///
    /// `attempt` is the number of tries made so far (`0` is treated as `1`).
    /// `None` once `1 + schedule.len()` tries are used, and for outcomes
    /// [`is_retryable`] refuses (a 400 will not pass on the next try either).
    /// Every try of a stored delivery carries an idempotency key, so the
    /// worker passes `idempotent: true`. A honoured `Retry-After` (capped at
    /// `retry_after_max`) replaces the schedule's wait when it is longer; the
    /// schedule is never shortened.
    pub fn next_async(
        &self,
        attempt: u32,
        outcome: &TryOutcome,
        idempotent: bool,
    ) -> Option<Duration> {
        if !is_retryable(outcome, idempotent) {
            return None;
        }
        let index = usize::try_from(attempt.max(1) - 1).ok()?;
        let scheduled = *self.schedule.get(index)?;
        let wait = match outcome.honoured_retry_after() {
            Some(retry_after) => scheduled.max(retry_after.min(self.retry_after_max)),
            None => scheduled,
        };
        Some(wait)
    }

    /// Total tries a stored delivery gets: `1 + schedule.len()`.
    pub fn async_tries(&self) -> usize {
        self.schedule.len().saturating_add(1)
    }
}

/// Whether another try may help, and is safe (SPEC §7.3).
///
/// Always retried: connect errors (nothing was sent), per-try timeouts, 502,
/// 503, 504 (a proxy or the downstream says it could not handle the request)
/// and 429 (asked to slow down).
///
/// Retried only when the request carries an idempotency key (`idempotent`;
/// every try of a stored delivery does): a 500 and a connection that broke
/// after the request was sent ([`TryOutcome::OtherError`]). A CRM answering
/// 500 to a write has often done part of the work (the row was written, the
/// reply failed); without a key, trying again can duplicate it, so the 500
/// goes back to the bot instead. With one, the CRM can recognise the repeat.
///
/// Never retried: other statuses (a 4xx means the request itself is wrong,
/// 501/505 will not change) and [`TryOutcome::Success`].
pub fn is_retryable(outcome: &TryOutcome, idempotent: bool) -> bool {
    match outcome {
        TryOutcome::ConnectError | TryOutcome::Timeout => true,
        TryOutcome::Status { code: 500, .. } | TryOutcome::OtherError => idempotent,
        TryOutcome::Status { code, .. } => matches!(code, 429 | 502 | 503 | 504),
        TryOutcome::Success => false,
    }
}

/// Parse a `Retry-After` value (RFC 9110 §10.2.3): delta-seconds (`120`) or
/// an HTTP-date, relative to `now`. A date in the past means "now" (zero).
/// Anything else — negative or fractional numbers, signs, unknown date
/// formats, non-ASCII — is `None`. Surrounding whitespace is ignored; an
/// absurdly large number of seconds saturates (the caller caps it anyway).
pub fn parse_retry_after(value: &http::HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if text.is_empty() {
        return None;
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: only overflow can fail the parse.
        let secs = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            backoff: Backoff::try_new(ms(200), secs(2)).unwrap(),
            retry_after_max: secs(30),
            schedule: vec![secs(10), secs(60), secs(300)],
        }
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn retry_after(code: u16, after: u64) -> TryOutcome {
        TryOutcome::Status {
            code,
            retry_after: Some(secs(after)),
        }
    }

    #[test]
    fn backoff_try_new_validates() {
        assert!(Backoff::try_new(Duration::ZERO, secs(1)).is_err());
        assert!(Backoff::try_new(secs(2), secs(1)).is_err());
        assert!(Backoff::try_new(secs(1), secs(1)).is_ok());
        let b = Backoff::try_new(ms(200), secs(2)).unwrap();
        assert_eq!((b.initial(), b.max()), (ms(200), secs(2)));
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::try_new(ms(200), secs(2)).unwrap();
        let ceilings: Vec<_> = (0..=6).map(|n| b.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [
                ms(200),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                secs(2),
                secs(2)
            ]
        );
    }

    #[test]
    fn ceiling_does_not_overflow() {
        let b = Backoff::try_new(ms(200), secs(2)).unwrap();
        for n in [31, 32, 33, 63, 64, 65, 1000, u32::MAX] {
            assert_eq!(b.ceiling(n), secs(2), "attempt {n}");
        }
        // Even when the cap is the largest Duration, nothing panics.
        let huge = Backoff::try_new(secs(1), Duration::MAX).unwrap();
        assert_eq!(huge.ceiling(31), secs(1 << 30));
        assert_eq!(huge.ceiling(64), Duration::MAX);
        let mut r = rng();
        assert!(huge.jittered(64, &mut r) <= Duration::MAX);
        assert!(huge.jittered(u32::MAX, &mut r) <= Duration::MAX);
    }

    #[test]
    fn full_jitter_stays_in_bounds_and_covers_the_range() {
        let b = Backoff::try_new(ms(200), secs(2)).unwrap();
        let mut r = rng();
        for attempt in 1..=8 {
            let cap = b.ceiling(attempt);
            let samples: Vec<Duration> = (0..5_000).map(|_| b.jittered(attempt, &mut r)).collect();
            let lo = *samples.iter().min().unwrap();
            let hi = *samples.iter().max().unwrap();
            assert!(hi <= cap, "attempt {attempt}: {hi:?} > {cap:?}");
            assert!(lo < cap / 20, "attempt {attempt}: lowest {lo:?}");
            assert!(hi > cap * 19 / 20, "attempt {attempt}: highest {hi:?}");
            let mean = samples.iter().sum::<Duration>() / 5_000;
            assert!(mean > cap * 2 / 5 && mean < cap * 3 / 5, "mean {mean:?}");
        }
    }

    /// Each outcome: retryable (with an idempotency key, without one).
    #[test]
    fn retryable_classification() {
        let rows = [
            (TryOutcome::ConnectError, true, true),
            (TryOutcome::Timeout, true, true),
            (TryOutcome::status(429), true, true),
            (TryOutcome::status(502), true, true),
            (TryOutcome::status(503), true, true),
            (TryOutcome::status(504), true, true),
            // the write may have been applied: only a key makes a repeat safe
            (TryOutcome::status(500), true, false),
            (TryOutcome::OtherError, true, false),
            (TryOutcome::Success, false, false),
            (TryOutcome::status(400), false, false),
            (TryOutcome::status(401), false, false),
            (TryOutcome::status(403), false, false),
            (TryOutcome::status(404), false, false),
            (TryOutcome::status(409), false, false),
            (TryOutcome::status(422), false, false),
            (TryOutcome::status(501), false, false),
            (TryOutcome::status(505), false, false),
        ];
        for (outcome, keyed, unkeyed) in rows {
            assert_eq!(
                (is_retryable(&outcome, true), is_retryable(&outcome, false)),
                (keyed, unkeyed),
                "{outcome:?}"
            );
        }
    }

    #[test]
    fn a_500_is_retried_only_with_an_idempotency_key() {
        let p = policy();
        let o = TryOutcome::status(500);
        assert!(matches!(
            p.next_sync(1, &o, true, secs(7), &mut rng()),
            Decision::RetryAfter(w) if w <= ms(200)
        ));
        assert_eq!(
            p.next_sync(1, &o, false, secs(7), &mut rng()),
            Decision::GiveUp(GiveUpReason::NotRetryable)
        );
        assert_eq!(p.next_async(1, &o, true), Some(secs(10)));
        assert_eq!(
            p.next_async(1, &TryOutcome::OtherError, true),
            Some(secs(10))
        );
    }

    #[test]
    fn four_xx_and_500_give_up_at_once() {
        let p = policy();
        for code in [400, 401, 404, 409, 422, 500] {
            assert_eq!(
                p.next_sync(1, &TryOutcome::status(code), false, secs(7), &mut rng()),
                Decision::GiveUp(GiveUpReason::NotRetryable),
                "{code}"
            );
            assert_eq!(p.next_async(1, &TryOutcome::status(code), false), None);
        }
        assert_eq!(
            p.next_sync(1, &TryOutcome::Success, false, secs(7), &mut rng()),
            Decision::GiveUp(GiveUpReason::NotRetryable)
        );
    }

    #[test]
    fn status_429_is_retried_after_the_route_s_pause() {
        let p = policy();
        // without Retry-After: the route is paused 1 s, so the retry waits it out
        assert_eq!(
            p.next_sync(1, &TryOutcome::status(429), false, secs(7), &mut rng()),
            Decision::RetryAfter(RATE_LIMIT_PAUSE)
        );
        // …unless the deadline ends first
        assert_eq!(
            p.next_sync(1, &TryOutcome::status(429), false, ms(900), &mut rng()),
            Decision::GiveUp(GiveUpReason::Deadline)
        );
        assert_eq!(
            p.next_async(1, &TryOutcome::status(429), true),
            Some(secs(10))
        );
        assert_eq!(
            p.next_sync(1, &retry_after(429, 2), false, secs(7), &mut rng()),
            Decision::RetryAfter(secs(2))
        );
    }

    #[test]
    fn attempts_count_the_first_try() {
        let p = policy(); // 3 tries in all
        let outcome = TryOutcome::Timeout;
        for attempt in [0, 1, 2] {
            assert!(matches!(
                p.next_sync(attempt, &outcome, false, secs(7), &mut rng()),
                Decision::RetryAfter(_)
            ));
        }
        for attempt in [3, 4, u32::MAX] {
            assert_eq!(
                p.next_sync(attempt, &outcome, false, secs(7), &mut rng()),
                Decision::GiveUp(GiveUpReason::Attempts)
            );
        }
        for attempts in [0, 1] {
            let single = RetryPolicy {
                attempts,
                ..policy()
            };
            assert_eq!(
                single.next_sync(1, &outcome, false, secs(7), &mut rng()),
                Decision::GiveUp(GiveUpReason::Attempts)
            );
        }
    }

    #[test]
    fn backoff_grows_with_the_attempt() {
        let p = RetryPolicy {
            attempts: 10,
            ..policy()
        };
        let mut r = rng();
        for attempt in 1..10 {
            let cap = p.backoff.ceiling(attempt);
            for _ in 0..200 {
                match p.next_sync(attempt, &TryOutcome::ConnectError, false, secs(60), &mut r) {
                    Decision::RetryAfter(w) => assert!(w <= cap),
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn retry_after_replaces_backoff_and_is_capped() {
        let p = policy();
        // Longer than the backoff cap (2 s): honoured as is.
        assert_eq!(
            p.next_sync(1, &retry_after(503, 5), false, secs(60), &mut rng()),
            Decision::RetryAfter(secs(5))
        );
        // Zero: honoured (retry at once).
        assert_eq!(
            p.next_sync(1, &retry_after(503, 0), false, secs(60), &mut rng()),
            Decision::RetryAfter(Duration::ZERO)
        );
        // Over retry_after_max: capped.
        assert_eq!(
            p.next_sync(1, &retry_after(429, 3600), false, secs(60), &mut rng()),
            Decision::RetryAfter(secs(30))
        );
        // Only 429/503 carry a honoured Retry-After; on 502 it is the backoff.
        let d = p.next_sync(1, &retry_after(502, 5), false, secs(60), &mut rng());
        assert!(
            matches!(d, Decision::RetryAfter(w) if w <= ms(200)),
            "{d:?}"
        );
    }

    #[test]
    fn wait_that_does_not_fit_the_deadline_gives_up() {
        let p = policy();
        assert_eq!(
            p.next_sync(1, &retry_after(429, 5), false, secs(5), &mut rng()),
            Decision::GiveUp(GiveUpReason::Deadline)
        );
        assert_eq!(
            p.next_sync(1, &retry_after(429, 5), false, secs(4), &mut rng()),
            Decision::GiveUp(GiveUpReason::Deadline)
        );
        assert_eq!(
            p.next_sync(1, &retry_after(429, 5), false, ms(5001), &mut rng()),
            Decision::RetryAfter(secs(5))
        );
        // Capped Retry-After still too long for the deadline.
        assert_eq!(
            p.next_sync(1, &retry_after(503, 3600), false, secs(7), &mut rng()),
            Decision::GiveUp(GiveUpReason::Deadline)
        );
        // No time left at all: even a zero wait gives up.
        assert_eq!(
            p.next_sync(1, &TryOutcome::Timeout, false, Duration::ZERO, &mut rng()),
            Decision::GiveUp(GiveUpReason::Deadline)
        );
        // Jittered backoff: with 1 ms left, nearly every draw from [0, 200 ms] gives up.
        let mut r = rng();
        let gave_up = (0..1000)
            .filter(|_| {
                p.next_sync(1, &TryOutcome::Timeout, false, ms(1), &mut r)
                    == Decision::GiveUp(GiveUpReason::Deadline)
            })
            .count();
        assert!(gave_up > 950, "{gave_up}");
    }

    #[test]
    fn async_schedule_gives_one_plus_len_tries() {
        let p = policy();
        assert_eq!(p.async_tries(), 4);
        let o = TryOutcome::status(503);
        assert_eq!(p.next_async(0, &o, true), Some(secs(10)));
        assert_eq!(p.next_async(1, &o, true), Some(secs(10)));
        assert_eq!(p.next_async(2, &o, true), Some(secs(60)));
        assert_eq!(p.next_async(3, &o, true), Some(secs(300)));
        assert_eq!(p.next_async(4, &o, true), None);
        assert_eq!(p.next_async(u32::MAX, &o, true), None);

        let empty = RetryPolicy {
            schedule: vec![],
            ..policy()
        };
        assert_eq!(empty.async_tries(), 1);
        assert_eq!(empty.next_async(1, &TryOutcome::Timeout, true), None);
    }

    #[test]
    fn async_retry_after_only_lengthens_the_schedule() {
        let p = policy();
        // Longer than the scheduled 10 s: honoured.
        assert_eq!(p.next_async(1, &retry_after(429, 25), true), Some(secs(25)));
        // Over the cap: capped, still longer than 10 s.
        assert_eq!(
            p.next_async(1, &retry_after(503, 9999), true),
            Some(secs(30))
        );
        // Shorter than the schedule: the schedule wins.
        assert_eq!(p.next_async(2, &retry_after(429, 25), true), Some(secs(60)));
        // Ignored on 502.
        assert_eq!(p.next_async(1, &retry_after(502, 25), true), Some(secs(10)));
        // Not when the schedule is used up.
        assert_eq!(p.next_async(4, &retry_after(429, 25), true), None);
    }

    #[test]
    fn give_up_reasons_have_stable_names() {
        assert_eq!(GiveUpReason::NotRetryable.to_string(), "not_retryable");
        assert_eq!(GiveUpReason::Attempts.as_str(), "attempts");
        assert_eq!(GiveUpReason::Deadline.as_str(), "deadline");
    }

    fn parse(value: &str, now: SystemTime) -> Option<Duration> {
        parse_retry_after(&HeaderValue::from_str(value).unwrap(), now)
    }

    #[test]
    fn retry_after_delta_seconds() {
        let now = SystemTime::UNIX_EPOCH + secs(1_700_000_000);
        assert_eq!(parse("0", now), Some(Duration::ZERO));
        assert_eq!(parse("120", now), Some(secs(120)));
        assert_eq!(parse(" 7 ", now), Some(secs(7)));
        assert_eq!(parse("007", now), Some(secs(7)));
        assert_eq!(parse("99999999999999999999999", now), Some(secs(u64::MAX)));
    }

    #[test]
    fn retry_after_http_date() {
        let now = SystemTime::UNIX_EPOCH + secs(1_700_000_000); // Tue, 14 Nov 2023 22:13:20 GMT
        assert_eq!(parse("Tue, 14 Nov 2023 22:13:50 GMT", now), Some(secs(30)));
        // RFC 850 and asctime forms are valid HTTP-dates too.
        assert_eq!(
            parse("Tuesday, 14-Nov-23 22:14:20 GMT", now),
            Some(secs(60))
        );
        assert_eq!(parse("Tue Nov 14 22:13:21 2023", now), Some(secs(1)));
        // Now and in the past: zero.
        assert_eq!(
            parse("Tue, 14 Nov 2023 22:13:20 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
        // Agrees with httpdate's own formatting.
        let later = now + secs(3600);
        assert_eq!(
            parse(&httpdate::fmt_http_date(later), now),
            Some(secs(3600))
        );
    }

    #[test]
    fn retry_after_garbage_is_none() {
        let now = SystemTime::UNIX_EPOCH + secs(1_700_000_000);
        for value in [
            "",
            " ",
            "-5",
            "+5",
            "1.5",
            "1e3",
            "soon",
            "5s",
            "0x10",
            "Tue, 14 Nov 2023",
            "Tue, 32 Nov 2023 22:13:50 GMT",
            "12 34",
        ] {
            assert_eq!(parse(value, now), None, "{value:?}");
        }
        let non_ascii = HeaderValue::from_bytes(b"\xff120").unwrap();
        assert_eq!(parse_retry_after(&non_ascii, now), None);
    }

    proptest! {
        #[test]
        fn jitter_never_exceeds_the_ceiling(
            initial_ms in 1u64..10_000,
            extra_ms in 0u64..1_000_000,
            attempt in any::<u32>(),
            seed in any::<u64>(),
        ) {
            let b = Backoff::try_new(ms(initial_ms), ms(initial_ms + extra_ms)).unwrap();
            let mut r = StdRng::seed_from_u64(seed);
            let cap = b.ceiling(attempt);
            prop_assert!(cap <= b.max());
            prop_assert!(cap >= b.initial());
            prop_assert!(b.jittered(attempt, &mut r) <= cap);
        }

        #[test]
        fn a_sync_retry_always_fits_the_deadline(
            attempt in 0u32..10,
            code in prop_oneof![Just(429u16), Just(502), Just(503), Just(504)],
            retry_after_s in proptest::option::of(0u64..100),
            remaining_ms in 0u64..20_000,
            seed in any::<u64>(),
        ) {
            let p = RetryPolicy { attempts: 5, ..policy() };
            let outcome = TryOutcome::Status { code, retry_after: retry_after_s.map(secs) };
            let remaining = ms(remaining_ms);
            match p.next_sync(attempt, &outcome, false, remaining, &mut StdRng::seed_from_u64(seed)) {
                Decision::RetryAfter(w) => {
                    prop_assert!(w < remaining);
                    prop_assert!(w <= p.retry_after_max.max(p.backoff.max()));
                }
                Decision::GiveUp(reason) => {
                    prop_assert!(reason != GiveUpReason::NotRetryable);
                }
            }
        }
    }
}
