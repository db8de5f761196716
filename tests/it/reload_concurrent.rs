//! Reloads run one at a time (SPEC §7.3): 20 reloads fired at once from the
//! file watcher, `POST /admin/reload` and SIGHUP while the route files keep
//! changing leave the real binary serving exactly the files on disk; a reload
//! that changes nothing is `unchanged`.

use crate::support;

use std::path::Path;
use std::time::Duration;

use crate::support::process::{kill, serve};
use cognigy_gateway::config::compile::{LoadOptions, load};

/// Versions the route file goes through.
const VERSIONS: usize = 8;

fn route_file(generation: usize) -> String {
    // Each version differs in content (and so in hash), all valid; 200 routes
    // make a load take long enough for concurrent reloads to overlap.
    let mut s =
        String::from("bots:\n  - id: b\n    auth: { api_key: { keys: [\"k\"] } }\nroutes:\n");
    for i in 0..200 {
        s.push_str(&format!(
            "  - name: r{i}\n    bot: b\n    intent: \"i{i}\"\n    downstream: {{ url: \"http://127.0.0.1:9/v{generation}/{i}\" }}\n    body: '{{\"n\": \"{{{{sessionId}}}}\"}}'\n"
        ));
    }
    s
}

/// Writes `content` to `dir/name` atomically (a temp file, then a rename).
fn write_atomic(dir: &Path, name: &str, content: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// The hash of the configuration the files on disk compile to (as `serve` loads them).
fn disk_hash(dir: &Path) -> String {
    let loaded = load(
        &[dir.to_path_buf()],
        &LoadOptions {
            env: &|_| None,
            require_env: true,
            check_examples: false,
            cache: None,
        },
    );
    loaded.config.expect("the files on disk are valid").hash
}

async fn status(c: &reqwest::Client, admin: &str) -> serde_json::Value {
    support::json(
        c.get(format!("http://{admin}/admin/status"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_reloads_end_on_the_files_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let routes = tmp.path().join("routes");
    std::fs::create_dir(&routes).unwrap();
    write_atomic(&routes, "r.yaml", &route_file(0));
    // The hash of each version, as the gateway will compute it for this directory.
    let mut version_of = std::collections::HashMap::new();
    for v in (0..VERSIONS).rev() {
        write_atomic(&routes, "r.yaml", &route_file(v));
        version_of.insert(disk_hash(&routes), v);
    }
    let store = format!("sqlite://{}", tmp.path().join("gw.db").display());
    let p = serve(
        &routes,
        &store,
        &["--reload-debounce-ms", "10"],
        &[(
            "GATEWAY_LOG",
            "warn,cognigy_gateway::server=info,cognigy_gateway::runtime=info",
        )],
    );
    let c = crate::support::client();

    // 20 reloads at once: 7 admin, 7 SIGHUP, and the watcher's on each of 6 file writes.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..7 {
        let (c, admin) = (c.clone(), p.admin.clone());
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(i * 3)).await;
            let r = c
                .post(format!("http://{admin}/admin/reload"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        });
    }
    let pid = p.child.id();
    for i in 0..7 {
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(i * 3)).await;
            let ok = std::process::Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok);
        });
    }
    let dir = routes.clone();
    tasks.spawn(async move {
        for generation in 1..VERSIONS {
            write_atomic(&dir, "r.yaml", &route_file(generation));
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }

    // The files no longer change: the running configuration must become (and
    // stay) the one on disk. A reload stored out of order would leave an older
    // one serving, and no later event would fix it.
    let want = disk_hash(&routes);
    let got = support::wait_until(Duration::from_secs(15), async || {
        let s = status(&c, &p.admin).await;
        (s["hash"] == want.as_str()).then_some(s)
    })
    .await;
    let s = got.unwrap_or_else(|| {
        panic!(
            "the running hash never reached the disk's {want}: {}",
            futures_status(&c, &p.admin)
        )
    });
    // a reload now changes nothing: same generation and hash, reported `unchanged`
    let generation = s["generation"].as_u64().unwrap();
    let r = c
        .post(format!("http://{}/admin/reload", p.admin))
        .send()
        .await
        .unwrap();
    let report = support::json(r).await;
    assert_eq!(report["result"], "unchanged", "{report}");
    let after = status(&c, &p.admin).await;
    assert_eq!(after["generation"].as_u64().unwrap(), generation);
    assert_eq!(after["hash"], want.as_str());
    // Every applied reload got a new generation: at most one per distinct version.
    assert!(generation <= VERSIONS as u64, "generation {generation}");
    // The versions applied, in the order they were applied, never go back:
    // each reload read the files after the one before it stored its result.
    let applied: Vec<usize> = p
        .lines
        .try_iter()
        .filter(|l| l.contains("configuration applied"))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            version_of[v["hash"].as_str().unwrap()]
        })
        .collect();
    assert!(
        applied.windows(2).all(|w| w[0] < w[1]),
        "applied out of order: {applied:?}"
    );
    assert_eq!(applied.last(), Some(&(VERSIONS - 1)), "{applied:?}");
    kill(&p.child, "-TERM");
}

/// The status, for a failure message (blocking is fine in a panic path).
fn futures_status(_c: &reqwest::Client, admin: &str) -> String {
    std::process::Command::new("curl")
        .args(["-s", &format!("http://{admin}/admin/status")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
