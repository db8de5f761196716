//! Telemetry: every metric named in one place (`metrics`), and every
//! operational event as one function that logs and counts (`events`), and
//! request-derived log values bounded and escaped (`log_field`), and `${VAR}`
//! values masked in every log line `serve` writes (`log_redact`), and the text
//! format's fields written without the cost of empty colour codes (`log_format`).

pub mod events;
pub mod latency;
pub mod log_field;
pub mod log_format;
pub mod log_redact;
pub mod metrics;
