//! The durable store of async deliveries (SPEC §5 steps 7–8, §6 "Async").
//!
//! This module owns the *store*: where accepted deliveries, their tries and
//! the inbound idempotency records live, with two backends behind one
//! object-safe [`Store`] trait — an embedded SQLite file (the default, one
//! process) and PostgreSQL (several instances sharing the work). It never
//! sends HTTP, never reads a clock (every operation takes `now`), and never
//! decides *whether* to retry: the worker asks
//! [`RetryPolicy::next_async`](crate::downstream::retry::RetryPolicy::next_async)
//! and tells the store the result with [`Store::settle`].
//!
//! The lifecycle of one delivery:
//!
//! ```text
//!   accept ──► pending ──claim_due──► leased ──settle(Delivered)──► delivered
//!                ▲  ▲                   │ │
//!                │  └─settle(RetryAt)───┘ └──settle(Dead)──► dead
//!                │    settle(Postpone)       (or lease expiry:
//!                │    release_owner           claimable again)
//!                └──────── replay / replay_dead ◄── dead, delivered
//! ```

mod api;
pub mod detached;
pub mod postgres;
pub mod rows;
pub mod sqlite;

pub use api::*;
