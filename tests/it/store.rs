//! The delivery store against real backends: one suite of scenarios, each run
//! on a SQLite file and on a PostgreSQL server (`support::pg`), plus what only
//! SQLite has (group commit, crash durability of the file).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cognigy_gateway::store::postgres::{PgOptions, PgStore};
use cognigy_gateway::store::sqlite::{SqliteOptions, SqliteStore};
use cognigy_gateway::store::{
    Accept, AttemptRecord, Begin, Hold, NewDelivery, ScopedKey, Settle, State, Store, StoreError,
    StoreExt, StoredAnswer, StoredRequest,
};

use crate::support;

/// A fixed "now" so every time in these tests is deterministic.
fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

const LEASE: Duration = Duration::from_secs(30);
const WINDOW: Duration = Duration::from_secs(60);

fn delivery(n: usize) -> NewDelivery {
    NewDelivery {
        bot: "support-bot".into(),
        route: "crm-upsert".into(),
        payload: format!(r#"{{"inputId":"in-{n}","slots":{{}}}}"#),
        request: StoredRequest {
            method: "POST".into(),
            url: format!("https://crm.example.com/api/contacts/C-{n}"),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("idempotency-key".into(), format!("in-{n}")),
            ],
            body: Some(format!(r#"{{"external_id":"C-{n}"}}"#)),
        },
        idempotency_key: Some(format!("in-{n}")),
        fingerprint: None,
    }
}

fn keyed(key: &str) -> NewDelivery {
    NewDelivery {
        idempotency_key: Some(key.into()),
        fingerprint: None,
        ..delivery(0)
    }
}

fn ok_try(at: SystemTime) -> AttemptRecord {
    AttemptRecord {
        at,
        status: Some(200),
        latency: Duration::from_millis(42),
        error: None,
    }
}

fn failed_try(at: SystemTime, status: u16) -> AttemptRecord {
    AttemptRecord {
        at,
        status: Some(status),
        latency: Duration::from_millis(7),
        error: None,
    }
}

/// One backend under test: a store, and how to open a second instance on
/// the same data (another process sharing the file, or another gateway
/// sharing the PostgreSQL database).
struct Fixture {
    store: Arc<dyn Store>,
    url: String,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    async fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("gateway.db").display());
        let store = cognigy_gateway::store::open(&url).await.unwrap();
        Fixture {
            store,
            url,
            _dir: Some(dir),
        }
    }

    async fn postgres() -> Fixture {
        let url = support::pg::url().await;
        let store = cognigy_gateway::store::open(&url).await.unwrap();
        Fixture {
            store,
            url,
            _dir: None,
        }
    }

    async fn another(&self) -> Arc<dyn Store> {
        cognigy_gateway::store::open(&self.url).await.unwrap()
    }
}

/// Runs each scenario on SQLite and on PostgreSQL, as `sqlite::name` and
/// `postgres::name`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Fixture::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Fixture::postgres().await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    accept_claim_complete_round_trip,
    nothing_is_claimed_before_it_is_due,
    retry_then_dead_letter_then_replay,
    replay_refuses_live_deliveries_and_unknown_ids,
    replay_dead_replays_every_dead_letter,
    dedupe_within_and_after_the_window,
    concurrent_accepts_of_one_key_accept_exactly_once,
    two_claimers_never_share_a_delivery,
    an_expired_lease_is_taken_over_and_the_old_claim_refused,
    concurrent_settles_each_write_their_own_outcome,
    postpone_uses_no_try,
    release_owner_returns_leased_work,
    stats_count_queues_and_oldest_age,
    idempotency_begin_finish_and_window,
    idempotency_stale_in_progress_is_taken_over,
    concurrent_begins_of_one_key_start_once,
    purge_removes_old_delivered_and_keys,
    reopening_keeps_data_and_schema,
);

async fn accept_claim_complete_round_trip(f: Fixture) {
    let s = &f.store;
    let d = delivery(1);
    let a = s.accept(d.clone(), Some(WINDOW), t(0)).await.unwrap();
    let Accept::Accepted { id } = a else {
        panic!("{a:?}")
    };
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);

    let got = s.get(&id).await.unwrap().unwrap();
    assert_eq!(got.delivery.state, State::Pending);
    assert_eq!(got.delivery.request, d.request);
    assert_eq!(got.delivery.payload, d.payload);
    assert_eq!(got.delivery.idempotency_key, d.idempotency_key);
    assert_eq!(got.delivery.attempts, 0);
    assert_eq!(got.delivery.created_at, t(0));
    assert_eq!(got.delivery.next_attempt_at, t(0));
    assert!(got.attempts.is_empty());

    let claimed = s.claim_due("w1", t(1), 10, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];
    assert_eq!(c.delivery.id, id);
    assert_eq!(c.delivery.state, State::Leased);
    assert_eq!(c.delivery.request, d.request);
    assert_eq!(c.lease.owner, "w1");
    assert_eq!(c.lease.until, t(1) + LEASE);
    assert!(s.claim_due("w2", t(2), 10, LEASE).await.unwrap().is_empty());

    s.complete(&c.lease, ok_try(t(2)), t(3)).await.unwrap();
    let got = s.get(&id).await.unwrap().unwrap();
    assert_eq!(got.delivery.state, State::Delivered);
    assert_eq!(got.delivery.attempts, 1);
    assert_eq!(got.delivery.lease_owner, None);
    assert_eq!(got.delivery.updated_at, t(3));
    assert_eq!(got.attempts.len(), 1);
    assert_eq!(got.attempts[0].number, 1);
    assert_eq!(got.attempts[0].status, Some(200));
    assert_eq!(got.attempts[0].latency, Duration::from_millis(42));
    assert_eq!(got.attempts[0].at, t(2));
    // Settled once: the same lease cannot write again.
    let again = s.complete(&c.lease, ok_try(t(2)), t(4)).await;
    assert!(
        matches!(again, Err(StoreError::LeaseLost { .. })),
        "{again:?}"
    );
    assert!(
        s.claim_due("w1", t(100), 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.get("no-such-id").await.unwrap().is_none());
}

async fn nothing_is_claimed_before_it_is_due(f: Fixture) {
    let s = &f.store;
    s.accept(delivery(1), None, t(10)).await.unwrap();
    assert!(s.claim_due("w", t(9), 10, LEASE).await.unwrap().is_empty());
    // Oldest due first, and `limit` respected.
    s.accept(delivery(2), None, t(5)).await.unwrap();
    s.accept(delivery(3), None, t(7)).await.unwrap();
    let c = s.claim_due("w", t(10), 2, LEASE).await.unwrap();
    let routes: Vec<_> = c.iter().map(|c| c.delivery.next_attempt_at).collect();
    assert_eq!(routes, vec![t(5), t(7)]);
    assert_eq!(s.claim_due("w", t(10), 2, LEASE).await.unwrap().len(), 1);
}

async fn retry_then_dead_letter_then_replay(f: Fixture) {
    let s = &f.store;
    let id = s
        .accept(delivery(1), None, t(0))
        .await
        .unwrap()
        .id()
        .to_owned();
    let c = s.claim_due("w", t(0), 1, LEASE).await.unwrap().remove(0);
    s.retry_at(&c.lease, failed_try(t(0), 503), t(10), t(1))
        .await
        .unwrap();
    let d = s.get(&id).await.unwrap().unwrap().delivery;
    assert_eq!(d.state, State::Pending);
    assert_eq!(d.attempts, 1);
    assert_eq!(d.next_attempt_at, t(10));
    assert_eq!(d.last_error.as_deref(), Some("status 503"));

    assert!(s.claim_due("w", t(9), 1, LEASE).await.unwrap().is_empty());
    let c = s.claim_due("w", t(10), 1, LEASE).await.unwrap().remove(0);
    assert_eq!(c.delivery.attempts, 1);
    let timeout = AttemptRecord {
        at: t(10),
        status: None,
        latency: Duration::from_secs(5),
        error: Some("timeout".into()),
    };
    s.bury(&c.lease, timeout, t(15)).await.unwrap();
    let detail = s.get(&id).await.unwrap().unwrap();
    assert_eq!(detail.delivery.state, State::Dead);
    assert_eq!(detail.delivery.attempts, 2);
    assert_eq!(detail.delivery.last_error.as_deref(), Some("timeout"));
    assert_eq!(
        detail
            .attempts
            .iter()
            .map(|a| (a.number, a.status))
            .collect::<Vec<_>>(),
        vec![(1, Some(503)), (2, None)]
    );
    let dead = s.list(Some(State::Dead), 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert!(
        s.claim_due("w", t(1000), 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );

    s.replay(&id, t(100)).await.unwrap();
    let detail = s.get(&id).await.unwrap().unwrap();
    assert_eq!(detail.delivery.state, State::Pending);
    assert_eq!(detail.delivery.attempts, 0);
    assert_eq!(detail.delivery.next_attempt_at, t(100));
    assert_eq!(detail.delivery.last_error, None);
    assert_eq!(detail.attempts.len(), 2, "history is kept");
    let c = s.claim_due("w", t(100), 1, LEASE).await.unwrap().remove(0);
    s.complete(&c.lease, ok_try(t(100)), t(101)).await.unwrap();
    let detail = s.get(&id).await.unwrap().unwrap();
    assert_eq!(detail.delivery.state, State::Delivered);
    assert_eq!(
        detail.attempts.iter().map(|a| a.number).collect::<Vec<_>>(),
        vec![1, 2, 1]
    );

    // A buried delivery without a try (its route is gone) keeps the reason.
    let id2 = s
        .accept(delivery(2), None, t(200))
        .await
        .unwrap()
        .id()
        .to_owned();
    let c = s.claim_due("w", t(200), 1, LEASE).await.unwrap().remove(0);
    s.settle(
        &c.lease,
        Settle::Dead {
            attempt: None,
            reason: Some("route crm-upsert is no longer configured".into()),
        },
        t(200),
    )
    .await
    .unwrap();
    let d = s.get(&id2).await.unwrap().unwrap();
    assert_eq!(d.delivery.state, State::Dead);
    assert_eq!(d.delivery.attempts, 0);
    assert!(d.attempts.is_empty());
    assert_eq!(
        d.delivery.last_error.as_deref(),
        Some("route crm-upsert is no longer configured")
    );
}

async fn replay_refuses_live_deliveries_and_unknown_ids(f: Fixture) {
    let s = &f.store;
    let id = s
        .accept(delivery(1), None, t(0))
        .await
        .unwrap()
        .id()
        .to_owned();
    let e = s.replay(&id, t(1)).await.unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::NotReplayable {
                state: State::Pending,
                ..
            }
        ),
        "{e:?}"
    );
    let _c = s.claim_due("w", t(1), 1, LEASE).await.unwrap();
    let e = s.replay(&id, t(1)).await.unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::NotReplayable {
                state: State::Leased,
                ..
            }
        ),
        "{e:?}"
    );
    let e = s.replay("0190d7a0-0000-7000-8000-000000000000", t(1)).await;
    assert!(matches!(e, Err(StoreError::NotFound { .. })), "{e:?}");
}

async fn replay_dead_replays_every_dead_letter(f: Fixture) {
    let s = &f.store;
    for n in 0..5 {
        s.accept(delivery(n), None, t(0)).await.unwrap();
    }
    let claimed = s.claim_due("w", t(0), 10, LEASE).await.unwrap();
    for c in &claimed[..3] {
        s.bury(&c.lease, failed_try(t(0), 400), t(1)).await.unwrap();
    }
    s.complete(&claimed[3].lease, ok_try(t(0)), t(1))
        .await
        .unwrap();
    assert_eq!(s.stats(t(2)).await.unwrap().dead, 3);
    assert_eq!(s.replay_dead(t(2)).await.unwrap(), 3);
    let st = s.stats(t(2)).await.unwrap();
    assert_eq!((st.pending, st.leased, st.dead), (3, 1, 0));
    assert_eq!(s.replay_dead(t(3)).await.unwrap(), 0);
    let again = s.claim_due("w2", t(2), 10, LEASE).await.unwrap();
    assert_eq!(again.len(), 3);
    assert!(again.iter().all(|c| c.delivery.attempts == 0));
}

async fn dedupe_within_and_after_the_window(f: Fixture) {
    let s = &f.store;
    let first = s.accept(keyed("k1"), Some(WINDOW), t(0)).await.unwrap();
    let Accept::Accepted { id: first } = first else {
        panic!("{first:?}")
    };
    // Within the window: the first id again, nothing stored.
    assert_eq!(
        s.accept(keyed("k1"), Some(WINDOW), t(30)).await.unwrap(),
        Accept::Duplicate { id: first.clone() }
    );
    assert_eq!(
        s.accept(keyed("k1"), Some(WINDOW), t(59)).await.unwrap(),
        Accept::Duplicate { id: first.clone() }
    );
    // Another bot, no key, or no dedupe asked: separate deliveries.
    let other_bot = NewDelivery {
        bot: "sales-bot".into(),
        ..keyed("k1")
    };
    assert!(matches!(
        s.accept(other_bot, Some(WINDOW), t(30)).await.unwrap(),
        Accept::Accepted { .. }
    ));
    let no_key = NewDelivery {
        idempotency_key: None,
        ..keyed("k1")
    };
    assert!(matches!(
        s.accept(no_key.clone(), Some(WINDOW), t(30)).await.unwrap(),
        Accept::Accepted { .. }
    ));
    assert!(matches!(
        s.accept(no_key, Some(WINDOW), t(30)).await.unwrap(),
        Accept::Accepted { .. }
    ));
    assert!(matches!(
        s.accept(keyed("k1"), None, t(30)).await.unwrap(),
        Accept::Accepted { .. }
    ));
    // Not extended by duplicates: at exactly `window` after the first, the key is free.
    let second = s.accept(keyed("k1"), Some(WINDOW), t(60)).await.unwrap();
    let Accept::Accepted { id: second } = second else {
        panic!("{second:?}")
    };
    assert_ne!(second, first);
    assert_eq!(
        s.accept(keyed("k1"), Some(WINDOW), t(61)).await.unwrap(),
        Accept::Duplicate { id: second }
    );
    // The expired first delivery is still there, with its key for the downstream.
    let d = s.get(&first).await.unwrap().unwrap().delivery;
    assert_eq!(d.idempotency_key.as_deref(), Some("k1"));
    assert_eq!(s.stats(t(61)).await.unwrap().pending, 6);
}

async fn concurrent_accepts_of_one_key_accept_exactly_once(f: Fixture) {
    let other = f.another().await;
    let stores = [f.store.clone(), other];
    // Rounds 0–4 race for fresh keys; rounds 5–9 race for the same keys
    // after their window expired (each racer must expire the old holder).
    for round in 0..10 {
        let key = format!("race-{}", round % 5);
        let mut tasks = Vec::new();
        for i in 0..24 {
            let s = stores[i % 2].clone();
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                let at = if round < 5 { t(round) } else { t(round + 60) };
                s.accept(keyed(&key), Some(WINDOW), at).await.unwrap()
            }));
        }
        let mut accepted = Vec::new();
        let mut duplicates = HashSet::new();
        for task in tasks {
            match task.await.unwrap() {
                Accept::Accepted { id } => accepted.push(id),
                Accept::Duplicate { id } => {
                    duplicates.insert(id);
                }
            }
        }
        assert_eq!(accepted.len(), 1, "round {round}: {accepted:?}");
        assert!(
            duplicates.iter().all(|d| *d == accepted[0]),
            "round {round}: duplicates name {duplicates:?}, accepted {accepted:?}"
        );
    }
    assert_eq!(f.store.stats(t(100)).await.unwrap().pending, 10);
}

async fn two_claimers_never_share_a_delivery(f: Fixture) {
    let other = f.another().await;
    for n in 0..60 {
        f.store.accept(delivery(n), None, t(0)).await.unwrap();
    }
    let mut tasks = Vec::new();
    for (owner, s) in [("a", f.store.clone()), ("b", other)] {
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = s.claim_due(owner, t(1), 7, LEASE).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                for c in got {
                    assert_eq!(c.lease.owner, owner);
                    mine.push(c.delivery.id);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let a = tasks.remove(0).await.unwrap();
    let b = tasks.remove(0).await.unwrap();
    let sa: HashSet<_> = a.iter().collect();
    let sb: HashSet<_> = b.iter().collect();
    assert_eq!(sa.len(), a.len(), "a claimed one delivery twice");
    assert_eq!(sb.len(), b.len(), "b claimed one delivery twice");
    assert!(sa.is_disjoint(&sb), "a delivery leased to both");
    assert_eq!(a.len() + b.len(), 60);
    let st = f.store.stats(t(1)).await.unwrap();
    assert_eq!((st.pending, st.leased), (0, 60));
}

async fn an_expired_lease_is_taken_over_and_the_old_claim_refused(f: Fixture) {
    let other = f.another().await;
    let s = &f.store;
    let id = s
        .accept(delivery(1), None, t(0))
        .await
        .unwrap()
        .id()
        .to_owned();
    let old = s.claim_due("a", t(0), 1, LEASE).await.unwrap().remove(0);
    // Alive: nobody else gets it, even one second before the end.
    assert!(
        other
            .claim_due("b", t(29), 1, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    // Expired: the other instance takes it over.
    let new = other
        .claim_due("b", t(30), 1, LEASE)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(new.delivery.id, id);
    assert_eq!(new.lease.owner, "b");
    assert!(new.lease.seq > old.lease.seq);
    // The dead instance's late writes are refused, whatever they are.
    for outcome in [
        Settle::Delivered(ok_try(t(31))),
        Settle::RetryAt {
            attempt: failed_try(t(31), 503),
            next_at: t(40),
        },
        Settle::Postpone { until: t(40) },
        Settle::Dead {
            attempt: None,
            reason: None,
        },
    ] {
        let e = s.settle(&old.lease, outcome, t(31)).await;
        assert!(matches!(e, Err(StoreError::LeaseLost { .. })), "{e:?}");
    }
    let d = s.get(&id).await.unwrap().unwrap();
    assert_eq!(d.delivery.state, State::Leased);
    assert_eq!(d.delivery.lease_owner.as_deref(), Some("b"));
    assert!(d.attempts.is_empty());

    // Even the same owner re-claiming after its own lease expired: the old claim is stale.
    let newer = s.claim_due("b", t(60), 1, LEASE).await.unwrap().remove(0);
    let e = other.complete(&new.lease, ok_try(t(61)), t(61)).await;
    assert!(matches!(e, Err(StoreError::LeaseLost { .. })), "{e:?}");
    other
        .complete(&newer.lease, ok_try(t(61)), t(61))
        .await
        .unwrap();
    assert_eq!(
        s.get(&id).await.unwrap().unwrap().delivery.state,
        State::Delivered
    );

    let mut ghost = newer.lease.clone();
    ghost.id = "0190d7a0-0000-7000-8000-000000000000".into();
    let e = s.complete(&ghost, ok_try(t(62)), t(62)).await;
    assert!(matches!(e, Err(StoreError::NotFound { .. })), "{e:?}");
}

/// Many settles at once (PostgreSQL writes them in groups: one update for
/// all, then one insert of the tries it numbered; SQLite in one transaction):
/// each gets its own outcome, its own try, and its own refusal when its
/// lease was lost or its delivery never existed.
async fn concurrent_settles_each_write_their_own_outcome(f: Fixture) {
    let s = &f.store;
    let n = 60;
    let mut ids = Vec::new();
    for i in 0..n {
        let a = s.accept(delivery(i), None, t(0)).await.unwrap();
        ids.push(a.id().to_owned());
    }
    // Half were tried once before (a 503, retried at t(1)), so their next try is number 2.
    let first = s.claim_due("w", t(0), n as u32, LEASE).await.unwrap();
    assert_eq!(first.len(), n);
    let mut leases = std::collections::HashMap::new();
    for c in &first {
        let i = ids.iter().position(|id| *id == c.delivery.id).unwrap();
        if i % 2 == 1 {
            let retry = Settle::RetryAt {
                attempt: failed_try(t(0), 503),
                next_at: t(1),
            };
            s.settle(&c.lease, retry, t(0)).await.unwrap();
        } else {
            leases.insert(i, c.lease.clone());
        }
    }
    for c in s.claim_due("w", t(1), n as u32, LEASE).await.unwrap() {
        let i = ids.iter().position(|id| *id == c.delivery.id).unwrap();
        leases.insert(i, c.lease.clone());
    }
    assert_eq!(leases.len(), n);
    // Delivery 0's lease is lost: it expired first and another claim took it.
    let lost = leases[&0].clone();
    let retaken = s.claim_due("w2", t(0) + LEASE, 1, LEASE).await.unwrap();
    assert_eq!(retaken[0].delivery.id, ids[0]);
    let mut ghost = leases[&2].clone();
    ghost.id = "0190d7a0-0000-7000-8000-000000000000".into();

    let mut settles = tokio::task::JoinSet::new();
    for i in 0..n {
        let (s, lease) = (s.clone(), leases[&i].clone());
        let outcome = match i % 4 {
            0 | 1 => Settle::Delivered(ok_try(t(2))),
            2 => Settle::RetryAt {
                attempt: failed_try(t(2), 502),
                next_at: t(50),
            },
            _ => Settle::Dead {
                attempt: Some(failed_try(t(2), 400)),
                reason: Some("refused".into()),
            },
        };
        settles.spawn(async move { (i, s.settle(&lease, outcome, t(3)).await) });
    }
    let s2 = s.clone();
    settles.spawn(async move { (usize::MAX, s2.complete(&ghost, ok_try(t(2)), t(3)).await) });
    let mut refused = Vec::new();
    while let Some(r) = settles.join_next().await {
        let (i, r) = r.unwrap();
        match r {
            Ok(()) => assert!(i != 0 && i != usize::MAX, "settle {i} was not refused"),
            Err(StoreError::LeaseLost { id }) => {
                assert_eq!(i, 0);
                assert_eq!(id, lost.id);
                refused.push(i);
            }
            Err(StoreError::NotFound { id }) => {
                assert_eq!(i, usize::MAX);
                assert_eq!(id, "0190d7a0-0000-7000-8000-000000000000");
                refused.push(i);
            }
            Err(e) => panic!("settle {i}: {e:?}"),
        }
    }
    refused.sort();
    assert_eq!(refused, vec![0, usize::MAX]);

    for (i, id) in ids.iter().enumerate() {
        let d = s.get(id).await.unwrap().unwrap();
        let earlier = i % 2; // tries before this settle
        if i == 0 {
            // untouched by the refused settle: still w2's
            assert_eq!(d.delivery.state, State::Leased);
            assert_eq!(d.delivery.lease_owner.as_deref(), Some("w2"));
            assert_eq!(d.attempts.len(), earlier);
            continue;
        }
        let (state, status) = match i % 4 {
            0 | 1 => (State::Delivered, 200),
            2 => (State::Pending, 502),
            _ => (State::Dead, 400),
        };
        assert_eq!(d.delivery.state, state, "delivery {i}");
        assert_eq!(d.delivery.attempts as usize, earlier + 1, "delivery {i}");
        assert_eq!(d.delivery.lease_owner, None);
        assert_eq!(d.delivery.updated_at, t(3));
        assert_eq!(d.attempts.len(), earlier + 1, "delivery {i}");
        let last = d.attempts.last().unwrap();
        assert_eq!(last.number as usize, earlier + 1, "delivery {i}");
        assert_eq!(last.status, Some(status));
        assert_eq!(last.at, t(2));
        if state == State::Dead {
            assert_eq!(d.delivery.last_error.as_deref(), Some("refused"));
        }
        if state == State::Pending {
            assert_eq!(d.delivery.next_attempt_at, t(50));
        }
    }
}

async fn postpone_uses_no_try(f: Fixture) {
    let s = &f.store;
    let id = s
        .accept(delivery(1), None, t(0))
        .await
        .unwrap()
        .id()
        .to_owned();
    let c = s.claim_due("w", t(0), 1, LEASE).await.unwrap().remove(0);
    s.postpone(&c.lease, t(60), t(1)).await.unwrap();
    let d = s.get(&id).await.unwrap().unwrap();
    assert_eq!(d.delivery.state, State::Pending);
    assert_eq!(d.delivery.attempts, 0);
    assert_eq!(d.delivery.next_attempt_at, t(60));
    assert!(d.attempts.is_empty());
    assert!(s.claim_due("w", t(59), 1, LEASE).await.unwrap().is_empty());
    let c = s.claim_due("w", t(60), 1, LEASE).await.unwrap().remove(0);
    assert_eq!(c.delivery.attempts, 0);
    // The previous claim's lease is spent.
    s.postpone(&c.lease, t(70), t(61)).await.unwrap();
    let e = s.postpone(&c.lease, t(80), t(62)).await;
    assert!(matches!(e, Err(StoreError::LeaseLost { .. })), "{e:?}");
}

async fn release_owner_returns_leased_work(f: Fixture) {
    let s = &f.store;
    for n in 0..4 {
        s.accept(delivery(n), None, t(0)).await.unwrap();
    }
    let a = s.claim_due("a", t(1), 3, LEASE).await.unwrap();
    let b = s.claim_due("b", t(1), 3, LEASE).await.unwrap();
    assert_eq!((a.len(), b.len()), (3, 1));
    assert_eq!(s.release_owner("a", t(2)).await.unwrap(), 3);
    assert_eq!(s.release_owner("a", t(2)).await.unwrap(), 0);
    let st = s.stats(t(2)).await.unwrap();
    assert_eq!((st.pending, st.leased), (3, 1));
    // Due again at once (their next_attempt_at), attempts unchanged, old leases void.
    let c = s.claim_due("c", t(2), 10, LEASE).await.unwrap();
    assert_eq!(c.len(), 3);
    assert!(c.iter().all(|c| c.delivery.attempts == 0));
    let e = s.complete(&a[0].lease, ok_try(t(3)), t(3)).await;
    assert!(matches!(e, Err(StoreError::LeaseLost { .. })), "{e:?}");
}

async fn stats_count_queues_and_oldest_age(f: Fixture) {
    let s = &f.store;
    let st = s.stats(t(0)).await.unwrap();
    assert_eq!(
        (st.pending, st.leased, st.dead, st.oldest_pending_age),
        (0, 0, 0, None)
    );
    s.accept(delivery(1), None, t(10)).await.unwrap();
    s.accept(delivery(2), None, t(20)).await.unwrap();
    s.accept(delivery(3), None, t(30)).await.unwrap();
    let c = s.claim_due("w", t(15), 1, LEASE).await.unwrap().remove(0);
    let st = s.stats(t(100)).await.unwrap();
    assert_eq!((st.pending, st.leased, st.dead), (2, 1, 0));
    // The leased one is the oldest: still not delivered.
    assert_eq!(st.oldest_pending_age, Some(Duration::from_secs(90)));
    s.bury(&c.lease, failed_try(t(15), 400), t(16))
        .await
        .unwrap();
    let st = s.stats(t(100)).await.unwrap();
    assert_eq!((st.pending, st.leased, st.dead), (2, 0, 1));
    assert_eq!(st.oldest_pending_age, Some(Duration::from_secs(80)));
    assert_eq!(s.list(None, 10).await.unwrap().len(), 3);
    assert_eq!(s.list(None, 2).await.unwrap().len(), 2);
    assert_eq!(
        s.list(Some(State::Pending), 10)
            .await
            .unwrap()
            .iter()
            .map(|d| d.created_at)
            .collect::<Vec<_>>(),
        vec![t(30), t(20)],
        "newest first"
    );
}

fn answer(status: u16, body: &str) -> StoredAnswer {
    StoredAnswer {
        status,
        body: body.as_bytes().to_vec(),
    }
}

/// A sync key of route `r` of `bot`.
fn sync_key(bot: &str, key: &str) -> ScopedKey {
    ScopedKey::new(bot, "r", key)
}

/// `begin` that must answer `New`: its hold.
async fn begin_new(s: &Arc<dyn Store>, key: &ScopedKey, lease: Duration, now: SystemTime) -> Hold {
    match s.begin(key, WINDOW, lease, now).await.unwrap() {
        Begin::New(hold) => hold,
        other => panic!("expected New, got {other:?}"),
    }
}

async fn idempotency_begin_finish_and_window(f: Fixture) {
    let s = &f.store;
    let lease = Duration::from_secs(10);
    let k = sync_key("bot", "k");
    let h = begin_new(s, &k, lease, t(0)).await;
    assert_eq!(
        s.begin(&k, WINDOW, lease, t(1)).await.unwrap(),
        Begin::InProgress
    );
    // Keys are per bot.
    begin_new(s, &sync_key("other-bot", "k"), lease, t(1)).await;
    let first = answer(201, r#"{"crmId":"C-1"}"#);
    assert!(s.finish(&h, first.clone(), t(2)).await.unwrap());
    assert!(
        !s.finish(&h, answer(500, "{}"), t(3)).await.unwrap(),
        "the first answer stays"
    );
    assert_eq!(
        s.begin(&k, WINDOW, lease, t(59)).await.unwrap(),
        Begin::Done(first)
    );
    // The window runs from the first request.
    let h = begin_new(s, &k, lease, t(60)).await;
    // Abandoned: the next request starts afresh.
    assert!(s.abandon(&h).await.unwrap());
    assert!(!s.abandon(&h).await.unwrap());
    let h = begin_new(s, &k, lease, t(61)).await;
    // A finished record is not abandoned.
    s.finish(&h, answer(200, ""), t(62)).await.unwrap();
    assert!(!s.abandon(&h).await.unwrap());
    assert_eq!(
        s.begin(&k, WINDOW, lease, t(63)).await.unwrap(),
        Begin::Done(answer(200, ""))
    );
}

async fn idempotency_stale_in_progress_is_taken_over(f: Fixture) {
    let s = &f.store;
    let lease = Duration::from_secs(10);
    let k = sync_key("bot", "k");
    begin_new(s, &k, lease, t(0)).await;
    assert_eq!(
        s.begin(&k, WINDOW, lease, t(9)).await.unwrap(),
        Begin::InProgress
    );
    // The first request crashed: after its lease, the key is usable again.
    begin_new(s, &k, lease, t(10)).await;
    assert_eq!(
        s.begin(&k, WINDOW, lease, t(19)).await.unwrap(),
        Begin::InProgress
    );
}

async fn concurrent_begins_of_one_key_start_once(f: Fixture) {
    let other = f.another().await;
    let stores = [f.store.clone(), other];
    for round in 0..5 {
        let key = sync_key("bot", &format!("k{round}"));
        let mut tasks = Vec::new();
        for i in 0..16 {
            let s = stores[i % 2].clone();
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                s.begin(&key, WINDOW, LEASE, t(0)).await.unwrap()
            }));
        }
        let mut new = 0;
        for task in tasks {
            match task.await.unwrap() {
                Begin::New(_) => new += 1,
                Begin::InProgress => {}
                Begin::Done(a) => panic!("nothing finished yet: {a:?}"),
            }
        }
        assert_eq!(new, 1, "round {round}");
    }
}

async fn purge_removes_old_delivered_and_keys(f: Fixture) {
    let s = &f.store;
    let old = s
        .accept(keyed("old"), Some(WINDOW), t(0))
        .await
        .unwrap()
        .id()
        .to_owned();
    let dead = s
        .accept(keyed("dead"), Some(WINDOW), t(0))
        .await
        .unwrap()
        .id()
        .to_owned();
    let c = s.claim_due("w", t(0), 10, LEASE).await.unwrap();
    for c in &c {
        if c.delivery.id == old {
            s.complete(&c.lease, ok_try(t(1)), t(1)).await.unwrap();
        } else {
            s.bury(&c.lease, failed_try(t(1), 400), t(1)).await.unwrap();
        }
    }
    begin_new(s, &sync_key("bot", "sync-key"), LEASE, t(0)).await;
    let fresh = s
        .accept(keyed("fresh"), Some(WINDOW), t(100))
        .await
        .unwrap()
        .id()
        .to_owned();
    // Delivered before t(50) and keys created before it go; dead letters stay.
    assert_eq!(s.purge(t(50), 100).await.unwrap(), 2);
    assert!(s.get(&old).await.unwrap().is_none());
    assert!(s.get(&dead).await.unwrap().is_some());
    assert!(s.get(&fresh).await.unwrap().is_some());
    begin_new(s, &sync_key("bot", "sync-key"), LEASE, t(101)).await;
}

async fn reopening_keeps_data_and_schema(f: Fixture) {
    let id = f
        .store
        .accept(delivery(1), None, t(0))
        .await
        .unwrap()
        .id()
        .to_owned();
    f.store.close().await;
    let reopened = f.another().await;
    let d = reopened.get(&id).await.unwrap().unwrap();
    assert_eq!(d.delivery.request, delivery(1).request);
    // Opening again does not migrate again (it would fail on existing tables).
    let third = f.another().await;
    assert_eq!(third.stats(t(1)).await.unwrap().pending, 1);
}

// ---- SQLite only ----

async fn sqlite_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    (dir, path)
}

/// An independent reader of the same file, like another process.
async fn outside_reader(path: &std::path::Path) -> sqlx::SqlitePool {
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(path))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_group_commit_batches_concurrent_accepts_and_answers_after_commit() {
    let (_dir, path) = sqlite_file().await;
    let store = Arc::new(
        SqliteStore::open(&path, SqliteOptions::default())
            .await
            .unwrap(),
    );
    let reader = outside_reader(&path).await;
    let before = store.commits();
    let n = 400;
    let mut tasks = Vec::new();
    for i in 0..n {
        let store = store.clone();
        let reader = reader.clone();
        tasks.push(tokio::spawn(async move {
            let id = store
                .accept(delivery(i), None, t(0))
                .await
                .unwrap()
                .id()
                .to_owned();
            // Answered means committed: another connection sees the row at once.
            let seen: Option<String> = sqlx::query_scalar("SELECT id FROM deliveries WHERE id = ?")
                .bind(&id)
                .fetch_optional(&reader)
                .await
                .unwrap();
            assert_eq!(
                seen.as_deref(),
                Some(id.as_str()),
                "accepted but not visible"
            );
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let commits = store.commits() - before;
    assert!(
        commits * 4 <= n as u64,
        "{n} concurrent accepts took {commits} commits"
    );
    assert_eq!(store.stats(t(0)).await.unwrap().pending, n as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_without_group_commit_commits_once_per_accept() {
    let (_dir, path) = sqlite_file().await;
    let opts = SqliteOptions {
        max_batch: 1,
        ..SqliteOptions::default()
    };
    let store = Arc::new(SqliteStore::open(&path, opts).await.unwrap());
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.accept(delivery(i), None, t(0)).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(store.commits(), 20);
}

#[tokio::test]
async fn sqlite_accepted_delivery_survives_a_store_that_never_closed() {
    let (_dir, path) = sqlite_file().await;
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let id = store
        .accept(delivery(1), None, t(0))
        .await
        .unwrap()
        .id()
        .to_owned();
    // No close, no checkpoint: the connection is leaked with the data in the WAL.
    std::mem::forget(store);
    let reopened = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let d = reopened.get(&id).await.unwrap().unwrap();
    assert_eq!(d.delivery.state, State::Pending);
}

/// Set in the child process of the crash test: the database file to accept into.
const CRASH_CHILD_DB: &str = "GATEWAY_TEST_CRASH_CHILD_DB";

/// The child of `sqlite_every_acknowledged_accept_survives_sigkill`, which
/// runs this binary again for it alone, with the database in
/// `GATEWAY_TEST_CRASH_CHILD_DB`: accepts forever from 16 tasks, printing
/// each id once `accept` returned (the moment the gateway would answer 202).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of store::sqlite_every_acknowledged_accept_survives_sigkill, \
            which runs it (--ignored --exact store::sqlite_crash_child)"]
async fn sqlite_crash_child() {
    let db = std::env::var(CRASH_CHILD_DB).unwrap_or_else(|_| {
        panic!(
            "{CRASH_CHILD_DB} is not set: this test is the child of \
             store::sqlite_every_acknowledged_accept_survives_sigkill, which runs it"
        )
    });
    let store = Arc::new(
        SqliteStore::open(&db, SqliteOptions::default())
            .await
            .unwrap(),
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for task in 0..16 {
        let store = store.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let a = store
                    .accept(delivery(task * 1_000_000 + i), None, SystemTime::now())
                    .await
                    .unwrap();
                let _ = tx.send(a.id().to_owned());
            }
        });
    }
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    while let Some(id) = rx.recv().await {
        writeln!(out, "ACK {id}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn sqlite_every_acknowledged_accept_survives_sigkill() {
    use std::io::BufRead;
    use std::sync::mpsc::RecvTimeoutError;
    /// How long one round (start, accepts until the kill, the rest of the output) may take.
    const ROUND: Duration = Duration::from_secs(60);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let mut acknowledged = Vec::new();
    for round in 0..4 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "store::sqlite_crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env_clear()
            .env(CRASH_CHILD_DB, &db)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Its output arrives on a channel, so every read below has a deadline.
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + ROUND;
        let next =
            || lines.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
        // Kill it at a different moment each round, mid-stream.
        let kill_after = 200 + round * 350;
        let mut seen = 0;
        while seen < kill_after {
            let line = match next() {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    panic!("round {round}: {seen} of {kill_after} accepts within {ROUND:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "round {round}: the child ended after {seen} accepts: {:?}",
                        child.wait()
                    )
                }
            };
            if let Some(id) = line.strip_prefix("ACK ") {
                acknowledged.push(id.to_owned());
                seen += 1;
            }
        }
        child.kill().unwrap(); // SIGKILL
        // Ids printed before the kill were acknowledged too.
        loop {
            match next() {
                Ok(line) => {
                    if let Some(id) = line.strip_prefix("ACK ") {
                        acknowledged.push(id.to_owned());
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("round {round}: the killed child's output did not end within {ROUND:?}")
                }
            }
        }
        child.wait().unwrap();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reader = outside_reader(&db).await;
        let stored: HashSet<String> = sqlx::query_scalar("SELECT id FROM deliveries")
            .fetch_all(&reader)
            .await
            .unwrap()
            .into_iter()
            .collect();
        let lost: Vec<_> = acknowledged
            .iter()
            .filter(|id| !stored.contains(*id))
            .collect();
        assert!(
            lost.is_empty(),
            "{} of {} acknowledged accepts lost: {:?}",
            lost.len(),
            acknowledged.len(),
            &lost[..lost.len().min(5)]
        );
        assert!(acknowledged.len() >= 2000, "{}", acknowledged.len());
    });
}

#[tokio::test]
async fn sqlite_refuses_a_newer_schema() {
    let (_dir, path) = sqlite_file().await;
    SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap()
        .close()
        .await;
    let raw = outside_reader(&path).await;
    sqlx::query("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
        .execute(&raw)
        .await
        .unwrap();
    raw.close().await;
    let e = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(e, StoreError::SchemaTooNew { found: 99, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("newer"), "{e}");
}

#[tokio::test]
async fn sqlite_url_relative_to_the_working_directory_creates_parents() {
    let dir = tempfile::tempdir().unwrap();
    // A relative path from the working directory into the temp dir.
    let cwd = std::env::current_dir().unwrap();
    let ups = "../".repeat(cwd.components().count() - 1);
    let target = dir.path().join("nested/deeper/gateway.db");
    let rel = format!("{ups}{}", target.strip_prefix("/").unwrap().display());
    assert!(!rel.starts_with('/'));
    let store = cognigy_gateway::store::open(&format!("sqlite://{rel}"))
        .await
        .unwrap();
    assert_eq!(store.backend(), "sqlite");
    store.accept(delivery(1), None, t(0)).await.unwrap();
    store.close().await;
    assert!(target.is_file());
    // And an absolute one: sqlite:///abs/path.db.
    let abs = dir.path().join("abs/gateway.db");
    let store = cognigy_gateway::store::open(&format!("sqlite://{}", abs.display()))
        .await
        .unwrap();
    store.close().await;
    assert!(abs.is_file());
    let after_close = store.accept(delivery(2), None, t(0)).await;
    assert!(
        matches!(after_close, Err(StoreError::Closed)),
        "{after_close:?}"
    );
}

// ---- PostgreSQL only ----

/// Fills the queue table with 20,000 rows, 15,000 of them delivered.
async fn fill_queue(conn: &mut sqlx::postgres::PgConnection) {
    sqlx::raw_sql(
        "INSERT INTO deliveries (id, bot, route, payload, method, url, headers, body, state, \
         attempts, next_attempt_at, due_at, created_at, updated_at) \
         SELECT 'id-' || lpad(g::text, 8, '0'), 'b', 'r', repeat('x', 600), 'PUT', 'http://x/', \
         '[]', '{}', CASE WHEN g <= 15000 THEN 'delivered' ELSE 'pending' END, 0, g, \
         CASE WHEN g <= 15000 THEN NULL ELSE g END, g, g FROM generate_series(1, 20000) g",
    )
    .execute(conn)
    .await
    .unwrap();
}

/// How many parameters (`$1`, `$2`, …) `statement` has.
fn params_of(statement: &str) -> usize {
    (1..=20)
        .filter(|n| statement.contains(&format!("${n}")))
        .count()
}

/// `EXPLAIN EXECUTE call` (a prepared statement and its arguments) has no
/// sequential scan of `deliveries`.
async fn assert_no_table_scan(
    conn: &mut sqlx::postgres::PgConnection,
    call: &str,
    statement: &str,
) {
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (COSTS OFF) EXECUTE {call}"
    )))
    .fetch_all(conn)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(
        !plan.contains("Seq Scan on deliveries"),
        "{statement}\n{plan}"
    );
}

/// The plan PostgreSQL keeps for each statement of every async webhook
/// (a generic plan: a connection runs it again and again) reads only the rows
/// it needs: no sequential scan of `deliveries` at 20,000 rows, most of them
/// delivered. The claim, written `id IN (SELECT …)`, had one (39 ms a claim
/// at 50,000 rows): the worker of `bench/load.sh` f then fell behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_every_webhook_statement_keeps_an_index_plan() {
    use cognigy_gateway::store::postgres::sql;
    let url = support::pg::url().await;
    let store = PgStore::open(&url, PgOptions::default()).await.unwrap();
    let mut conn = store.pool().acquire().await.unwrap();
    fill_queue(&mut conn).await;
    sqlx::raw_sql("ANALYZE deliveries; ANALYZE attempts; SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .unwrap();
    for (i, statement) in sql::ALL.iter().enumerate() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "PREPARE hot{i} AS {statement}"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        let nulls = vec!["NULL"; params_of(statement)].join(", ");
        assert_no_table_scan(&mut conn, &format!("hot{i}({nulls})"), statement).await;
    }
}

/// Arguments for `EXECUTE` of one of `sql::ALL`: one-element arrays of the
/// types the statement casts to; the claim's own four values otherwise.
fn hot_args(statement: &str) -> String {
    (1..=params_of(statement))
        .map(|n| {
            let cast = statement
                .split(&format!("${n}::"))
                .nth(1)
                .map(|rest| rest.split([',', ')']).next().unwrap());
            match cast {
                Some("text[]") => "ARRAY['x']::text[]".to_owned(),
                Some("bigint[]") => "ARRAY[1]::bigint[]".to_owned(),
                Some("bool[]") => "ARRAY[true]".to_owned(),
                Some(other) => panic!("no argument for ${n}::{other}"),
                // the claim: owner, leased until, now, limit
                None => ["'w'", "9000000000000", "9000000000000", "64"][n - 1].to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A connection runs the same statements for the store's whole life, from
/// an empty queue table to a large one. Plans made while it was empty must
/// not read the whole table once it is large: PostgreSQL keeps a generic plan
/// after five runs by default, and the claim's, made on an empty table,
/// scanned the whole table at 50,000 rows (20–45 ms a claim: the worker fell
/// behind in `bench/load.sh` f). The claims' connection plans each run anew
/// (`planned_each_run`); the other statements' generic plans stay index plans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_plans_made_on_an_empty_queue_do_not_scan_it_once_large() {
    use cognigy_gateway::store::postgres::{planned_each_run, sql};
    use sqlx::Connection;
    use std::str::FromStr;
    let url = support::pg::url().await;
    let store = PgStore::open(&url, PgOptions::default()).await.unwrap();
    let mut pooled = store.pool().acquire().await.unwrap();
    let options = sqlx::postgres::PgConnectOptions::from_str(&url).unwrap();
    let mut claims = sqlx::postgres::PgConnection::connect_with(&planned_each_run(options))
        .await
        .unwrap();
    let explain = |i: usize, statement: &str| {
        sqlx::AssertSqlSafe(format!(
            "EXPLAIN (COSTS OFF) EXECUTE hot{i}({})",
            hot_args(statement)
        ))
    };
    for (i, statement) in sql::ALL.iter().enumerate() {
        let conn: &mut sqlx::postgres::PgConnection = if *statement == sql::CLAIM {
            &mut claims
        } else {
            &mut pooled
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "PREPARE hot{i} AS {statement}"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        // planned ten times on the empty table
        for _ in 0..10 {
            sqlx::query_scalar::<_, String>(explain(i, statement))
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        }
    }
    // the queue grows (not analysed yet: autovacuum has not come by)
    fill_queue(&mut pooled).await;
    for (i, statement) in sql::ALL.iter().enumerate() {
        let conn: &mut sqlx::postgres::PgConnection = if *statement == sql::CLAIM {
            &mut claims
        } else {
            &mut pooled
        };
        let call = format!("hot{i}({})", hot_args(statement));
        assert_no_table_scan(conn, &call, statement).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_open_with_a_bad_url_names_no_password() {
    let e = PgStore::open(
        "postgres://user:hunter2@127.0.0.1:1/db",
        PgOptions {
            acquire_timeout: Duration::from_secs(2),
            ..PgOptions::default()
        },
    )
    .await
    .err()
    .unwrap();
    assert!(e.is_transient(), "{e:?}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_instances_starting_together_migrate_once() {
    let url = support::pg::url().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            PgStore::open(&url, PgOptions::default()).await.map(|_| ())
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let store = PgStore::open(&url, PgOptions::default()).await.unwrap();
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_version")
        .fetch_all(store.pool())
        .await
        .unwrap();
    let latest = cognigy_gateway::store::postgres::SCHEMA_VERSION;
    assert_eq!(versions, (1..=latest).collect::<Vec<_>>());
}

/// The pending count's shard rows (schema 4): a transaction whose backend's
/// own row is held by another transaction in flight adds its delta to a free
/// row instead of waiting for that transaction's commit. With the shard
/// `pg_backend_pid() % 16` alone, the pool's 16 connections and the claims'
/// lane always shared rows, and waited for each other's commits (up to
/// 300 ms in `bench/load.sh` f). Here every row but one is held, the backend's
/// own (by either rule) among them; its insert must not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_live_count_takes_a_free_shard_instead_of_waiting() {
    let url = support::pg::url().await;
    let store = PgStore::open(&url, PgOptions::default()).await.unwrap();
    let mut holder = store.pool().acquire().await.unwrap();
    let mut writer = store.pool().acquire().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *writer)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut *holder).await.unwrap();
    let held: Vec<i32> = sqlx::query_scalar(
        "SELECT shard FROM live_count WHERE shard <> ($1 % 64 + 1) % 64 FOR UPDATE",
    )
    .bind(pid)
    .fetch_all(&mut *holder)
    .await
    .unwrap();
    // the free row is neither `pid % 64` nor `pid % 16` (they are equal mod 16, it is not)
    assert!(held.contains(&(pid % 16)) && !held.is_empty());
    sqlx::raw_sql("SET lock_timeout = '3s'")
        .execute(&mut *writer)
        .await
        .unwrap();
    sqlx::raw_sql(
        "INSERT INTO deliveries (id, bot, route, payload, method, url, headers, body, state, \
         attempts, next_attempt_at, due_at, created_at, updated_at) \
         VALUES ('d1', 'b', 'r', '{}', 'PUT', 'http://x/', '[]', '{}', 'pending', 0, 1, 1, 1, 1)",
    )
    .execute(&mut *writer)
    .await
    .expect("the insert waited for a shard row another transaction held");
    sqlx::raw_sql("COMMIT").execute(&mut *holder).await.unwrap();
    let live: i64 = sqlx::query_scalar("SELECT SUM(live)::BIGINT FROM live_count")
        .fetch_one(&mut *writer)
        .await
        .unwrap();
    assert_eq!(live, 1);
}
