//! Durable asynchronous delivery: the worker that claims due deliveries from
//! the [`store`](crate::store), makes one try each through the same call path
//! as sync requests, and settles the result. The store itself (what is kept,
//! leases, dead letters, idempotency records) is [`crate::store`].

pub mod worker;
