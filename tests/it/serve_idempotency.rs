//! SPEC §5 step 7 on sync routes: a duplicate idempotency key within the
//! window gets the first answer again and nothing is sent twice. A real
//! gateway (real SQLite store) in front of a real local downstream.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{PAYLOAD_SCHEMA, Scripted, TestDownstream, TestGateway, bot_file, wait_until};

/// Bots `b` and `c`, each with a sync route keyed by `inputId`; `extra` goes
/// into route `b`'s block.
async fn gateway(ds: &TestDownstream, extra: &str) -> TestGateway {
    let route = |bot: &str, extra: &str| {
        format!(
            "  - name: r-{bot}\n    bot: {bot}\n    intent: \"*\"\n    idempotency_key: \"{{{{inputId}}}}\"\n    downstream: {{ url: \"{}/crm\", timeout: 2s }}\n    retry: {{ attempts: 2, backoff: {{ initial: 1ms, max: 1ms }} }}\n{extra}",
            ds.url()
        )
    };
    TestGateway::builder()
        .file("b.yaml", &bot_file("b"))
        .file("c.yaml", &bot_file("c"))
        .file("schemas/payload.json", PAYLOAD_SCHEMA)
        .file(
            "routes.yaml",
            &format!("routes:\n{}{}", route("b", extra), route("c", "")),
        )
        .start()
        .await
}

fn payload(input: &str) -> Value {
    json!({"sessionId": "s-1", "inputId": input, "intent": "update"})
}

#[tokio::test]
async fn a_duplicate_gets_the_first_answer_and_nothing_is_sent_twice() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    ds.push(Scripted::status(201).body(r#"{"id": "crm-7"}"#));
    let (s1, h1, b1) = gw.send("b", &payload("in-1")).await;
    assert_eq!((s1, &b1), (201, &json!({"id": "crm-7"})));
    assert!(!h1.contains_key("idempotent-replayed"));
    // the downstream would now answer differently: the duplicate must not reach it
    ds.push(Scripted::status(200).body(r#"{"id": "crm-8"}"#));
    let (s2, h2, b2) = gw.send("b", &payload("in-1")).await;
    assert_eq!((s2, b2), (s1, b1));
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(ds.requests().len(), 1);
    // another key is another request
    let (s3, _, b3) = gw.send("b", &payload("in-2")).await;
    assert_eq!((s3, b3), (200, json!({"id": "crm-8"})));
    assert_eq!(ds.requests().len(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn a_refusal_is_final_and_replayed_too() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    ds.push(Scripted::status(404).body(r#"{"missing": "contact"}"#));
    let first = gw.send("b", &payload("in-1")).await;
    let again = gw.send("b", &payload("in-1")).await;
    assert_eq!((first.0, &first.2), (404, &json!({"missing": "contact"})));
    assert_eq!((again.0, again.2), (first.0, first.2));
    assert_eq!(ds.requests().len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn keys_are_per_bot() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    assert_eq!(gw.send("b", &payload("same")).await.0, 200);
    let (status, headers, _) = gw.send("c", &payload("same")).await;
    assert_eq!(status, 200);
    assert!(!headers.contains_key("idempotent-replayed"));
    assert_eq!(ds.requests().len(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn a_duplicate_while_the_first_is_under_way_is_409_and_not_sent() {
    let ds = TestDownstream::start().await;
    let gw = std::sync::Arc::new(gateway(&ds, "").await);
    ds.hold(); // the first request stays under way until released
    let first = tokio::spawn({
        let gw = gw.clone();
        async move { gw.send("b", &payload("in-1")).await }
    });
    // the first request has reached the downstream (and holds the key)
    wait_until(Duration::from_secs(10), async || !ds.requests().is_empty())
        .await
        .expect("the first request reaches the downstream");
    let (status, headers, body) = gw.send("b", &payload("in-1")).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"], "in_progress");
    assert_eq!(headers["retry-after"], "1");
    ds.release();
    assert_eq!(first.await.unwrap().0, 200);
    // once answered, the duplicate gets that answer
    let (status, headers, _) = gw.send("b", &payload("in-1")).await;
    assert_eq!(
        (status, &headers["idempotent-replayed"]),
        (200, &"true".parse().unwrap())
    );
    assert_eq!(ds.requests().len(), 1);
}

#[tokio::test]
async fn a_failed_call_releases_the_key_so_a_retry_is_real() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    ds.push(Scripted::status(503));
    ds.push(Scripted::status(503));
    let (status, _, body) = gw.send("b", &payload("in-1")).await;
    assert_eq!((status, body["error"].as_str()), (502, Some("downstream")));
    // the bot retries: this time it goes through, with the same key downstream
    let (status, headers, _) = gw.send("b", &payload("in-1")).await;
    assert_eq!(status, 200);
    assert!(!headers.contains_key("idempotent-replayed"));
    let reqs = ds.requests();
    assert_eq!(reqs.len(), 3);
    assert!(
        reqs.iter()
            .all(|r| r.header("idempotency-key").as_deref() == Some("in-1"))
    );
    // and now it is final
    assert_eq!(gw.send("b", &payload("in-1")).await.0, 200);
    assert_eq!(ds.requests().len(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn a_queued_call_answers_its_duplicate_with_the_same_delivery() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "    on_failure: queue\n").await;
    ds.push(Scripted::status(503));
    ds.push(Scripted::status(503));
    let (status, _, first) = gw.send("b", &payload("in-1")).await;
    assert_eq!(status, 202);
    assert!(first["delivery_id"].is_string());
    let (status, headers, again) = gw.send("b", &payload("in-1")).await;
    assert_eq!((status, again), (202, first));
    assert_eq!(headers["idempotent-replayed"], "true");
    gw.stop().await;
}
