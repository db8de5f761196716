//! Telemetry: every metric named in one place (`metrics`), and every
//! operational event as one function that logs and counts (`events`).

pub mod events;
pub mod latency;
pub mod metrics;
