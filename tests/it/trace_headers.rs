//! `x-request-id` and W3C `traceparent` on every downstream try (SPEC §8),
//! with the real binary: taken from the inbound request, else started; a new
//! span id per try, sync retries and async delivery tries alike; the trace
//! id in the webhook log line.

use std::time::Duration;

use crate::support::process::serve;
use crate::support::{self, Recorded, Scripted, TestDownstream, wait_until};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const INBOUND: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// (trace id, span id, flags) of a `traceparent` a try carried.
fn parts(r: &Recorded) -> (String, String, String) {
    let tp = r.header("traceparent").expect("a traceparent");
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!(p[0], "00");
    assert_eq!((p[1].len(), p[2].len(), p[3].len()), (32, 16, 2), "{tp}");
    (p[1].into(), p[2].into(), p[3].into())
}

fn routes(url: &str) -> String {
    format!(
        r#"bots:
  - id: b
    auth: {{ api_key: {{ keys: ["k"] }} }}
routes:
  - name: sync
    bot: b
    intent: sync
    idempotency_key: "{{{{inputId}}}}"
    downstream: {{ url: "{url}/sync" }}
    retry: {{ attempts: 3, backoff: {{ initial: 10ms, max: 20ms }} }}
  - name: queued
    bot: b
    intent: queued
    mode: async
    downstream: {{ url: "{url}/async" }}
    retry: {{ schedule: [100ms, 100ms] }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_try_carries_the_request_id_and_a_new_span_of_the_trace() {
    let ds = TestDownstream::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("routes");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("r.yaml"), routes(&ds.url())).unwrap();
    let store = format!("sqlite://{}", tmp.path().join("gw.db").display());
    let log = "warn,cognigy_gateway::server=info,cognigy_gateway::http::webhook=info";
    let gw = serve(&dir, &store, &[], &[("GATEWAY_LOG", log)]);
    let client = support::client();
    let url = format!("http://{}/webhooks/b", gw.listen);

    // 1. Sync, with an inbound trace and request id: two tries (503, then 200).
    ds.push(Scripted::status(503));
    let r = client
        .post(&url)
        .header("x-api-key", "k")
        .header("x-request-id", "req-from-cognigy-1")
        .header("traceparent", INBOUND)
        .header("tracestate", "cognigy=abc")
        .body(r#"{"sessionId":"s","intent":"sync","inputId":"i-1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tries: Vec<Recorded> = ds
        .requests()
        .into_iter()
        .filter(|r| r.uri == "/sync")
        .collect();
    assert_eq!(tries.len(), 2);
    let mut spans = vec!["00f067aa0ba902b7".to_string()];
    for t in &tries {
        assert_eq!(
            t.header("x-request-id").as_deref(),
            Some("req-from-cognigy-1")
        );
        assert_eq!(t.header("tracestate").as_deref(), Some("cognigy=abc"));
        let (trace, span, flags) = parts(t);
        assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
        assert!(!spans.contains(&span), "a new span id per try: {span}");
        spans.push(span);
    }

    // 2. Sync, nothing inbound: the gateway's request id (also on the answer)
    //    and a trace it starts, logged on the webhook line.
    let r = client
        .post(&url)
        .header("x-api-key", "k")
        .body(r#"{"sessionId":"s","intent":"sync","inputId":"i-2"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answered_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let t = ds
        .requests()
        .into_iter()
        .rfind(|r| r.uri == "/sync")
        .unwrap();
    assert_eq!(t.header("x-request-id"), Some(answered_id.clone()));
    assert!(t.header("tracestate").is_none());
    let (started, _, flags) = parts(&t);
    assert_ne!(started, TRACE);
    assert_eq!(flags, "01");

    // 3. Async: every delivery try keeps the inbound request id and trace.
    ds.push(Scripted::status(503));
    let r = client
        .post(&url)
        .header("x-api-key", "k")
        .header("x-request-id", "req-async-7")
        .header("traceparent", INBOUND)
        .body(r#"{"sessionId":"s","intent":"queued"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let tries = wait_until(Duration::from_secs(20), async || {
        let t: Vec<Recorded> = ds
            .requests()
            .into_iter()
            .filter(|r| r.uri == "/async")
            .collect();
        (t.len() >= 2).then_some(t)
    })
    .await
    .expect("a failed try, then a delivered one");
    let mut spans = Vec::new();
    for t in &tries {
        assert_eq!(t.header("x-request-id").as_deref(), Some("req-async-7"));
        let (trace, span, _) = parts(t);
        assert_eq!(trace, TRACE);
        assert!(!spans.contains(&span), "a new span id per delivery try");
        spans.push(span);
    }

    // The webhook lines carry the trace ids.
    let (status, lines) = gw.stop("-TERM").await;
    assert!(status.success());
    let webhook_lines: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "webhook")
        .collect();
    let trace_of = |id: &str| {
        webhook_lines
            .iter()
            .find(|v| v["request_id"] == id)
            .unwrap_or_else(|| panic!("a webhook line for {id}: {webhook_lines:?}"))["trace_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(trace_of("req-from-cognigy-1"), TRACE);
    assert_eq!(trace_of(&answered_id), started);
    assert_eq!(trace_of("req-async-7"), TRACE);
}
