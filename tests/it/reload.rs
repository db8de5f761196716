//! Hot reload through the file watcher (and the admin trigger): changes apply
//! atomically; every bad change keeps the running configuration serving, with
//! its diagnostics at /admin/status. Waits are bounded polls, never fixed sleeps.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{self, Scripted, TestDownstream, TestGateway, wait_until};

const BOTS: &str = "bots:\n  - id: b\n    auth: { api_key: { keys: [\"${BOT_KEY}\"] } }\n    schema: ../schemas/payload.json\n";
const SCHEMA: &str = r#"{"type": "object", "properties": {"sessionId": {"type": "string"}}}"#;

fn route(ds: &TestDownstream, name: &str, intent: &str, path: &str) -> String {
    format!(
        "routes:\n  - name: {name}\n    bot: b\n    intent: \"{intent}\"\n    downstream: {{ url: \"{}{path}\" }}\n    breaker: {{ consecutive_failures: 1, open_for: 1h }}\n",
        ds.url()
    )
}

/// Routes live in `<tmp>/routes`, the payload schema in `<tmp>/schemas` (a watched schema dir).
async fn start(ds: &TestDownstream) -> TestGateway {
    TestGateway::builder()
        .file("placeholder.txt", "")
        .env("BOT_KEY", "test-key")
        .start_in_subdir(
            "routes",
            &[
                ("bots.yaml", BOTS),
                ("a.yaml", &route(ds, "route-a", "a", "/v1")),
            ],
            &[("schemas/payload.json", SCHEMA)],
        )
        .await
}

async fn status(gw: &TestGateway) -> Value {
    support::json(
        gw.client
            .get(gw.admin_url("/admin/status"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn reload_count(gw: &TestGateway, result: &str) -> u64 {
    let m = gw
        .client
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let key = format!("gateway_reloads_total{{result=\"{result}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

/// How long a reload may take to show (the watcher debounces for 50 ms).
const WITHIN: Duration = Duration::from_secs(10);

fn write(dir: &Path, name: &str, content: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    // write to a temp name, then rename: what editors do
    let tmp = p.with_extension("tmp~");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
}

fn routes(gw: &TestGateway) -> std::path::PathBuf {
    gw.dir.path().join("routes")
}

#[tokio::test]
async fn add_change_and_delete_route_files() {
    let ds = TestDownstream::start().await;
    let gw = start(&ds).await;
    let gen0 = status(&gw).await["generation"].as_u64().unwrap();
    assert_eq!(gw.send("b", &json!({"intent": "a"})).await.0, 200);

    // add a file, in a new sub-folder
    write(
        &routes(&gw),
        "more/c.yaml",
        &route(&ds, "route-c", "c", "/c"),
    );
    wait_until(WITHIN, async || {
        gw.send("b", &json!({"intent": "c"})).await.0 == 200
    })
    .await
    .expect("route-c served");
    assert_eq!(ds.requests().last().unwrap().uri, "/c");
    let gen1 = status(&gw).await["generation"].as_u64().unwrap();
    assert!(gen1 > gen0);

    // change a file in place (truncate and write)
    std::fs::write(
        routes(&gw).join("a.yaml"),
        route(&ds, "route-a", "a", "/v2"),
    )
    .unwrap();
    wait_until(WITHIN, async || {
        gw.send("b", &json!({"intent": "a"})).await;
        ds.requests().last().unwrap().uri == "/v2"
    })
    .await
    .expect("route-a changed");

    // delete a file
    std::fs::remove_file(routes(&gw).join("more/c.yaml")).unwrap();
    wait_until(WITHIN, async || {
        gw.send("b", &json!({"intent": "c"})).await.0 == 422
    })
    .await
    .expect("route-c gone");
    assert_eq!(status(&gw).await["last_reload"]["ok"], true);
}

#[tokio::test]
async fn every_kind_of_bad_change_keeps_the_running_configuration() {
    let ds = TestDownstream::start().await;
    let gw = start(&ds).await;
    let good_a = route(&ds, "route-a", "a", "/v1");
    let schemas = gw.dir.path().join("schemas");
    type Change<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "YAML error",
            Box::new(|| write(&routes(&gw), "a.yaml", "routes: [\n")),
        ),
        (
            "schema-invalid route",
            Box::new(|| {
                write(
                    &routes(&gw),
                    "a.yaml",
                    &good_a.replace("intent:", "intnet:"),
                )
            }),
        ),
        (
            "JSON Schema that does not compile",
            Box::new(|| write(&schemas, "payload.json", r#"{"type": "nonsense"}"#)),
        ),
        (
            "template that does not compile",
            Box::new(|| {
                write(
                    &routes(&gw),
                    "a.yaml",
                    &format!("{good_a}    body: '{{{{#if x}}}}'\n"),
                )
            }),
        ),
        (
            "missing env var",
            Box::new(|| {
                write(
                    &routes(&gw),
                    "bots.yaml",
                    &BOTS.replace("BOT_KEY", "UNSET_KEY"),
                )
            }),
        ),
        (
            "(bot, intent) clash across files",
            Box::new(|| write(&routes(&gw), "z.yaml", &route(&ds, "route-z", "a", "/z"))),
        ),
        (
            "partially written file",
            Box::new(|| write(&routes(&gw), "a.yaml", &good_a[..good_a.len() / 2])),
        ),
        (
            "deleted referenced schema",
            Box::new(|| std::fs::remove_file(schemas.join("payload.json")).unwrap()),
        ),
    ];
    for (what, apply) in cases {
        let generation = status(&gw).await["generation"].as_u64().unwrap();
        let errors = reload_count(&gw, "error").await;
        apply();
        wait_until(WITHIN, async || reload_count(&gw, "error").await > errors)
            .await
            .expect(what);
        let st = status(&gw).await;
        assert_eq!(
            st["generation"].as_u64(),
            Some(generation),
            "{what}: the generation did not change: {st:#}"
        );
        assert_eq!(st["last_reload"]["ok"], false, "{what}");
        assert!(
            !st["last_reload"]["diagnostics"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{what}: {st}"
        );
        // the old configuration still serves
        let before = ds.requests().len();
        assert_eq!(gw.send("b", &json!({"intent": "a"})).await.0, 200, "{what}");
        assert_eq!(ds.requests()[before].uri, "/v1", "{what}");
        // repair: back to the good files
        write(&routes(&gw), "a.yaml", &good_a);
        write(&routes(&gw), "bots.yaml", BOTS);
        write(&schemas, "payload.json", SCHEMA);
        let _ = std::fs::remove_file(routes(&gw).join("z.yaml"));
        wait_until(WITHIN, async || {
            status(&gw).await["last_reload"]["ok"] == true
        })
        .await
        .expect("repaired");
    }
    // the diagnostics never show the secret
    assert!(!status(&gw).await.to_string().contains("test-key"));
}

#[tokio::test]
async fn a_configmap_symlink_swap_is_picked_up() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .env("BOT_KEY", "test-key")
        .start_in_subdir("routes", &[], &[("schemas/payload.json", SCHEMA)])
        .await;
    let r = routes(&gw);
    // kubelet's layout: ..v1/{files}, ..data -> ..v1, file -> ..data/file
    std::fs::create_dir_all(r.join("..v1")).unwrap();
    std::fs::write(r.join("..v1/bots.yaml"), BOTS).unwrap();
    std::fs::write(r.join("..v1/a.yaml"), route(&ds, "route-a", "a", "/v1")).unwrap();
    std::os::unix::fs::symlink("..v1", r.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/bots.yaml", r.join("bots.yaml")).unwrap();
    std::os::unix::fs::symlink("..data/a.yaml", r.join("a.yaml")).unwrap();
    wait_until(WITHIN, async || {
        gw.send("b", &json!({"intent": "a"})).await.0 == 200
    })
    .await
    .expect("v1 served");
    assert_eq!(ds.requests().last().unwrap().uri, "/v1");
    // the swap: a new version dir, a new link, renamed over ..data atomically
    std::fs::create_dir_all(r.join("..v2")).unwrap();
    std::fs::write(r.join("..v2/bots.yaml"), BOTS).unwrap();
    std::fs::write(r.join("..v2/a.yaml"), route(&ds, "route-a", "a", "/v2")).unwrap();
    std::os::unix::fs::symlink("..v2", r.join("..data_tmp")).unwrap();
    std::fs::rename(r.join("..data_tmp"), r.join("..data")).unwrap();
    std::fs::remove_dir_all(r.join("..v1")).unwrap();
    wait_until(WITHIN, async || {
        gw.send("b", &json!({"intent": "a"})).await;
        ds.requests().last().unwrap().uri == "/v2"
    })
    .await
    .expect("v2 served");
}

#[tokio::test]
async fn breaker_state_of_an_unchanged_route_survives_a_reload_of_another_file() {
    let ds = TestDownstream::start().await;
    let gw = start(&ds).await;
    ds.push(Scripted::status(503));
    assert_eq!(gw.send("b", &json!({"intent": "a"})).await.0, 502);
    let generation = status(&gw).await["generation"].as_u64().unwrap();
    write(
        &routes(&gw),
        "other.yaml",
        &route(&ds, "route-o", "o", "/o"),
    );
    wait_until(WITHIN, async || {
        status(&gw).await["generation"].as_u64().unwrap() > generation
    })
    .await
    .expect("new generation");
    // route-a is still open: answered 503 without a call
    let before = ds.requests().len();
    let (status_code, _, body) = gw.send("b", &json!({"intent": "a"})).await;
    assert_eq!((status_code, body["reason"].as_str()), (503, Some("open")));
    assert_eq!(ds.requests().len(), before);
    // changing route-a itself starts it fresh
    write(&routes(&gw), "a.yaml", &route(&ds, "route-a", "a", "/v9"));
    wait_until(WITHIN, async || {
        gw.send("b", &json!({"intent": "a"})).await.0 == 200
    })
    .await
    .expect("route-a fresh");
}

#[tokio::test]
async fn requests_during_fifty_reloads_get_old_or_new_answers_never_errors() {
    let ds = TestDownstream::start().await;
    let gw = Arc::new(start(&ds).await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = vec![];
    for _ in 0..4 {
        let (gw, stop) = (gw.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (status, _, _) = gw.send("b", &json!({"intent": "a"})).await;
                assert_eq!(
                    status, 200,
                    "every request is answered by the old or the new configuration"
                );
                n += 1;
            }
            n
        }));
    }
    let good = |v: u32| route(&ds, "route-a", "a", &format!("/v{v}"));
    for i in 0..50u32 {
        let content = if i % 2 == 0 {
            good(i)
        } else {
            "routes: [\n".to_string()
        };
        write(&routes(&gw), "a.yaml", &content);
        let resp = gw
            .client
            .post(gw.admin_url("/admin/reload"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            if i % 2 == 0 { 200 } else { 422 },
            "reload {i}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    assert!(total > 0);
    // every downstream request went to a path of some valid configuration
    assert!(
        ds.requests().iter().all(|r| r.uri.starts_with("/v")),
        "only configured paths were called"
    );
}
