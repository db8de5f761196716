//! The one integration-test binary (`cargo test --test it`): every
//! end-to-end test of the crate is a module here, so the crate's heavy
//! dependencies (axum, reqwest, sqlx) are linked once, not once per file.
//!
//! All tests run in this one process, on parallel threads. What used to be
//! per process is shared: the throwaway PostgreSQL cluster of
//! [`support::pg`] starts once for the whole run and stops when the process
//! ends; the rustls provider is installed by whichever test first makes a
//! client ([`support::client`]). Nothing changes the process environment:
//! the real binary runs with an environment built explicitly
//! ([`support::gateway_cmd`]). Every wait is [`support::wait_until`].

mod support;

mod admin_security;
mod architecture;
mod cli;
mod cli_deliveries;
mod container;
mod cookbook;
mod delivered_once;
mod delivery;
mod delivery_crash;
mod delivery_instances;
mod downstream_tls;
mod egress_proxy;
mod fan_out;
mod fuzz;
mod hostile;
mod listener_tls;
mod outbound_rate_limit;
mod rate_limit;
mod reload;
mod reload_concurrent;
mod secret_files;
mod secrets_store;
mod serve_auth;
mod serve_binary;
mod serve_breaker;
mod serve_idempotency;
mod serve_oauth2;
mod serve_ops;
mod serve_pipeline;
mod serve_properties;
mod status_page_browser;
mod store;
mod store_hardening;
mod trace_headers;
mod validate_fixtures;
