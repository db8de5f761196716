//! The per-route circuit breaker (SPEC §6 "Breaker, per route", §5 step 9).
//!
//! Owns: the state of one route's breaker — Closed (a sliding time window of
//! outcome buckets plus a consecutive-failure count), Open until an instant,
//! or HalfOpen with a bounded number of probe calls in flight — and the
//! counters the metrics endpoint reads (rejections, transitions).
//!
//! Never: does I/O, sleeps, spawns, reads the clock or logs. Time is an input:
//! every call takes `now: tokio::time::Instant`, so the runtime passes
//! `Instant::now()` and tests pass constructed instants or use paused time.
//! State changes are *returned* as [`Transition`] values so the caller logs
//! and counts them with one event function (STYLE habit 8). Classifying a
//! response as success or failure (connect error, timeout, 5xx) is the
//! caller's job, and so is pausing a route on a 429: the breaker only offers
//! [`Permit::cancel`] for calls that must count as neither.
//!
//! # Model
//!
//! A plain state machine, as linkerd2-proxy's failure-accrual breaker is.
//! Every edge it can take, with its [`Reason`]s:
//!
//! ```text
//!   Closed   ─▶ Open      consecutive_failures | failure_rate | slow_call_rate
//!   Open     ─▶ HalfOpen  open_elapsed: first acquire at/after `until` (lazily,
//!                         no timer) | health_probe: force_half_open
//!   HalfOpen ─▶ Open      probe_failed: one failed probe; the open period
//!                         doubles, capped at open_for_max
//!   HalfOpen ─▶ Closed    probes_succeeded: close_after successful probes;
//!                         window cleared, open period back to open_for
//!   Open     ─▶ Closed    reset (operator)
//!   HalfOpen ─▶ Closed    reset (operator)
//! ```
//!
//! There is never a Closed → HalfOpen edge, and no state moves to itself.
//!
//! # The window, exactly
//!
//! The window is [`BUCKETS`] buckets of `width = window / BUCKETS` each,
//! numbered from the instant the breaker was created (`epoch`): bucket `k`
//! covers `[epoch + k·width, epoch + (k+1)·width)`. An outcome is stamped
//! with the time its result was *recorded* (not when the call started). At
//! time `now` in bucket `k` the window holds buckets `k-BUCKETS+1 ..= k`.
//! So an outcome recorded in bucket `j` stops counting at
//! `epoch + (j+BUCKETS)·width`, the first bucket boundary at or before
//! `recorded_at + window`: it counts for at most `window`, at least
//! `window - width`, and for exactly `window` when recorded on a bucket
//! boundary. (`width` is rounded down to whole nanoseconds; for any window
//! that is a whole number of microseconds it is exact.)
//!
//! The rate rules are evaluated when an outcome is recorded, never on a bare
//! time step: the breaker trips on a call, not on the clock.
//!
//! # Decisions
//!
//! - Rules are checked in the order consecutive failures, failure rate,
//!   slow-call rate; the first that holds names the trip. All thresholds
//!   are inclusive; shares are computed as `count / calls` in `f64`, so
//!   5 of 10 trips at 0.5 and 3 of 10 at 0.3.
//! - The consecutive-failure run ignores the window: it is broken only by a
//!   success (or a reset/close), however long apart the failures are.
//! - A slow but successful probe is a success: slowness is a window rule
//!   and judges the next Closed window. A failed probe re-opens at once.
//! - An outcome reported for an earlier generation (the state changed since
//!   the permit was issued: a trip, a close, a reset) is ignored and
//!   counted in [`Counters::stale_outcomes`]; a stale probe dropped late
//!   does not free a slot of the current half-open period.
//! - Half-open with every slot taken rejects with
//!   [`Rejected::ProbesBusy`], which has no "until": there is no known
//!   instant, a slot frees when a probe finishes.
//! - A cancelled call (or a 429, which pauses the route outside the
//!   breaker) is recorded as nothing: drop the permit or call
//!   [`Permit::cancel`].
//!
//! # Concurrency
//!
//! [`Breaker`] is a cheap `Clone` handle (an `Arc`) shared by all tasks of a
//! route. Each operation takes an internal `std::sync::Mutex` for a few tens
//! of nanoseconds and never across an `.await`. Calls may arrive with
//! slightly out-of-order `now` values (two tasks read the clock, then lock
//! in the other order); the machine clamps time to the latest instant it has
//! seen, so its own clock never runs backwards.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Number of buckets the sliding window is divided into. With the default
/// 60 s window a bucket is 3 s wide.
pub const BUCKETS: u32 = 20;

/// Longest accepted `window`, `open_for` and `open_for_max`. Longer values
/// are almost certainly a typo, and the bound keeps instant arithmetic far
/// from overflow.
pub const MAX_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);

/// Shortest accepted `window` and `open_for`.
pub const MIN_PERIOD: Duration = Duration::from_millis(1);

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// Slow-call rule: a call slower than `threshold` is slow (success or
/// failure alike); once the window holds `min_calls`, a slow share of at
/// least `rate` opens the breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowCall {
    /// A call whose latency is strictly greater than this is slow.
    pub threshold: Duration,
    /// Slow share that opens the breaker, in (0, 1], inclusive.
    pub rate: f64,
}

/// Unvalidated breaker settings, field for field the route file's
/// `breaker:` block. Turn them into a [`BreakerConfig`] with
/// [`BreakerConfig::try_new`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Length of the sliding time window of outcomes.
    pub window: Duration,
    /// No rate decision while the window holds fewer outcomes than this.
    pub min_calls: u32,
    /// Failure share that opens the breaker, in (0, 1], inclusive.
    pub failure_rate: f64,
    /// Failures in a row (in recording order) that open the breaker,
    /// whatever the window holds.
    pub consecutive_failures: u32,
    /// Optional slow-call rule.
    pub slow_call: Option<SlowCall>,
    /// First open period.
    pub open_for: Duration,
    /// Cap on the open period, which doubles on each re-open from half-open.
    pub open_for_max: Duration,
    /// Probe calls allowed in flight at once while half-open.
    pub half_open_probes: u32,
    /// Successful probes that close the breaker.
    pub close_after: u32,
}

impl Default for BreakerSettings {
    /// The values of the SPEC §3 example, without a slow-call rule.
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            min_calls: 10,
            failure_rate: 0.5,
            consecutive_failures: 5,
            slow_call: None,
            open_for: Duration::from_secs(30),
            open_for_max: Duration::from_secs(300),
            half_open_probes: 3,
            close_after: 3,
        }
    }
}

/// One problem with [`BreakerSettings`]; `field` is the key under
/// `breaker:` in a route file (e.g. `slow_call.rate`), so the config
/// compiler can prefix it with the route's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("breaker.{field}: {message}")]
pub struct ConfigError {
    /// Key path below `breaker:`.
    pub field: &'static str,
    /// What is wrong, with the offending value.
    pub message: String,
}

/// Validated breaker configuration. It can only be built by
/// [`BreakerConfig::try_new`], so every value in it is in range.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    settings: BreakerSettings,
    /// `window / BUCKETS` in nanoseconds; at least 50_000 (window >= 1 ms).
    bucket_nanos: u64,
}

impl BreakerConfig {
    /// Checks every field and returns all problems at once.
    ///
    /// Rules: `window` and `open_for` in [1 ms, 24 h]; `open_for_max` in
    /// [`open_for`, 24 h]; rates in (0, 1]; `slow_call.threshold` > 0;
    /// `min_calls`, `consecutive_failures`, `half_open_probes` and
    /// `close_after` at least 1.
    pub fn try_new(settings: BreakerSettings) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut problem = |field: &'static str, message: String| {
            errors.push(ConfigError { field, message });
        };
        let period_ok = |d: Duration| (MIN_PERIOD..=MAX_PERIOD).contains(&d);
        let rate_ok = |r: f64| r > 0.0 && r <= 1.0; // false for NaN

        let s = &settings;
        if !period_ok(s.window) {
            problem(
                "window",
                format!("must be between 1ms and 24h, got {:?}", s.window),
            );
        }
        if s.min_calls == 0 {
            problem("min_calls", "must be at least 1, got 0".into());
        }
        if !rate_ok(s.failure_rate) {
            let got = s.failure_rate;
            problem(
                "failure_rate",
                format!("must be greater than 0 and at most 1, got {got}"),
            );
        }
        if s.consecutive_failures == 0 {
            problem("consecutive_failures", "must be at least 1, got 0".into());
        }
        if let Some(slow) = s.slow_call {
            if slow.threshold.is_zero() {
                problem("slow_call.threshold", "must be greater than 0".into());
            }
            if !rate_ok(slow.rate) {
                let got = slow.rate;
                problem(
                    "slow_call.rate",
                    format!("must be greater than 0 and at most 1, got {got}"),
                );
            }
        }
        if !period_ok(s.open_for) {
            problem(
                "open_for",
                format!("must be between 1ms and 24h, got {:?}", s.open_for),
            );
        }
        if s.open_for_max > MAX_PERIOD {
            problem(
                "open_for_max",
                format!("must be at most 24h, got {:?}", s.open_for_max),
            );
        } else if s.open_for_max < s.open_for {
            problem(
                "open_for_max",
                format!(
                    "must be at least open_for ({:?}), got {:?}",
                    s.open_for, s.open_for_max
                ),
            );
        }
        if s.half_open_probes == 0 {
            problem("half_open_probes", "must be at least 1, got 0".into());
        }
        if s.close_after == 0 {
            problem("close_after", "must be at least 1, got 0".into());
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        // window <= 24h, so its nanoseconds fit in u64 comfortably.
        let bucket_nanos = (settings.window.as_nanos() / u128::from(BUCKETS)) as u64;
        Ok(Self {
            settings,
            bucket_nanos,
        })
    }

    /// The validated settings.
    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// Width of one window bucket (`window / BUCKETS`, rounded down to ns).
    pub fn bucket_width(&self) -> Duration {
        Duration::from_nanos(self.bucket_nanos)
    }
}

// ---------------------------------------------------------------------------
// Values the breaker hands out
// ---------------------------------------------------------------------------

/// The breaker's state, without data (for labels and transitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Every call is rejected until the open period ends.
    Open,
    /// A limited number of probe calls decide between Closed and Open.
    HalfOpen,
}

impl State {
    /// `closed`, `open` or `half_open`: for metric labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a call ended, as the caller classified it (SPEC §6: a connect error,
/// a timeout or a 5xx is a failure; a 4xx is a success for the breaker).
/// A call that is neither (cancelled, or a 429 that pauses the route) is not
/// recorded at all: use [`Permit::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The downstream answered as a healthy service does.
    Success,
    /// Connect error, timeout or 5xx.
    Failure,
}

/// Why a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Closed → Open: this many failures in a row.
    ConsecutiveFailures { count: u32 },
    /// Closed → Open: `failures / calls >= failure_rate` over the window.
    FailureRate { failures: u64, calls: u64 },
    /// Closed → Open: `slow / calls >= slow_call.rate` over the window.
    SlowCallRate { slow: u64, calls: u64 },
    /// Open → HalfOpen: the open period ended.
    OpenElapsed,
    /// Open → HalfOpen early: a health probe succeeded.
    HealthProbe,
    /// HalfOpen → Open: a probe call failed.
    ProbeFailed,
    /// HalfOpen → Closed: this many probes succeeded.
    ProbesSucceeded { count: u32 },
    /// Open/HalfOpen → Closed: forced by an operator.
    Reset,
}

impl Reason {
    /// Stable snake_case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ConsecutiveFailures { .. } => "consecutive_failures",
            Reason::FailureRate { .. } => "failure_rate",
            Reason::SlowCallRate { .. } => "slow_call_rate",
            Reason::OpenElapsed => "open_elapsed",
            Reason::HealthProbe => "health_probe",
            Reason::ProbeFailed => "probe_failed",
            Reason::ProbesSucceeded { .. } => "probes_succeeded",
            Reason::Reset => "reset",
        }
    }
}

/// A state change, returned to the caller to log and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: Reason,
    /// When `to` is Open: the end of the open period.
    pub open_until: Option<Instant>,
    /// When `to` is Open: the length of the open period.
    pub open_for: Option<Duration>,
}

/// Why [`Breaker::try_acquire`] refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The breaker is open until `until`.
    #[error("circuit breaker is open")]
    Open { until: Instant },
    /// Half-open, and all `probes` probe slots are in use. There is no
    /// known instant to come back at: a slot frees when a probe finishes.
    #[error("circuit breaker is half-open and all {probes} probe slots are in use")]
    ProbesBusy { probes: u32 },
}

impl Rejected {
    /// The end of the open period, if the breaker is open.
    pub fn until(&self) -> Option<Instant> {
        match *self {
            Rejected::Open { until } => Some(until),
            Rejected::ProbesBusy { .. } => None,
        }
    }
}

/// A snapshot for the admin API and status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateView {
    /// The state as of `now`: an Open breaker whose period has ended is
    /// shown as HalfOpen (the next acquire moves it there).
    pub state: State,
    /// Open only: end of the open period.
    pub open_until: Option<Instant>,
    /// Open only: time left until half-open.
    pub half_open_in: Option<Duration>,
    /// Closed only (empty otherwise): outcomes in the window as of `now`.
    pub window_calls: u64,
    /// Closed only: failures in the window.
    pub window_failures: u64,
    /// Closed only: slow calls in the window.
    pub window_slow: u64,
    /// Closed only: failures in a row so far.
    pub consecutive_failures: u32,
    /// The open period in force (Open), of the last open (HalfOpen), or the
    /// one the next trip will use (Closed).
    pub open_for: Duration,
    /// HalfOpen only: probe calls in flight.
    pub probes_in_flight: u32,
    /// HalfOpen only: probes that have succeeded so far.
    pub probe_successes: u32,
}

/// Running totals for metrics. Transitions are counted inside the breaker,
/// so the numbers are right even if a caller drops a [`Transition`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Permits handed out (closed calls and probes).
    pub permitted: u64,
    /// Calls rejected because the breaker was open.
    pub rejected_open: u64,
    /// Calls rejected because all half-open probe slots were in use.
    pub rejected_probes_busy: u64,
    /// Outcomes ignored because the state changed after the permit was
    /// issued (e.g. a closed-state call that finished after the trip).
    pub stale_outcomes: u64,
    /// Calls of [`Breaker::reset`], whether or not the state changed.
    pub resets: u64,
    transitions: [[u64; 3]; 3],
}

impl Counters {
    /// All rejected calls.
    pub fn rejected(&self) -> u64 {
        self.rejected_open + self.rejected_probes_busy
    }

    /// Transitions from `from` to `to` so far.
    pub fn transitions(&self, from: State, to: State) -> u64 {
        self.transitions[from.index()][to.index()]
    }
}

// ---------------------------------------------------------------------------
// The sliding window
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bucket {
    calls: u64,
    failures: u64,
    slow: u64,
}

impl Bucket {
    fn sub(&mut self, other: &Bucket) {
        self.calls -= other.calls;
        self.failures -= other.failures;
        self.slow -= other.slow;
    }
}

/// Ring of `BUCKETS` buckets keyed by bucket index since `epoch`, with
/// running totals so a rate check is O(1).
#[derive(Debug)]
struct Window {
    buckets: [Bucket; BUCKETS as usize],
    totals: Bucket,
    epoch: Instant,
    bucket_nanos: u64,
    /// Index of the newest bucket (the one `now` falls in).
    head: u64,
    /// Start of bucket `head + 1`: below it no rotation is needed, which
    /// saves a division on the hot path.
    head_end: Instant,
}

impl Window {
    fn new(epoch: Instant, bucket_nanos: u64) -> Self {
        Self {
            buckets: [Bucket::default(); BUCKETS as usize],
            totals: Bucket::default(),
            epoch,
            bucket_nanos,
            head: 0,
            head_end: epoch + Duration::from_nanos(bucket_nanos),
        }
    }

    /// Moves the head to the bucket of `now` (which never decreases),
    /// evicting the buckets that fall out of the window.
    fn advance(&mut self, now: Instant) {
        if now < self.head_end {
            return;
        }
        // Elapsed time is below 2^64 ns (584 years) for any real process.
        let elapsed = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let index = elapsed / self.bucket_nanos;
        if index <= self.head {
            return; // cannot happen (`now >= head_end`); never underflow
        }
        let steps = index - self.head;
        if steps >= u64::from(BUCKETS) {
            self.buckets = [Bucket::default(); BUCKETS as usize];
            self.totals = Bucket::default();
        } else {
            for i in self.head + 1..=index {
                let slot = &mut self.buckets[(i % u64::from(BUCKETS)) as usize];
                self.totals.sub(slot);
                *slot = Bucket::default();
            }
        }
        self.head = index;
        self.head_end = self.epoch + Duration::from_nanos((index + 1) * self.bucket_nanos);
    }

    /// Adds one outcome to the head bucket (call `advance` first).
    fn add(&mut self, failed: bool, slow: bool) {
        let slot = &mut self.buckets[(self.head % u64::from(BUCKETS)) as usize];
        let (f, s) = (u64::from(failed), u64::from(slow));
        slot.calls += 1;
        slot.failures += f;
        slot.slow += s;
        self.totals.calls += 1;
        self.totals.failures += f;
        self.totals.slow += s;
    }

    fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS as usize];
        self.totals = Bucket::default();
    }
}

// ---------------------------------------------------------------------------
// The state machine
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

impl Phase {
    fn state(self) -> State {
        match self {
            Phase::Closed => State::Closed,
            Phase::Open { .. } => State::Open,
            Phase::HalfOpen { .. } => State::HalfOpen,
        }
    }
}

/// What a permit was issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A normal call while Closed: its outcome goes into the window.
    Closed,
    /// A half-open probe: holds one of the probe slots.
    Probe,
    /// Recorded or cancelled already; nothing left to do on drop.
    Done,
}

#[derive(Debug)]
struct Machine {
    phase: Phase,
    /// Bumped on every state change (and on reset). A permit remembers the
    /// generation it was issued in; an outcome or a drop from an older
    /// generation is ignored, so late calls cannot corrupt newer state.
    /// Same generation implies same phase kind as at issue time.
    generation: u64,
    /// Latest `now` seen; earlier `now` values are clamped up to it.
    latest: Instant,
    window: Window,
    consecutive_failures: u32,
    /// Current open period: `open_for` while closed, doubled (capped) on
    /// each re-open from half-open.
    open_for: Duration,
    counters: Counters,
}

impl Machine {
    fn new(config: &BreakerConfig, now: Instant) -> Self {
        Self {
            phase: Phase::Closed,
            generation: 0,
            latest: now,
            window: Window::new(now, config.bucket_nanos),
            consecutive_failures: 0,
            open_for: config.settings.open_for,
            counters: Counters::default(),
        }
    }

    /// Clamps `now` so the machine's clock never runs backwards.
    fn clock(&mut self, now: Instant) -> Instant {
        if now > self.latest {
            self.latest = now;
        }
        self.latest
    }

    fn transition(&mut self, to: Phase, reason: Reason) -> Transition {
        let from = self.phase.state();
        self.phase = to;
        self.generation += 1;
        self.counters.transitions[from.index()][to.state().index()] += 1;
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

    /// Enter Open for the current open period.
    fn open(&mut self, now: Instant, reason: Reason) -> Transition {
        self.window.clear();
        self.consecutive_failures = 0;
        let until = now + self.open_for;
        self.transition(Phase::Open { until }, reason)
    }

    /// Enter Closed with a fresh window and the configured open period.
    fn close(&mut self, config: &BreakerConfig, reason: Reason) -> Transition {
        self.window.clear();
        self.consecutive_failures = 0;
        self.open_for = config.settings.open_for;
        self.transition(Phase::Closed, reason)
    }

    fn acquire(
        &mut self,
        config: &BreakerConfig,
        now: Instant,
    ) -> Result<(Kind, u64, Option<Transition>), Rejected> {
        let now = self.clock(now);
        let mut transition = None;
        match self.phase {
            Phase::Closed => {
                self.counters.permitted += 1;
                return Ok((Kind::Closed, self.generation, None));
            }
            Phase::Open { until } if now < until => {
                self.counters.rejected_open += 1;
                return Err(Rejected::Open { until });
            }
            Phase::Open { .. } => {
                let half_open = Phase::HalfOpen {
                    in_flight: 0,
                    successes: 0,
                };
                transition = Some(self.transition(half_open, Reason::OpenElapsed));
            }
            Phase::HalfOpen { .. } => {}
        }
        let Phase::HalfOpen { in_flight, .. } = &mut self.phase else {
            unreachable!("only HalfOpen is left")
        };
        let probes = config.settings.half_open_probes;
        if *in_flight < probes {
            *in_flight += 1;
            self.counters.permitted += 1;
            Ok((Kind::Probe, self.generation, transition))
        } else {
            self.counters.rejected_probes_busy += 1;
            Err(Rejected::ProbesBusy { probes })
        }
    }

    fn record(
        &mut self,
        config: &BreakerConfig,
        kind: Kind,
        generation: u64,
        outcome: Outcome,
        latency: Duration,
        now: Instant,
    ) -> Option<Transition> {
        let now = self.clock(now);
        if generation != self.generation {
            self.counters.stale_outcomes += 1;
            return None;
        }
        let s = &config.settings;
        let failed = outcome == Outcome::Failure;
        match (kind, &mut self.phase) {
            (Kind::Closed, Phase::Closed) => {
                let slow = s.slow_call.is_some_and(|sc| latency > sc.threshold);
                self.window.advance(now);
                self.window.add(failed, slow);
                if failed {
                    self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                } else {
                    self.consecutive_failures = 0;
                }
                if self.consecutive_failures >= s.consecutive_failures {
                    let count = self.consecutive_failures;
                    return Some(self.open(now, Reason::ConsecutiveFailures { count }));
                }
                let t = self.window.totals;
                if t.calls >= u64::from(s.min_calls) {
                    // Division, not `failures >= rate * calls`: both sides
                    // are then correctly rounded values of the same real
                    // number when the share equals the rate (0.3 * 10 is
                    // 3.0000000000000004 in f64, 3 / 10 is 0.3).
                    let calls = t.calls as f64;
                    if t.failures as f64 / calls >= s.failure_rate {
                        let reason = Reason::FailureRate {
                            failures: t.failures,
                            calls: t.calls,
                        };
                        return Some(self.open(now, reason));
                    }
                    if let Some(sc) = s.slow_call
                        && t.slow as f64 / calls >= sc.rate
                    {
                        let reason = Reason::SlowCallRate {
                            slow: t.slow,
                            calls: t.calls,
                        };
                        return Some(self.open(now, reason));
                    }
                }
                None
            }
            (
                Kind::Probe,
                Phase::HalfOpen {
                    in_flight,
                    successes,
                },
            ) => {
                *in_flight -= 1;
                if failed {
                    self.open_for = self.open_for.saturating_mul(2).min(s.open_for_max);
                    return Some(self.open(now, Reason::ProbeFailed));
                }
                // A slow but successful probe is a success: the slow-call
                // rule is a window rule and judges the next Closed window.
                *successes += 1;
                if *successes >= s.close_after {
                    let count = *successes;
                    return Some(self.close(config, Reason::ProbesSucceeded { count }));
                }
                None
            }
            // Same generation means same phase kind as at issue time, so
            // this cannot happen; ignoring is the safe answer anyway.
            _ => None,
        }
    }

    /// A probe permit dropped without an outcome gives its slot back.
    fn release(&mut self, kind: Kind, generation: u64) {
        if kind != Kind::Probe || generation != self.generation {
            return;
        }
        if let Phase::HalfOpen { in_flight, .. } = &mut self.phase {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    fn force_half_open(&mut self, now: Instant) -> Option<Transition> {
        let now = self.clock(now);
        let Phase::Open { until } = self.phase else {
            return None;
        };
        let reason = if now >= until {
            Reason::OpenElapsed
        } else {
            Reason::HealthProbe
        };
        Some(self.transition(
            Phase::HalfOpen {
                in_flight: 0,
                successes: 0,
            },
            reason,
        ))
    }

    fn reset(&mut self, config: &BreakerConfig, now: Instant) -> Option<Transition> {
        self.clock(now);
        self.counters.resets += 1;
        if self.phase == Phase::Closed {
            // Forget the window anyway, and make in-flight closed calls
            // stale so they cannot refill it with pre-reset outcomes.
            self.window.clear();
            self.consecutive_failures = 0;
            self.open_for = config.settings.open_for;
            self.generation += 1;
            return None;
        }
        Some(self.close(config, Reason::Reset))
    }

    fn blocked_until(&mut self, now: Instant) -> Option<Instant> {
        let now = self.clock(now);
        match self.phase {
            Phase::Open { until } if now < until => Some(until),
            _ => None,
        }
    }

    fn view(&mut self, now: Instant) -> StateView {
        let now = self.clock(now);
        let mut view = StateView {
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
                // Eviction is invisible to the state, so a query may do it.
                self.window.advance(now);
                let t = self.window.totals;
                view.window_calls = t.calls;
                view.window_failures = t.failures;
                view.window_slow = t.slow;
                view.consecutive_failures = self.consecutive_failures;
            }
            Phase::Open { until } if now < until => {
                view.open_until = Some(until);
                view.half_open_in = Some(until - now);
            }
            Phase::Open { .. } => view.state = State::HalfOpen,
            Phase::HalfOpen {
                in_flight,
                successes,
            } => {
                view.probes_in_flight = in_flight;
                view.probe_successes = successes;
            }
        }
        view
    }
}

// ---------------------------------------------------------------------------
// The shared handle and the permit
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Inner {
    config: BreakerConfig,
    machine: Mutex<Machine>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Machine> {
        // Nothing panics while the lock is held, but if something ever did,
        // the machine's invariants hold between statements: keep serving.
        self.machine.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One route's breaker, shared by every task of the route (clone it; clones
/// share state). Carry it over a reload when the route is unchanged.
#[derive(Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.inner.lock();
        f.debug_struct("Breaker")
            .field("state", &m.phase.state())
            .field("generation", &m.generation)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    /// A closed breaker whose window epoch is `now`.
    pub fn new(config: BreakerConfig, now: Instant) -> Self {
        let machine = Mutex::new(Machine::new(&config, now));
        Self {
            inner: Arc::new(Inner { config, machine }),
        }
    }

    /// The configuration this breaker runs with.
    pub fn config(&self) -> &BreakerConfig {
        &self.inner.config
    }

    /// Asks to make one call. Closed: always granted. Open: rejected until
    /// the open period ends; the first call at or after it moves the breaker
    /// to HalfOpen (see [`Permit::transition`]) and is its first probe.
    /// HalfOpen: granted while fewer than `half_open_probes` probes are in
    /// flight.
    ///
    /// Complete the permit with [`Permit::record`]; dropping it (or
    /// [`Permit::cancel`]) means the call counts as nothing.
    pub fn try_acquire(&self, now: Instant) -> Result<Permit, Rejected> {
        let result = self.inner.lock().acquire(&self.inner.config, now);
        let (kind, generation, transition) = result?;
        Ok(Permit {
            inner: Arc::clone(&self.inner),
            kind,
            generation,
            transition,
        })
    }

    /// `Some(until)` while the breaker is open: for callers that must not
    /// even try (the async delivery worker waits until then). `None` when
    /// closed or half-open (a half-open breaker may still refuse with
    /// [`Rejected::ProbesBusy`]).
    pub fn blocked_until(&self, now: Instant) -> Option<Instant> {
        self.inner.lock().blocked_until(now)
    }

    /// A snapshot for the admin API. Does not change the state.
    pub fn state(&self, now: Instant) -> StateView {
        self.inner.lock().view(now)
    }

    /// A health probe succeeded: if open, go half-open now. No-op (None)
    /// when closed or already half-open.
    pub fn force_half_open(&self, now: Instant) -> Option<Transition> {
        self.inner.lock().force_half_open(now)
    }

    /// Operator reset: closed, empty window, configured open period. Calls
    /// in flight become stale. Returns the transition unless already closed.
    pub fn reset(&self, now: Instant) -> Option<Transition> {
        self.inner.lock().reset(&self.inner.config, now)
    }

    /// Running totals for metrics.
    pub fn counters(&self) -> Counters {
        self.inner.lock().counters
    }
}

/// Leave to make one call. Complete it with [`Permit::record`]. Dropped
/// without a record (the call was cancelled), a half-open probe gives its
/// slot back and nothing is counted.
#[must_use = "a permit must be completed with record() (or cancel())"]
pub struct Permit {
    inner: Arc<Inner>,
    kind: Kind,
    generation: u64,
    transition: Option<Transition>,
}

impl Permit {
    /// Reports how the call ended; `latency` decides whether it was slow.
    /// Returns the transition it caused, if any. An outcome for a state
    /// that has since changed (the permit's generation is over) is ignored.
    pub fn record(
        mut self,
        outcome: Outcome,
        latency: Duration,
        now: Instant,
    ) -> Option<Transition> {
        let kind = std::mem::replace(&mut self.kind, Kind::Done);
        let inner = &self.inner;
        inner
            .lock()
            .record(&inner.config, kind, self.generation, outcome, latency, now)
    }

    /// The call counts as neither success nor failure (it was cancelled, or
    /// answered 429, which pauses the route outside the breaker). Same as
    /// dropping the permit.
    pub fn cancel(self) {}

    /// True when this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.kind == Kind::Probe
    }

    /// The transition that granting this permit caused: Open → HalfOpen
    /// when it was the first call after the open period.
    pub fn transition(&self) -> Option<Transition> {
        self.transition
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("probe", &self.is_probe())
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Closed permits hold nothing, so only probes take the lock.
        if self.kind == Kind::Probe {
            self.inner.lock().release(self.kind, self.generation);
        }
    }
}

#[cfg(test)]
mod tests;
