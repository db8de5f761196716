//! SPEC §7.3 "Acknowledged means delivered, once", the store's half (issue 13):
//! idempotency per (bot, route, key), sync holds that only their holder can end,
//! the `--max-pending` bound, dead-letter retention and the migration of a store
//! written by schema version 1. Store scenarios run on SQLite and on PostgreSQL;
//! `hardening_process.rs` checks the same through the real binary.

mod support;

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
    assert!(latest >= 2);
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
    let lite = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", fixture_v1().display()))
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
