//! Crash test with the real binary, on each store: async webhooks under load
//! while the gateway is killed with SIGKILL 10 times at random moments and
//! restarted on the same store. Every delivery answered 202 must reach the
//! downstream (duplicates only with the same idempotency key); none is lost.
//!
//! With SQLite a restarted gateway takes back its predecessor's leases at
//! once. With PostgreSQL leases belong to an instance and a killed one's
//! expire, so the gateway runs with a short `--lease` and the last instance
//! takes the work over within seconds.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::process::{Proc, kill, serve};
use crate::support::{self, TestDownstream, wait_until};

/// Short enough that a PostgreSQL takeover after the last kill is quick.
const LEASE: &str = "2s";

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_accepted_delivery_is_lost_across_ten_sigkills() {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("sqlite://{}", dir.path().join("gateway.db").display());
        super::crash_test(&store).await;
    }
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_accepted_delivery_is_lost_across_ten_sigkills() {
        super::crash_test(&crate::support::pg::url().await).await;
    }
}

async fn crash_test(store: &str) {
    let ds = TestDownstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes");
    std::fs::create_dir_all(&routes).unwrap();
    std::fs::write(
        routes.join("r.yaml"),
        support::async_route_file(&ds.url(), &[], "50ms, 100ms, 200ms, 500ms, 1s, 1s, 1s, 1s"),
    )
    .unwrap();
    let start_gw = || serve(&routes, store, &["--lease", LEASE], &[]);
    let current: Arc<Mutex<Proc>> = Arc::new(Mutex::new(start_gw()));
    let accepted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = support::client_builder()
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
                let listen = current.lock().unwrap().listen.clone();
                if support::post_keyed(&client, &listen, &key).await.is_some() {
                    accepted.lock().unwrap().insert(key);
                    n += 1;
                } else {
                    // refused or cut off by a kill: not accepted, send the same key again
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }

    // 10 kills at random moments, each followed by a restart on the same store
    for i in 0..10 {
        let wait = 100 + (rand_u64(i) % 300);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let mut g = current.lock().unwrap();
        kill(&g.child, "-KILL");
        let _ = g.child.wait(); // SIGKILL cannot be caught: it ends at once
        *g = start_gw();
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
    let missing = || {
        let seen: HashSet<String> = ds
            .requests()
            .iter()
            .filter_map(|r| r.header("idempotency-key"))
            .collect();
        accepted.iter().filter(|k| !seen.contains(*k)).count()
    };
    let arrived = wait_until(Duration::from_secs(30), async || missing() == 0).await;
    assert!(
        arrived.is_some(),
        "{} accepted deliveries never arrived",
        missing()
    );
    // duplicates (a try cut off by a kill is made again) carry their delivery's key
    let sent = support::keys_of_requests(&ds);
    eprintln!(
        "accepted {}, downstream requests {} (duplicates allowed with the same key)",
        accepted.len(),
        sent.len()
    );
}

/// A small deterministic spread of kill moments (splitmix64).
fn rand_u64(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}
