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

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
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
                let (b, holders, max_seen) =
                    (b.clone(), Arc::clone(&holders), Arc::clone(&max_seen));
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

            fn acquire(
                &mut self,
                now: Instant,
            ) -> Result<(bool, u64, Option<Transition>), Rejected> {
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
                                self.go(
                                    Phase::Open { until },
                                    Reason::ConsecutiveFailures { count },
                                ),
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
}
