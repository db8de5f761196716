//! Sliding-window latency per route (end to end and per downstream try), with
//! exact-enough percentiles (HDR histograms, 2 significant digits) and SLA
//! compliance: the share of observations at or under the SLA.
//!
//! The window is a ring of buckets (each `window / BUCKETS` long), each an
//! HDR histogram; a query merges the buckets still inside the window. Time is
//! an input, so tests are exact. Never logs anything.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

/// Buckets per window.
pub const BUCKETS: u32 = 10;
/// Histogram unit: 10 µs.
const UNIT_MICROS: u64 = 10;
/// Largest value tracked, in units (longer observations are clamped): 5 minutes.
const MAX_UNITS: u64 = 300_000_000 / UNIT_MICROS;

/// A sliding window of latencies.
pub struct LatencyWindow {
    width: Duration,
    epoch: Instant,
    inner: Mutex<Ring>,
}

struct Ring {
    /// (bucket index since epoch, histogram); slot = index % BUCKETS. A histogram
    /// (~9 KiB) is allocated on a bucket's first observation, so idle routes cost nothing.
    slots: Vec<(u64, Option<Histogram<u32>>)>,
}

/// What a window holds now.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Share of observations at or under the SLA (1.0 when there are none).
    pub sla_compliance: f64,
}

impl LatencyWindow {
    pub fn new(window: Duration, now: Instant) -> Self {
        let width = (window / BUCKETS).max(Duration::from_millis(1));
        let slots = (0..BUCKETS).map(|_| (u64::MAX, None)).collect();
        LatencyWindow {
            width,
            epoch: now,
            inner: Mutex::new(Ring { slots }),
        }
    }

    fn bucket(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_nanos() / self.width.as_nanos()) as u64
    }

    /// Records one observation at `now`.
    pub fn record(&self, latency: Duration, now: Instant) {
        let b = self.bucket(now);
        let units = (latency.as_micros() as u64 / UNIT_MICROS).clamp(1, MAX_UNITS);
        let mut ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut ring.slots[(b % u64::from(BUCKETS)) as usize];
        let h = slot.1.get_or_insert_with(new_histogram);
        if slot.0 != b {
            slot.0 = b;
            h.reset();
        }
        h.saturating_record(units);
    }

    /// The window's summary at `now`, with SLA compliance against `sla`.
    pub fn summary(&self, sla: Duration, now: Instant) -> Summary {
        let b = self.bucket(now);
        let oldest = b.saturating_sub(u64::from(BUCKETS) - 1);
        let mut merged = new_histogram();
        {
            let ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            for (idx, h) in &ring.slots {
                if let Some(h) = h.as_ref().filter(|_| *idx >= oldest && *idx <= b) {
                    let _ = merged.add(h);
                }
            }
        }
        let count = merged.len();
        if count == 0 {
            return Summary {
                count: 0,
                mean_ms: 0.0,
                p50_ms: 0.0,
                p95_ms: 0.0,
                p99_ms: 0.0,
                sla_compliance: 1.0,
            };
        }
        let ms = |units: u64| (units as f64 * UNIT_MICROS as f64 / 1000.0 * 100.0).round() / 100.0;
        let sla_units = (sla.as_micros() as u64 / UNIT_MICROS).min(MAX_UNITS);
        let within = merged.count_between(0, sla_units);
        Summary {
            count,
            mean_ms: (merged.mean() * UNIT_MICROS as f64 / 1000.0 * 100.0).round() / 100.0,
            p50_ms: ms(merged.value_at_quantile(0.50)),
            p95_ms: ms(merged.value_at_quantile(0.95)),
            p99_ms: ms(merged.value_at_quantile(0.99)),
            sla_compliance: (within as f64 / count as f64 * 10_000.0).round() / 10_000.0,
        }
    }
}

fn new_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, MAX_UNITS, 2).expect("static histogram bounds are valid")
}

/// End-to-end and downstream windows of one route.
pub struct RouteLatency {
    pub end_to_end: LatencyWindow,
    pub downstream: LatencyWindow,
}

impl RouteLatency {
    pub fn new(window: Duration, now: Instant) -> Self {
        RouteLatency {
            end_to_end: LatencyWindow::new(window, now),
            downstream: LatencyWindow::new(window, now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_and_sla_of_known_values() {
        let t0 = Instant::now();
        let w = LatencyWindow::new(Duration::from_secs(60), t0);
        // 1..=100 ms, one each
        for i in 1..=100 {
            w.record(ms(i), t0);
        }
        let s = w.summary(ms(90), t0);
        assert_eq!(s.count, 100);
        assert!((s.mean_ms - 50.5).abs() < 0.5, "{s:?}");
        assert!((s.p50_ms - 50.0).abs() <= 0.5, "{s:?}");
        assert!((s.p95_ms - 95.0).abs() <= 1.0, "{s:?}");
        assert!((s.p99_ms - 99.0).abs() <= 1.0, "{s:?}");
        assert!((s.sla_compliance - 0.90).abs() < 0.011, "{s:?}");
    }

    #[test]
    fn old_observations_leave_the_window() {
        let t0 = Instant::now();
        let w = LatencyWindow::new(Duration::from_secs(10), t0);
        w.record(ms(500), t0);
        w.record(ms(10), t0 + Duration::from_secs(5));
        assert_eq!(w.summary(ms(100), t0 + Duration::from_secs(5)).count, 2);
        // 10 s after the first bucket started, it is gone
        let s = w.summary(ms(100), t0 + Duration::from_secs(10));
        assert_eq!((s.count, s.sla_compliance), (1, 1.0));
        assert_eq!(w.summary(ms(100), t0 + Duration::from_secs(16)).count, 0);
        // a reused slot starts empty
        w.record(ms(20), t0 + Duration::from_secs(20));
        assert_eq!(w.summary(ms(100), t0 + Duration::from_secs(20)).count, 1);
    }

    #[test]
    fn empty_window_is_fully_compliant() {
        let t0 = Instant::now();
        let s = LatencyWindow::new(Duration::from_secs(60), t0).summary(ms(1), t0);
        assert_eq!((s.count, s.sla_compliance), (0, 1.0));
    }
}
