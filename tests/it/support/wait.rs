//! The one way tests wait for something to happen: [`wait_until`], a
//! bounded poll. No test sleeps and hopes; none waits without a bound.
//!
//! Also included by `benches/store.rs` (through `pg.rs`), so it depends on
//! nothing else in `support`.

use std::time::Duration;

/// How often [`wait_until`] runs its check.
const EVERY: Duration = Duration::from_millis(20);

/// Runs `check` until it says done (`true`, or `Some(value)`), every 20 ms,
/// for at most `within`: `Some(value)` (`Some(())` for a `bool` check), or
/// `None` once `within` has passed. The caller then fails with a message
/// saying what it waited for and what it saw instead.
#[must_use = "a wait that ran out of time must fail the test"]
pub async fn wait_until<R: Done>(
    within: Duration,
    mut check: impl AsyncFnMut() -> R,
) -> Option<R::Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await.done() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// What a check of [`wait_until`] gives.
pub trait Done {
    type Value;
    /// `Some` once what the check waits for has happened.
    fn done(self) -> Option<Self::Value>;
}

impl Done for bool {
    type Value = ();
    fn done(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Done for Option<T> {
    type Value = T;
    fn done(self) -> Option<T> {
        self
    }
}
