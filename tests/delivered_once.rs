//! SPEC §7.3, "acknowledged means delivered, once", end to end with the
//! production server (`TestGateway`), a real SQLite store and a real local
//! downstream: the retry rule (a 500 or a dropped connection is retried only
//! with an idempotency key; every async try carries one), the 429 pause, the
//! sync deadline counted from arrival with OAuth2 bounded, `on_failure:
//! queue`, and stored deliveries pinned to the origin and auth they were
//! accepted for. Waits are bounded polls.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Scripted, TestDownstream, TestGateway};

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
    support::poll_until(Duration::from_secs(10), async || {
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
        support::poll_until(Duration::from_secs(10), async || {
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
