//! `gateway deliveries` on a real SQLite store, through the real binary.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, SystemTime};

use cognigy_gateway::store::{
    AttemptRecord, NewDelivery, Store, StoreExt, StoredRequest, sqlite::SqliteOptions,
    sqlite::SqliteStore,
};

use crate::support::gateway_cmd;

/// Runs `gateway args…` in `cwd` with only `PATH` in the environment.
fn gateway(cwd: &Path, args: &[&str]) -> Output {
    gateway_cmd()
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run gateway")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn delivery(n: u32) -> NewDelivery {
    NewDelivery {
        bot: "support-bot".into(),
        route: "crm-upsert".into(),
        payload: format!(r#"{{"inputId":"in-{n}"}}"#),
        request: StoredRequest {
            method: "POST".into(),
            url: format!("https://crm.example.com/contacts/C-{n}"),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Some(format!(r#"{{"id":"C-{n}"}}"#)),
        },
        idempotency_key: Some(format!("in-{n}")),
        fingerprint: None,
    }
}

/// A store in `dir/data/gateway.db` (the default URL, relative to `dir`)
/// with one pending and one dead delivery: (pending id, dead id).
async fn seeded(dir: &Path) -> (String, String) {
    let store = SqliteStore::open(dir.join("data/gateway.db"), SqliteOptions::default())
        .await
        .unwrap();
    let now = SystemTime::now();
    let dead = store
        .accept(delivery(1), None, now)
        .await
        .unwrap()
        .id()
        .to_owned();
    let c = store
        .claim_due("w", now, 1, Duration::from_secs(60))
        .await
        .unwrap()
        .remove(0);
    store
        .bury(
            &c.lease,
            AttemptRecord {
                at: now,
                status: Some(400),
                latency: Duration::from_millis(12),
                error: None,
            },
            now,
        )
        .await
        .unwrap();
    let pending = store
        .accept(delivery(2), None, now + Duration::from_secs(1))
        .await
        .unwrap()
        .id()
        .to_owned();
    store.close().await;
    (pending, dead)
}

#[tokio::test]
async fn list_show_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (pending, dead) = seeded(dir.path()).await;

    let out = gateway(dir.path(), &["deliveries", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    assert!(
        listed.contains(&pending) && listed.contains(&dead),
        "{listed}"
    );
    assert!(listed.contains("status 400"), "{listed}");

    let out = gateway(dir.path(), &["deliveries", "list", "--dead"]);
    let listed = text(&out.stdout);
    assert!(
        listed.contains(&dead) && !listed.contains(&pending),
        "{listed}"
    );

    let out = gateway(
        dir.path(),
        &["deliveries", "show", &dead, "--format", "json", "--payload"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "dead");
    assert_eq!(v["tries"][0]["status"], 400);
    assert_eq!(v["payload"]["inputId"], "in-1");
    assert_eq!(v["request"]["url"], "https://crm.example.com/contacts/C-1");

    let out = gateway(dir.path(), &["deliveries", "show", &dead]);
    assert!(
        text(&out.stdout).contains("try  1"),
        "{}",
        text(&out.stdout)
    );
    // the payload (personal data) only with --payload (SPEC §7.4)
    let shown = text(&out.stdout);
    assert!(
        !shown.contains("inputId") && !shown.contains(r#""id":"C-1""#),
        "{shown}"
    );
    let out = gateway(
        dir.path(),
        &["deliveries", "show", &dead, "--format", "json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v.get("payload").is_none() && v["request"].get("body").is_none(),
        "{v}"
    );

    // A pending delivery cannot be replayed: refused, exit 1.
    let out = gateway(dir.path(), &["deliveries", "replay", &pending]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("only dead or delivered"),
        "{}",
        text(&out.stderr)
    );

    let out = gateway(dir.path(), &["deliveries", "replay", "--dead"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "replayed 1 dead deliveries\n");
    let out = gateway(
        dir.path(),
        &["deliveries", "list", "--dead", "--format", "json"],
    );
    assert_eq!(text(&out.stdout).trim(), "[]");

    let out = gateway(dir.path(), &["deliveries", "show", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );

    // Usage: replay needs an id or --dead, not both.
    assert_eq!(
        gateway(dir.path(), &["deliveries", "replay"]).status.code(),
        Some(2)
    );
    assert_eq!(
        gateway(dir.path(), &["deliveries", "replay", &dead, "--dead"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn a_missing_store_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let out = gateway(dir.path(), &["deliveries", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no store at data/gateway.db"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dir.path().join("data").exists());
    let out = gateway(dir.path(), &["deliveries", "list", "--store", "redis://x"]);
    assert_eq!(out.status.code(), Some(2));
}
