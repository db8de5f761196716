//! Outbound rate limits (SPEC §9): `downstream.rate_limit` is a token bucket
//! per downstream. Async deliveries are postponed without using a try; a sync
//! call waits for a token while its deadline allows, else answers as step 9
//! with `reason: rate_limited`.

use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::support::{self, TestDownstream, TestGateway, wait_until};

fn routes(url: &str, mode: &str, deadline: &str, rate: &str) -> String {
    format!(
        r#"bots:
  - id: b
    auth: {{ api_key: {{ keys: ["test-key"] }} }}
routes:
  - name: r
    bot: b
    intent: "*"
    mode: {mode}
    deadline: {deadline}
    idempotency_key: "{{{{inputId}}}}"
    downstream: {{ url: "{url}/crm", rate_limit: {rate} }}
    body: '{{"inputId": {{{{json inputId}}}}}}'
    retry: {{ attempts: 1, schedule: [1s] }}
"#
    )
}

/// No window of the arrival times holds more than `burst + per_second * span` requests.
fn assert_within_rate(times: &[SystemTime], per_second: f64, burst: f64) {
    let mut t: Vec<f64> = times
        .iter()
        .map(|t| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    for i in 0..t.len() {
        for j in i..t.len() {
            let n = (j - i + 1) as f64;
            let allowed = burst + per_second * (t[j] - t[i]) + 1.0; // +1: clock rounding
            assert!(
                n <= allowed,
                "{n} requests in {:.3}s (allowed {allowed:.1})",
                t[j] - t[i]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_deliveries_reach_the_downstream_at_the_rate_with_no_try_used() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file(
            "r.yaml",
            &routes(&ds.url(), "async", "7s", "{ per_second: 5, burst: 5 }"),
        )
        .start()
        .await;
    let n = 100;
    for i in 0..n {
        let (status, _, _) = gw
            .send(
                "b",
                &json!({"sessionId": "s", "inputId": format!("in-{i}")}),
            )
            .await;
        assert_eq!(status, 202);
    }
    let all = wait_until(Duration::from_secs(60), async || ds.requests().len() >= n).await;
    assert!(all.is_some(), "delivered {} of {n}", ds.requests().len());
    let reqs = ds.requests();
    assert_eq!(
        reqs.len(),
        n,
        "each delivery is sent once: no try lost or repeated"
    );
    let times: Vec<SystemTime> = reqs.iter().map(|r| r.received).collect();
    assert_within_rate(&times, 5.0, 5.0);
    // no delivery used up a try waiting for a token: every one is delivered on its first
    let list = support::json(
        gw.client
            .get(gw.admin_url("/admin/deliveries?state=delivered&limit=1000"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let rows = list["deliveries"].as_array().unwrap();
    assert_eq!(rows.len(), n);
    assert!(rows.iter().all(|d| d["attempts"] == 1), "{list}");
    let first = times.iter().min().unwrap();
    let last = times.iter().max().unwrap();
    eprintln!(
        "outbound rate limit: {n} deliveries in {:?} at 5/s, burst 5",
        last.duration_since(*first).unwrap()
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_sync_call_waits_for_a_token_within_its_deadline_else_step_9() {
    let ds = TestDownstream::start().await;
    // 1 token per second: a second call at once must wait about a second.
    let short = TestGateway::builder()
        .file(
            "r.yaml",
            &routes(&ds.url(), "sync", "300ms", "{ per_second: 1, burst: 1 }"),
        )
        .start()
        .await;
    let p = |id: &str| json!({"sessionId": "s", "inputId": id});
    assert_eq!(short.send("b", &p("a")).await.0, 200);
    let (status, headers, body) = short.send("b", &p("b")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["reason"], "rate_limited", "{body}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(ds.requests().len(), 1, "nothing sent over the rate");
    short.stop().await;

    let ds = TestDownstream::start().await;
    let long = TestGateway::builder()
        .file(
            "r.yaml",
            &routes(&ds.url(), "sync", "5s", "{ per_second: 1, burst: 1 }"),
        )
        .start()
        .await;
    assert_eq!(long.send("b", &p("a")).await.0, 200);
    let started = std::time::Instant::now();
    assert_eq!(long.send("b", &p("b")).await.0, 200, "waited for its token");
    assert!(started.elapsed() >= Duration::from_millis(500));
    let m = long
        .client
        .get(long.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(r#"gateway_rate_limit_waits_total{route="r"} 1"#),
        "{m}"
    );
    long.stop().await;
}
