//! Cost of one breaker round trip (`try_acquire` + `Permit::record`) on the
//! hot path of every sync webhook: uncontended, and with a second thread
//! hammering the same route's breaker. Goal: < 100 ns uncontended.
//!
//! `cargo bench --bench breaker`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use cognigy_gateway::breaker::{Breaker, BreakerConfig, BreakerSettings, Outcome, SlowCall};
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::time::Instant;

/// The SPEC example with a slow-call rule, so every record does the full
/// amount of work (window, both rates) without ever tripping: all calls
/// succeed fast.
fn breaker(now: Instant) -> Breaker {
    let settings = BreakerSettings {
        slow_call: Some(SlowCall {
            threshold: Duration::from_millis(1200),
            rate: 0.8,
        }),
        ..BreakerSettings::default()
    };
    Breaker::new(BreakerConfig::try_new(settings).expect("valid"), now)
}

/// One call; time moves 1 µs per call so window buckets keep rotating.
fn round_trip(b: &Breaker, now: &mut Instant) {
    *now += Duration::from_micros(1);
    let permit = b.try_acquire(black_box(*now)).expect("closed");
    black_box(permit.record(Outcome::Success, Duration::from_millis(20), *now));
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker");

    group.bench_function("acquire+record/uncontended", |bench| {
        let mut now = Instant::now();
        let b = breaker(now);
        bench.iter(|| round_trip(&b, &mut now));
    });

    group.bench_function("acquire+record/2 threads", |bench| {
        let mut now = Instant::now();
        let b = breaker(now);
        let stop = Arc::new(AtomicBool::new(false));
        let other = {
            let (b, stop, mut now) = (b.clone(), Arc::clone(&stop), now);
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    round_trip(&b, &mut now);
                }
            })
        };
        bench.iter(|| round_trip(&b, &mut now));
        stop.store(true, Ordering::Relaxed);
        other.join().expect("contending thread");
    });

    group.bench_function("rejected while open", |bench| {
        let now = Instant::now();
        let b = breaker(now);
        while b.blocked_until(now).is_none() {
            let p = b.try_acquire(now).expect("closed");
            let _ = p.record(Outcome::Failure, Duration::from_millis(1), now);
        }
        bench.iter(|| black_box(b.try_acquire(black_box(now)).is_err()));
    });

    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
