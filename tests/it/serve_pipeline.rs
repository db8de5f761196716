//! The sync pipeline end to end (SPEC §5 steps 1–6, 9–10): a real gateway on
//! 127.0.0.1:0 in front of a real local downstream.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    self, PAYLOAD_SCHEMA, Scripted, TestDownstream, TestGateway, bot_file, wait_until,
};

fn route(ds: &TestDownstream, extra: &str) -> String {
    format!(
        r#"routes:
  - name: upsert
    bot: b
    intent: update
    idempotency_key: "{{{{sessionId}}}}/{{{{slots.id}}}}"
    downstream:
      method: PUT
      url: "{url}/contacts/{{{{slots.id}}}}?src={{{{bot}}}}"
      timeout: 2s
      headers: {{ X-Session: "{{{{sessionId}}}}" }}
      success: [2xx, 409]
    body: '{{"id": "{{{{slots.id}}}}", "note": {{{{json slots.note}}}}}}'
    retry: {{ attempts: 3, backoff: {{ initial: 10ms, max: 20ms }} }}
{extra}
  - name: dflt
    bot: b
    intent: "*"
    downstream: {{ url: "{url}/default" }}
    body: '{{"intent": {{{{json intent}}}}}}'
"#,
        url = ds.url()
    )
}

/// A gateway with bot `b` (api_key, the payload schema) and the given route file.
fn builder(routes: &str) -> support::GatewayBuilder {
    TestGateway::builder()
        .file("bots.yaml", &bot_file("b"))
        .file("schemas/payload.json", PAYLOAD_SCHEMA)
        .file("routes.yaml", routes)
}

async fn gateway(ds: &TestDownstream, extra: &str) -> TestGateway {
    builder(&route(ds, extra)).start().await
}

fn payload(id: &str) -> Value {
    json!({"sessionId": "s-1", "intent": "update", "slots": {"id": id, "note": "a \"quoted\" note"}})
}

#[tokio::test]
async fn delivered_request_is_what_the_route_renders() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    let (status, headers, body) = gw.send("b", &payload("C-1")).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"id": "crm-1"}));
    assert!(headers.contains_key("x-request-id"));
    let reqs = ds.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "PUT");
    assert_eq!(r.uri, "/contacts/C-1?src=b");
    assert_eq!(r.header("idempotency-key").as_deref(), Some("s-1/C-1"));
    assert_eq!(r.header("x-session").as_deref(), Some("s-1"));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.json(), json!({"id": "C-1", "note": "a \"quoted\" note"}));
    gw.stop().await;
}

#[tokio::test]
async fn request_id_is_taken_from_the_request_or_made() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    let resp = gw
        .post(
            "b",
            &[("x-api-key", "test-key"), ("x-request-id", "abc-123")],
            payload("C-1").to_string(),
        )
        .await;
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    let resp = gw.post("nope", &[], "{}").await;
    assert!(!resp.headers()["x-request-id"].is_empty());
}

#[tokio::test]
async fn step1_unknown_bot_is_404() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    let resp = gw
        .post(
            "nobody",
            &[("x-api-key", "test-key")],
            payload("C-1").to_string(),
        )
        .await;
    assert_eq!(resp.status(), 404);
    let b: Value = support::json(resp).await;
    assert_eq!(b["error"], "unknown_bot");
    assert!(ds.requests().is_empty());
}

#[tokio::test]
async fn step2_body_over_the_limit_is_413_before_auth() {
    let ds = TestDownstream::start().await;
    let gw = builder(&route(&ds, ""))
        .limits(cognigy_gateway::runtime::Limits {
            max_body: 1000,
            ..Default::default()
        })
        .start()
        .await;
    let big = json!({"sessionId": "x".repeat(2000)}).to_string();
    // no credentials: the limit is checked first (SPEC §5 order)
    let resp = gw.post("b", &[], big.clone()).await;
    assert_eq!(resp.status(), 413);
    assert_eq!(support::json(resp).await["error"], "body_too_large");
    // chunked (no Content-Length) is limited too
    let mut raw = b"POST /webhooks/b HTTP/1.1\r\nHost: x\r\nX-API-Key: test-key\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for chunk in big.as_bytes().chunks(100) {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(support::raw_request(gw.addr, &raw).await, 413);
    assert!(ds.requests().is_empty());
}

#[tokio::test]
async fn step3_auth_failures_are_401_and_say_nothing_of_the_secret() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    for headers in [
        vec![],
        vec![("x-api-key", "wrong")],
        vec![("x-api-key", "")],
        vec![("x-api-key", "test-ke")],
    ] {
        let resp = gw.post("b", &headers, payload("C-1").to_string()).await;
        assert_eq!(resp.status(), 401, "{headers:?}");
        let text = resp.text().await.unwrap();
        assert!(
            !text.contains("test-key") && !text.contains("rotated"),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap()["error"],
            "unauthorized"
        );
    }
    // the rotated key works
    let resp = gw
        .post(
            "b",
            &[("x-api-key", "rotated-key")],
            payload("C-1").to_string(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(ds.requests().len(), 1);
}

#[tokio::test]
async fn step4_not_json_or_too_deep_is_400() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    let resp = gw
        .post("b", &[("x-api-key", "test-key")], "{not json")
        .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(support::json(resp).await["error"], "invalid_json");
    let deep = format!(
        "{{\"sessionId\": \"s\", \"d\": {}{}}}",
        "[".repeat(70),
        "]".repeat(70)
    );
    let resp = gw.post("b", &[("x-api-key", "test-key")], deep).await;
    assert_eq!(resp.status(), 400);
    assert!(
        support::json(resp).await["message"]
            .as_str()
            .unwrap()
            .contains("deeper than 64")
    );
    assert!(ds.requests().is_empty());
}

#[tokio::test]
async fn step5_schema_violations_are_422_with_pointers() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    let (status, _, body) = gw.send("b", &json!({"sessionId": 5, "slots": []})).await;
    assert_eq!(status, 422);
    assert_eq!(body["error"], "schema");
    let paths: Vec<&str> = body["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains(&"/sessionId") && paths.contains(&"/slots"),
        "{body}"
    );
    assert!(ds.requests().is_empty());
}

#[tokio::test]
async fn step6_intent_routing_default_route_and_no_route() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    // unknown, null and absent intents go to the default route
    for p in [
        json!({"sessionId": "s", "intent": "other"}),
        json!({"sessionId": "s", "intent": null}),
        json!({"sessionId": "s"}),
    ] {
        let (status, _, _) = gw.send("b", &p).await;
        assert_eq!(status, 200);
    }
    let uris: Vec<String> = ds.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(uris, ["/default", "/default", "/default"]);
    assert_eq!(ds.requests()[1].json(), json!({"intent": null}));

    // a bot without a default route: 422 no_route
    let gw2 = builder(&format!("routes:\n  - name: only\n    bot: b\n    intent: x\n    min_score: 0.5\n    downstream: {{ url: \"{}/x\" }}\n", ds.url()))
        .start()
        .await;
    let (status, _, body) = gw2
        .send("b", &json!({"sessionId": "s", "intent": "y"}))
        .await;
    assert_eq!(
        (status, body["error"].as_str(), body["intent"].as_str()),
        (422, Some("no_route"), Some("y"))
    );
    // min_score: numeric string below the threshold → no route (no default)
    let (status, _, _) = gw2
        .send(
            "b",
            &json!({"sessionId": "s", "intent": "x", "intentScore": "0.4"}),
        )
        .await;
    assert_eq!(status, 422);
    let (status, _, _) = gw2
        .send(
            "b",
            &json!({"sessionId": "s", "intent": "x", "intentScore": "0.9"}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn step10_success_set_and_passed_through_refusals() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    ds.push(Scripted::status(409).body(r#"{"conflict": true}"#));
    let (status, _, body) = gw.send("b", &payload("C-1")).await;
    assert_eq!((status, body), (409, json!({"conflict": true})));
    ds.push(Scripted::status(404).body(r#"{"missing": "contact"}"#));
    let (status, _, body) = gw.send("b", &payload("C-2")).await;
    assert_eq!((status, body), (404, json!({"missing": "contact"})));
    ds.push(Scripted::status(400).body("plain text"));
    let (status, _, body) = gw.send("b", &payload("C-3")).await;
    assert_eq!((status, body), (400, json!({"body": "plain text"})));
    // 4xx are not retried
    assert_eq!(ds.requests().len(), 3);
}

#[tokio::test]
async fn step10_retries_then_502_with_the_last_status() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    ds.set_default(Scripted::status(503));
    let (status, _, body) = gw.send("b", &payload("C-1")).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"], "downstream");
    assert_eq!(body["status"], 503);
    let reqs = ds.requests();
    assert_eq!(reqs.len(), 3, "attempts: 3");
    // every try carries the same idempotency key
    assert!(
        reqs.iter()
            .all(|r| r.header("idempotency-key").as_deref() == Some("s-1/C-1"))
    );
}

#[tokio::test]
async fn step10_500_is_not_retried() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    ds.set_default(Scripted::status(500));
    // (the default route has no idempotency key: with one, a 500 is retried, SPEC §7.3)
    let unkeyed = json!({"sessionId": "s-1", "intent": "other"});
    let (status, _, body) = gw.send("b", &unkeyed).await;
    assert_eq!((status, body["status"].as_u64()), (502, Some(500)));
    assert_eq!(ds.requests().len(), 1);
}

#[tokio::test]
async fn step10_recovers_after_a_dropped_connection_and_a_503() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    ds.push(Scripted::status(503));
    ds.push(Scripted::status(502));
    let (status, _, _) = gw.send("b", &payload("C-1")).await;
    assert_eq!(status, 200);
    assert_eq!(ds.requests().len(), 3);
    // a connection dropped mid-request is not retried without an idempotency
    // key (the CRM may have acted on it; SPEC §7.3): the default route has none
    ds.push(Scripted::dropped());
    let unkeyed = json!({"sessionId": "s-1", "intent": "other"});
    let (status, _, body) = gw.send("b", &unkeyed).await;
    assert_eq!((status, body["reason"].as_str()), (502, Some("broken")));
    assert_eq!(ds.requests().len(), 4);
}

#[tokio::test]
async fn step10_connect_error_is_502_after_retries() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let gw = builder(&format!("routes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    downstream: {{ url: \"http://127.0.0.1:{port}/x\" }}\n    retry: {{ attempts: 2, backoff: {{ initial: 1ms, max: 1ms }} }}\n"))
        .start()
        .await;
    let (status, _, body) = gw.send("b", &json!({"sessionId": "s"})).await;
    assert_eq!(
        (status, body["error"].as_str(), body["reason"].as_str()),
        (502, Some("downstream"), Some("connect"))
    );
}

#[tokio::test]
async fn step10_deadline_exhaustion_is_504() {
    let ds = TestDownstream::start().await;
    let gw = builder(&format!("routes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    deadline: 300ms\n    downstream: {{ url: \"{}/slow\", timeout: 5s }}\n", ds.url()))
        .start()
        .await;
    ds.set_default(Scripted::status(200).delay(Duration::from_secs(3)));
    let started = std::time::Instant::now();
    let (status, _, body) = gw.send("b", &json!({"sessionId": "s"})).await;
    assert_eq!((status, body["error"].as_str()), (504, Some("deadline")));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered within the deadline, not the downstream's delay"
    );
}

#[tokio::test]
async fn step10_per_try_timeout_is_502_and_retried() {
    let ds = TestDownstream::start().await;
    let gw = builder(&format!("routes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    deadline: 5s\n    downstream: {{ url: \"{}/slow\", timeout: 100ms }}\n    retry: {{ attempts: 2, backoff: {{ initial: 1ms, max: 1ms }} }}\n", ds.url()))
        .start()
        .await;
    ds.set_default(Scripted::status(200).delay(Duration::from_secs(2)));
    let (status, _, body) = gw.send("b", &json!({"sessionId": "s"})).await;
    assert_eq!((status, body["reason"].as_str()), (502, Some("timeout")));
    assert_eq!(ds.requests().len(), 2);
}

#[tokio::test]
async fn step9_429_pauses_the_route_with_retry_after() {
    let ds = TestDownstream::start().await;
    let gw = gateway(
        &ds,
        "    fallback: { status: 200, body: '{\"later\": {{json retry_after}}}' }",
    )
    .await;
    // 429 with Retry-After 30 → tries stop (30s > remaining deadline), the route pauses
    ds.push(Scripted::status(429).header("retry-after", "30"));
    let resp = gw
        .post(
            "b",
            &[("x-api-key", "test-key")],
            payload("C-1").to_string(),
        )
        .await;
    assert_eq!(resp.status(), 200, "fallback answers while paused");
    let ra: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((28..=30).contains(&ra), "retry-after {ra}");
    let body: Value = support::json(resp).await;
    assert!(body["later"].as_u64().is_some());
    // the next call is not sent at all while paused
    let (status, headers, _) = gw.send("b", &payload("C-1")).await;
    assert_eq!(status, 200);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(ds.requests().len(), 1);
}

#[tokio::test]
async fn step9_bulkhead_full_is_503_at_once() {
    let ds = TestDownstream::start().await;
    let gw = builder(&format!("routes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    downstream: {{ url: \"{}/slow\", max_in_flight: 1 }}\n", ds.url()))
        .start()
        .await;
    ds.hold(); // the first call holds the only slot until released
    let gw = std::sync::Arc::new(gw);
    let g2 = gw.clone();
    let first = tokio::spawn(async move { g2.send("b", &json!({"sessionId": "s"})).await.0 });
    // wait until the first call reached the downstream
    wait_until(Duration::from_secs(10), async || !ds.requests().is_empty())
        .await
        .expect("the first call reaches the downstream");
    let (status, headers, body) = gw.send("b", &json!({"sessionId": "s"})).await;
    assert_eq!(
        (status, body["error"].as_str(), body["reason"].as_str()),
        (503, Some("unavailable"), Some("max_in_flight"))
    );
    assert_eq!(headers["retry-after"], "1");
    ds.release();
    assert_eq!(first.await.unwrap(), 200);
}

#[tokio::test]
async fn response_template_reads_downstream_and_request() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "    response: { status: 201, body: '{\"crmId\": {{json downstream.body.id}}, \"session\": \"{{request.sessionId}}\", \"st\": {{json downstream.status}}}' }").await;
    let (status, _, body) = gw.send("b", &payload("C-1")).await;
    assert_eq!(
        (status, body),
        (201, json!({"crmId": "crm-1", "session": "s-1", "st": 200}))
    );
}

#[tokio::test]
async fn url_values_stay_one_segment() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    for (id, expect) in [
        ("ORD-88/19", "/contacts/ORD-88%2F19?src=b"),
        ("%2F", "/contacts/%252F?src=b"),
        ("@evil.example", "/contacts/%40evil.example?src=b"),
        ("x?admin=1", "/contacts/x%3Fadmin%3D1?src=b"),
        ("x#frag", "/contacts/x%23frag?src=b"),
    ] {
        let (status, _, _) = gw.send("b", &payload(id)).await;
        assert_eq!(status, 200, "{id}");
        assert_eq!(ds.requests().last().unwrap().uri, expect, "{id}");
    }
}

#[tokio::test]
async fn dot_segments_are_refused_not_normalized() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    // `../admin` too: servers that decode %2F before routing would climb up (SPEC §7.2)
    for id in ["..", ".", "%2e%2e", "../admin", "a\\..\\b", ""] {
        let (status, _, body) = gw.send("b", &payload(id)).await;
        if id == "%2e%2e" {
            // `%` is encoded, so this stays a harmless literal segment
            assert_eq!(status, 200);
            assert_eq!(
                ds.requests().last().unwrap().uri,
                "/contacts/%252e%252e?src=b"
            );
        } else {
            assert_eq!(
                (status, body["error"].as_str()),
                (422, Some("render")),
                "{id}: {body}"
            );
        }
    }
    assert_eq!(ds.requests().len(), 1);
}

#[tokio::test]
async fn crlf_in_a_rendered_header_is_refused_and_nothing_is_sent() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    let mut p = payload("C-1");
    p["sessionId"] = json!("s\r\nX-Injected: 1");
    let (status, _, body) = gw.send("b", &p).await;
    assert_eq!(
        (status, body["error"].as_str(), body["route"].as_str()),
        (422, Some("render"), Some("upsert"))
    );
    assert!(body["message"].as_str().unwrap().contains("CR, LF or NUL"));
    assert!(ds.requests().is_empty());
}

#[tokio::test]
async fn a_body_that_does_not_render_to_json_is_refused() {
    let ds = TestDownstream::start().await;
    let gw = builder(&format!("routes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    downstream: {{ url: \"{}/x\" }}\n    body: '{{\"n\": {{{{#if flag}}}}{{{{json sessionId}}}}{{{{/if}}}}}}'\n", ds.url()))
        .start()
        .await;
    // (a body that passes validate's shape check: `flag` is absent, so `"n": }` renders)
    let (status, _, body) = gw.send("b", &json!({"sessionId": "s"})).await;
    assert_eq!(status, 422);
    assert!(
        body["message"].as_str().unwrap().contains("route `r`"),
        "{body}"
    );
    assert!(ds.requests().is_empty());
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    ds.push(
        Scripted::status(302)
            .header("location", "/elsewhere")
            .body("{}"),
    );
    let (status, _, _) = gw.send("b", &payload("C-1")).await;
    assert_eq!(
        status, 302,
        "the redirect is the downstream's answer, passed on"
    );
    assert_eq!(ds.requests().len(), 1, "the Location was not requested");
}

#[tokio::test]
async fn downstream_bodies_are_capped() {
    let ds = TestDownstream::start().await;
    let gw = builder(&route(&ds, ""))
        .limits(cognigy_gateway::runtime::Limits {
            max_response: 64,
            ..Default::default()
        })
        .start()
        .await;
    ds.push(Scripted::status(200).body(&format!("{{\"big\": \"{}\"}}", "x".repeat(10_000))));
    let resp = gw
        .post(
            "b",
            &[("x-api-key", "test-key")],
            payload("C-1").to_string(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    // the first 64 bytes are not JSON any more, so they are wrapped as text
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["body"].as_str().unwrap().len(), 64);
}

#[tokio::test]
async fn retry_after_on_503_is_honoured_between_tries() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "").await;
    ds.push(Scripted::status(503).header("retry-after", "1"));
    let started = std::time::Instant::now();
    let (status, _, _) = gw.send("b", &payload("C-1")).await;
    assert_eq!(status, 200);
    assert_eq!(ds.requests().len(), 2);
    // the backoff alone would be ≤ 20ms; Retry-After asked for 1s
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
}
