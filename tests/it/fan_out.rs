//! Fan-out (SPEC §9) with the real binary: a route's `also` targets are async
//! deliveries of their own, stored in the same transaction as the route's own
//! request, each with its own breaker, retry schedule and dedupe, known as
//! `<route>/<name>`; the bot's answer is the route's own.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::support::process::{Proc, kill, serve};
use crate::support::{self, Scripted, TestDownstream, wait_until};

/// Bot `b` (API key `k`); route `r` (`mode`) to `{crm}/crm` with targets
/// `helpdesk` and `analytics`, keyed by `inputId`; retries every 100 ms;
/// `extra` appended to the file (more routes).
fn routes(mode: &str, crm: &str, helpdesk: &str, analytics: &str, extra: &str) -> String {
    format!(
        r#"bots:
  - id: b
    auth: {{ api_key: {{ keys: ["k"] }} }}
routes:
  - name: r
    bot: b
    intent: "*"
    mode: {mode}
    idempotency_key: "{{{{inputId}}}}"
    downstream: {{ url: "{crm}/crm" }}
    body: '{{"inputId": {{{{json inputId}}}}, "to": "crm"}}'
    retry: {{ attempts: 1, schedule: [100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms] }}
    also:
      - name: helpdesk
        downstream: {{ url: "{helpdesk}/tickets", method: PUT }}
        body: '{{"ticket": {{{{json inputId}}}}}}'
      - name: analytics
        downstream: {{ url: "{analytics}/events" }}
        breaker: {{ consecutive_failures: 1000 }}
{extra}"#
    )
}

fn write(dir: &Path, content: &str) {
    let tmp = dir.join(".r.yaml.tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, dir.join("r.yaml")).unwrap();
}

async fn post(c: &reqwest::Client, p: &Proc, input: &str) -> (u16, Value) {
    let resp = c
        .post(format!("http://{}/webhooks/b", p.listen))
        .header("x-api-key", "k")
        .body(format!(r#"{{"sessionId":"s","inputId":"{input}"}}"#))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn admin(c: &reqwest::Client, p: &Proc, path: &str) -> Value {
    support::json(
        c.get(format!("http://{}{path}", p.admin))
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn admin_text(c: &reqwest::Client, p: &Proc, path: &str) -> String {
    let resp = c.get(format!("http://{}{path}", p.admin)).send().await;
    resp.unwrap().text().await.unwrap()
}

/// The `Idempotency-Key`s of the requests `ds` received since `since`.
fn keys_since(ds: &TestDownstream, since: SystemTime) -> Vec<String> {
    ds.requests()
        .iter()
        .filter(|r| r.received >= since && r.method != "GET") // not health probes
        .map(|r| r.header("idempotency-key").expect("an idempotency key"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_route_answers_its_own_and_each_target_is_delivered_once_on_its_schedule() {
    let (crm, helpdesk, analytics) = (
        TestDownstream::start().await,
        TestDownstream::start().await,
        TestDownstream::start().await,
    );
    crm.set_default(Scripted::status(201).body(r#"{"id":"crm-7"}"#));
    // the analytics store is down
    analytics.set_default(Scripted::status(503));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("routes");
    std::fs::create_dir(&dir).unwrap();
    write(
        &dir,
        &routes("sync", &crm.url(), &helpdesk.url(), &analytics.url(), ""),
    );
    let store = format!("sqlite://{}", tmp.path().join("gw.db").display());
    let p = serve(&dir, &store, &[], &[]);
    let c = support::client();

    let (status, body) = post(&c, &p, "in-1").await;
    assert_eq!(status, 201, "the route's own answer: {body}");
    assert_eq!(body["id"], "crm-7", "{body}");
    assert_eq!(crm.requests().len(), 1);

    // the live target gets its request at once, rendered from its own template
    let got = wait_until(Duration::from_secs(10), async || {
        helpdesk.requests().first().cloned()
    })
    .await
    .expect("the helpdesk got its request");
    assert_eq!(got.method, "PUT");
    assert_eq!(got.uri, "/tickets");
    assert_eq!(got.json(), serde_json::json!({"ticket": "in-1"}));
    assert_eq!(got.header("idempotency-key").as_deref(), Some("in-1"));

    // the down one is tried on its schedule, then delivered when it is back
    wait_until(Duration::from_secs(10), async || {
        (analytics.requests().len() >= 3).then_some(())
    })
    .await
    .expect("analytics is retried");
    let back = SystemTime::now();
    analytics.set_default(Scripted::status(200));
    wait_until(Duration::from_secs(10), async || {
        (!keys_since(&analytics, back).is_empty()).then_some(())
    })
    .await
    .expect("analytics gets it once it is back");
    let delivered = wait_until(Duration::from_secs(10), async || {
        let list = admin(&c, &p, "/admin/deliveries?state=delivered").await;
        let rows = list["deliveries"].as_array().cloned().unwrap_or_default();
        (rows.len() == 2).then_some(rows)
    })
    .await
    .expect("both targets delivered");
    let by_route = |name: &str| delivered.iter().find(|d| d["route"] == name).cloned();
    assert_eq!(by_route("r/helpdesk").unwrap()["attempts"], 1);
    let a = by_route("r/analytics").expect("the analytics delivery");
    assert!(
        a["attempts"].as_u64().unwrap() >= 4,
        "3 failures then the success: {a}"
    );

    // the bot's retry of the same call: answered again, nothing stored or sent
    // twice (a target would be stored before the answer: the store says it all)
    let (status, _) = post(&c, &p, "in-1").await;
    assert_eq!(status, 201);
    assert_eq!(crm.requests().len(), 1);
    assert_eq!(helpdesk.requests().len(), 1);
    assert_eq!(keys_since(&analytics, back), vec!["in-1".to_string()]);
    let all = admin(&c, &p, "/admin/deliveries").await;
    assert_eq!(all["deliveries"].as_array().unwrap().len(), 2, "{all}");

    // metrics and the admin API know each target as `<route>/<name>`
    let metrics = admin_text(&c, &p, "/metrics").await;
    assert!(metrics.contains(r#"route="r/analytics""#), "{metrics}");
    let routes = admin(&c, &p, "/admin/routes").await;
    let names: Vec<&str> = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["r", "r/analytics", "r/helpdesk"]);
    let target = &routes["routes"][1];
    assert_eq!(target["also_of"], "r");
    assert_eq!(target["mode"], "async");
    let page = admin_text(&c, &p, "/").await;
    assert!(
        page.contains(r#"data-route="r/helpdesk""#),
        "status page row"
    );
    p.stop("-TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_between_accept_and_delivery_loses_none_of_the_three() {
    let dss = [
        TestDownstream::start().await,
        TestDownstream::start().await,
        TestDownstream::start().await,
    ];
    for ds in &dss {
        ds.set_default(Scripted::status(503));
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("routes");
    std::fs::create_dir(&dir).unwrap();
    // no breaker opens: every delivery is due again at once after the restart
    let never_open = "defaults:\n  breaker: { consecutive_failures: 1000, min_calls: 1000 }\n";
    write(
        &dir,
        &routes(
            "async",
            &dss[0].url(),
            &dss[1].url(),
            &dss[2].url(),
            never_open,
        ),
    );
    let store = format!("sqlite://{}", tmp.path().join("gw.db").display());
    let p = serve(&dir, &store, &[], &[]);
    let c = support::client();
    let n = 20;
    let mut ids = HashSet::new();
    for i in 0..n {
        let (status, body) = post(&c, &p, &format!("in-{i}")).await;
        assert_eq!(status, 202, "{body}");
        ids.insert(body["delivery_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), n, "one delivery id per webhook: the route's own");
    // all three are stored and being tried (and refused) when it crashes
    wait_until(Duration::from_secs(10), async || {
        dss.iter().all(|d| !d.requests().is_empty()).then_some(())
    })
    .await
    .expect("every target tried");
    kill(&p.child, "-KILL");
    let _ = p.stop_wait().await;

    let back = SystemTime::now();
    for ds in &dss {
        ds.set_default(Scripted::status(200));
    }
    let p = serve(&dir, &store, &[], &[]);
    let want: HashSet<String> = (0..n).map(|i| format!("in-{i}")).collect();
    for (ds, name) in dss.iter().zip(["r", "r/helpdesk", "r/analytics"]) {
        let got = wait_until(Duration::from_secs(20), async || {
            let keys: HashSet<String> = keys_since(ds, back).into_iter().collect();
            (keys == want).then_some(keys)
        })
        .await;
        assert!(
            got.is_some(),
            "{name}: got {:?}",
            keys_since(ds, back).len()
        );
    }
    let list = wait_until(Duration::from_secs(10), async || {
        let l = admin(&c, &p, "/admin/deliveries?state=delivered&limit=1000").await;
        (l["deliveries"].as_array().map_or(0, Vec::len) == 3 * n).then_some(l)
    })
    .await
    .expect("all 60 deliveries delivered");
    let routes: HashSet<&str> = list["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["route"].as_str().unwrap())
        .collect();
    assert_eq!(routes, HashSet::from(["r", "r/helpdesk", "r/analytics"]));
    p.stop("-TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn also_targets_keep_their_state_across_a_reload_of_unrelated_routes() {
    let (crm, helpdesk, analytics) = (
        TestDownstream::start().await,
        TestDownstream::start().await,
        TestDownstream::start().await,
    );
    helpdesk.set_default(Scripted::status(503));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("routes");
    std::fs::create_dir(&dir).unwrap();
    let other = |path: &str| {
        format!(
            "  - name: other\n    bot: b\n    intent: Other\n    downstream: {{ url: \"{}/{path}\" }}\n",
            crm.url()
        )
    };
    // the helpdesk's breaker opens at its first failure, for long; its health
    // probe (every 500 ms) also bounds how long a postponed delivery waits
    let with_breaker = |path: &str| {
        routes("async", &crm.url(), &helpdesk.url(), &analytics.url(), &other(path)).replace(
            "method: PUT }\n",
            &format!(
                "method: PUT }}\n        breaker: {{ consecutive_failures: 1, open_for: 10m, health: {{ url: \"{}/health\", interval: 500ms }} }}\n",
                helpdesk.url()
            ),
        )
    };
    write(&dir, &with_breaker("v1"));
    let store = format!("sqlite://{}", tmp.path().join("gw.db").display());
    let p = serve(&dir, &store, &["--reload-debounce-ms", "10"], &[]);
    let c = support::client();
    let (status, _) = post(&c, &p, "in-1").await;
    assert_eq!(status, 202);
    let state = async |c: &reqwest::Client| {
        let routes = admin(c, &p, "/admin/routes").await;
        let t = routes["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "r/helpdesk")
            .cloned()
            .expect("the target is a route");
        (
            routes["generation"].as_u64().unwrap(),
            t["breaker"]["state"].as_str().unwrap().to_owned(),
        )
    };
    let (generation, _) = wait_until(Duration::from_secs(10), async || {
        let s = state(&c).await;
        (s.1 == "open").then_some(s)
    })
    .await
    .expect("the helpdesk's breaker opened");

    // an unrelated route changes: a reload
    write(&dir, &with_breaker("v2"));
    let (after, breaker) = wait_until(Duration::from_secs(10), async || {
        let s = state(&c).await;
        (s.0 > generation).then_some(s)
    })
    .await
    .expect("the change was reloaded");
    assert_eq!(
        breaker, "open",
        "the target's breaker survived generation {after}"
    );
    let (status, _) = post(&c, &p, "in-2").await;
    assert_eq!(status, 202, "the route still fans out after the reload");

    // back up, its breaker reset (the name's `/` encoded): both pending deliveries go
    let back = SystemTime::now();
    helpdesk.set_default(Scripted::status(200));
    let r = c
        .post(format!(
            "http://{}/admin/breakers/r%2Fhelpdesk/reset",
            p.admin
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    let keys = wait_until(Duration::from_secs(10), async || {
        let mut k = keys_since(&helpdesk, back);
        k.sort();
        (k.len() >= 2).then_some(k)
    })
    .await
    .expect("the helpdesk got both");
    assert_eq!(keys, ["in-1", "in-2"], "each once");
    assert_eq!(analytics.requests().len(), 2);
    assert_eq!(crm.requests().len(), 2);
    p.stop("-TERM").await;
}

/// Hostile traffic against a fan-out route: a flood of 40 concurrent webhooks
/// into a queue bounded at 29 live deliveries (3 per webhook, nothing drains:
/// every downstream answers 503 and the next try is an hour away). Every
/// answer is 202 or 503 `queue_full`; the bound (29) is not a multiple of 3,
/// so the tenth call finds room for two of its three; the store holds the route's delivery and
/// both targets' for each 202 and nothing of any refused call (no half
/// group); a target's secret header never reaches the store file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_into_a_full_queue_stores_whole_groups_or_nothing() {
    let ds = TestDownstream::start().await;
    ds.set_default(Scripted::status(503));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("routes");
    std::fs::create_dir(&dir).unwrap();
    let url = ds.url();
    write(
        &dir,
        &format!(
            r#"bots:
  - id: b
    auth: {{ api_key: {{ keys: ["k"] }} }}
routes:
  - name: r
    bot: b
    intent: "*"
    mode: async
    idempotency_key: "{{{{inputId}}}}"
    downstream: {{ url: "{url}/crm" }}
    body: '{{"inputId": {{{{json inputId}}}}}}'
    retry: {{ schedule: [1h] }}
    also:
      - name: desk
        downstream: {{ url: "{url}/desk", headers: {{ X-Desk-Key: "${{DESK_KEY}}" }} }}
      - name: stats
        downstream: {{ url: "{url}/stats" }}
"#
        ),
    );
    let secret = "desk-secret-7f3a9c";
    let db = tmp.path().join("gw.db");
    let store = format!("sqlite://{}", db.display());
    let p = serve(
        &dir,
        &store,
        &["--max-pending", "29"],
        &[("DESK_KEY", secret)],
    );
    let c = support::client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (c, listen) = (c.clone(), p.listen.clone());
        tasks.spawn(async move {
            let resp = c
                .post(format!("http://{listen}/webhooks/b"))
                .header("x-api-key", "k")
                .body(format!(r#"{{"sessionId":"s","inputId":"in-{i}"}}"#))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
            (status, body)
        });
    }
    let mut accepted = 0;
    while let Some(r) = tasks.join_next().await {
        let (status, body) = r.unwrap();
        match status {
            202 => accepted += 1,
            503 => assert_eq!(body["error"], "queue_full", "{body}"),
            s => panic!("unexpected {s}: {body}"),
        }
    }
    assert_eq!(accepted, 9, "29 live deliveries hold 9 whole groups of 3");
    let list = admin(&c, &p, "/admin/deliveries?limit=1000").await;
    let rows = list["deliveries"].as_array().unwrap();
    for route in ["r", "r/desk", "r/stats"] {
        let n = rows.iter().filter(|d| d["route"] == route).count();
        assert_eq!(n, accepted, "{route}: one delivery per accepted webhook");
    }
    // the desk target was tried with its secret header, which the store never held
    let tried = wait_until(Duration::from_secs(10), async || {
        ds.requests().into_iter().find(|r| r.uri == "/desk")
    })
    .await
    .expect("the desk target was tried");
    assert_eq!(tried.header("x-desk-key").as_deref(), Some(secret));
    p.stop("-TERM").await;
    for f in [db.clone(), tmp.path().join("gw.db-wal")] {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} holds the secret",
            f.display()
        );
    }
    eprintln!(
        "fan-out flood: 40 webhooks at once, {accepted} accepted as whole groups of 3, {} refused",
        40 - accepted
    );
}
