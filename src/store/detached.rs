//! [`Detached`]: a [`Store`] whose operations run to completion on their own
//! task, whatever happens to the caller.
//!
//! An HTTP handler's future is dropped when its client disconnects. Dropping a
//! sqlx future in the middle of a transaction can hand its pooled PostgreSQL
//! connection to the next user while still inside that transaction (sqlx 0.9.0,
//! transact-rs/sqlx#4393): that user's writes would then stay uncommitted and
//! hold row locks. So every operation of the PostgreSQL store is spawned and
//! only its *answer* is awaited by the caller; a caller that goes away loses
//! the answer, never half a transaction. (The SQLite store already works this
//! way: its writes are done by one writer task.)
//!
//! Costs one task spawn and the copies of the (small) arguments per operation.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::api::*;

/// Wraps a store so that no caller can cancel an operation half-way.
pub struct Detached(pub Arc<dyn Store>);

impl Detached {
    /// Runs `op` on the inner store on its own task and awaits its result.
    fn run<T, F>(&self, op: F) -> BoxFuture<'static, Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(Arc<dyn Store>) -> BoxFuture<'static, Result<T>> + Send + 'static,
    {
        let task = tokio::spawn(op(self.0.clone()));
        Box::pin(async move {
            match task.await {
                Ok(result) => result,
                // the task panicked (a bug) or the runtime is shutting down
                Err(_) => Err(StoreError::Closed),
            }
        })
    }
}

impl Store for Detached {
    fn backend(&self) -> &'static str {
        self.0.backend()
    }

    fn accept(
        &self,
        delivery: NewDelivery,
        dedupe_window: Option<Duration>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Accept>> {
        self.run(move |s| Box::pin(async move { s.accept(delivery, dedupe_window, now).await }))
    }

    fn accept_all(
        &self,
        deliveries: Vec<NewDelivery>,
        dedupe_window: Option<Duration>,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Vec<Accept>>> {
        self.run(move |s| {
            Box::pin(async move { s.accept_all(deliveries, dedupe_window, now).await })
        })
    }

    fn claim_due<'a>(
        &'a self,
        owner: &'a str,
        now: SystemTime,
        limit: u32,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Vec<Claimed>>> {
        let owner = owner.to_owned();
        self.run(move |s| Box::pin(async move { s.claim_due(&owner, now, limit, lease).await }))
    }

    fn settle<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: Settle,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<()>> {
        let lease = lease.clone();
        self.run(move |s| Box::pin(async move { s.settle(&lease, outcome, now).await }))
    }

    fn set_request<'a>(
        &'a self,
        lease: &'a Lease,
        request: StoredRequest,
        fingerprint: String,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<()>> {
        let lease = lease.clone();
        self.run(move |s| {
            Box::pin(async move { s.set_request(&lease, request, fingerprint, now).await })
        })
    }

    fn release_owner<'a>(&'a self, owner: &'a str, now: SystemTime) -> BoxFuture<'a, Result<u64>> {
        let owner = owner.to_owned();
        self.run(move |s| Box::pin(async move { s.release_owner(&owner, now).await }))
    }

    fn list(
        &self,
        state: Option<State>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<DeliverySummary>>> {
        self.run(move |s| Box::pin(async move { s.list(state, limit).await }))
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<DeliveryDetail>>> {
        let id = id.to_owned();
        self.run(move |s| Box::pin(async move { s.get(&id).await }))
    }

    fn replay<'a>(&'a self, id: &'a str, now: SystemTime) -> BoxFuture<'a, Result<()>> {
        let id = id.to_owned();
        self.run(move |s| Box::pin(async move { s.replay(&id, now).await }))
    }

    fn replay_dead(&self, now: SystemTime) -> BoxFuture<'_, Result<u64>> {
        self.run(move |s| Box::pin(async move { s.replay_dead(now).await }))
    }

    fn stats(&self, now: SystemTime) -> BoxFuture<'_, Result<Stats>> {
        self.run(move |s| Box::pin(async move { s.stats(now).await }))
    }

    fn begin<'a>(
        &'a self,
        key: &'a ScopedKey,
        window: Duration,
        lease: Duration,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Begin>> {
        let key = key.clone();
        self.run(move |s| Box::pin(async move { s.begin(&key, window, lease, now).await }))
    }

    fn finish<'a>(
        &'a self,
        hold: &'a Hold,
        answer: StoredAnswer,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool>> {
        let hold = hold.clone();
        self.run(move |s| Box::pin(async move { s.finish(&hold, answer, now).await }))
    }

    fn abandon<'a>(&'a self, hold: &'a Hold) -> BoxFuture<'a, Result<bool>> {
        let hold = hold.clone();
        self.run(move |s| Box::pin(async move { s.abandon(&hold).await }))
    }

    fn purge(&self, before: SystemTime, limit: u32) -> BoxFuture<'_, Result<u64>> {
        self.run(move |s| Box::pin(async move { s.purge(before, limit).await }))
    }

    fn purge_dead(&self, before: SystemTime, limit: u32) -> BoxFuture<'_, Result<u64>> {
        self.run(move |s| Box::pin(async move { s.purge_dead(before, limit).await }))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.0.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A store whose `stats` takes a while and records whether it finished.
    struct Slow(Arc<AtomicBool>);

    impl Store for Slow {
        fn backend(&self) -> &'static str {
            "slow"
        }
        fn stats(&self, _now: SystemTime) -> BoxFuture<'_, Result<Stats>> {
            let done = self.0.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                done.store(true, Ordering::SeqCst);
                Err(StoreError::Closed)
            })
        }
        fn accept(
            &self,
            _: NewDelivery,
            _: Option<Duration>,
            _: SystemTime,
        ) -> BoxFuture<'_, Result<Accept>> {
            unimplemented!()
        }
        fn accept_all(
            &self,
            _: Vec<NewDelivery>,
            _: Option<Duration>,
            _: SystemTime,
        ) -> BoxFuture<'_, Result<Vec<Accept>>> {
            unimplemented!()
        }
        fn claim_due<'a>(
            &'a self,
            _: &'a str,
            _: SystemTime,
            _: u32,
            _: Duration,
        ) -> BoxFuture<'a, Result<Vec<Claimed>>> {
            unimplemented!()
        }
        fn settle<'a>(
            &'a self,
            _: &'a Lease,
            _: Settle,
            _: SystemTime,
        ) -> BoxFuture<'a, Result<()>> {
            unimplemented!()
        }
        fn set_request<'a>(
            &'a self,
            _: &'a Lease,
            _: StoredRequest,
            _: String,
            _: SystemTime,
        ) -> BoxFuture<'a, Result<()>> {
            unimplemented!()
        }
        fn release_owner<'a>(&'a self, _: &'a str, _: SystemTime) -> BoxFuture<'a, Result<u64>> {
            unimplemented!()
        }
        fn list(&self, _: Option<State>, _: u32) -> BoxFuture<'_, Result<Vec<DeliverySummary>>> {
            unimplemented!()
        }
        fn get<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Option<DeliveryDetail>>> {
            unimplemented!()
        }
        fn replay<'a>(&'a self, _: &'a str, _: SystemTime) -> BoxFuture<'a, Result<()>> {
            unimplemented!()
        }
        fn replay_dead(&self, _: SystemTime) -> BoxFuture<'_, Result<u64>> {
            unimplemented!()
        }
        fn begin<'a>(
            &'a self,
            _: &'a ScopedKey,
            _: Duration,
            _: Duration,
            _: SystemTime,
        ) -> BoxFuture<'a, Result<Begin>> {
            unimplemented!()
        }
        fn finish<'a>(
            &'a self,
            _: &'a Hold,
            _: StoredAnswer,
            _: SystemTime,
        ) -> BoxFuture<'a, Result<bool>> {
            unimplemented!()
        }
        fn abandon<'a>(&'a self, _: &'a Hold) -> BoxFuture<'a, Result<bool>> {
            unimplemented!()
        }
        fn purge(&self, _: SystemTime, _: u32) -> BoxFuture<'_, Result<u64>> {
            unimplemented!()
        }
        fn purge_dead(&self, _: SystemTime, _: u32) -> BoxFuture<'_, Result<u64>> {
            unimplemented!()
        }
        fn close(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_operation_finishes_though_its_caller_went_away() {
        let done = Arc::new(AtomicBool::new(false));
        let store = Detached(Arc::new(Slow(done.clone())));
        // the caller gives up (as a dropped HTTP handler does) long before the operation ends
        let gave_up =
            tokio::time::timeout(Duration::from_millis(10), store.stats(SystemTime::now())).await;
        assert!(gave_up.is_err());
        assert!(!done.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(done.load(Ordering::SeqCst), "the operation ran to its end");
    }
}
