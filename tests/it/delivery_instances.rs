//! Several real `gateway serve` processes on one PostgreSQL database
//! (SPEC §6: "several instances share the work and never deliver one
//! delivery concurrently").
//!
//! Each instance sends its name in an `X-Gateway-Instance` header (a header
//! from the environment is rendered again at send time, so it names the
//! sender, not the acceptor). The downstream holds every request a little
//! and records an overlap whenever a request arrives with an idempotency key
//! that is still being answered: two instances sending one delivery at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cognigy_gateway::store::{State, Store};

use crate::support::process::{Proc, kill, serve};
use crate::support::{self, Recorded, Scripted, TestDownstream, wait_until};

/// Same machine, same clock: only millisecond rounding and clock slewing
/// separate the store's lease times from the downstream's arrival times.
const CLOCK_TOLERANCE: Duration = Duration::from_millis(20);

/// Instances on one throwaway PostgreSQL schema, sharing one routes directory.
struct Cluster {
    ds: TestDownstream,
    url: String,
    routes: PathBuf,
    /// The test's own view of the store.
    store: Arc<dyn Store>,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// The route's downstream `timeout` and async `schedule`.
    async fn new(timeout: &str, schedule: &str) -> Cluster {
        let ds = TestDownstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let routes = dir.path().join("routes");
        std::fs::create_dir_all(&routes).unwrap();
        let downstream = [
            ("timeout", timeout),
            ("headers", r#"{ X-Gateway-Instance: "${GW_INSTANCE}" }"#),
        ];
        // The breaker stays closed: failures are part of the tests, not a reason to wait.
        let breaker = "    breaker: { min_calls: 1000, consecutive_failures: 1000 }\n";
        std::fs::write(
            routes.join("r.yaml"),
            support::async_route_file(&ds.url(), &downstream, schedule) + breaker,
        )
        .unwrap();
        let url = support::pg::url().await;
        let store = cognigy_gateway::store::open(&url).await.unwrap();
        Cluster {
            ds,
            url,
            routes,
            store,
            client: support::client(),
            _dir: dir,
        }
    }

    /// Starts instance `name` with `--lease lease`.
    fn start(&self, name: &str, lease: &str) -> Proc {
        serve(
            &self.routes,
            &self.url,
            &["--lease", lease],
            &[("GW_INSTANCE", name)],
        )
    }

    /// Accepts `key` at the instance listening on `listen`; its delivery id.
    async fn accept(&self, listen: &str, key: &str) -> String {
        support::post_keyed(&self.client, listen, key)
            .await
            .unwrap_or_else(|| panic!("{key} was not accepted"))
    }

    /// Waits (bounded) until the store holds `n` delivered deliveries and nothing pending or leased.
    async fn wait_all_delivered(&self, n: usize, within: Duration) {
        let done = wait_until(within, async || {
            let stats = self.store.stats(SystemTime::now()).await.ok()?;
            let delivered = self.store.list(Some(State::Delivered), 10_000).await.ok()?;
            (stats.pending == 0 && stats.leased == 0 && delivered.len() == n).then_some(())
        })
        .await;
        let stats = self.store.stats(SystemTime::now()).await.unwrap();
        assert!(done.is_some(), "not all {n} delivered in time: {stats:?}");
    }
}

fn instance(r: &Recorded) -> String {
    r.header("x-gateway-instance")
        .expect("every try names its instance")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_the_work_and_never_send_one_delivery_at_once() {
    let started = Instant::now();
    let c = Cluster::new("2s", "100ms, 200ms, 300ms, 500ms, 1s").await;
    // Every answer takes 100 ms, so a delivery sent by two instances at once
    // shows as an overlap; the first 30 answers are 503s, so retries are
    // claimed again by whichever instance comes first.
    c.ds.set_default(Scripted::status(200).delay(Duration::from_millis(100)));
    for _ in 0..30 {
        c.ds.push(Scripted::status(503).delay(Duration::from_millis(100)));
    }
    let gws: Vec<Proc> = ["a", "b", "c"]
        .iter()
        .map(|name| c.start(name, "3s"))
        .collect();

    // 90 deliveries from 6 concurrent senders, spread over the three instances
    const N: usize = 90;
    let c = Arc::new(c);
    let listens: Arc<Vec<String>> = Arc::new(gws.iter().map(|g| g.listen.clone()).collect());
    let mut senders = Vec::new();
    for s in 0..6 {
        let (c, listens) = (c.clone(), listens.clone());
        senders.push(tokio::spawn(async move {
            for n in (s..N).step_by(6) {
                c.accept(&listens[n % listens.len()], &format!("k-{n}"))
                    .await;
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    c.wait_all_delivered(N, Duration::from_secs(60)).await;

    assert_eq!(
        c.ds.overlaps(),
        Vec::<String>::new(),
        "deliveries in flight at two instances at once"
    );
    let requests = c.ds.requests();
    let keys: BTreeSet<String> = support::keys_of_requests(&c.ds).into_iter().collect();
    assert_eq!(keys.len(), N, "every accepted delivery arrives");
    let mut by_instance: BTreeMap<String, usize> = BTreeMap::new();
    for r in &requests {
        *by_instance.entry(instance(r)).or_default() += 1;
    }
    assert!(
        by_instance.len() > 1,
        "the work is shared, not done by one instance: {by_instance:?}"
    );
    eprintln!(
        "{N} deliveries, {} requests, by instance {by_instance:?}, in {:?}",
        requests.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_s_deliveries_are_taken_over_once_its_lease_expires() {
    let started = Instant::now();
    // The timeout is longer than the test takes, so the killed instance is
    // still in its tries (holding their leases) when it dies.
    let c = Cluster::new("20s", "100ms, 1s").await;
    let mut gws: HashMap<String, Proc> = ["a", "b", "c"]
        .iter()
        .map(|name| (name.to_string(), c.start(name, "3s")))
        .collect();
    // The downstream answers nothing for now: every claimed delivery stays leased.
    c.ds.hold();
    const K: usize = 6;
    let names = ["a", "b", "c"];
    let mut ids = HashMap::new();
    for n in 0..K {
        let key = format!("k-{n}");
        let id = c.accept(&gws[names[n % 3]].listen, &key).await;
        ids.insert(key, id);
    }
    let held = wait_until(Duration::from_secs(10), async || {
        let r = c.ds.requests();
        (r.len() >= K).then_some(r)
    })
    .await
    .expect("every delivery is claimed and tried");
    assert_eq!(held.len(), K, "each delivery tried once, by one instance");

    // The instance holding the most tries dies while they are held.
    let mut holding: BTreeMap<String, usize> = BTreeMap::new();
    for r in &held {
        *holding.entry(instance(r)).or_default() += 1;
    }
    let (victim, _) = holding.into_iter().max_by_key(|(_, n)| *n).unwrap();
    let mut victims = BTreeMap::new();
    for r in held.iter().filter(|r| instance(r) == victim) {
        let key = r.header("idempotency-key").unwrap();
        let d = c.store.get(&ids[&key]).await.unwrap().unwrap().delivery;
        assert_eq!(d.state, State::Leased, "{key} is leased while tried");
        victims.insert(key, d.leased_until.expect("a lease has an expiry"));
    }
    let p = gws.remove(&victim).unwrap();
    kill(&p.child, "-KILL");
    drop(p); // reaps it
    c.ds.release();

    // Another instance sends each of the victim's deliveries, after its lease.
    let taken_over = |key: &str| {
        c.ds.requests()
            .into_iter()
            .find(|r| r.header("idempotency-key").as_deref() == Some(key) && instance(r) != victim)
    };
    let takeovers = wait_until(Duration::from_secs(15), async || {
        victims
            .keys()
            .map(|k| taken_over(k).map(|r| (k.clone(), r)))
            .collect::<Option<Vec<_>>>()
    })
    .await
    .expect("the killed instance's deliveries are taken over");
    for (key, r) in &takeovers {
        let until = victims[key];
        assert!(
            r.received + CLOCK_TOLERANCE >= until,
            "{key} was sent again {:?} before its lease expired",
            until.duration_since(r.received).unwrap_or_default()
        );
        assert!(
            r.received <= until + Duration::from_secs(5),
            "{key} was taken over only {:?} after its lease expired",
            r.received.duration_since(until).unwrap_or_default()
        );
    }
    c.wait_all_delivered(K, Duration::from_secs(15)).await;
    for key in victims.keys() {
        let d = c.store.get(&ids[key]).await.unwrap().unwrap();
        assert_eq!(
            d.delivery.attempts, 1,
            "{key}: the killed instance's try is not counted"
        );
    }
    assert_eq!(c.ds.overlaps(), Vec::<String>::new());
    eprintln!(
        "instance {victim} killed holding {} of {K} deliveries; taken over in {:?}",
        victims.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_longer_than_the_lease_is_cut_before_another_instance_may_claim() {
    // The route allows 5 s per try, the lease only 2 s, and the first answer
    // takes 4 s: the try must end within its lease, or the second instance
    // would claim the expired lease and send while the first still waits.
    let c = Cluster::new("5s", "100ms, 100ms, 100ms").await;
    c.ds.push(Scripted::status(200).delay(Duration::from_secs(4)));
    let a = c.start("a", "2s");
    let _b = c.start("b", "2s");
    let id = c.accept(&a.listen, "slow").await;
    c.wait_all_delivered(1, Duration::from_secs(15)).await;

    assert_eq!(c.ds.overlaps(), Vec::<String>::new());
    let d = c.store.get(&id).await.unwrap().unwrap();
    let first = &d.attempts[0];
    assert_eq!(first.error.as_deref(), Some("timeout"), "{d:?}");
    assert!(
        first.latency < Duration::from_secs(2),
        "the first try was cut within its lease: {:?}",
        first.latency
    );
}
