//! SPEC §7.3 "Acknowledged means delivered, once", the store's half (issue 13):
//! idempotency per (bot, route, key), sync holds that only their holder can end,
//! the `--max-pending` bound, dead-letter retention, the migration of a store
//! written by schema version 1, the SQLite lock, shutdown within the grace and a
//! failing store. Store scenarios run on SQLite and on PostgreSQL (`sqlite::`,
//! `postgres::`); `binary::` runs the real `gateway` against a local downstream.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cognigy_gateway::store::{
    Accept, AttemptRecord, Begin, NewDelivery, ScopedKey, State, Store, StoreError, StoreExt,
    StoreOptions, StoredAnswer, StoredRequest,
};

/// A fixed "now" (the fixture `v1.db` was written with the same origin).
fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

const LEASE: Duration = Duration::from_secs(30);
const WINDOW: Duration = Duration::from_secs(60);

fn delivery(route: &str, key: Option<&str>) -> NewDelivery {
    NewDelivery {
        bot: "support-bot".into(),
        route: route.into(),
        payload: r#"{"inputId":"in-1"}"#.into(),
        request: StoredRequest {
            method: "POST".into(),
            url: format!("https://crm.example.com/{route}"),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Some("{}".into()),
        },
        idempotency_key: key.map(str::to_owned),
        fingerprint: None,
    }
}

fn sk(route: &str, key: &str) -> ScopedKey {
    ScopedKey::new("support-bot", route, key)
}

fn answer(status: u16, body: &str) -> StoredAnswer {
    StoredAnswer {
        status,
        body: body.as_bytes().to_vec(),
    }
}

fn ok_try(at: SystemTime) -> AttemptRecord {
    AttemptRecord {
        at,
        status: Some(200),
        latency: Duration::from_millis(5),
        error: None,
    }
}

fn failed_try(at: SystemTime) -> AttemptRecord {
    AttemptRecord {
        at,
        status: Some(400),
        latency: Duration::from_millis(5),
        error: None,
    }
}

/// One database under test; [`Db::open`] opens a store instance on it (with
/// PostgreSQL, several instances share it as several gateways would).
struct Db {
    url: String,
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("gateway.db").display());
        Db {
            url,
            _dir: Some(dir),
        }
    }

    async fn postgres() -> Db {
        Db {
            url: support::pg::url().await,
            _dir: None,
        }
    }

    async fn open(&self, opts: StoreOptions) -> Arc<dyn Store> {
        cognigy_gateway::store::open_with(&self.url, opts)
            .await
            .unwrap()
    }

    async fn store(&self) -> Arc<dyn Store> {
        self.open(StoreOptions::default()).await
    }
}

fn bounded(max: u64) -> StoreOptions {
    StoreOptions {
        max_pending: Some(max),
    }
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Db::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Db::postgres().await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    async_keys_are_per_route,
    sync_keys_are_per_route,
    only_the_holder_finishes_or_frees_a_key,
    a_full_queue_refuses_accepts_and_stores_nothing,
    a_group_is_stored_all_or_nothing_and_deduped_one_by_one,
    concurrent_accepts_never_go_over_max_pending,
    purge_dead_removes_only_dead_letters_older_than_the_retention,
);

/// Two routes of one bot whose keys render the same value are independent.
async fn async_keys_are_per_route(db: Db) {
    let s = db.store().await;
    let upsert = s
        .accept(delivery("crm-upsert", Some("in-1")), Some(WINDOW), t(0))
        .await
        .unwrap();
    let notes = s
        .accept(delivery("crm-notes", Some("in-1")), Some(WINDOW), t(1))
        .await
        .unwrap();
    assert!(matches!(upsert, Accept::Accepted { .. }), "{upsert:?}");
    assert!(matches!(notes, Accept::Accepted { .. }), "{notes:?}");
    assert_ne!(upsert.id(), notes.id());
    // Within one route, a key is still deduped.
    for (route, first) in [("crm-upsert", &upsert), ("crm-notes", &notes)] {
        assert_eq!(
            s.accept(delivery(route, Some("in-1")), Some(WINDOW), t(2))
                .await
                .unwrap(),
            Accept::Duplicate {
                id: first.id().to_owned()
            }
        );
    }
    // And per bot, as before.
    let mut other_bot = delivery("crm-upsert", Some("in-1"));
    other_bot.bot = "other-bot".into();
    assert!(matches!(
        s.accept(other_bot, Some(WINDOW), t(2)).await.unwrap(),
        Accept::Accepted { .. }
    ));
    // The window runs per (bot, route, key): crm-upsert's key expires first.
    let again = s
        .accept(delivery("crm-upsert", Some("in-1")), Some(WINDOW), t(60))
        .await
        .unwrap();
    assert!(matches!(again, Accept::Accepted { .. }), "{again:?}");
    assert_eq!(
        s.accept(delivery("crm-notes", Some("in-1")), Some(WINDOW), t(60))
            .await
            .unwrap(),
        Accept::Duplicate {
            id: notes.id().to_owned()
        }
    );
    assert_eq!(s.list(None, 10).await.unwrap().len(), 4);
}

async fn sync_keys_are_per_route(db: Db) {
    let s = db.store().await;
    let lease = Duration::from_secs(10);
    let (upsert, notes) = (sk("crm-upsert", "in-1"), sk("crm-notes", "in-1"));
    let Begin::New(h_upsert) = s.begin(&upsert, WINDOW, lease, t(0)).await.unwrap() else {
        panic!("first request of crm-upsert")
    };
    let Begin::New(h_notes) = s.begin(&notes, WINDOW, lease, t(0)).await.unwrap() else {
        panic!("the same key on another route is another request")
    };
    assert_eq!(
        s.begin(&upsert, WINDOW, lease, t(1)).await.unwrap(),
        Begin::InProgress
    );
    assert!(s.finish(&h_upsert, answer(201, "a"), t(2)).await.unwrap());
    assert_eq!(
        s.begin(&upsert, WINDOW, lease, t(3)).await.unwrap(),
        Begin::Done(answer(201, "a"))
    );
    assert_eq!(
        s.begin(&notes, WINDOW, lease, t(3)).await.unwrap(),
        Begin::InProgress,
        "crm-upsert's answer is not crm-notes'"
    );
    assert!(s.finish(&h_notes, answer(200, "b"), t(4)).await.unwrap());
    assert_eq!(
        s.begin(&notes, WINDOW, lease, t(5)).await.unwrap(),
        Begin::Done(answer(200, "b"))
    );
    let other_bot = ScopedKey::new("other-bot", "crm-upsert", "in-1");
    assert!(matches!(
        s.begin(&other_bot, WINDOW, lease, t(5)).await.unwrap(),
        Begin::New(_)
    ));
}

/// SPEC §7.3: only the request that holds a key can finish or free it; a
/// request whose hold expired cannot overwrite or free another's.
async fn only_the_holder_finishes_or_frees_a_key(db: Db) {
    let s = db.store().await;
    let lease = Duration::from_secs(10);
    let k = sk("crm-upsert", "in-1");
    let Begin::New(first) = s.begin(&k, WINDOW, lease, t(0)).await.unwrap() else {
        panic!("new key")
    };
    // The first request's hold expires (it is slow, or its process stalled):
    // a retry of the bot takes the key over.
    let Begin::New(second) = s.begin(&k, WINDOW, lease, t(10)).await.unwrap() else {
        panic!("an expired hold is taken over")
    };
    assert_ne!(first, second);
    // The first can neither free the key nor write its answer over the second's hold.
    assert!(!s.abandon(&first).await.unwrap());
    assert_eq!(
        s.begin(&k, WINDOW, lease, t(11)).await.unwrap(),
        Begin::InProgress,
        "the second still holds the key"
    );
    assert!(
        !s.finish(&first, answer(500, "late"), t(12)).await.unwrap(),
        "a late answer of an expired hold is not kept"
    );
    assert_eq!(
        s.begin(&k, WINDOW, lease, t(12)).await.unwrap(),
        Begin::InProgress
    );
    // The holder can.
    assert!(
        s.finish(&second, answer(201, "second"), t(13))
            .await
            .unwrap()
    );
    assert_eq!(
        s.begin(&k, WINDOW, lease, t(14)).await.unwrap(),
        Begin::Done(answer(201, "second"))
    );
    // Once finished, nobody frees or rewrites it: not the late one, not the holder.
    assert!(!s.finish(&first, answer(500, "late"), t(15)).await.unwrap());
    assert!(!s.abandon(&first).await.unwrap());
    assert!(!s.abandon(&second).await.unwrap());
    assert!(
        !s.finish(&second, answer(200, "again"), t(15))
            .await
            .unwrap()
    );
    assert_eq!(
        s.begin(&k, WINDOW, lease, t(16)).await.unwrap(),
        Begin::Done(answer(201, "second"))
    );

    // A hold past its lease that nobody took over still finishes: its answer is the only one.
    let k2 = sk("crm-upsert", "in-2");
    let Begin::New(slow) = s.begin(&k2, WINDOW, lease, t(0)).await.unwrap() else {
        panic!("new key")
    };
    assert!(s.finish(&slow, answer(200, "slow"), t(30)).await.unwrap());
    assert_eq!(
        s.begin(&k2, WINDOW, lease, t(31)).await.unwrap(),
        Begin::Done(answer(200, "slow"))
    );

    // The holder frees its key: the next request is a real one.
    let k3 = sk("crm-upsert", "in-3");
    let Begin::New(h) = s.begin(&k3, WINDOW, lease, t(0)).await.unwrap() else {
        panic!("new key")
    };
    assert!(s.abandon(&h).await.unwrap());
    assert!(!s.abandon(&h).await.unwrap());
    let Begin::New(h2) = s.begin(&k3, WINDOW, lease, t(1)).await.unwrap() else {
        panic!("a freed key starts afresh")
    };
    // The freed hold's token does not come back to life.
    assert!(!s.finish(&h, answer(200, "old"), t(2)).await.unwrap());
    assert!(s.finish(&h2, answer(200, "new"), t(2)).await.unwrap());
}

/// SPEC §7.3 `--max-pending`: with that many deliveries pending (leased ones
/// included: they are not delivered yet), an accept stores nothing.
/// SPEC §9: a route's own delivery and its `also` targets' are stored in one
/// transaction: all or none (a full queue refuses the whole group), each
/// deduped on its own (bot, route, key).
async fn a_group_is_stored_all_or_nothing_and_deduped_one_by_one(db: Db) {
    let s = db.open(bounded(4)).await;
    let group = |k: &str| {
        vec![
            delivery("r", Some(k)),
            delivery("r/helpdesk", Some(k)),
            delivery("r/analytics", Some(k)),
        ]
    };
    let first = s.accept_all(group("k1"), Some(WINDOW), t(0)).await.unwrap();
    assert!(
        first.iter().all(|a| matches!(a, Accept::Accepted { .. })),
        "{first:?}"
    );
    let ids: std::collections::HashSet<&str> = first.iter().map(Accept::id).collect();
    assert_eq!(ids.len(), 3, "three deliveries");
    // the same call again: each is a duplicate of its own first delivery
    let again = s.accept_all(group("k1"), Some(WINDOW), t(1)).await.unwrap();
    for (a, f) in again.iter().zip(&first) {
        assert_eq!(
            a,
            &Accept::Duplicate {
                id: f.id().to_owned()
            }
        );
    }
    // a target whose own delivery is new while the others are duplicates
    let mixed = s
        .accept_all(
            vec![delivery("r", Some("k1")), delivery("r/crm2", Some("k1"))],
            Some(WINDOW),
            t(1),
        )
        .await
        .unwrap();
    assert!(matches!(mixed[0], Accept::Duplicate { .. }), "{mixed:?}");
    assert!(matches!(mixed[1], Accept::Accepted { .. }), "{mixed:?}");
    // 4 live now: a group of three does not fit, and none of it is stored
    let full = s
        .accept_all(group("k2"), Some(WINDOW), t(2))
        .await
        .unwrap_err();
    assert!(
        matches!(full, StoreError::QueueFull { limit: 4 }),
        "{full:?}"
    );
    assert_eq!(
        s.list(None, 10).await.unwrap().len(),
        4,
        "nothing of the group"
    );
    // its keys were not remembered: once there is room, the group is new
    for _ in 0..3 {
        let c = s.claim_due("w", t(3), 1, LEASE).await.unwrap();
        s.complete(&c[0].lease, ok_try(t(3)), t(3)).await.unwrap();
    }
    let later = s.accept_all(group("k2"), Some(WINDOW), t(4)).await.unwrap();
    assert!(
        later.iter().all(|a| matches!(a, Accept::Accepted { .. })),
        "{later:?}"
    );
}

async fn a_full_queue_refuses_accepts_and_stores_nothing(db: Db) {
    let s = db.open(bounded(2)).await;
    let first = s
        .accept(delivery("r", Some("k1")), Some(WINDOW), t(0))
        .await
        .unwrap();
    s.accept(delivery("r", None), None, t(0)).await.unwrap();
    let full = s
        .accept(delivery("r", Some("k3")), Some(WINDOW), t(1))
        .await
        .unwrap_err();
    assert!(
        matches!(full, StoreError::QueueFull { limit: 2 }),
        "{full:?}"
    );
    assert!(full.to_string().contains("full"), "{full}");
    assert_eq!(s.list(None, 10).await.unwrap().len(), 2, "nothing stored");
    // A duplicate of a stored delivery still gets its first answer.
    assert_eq!(
        s.accept(delivery("r", Some("k1")), Some(WINDOW), t(1))
            .await
            .unwrap(),
        Accept::Duplicate {
            id: first.id().to_owned()
        }
    );
    // Leased work is still pending work.
    let claimed = s.claim_due("w", t(1), 1, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(matches!(
        s.accept(delivery("r", Some("k3")), Some(WINDOW), t(1))
            .await,
        Err(StoreError::QueueFull { .. })
    ));
    // Delivered frees a place; the refused key was not remembered.
    s.complete(&claimed[0].lease, ok_try(t(2)), t(2))
        .await
        .unwrap();
    assert!(matches!(
        s.accept(delivery("r", Some("k3")), Some(WINDOW), t(3))
            .await
            .unwrap(),
        Accept::Accepted { .. }
    ));
    assert!(matches!(
        s.accept(delivery("r", Some("k4")), Some(WINDOW), t(3))
            .await,
        Err(StoreError::QueueFull { .. })
    ));
    // A dead letter frees one too.
    let c = s.claim_due("w", t(4), 1, LEASE).await.unwrap().remove(0);
    s.bury(&c.lease, failed_try(t(4)), t(4)).await.unwrap();
    s.accept(delivery("r", Some("k4")), Some(WINDOW), t(5))
        .await
        .unwrap();
    // Replay is an operator's decision: it is not refused, and counts.
    s.replay(&c.delivery.id, t(6)).await.unwrap();
    assert_eq!(s.stats(t(6)).await.unwrap().pending, 3);
    assert!(matches!(
        s.accept(delivery("r", Some("k5")), Some(WINDOW), t(6))
            .await,
        Err(StoreError::QueueFull { .. })
    ));
    // Purged or settled rows keep the count exact: deliver everything, then two fit again.
    for c in s.claim_due("w", t(7), 10, LEASE).await.unwrap() {
        s.complete(&c.lease, ok_try(t(7)), t(7)).await.unwrap();
    }
    s.purge(t(100), 100).await.unwrap();
    for k in ["k5", "k6"] {
        s.accept(delivery("r", Some(k)), Some(WINDOW), t(8))
            .await
            .unwrap();
    }
    assert!(matches!(
        s.accept(delivery("r", Some("k7")), Some(WINDOW), t(8))
            .await,
        Err(StoreError::QueueFull { .. })
    ));
}

/// The bound is exact under concurrency, across instances sharing one store.
async fn concurrent_accepts_never_go_over_max_pending(db: Db) {
    let stores = [db.open(bounded(10)).await, db.open(bounded(10)).await];
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = stores[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            s.accept(delivery("r", Some(&format!("k{i}"))), Some(WINDOW), t(0))
                .await
        }));
    }
    let (mut accepted, mut full) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(Accept::Accepted { .. }) => accepted += 1,
            Err(StoreError::QueueFull { limit: 10 }) => full += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((accepted, full), (10, 30));
    assert_eq!(stores[0].stats(t(1)).await.unwrap().pending, 10);
}

/// `--dead-retention`: dead letters that died before the cutoff go; nothing else does.
async fn purge_dead_removes_only_dead_letters_older_than_the_retention(db: Db) {
    let s = db.store().await;
    let mut ids = Vec::new();
    for k in ["old-dead", "new-dead", "delivered", "pending"] {
        ids.push(
            s.accept(delivery("r", Some(k)), Some(WINDOW), t(0))
                .await
                .unwrap()
                .id()
                .to_owned(),
        );
    }
    let claimed = s.claim_due("w", t(0), 3, LEASE).await.unwrap();
    for c in &claimed {
        match c.delivery.idempotency_key.as_deref() {
            Some("old-dead") => s.bury(&c.lease, failed_try(t(1)), t(1)).await.unwrap(),
            Some("new-dead") => s.bury(&c.lease, failed_try(t(100)), t(100)).await.unwrap(),
            _ => s.complete(&c.lease, ok_try(t(1)), t(1)).await.unwrap(),
        }
    }
    assert_eq!(s.purge_dead(t(50), 100).await.unwrap(), 1);
    assert!(s.get(&ids[0]).await.unwrap().is_none(), "old dead letter");
    for id in &ids[1..] {
        assert!(s.get(id).await.unwrap().is_some(), "{id}");
    }
    assert_eq!(s.list(Some(State::Dead), 10).await.unwrap().len(), 1);
    assert_eq!(s.purge_dead(t(50), 100).await.unwrap(), 0);
}

// ---- migration of a store written by schema version 1 ----

/// `tests/fixtures/store/v1.db` (see the README beside it).
fn fixture_v1() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store/v1.db")
}

/// What a store migrated from the fixture must show, whatever the backend.
async fn check_migrated_v1(db: &Db) {
    let s = db.open(bounded(4)).await;
    // Every row kept, in its state.
    let all = s.list(None, 100).await.unwrap();
    let state_of = |key: &str| {
        all.iter()
            .find(|d| d.id.ends_with(key))
            .unwrap_or_else(|| panic!("{key} kept"))
            .state
    };
    assert_eq!(all.len(), 6);
    assert_eq!(state_of("6ee9"), State::Delivered);
    assert_eq!(state_of("52d2"), State::Dead);
    assert_eq!(state_of("f2d7"), State::Pending);
    assert_eq!(state_of("e252"), State::Pending);
    assert_eq!(state_of("c7d4"), State::Pending);
    assert_eq!(state_of("527b"), State::Leased);
    let dead = all.iter().find(|d| d.id.ends_with("52d2")).unwrap();
    let detail = s.get(&dead.id).await.unwrap().unwrap();
    assert_eq!(
        detail.attempts.iter().map(|a| a.status).collect::<Vec<_>>(),
        [Some(503), Some(503)]
    );
    assert_eq!(detail.delivery.request.headers.len(), 2);

    // The pending bound counts what was pending before the migration (4, the
    // leased one included).
    assert!(matches!(
        s.accept(delivery("crm-upsert", Some("new")), Some(WINDOW), t(100))
            .await,
        Err(StoreError::QueueFull { limit: 4 })
    ));
    // Keys kept: within its window a key still dedupes on its own route, and
    // no longer on another route of the bot.
    let window = Duration::from_secs(3600);
    let pending = all.iter().find(|d| d.id.ends_with("e252")).unwrap();
    assert_eq!(
        s.accept(
            delivery("crm-upsert", Some("in-pending")),
            Some(window),
            t(100)
        )
        .await
        .unwrap(),
        Accept::Duplicate {
            id: pending.id.clone()
        }
    );
    // Sync records from before the migration keep answering within their window.
    assert_eq!(
        s.begin(&sk("crm-upsert", "in-sync-done"), window, LEASE, t(100))
            .await
            .unwrap(),
        Begin::Done(answer(201, r#"{"id":"crm-9"}"#))
    );
    assert_eq!(
        s.begin(&sk("crm-upsert", "in-sync-busy"), window, LEASE, t(100))
            .await
            .unwrap(),
        Begin::InProgress
    );
    assert!(matches!(
        s.begin(&sk("crm-upsert", "in-sync-busy"), window, LEASE, t(103))
            .await
            .unwrap(),
        Begin::New(_)
    ));

    // The delivery a killed process held comes back, and all pending work is delivered.
    assert_eq!(s.release_owner("local", t(100)).await.unwrap(), 1);
    let claimed = s.claim_due("w", t(100), 10, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 4);
    let retried = claimed
        .iter()
        .find(|c| c.delivery.id.ends_with("f2d7"))
        .unwrap();
    assert_eq!(retried.delivery.attempts, 1, "its try is kept");
    for c in &claimed {
        s.complete(&c.lease, ok_try(t(101)), t(101)).await.unwrap();
    }
    assert_eq!(s.stats(t(101)).await.unwrap().pending, 0);
    let notes = s
        .accept(
            delivery("crm-notes", Some("in-pending")),
            Some(window),
            t(102),
        )
        .await
        .unwrap();
    assert!(matches!(notes, Accept::Accepted { .. }), "{notes:?}");
    assert_eq!(
        s.get(&retried.delivery.id)
            .await
            .unwrap()
            .unwrap()
            .attempts
            .len(),
        2
    );
    s.close().await;
    // Opening again does not migrate again.
    let again = db.store().await;
    assert_eq!(again.list(None, 100).await.unwrap().len(), 7);
}

/// A copy of the fixture whose URLs point at `origin` (the fixture's are `http://downstream.invalid`).
async fn fixture_copy(dir: &std::path::Path, origin: &str) -> std::path::PathBuf {
    let path = dir.join("gateway.db");
    std::fs::copy(fixture_v1(), &path).unwrap();
    let raw = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE deliveries SET url = replace(url, 'http://downstream.invalid', ?1)")
        .bind(origin)
        .execute(&raw)
        .await
        .unwrap();
    raw.close().await;
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_of_schema_v1_is_migrated_and_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture_copy(dir.path(), "http://downstream.invalid").await;
    let db = Db {
        url: format!("sqlite://{}", path.display()),
        _dir: None,
    };
    check_migrated_v1(&db).await;
    let raw = sqlx::SqlitePool::connect(&db.url).await.unwrap();
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_version ORDER BY 1")
        .fetch_all(&raw)
        .await
        .unwrap();
    let latest = cognigy_gateway::store::sqlite::SCHEMA_VERSION;
    assert_eq!(versions, (1..=latest).collect::<Vec<_>>());
    assert!(latest >= 4);
    // v4: the state CHECK as comparisons, and it still refuses an unknown state
    let table: String =
        sqlx::query_scalar("SELECT sql FROM sqlite_schema WHERE name = 'deliveries'")
            .fetch_one(&raw)
            .await
            .unwrap();
    assert!(
        table.contains(
            "CHECK (state = 'pending' OR state = 'leased' OR state = 'delivered' OR state = 'dead')"
        ),
        "{table}"
    );
    let bad = sqlx::query("UPDATE deliveries SET state = 'lost'")
        .execute(&raw)
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("CHECK constraint failed"), "{bad}");
}

/// A store whose `deliveries` table was changed by hand (its state CHECK is
/// not the one migration 4 rewrites) is refused, naming the file and the
/// table, and the migration rolls back: the file is as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edited_sqlite_schema_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture_copy(dir.path(), "http://downstream.invalid").await;
    let url = format!("sqlite://{}", path.display());
    let raw = sqlx::SqlitePool::connect(&url).await.unwrap();
    let mut conn = raw.acquire().await.unwrap();
    sqlx::raw_sql(
        "PRAGMA writable_schema = ON; \
         UPDATE sqlite_schema SET sql = replace(sql, '''dead'')', '''dead'', ''lost'')') \
         WHERE type = 'table' AND name = 'deliveries'; \
         PRAGMA writable_schema = RESET;",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    let table = "SELECT sql FROM sqlite_schema WHERE name = 'deliveries'";
    let edited: String = sqlx::query_scalar(table).fetch_one(&raw).await.unwrap();
    assert!(edited.contains("'dead', 'lost')"), "{edited}");
    raw.close().await;

    let err = match cognigy_gateway::store::open_with(&url, StoreOptions::default()).await {
        Ok(_) => panic!("a hand-edited schema is refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("deliveries table's state CHECK"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");

    let raw = sqlx::SqlitePool::connect(&url).await.unwrap();
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_version ORDER BY 1")
        .fetch_all(&raw)
        .await
        .unwrap();
    assert_eq!(versions, vec![1], "no migration stands");
    let after: String = sqlx::query_scalar(table).fetch_one(&raw).await.unwrap();
    assert_eq!(after, edited);
}

/// The schema version 1 of the PostgreSQL store, as that release created it.
const PG_V1: &str = r#"
CREATE TABLE schema_version (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL);
INSERT INTO schema_version VALUES (1, 0);
CREATE TABLE deliveries (
    id TEXT PRIMARY KEY, bot TEXT NOT NULL, route TEXT NOT NULL, payload TEXT NOT NULL,
    method TEXT NOT NULL, url TEXT NOT NULL, headers TEXT NOT NULL, body TEXT,
    idempotency_key TEXT, dedupe_key TEXT,
    state TEXT NOT NULL CHECK (state IN ('pending', 'leased', 'delivered', 'dead')),
    attempts BIGINT NOT NULL DEFAULT 0, next_attempt_at BIGINT NOT NULL, due_at BIGINT,
    created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL, lease_owner TEXT,
    leased_until BIGINT, lease_seq BIGINT NOT NULL DEFAULT 0, last_error TEXT
);
CREATE UNIQUE INDEX deliveries_dedupe ON deliveries (bot, dedupe_key);
CREATE INDEX deliveries_due ON deliveries (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX deliveries_state ON deliveries (state, created_at);
CREATE TABLE attempts (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id TEXT NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    number BIGINT NOT NULL, at BIGINT NOT NULL, status BIGINT, latency_ms BIGINT NOT NULL,
    error TEXT
);
CREATE INDEX attempts_delivery ON attempts (delivery_id, id);
CREATE TABLE idempotency (
    bot TEXT NOT NULL, key TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_progress', 'done')),
    status BIGINT, body BYTEA, created_at BIGINT NOT NULL, locked_until BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (bot, key)
);
CREATE INDEX idempotency_created ON idempotency (created_at);
"#;

/// The fixture's rows, copied into a PostgreSQL schema of version 1.
async fn postgres_v1_from_fixture(url: &str) {
    use sqlx::{Connection, Row};
    let mut pg = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(PG_V1).execute(&mut pg).await.unwrap();
    // (read from a copy: even a read-only open of a WAL file writes a -shm beside it)
    let dir = tempfile::tempdir().unwrap();
    let copy = fixture_copy(dir.path(), "http://downstream.invalid").await;
    let lite = sqlx::SqlitePool::connect(&format!("sqlite://{}", copy.display()))
        .await
        .unwrap();
    for row in sqlx::query("SELECT * FROM deliveries")
        .fetch_all(&lite)
        .await
        .unwrap()
    {
        let mut q = sqlx::query(
            "INSERT INTO deliveries (id, bot, route, payload, method, url, headers, body, \
             idempotency_key, dedupe_key, state, attempts, next_attempt_at, due_at, created_at, \
             updated_at, lease_owner, leased_until, lease_seq, last_error) VALUES ($1, $2, $3, \
             $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)",
        );
        for col in [
            "id", "bot", "route", "payload", "method", "url", "headers", "body",
        ] {
            q = q.bind(row.get::<Option<String>, _>(col));
        }
        for col in ["idempotency_key", "dedupe_key", "state"] {
            q = q.bind(row.get::<Option<String>, _>(col));
        }
        for col in [
            "attempts",
            "next_attempt_at",
            "due_at",
            "created_at",
            "updated_at",
        ] {
            q = q.bind(row.get::<Option<i64>, _>(col));
        }
        q = q.bind(row.get::<Option<String>, _>("lease_owner"));
        q = q.bind(row.get::<Option<i64>, _>("leased_until"));
        q = q.bind(row.get::<i64, _>("lease_seq"));
        q = q.bind(row.get::<Option<String>, _>("last_error"));
        q.execute(&mut pg).await.unwrap();
    }
    for row in sqlx::query("SELECT * FROM attempts ORDER BY id")
        .fetch_all(&lite)
        .await
        .unwrap()
    {
        sqlx::query(
            "INSERT INTO attempts (delivery_id, number, at, status, latency_ms, error) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(row.get::<String, _>("delivery_id"))
        .bind(row.get::<i64, _>("number"))
        .bind(row.get::<i64, _>("at"))
        .bind(row.get::<Option<i64>, _>("status"))
        .bind(row.get::<i64, _>("latency_ms"))
        .bind(row.get::<Option<String>, _>("error"))
        .execute(&mut pg)
        .await
        .unwrap();
    }
    for row in sqlx::query("SELECT * FROM idempotency")
        .fetch_all(&lite)
        .await
        .unwrap()
    {
        sqlx::query(
            "INSERT INTO idempotency (bot, key, state, status, body, created_at, locked_until, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(row.get::<String, _>("bot"))
        .bind(row.get::<String, _>("key"))
        .bind(row.get::<String, _>("state"))
        .bind(row.get::<Option<i64>, _>("status"))
        .bind(row.get::<Option<Vec<u8>>, _>("body"))
        .bind(row.get::<i64, _>("created_at"))
        .bind(row.get::<Option<i64>, _>("locked_until"))
        .bind(row.get::<i64, _>("updated_at"))
        .execute(&mut pg)
        .await
        .unwrap();
    }
    lite.close().await;
    let _ = pg.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_of_schema_v1_is_migrated_and_keeps_working() {
    let db = Db::postgres().await;
    postgres_v1_from_fixture(&db.url).await;
    check_migrated_v1(&db).await;
    let pg = cognigy_gateway::store::postgres::PgStore::open(&db.url, Default::default())
        .await
        .unwrap();
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_version ORDER BY 1")
        .fetch_all(pg.pool())
        .await
        .unwrap();
    let latest = cognigy_gateway::store::postgres::SCHEMA_VERSION;
    assert_eq!(versions, (1..=latest).collect::<Vec<_>>());
}

// ---- the real binary ----

mod binary {
    use std::path::PathBuf;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::{Value, json};

    use crate::support::process::{Proc, kill, serve};
    use crate::support::{self, TestDownstream, wait_until};

    /// Bot `b` (API key `k`) with two routes keyed by `inputId`: `upsert`
    /// (intent `update`, to `/upsert`) and `notes` (intent `note`, to `/notes`),
    /// both in `mode`.
    fn two_routes(url: &str, mode: &str) -> String {
        let route = |name: &str, intent: &str| {
            format!(
                "  - name: {name}\n    bot: b\n    intent: {intent}\n    mode: {mode}\n    idempotency_key: \"{{{{inputId}}}}\"\n    downstream: {{ url: \"{url}/{name}\" }}\n    body: '{{\"inputId\": {{{{json inputId}}}}}}'\n"
            )
        };
        format!(
            "bots:\n  - id: b\n    auth: {{ api_key: {{ keys: [\"k\"] }} }}\nroutes:\n{}{}",
            route("upsert", "update"),
            route("notes", "note")
        )
    }

    /// A routes directory with `files`, and a SQLite store URL beside it.
    fn setup(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf, String) {
        let dir = tempfile::tempdir().unwrap();
        let routes = dir.path().join("routes");
        std::fs::create_dir_all(&routes).unwrap();
        for (name, content) in files {
            std::fs::write(routes.join(name), content).unwrap();
        }
        let store = format!("sqlite://{}", dir.path().join("gateway.db").display());
        (dir, routes, store)
    }

    async fn post(p: &Proc, intent: &str, input: &str) -> (u16, reqwest::header::HeaderMap, Value) {
        let resp = crate::support::client()
            .post(format!("http://{}/webhooks/b", p.listen))
            .header("x-api-key", "k")
            .body(json!({"sessionId": "s", "intent": intent, "inputId": input}).to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
        (status, headers, body)
    }

    async fn admin_deliveries(p: &Proc) -> Value {
        let text = reqwest::get(format!("http://{}/admin/deliveries", p.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// Paths of the requests the downstream received, sorted.
    fn paths(ds: &TestDownstream) -> Vec<String> {
        let mut p: Vec<String> = ds.requests().iter().map(|r| r.uri.clone()).collect();
        p.sort();
        p
    }

    /// SPEC §7.3: one Cognigy input calling two async routes of one bot with the
    /// same `inputId` is two deliveries, each delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_async_routes_with_one_input_id_are_both_delivered() {
        let ds = TestDownstream::start().await;
        let (_dir, routes, store) = setup(&[("r.yaml", &two_routes(&ds.url(), "async"))]);
        let p = serve(&routes, &store, &[], &[]);
        let (s1, _, upsert) = post(&p, "update", "in-1").await;
        let (s2, _, notes) = post(&p, "note", "in-1").await;
        assert_eq!((s1, s2), (202, 202));
        assert_ne!(upsert["delivery_id"], notes["delivery_id"]);
        let both = wait_until(Duration::from_secs(10), async || {
            (ds.requests().len() >= 2).then_some(())
        })
        .await;
        assert!(both.is_some(), "delivered: {:?}", paths(&ds));
        assert_eq!(paths(&ds), ["/notes", "/upsert"]);
        for r in ds.requests() {
            assert_eq!(r.header("idempotency-key").as_deref(), Some("in-1"));
        }
        // Each route still dedupes its own key.
        let (s, _, again) = post(&p, "update", "in-1").await;
        assert_eq!((s, &again), (202, &upsert));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ds.requests().len(), 2);
    }

    /// The same for sync routes with a key: both are sent, and each route's
    /// duplicate gets that route's answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_sync_routes_with_one_input_id_are_both_sent() {
        let ds = TestDownstream::start().await;
        let (_dir, routes, store) = setup(&[("r.yaml", &two_routes(&ds.url(), "sync"))]);
        let p = serve(&routes, &store, &[], &[]);
        ds.push(support::Scripted::status(201).body(r#"{"id":"upsert-1"}"#));
        ds.push(support::Scripted::status(200).body(r#"{"id":"note-1"}"#));
        let (s1, h1, b1) = post(&p, "update", "in-1").await;
        let (s2, h2, b2) = post(&p, "note", "in-1").await;
        assert_eq!((s1, &b1), (201, &json!({"id": "upsert-1"})));
        assert_eq!((s2, &b2), (200, &json!({"id": "note-1"})));
        assert!(!h1.contains_key("idempotent-replayed"));
        assert!(
            !h2.contains_key("idempotent-replayed"),
            "not upsert's answer"
        );
        assert_eq!(paths(&ds), ["/notes", "/upsert"]);
        let (s, h, b) = post(&p, "note", "in-1").await;
        assert_eq!((s, &b), (200, &b2));
        assert_eq!(h["idempotent-replayed"], "true");
        let (s, _, b) = post(&p, "update", "in-1").await;
        assert_eq!((s, b), (201, b1));
        assert_eq!(ds.requests().len(), 2);
    }

    /// `--max-pending`: with that many deliveries pending (here: held in flight
    /// by the downstream), an accept is 503 `queue_full` with `Retry-After` and
    /// stores nothing; once they are delivered, accepts are taken again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_answers_503_queue_full_and_stores_nothing() {
        let ds = TestDownstream::start().await;
        ds.hold();
        let (_dir, routes, store) = setup(&[("r.yaml", &two_routes(&ds.url(), "async"))]);
        let p = serve(&routes, &store, &["--max-pending", "2"], &[]);
        let (_, _, first) = post(&p, "update", "k1").await;
        assert_eq!(post(&p, "update", "k2").await.0, 202);
        let (status, headers, body) = post(&p, "update", "k3").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"], "queue_full");
        assert_eq!(headers["retry-after"], "30");
        let list = admin_deliveries(&p).await;
        assert_eq!(list["deliveries"].as_array().unwrap().len(), 2, "{list}");
        // A duplicate stores nothing: it still gets its first answer.
        let (status, _, again) = post(&p, "update", "k1").await;
        assert_eq!((status, again), (202, first));
        ds.release();
        let taken = wait_until(Duration::from_secs(10), async || {
            (post(&p, "update", "k3").await.0 == 202).then_some(())
        })
        .await;
        assert!(taken.is_some(), "accepts resume once the queue drains");
        wait_until(Duration::from_secs(10), async || {
            let d = admin_deliveries(&p).await;
            (d["pending"] == 0 && d["leased"] == 0).then_some(())
        })
        .await
        .expect("all delivered");
        // The environment variable works as the flag does.
        drop(p);
        let p = serve(&routes, &store, &[], &[("GATEWAY_MAX_PENDING", "1")]);
        ds.hold();
        assert_eq!(post(&p, "update", "k4").await.0, 202);
        assert_eq!(post(&p, "update", "k5").await.0, 503);
        ds.release();
    }

    /// `--dedupe-window`: a key is a duplicate within the window, new after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dedupe_window_is_a_flag() {
        let ds = TestDownstream::start().await;
        let (_dir, routes, store) = setup(&[("r.yaml", &two_routes(&ds.url(), "async"))]);
        let p = serve(&routes, &store, &["--dedupe-window", "1s"], &[]);
        let (_, _, first) = post(&p, "update", "k1").await;
        assert_eq!(post(&p, "update", "k1").await.2, first);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (status, _, second) = post(&p, "update", "k1").await;
        assert_eq!(status, 202);
        assert_ne!(second, first, "the window ended");
    }

    fn gateway() -> Command {
        let mut c = crate::support::gateway_cmd();
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        c
    }

    /// SPEC §7.3: one SQLite store file belongs to one `serve`; a second exits 1
    /// naming the file; `gateway deliveries` still reads and replays beside it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_serve_on_one_sqlite_file_exits_1_naming_it() {
        let ds = TestDownstream::start().await;
        let (dir, routes, store) = setup(&[("r.yaml", &two_routes(&ds.url(), "async"))]);
        let first = serve(&routes, &store, &["--shutdown-grace", "3"], &[]);
        assert_eq!(post(&first, "update", "k1").await.0, 202);
        let out = gateway()
            .args(["serve", "--routes"])
            .arg(&routes)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--store", &store])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        let db = dir.path().join("gateway.db");
        assert!(
            err.contains(&db.display().to_string()) && err.contains("in use"),
            "{err}"
        );
        // The first one is unaffected.
        assert_eq!(post(&first, "update", "k2").await.0, 202);
        // The deliveries commands do not lock.
        let list = gateway()
            .args(["deliveries", "list", "--format", "json", "--store", &store])
            .output()
            .unwrap();
        assert_eq!(list.status.code(), Some(0), "{list:?}");
        let rows: Value = serde_json::from_slice(&list.stdout).unwrap();
        assert_eq!(rows.as_array().unwrap().len(), 2);
        // Once the first stops, the file is free.
        kill(&first.child, "-TERM");
        drop(first);
        let _again = serve(&routes, &store, &[], &[]);
    }

    /// SPEC §7.3: SIGTERM ends within `--shutdown-grace`, the delivery worker
    /// included; a try stuck in flight is abandoned, its delivery goes back to
    /// pending and is delivered after a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_ends_within_the_grace_and_a_stuck_delivery_is_delivered_after_restart() {
        let (dir, routes, store) = setup(&[]);
        sigterm_case(dir, routes, store).await;
    }

    /// With PostgreSQL the lease must be returned at shutdown: an instance's
    /// lease (60 s here) would otherwise hold the delivery long after the restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_sigterm_returns_the_lease_of_a_stuck_delivery() {
        let (dir, routes, _) = setup(&[]);
        sigterm_case(dir, routes, support::pg::url().await).await;
    }

    async fn sigterm_case(_dir: tempfile::TempDir, routes: PathBuf, store: String) {
        let ds = TestDownstream::start().await;
        ds.hold();
        std::fs::write(
            routes.join("r.yaml"),
            support::async_route_file(&ds.url(), &[("timeout", "30s")], "1s"),
        )
        .unwrap();
        let mut p = serve(&routes, &store, &["--shutdown-grace", "1s"], &[]);
        let id = support::post_keyed(&crate::support::client(), &p.listen, "stuck")
            .await
            .expect("accepted");
        let arrived = wait_until(Duration::from_secs(10), async || {
            (!ds.requests().is_empty()).then_some(())
        })
        .await;
        assert!(arrived.is_some(), "the try reached the downstream");
        let t0 = Instant::now();
        kill(&p.child, "-TERM");
        let (status, lines) = tokio::task::spawn_blocking(move || {
            let s = p.child.wait().unwrap();
            (s, p.lines.try_iter().collect::<Vec<_>>())
        })
        .await
        .unwrap();
        let took = t0.elapsed();
        eprintln!("SIGTERM to exit: {took:?}");
        assert_eq!(status.code(), Some(0), "{lines:?}");
        assert!(
            took < Duration::from_millis(2500),
            "SIGTERM took {took:?} with a grace of 1s"
        );
        assert!(lines.iter().any(|l| l.contains("abandoned")), "{lines:#?}");
        // Restart on the same store: the delivery is sent again and delivered.
        ds.release();
        let p = serve(&routes, &store, &[], &[]);
        let delivered = wait_until(Duration::from_secs(10), async || {
            let text = reqwest::get(format!("http://{}/admin/deliveries/{id}", p.admin))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let d: Value = serde_json::from_str(&text).ok()?;
            (d["state"] == "delivered").then_some(d)
        })
        .await
        .expect("delivered after the restart");
        assert_eq!(
            delivered["attempts"].as_array().map(Vec::len),
            Some(1),
            "the abandoned try is not recorded: {delivered}"
        );
        let keys = support::keys_of_requests(&ds);
        assert_eq!(keys, ["stuck", "stuck"], "sent again with the same key");
    }

    /// A store written by schema version 1 served by this binary: migrated, its
    /// pending deliveries (the one a killed process held included) delivered,
    /// and dead letters purged only past `--dead-retention`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_v1_store_is_served_delivered_and_purged_by_retention() {
        let ds = TestDownstream::start().await;
        let route = |name: &str, intent: &str| {
            format!(
                "  - name: {name}\n    bot: support-bot\n    intent: {intent}\n    mode: async\n    downstream: {{ url: \"{}/crm/x\" }}\n",
                ds.url()
            )
        };
        let file = format!(
            "bots:\n  - id: support-bot\n    auth: {{ api_key: {{ keys: [\"k\"] }} }}\nroutes:\n{}{}",
            route("crm-upsert", "update"),
            route("crm-notes", "note")
        );
        let (dir, routes, _) = setup(&[("r.yaml", &file)]);
        let db = super::fixture_copy(dir.path(), &ds.url()).await;
        let store = format!("sqlite://{}", db.display());
        let list = |store: &str| -> Vec<Value> {
            let out = gateway()
                .args(["deliveries", "list", "--format", "json", "--store", store])
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(0), "{out:?}");
            serde_json::from_slice::<Value>(&out.stdout)
                .unwrap()
                .as_array()
                .unwrap()
                .clone()
        };
        // A long retention and window keep the 2023 rows.
        let p = serve(
            &routes,
            &store,
            &["--dead-retention", "36500d", "--dedupe-window", "36500d"],
            &[],
        );
        let delivered = wait_until(Duration::from_secs(10), async || {
            (ds.requests().len() >= 4).then_some(())
        })
        .await;
        assert!(delivered.is_some(), "{:?}", paths(&ds));
        assert_eq!(paths(&ds), ["/crm/3", "/crm/4", "/crm/5", "/crm/6"]);
        wait_until(Duration::from_secs(10), async || {
            let d = admin_deliveries(&p).await;
            (d["pending"] == 0 && d["leased"] == 0).then_some(())
        })
        .await
        .expect("settled");
        kill(&p.child, "-TERM");
        drop(p);
        let rows = list(&store);
        assert_eq!(rows.len(), 6, "{rows:?}");
        assert_eq!(rows.iter().filter(|r| r["state"] == "dead").count(), 1);
        // Default retention (30d) and window (24h): the 2023 dead letter and
        // delivered row go; the four delivered today stay.
        let p = serve(&routes, &store, &[], &[]);
        let purged = wait_until(Duration::from_secs(10), async || {
            let d = admin_deliveries(&p).await;
            (d["deliveries"].as_array()?.len() == 4).then_some(d)
        })
        .await
        .expect("purged at start");
        assert_eq!(purged["dead"], 0, "{purged}");
        assert!(
            purged["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["state"] == "delivered")
        );
    }

    // ---- a failing store (SPEC §7.3) ----

    /// Async route `r` (every intent but `sync`) keyed by `inputId` to `/crm`,
    /// and sync route `s` (intent `sync`) without a key to `/sync`.
    fn outage_routes(url: &str) -> String {
        format!(
            "bots:\n  - id: b\n    auth: {{ api_key: {{ keys: [\"k\"] }} }}\nroutes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    mode: async\n    idempotency_key: \"{{{{inputId}}}}\"\n    downstream: {{ url: \"{url}/crm\", timeout: 1s }}\n    body: '{{\"inputId\": {{{{json inputId}}}}}}'\n    retry: {{ schedule: [100ms, 200ms, 500ms, 1s, 1s, 1s, 1s] }}\n  - name: s\n    bot: b\n    intent: sync\n    downstream: {{ url: \"{url}/sync\", timeout: 1s }}\n"
        )
    }

    const HEALTHY: u8 = 0;
    const BROKEN: u8 = 1;
    const MENDED: u8 = 2;

    /// One answer under load: the phase when it was sent and when it came back.
    #[derive(Debug, Clone)]
    struct Answer {
        sent: u8,
        back: u8,
        status: u16,
        error: Option<String>,
    }

    /// Async and sync webhooks under load while `break_store` makes the store
    /// fail and `mend_store` mends it, without restarting the gateway:
    /// - async accepts answer 202 or 503 `store_unavailable`, never 202 while
    ///   the store is broken, and every 202 is delivered in the end (nothing
    ///   uncommitted was acknowledged);
    /// - the sync route without a key keeps answering 200;
    /// - once mended, accepts are taken again by the same process.
    async fn outage_case(
        p: &Proc,
        ds: &TestDownstream,
        break_store: impl FnOnce(),
        mend_store: impl FnOnce(),
    ) {
        use std::collections::HashSet;
        use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
        use std::sync::{Arc, Mutex};
        let phase = Arc::new(AtomicU8::new(HEALTHY));
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
        let async_answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
        let sync_answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap();
        let mut load = Vec::new();
        for sender in 0..6 {
            let (phase, stop, acked, client) =
                (phase.clone(), stop.clone(), acked.clone(), client.clone());
            let answers = if sender < 4 {
                async_answers.clone()
            } else {
                sync_answers.clone()
            };
            let url = format!("http://{}/webhooks/b", p.listen);
            load.push(tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("in-{sender}-{n}");
                    n += 1;
                    let intent = if sender < 4 { "update" } else { "sync" };
                    let sent = phase.load(Ordering::SeqCst);
                    let resp = client
                        .post(&url)
                        .header("x-api-key", "k")
                        .body(
                            json!({"sessionId": "s", "intent": intent, "inputId": key}).to_string(),
                        )
                        .send()
                        .await
                        .expect("the gateway answers");
                    let status = resp.status().as_u16();
                    let body: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
                    let back = phase.load(Ordering::SeqCst);
                    if sender < 4 && status == 202 {
                        acked.lock().unwrap().insert(key);
                    }
                    answers.lock().unwrap().push(Answer {
                        sent,
                        back,
                        status,
                        error: body["error"].as_str().map(str::to_owned),
                    });
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        let seen = |answers: &Arc<Mutex<Vec<Answer>>>, f: &dyn Fn(&Answer) -> bool| {
            answers.lock().unwrap().iter().any(f)
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            seen(&async_answers, &|a| a.status == 202),
            "accepts while healthy"
        );
        break_store();
        phase.store(BROKEN, Ordering::SeqCst);
        let refused = wait_until(Duration::from_secs(30), async || {
            seen(&async_answers, &|a| a.sent == BROKEN && a.status == 503).then_some(())
        })
        .await;
        assert!(
            refused.is_some(),
            "async accepts are refused while the store fails"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        phase.store(MENDED, Ordering::SeqCst);
        mend_store();
        let recovered = wait_until(Duration::from_secs(30), async || {
            seen(&async_answers, &|a| a.sent == MENDED && a.status == 202).then_some(())
        })
        .await;
        assert!(recovered.is_some(), "accepts resume without a restart");
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
        for l in load {
            l.await.unwrap();
        }

        let async_answers = async_answers.lock().unwrap().clone();
        let sync_answers = sync_answers.lock().unwrap().clone();
        for a in &async_answers {
            assert!(
                a.status == 202
                    || (a.status == 503 && a.error.as_deref() == Some("store_unavailable")),
                "{a:?}"
            );
            assert!(
                !(a.sent == BROKEN && a.back == BROKEN && a.status == 202),
                "acknowledged while the store was failing: {a:?}"
            );
        }
        let during: Vec<_> = sync_answers
            .iter()
            .filter(|a| a.sent == BROKEN && a.back == BROKEN)
            .collect();
        assert!(
            during.len() >= 3,
            "sync calls while the store failed: {sync_answers:?}"
        );
        assert!(during.iter().all(|a| a.status == 200), "{during:?}");
        eprintln!(
            "async answers {} ({} refused), sync answers {} ({} while broken)",
            async_answers.len(),
            async_answers.iter().filter(|a| a.status == 503).count(),
            sync_answers.len(),
            during.len()
        );

        // Every acknowledged delivery is delivered: nothing uncommitted was acknowledged.
        let acked = acked.lock().unwrap().clone();
        let missing = || {
            let seen: HashSet<String> = ds
                .requests()
                .iter()
                .filter_map(|r| r.header("idempotency-key"))
                .collect();
            acked.iter().filter(|k| !seen.contains(*k)).count()
        };
        let all = wait_until(Duration::from_secs(30), async || {
            (missing() == 0).then_some(())
        })
        .await;
        assert!(
            all.is_some(),
            "{} of {} acknowledged deliveries never arrived",
            missing(),
            acked.len()
        );
    }

    /// SQLite: the store's file system refuses every write. As root, file modes
    /// stop nothing, so the test lowers the gateway process's file-size limit
    /// to 0 (`prlimit --fsize`): every write to the database or its WAL then
    /// fails with EFBIG, as on a full disk, and raising it again mends the
    /// store. (The process is started with SIGXFSZ ignored, so the write fails
    /// instead of the signal killing the process.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_refusing_writes_under_load_answers_503_and_recovers() {
        let ds = TestDownstream::start().await;
        let (dir, routes, store) = setup(&[("r.yaml", &outage_routes(&ds.url()))]);
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' XFSZ; exec \"$@\"", "sh"])
            .arg(env!("CARGO_BIN_EXE_gateway"))
            .args(["serve", "--routes"])
            .arg(&routes)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--log-format", "json", "--store", &store, "--lease", "2s"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GATEWAY_LOG", "error,cognigy_gateway::server=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let p = support::process::start(cmd);
        let pid = p.child.id().to_string();
        let fsize = |limit: &str| {
            let ok = Command::new("prlimit")
                .args(["--pid", &pid, &format!("--fsize={limit}")])
                .status()
                .expect("run prlimit")
                .success();
            assert!(ok, "prlimit --fsize={limit}");
        };
        outage_case(
            &p,
            &ds,
            || fsize("0:unlimited"),
            || fsize("unlimited:unlimited"),
        )
        .await;
        drop(dir);
    }

    /// PostgreSQL stopped under load, then started again (a cluster of this test's own).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_stopped_under_load_answers_503_and_recovers() {
        let ds = TestDownstream::start().await;
        let cluster = tokio::task::spawn_blocking(support::pg::Cluster::start)
            .await
            .unwrap();
        let (_dir, routes, _) = setup(&[("r.yaml", &outage_routes(&ds.url()))]);
        let p = serve(&routes, cluster.url(), &["--lease", "2s"], &[]);
        outage_case(&p, &ds, || cluster.stop(), || cluster.restart()).await;
    }
}
