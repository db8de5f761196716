//! `${file:PATH}` (SPEC §8) with the real binary: a bot key and a CRM token
//! read from files, rotated under load by writing the files (no restart, no
//! SIGHUP, no admin call): no request fails, and the old bot key is refused
//! once it is gone. Also: a missing file stops `serve`, and a secret file's
//! content never shows in the admin API or the log.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};

use crate::support::process::serve;
use crate::support::{self, gateway_cmd, wait_until};

/// Writes `content` to `path` atomically (a temp file, then a rename), as
/// Kubernetes, Vault agents and editors do.
fn write_atomic(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A CRM that takes `Authorization: Bearer <t>` for the tokens in `accepted`
/// (401 otherwise) and counts the tokens it saw.
struct Crm {
    url: String,
    accepted: Arc<Mutex<HashSet<String>>>,
    seen: Arc<Mutex<Vec<String>>>,
}

async fn crm(tokens: &[&str]) -> Crm {
    let accepted = Arc::new(Mutex::new(
        tokens.iter().map(|t| t.to_string()).collect::<HashSet<_>>(),
    ));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (a, s) = (accepted.clone(), seen.clone());
    let app = axum::Router::new().fallback(move |headers: HeaderMap| {
        let (a, s) = (a.clone(), s.clone());
        async move {
            let token = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default()
                .to_owned();
            s.lock().unwrap().push(token.clone());
            if a.lock().unwrap().contains(&token) {
                (StatusCode::OK, r#"{"ok":true}"#)
            } else {
                (StatusCode::UNAUTHORIZED, r#"{"error":"bad token"}"#)
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Crm {
        url,
        accepted,
        seen,
    }
}

const ROUTES: &str = r#"bots:
  - id: b
    auth:
      # two slots, for a rotation without a failed request: the new key goes
      # into the second, the bots switch, then the first one takes it too
      api_key: { keys: ["${file:../secrets/bot-key}", "${file:../secrets/bot-key-next}"] }
routes:
  - name: r
    bot: b
    intent: "*"
    downstream:
      url: "CRM_URL/contacts"
      auth: { bearer: { token: "${file:../secrets/crm-token}" } }
    retry: { attempts: 1 }
"#;

struct Load {
    stop: Arc<AtomicBool>,
    key: Arc<Mutex<String>>,
    /// Requests answered, per worker.
    done: Vec<Arc<AtomicU64>>,
    failures: Arc<Mutex<Vec<(u16, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(listen: &str, workers: usize, key: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let key = Arc::new(Mutex::new(key.to_owned()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let client = support::client();
        let mut done = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let n = Arc::new(AtomicU64::new(0));
            done.push(n.clone());
            let (stop, key, failures, client) =
                (stop.clone(), key.clone(), failures.clone(), client.clone());
            let url = format!("http://{listen}/webhooks/b");
            tasks.push(tokio::spawn(async move {
                // bounded: at most 100k requests, and the test stops it long before
                for _ in 0..100_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let k = key.lock().unwrap().clone();
                    let r = client
                        .post(&url)
                        .header("x-api-key", &k)
                        .body(r#"{"sessionId":"s"}"#)
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => {}
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let text = r.text().await.unwrap_or_default();
                            failures.lock().unwrap().push((s, text));
                        }
                        Err(e) => failures.lock().unwrap().push((0, e.to_string())),
                    }
                    n.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        Load {
            stop,
            key,
            done,
            failures,
            tasks,
        }
    }

    fn total(&self) -> u64 {
        self.done.iter().map(|n| n.load(Ordering::SeqCst)).sum()
    }

    /// Waits until every worker has finished two more requests: one that may
    /// have started before the caller's change, and one that started after it.
    async fn settle(&self) {
        let marks: Vec<u64> = self.done.iter().map(|n| n.load(Ordering::SeqCst)).collect();
        let ok = wait_until(Duration::from_secs(20), async || {
            self.done
                .iter()
                .zip(&marks)
                .all(|(n, m)| n.load(Ordering::SeqCst) >= m + 2)
        })
        .await;
        assert!(ok.is_some(), "the load workers stalled");
    }

    async fn stop(self) -> (u64, Vec<(u16, String)>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let total = self.done.iter().map(|n| n.load(Ordering::SeqCst)).sum();
        let failures = self.failures.lock().unwrap().clone();
        (total, failures)
    }
}

async fn status_of(client: &reqwest::Client, listen: &str, key: &str) -> u16 {
    client
        .post(format!("http://{listen}/webhooks/b"))
        .header("x-api-key", key)
        .body(r#"{"sessionId":"probe"}"#)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn admin_status(client: &reqwest::Client, admin: &str) -> serde_json::Value {
    support::json(
        client
            .get(format!("http://{admin}/admin/status"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_bot_key_file_and_a_crm_token_file_under_load_fails_no_request() {
    let crm = crm(&["crm-old"]).await;
    let tmp = tempfile::tempdir().unwrap();
    let routes = tmp.path().join("routes");
    let secrets = tmp.path().join("secrets");
    std::fs::create_dir_all(&routes).unwrap();
    std::fs::create_dir_all(&secrets).unwrap();
    // as secret files usually are: with a trailing newline
    std::fs::write(secrets.join("bot-key"), "old-key\n").unwrap();
    std::fs::write(secrets.join("bot-key-next"), "old-key\n").unwrap();
    std::fs::write(secrets.join("crm-token"), "crm-old\n").unwrap();
    std::fs::write(
        routes.join("bots.yaml"),
        ROUTES.replace("CRM_URL", &crm.url),
    )
    .unwrap();
    let store = format!("sqlite://{}", tmp.path().join("gw.db").display());
    let gw = serve(&routes, &store, &["--reload-debounce-ms", "50"], &[]);
    let client = support::client();
    let first = admin_status(&client, &gw.admin).await;

    let load = Load::start(&gw.listen, 4, "old-key");
    let before = load.total();
    wait_until(Duration::from_secs(20), async || {
        load.total() >= before + 300
    })
    .await
    .expect("load runs");

    // 1. The new bot key goes into the second slot: both keys work.
    write_atomic(&secrets.join("bot-key-next"), "new-key\n");
    wait_until(Duration::from_secs(20), async || {
        status_of(&client, &gw.listen, "new-key").await == 200
    })
    .await
    .expect("the new bot key is accepted without a restart");
    // The bots switch to it; then the old key leaves the first slot.
    *load.key.lock().unwrap() = "new-key".into();
    load.settle().await;
    write_atomic(&secrets.join("bot-key"), "new-key\n");
    wait_until(Duration::from_secs(20), async || {
        status_of(&client, &gw.listen, "old-key").await == 401
    })
    .await
    .expect("the old bot key is refused once it is gone from the files");

    // 2. The CRM takes both tokens while the file changes, then only the new one.
    crm.accepted.lock().unwrap().insert("crm-new".into());
    let seen_before = crm.seen.lock().unwrap().len();
    write_atomic(&secrets.join("crm-token"), "crm-new\n");
    wait_until(Duration::from_secs(20), async || {
        crm.seen.lock().unwrap()[seen_before..]
            .iter()
            .any(|t| t == "crm-new")
    })
    .await
    .expect("the new CRM token is sent without a restart");
    // Requests that started on the old configuration finish; the next ones
    // all carry the new token, so the CRM can forget the old one.
    load.settle().await;
    crm.accepted.lock().unwrap().remove("crm-old");
    let seen_after = crm.seen.lock().unwrap().len();
    let more = load.total();
    wait_until(Duration::from_secs(20), async || load.total() >= more + 500)
        .await
        .expect("load goes on");

    let (total, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(total >= 800, "only {total} requests ran");
    let late = crm.seen.lock().unwrap()[seen_after..].to_vec();
    assert!(
        !late.is_empty() && late.iter().all(|t| t == "crm-new"),
        "after the rotation every request carries the new token"
    );
    assert_eq!(status_of(&client, &gw.listen, "old-key").await, 401);
    assert_eq!(status_of(&client, &gw.listen, "new-key").await, 200);

    // Each write was a reload applied (the hash covers the files' content),
    // and the admin API shows no secret.
    let last = admin_status(&client, &gw.admin).await;
    let text = last.to_string();
    assert_ne!(last["hash"], first["hash"]);
    assert!(
        last["generation"].as_u64().unwrap() >= first["generation"].as_u64().unwrap() + 3,
        "{last}"
    );
    for secret in ["old-key", "new-key", "crm-old", "crm-new"] {
        assert!(!text.contains(secret), "{secret} in /admin/status: {text}");
    }
    let (status, lines) = gw.stop("-TERM").await;
    assert!(status.success());
    let log = lines.join("\n");
    for secret in ["old-key", "new-key", "crm-old", "crm-new"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    println!("secret rotation: {total} requests, 0 failed");
}

#[test]
fn a_missing_secret_file_stops_serve_and_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("r.yaml"),
        "bots:\n  - id: b\n    auth: { bearer: { tokens: [\"${file:secrets/none}\"] } }\n",
    )
    .unwrap();
    let out = gateway_cmd()
        .args(["serve", "--routes"])
        .arg(tmp.path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--store")
        .arg(format!("sqlite://{}", tmp.path().join("gw.db").display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "error: bots[0].auth.bearer.tokens[0]: `${file:secrets/none}`: the file cannot be read"
        ),
        "{err}"
    );
}
