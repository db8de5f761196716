//! Durable async delivery end to end: a real gateway with a real SQLite store
//! and its worker, in front of a real local downstream. Waits are bounded polls.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{self, Scripted, TestDownstream, TestGateway, wait_until};

fn files(ds: &TestDownstream, extra: &str) -> String {
    format!(
        r#"bots:
  - id: b
    auth: {{ api_key: {{ keys: ["test-key"] }} }}
routes:
  - name: async-crm
    bot: b
    intent: a
    mode: async
    idempotency_key: "{{{{inputId}}}}"
    downstream: {{ url: "{u}/crm/{{{{sessionId}}}}", timeout: 500ms }}
    body: '{{"session": "{{{{sessionId}}}}"}}'
    retry: {{ schedule: [20ms, 20ms, 20ms] }}
{extra}
  - name: sync-queue
    bot: b
    intent: q
    on_failure: queue
    idempotency_key: "{{{{inputId}}}}"
    downstream: {{ url: "{u}/sync" }}
    retry: {{ attempts: 1, schedule: [20ms] }}
"#,
        u = ds.url()
    )
}

/// How long the worker may take for what a test waits for.
const WITHIN: Duration = Duration::from_secs(10);

async fn admin(gw: &TestGateway, path: &str) -> Value {
    support::json(gw.client.get(gw.admin_url(path)).send().await.unwrap()).await
}

/// Waits (bounded) until the delivery `id` is `delivered`.
async fn wait_delivered(gw: &TestGateway, id: &str) -> Option<()> {
    wait_until(WITHIN, async || {
        (admin(gw, &format!("/admin/deliveries/{id}")).await["state"] == "delivered").then_some(())
    })
    .await
}

fn crm_calls(ds: &TestDownstream) -> Vec<support::Recorded> {
    ds.requests()
        .into_iter()
        .filter(|r| r.uri.starts_with("/crm"))
        .collect()
}

#[tokio::test]
async fn accepted_with_202_then_delivered_by_the_worker() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("r.yaml", &files(&ds, ""))
        .start()
        .await;
    let (status, _, body) = gw
        .send(
            "b",
            &json!({"intent": "a", "sessionId": "s1", "inputId": "in-1"}),
        )
        .await;
    assert_eq!(status, 202);
    let id = body["delivery_id"].as_str().unwrap().to_string();
    wait_until(WITHIN, async || crm_calls(&ds).len() == 1)
        .await
        .expect("delivered");
    let r = &crm_calls(&ds)[0];
    assert_eq!(
        (r.uri.as_str(), r.header("idempotency-key").as_deref()),
        ("/crm/s1", Some("in-1"))
    );
    assert_eq!(r.json(), json!({"session": "s1"}));
    wait_delivered(&gw, &id).await.expect("marked delivered");
}

#[tokio::test]
async fn an_inbound_duplicate_gets_the_first_answer_and_is_sent_once() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("r.yaml", &files(&ds, ""))
        .start()
        .await;
    let p = json!({"intent": "a", "sessionId": "s1", "inputId": "same-input"});
    let (s1, _, b1) = gw.send("b", &p).await;
    let (s2, _, b2) = gw.send("b", &p).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(b1, b2, "the first answer again");
    // The worker is done once the store holds nothing pending or leased: every
    // send it makes for what was accepted has been made by then.
    let all = wait_until(WITHIN, async || {
        let all = admin(&gw, "/admin/deliveries").await;
        (all["pending"] == 0 && all["leased"] == 0 && all["deliveries"][0]["state"] == "delivered")
            .then_some(all)
    })
    .await
    .expect("the worker delivered and has nothing left");
    let rows = all["deliveries"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "the duplicate stored nothing: {all}");
    assert_eq!(rows[0]["id"], b1["delivery_id"], "{all}");
    assert_eq!(crm_calls(&ds).len(), 1, "nothing sent twice");
}

#[tokio::test]
async fn retries_follow_the_schedule_with_the_same_idempotency_key() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("r.yaml", &files(&ds, ""))
        .start()
        .await;
    ds.push(Scripted::status(503));
    ds.push(Scripted::status(502));
    let (_, _, body) = gw
        .send(
            "b",
            &json!({"intent": "a", "sessionId": "s1", "inputId": "in-r"}),
        )
        .await;
    let id = body["delivery_id"].as_str().unwrap().to_string();
    wait_delivered(&gw, &id)
        .await
        .expect("delivered on the third try");
    let calls = crm_calls(&ds);
    assert_eq!(calls.len(), 3);
    assert!(
        calls
            .iter()
            .all(|c| c.header("idempotency-key").as_deref() == Some("in-r"))
    );
    let d = admin(&gw, &format!("/admin/deliveries/{id}")).await;
    let statuses: Vec<Value> = d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(503), json!(502), json!(200)]);
}

#[tokio::test]
async fn dead_letter_and_replay_round_trip() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("r.yaml", &files(&ds, ""))
        .start()
        .await;
    ds.set_default(Scripted::status(503));
    let (_, _, body) = gw
        .send(
            "b",
            &json!({"intent": "a", "sessionId": "s1", "inputId": "in-d"}),
        )
        .await;
    let id = body["delivery_id"].as_str().unwrap().to_string();
    wait_until(WITHIN, async || {
        admin(&gw, &format!("/admin/deliveries/{id}")).await["state"] == "dead"
    })
    .await
    .expect("dead after 1 + 3 tries");
    assert_eq!(crm_calls(&ds).len(), 4);
    let dead = admin(&gw, "/admin/deliveries?state=dead").await;
    assert_eq!(
        (dead["dead"].as_u64(), dead["deliveries"][0]["id"].as_str()),
        (Some(1), Some(id.as_str()))
    );
    // the CRM recovers; replay it
    ds.set_default(Scripted::status(200));
    gw.replay(&id).await;
    wait_delivered(&gw, &id)
        .await
        .expect("delivered after replay");
    assert_eq!(crm_calls(&ds).len(), 5);
    assert_eq!(admin(&gw, "/admin/deliveries?state=dead").await["dead"], 0);
}

#[tokio::test]
async fn an_open_route_holds_deliveries_without_using_their_tries() {
    let ds = TestDownstream::start().await;
    let breaker = format!(
        "    breaker: {{ consecutive_failures: 1, open_for: 1h, health: {{ url: \"{}/health\", interval: 50ms }} }}",
        ds.url()
    );
    let gw = TestGateway::builder()
        .file("r.yaml", &files(&ds, &breaker))
        .start()
        .await;
    // the first delivery fails and opens the breaker; the health endpoint fails for a while too
    ds.push(Scripted::status(503));
    for _ in 0..5 {
        ds.push(Scripted::status(503)); // health probes
    }
    let (_, _, b1) = gw
        .send(
            "b",
            &json!({"intent": "a", "sessionId": "s1", "inputId": "in-1"}),
        )
        .await;
    wait_until(WITHIN, async || {
        let r = admin(&gw, "/admin/routes").await;
        r["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "async-crm" && r["breaker"]["state"] == "open")
    })
    .await
    .expect("breaker open");
    let (_, _, b2) = gw
        .send(
            "b",
            &json!({"intent": "a", "sessionId": "s2", "inputId": "in-2"}),
        )
        .await;
    // while open, nothing reaches /crm; once a probe succeeds (health → 200) both are delivered
    wait_until(WITHIN, async || {
        let a = admin(
            &gw,
            &format!("/admin/deliveries/{}", b1["delivery_id"].as_str().unwrap()),
        )
        .await;
        let b = admin(
            &gw,
            &format!("/admin/deliveries/{}", b2["delivery_id"].as_str().unwrap()),
        )
        .await;
        a["state"] == "delivered" && b["state"] == "delivered"
    })
    .await
    .expect("both delivered");
    let second = admin(
        &gw,
        &format!("/admin/deliveries/{}", b2["delivery_id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(
        second["attempts"].as_array().unwrap().len(),
        1,
        "waiting while open used no try: {second}"
    );
    assert_eq!(crm_calls(&ds).len(), 3, "one failure, then one call each");
}

#[tokio::test]
async fn on_failure_queue_turns_a_failed_sync_call_into_a_delivery() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("r.yaml", &files(&ds, ""))
        .start()
        .await;
    ds.push(Scripted::status(503));
    let (status, _, body) = gw
        .send(
            "b",
            &json!({"intent": "q", "sessionId": "s1", "inputId": "in-q"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["delivery_id"].as_str().unwrap().to_string();
    wait_delivered(&gw, &id).await.expect("delivered later");
    let sync_calls: Vec<_> = ds
        .requests()
        .into_iter()
        .filter(|r| r.uri == "/sync")
        .collect();
    assert_eq!(sync_calls.len(), 2);
    assert!(
        sync_calls
            .iter()
            .all(|c| c.header("idempotency-key").as_deref() == Some("in-q"))
    );
}

/// A gateway with the shared async test route (`support::async_route_file`),
/// its downstream set with `downstream`.
async fn async_gateway(ds: &TestDownstream, downstream: &[(&str, &str)]) -> TestGateway {
    let routes = support::async_route_file(&ds.url(), downstream, "1s");
    TestGateway::builder().file("r.yaml", &routes).start().await
}

async fn accept(gw: &TestGateway, key: &str) {
    let listen = gw.addr.to_string();
    assert!(
        support::post_keyed(&gw.client, &listen, key)
            .await
            .is_some(),
        "{key} accepted"
    );
}

#[tokio::test]
async fn a_slow_delivery_does_not_hold_up_the_others() {
    let ds = TestDownstream::start().await;
    let gw = async_gateway(&ds, &[("timeout", "60s")]).await;
    // the first delivery's downstream takes a minute to answer
    ds.push(Scripted::status(200).delay(Duration::from_secs(60)));
    accept(&gw, "slow").await;
    wait_until(WITHIN, async || crm_calls(&ds).len() == 1)
        .await
        .expect("the slow one is under way");
    for n in 1..=5 {
        accept(&gw, &format!("in-{n}")).await;
    }
    // the others are delivered while the first still waits (a worker that ran
    // claims batch by batch would hold them for the minute)
    wait_until(WITHIN, async || crm_calls(&ds).len() == 6)
        .await
        .expect("the others delivered");
    assert!(
        ds.max_in_flight() >= 2,
        "sent while the slow one was in flight"
    );
}

#[tokio::test]
async fn the_worker_keeps_to_the_route_s_max_in_flight() {
    let ds = TestDownstream::start().await;
    let gw = async_gateway(&ds, &[("max_in_flight", "2")]).await;
    // All 8 are due at once: the downstream holds the first tries, so the
    // worker has more work than slots however slowly the accepts come in.
    ds.hold();
    for n in 0..8 {
        accept(&gw, &format!("in-{n}")).await;
    }
    wait_until(WITHIN, async || crm_calls(&ds).len() >= 2)
        .await
        .expect("two sent at once");
    ds.release();
    wait_until(WITHIN, async || crm_calls(&ds).len() == 8)
        .await
        .expect("all delivered");
    assert_eq!(ds.max_in_flight(), 2, "two at a time, never more");
}

/// A delivery stores the body as the bot sent it (spacing, key order, escapes),
/// not the parsed value written out again, and a replay renders from that text
/// the request the first try sent.
#[tokio::test]
async fn the_payload_is_stored_as_received_and_a_replay_renders_the_same_request() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("r.yaml", &files(&ds, ""))
        .start()
        .await;
    let body = "{ \"sessionId\" : \"s\\u00e9-\\\"1\\\"\",\n  \"intent\": \"a\",\t\"inputId\": \"raw-1\", \"n\": 1.50e2 }";
    let resp = gw.post("b", &[("x-api-key", "test-key")], body).await;
    assert_eq!(resp.status(), 202);
    let id = support::json(resp).await["delivery_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until(WITHIN, async || crm_calls(&ds).len() == 1)
        .await
        .expect("delivered");
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        gw.dir.path().join("gateway.db").display()
    ))
    .await
    .unwrap();
    let stored: String = sqlx::query_scalar("SELECT payload FROM deliveries WHERE id = ?1")
        .bind(&id)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(stored, body);
    wait_delivered(&gw, &id).await.expect("marked delivered");
    gw.replay(&id).await;
    wait_until(WITHIN, async || crm_calls(&ds).len() == 2)
        .await
        .expect("sent again after the replay");
    let (first, again) = (&crm_calls(&ds)[0], &crm_calls(&ds)[1]);
    assert_eq!(first.uri, "/crm/s%C3%A9-%221%22");
    assert_eq!((&again.uri, again.json()), (&first.uri, first.json()));
    assert_eq!(first.json(), json!({"session": "sé-\"1\""}));
}
