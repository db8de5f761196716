//! Hand-off: a delivery accepted while this process's delivery worker has a
//! free slot is stored *already leased* to the worker and given to it right
//! after the commit, so it skips the claim (issue 18: on PostgreSQL the claim
//! was a third of the server time per webhook, on SQLite one of three row
//! writes, and the worker no longer has to be woken to go and look).
//!
//! What stays as it was:
//! - The row is the one a claim would have left: `leased` to the worker's
//!   owner until `now + lease`, `lease_seq` 1. A crash or a lost hand-off
//!   costs what a crash after a claim costs: the lease runs out and the
//!   delivery is claimed again (SQLite: at the next start, by
//!   `release_owner`).
//! - Each try holds one of the worker's `batch` slots (a semaphore permit),
//!   handed-off or claimed, so the bound on concurrent tries is the same.
//!
//! What keeps it fair: an accept takes a slot only while the worker has no
//! backlog (its last claim found everything due) and more than `keep` slots
//! are free, so due retries and webhooks accepted while the slots were full
//! are claimed in order (oldest due first) before newer ones jump the queue.
//!
//! The store calls [`HandOff::reserve`] before it writes and [`Slot::send`]
//! after the commit, on a path no caller can cancel (the SQLite writer
//! thread; PostgreSQL's detached tasks). A slot dropped unsent (a duplicate,
//! a refusal, a failed write) gives its permit back and wakes the worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use super::api::{Claimed, Delivery, Lease, NewDelivery, State};
use super::rows::{dur_ms, from_ms, to_ms};

/// A claimed delivery and the worker slot it runs in.
pub struct HandedOff {
    pub claimed: Claimed,
    pub slot: OwnedSemaphorePermit,
}

/// The worker's side of the hand-off, shared with the store.
pub struct HandOff {
    owner: String,
    lease: Duration,
    slots: Arc<Semaphore>,
    /// Slots an accept leaves to the worker's own claims.
    keep: usize,
    /// The worker's last claim was full (more may be due), or an accept found
    /// no slot: accepts store `pending` until a claim comes back short.
    backlog: AtomicBool,
    to: mpsc::UnboundedSender<HandedOff>,
    wake: Arc<Notify>,
}

impl HandOff {
    /// A hand-off into `slots` (the worker's semaphore), sending to `to`.
    pub fn new(
        owner: String,
        lease: Duration,
        slots: Arc<Semaphore>,
        keep: usize,
        to: mpsc::UnboundedSender<HandedOff>,
        wake: Arc<Notify>,
    ) -> Self {
        HandOff {
            owner,
            lease,
            slots,
            keep,
            backlog: AtomicBool::new(true),
            to,
            wake,
        }
    }

    /// A slot for one delivery accepted at `now`, or `None`: store it `pending`.
    pub fn reserve(&self, now: SystemTime) -> Option<Slot> {
        if self.backlog.load(Ordering::Acquire) || self.slots.available_permits() <= self.keep {
            self.backlog.store(true, Ordering::Release);
            return None;
        }
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        let now = to_ms(now);
        Some(Slot {
            permit: Some(permit),
            owner: self.owner.clone(),
            now,
            until: now.saturating_add(dur_ms(self.lease)),
            to: self.to.clone(),
            wake: self.wake.clone(),
        })
    }

    /// Wakes the worker to claim: a delivery was stored `pending` (no slot).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The worker, after a claim: `false` when it came back short (nothing
    /// else due), so accepts may take slots again; `true` when it was full.
    pub fn set_backlog(&self, backlog: bool) {
        self.backlog.store(backlog, Ordering::Release);
    }
}

/// One reserved worker slot: the lease to write with the delivery, and where
/// to send it once committed.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    owner: String,
    /// Acceptance time and lease end, in stored milliseconds.
    now: i64,
    until: i64,
    to: mpsc::UnboundedSender<HandedOff>,
    wake: Arc<Notify>,
}

impl Slot {
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// When the lease ends (stored milliseconds).
    pub fn until(&self) -> i64 {
        self.until
    }

    /// Gives the committed delivery `id` (stored from `d` with this slot's
    /// lease) to the worker. When the worker has stopped, the row stays
    /// leased until its lease runs out, as after a crash.
    pub fn send(mut self, id: String, d: NewDelivery) {
        let at = from_ms(self.now);
        let until = from_ms(self.until);
        let claimed = Claimed {
            lease: Lease {
                id: id.clone(),
                owner: self.owner.clone(),
                seq: 1,
                until,
            },
            delivery: Delivery {
                id,
                bot: d.bot,
                route: d.route,
                payload: d.payload,
                request: d.request,
                idempotency_key: d.idempotency_key,
                state: State::Leased,
                attempts: 0,
                next_attempt_at: at,
                created_at: at,
                updated_at: at,
                lease_owner: Some(std::mem::take(&mut self.owner)),
                leased_until: Some(until),
                last_error: None,
                fingerprint: d.fingerprint,
                render_again: false,
            },
        };
        let slot = self.permit.take().expect("a slot is sent once");
        let _ = self.to.send(HandedOff { claimed, slot });
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.permit.take().is_some() {
            // unused: the slot is free again, and the worker may have waited for one
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handoff(slots: usize, keep: usize) -> (HandOff, mpsc::UnboundedReceiver<HandedOff>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let h = HandOff::new(
            "w1".into(),
            Duration::from_secs(30),
            Arc::new(Semaphore::new(slots)),
            keep,
            tx,
            Arc::new(Notify::new()),
        );
        (h, rx)
    }

    fn delivery() -> NewDelivery {
        NewDelivery {
            bot: "b".into(),
            route: "r".into(),
            payload: "{}".into(),
            request: super::super::api::StoredRequest {
                method: "POST".into(),
                url: "http://127.0.0.1:1/x".into(),
                headers: vec![],
                body: None,
            },
            idempotency_key: Some("k".into()),
            fingerprint: Some("f".into()),
        }
    }

    #[test]
    fn no_slot_until_the_worker_says_there_is_no_backlog() {
        let (h, _rx) = handoff(4, 1);
        assert!(
            h.reserve(SystemTime::now()).is_none(),
            "starts with a backlog"
        );
        h.set_backlog(false);
        assert!(h.reserve(SystemTime::now()).is_some());
    }

    #[test]
    fn keeps_slots_for_claims_and_a_miss_marks_a_backlog() {
        let (h, _rx) = handoff(3, 1);
        h.set_backlog(false);
        let a = h.reserve(SystemTime::now()).expect("3 free");
        let b = h.reserve(SystemTime::now()).expect("2 free");
        assert!(h.reserve(SystemTime::now()).is_none(), "1 free is kept");
        drop((a, b));
        assert!(
            h.reserve(SystemTime::now()).is_none(),
            "the miss left a backlog: pending rows are claimed first"
        );
        h.set_backlog(false);
        assert!(h.reserve(SystemTime::now()).is_some());
    }

    #[test]
    fn a_sent_slot_carries_the_lease_written_and_its_permit() {
        let (h, mut rx) = handoff(2, 0);
        h.set_backlog(false);
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000);
        let slot = h.reserve(now).unwrap();
        assert_eq!(slot.until(), 1_030_000);
        slot.send("id1".into(), delivery());
        let got = rx.try_recv().unwrap();
        assert_eq!(got.claimed.lease.id, "id1");
        assert_eq!(got.claimed.lease.owner, "w1");
        assert_eq!(got.claimed.lease.seq, 1);
        assert_eq!(got.claimed.delivery.state, State::Leased);
        assert_eq!(got.claimed.delivery.leased_until, Some(from_ms(1_030_000)));
        assert_eq!(got.claimed.delivery.created_at, now);
        assert_eq!(h.slots.available_permits(), 1, "the try holds its slot");
        drop(got);
        assert_eq!(h.slots.available_permits(), 2);
    }

    #[tokio::test]
    async fn an_unsent_slot_frees_its_permit_and_wakes_the_worker() {
        let (h, _rx) = handoff(1, 0);
        h.set_backlog(false);
        let slot = h.reserve(SystemTime::now()).unwrap();
        assert_eq!(h.slots.available_permits(), 0);
        let woken = h.wake.clone();
        let waiting = woken.notified();
        drop(slot);
        assert_eq!(h.slots.available_permits(), 1);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken");
    }
}
