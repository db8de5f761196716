//! Tests of the breaker state machine, all on constructed instants or paused
//! tokio time: configuration checks, the Closed rules (rates, slow calls,
//! consecutive failures, the sliding window), Open and HalfOpen, stale permits,
//! reset and `force_half_open`, racing tasks, and a property test against a
//! naive reference model (`model`).

use super::*;

const FAST: Duration = Duration::from_millis(10);
const SLOW: Duration = Duration::from_millis(2000);
const SEC: Duration = Duration::from_secs(1);
const NS: Duration = Duration::from_nanos(1);

/// 20 s window (1 s buckets), rate rules only (consecutive out of the
/// way), open 10 s doubling to at most 35 s, 2 probes, close after 2.
fn settings() -> BreakerSettings {
    BreakerSettings {
        window: Duration::from_secs(20),
        min_calls: 10,
        failure_rate: 0.5,
        consecutive_failures: u32::MAX,
        slow_call: None,
        open_for: Duration::from_secs(10),
        open_for_max: Duration::from_secs(35),
        half_open_probes: 2,
        close_after: 2,
    }
}

fn breaker(settings: BreakerSettings) -> (Breaker, Instant) {
    let t0 = Instant::now();
    (
        Breaker::new(
            BreakerConfig::try_new(settings).expect("valid settings"),
            t0,
        ),
        t0,
    )
}

fn call(b: &Breaker, outcome: Outcome, latency: Duration, now: Instant) -> Option<Transition> {
    b.try_acquire(now)
        .expect("permitted")
        .record(outcome, latency, now)
}

fn ok(b: &Breaker, now: Instant) -> Option<Transition> {
    call(b, Outcome::Success, FAST, now)
}

fn fail(b: &Breaker, now: Instant) -> Option<Transition> {
    call(b, Outcome::Failure, FAST, now)
}

/// Fails calls until the breaker trips; returns the trip.
fn trip(b: &Breaker, now: Instant) -> Transition {
    for _ in 0..10_000 {
        if let Some(t) = fail(b, now) {
            assert_eq!((t.from, t.to), (State::Closed, State::Open));
            return t;
        }
    }
    panic!("breaker never tripped");
}

/// Trips the breaker and takes the first probe at the end of the open
/// period; returns the probe and the instant half-open began.
fn half_open(b: &Breaker, now: Instant) -> (Permit, Instant) {
    let until = trip(b, now).open_until.expect("open");
    let probe = b.try_acquire(until).expect("first probe");
    assert_eq!(probe.transition().map(|t| t.to), Some(State::HalfOpen));
    (probe, until)
}

// --- configuration ---------------------------------------------------

#[test]
fn config_accepts_the_spec_example() {
    let s = BreakerSettings {
        slow_call: Some(SlowCall {
            threshold: Duration::from_millis(1200),
            rate: 0.8,
        }),
        ..BreakerSettings::default()
    };
    let c = BreakerConfig::try_new(s).expect("valid");
    assert_eq!(c.settings(), &s);
    assert_eq!(c.bucket_width(), Duration::from_secs(3));
}

#[test]
fn config_rejects_nonsense_and_reports_every_problem() {
    let s = BreakerSettings {
        window: Duration::ZERO,
        min_calls: 0,
        failure_rate: 1.5,
        consecutive_failures: 0,
        slow_call: Some(SlowCall {
            threshold: Duration::ZERO,
            rate: f64::NAN,
        }),
        open_for: Duration::from_secs(25 * 3600),
        open_for_max: Duration::from_secs(25 * 3600),
        half_open_probes: 0,
        close_after: 0,
    };
    let errors = BreakerConfig::try_new(s).expect_err("invalid");
    let fields: Vec<_> = errors.iter().map(|e| e.field).collect();
    assert_eq!(
        fields,
        [
            "window",
            "min_calls",
            "failure_rate",
            "consecutive_failures",
            "slow_call.threshold",
            "slow_call.rate",
            "open_for",
            "open_for_max",
            "half_open_probes",
            "close_after",
        ]
    );
    assert_eq!(
        errors[2].to_string(),
        "breaker.failure_rate: must be greater than 0 and at most 1, got 1.5"
    );
}

#[test]
fn config_rate_bounds_are_exclusive_of_zero_inclusive_of_one() {
    for (rate, valid) in [
        (0.0, false),
        (-0.1, false),
        (1e-9, true),
        (1.0, true),
        (1.0000001, false),
    ] {
        let s = BreakerSettings {
            failure_rate: rate,
            ..settings()
        };
        assert_eq!(
            BreakerConfig::try_new(s).is_ok(),
            valid,
            "failure_rate {rate}"
        );
    }
}

#[test]
fn config_open_for_max_below_open_for_is_rejected() {
    let s = BreakerSettings {
        open_for_max: Duration::from_secs(5),
        ..settings()
    };
    let errors = BreakerConfig::try_new(s).expect_err("invalid");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].field, "open_for_max");
}

// --- Closed: rate rules ------------------------------------------------

#[test]
fn trips_on_failure_rate_exactly_at_threshold() {
    let (b, t0) = breaker(settings());
    // F S F S ... : 5 of 10 at 0.5; no decision before the 10th.
    for i in 0..9 {
        let outcome = if i % 2 == 0 {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        assert_eq!(call(&b, outcome, FAST, t0), None, "call {i}");
    }
    let t = ok(&b, t0).expect("trips on the 10th call, a success");
    assert_eq!((t.from, t.to), (State::Closed, State::Open));
    assert_eq!(
        t.reason,
        Reason::FailureRate {
            failures: 5,
            calls: 10
        }
    );
    assert_eq!(t.open_until, Some(t0 + Duration::from_secs(10)));
    assert_eq!(t.open_for, Some(Duration::from_secs(10)));
}

#[test]
fn does_not_trip_just_below_failure_rate() {
    let (b, t0) = breaker(settings());
    for i in 0..10 {
        let outcome = if i < 4 {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        assert_eq!(call(&b, outcome, FAST, t0), None);
    }
    // 5 of 11 = 0.4545…: still below.
    assert_eq!(fail(&b, t0), None);
    let view = b.state(t0);
    assert_eq!(view.state, State::Closed);
    assert_eq!((view.window_calls, view.window_failures), (11, 5));
}

#[test]
fn rate_threshold_is_inclusive_for_every_decimal_rate() {
    // Rates written as decimals in a route file: k/100 failures out of
    // 100 trips exactly at "0.kk" and not one failure below it.
    for k in 1..=100u32 {
        let text = if k == 100 {
            "1".to_string()
        } else {
            format!("0.{k:02}")
        };
        let rate: f64 = text.parse().expect("decimal");
        for (failures, trips) in [(k, true), (k - 1, false)] {
            let s = BreakerSettings {
                min_calls: 100,
                failure_rate: rate,
                ..settings()
            };
            let (b, t0) = breaker(s);
            let mut last = None;
            for i in 0..100 {
                let outcome = if i >= 100 - failures {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                last = call(&b, outcome, FAST, t0);
                if i < 99 {
                    assert_eq!(last, None, "no decision below min_calls");
                }
            }
            assert_eq!(last.is_some(), trips, "{failures} of 100 at rate {text}");
        }
    }
}

#[test]
fn trips_on_slow_call_rate_with_zero_failures() {
    let slow_call = Some(SlowCall {
        threshold: SEC,
        rate: 0.8,
    });
    let (b, t0) = breaker(BreakerSettings {
        slow_call,
        ..settings()
    });
    for _ in 0..2 {
        assert_eq!(ok(&b, t0), None);
    }
    for _ in 0..7 {
        assert_eq!(call(&b, Outcome::Success, SLOW, t0), None);
    }
    let t = call(&b, Outcome::Success, SLOW, t0).expect("8 of 10 slow trips at 0.8");
    assert_eq!(t.reason, Reason::SlowCallRate { slow: 8, calls: 10 });
}

#[test]
fn slow_is_strictly_above_the_threshold_and_counts_failures_too() {
    let slow_call = Some(SlowCall {
        threshold: SEC,
        rate: 0.5,
    });
    let s = BreakerSettings {
        slow_call,
        failure_rate: 1.0,
        ..settings()
    };
    let (b, t0) = breaker(s);
    // latency == threshold is not slow
    for _ in 0..9 {
        assert_eq!(call(&b, Outcome::Success, SEC, t0), None);
    }
    let v = b.state(t0);
    assert_eq!((v.window_calls, v.window_slow), (9, 0));
    // slow failures count as slow
    for _ in 0..8 {
        assert_eq!(call(&b, Outcome::Failure, SEC + NS, t0), None);
    }
    let t = call(&b, Outcome::Failure, SEC + NS, t0).expect("9 of 18 slow");
    assert_eq!(t.reason, Reason::SlowCallRate { slow: 9, calls: 18 });
}

#[test]
fn slow_calls_are_not_tracked_without_a_slow_call_rule() {
    let (b, t0) = breaker(settings());
    for _ in 0..20 {
        assert_eq!(call(&b, Outcome::Success, SLOW, t0), None);
    }
    assert_eq!(b.state(t0).window_slow, 0);
}

#[test]
fn does_not_decide_below_min_calls() {
    let (b, t0) = breaker(settings());
    for _ in 0..9 {
        assert_eq!(fail(&b, t0), None, "9 of 9 failed, but below min_calls");
    }
    assert_eq!(b.state(t0).state, State::Closed);
    let t = fail(&b, t0).expect("10th");
    assert_eq!(
        t.reason,
        Reason::FailureRate {
            failures: 10,
            calls: 10
        }
    );
}

#[test]
fn consecutive_failures_trip_before_min_calls() {
    let (b, t0) = breaker(BreakerSettings {
        consecutive_failures: 3,
        ..settings()
    });
    assert_eq!(fail(&b, t0), None);
    assert_eq!(fail(&b, t0), None);
    assert_eq!(ok(&b, t0), None, "a success resets the run");
    assert_eq!(fail(&b, t0), None);
    assert_eq!(fail(&b, t0), None);
    assert_eq!(b.state(t0).consecutive_failures, 2);
    let t = fail(&b, t0).expect("third in a row");
    assert_eq!(t.reason, Reason::ConsecutiveFailures { count: 3 });
}

#[test]
fn consecutive_failures_do_not_expire_with_the_window() {
    let (b, t0) = breaker(BreakerSettings {
        consecutive_failures: 2,
        ..settings()
    });
    assert_eq!(fail(&b, t0), None);
    let t = fail(&b, t0 + Duration::from_secs(3600)).expect("still in a row");
    assert_eq!(t.reason, Reason::ConsecutiveFailures { count: 2 });
}

#[test]
fn cancelled_calls_count_as_nothing() {
    let (b, t0) = breaker(BreakerSettings {
        consecutive_failures: 2,
        ..settings()
    });
    assert_eq!(fail(&b, t0), None);
    b.try_acquire(t0).expect("closed").cancel();
    drop(b.try_acquire(t0).expect("closed"));
    let v = b.state(t0);
    assert_eq!((v.window_calls, v.consecutive_failures), (1, 1));
    assert!(fail(&b, t0).is_some(), "the run was not broken by cancels");
}

// --- Closed: the sliding window -------------------------------------

#[test]
fn outcomes_stop_counting_at_the_bucket_boundary() {
    let (b, t0) = breaker(settings());
    // Recorded mid-bucket 0 (at 0.5 s): counts until the start of
    // bucket 20 (20 s), i.e. for 19.5 s, never more than the window.
    let at = t0 + SEC / 2;
    for _ in 0..9 {
        assert_eq!(fail(&b, at), None);
    }
    assert_eq!(b.state(t0 + Duration::from_secs(20) - NS).window_calls, 9);
    assert_eq!(b.state(t0 + Duration::from_secs(20)).window_calls, 0);
}

#[test]
fn an_outcome_recorded_on_a_boundary_counts_for_exactly_the_window() {
    let (b, t0) = breaker(settings());
    let at = t0 + Duration::from_secs(3);
    assert_eq!(fail(&b, at), None);
    assert_eq!(
        b.state(at + Duration::from_secs(20) - NS).window_failures,
        1
    );
    assert_eq!(b.state(at + Duration::from_secs(20)).window_failures, 0);
}

#[test]
fn rate_decision_sees_only_the_window() {
    let run = |last_at: Duration| {
        let (b, t0) = breaker(settings());
        for _ in 0..5 {
            assert_eq!(fail(&b, t0), None);
        }
        for _ in 0..4 {
            assert_eq!(ok(&b, t0 + Duration::from_secs(10)), None);
        }
        ok(&b, t0 + last_at)
    };
    // One nanosecond before the old failures leave: 5 of 10 → trips.
    let t = run(Duration::from_secs(20) - NS).expect("trips");
    assert_eq!(
        t.reason,
        Reason::FailureRate {
            failures: 5,
            calls: 10
        }
    );
    // At the boundary they are gone: 5 calls, below min_calls.
    assert_eq!(run(Duration::from_secs(20)), None);
}

#[test]
fn window_rotates_bucket_by_bucket_and_after_long_idle() {
    let (b, t0) = breaker(BreakerSettings {
        min_calls: 1000,
        ..settings()
    });
    for k in 0..45u32 {
        let now = t0 + SEC * k;
        assert_eq!(ok(&b, now), None);
        assert_eq!(
            b.state(now).window_calls,
            u64::from((k + 1).min(BUCKETS)),
            "k={k}"
        );
    }
    // Idle for far more than the window: everything evicted at once.
    let later = t0 + Duration::from_secs(3600);
    assert_eq!(b.state(later).window_calls, 0);
    assert_eq!(fail(&b, later), None);
    assert_eq!(b.state(later + Duration::from_secs(19)).window_calls, 1);
    assert_eq!(b.state(later + Duration::from_secs(20)).window_calls, 0);
}

#[test]
fn time_going_backwards_is_clamped() {
    let (b, t0) = breaker(settings());
    let t5 = t0 + Duration::from_secs(5);
    assert_eq!(ok(&b, t5), None);
    // A task that read the clock earlier but locks later.
    assert_eq!(ok(&b, t0), None);
    // Both count as recorded in bucket 5.
    assert_eq!(b.state(t5 + Duration::from_secs(20) - NS).window_calls, 2);
    // Queries are clamped too: asking "at t0" now means "at the latest".
    assert_eq!(b.state(t0).window_calls, 2);
    assert_eq!(b.state(t5 + Duration::from_secs(20)).window_calls, 0);
}

// --- Open ----------------------------------------------------------------

#[test]
fn open_rejects_until_its_time_then_goes_half_open_lazily() {
    let (b, t0) = breaker(settings());
    let until = trip(&b, t0).open_until.expect("open");
    assert_eq!(until, t0 + Duration::from_secs(10));
    for now in [t0, t0 + Duration::from_secs(5), until - NS] {
        assert_eq!(b.try_acquire(now).unwrap_err(), Rejected::Open { until });
        assert_eq!(b.blocked_until(now), Some(until));
        let v = b.state(now);
        assert_eq!(
            (v.state, v.open_until, v.half_open_in),
            (State::Open, Some(until), Some(until - now))
        );
    }
    // No timer: at `until` the view already says half-open ...
    assert_eq!(b.blocked_until(until), None);
    assert_eq!(b.state(until).state, State::HalfOpen);
    assert_eq!(b.counters().transitions(State::Open, State::HalfOpen), 0);
    // ... and the next acquire makes it so, as the first probe.
    let p = b.try_acquire(until).expect("probe");
    assert!(p.is_probe());
    let t = p.transition().expect("transition");
    assert_eq!(
        (t.from, t.to, t.reason),
        (State::Open, State::HalfOpen, Reason::OpenElapsed)
    );
    assert_eq!(b.counters().transitions(State::Open, State::HalfOpen), 1);
    assert_eq!(b.state(until).probes_in_flight, 1);
    assert_eq!(b.counters().rejected_open, 3);
}

#[test]
fn rejected_reports_its_instant() {
    let (b, t0) = breaker(settings());
    let until = trip(&b, t0).open_until.expect("open");
    let r = b.try_acquire(t0).unwrap_err();
    assert_eq!(r.until(), Some(until));
    assert_eq!(r.to_string(), "circuit breaker is open");
    let busy = Rejected::ProbesBusy { probes: 2 };
    assert_eq!(busy.until(), None);
}

#[test]
fn outcomes_recorded_while_open_are_stale() {
    let (b, t0) = breaker(BreakerSettings {
        consecutive_failures: 1,
        ..settings()
    });
    let late = b.try_acquire(t0).expect("closed");
    trip(&b, t0);
    assert_eq!(late.record(Outcome::Failure, FAST, t0), None);
    assert_eq!(b.counters().stale_outcomes, 1);
    assert_eq!(b.state(t0).state, State::Open);
}

// --- HalfOpen --------------------------------------------------------------

#[test]
fn half_open_admits_exactly_n_and_a_dropped_permit_returns_its_slot() {
    let (b, t0) = breaker(BreakerSettings {
        half_open_probes: 3,
        ..settings()
    });
    let (p1, now) = half_open(&b, t0);
    let p2 = b.try_acquire(now).expect("2nd probe");
    let p3 = b.try_acquire(now).expect("3rd probe");
    assert_eq!(
        b.try_acquire(now).unwrap_err(),
        Rejected::ProbesBusy { probes: 3 }
    );
    assert_eq!(b.blocked_until(now), None, "half-open is not blocked");
    drop(p2);
    assert_eq!(b.state(now).probes_in_flight, 2);
    let p4 = b.try_acquire(now).expect("slot given back");
    assert_eq!(
        b.try_acquire(now).unwrap_err(),
        Rejected::ProbesBusy { probes: 3 }
    );
    p3.cancel();
    let v = b.state(now);
    assert_eq!(
        (v.probes_in_flight, v.probe_successes),
        (2, 0),
        "a cancel is no outcome"
    );
    assert_eq!(b.counters().rejected_probes_busy, 2);
    drop((p1, p4));
}

#[test]
fn completed_probes_free_their_slots_too() {
    let (b, t0) = breaker(BreakerSettings {
        half_open_probes: 1,
        close_after: 3,
        ..settings()
    });
    let (p, now) = half_open(&b, t0);
    assert!(b.try_acquire(now).is_err());
    assert_eq!(p.record(Outcome::Success, FAST, now), None);
    let p = b.try_acquire(now).expect("sequential probes");
    assert_eq!(p.record(Outcome::Success, FAST, now), None);
    let p = b.try_acquire(now).expect("sequential probes");
    let t = p.record(Outcome::Success, FAST, now).expect("closes");
    assert_eq!(t.reason, Reason::ProbesSucceeded { count: 3 });
}

#[test]
fn one_failed_probe_reopens_with_doubled_period_capped() {
    let (b, t0) = breaker(settings());
    let (p, mut now) = half_open(&b, t0);
    let ok_probe = b.try_acquire(now).expect("2nd probe");
    assert_eq!(ok_probe.record(Outcome::Success, FAST, now), None);
    let mut probe = p;
    // 10 s (first trip) → 20 s → 35 s (cap) → 35 s
    for expected in [20, 35, 35] {
        let t = probe.record(Outcome::Failure, FAST, now).expect("re-opens");
        let open_for = Duration::from_secs(expected);
        assert_eq!(
            (t.from, t.to, t.reason),
            (State::HalfOpen, State::Open, Reason::ProbeFailed)
        );
        assert_eq!(
            (t.open_for, t.open_until),
            (Some(open_for), Some(now + open_for))
        );
        assert_eq!(b.state(now).open_for, open_for);
        assert!(b.try_acquire(now + open_for - NS).is_err());
        now += open_for;
        probe = b.try_acquire(now).expect("half-open again");
        assert_eq!(b.state(now).probe_successes, 0, "fresh half-open");
    }
    drop(probe);
    assert_eq!(b.counters().transitions(State::HalfOpen, State::Open), 3);
}

#[test]
fn close_after_successes_closes_and_resets_the_open_period() {
    let (b, t0) = breaker(BreakerSettings {
        consecutive_failures: 4,
        ..settings()
    });
    let (p, now) = half_open(&b, t0);
    p.record(Outcome::Failure, FAST, now)
        .expect("re-opens for 20 s");
    let now = now + Duration::from_secs(20);
    let p1 = b.try_acquire(now).expect("probe");
    let p2 = b.try_acquire(now).expect("probe");
    // A slow but successful probe is a success.
    assert_eq!(p1.record(Outcome::Success, SLOW, now), None);
    let t = p2.record(Outcome::Success, FAST, now).expect("closes");
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
    assert_eq!(t.reason, Reason::ProbesSucceeded { count: 2 });
    assert_eq!((t.open_until, t.open_for), (None, None));
    let v = b.state(now);
    assert_eq!(v.state, State::Closed);
    assert_eq!((v.window_calls, v.consecutive_failures), (0, 0));
    assert_eq!(v.open_for, Duration::from_secs(10), "open period reset");
    let t = trip(&b, now);
    assert_eq!(t.open_for, Some(Duration::from_secs(10)));
    assert_eq!(t.reason, Reason::ConsecutiveFailures { count: 4 });
}

#[test]
fn slow_successful_probes_close_even_with_a_slow_call_rule() {
    let slow_call = Some(SlowCall {
        threshold: SEC,
        rate: 0.1,
    });
    let s = BreakerSettings {
        slow_call,
        half_open_probes: 1,
        close_after: 1,
        ..settings()
    };
    let (b, t0) = breaker(s);
    let (p, now) = half_open(&b, t0);
    let t = p.record(Outcome::Success, SLOW, now).expect("closes");
    assert_eq!(t.to, State::Closed);
}

// --- stale permits -----------------------------------------------------------

#[test]
fn stale_closed_permit_does_not_touch_half_open_accounting() {
    let s = BreakerSettings {
        consecutive_failures: 1,
        close_after: 1,
        ..settings()
    };
    let (b, t0) = breaker(s);
    let late_ok = b.try_acquire(t0).expect("closed");
    let late_fail = b.try_acquire(t0).expect("closed");
    let (probe, now) = half_open(&b, t0);
    // The slow closed-state calls finish now; neither may close nor
    // re-open the half-open breaker, nor free or take a probe slot.
    assert_eq!(late_ok.record(Outcome::Success, FAST, now), None);
    assert_eq!(late_fail.record(Outcome::Failure, FAST, now), None);
    let v = b.state(now);
    assert_eq!(
        (v.state, v.probes_in_flight, v.probe_successes),
        (State::HalfOpen, 1, 0)
    );
    assert_eq!(b.counters().stale_outcomes, 2);
    drop(probe);
}

#[test]
fn stale_probe_from_an_earlier_half_open_does_not_free_a_slot() {
    let (b, t0) = breaker(settings());
    let (a, now) = half_open(&b, t0);
    let old = b.try_acquire(now).expect("2nd probe");
    a.record(Outcome::Failure, FAST, now).expect("re-opens");
    let now = now + Duration::from_secs(20);
    let c = b.try_acquire(now).expect("new half-open");
    let d = b.try_acquire(now).expect("new half-open");
    drop(old); // from the previous half-open generation
    assert_eq!(
        b.try_acquire(now).unwrap_err(),
        Rejected::ProbesBusy { probes: 2 }
    );
    assert_eq!(b.state(now).probes_in_flight, 2);
    drop((c, d));
    assert_eq!(b.state(now).probes_in_flight, 0);
}

#[test]
fn probe_finishing_after_close_is_ignored() {
    let (b, t0) = breaker(BreakerSettings {
        close_after: 1,
        consecutive_failures: 1,
        ..settings()
    });
    let (a, now) = half_open(&b, t0);
    let straggler = b.try_acquire(now).expect("2nd probe");
    a.record(Outcome::Success, FAST, now).expect("closes");
    assert_eq!(
        straggler.record(Outcome::Failure, FAST, now),
        None,
        "would trip if counted"
    );
    let v = b.state(now);
    assert_eq!((v.state, v.window_calls), (State::Closed, 0));
}

// --- reset and force_half_open ----------------------------------------------

#[test]
fn reset_forces_closed_from_open_and_half_open() {
    let (b, t0) = breaker(BreakerSettings {
        consecutive_failures: 2,
        ..settings()
    });
    trip(&b, t0);
    let t = b.reset(t0).expect("transition");
    assert_eq!(
        (t.from, t.to, t.reason),
        (State::Open, State::Closed, Reason::Reset)
    );
    assert!(b.try_acquire(t0).is_ok());

    let (probe, now) = half_open(&b, t0);
    probe
        .record(Outcome::Failure, FAST, now)
        .expect("re-opens for 20 s");
    let now = now + Duration::from_secs(20);
    let probe = b.try_acquire(now).expect("half-open");
    let t = b.reset(now).expect("transition");
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
    assert_eq!(
        b.state(now).open_for,
        Duration::from_secs(10),
        "open period reset"
    );
    assert_eq!(probe.record(Outcome::Failure, FAST, now), None, "stale");
    let c = b.counters();
    assert_eq!(c.resets, 2);
    assert_eq!(c.transitions(State::Open, State::Closed), 1);
    assert_eq!(c.transitions(State::HalfOpen, State::Closed), 1);
}

#[test]
fn reset_while_closed_clears_the_window_and_stales_calls_in_flight() {
    let (b, t0) = breaker(BreakerSettings {
        consecutive_failures: 3,
        ..settings()
    });
    fail(&b, t0);
    fail(&b, t0);
    let in_flight = b.try_acquire(t0).expect("closed");
    assert_eq!(b.reset(t0), None, "no state change");
    assert_eq!(in_flight.record(Outcome::Failure, FAST, t0), None);
    let v = b.state(t0);
    assert_eq!((v.window_calls, v.consecutive_failures), (0, 0));
    assert_eq!(b.counters().resets, 1);
}

#[test]
fn force_half_open_moves_open_to_half_open_early_only() {
    let (b, t0) = breaker(settings());
    assert_eq!(b.force_half_open(t0), None, "no-op while closed");
    trip(&b, t0);
    let now = t0 + SEC;
    let t = b.force_half_open(now).expect("health probe succeeded");
    assert_eq!(
        (t.from, t.to, t.reason),
        (State::Open, State::HalfOpen, Reason::HealthProbe)
    );
    assert_eq!(b.force_half_open(now), None, "no-op while half-open");
    let p = b.try_acquire(now).expect("probe");
    assert!(p.is_probe());
    assert_eq!(p.transition(), None, "already half-open");
}

#[test]
fn force_half_open_after_the_period_reports_open_elapsed() {
    let (b, t0) = breaker(settings());
    let until = trip(&b, t0).open_until.expect("open");
    let t = b.force_half_open(until).expect("transition");
    assert_eq!(t.reason, Reason::OpenElapsed);
}

#[test]
fn never_a_closed_to_half_open_edge() {
    let (b, t0) = breaker(settings());
    let (p, now) = half_open(&b, t0);
    p.record(Outcome::Success, FAST, now);
    b.try_acquire(now)
        .expect("probe")
        .record(Outcome::Success, FAST, now)
        .expect("closes");
    let c = b.counters();
    assert_eq!(c.transitions(State::Closed, State::HalfOpen), 0);
    assert_eq!(c.transitions(State::Closed, State::Open), 1);
    assert_eq!(c.transitions(State::Open, State::HalfOpen), 1);
    assert_eq!(c.transitions(State::HalfOpen, State::Closed), 1);
    assert_eq!(c.permitted, 10 + 2);
}

// --- paused tokio time ---------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn runs_on_paused_tokio_time() {
    let s = BreakerSettings {
        consecutive_failures: 1,
        ..settings()
    };
    let b = Breaker::new(BreakerConfig::try_new(s).expect("valid"), Instant::now());
    fail(&b, Instant::now());
    tokio::time::advance(Duration::from_secs(10) - NS).await;
    assert!(b.try_acquire(Instant::now()).is_err());
    tokio::time::advance(NS).await;
    let p = b.try_acquire(Instant::now()).expect("half-open");
    assert_eq!(p.transition().map(|t| t.reason), Some(Reason::OpenElapsed));
}

// --- concurrency ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_n_of_1000_racing_tasks_get_a_probe() {
    const TASKS: usize = 1000;
    const PROBES: u32 = 4;
    for round in 0..50 {
        let s = BreakerSettings {
            half_open_probes: PROBES,
            consecutive_failures: 1,
            ..settings()
        };
        let (b, t0) = breaker(s);
        trip(&b, t0);
        b.force_half_open(t0).expect("half-open");
        let start = Arc::new(tokio::sync::Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (b, start) = (b.clone(), Arc::clone(&start));
                tokio::spawn(async move {
                    start.wait().await;
                    b.try_acquire(t0).ok()
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            winners.extend(task.await.expect("task"));
        }
        assert_eq!(winners.len(), PROBES as usize, "round {round}");
        let c = b.counters();
        assert_eq!(c.rejected_probes_busy, (TASKS - PROBES as usize) as u64);
        drop(winners);
        assert_eq!(b.state(t0).probes_in_flight, 0, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_in_flight_never_exceed_n_under_churn() {
    use std::sync::atomic::{AtomicU32, Ordering};
    const PROBES: u32 = 4;
    let s = BreakerSettings {
        half_open_probes: PROBES,
        consecutive_failures: 1,
        ..settings()
    };
    let (b, t0) = breaker(s);
    trip(&b, t0);
    b.force_half_open(t0).expect("half-open");
    let holders = Arc::new(AtomicU32::new(0));
    let max_seen = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (b, holders, max_seen) = (b.clone(), Arc::clone(&holders), Arc::clone(&max_seen));
            tokio::spawn(async move {
                for _ in 0..500 {
                    if let Ok(p) = b.try_acquire(t0) {
                        let n = holders.fetch_add(1, Ordering::SeqCst) + 1;
                        max_seen.fetch_max(n, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        holders.fetch_sub(1, Ordering::SeqCst);
                        drop(p); // cancelled: gives the slot back
                    } else {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    assert!(max_seen.load(Ordering::SeqCst) <= PROBES);
    assert!(max_seen.load(Ordering::SeqCst) >= 1);
    let v = b.state(t0);
    assert_eq!(
        (v.state, v.probes_in_flight, v.probe_successes),
        (State::HalfOpen, 0, 0)
    );
}

// --- property test against a naive reference model ---------------------------

mod model {
    use super::*;
    use proptest::prelude::*;

    const WINDOW: Duration = Duration::from_secs(1); // 50 ms buckets
    const THRESHOLD: Duration = Duration::from_millis(100);
    const OPEN_FOR: Duration = Duration::from_millis(100);

    /// The SPEC restated as plainly as possible: every outcome kept with
    /// its time, the window recomputed from scratch on each question.
    #[derive(Debug)]
    struct Model {
        s: BreakerSettings,
        epoch: Instant,
        phase: Phase,
        generation: u64,
        outcomes: Vec<(Instant, bool, bool)>,
        consecutive: u32,
        open_for: Duration,
    }

    impl Model {
        fn new(s: BreakerSettings, epoch: Instant) -> Self {
            let open_for = s.open_for;
            Self {
                s,
                epoch,
                phase: Phase::Closed,
                generation: 0,
                outcomes: vec![],
                consecutive: 0,
                open_for,
            }
        }

        fn bucket(&self, t: Instant) -> u128 {
            (t - self.epoch).as_nanos() / (self.s.window.as_nanos() / u128::from(BUCKETS))
        }

        fn window(&self, now: Instant) -> (u64, u64, u64) {
            let k = self.bucket(now);
            let live = self
                .outcomes
                .iter()
                .filter(|o| self.bucket(o.0) + u128::from(BUCKETS) > k);
            live.fold((0, 0, 0), |(c, f, s), o| {
                (c + 1, f + u64::from(o.1), s + u64::from(o.2))
            })
        }

        fn go(&mut self, to: Phase, reason: Reason) -> Transition {
            let from = self.phase.state();
            self.phase = to;
            self.generation += 1;
            if to.state() != State::Open {
                self.outcomes.clear();
                self.consecutive = 0;
            }
            if to == Phase::Closed {
                self.open_for = self.s.open_for;
            }
            let (open_until, open_for) = match to {
                Phase::Open { until } => (Some(until), Some(self.open_for)),
                _ => (None, None),
            };
            Transition {
                from,
                to: to.state(),
                reason,
                open_until,
                open_for,
            }
        }

        fn acquire(&mut self, now: Instant) -> Result<(bool, u64, Option<Transition>), Rejected> {
            let mut t = None;
            match self.phase {
                Phase::Closed => return Ok((false, self.generation, None)),
                Phase::Open { until } if now < until => return Err(Rejected::Open { until }),
                Phase::Open { .. } => {
                    t = Some(self.go(
                        Phase::HalfOpen {
                            in_flight: 0,
                            successes: 0,
                        },
                        Reason::OpenElapsed,
                    ))
                }
                Phase::HalfOpen { .. } => {}
            }
            let Phase::HalfOpen {
                in_flight,
                successes,
            } = self.phase
            else {
                unreachable!()
            };
            if in_flight < self.s.half_open_probes {
                self.phase = Phase::HalfOpen {
                    in_flight: in_flight + 1,
                    successes,
                };
                Ok((true, self.generation, t))
            } else {
                Err(Rejected::ProbesBusy {
                    probes: self.s.half_open_probes,
                })
            }
        }

        fn record(
            &mut self,
            model_gen: u64,
            failed: bool,
            latency: Duration,
            now: Instant,
        ) -> Option<Transition> {
            if model_gen != self.generation {
                return None;
            }
            match self.phase {
                Phase::Closed => {
                    let slow = self.s.slow_call.is_some_and(|sc| latency > sc.threshold);
                    self.outcomes.push((now, failed, slow));
                    self.consecutive = if failed { self.consecutive + 1 } else { 0 };
                    let until = now + self.open_for;
                    if self.consecutive >= self.s.consecutive_failures {
                        let count = self.consecutive;
                        return Some(
                            self.go(Phase::Open { until }, Reason::ConsecutiveFailures { count }),
                        );
                    }
                    let (calls, failures, slow) = self.window(now);
                    if calls >= u64::from(self.s.min_calls) {
                        if failures as f64 / calls as f64 >= self.s.failure_rate {
                            let r = Reason::FailureRate { failures, calls };
                            return Some(self.go(Phase::Open { until }, r));
                        }
                        if let Some(sc) = self.s.slow_call
                            && slow as f64 / calls as f64 >= sc.rate
                        {
                            let r = Reason::SlowCallRate { slow, calls };
                            return Some(self.go(Phase::Open { until }, r));
                        }
                    }
                    None
                }
                Phase::HalfOpen {
                    in_flight,
                    successes,
                } => {
                    if failed {
                        self.open_for = (self.open_for * 2).min(self.s.open_for_max);
                        let until = now + self.open_for;
                        return Some(self.go(Phase::Open { until }, Reason::ProbeFailed));
                    }
                    if successes + 1 >= self.s.close_after {
                        let count = successes + 1;
                        return Some(self.go(Phase::Closed, Reason::ProbesSucceeded { count }));
                    }
                    self.phase = Phase::HalfOpen {
                        in_flight: in_flight - 1,
                        successes: successes + 1,
                    };
                    None
                }
                Phase::Open { .. } => unreachable!("an Open generation issues no permits"),
            }
        }

        fn cancel(&mut self, probe: bool, model_gen: u64) {
            if let (
                true,
                true,
                Phase::HalfOpen {
                    in_flight,
                    successes,
                },
            ) = (probe, model_gen == self.generation, self.phase)
            {
                self.phase = Phase::HalfOpen {
                    in_flight: in_flight - 1,
                    successes,
                };
            }
        }

        fn reset(&mut self) -> Option<Transition> {
            if self.phase == Phase::Closed {
                self.generation += 1;
                self.outcomes.clear();
                self.consecutive = 0;
                return None;
            }
            Some(self.go(Phase::Closed, Reason::Reset))
        }

        fn force_half_open(&mut self, now: Instant) -> Option<Transition> {
            let Phase::Open { until } = self.phase else {
                return None;
            };
            let reason = if now >= until {
                Reason::OpenElapsed
            } else {
                Reason::HealthProbe
            };
            Some(self.go(
                Phase::HalfOpen {
                    in_flight: 0,
                    successes: 0,
                },
                reason,
            ))
        }

        fn view(&self, now: Instant) -> StateView {
            let mut v = StateView {
                state: self.phase.state(),
                open_until: None,
                half_open_in: None,
                window_calls: 0,
                window_failures: 0,
                window_slow: 0,
                consecutive_failures: 0,
                open_for: self.open_for,
                probes_in_flight: 0,
                probe_successes: 0,
            };
            match self.phase {
                Phase::Closed => {
                    (v.window_calls, v.window_failures, v.window_slow) = self.window(now);
                    v.consecutive_failures = self.consecutive;
                }
                Phase::Open { until } if now < until => {
                    (v.open_until, v.half_open_in) = (Some(until), Some(until - now));
                }
                Phase::Open { .. } => v.state = State::HalfOpen,
                Phase::HalfOpen {
                    in_flight,
                    successes,
                } => {
                    (v.probes_in_flight, v.probe_successes) = (in_flight, successes);
                }
            }
            v
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Advance(Duration),
        Acquire,
        Record {
            pick: usize,
            failed: bool,
            slow: bool,
        },
        Cancel {
            pick: usize,
        },
        Reset,
        ForceHalfOpen,
    }

    fn step() -> impl Strategy<Value = Duration> {
        let bucket = WINDOW / BUCKETS;
        prop_oneof![
            Just(Duration::ZERO),
            (1u64..1000).prop_map(Duration::from_nanos),
            (1u32..=25).prop_map(move |k| bucket * k),
            (0u64..1_500_000_000).prop_map(Duration::from_nanos),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => step().prop_map(Op::Advance),
            8 => Just(Op::Acquire),
            8 => (any::<usize>(), any::<bool>(), any::<bool>())
                .prop_map(|(pick, failed, slow)| Op::Record { pick, failed, slow }),
            2 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
            1 => Just(Op::Reset),
            1 => Just(Op::ForceHalfOpen),
        ]
    }

    fn settings() -> impl Strategy<Value = BreakerSettings> {
        let rates = prop::sample::select(vec![0.25, 0.3, 0.5, 0.75, 1.0]);
        let slow = prop::option::of(prop::sample::select(vec![0.5, 1.0]));
        let max = prop::sample::select(vec![100u64, 250, 1000]);
        (1u32..=6, rates, 1u32..=6, slow, max, 1u32..=4, 1u32..=4).prop_map(
            |(
                min_calls,
                failure_rate,
                consecutive_failures,
                slow,
                max,
                half_open_probes,
                close_after,
            )| {
                BreakerSettings {
                    window: WINDOW,
                    min_calls,
                    failure_rate,
                    consecutive_failures,
                    slow_call: slow.map(|rate| SlowCall {
                        threshold: THRESHOLD,
                        rate,
                    }),
                    open_for: OPEN_FOR,
                    open_for_max: Duration::from_millis(max),
                    half_open_probes,
                    close_after,
                }
            },
        )
    }

    /// Allowed edges: Closed→Open, Open→HalfOpen, HalfOpen→Open,
    /// HalfOpen→Closed, and Open→Closed by reset only.
    fn allowed(t: &Transition) -> bool {
        use State::*;
        match (t.from, t.to) {
            (Closed, Open) | (Open, HalfOpen) | (HalfOpen, Open) | (HalfOpen, Closed) => true,
            (Open, Closed) => t.reason == Reason::Reset,
            _ => false,
        }
    }

    struct Live {
        permit: Permit,
        model_gen: u64,
        /// Number of transitions seen when it was issued.
        era: u64,
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        #[test]
        fn matches_the_model_and_keeps_invariants(
            s in settings(),
            ops in prop::collection::vec(op(), 1..300),
        ) {
            let t0 = Instant::now();
            let b = Breaker::new(BreakerConfig::try_new(s).expect("valid"), t0);
            let mut m = Model::new(s, t0);
            let mut now = t0;
            let mut live: Vec<Live> = Vec::new();
            // What the transitions returned so far say the state is.
            let mut state = State::Closed;
            let mut open_until: Option<Instant> = None;
            let mut era = 0u64;
            let mut seen = [[0u64; 3]; 3];

            let mut observe = |t: Transition, state: &mut State, open_until: &mut Option<Instant>, era: &mut u64| {
                assert!(allowed(&t), "edge {t:?}");
                assert_ne!((t.from, t.to), (State::Closed, State::HalfOpen));
                assert_eq!(t.from, *state, "transitions form a chain");
                *state = t.to;
                *open_until = t.open_until;
                *era += 1;
                seen[t.from.index()][t.to.index()] += 1;
            };

            for op in ops {
                match op {
                    Op::Advance(d) => now += d,
                    Op::Acquire => {
                        let got = b.try_acquire(now);
                        let want = m.acquire(now);
                        if state == State::Open {
                            let until = open_until.expect("open has an end");
                            if now < until {
                                prop_assert_eq!(got.as_ref().err(), Some(&Rejected::Open { until }));
                            } else {
                                prop_assert!(got.as_ref().is_ok_and(|p| p.transition().is_some()));
                            }
                        }
                        match (got, want) {
                            (Ok(p), Ok((probe, model_gen, t))) => {
                                prop_assert_eq!(p.is_probe(), probe);
                                prop_assert_eq!(p.transition(), t);
                                if let Some(t) = t {
                                    observe(t, &mut state, &mut open_until, &mut era);
                                }
                                live.push(Live { permit: p, model_gen, era });
                            }
                            (Err(got), Err(want)) => prop_assert_eq!(got, want),
                            (got, want) => prop_assert!(false, "acquire: {:?} vs model {:?}", got.map(|p| p.is_probe()), want),
                        }
                    }
                    Op::Record { pick, failed, slow } if !live.is_empty() => {
                        let l = live.swap_remove(pick % live.len());
                        let outcome = if failed { Outcome::Failure } else { Outcome::Success };
                        let latency = if slow { THRESHOLD * 2 } else { THRESHOLD };
                        let got = l.permit.record(outcome, latency, now);
                        let want = m.record(l.model_gen, failed, latency, now);
                        prop_assert_eq!(got, want);
                        if let Some(t) = got {
                            observe(t, &mut state, &mut open_until, &mut era);
                        }
                    }
                    Op::Cancel { pick } if !live.is_empty() => {
                        let l = live.swap_remove(pick % live.len());
                        m.cancel(l.permit.is_probe(), l.model_gen);
                        l.permit.cancel();
                    }
                    Op::Record { .. } | Op::Cancel { .. } => {}
                    Op::Reset => {
                        let got = b.reset(now);
                        prop_assert_eq!(got, m.reset());
                        if let Some(t) = got {
                            observe(t, &mut state, &mut open_until, &mut era);
                        }
                    }
                    Op::ForceHalfOpen => {
                        let got = b.force_half_open(now);
                        prop_assert_eq!(got, m.force_half_open(now));
                        if let Some(t) = got {
                            observe(t, &mut state, &mut open_until, &mut era);
                        }
                    }
                }

                // Invariants, independent of the model.
                let current_probes = live.iter().filter(|l| l.permit.is_probe() && l.era == era).count();
                prop_assert!(current_probes <= s.half_open_probes as usize);
                let view = b.state(now);
                prop_assert!(view.probes_in_flight <= s.half_open_probes);
                if state == State::HalfOpen {
                    prop_assert_eq!(view.probes_in_flight as usize, current_probes);
                }
                let blocked = b.blocked_until(now);
                match (state, open_until) {
                    (State::Open, Some(until)) if now < until => prop_assert_eq!(blocked, Some(until)),
                    _ => prop_assert_eq!(blocked, None),
                }
                prop_assert!(view.open_for >= s.open_for && view.open_for <= s.open_for_max);
                // And the whole view agrees with the model.
                prop_assert_eq!(view, m.view(now));
            }

            let c = b.counters();
            for from in [State::Closed, State::Open, State::HalfOpen] {
                for to in [State::Closed, State::Open, State::HalfOpen] {
                    prop_assert_eq!(c.transitions(from, to), seen[from.index()][to.index()]);
                }
            }
        }
    }
}
