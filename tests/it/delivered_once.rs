//! SPEC §7.3, "acknowledged means delivered, once", end to end with the
//! production server (`TestGateway`), a real SQLite store and a real local
//! downstream: the retry rule (a 500 or a dropped connection is retried only
//! with an idempotency key; every async try carries one), the 429 pause, the
//! sync deadline counted from arrival with OAuth2 bounded, `on_failure:
//! queue`, and stored deliveries pinned to the origin and auth they were
//! accepted for. Waits are bounded polls.

use crate::support;

use std::time::{Duration, Instant};

use crate::support::{Scripted, TestDownstream, TestGateway};
use serde_json::{Value, json};

const BOT: &str = "bots:\n  - id: b\n    auth: { api_key: { keys: [\"test-key\"] } }\n";

/// A gateway with bot `b` and `routes` (YAML list items under `routes:`).
async fn gateway(routes: &str) -> TestGateway {
    TestGateway::builder()
        .file("r.yaml", &format!("{BOT}routes:\n{routes}"))
        .start()
        .await
}

async fn admin(gw: &TestGateway, path: &str) -> Value {
    support::json(gw.client.get(gw.admin_url(path)).send().await.unwrap()).await
}

async fn delivery(gw: &TestGateway, id: &str) -> Value {
    admin(gw, &format!("/admin/deliveries/{id}")).await
}

/// Waits (bounded) until delivery `id` is in `state`; returns it.
async fn until_state(gw: &TestGateway, id: &str, state: &str) -> Value {
    support::wait_until(Duration::from_secs(10), async || {
        let d = delivery(gw, id).await;
        (d["state"] == state).then_some(d)
    })
    .await
    .unwrap_or_else(|| panic!("delivery {id} never {state}: {}", "timed out"))
}

fn statuses(d: &Value) -> Vec<Value> {
    d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].clone())
        .collect()
}

fn keys(ds: &TestDownstream) -> Vec<Option<String>> {
    ds.requests()
        .iter()
        .map(|r| r.header("idempotency-key"))
        .collect()
}

fn input(intent: &str, id: &str) -> Value {
    json!({"intent": intent, "sessionId": "s-1", "inputId": id})
}

// ---------- the retry rule ----------

#[tokio::test]
async fn async_500_then_200_is_retried_with_one_idempotency_key() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&format!(
        "  - name: a\n    bot: b\n    intent: \"*\"\n    mode: async\n    idempotency_key: \"{{{{inputId}}}}\"\n    downstream: {{ url: \"{}/crm\" }}\n    retry: {{ schedule: [20ms, 20ms] }}\n",
        ds.url()
    ))
    .await;
    ds.push(Scripted::status(500));
    let (status, _, body) = gw.send("b", &input("x", "in-1")).await;
    assert_eq!(status, 202, "{body}");
    let d = until_state(&gw, body["delivery_id"].as_str().unwrap(), "delivered").await;
    assert_eq!(statuses(&d), [json!(500), json!(200)]);
    assert_eq!(keys(&ds), [Some("in-1".into()), Some("in-1".into())]);
}

#[tokio::test]
async fn async_without_a_key_sends_the_delivery_id_on_every_try() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&format!(
        "  - name: a\n    bot: b\n    intent: \"*\"\n    mode: async\n    downstream: {{ url: \"{}/crm\" }}\n    retry: {{ schedule: [20ms, 20ms] }}\n",
        ds.url()
    ))
    .await;
    ds.push(Scripted::status(500));
    ds.push(Scripted::dropped());
    let (status, _, body) = gw.send("b", &input("x", "in-1")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["delivery_id"].as_str().unwrap().to_owned();
    let d = until_state(&gw, &id, "delivered").await;
    assert_eq!(statuses(&d), [json!(500), Value::Null, json!(200)]);
    assert_eq!(
        keys(&ds),
        vec![Some(id); 3],
        "the delivery id, on every try"
    );
}

/// Route `keyed` (sync, keyed by `inputId`) and route `unkeyed` (sync, no key), both
/// with three tries.
fn sync_routes(url: &str) -> String {
    format!(
        "  - name: keyed\n    bot: b\n    intent: keyed\n    idempotency_key: \"{{{{inputId}}}}\"\n    downstream: {{ url: \"{url}/k\" }}\n    retry: {{ attempts: 3, backoff: {{ initial: 1ms, max: 1ms }} }}\n  - name: unkeyed\n    bot: b\n    intent: unkeyed\n    downstream: {{ url: \"{url}/n\" }}\n    retry: {{ attempts: 3, backoff: {{ initial: 1ms, max: 1ms }} }}\n"
    )
}

#[tokio::test]
async fn sync_with_a_key_retries_a_500_and_a_dropped_connection() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&sync_routes(&ds.url())).await;
    ds.push(Scripted::status(500));
    let (status, _, body) = gw.send("b", &input("keyed", "in-1")).await;
    assert_eq!((status, body), (200, json!({"id": "crm-1"})));
    assert_eq!(keys(&ds), [Some("in-1".into()), Some("in-1".into())]);
    ds.push(Scripted::dropped());
    let (status, _, _) = gw.send("b", &input("keyed", "in-2")).await;
    assert_eq!(status, 200);
    assert_eq!(keys(&ds)[2..], [Some("in-2".into()), Some("in-2".into())]);
}

#[tokio::test]
async fn sync_without_a_key_does_not_retry_a_500_or_a_dropped_connection() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&sync_routes(&ds.url())).await;
    ds.push(Scripted::status(500));
    let (status, _, body) = gw.send("b", &input("unkeyed", "in-1")).await;
    assert_eq!(
        (status, body["error"].as_str(), body["status"].as_u64()),
        (502, Some("downstream"), Some(500))
    );
    assert_eq!(ds.requests().len(), 1, "the write may have been applied");
    ds.push(Scripted::dropped());
    let (status, _, body) = gw.send("b", &input("unkeyed", "in-2")).await;
    assert_eq!((status, body["reason"].as_str()), (502, Some("broken")));
    assert_eq!(keys(&ds), [None, None]);
    // a 503 is still retried without a key
    ds.push(Scripted::status(503));
    assert_eq!(gw.send("b", &input("unkeyed", "in-3")).await.0, 200);
    assert_eq!(ds.requests().len(), 4);
}

// ---------- a sync 429 ----------

#[tokio::test]
async fn sync_429_without_retry_after_waits_out_the_1s_pause_then_tries_again() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&format!(
        "  - name: r\n    bot: b\n    intent: \"*\"\n    deadline: 3s\n    downstream: {{ url: \"{}/crm\" }}\n    retry: {{ attempts: 2, backoff: {{ initial: 1ms, max: 1ms }} }}\n",
        ds.url()
    ))
    .await;
    ds.push(Scripted::status(429));
    let (status, _, body) = gw.send("b", &input("x", "in-1")).await;
    assert_eq!((status, body), (200, json!({"id": "crm-1"})));
    let reqs = ds.requests();
    assert_eq!(reqs.len(), 2);
    let gap = reqs[1].received.duration_since(reqs[0].received).unwrap();
    assert!(
        gap >= Duration::from_millis(950),
        "waited the pause: {gap:?}"
    );
}

#[tokio::test]
async fn sync_429_whose_pause_outlasts_the_deadline_answers_as_step_9_never_502() {
    let ds = TestDownstream::start().await;
    let route = |name: &str, extra: &str| {
        format!(
            "  - name: {name}\n    bot: b\n    intent: {name}\n    deadline: 700ms\n    downstream: {{ url: \"{}/{name}\" }}\n    retry: {{ attempts: 3, backoff: {{ initial: 1ms, max: 1ms }} }}\n{extra}",
            ds.url()
        )
    };
    let gw = gateway(&format!(
        "{}{}",
        route("plain", ""),
        route(
            "fb",
            "    fallback: { status: 200, body: '{\"later\": {{json retry_after}}}' }\n"
        )
    ))
    .await;
    ds.push(Scripted::status(429));
    let started = Instant::now();
    let (status, headers, body) = gw.send("b", &input("plain", "in-1")).await;
    assert_eq!(
        (status, body["error"].as_str(), body["reason"].as_str()),
        (503, Some("unavailable"), Some("paused")),
        "{body}"
    );
    assert_eq!(headers["retry-after"], "1");
    assert!(started.elapsed() < Duration::from_millis(700));
    ds.push(Scripted::status(429));
    let (status, _, body) = gw.send("b", &input("fb", "in-2")).await;
    assert_eq!((status, body), (200, json!({"later": 1})));
    assert_eq!(ds.requests().len(), 2, "one try each");
}

// ---------- the deadline, counted from arrival; OAuth2 bounded ----------

/// Sends a webhook over a raw connection, its body in two halves `gap`
/// apart; returns the status and the time from connecting to the answer.
async fn trickled(gw: &TestGateway, body: &str, gap: Duration) -> (u16, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /webhooks/b HTTP/1.1\r\nhost: x\r\nx-api-key: test-key\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let (first, rest) = body.split_at(body.len() / 2);
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(gap).await;
    s.write_all(rest.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&buf[..n]);
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, elapsed)
}

#[tokio::test]
async fn the_deadline_counts_from_the_request_s_arrival() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&format!(
        "  - name: r\n    bot: b\n    intent: \"*\"\n    deadline: 1s\n    downstream: {{ url: \"{}/slow\", timeout: 5s }}\n",
        ds.url()
    ))
    .await;
    ds.set_default(Scripted::status(200).delay(Duration::from_secs(5)));
    // 600 ms of the deadline go by while the body arrives
    let body = input("x", "in-1").to_string();
    let (status, elapsed) = trickled(&gw, &body, Duration::from_millis(600)).await;
    assert_eq!(status, 504);
    assert!(
        elapsed < Duration::from_millis(1300),
        "answered within the deadline from arrival: {elapsed:?}"
    );
}

fn oauth2_route(url: &str, deadline: &str, timeout: &str) -> String {
    format!(
        "  - name: r\n    bot: b\n    intent: \"*\"\n    deadline: {deadline}\n    downstream:\n      url: \"{url}/crm\"\n      timeout: {timeout}\n      auth: {{ oauth2: {{ token_url: \"{url}/token\", client_id: c, client_secret: s }} }}\n    retry: {{ attempts: 1 }}\n"
    )
}

#[tokio::test]
async fn a_hanging_token_endpoint_is_bounded_by_the_try_and_asked_once() {
    let ds = TestDownstream::start().await;
    let gw = std::sync::Arc::new(gateway(&oauth2_route(&ds.url(), "5s", "500ms")).await);
    ds.push_token(Scripted::status(200).delay(Duration::from_secs(60)));
    let mut calls = Vec::new();
    for n in 0..5 {
        let gw = gw.clone();
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let (status, _, body) = gw.send("b", &input("x", &format!("in-{n}"))).await;
            (status, body, started.elapsed())
        }));
    }
    for call in calls {
        let (status, body, elapsed) = call.await.unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (502, Some("downstream_auth"))
        );
        assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    }
    let started = Instant::now();
    assert_eq!(gw.send("b", &input("x", "in-9")).await.0, 502);
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(
        ds.token_requests().len(),
        1,
        "one grant, however many webhooks"
    );
    assert!(ds.requests().is_empty());
}

#[tokio::test]
async fn a_token_refresh_after_a_401_ends_within_the_deadline() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file(
            "r.yaml",
            &format!("{BOT}routes:\n{}", oauth2_route(&ds.url(), "1s", "5s")),
        )
        .limits(cognigy_gateway::runtime::Limits {
            token_refresh_min_age: Duration::from_millis(100),
            ..Default::default()
        })
        .start()
        .await;
    assert_eq!(gw.send("b", &input("x", "in-1")).await.0, 200);
    tokio::time::sleep(Duration::from_millis(150)).await;
    // the token is old enough to refresh after a 401, and the token endpoint hangs
    ds.push(Scripted::status(401));
    ds.push_token(Scripted::status(200).delay(Duration::from_secs(60)));
    let started = Instant::now();
    let (status, _, body) = gw.send("b", &input("x", "in-2")).await;
    let elapsed = started.elapsed();
    assert_eq!((status, body["error"].as_str()), (504, Some("deadline")));
    assert!(elapsed < Duration::from_millis(1300), "{elapsed:?}");
}

#[tokio::test]
async fn a_broken_token_endpoint_costs_one_grant_per_backoff_period() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&oauth2_route(&ds.url(), "5s", "2s")).await;
    for _ in 0..50 {
        ds.push_token(Scripted::status(500).body("{}"));
    }
    for n in 0..10 {
        let (status, _, body) = gw.send("b", &input("x", &format!("in-{n}"))).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (502, Some("downstream_auth"))
        );
    }
    assert_eq!(ds.token_requests().len(), 1, "the failure is remembered");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(gw.send("b", &input("x", "in-10")).await.0, 502);
    assert_eq!(ds.token_requests().len(), 2, "one more after the backoff");
    assert!(ds.requests().is_empty());
}

#[tokio::test]
async fn a_401_with_a_token_just_granted_is_the_answer_without_a_new_grant() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&oauth2_route(&ds.url(), "5s", "2s")).await;
    ds.set_default(Scripted::status(401).body(r#"{"error": "scope"}"#));
    for n in 0..4 {
        let (status, _, body) = gw.send("b", &input("x", &format!("in-{n}"))).await;
        assert_eq!((status, body), (401, json!({"error": "scope"})));
    }
    assert_eq!(ds.grants(), 1, "no grant per webhook");
    assert_eq!(ds.requests().len(), 4, "one send each");
}

// ---------- on_failure: queue ----------

/// Sync `on_failure: queue` routes: `qk` keyed by `inputId`, `qn` without a
/// key, `qt` with a broken token endpoint, `qc` to a closed port; one try each.
async fn queue_gateway(ds: &TestDownstream) -> TestGateway {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = ds.url();
    let route = |name: &str, downstream: &str, key: bool| {
        let key = if key {
            "    idempotency_key: \"{{inputId}}\"\n"
        } else {
            ""
        };
        format!(
            "  - name: {name}\n    bot: b\n    intent: {name}\n    on_failure: queue\n{key}    downstream: {downstream}\n    retry: {{ attempts: 1, schedule: [1h] }}\n"
        )
    };
    gateway(&format!(
        "{}{}{}{}",
        route("qk", &format!("{{ url: \"{url}/qk\" }}"), true),
        route("qn", &format!("{{ url: \"{url}/qn\" }}"), false),
        route(
            "qt",
            &format!(
                "{{ url: \"{url}/qt\", auth: {{ oauth2: {{ token_url: \"{url}/token\", client_id: c, client_secret: s }} }} }}"
            ),
            false
        ),
        route("qc", &format!("{{ url: \"http://127.0.0.1:{port}/qc\" }}"), false),
    ))
    .await
}

/// What a webhook to `intent` answered: `queued` (202 with a stored delivery
/// of that route, whose id is kept in `ids`) or its status.
async fn queued_or_status(
    gw: &TestGateway,
    intent: &str,
    id: &str,
    ids: &mut Vec<String>,
) -> String {
    let (status, _, body) = gw.send("b", &input(intent, id)).await;
    if status != 202 {
        return status.to_string();
    }
    let id = body["delivery_id"].as_str().unwrap().to_owned();
    assert_eq!(delivery(gw, &id).await["route"], intent);
    ids.push(id);
    "queued".into()
}

/// Waits until the worker has tried each of `ids` once (so that it takes no
/// scripted answer meant for a later webhook).
async fn tried(gw: &TestGateway, ids: &mut Vec<String>) {
    for id in ids.drain(..) {
        support::wait_until(Duration::from_secs(10), async || {
            let d = delivery(gw, &id).await;
            (!d["attempts"].as_array().unwrap().is_empty()).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("delivery {id} never tried"));
    }
}

#[tokio::test]
async fn on_failure_queue_queues_only_what_the_downstream_did_not_get_or_may_retry() {
    let ds = TestDownstream::start().await;
    let gw = queue_gateway(&ds).await;
    let mut seen = Vec::new();
    let ids = &mut Vec::new();
    // retried by the rule: a 503; with a key, a 500 and a dropped connection
    ds.push(Scripted::status(503));
    seen.push(("503", queued_or_status(&gw, "qn", "a", ids).await));
    tried(&gw, ids).await;
    ds.push(Scripted::status(500));
    seen.push(("500 with key", queued_or_status(&gw, "qk", "b", ids).await));
    tried(&gw, ids).await;
    ds.push(Scripted::dropped());
    seen.push((
        "dropped with key",
        queued_or_status(&gw, "qk", "c", ids).await,
    ));
    tried(&gw, ids).await;
    // without a key the write may have been applied: answered as a sync route
    ds.push(Scripted::status(500));
    seen.push((
        "500 without key",
        queued_or_status(&gw, "qn", "d", ids).await,
    ));
    ds.push(Scripted::dropped());
    seen.push((
        "dropped without key",
        queued_or_status(&gw, "qn", "e", ids).await,
    ));
    // a refusal is the answer
    ds.push(Scripted::status(422).body(r#"{"bad": "field"}"#));
    seen.push(("422", queued_or_status(&gw, "qn", "f", ids).await));
    // the downstream never got it: a connect error, a token endpoint failure, a pause
    seen.push(("connect", queued_or_status(&gw, "qc", "g", ids).await));
    tried(&gw, ids).await;
    ds.push_token(Scripted::status(500).body("{}"));
    seen.push(("token", queued_or_status(&gw, "qt", "h", ids).await));
    tried(&gw, ids).await;
    ds.push(Scripted::status(429));
    seen.push(("429", queued_or_status(&gw, "qn", "i", ids).await));
    seen.push(("paused", queued_or_status(&gw, "qn", "j", ids).await));
    tried(&gw, ids).await;
    let expected = [
        ("503", "queued"),
        ("500 with key", "queued"),
        ("dropped with key", "queued"),
        ("500 without key", "502"),
        ("dropped without key", "502"),
        ("422", "422"),
        ("connect", "queued"),
        ("token", "queued"),
        ("429", "queued"),
        ("paused", "queued"),
    ];
    let seen: Vec<(&str, &str)> = seen.iter().map(|(a, b)| (*a, b.as_str())).collect();
    assert_eq!(seen, expected);
    let stored = admin(&gw, "/admin/deliveries").await;
    assert_eq!(stored["deliveries"].as_array().unwrap().len(), 7);
}

// ---------- stored deliveries are pinned to their origin and auth ----------

/// Async route `p` to `{url}/crm/{{sessionId}}` with `auth` and `body`, keyed
/// by `inputId`, tried every 100 ms for a long while.
fn pinned_route(url: &str, auth: &str, body: &str) -> String {
    format!(
        "  - name: p\n    bot: b\n    intent: p\n    mode: async\n    idempotency_key: \"{{{{inputId}}}}\"\n    downstream: {{ url: \"{url}/crm/{{{{sessionId}}}}\", auth: {auth} }}\n    body: '{body}'\n    retry: {{ schedule: [100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms] }}\n"
    )
}

/// An unrelated sync route, so that the bot keeps a route when `p` goes.
const OTHER: &str = "  - name: other\n    bot: b\n    intent: other\n    downstream: { url: \"http://127.0.0.1:9/x\" }\n";

const BODY_V1: &str = r#"{"inputId": {{json inputId}}}"#;
const BODY_V2: &str = r#"{"input": {{json inputId}}, "v": 2}"#;

/// Replaces the route file and reloads it through the admin API.
async fn reload(gw: &TestGateway, routes: &str) {
    std::fs::write(
        gw.dir.path().join("r.yaml"),
        format!("{BOT}routes:\n{routes}"),
    )
    .unwrap();
    let resp = gw
        .client
        .post(gw.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let report = support::json(resp).await;
    assert_eq!(
        (status.as_u16(), &report["result"]),
        (200, &json!("applied")),
        "{report}"
    );
}

/// Accepts a webhook for route `p`; waits until its first try failed (the
/// delivery is pending, tried again every 100 ms); returns its id.
async fn pending(gw: &TestGateway, input_id: &str) -> String {
    let (status, _, body) = gw.send("b", &input("p", input_id)).await;
    assert_eq!(status, 202, "{body}");
    let id = body["delivery_id"].as_str().unwrap().to_owned();
    support::wait_until(Duration::from_secs(10), async || {
        let d = delivery(gw, &id).await;
        (!d["attempts"].as_array().unwrap().is_empty()).then_some(())
    })
    .await
    .expect("tried once");
    id
}

#[tokio::test]
async fn a_route_removed_while_deliveries_are_pending_makes_them_dead_letters() {
    let (old, new) = (TestDownstream::start().await, TestDownstream::start().await);
    old.set_default(Scripted::status(503));
    let gw = gateway(&format!(
        "{}{OTHER}",
        pinned_route(&old.url(), "{ none: {} }", BODY_V1)
    ))
    .await;
    let first = pending(&gw, "in-1").await;
    let second = pending(&gw, "in-2").await;
    reload(&gw, OTHER).await;
    for id in [&first, &second] {
        let d = until_state(&gw, id, "dead").await;
        assert_eq!(d["last_error"], "route_removed", "{d}");
    }
    let sent = old.requests().len();
    // a replay while the route is still gone: dead again, nothing sent
    gw.replay(&first).await;
    support::wait_until(Duration::from_secs(10), async || {
        let d = delivery(&gw, &first).await;
        (d["state"] == "dead").then_some(())
    })
    .await
    .expect("dead again");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(old.requests().len(), sent, "nothing sent after the removal");

    // the route comes back on another origin: replays (admin, CLI) deliver there
    reload(
        &gw,
        &format!(
            "{}{OTHER}",
            pinned_route(&new.url(), "{ none: {} }", BODY_V2)
        ),
    )
    .await;
    assert!(new.requests().is_empty(), "nothing sent until replay");
    gw.replay(&first).await;
    until_state(&gw, &first, "delivered").await;
    let store = format!("sqlite://{}", gw.dir.path().join("gateway.db").display());
    // (the CLI writes beside the running serve; under a loaded machine SQLite
    // may keep it waiting past its 5 s busy timeout: exit 2, try again)
    let mut out = None;
    for _ in 0..3 {
        let o = crate::support::gateway_cmd()
            .args(["deliveries", "replay", &second, "--store", &store])
            .output()
            .unwrap();
        let locked = String::from_utf8_lossy(&o.stderr).contains("database is locked");
        out = Some(o);
        if !locked {
            break;
        }
    }
    let out = out.unwrap();
    assert!(out.status.success(), "{out:?}");
    until_state(&gw, &second, "delivered").await;
    let mut got: Vec<(String, Value, Option<String>)> = new
        .requests()
        .iter()
        .map(|r| (r.uri.clone(), r.json(), r.header("idempotency-key")))
        .collect();
    got.sort_by(|a, b| a.2.cmp(&b.2));
    assert_eq!(
        got,
        [
            (
                "/crm/s-1".to_owned(),
                json!({"input": "in-1", "v": 2}),
                Some("in-1".to_owned())
            ),
            (
                "/crm/s-1".to_owned(),
                json!({"input": "in-2", "v": 2}),
                Some("in-2".to_owned())
            ),
        ],
        "rendered again from the payload against the current route, same keys"
    );
    assert_eq!(old.requests().len(), sent);
}

#[tokio::test]
async fn a_route_whose_origin_changed_dead_letters_its_pending_deliveries_until_replay() {
    let (old, new) = (TestDownstream::start().await, TestDownstream::start().await);
    old.set_default(Scripted::status(503));
    let gw = gateway(&pinned_route(&old.url(), "{ none: {} }", BODY_V1)).await;
    let id = pending(&gw, "in-1").await;
    reload(&gw, &pinned_route(&new.url(), "{ none: {} }", BODY_V1)).await;
    let d = until_state(&gw, &id, "dead").await;
    assert_eq!(d["last_error"], "route_changed", "{d}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(new.requests().is_empty(), "nothing sent to the new origin");
    // a delivery accepted after the change goes to the new origin
    let (status, _, _) = gw.send("b", &input("p", "in-2")).await;
    assert_eq!(status, 202);
    support::wait_until(Duration::from_secs(10), async || {
        (new.requests().len() == 1).then_some(())
    })
    .await
    .expect("the new delivery is sent");
    gw.replay(&id).await;
    until_state(&gw, &id, "delivered").await;
    let keys: Vec<_> = new
        .requests()
        .iter()
        .map(|r| r.header("idempotency-key"))
        .collect();
    assert_eq!(keys, [Some("in-2".into()), Some("in-1".into())]);
}

#[tokio::test]
async fn an_auth_change_is_route_changed_but_a_rotated_secret_is_not() {
    let ds = TestDownstream::start().await;
    ds.set_default(Scripted::status(503));
    let gw = gateway(&pinned_route(
        &ds.url(),
        "{ bearer: { token: t1 } }",
        BODY_V1,
    ))
    .await;
    let rotated = pending(&gw, "in-1").await;
    // the same auth identity with a new secret: sent with the new secret
    reload(
        &gw,
        &pinned_route(&ds.url(), "{ bearer: { token: t2 } }", BODY_V1),
    )
    .await;
    let before = ds.requests().len();
    ds.set_default(Scripted::status(200));
    until_state(&gw, &rotated, "delivered").await;
    let last = ds.requests().pop().unwrap();
    assert_eq!(last.header("authorization").as_deref(), Some("Bearer t2"));
    assert!(ds.requests().len() > before);
    // another auth (kind or identity): the delivery is not sent with it
    ds.set_default(Scripted::status(503));
    let changed = pending(&gw, "in-2").await;
    reload(
        &gw,
        &pinned_route(
            &ds.url(),
            &format!(
                "{{ oauth2: {{ token_url: \"{}/token\", client_id: c, client_secret: s }} }}",
                ds.url()
            ),
            BODY_V1,
        ),
    )
    .await;
    let d = until_state(&gw, &changed, "dead").await;
    assert_eq!(d["last_error"], "route_changed", "{d}");
    assert!(ds.token_requests().is_empty(), "no token fetched for it");
}

// ---------- the store: fingerprints and replays, on both backends ----------

mod store_level {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use cognigy_gateway::store::{
        AttemptRecord, NewDelivery, Settle, Store, StoreError, StoredRequest,
    };

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn new_delivery() -> NewDelivery {
        NewDelivery {
            bot: "b".into(),
            route: "p".into(),
            payload: r#"{"inputId":"in-1"}"#.into(),
            request: StoredRequest {
                method: "POST".into(),
                url: "https://old.example.com/crm".into(),
                headers: vec![("idempotency-key".into(), "in-1".into())],
                body: Some("{}".into()),
            },
            idempotency_key: Some("in-1".into()),
            fingerprint: Some("fp-old".into()),
        }
    }

    async fn sqlite() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("gateway.db").display());
        (dir, cognigy_gateway::store::open(&url).await.unwrap())
    }

    async fn fingerprints_and_replays(s: Arc<dyn Store>) {
        let lease = Duration::from_secs(60);
        let id = s
            .accept(new_delivery(), None, t(0))
            .await
            .unwrap()
            .id()
            .to_owned();
        let c = s.claim_due("w", t(1), 10, lease).await.unwrap().remove(0);
        assert_eq!(
            (c.delivery.fingerprint.as_deref(), c.delivery.render_again),
            (Some("fp-old"), false)
        );
        s.settle(
            &c.lease,
            Settle::Dead {
                attempt: None,
                reason: Some("route_changed".into()),
            },
            t(2),
        )
        .await
        .unwrap();
        let dead = s.get(&id).await.unwrap().unwrap().delivery;
        assert_eq!(dead.last_error.as_deref(), Some("route_changed"));
        // a replay asks for the request to be rendered again
        s.replay(&id, t(3)).await.unwrap();
        let c = s.claim_due("w", t(4), 10, lease).await.unwrap().remove(0);
        assert!(c.delivery.render_again);
        let rendered = StoredRequest {
            method: "PUT".into(),
            url: "https://new.example.com/crm/v2".into(),
            headers: vec![("x-v".into(), "2".into())],
            body: Some(r#"{"v":2}"#.into()),
        };
        s.set_request(&c.lease, rendered.clone(), "fp-new".into(), t(5))
            .await
            .unwrap();
        let got = s.get(&id).await.unwrap().unwrap().delivery;
        assert_eq!(got.request, rendered);
        assert_eq!(
            (got.fingerprint.as_deref(), got.render_again),
            (Some("fp-new"), false)
        );
        assert_eq!(
            got.idempotency_key.as_deref(),
            Some("in-1"),
            "the key stays"
        );
        // only the current claim may set it
        let ok = AttemptRecord {
            at: t(6),
            status: Some(200),
            latency: Duration::from_millis(5),
            error: None,
        };
        s.settle(&c.lease, Settle::Delivered(ok), t(6))
            .await
            .unwrap();
        let e = s
            .set_request(&c.lease, rendered, "fp-x".into(), t(7))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::LeaseLost { .. }), "{e:?}");
        // every dead letter replayed at once is rendered again too
        let id2 = s
            .accept(new_delivery(), None, t(8))
            .await
            .unwrap()
            .id()
            .to_owned();
        let c = s.claim_due("w", t(9), 10, lease).await.unwrap().remove(0);
        assert_eq!(c.delivery.id, id2);
        s.settle(
            &c.lease,
            Settle::Dead {
                attempt: None,
                reason: Some("route_removed".into()),
            },
            t(10),
        )
        .await
        .unwrap();
        assert_eq!(s.replay_dead(t(11)).await.unwrap(), 1);
        let c = s.claim_due("w", t(12), 10, lease).await.unwrap().remove(0);
        assert!(c.delivery.render_again);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_keeps_fingerprints_and_renders_replays_again() {
        let (_dir, s) = sqlite().await;
        fingerprints_and_replays(s).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_keeps_fingerprints_and_renders_replays_again() {
        let url = super::support::pg::url().await;
        let s = cognigy_gateway::store::open(&url).await.unwrap();
        fingerprints_and_replays(s).await;
    }
}

// ---------- a store written by schema version 2 ----------

/// `tests/fixtures/store/v2.db` (see the README beside it), served by this
/// binary: migrated to version 3; its deliveries, which have no fingerprint,
/// are sent when their stored URL's origin is still their route's, and are
/// dead letters `route_changed` when it is not, until a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_store_is_migrated_and_its_deliveries_keep_to_their_origin() {
    let (ds, moved) = (TestDownstream::start().await, TestDownstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store/v2.db"),
        &db,
    )
    .unwrap();
    let store = format!("sqlite://{}", db.display());
    let raw = sqlx::SqlitePool::connect(&store).await.unwrap();
    sqlx::query("UPDATE deliveries SET url = replace(url, 'http://downstream.invalid', ?1)")
        .bind(ds.url())
        .execute(&raw)
        .await
        .unwrap();
    raw.close().await;
    let route = |name: &str, intent: &str, url: &str| {
        format!(
            "  - name: {name}\n    bot: support-bot\n    intent: {intent}\n    mode: async\n    idempotency_key: \"{{{{inputId}}}}\"\n    downstream: {{ url: \"{url}/crm/new\" }}\n    body: '{{\"again\": {{{{json inputId}}}}}}'\n"
        )
    };
    let routes = dir.path().join("routes");
    std::fs::create_dir_all(&routes).unwrap();
    std::fs::write(
        routes.join("r.yaml"),
        format!(
            "bots:\n  - id: support-bot\n    auth: {{ api_key: {{ keys: [\"k\"] }} }}\nroutes:\n{}{}",
            route("crm-upsert", "update", &ds.url()),
            route("crm-notes", "note", &moved.url())
        ),
    )
    .unwrap();
    // a long retention and window keep the 2023 rows
    let p = support::process::serve(
        &routes,
        &store,
        &["--dead-retention", "36500d", "--dedupe-window", "36500d"],
        &[],
    );
    let client = crate::support::client();
    let admin = async |path: &str| -> Value {
        let url = format!("http://{}{path}", p.admin);
        support::json(client.get(url).send().await.unwrap()).await
    };
    // (the list and the counts of /admin/deliveries are two reads: look at the rows)
    let settled = support::wait_until(Duration::from_secs(10), async || {
        let d = admin("/admin/deliveries").await;
        let rows = d["deliveries"].as_array()?;
        let busy = rows
            .iter()
            .any(|r| r["state"] == "pending" || r["state"] == "leased");
        (rows.len() == 7 && !busy).then_some(d)
    })
    .await
    .expect("settled");
    let by_suffix = |suffix: &str| -> Value {
        settled["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"].as_str().unwrap().ends_with(suffix))
            .unwrap_or_else(|| panic!("{suffix} kept: {settled}"))
            .clone()
    };
    // crm-upsert kept its origin: its pending deliveries are sent as stored
    for suffix in ["96f8", "1152"] {
        assert_eq!(by_suffix(suffix)["state"], "delivered", "{settled}");
    }
    let mut sent: Vec<(String, Option<String>)> = ds
        .requests()
        .iter()
        .map(|r| (r.uri.clone(), r.header("idempotency-key")))
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        [
            ("/crm/3".to_owned(), Some("in-retry".to_owned())),
            ("/crm/5".to_owned(), Some("in-pending".to_owned())),
        ]
    );
    // crm-notes moved: its deliveries (the one a killed process held included) are dead letters
    for suffix in ["0b1a", "a2e6", "0b5c"] {
        let d = by_suffix(suffix);
        assert_eq!(
            (&d["state"], &d["last_error"]),
            (&json!("dead"), &json!("route_changed"))
        );
    }
    assert!(
        moved.requests().is_empty(),
        "nothing sent to the new origin"
    );
    // keys are still per (bot, route): a duplicate gets the first delivery's id
    let resp = client
        .post(format!("http://{}/webhooks/support-bot", p.listen))
        .header("x-api-key", "k")
        .body(r#"{"intent": "update", "inputId": "in-pending"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let first = support::json(resp).await;
    assert_eq!(first["delivery_id"], by_suffix("1152")["id"]);
    // a replay renders a moved delivery for the route as it is now
    let id = by_suffix("a2e6")["id"].as_str().unwrap().to_owned();
    let resp = client
        .post(format!("http://{}/admin/deliveries/{id}/replay", p.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = support::wait_until(Duration::from_secs(10), async || moved.requests().pop())
        .await
        .expect("sent after the replay");
    assert_eq!(got.uri, "/crm/new");
    assert_eq!(got.json(), json!({"again": null}));
    assert_eq!(
        got.header("idempotency-key"),
        Some(id),
        "no key: the delivery id"
    );
    drop(p);
    let raw = sqlx::SqlitePool::connect(&store).await.unwrap();
    let version: i64 = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
        .fetch_one(&raw)
        .await
        .unwrap();
    assert_eq!(version, cognigy_gateway::store::sqlite::SCHEMA_VERSION);
    assert!(version >= 3, "v3 (the route fingerprint) applied");
}
