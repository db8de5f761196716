//! A token bucket (per bot inbound, SPEC §7.1; per downstream outbound, §9):
//! `burst` tokens at most, refilled at `per_second`. Time is an input, so
//! every rule is a pure function tested on constructed instants.
//!
//! Written by hand rather than with `governor`: it is 60 lines, it must say
//! how long to wait (for `Retry-After` and for sync calls that wait within
//! their deadline), and it must survive reloads of unchanged settings.
//! Never sleeps, never logs.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Validated bucket settings: `per_second > 0`, `burst >= 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    per_second: f64,
    burst: u32,
}

impl RateLimit {
    pub fn try_new(per_second: f64, burst: u32) -> Result<Self, &'static str> {
        if !per_second.is_finite() || per_second <= 0.0 {
            return Err("per_second must be a positive number");
        }
        if burst == 0 {
            return Err("burst must be at least 1");
        }
        Ok(RateLimit { per_second, burst })
    }
    pub fn per_second(&self) -> f64 {
        self.per_second
    }
    pub fn burst(&self) -> u32 {
        self.burst
    }
}

/// A bucket: tokens now, and when they were counted.
#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        TokenBucket {
            limit,
            state: Mutex::new((f64::from(limit.burst), now)),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one token at `now`, or says how long until one is there.
    pub fn try_take(&self, now: Instant) -> Result<(), Duration> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = &mut *s;
        let elapsed = now.saturating_duration_since(*at).as_secs_f64();
        *tokens = (*tokens + elapsed * self.limit.per_second).min(f64::from(self.limit.burst));
        if now > *at {
            *at = now;
        }
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - *tokens;
        // at most a day: a tiny rate cannot overflow a Duration
        let secs = (missing / self.limit.per_second).min(86_400.0);
        Err(Duration::from_secs_f64(secs))
    }

    /// Tokens available at `now` (for the status page).
    pub fn available(&self, now: Instant) -> f64 {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        (s.0 + elapsed * self.limit.per_second).min(f64::from(self.limit.burst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(per_second: f64, burst: u32, t0: Instant) -> TokenBucket {
        TokenBucket::new(RateLimit::try_new(per_second, burst).unwrap(), t0)
    }

    #[test]
    fn a_burst_then_refusals_with_the_wait() {
        let t0 = Instant::now();
        let b = bucket(50.0, 100, t0);
        let taken = (0..150).filter(|_| b.try_take(t0).is_ok()).count();
        assert_eq!(taken, 100);
        assert_eq!(b.try_take(t0), Err(Duration::from_millis(20)));
    }

    #[test]
    fn tokens_come_back_with_time_up_to_the_burst() {
        let t0 = Instant::now();
        let b = bucket(10.0, 5, t0);
        for _ in 0..5 {
            b.try_take(t0).unwrap();
        }
        assert!(b.try_take(t0).is_err());
        let t1 = t0 + Duration::from_millis(250); // 2.5 tokens
        assert!(b.try_take(t1).is_ok());
        assert!(b.try_take(t1).is_ok());
        assert!(b.try_take(t1).is_err());
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!(b.available(t2), 5.0);
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let b = bucket(1.0, 1, t0);
        b.try_take(t0).unwrap();
        assert!(b.try_take(t0 - Duration::from_secs(5)).is_err());
    }

    #[test]
    fn settings_are_validated() {
        assert!(RateLimit::try_new(0.0, 1).is_err());
        assert!(RateLimit::try_new(f64::NAN, 1).is_err());
        assert!(RateLimit::try_new(1.0, 0).is_err());
        let tiny = bucket(1e-300, 1, Instant::now());
        tiny.try_take(Instant::now()).unwrap();
        assert_eq!(
            tiny.try_take(Instant::now()),
            Err(Duration::from_secs(86_400))
        );
    }
}
