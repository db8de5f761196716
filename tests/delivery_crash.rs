//! Crash test with the real binary: async webhooks under load while the
//! gateway is killed with SIGKILL 10 times at random moments and restarted on
//! the same SQLite store. Every delivery answered 202 must reach the
//! downstream (duplicates only with the same idempotency key); none is lost.

mod support;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::TestDownstream;
use support::process::{Proc, start};

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

fn start_gw(routes: &std::path::Path, store: &str) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--routes"])
        .arg(routes)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--store",
            store,
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GATEWAY_LOG", "warn,cognigy_gateway::cli=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    start(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_accepted_delivery_is_lost_across_ten_sigkills() {
    support::init();
    let ds = TestDownstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes");
    std::fs::create_dir_all(&routes).unwrap();
    std::fs::write(
        routes.join("r.yaml"),
        format!(
            "bots:\n  - id: b\n    auth: {{ api_key: {{ keys: [\"k\"] }} }}\nroutes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    mode: async\n    idempotency_key: \"{{{{inputId}}}}\"\n    downstream: {{ url: \"{}/crm\" }}\n    retry: {{ schedule: [50ms, 100ms, 200ms, 500ms, 1s, 1s, 1s, 1s] }}\n",
            ds.url()
        ),
    )
    .unwrap();
    let store = format!("sqlite://{}", dir.path().join("gateway.db").display());
    let current = Arc::new(Mutex::new(start_gw(&routes, &store)));
    let accepted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();

    // 8 senders, each with its own sequence of input ids
    let mut senders = Vec::new();
    for s in 0..8 {
        let (current, accepted, stop, client) = (
            current.clone(),
            accepted.clone(),
            stop.clone(),
            client.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let key = format!("in-{s}-{n}");
                let url = format!("http://{}/webhooks/b", current.lock().unwrap().listen);
                let body = format!(r#"{{"sessionId":"s","inputId":"{key}"}}"#);
                match client
                    .post(url)
                    .header("x-api-key", "k")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) if r.status().as_u16() == 202 => {
                        accepted.lock().unwrap().insert(key);
                        n += 1;
                    }
                    // refused or cut off by a kill: not accepted, send the same key again
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }

    // 10 kills at random moments, each followed by a restart on the same store
    for i in 0..10 {
        let wait = 100 + (rand_u64(i) % 300);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let mut g = current.lock().unwrap();
        assert!(
            Command::new("kill")
                .args(["-KILL", &g.child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
        let _ = g.child.wait();
        *g = start_gw(&routes, &store);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for s in senders {
        s.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() >= 50,
        "the load accepted {} deliveries",
        accepted.len()
    );

    // the last instance delivers everything that was accepted (bounded wait)
    let mut missing = accepted.len();
    for _ in 0..600 {
        let seen: HashSet<String> = ds
            .requests()
            .iter()
            .filter_map(|r| r.header("idempotency-key"))
            .collect();
        missing = accepted.iter().filter(|k| !seen.contains(*k)).count();
        if missing == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(missing, 0, "accepted deliveries never arrived");
    // every request the downstream saw carries a key that was accepted or retried under the same key
    let all = ds.requests();
    assert!(all.iter().all(|r| r.header("idempotency-key").is_some()));
    eprintln!(
        "accepted {}, downstream requests {} (duplicates allowed with the same key)",
        accepted.len(),
        all.len()
    );
}

/// A small deterministic spread of kill moments (splitmix64).
fn rand_u64(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}
