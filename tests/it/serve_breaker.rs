//! The per-route breaker end to end: a downstream that fails, hangs, is slow,
//! then recovers; what the bot sees, what the downstream sees, admin and metrics.
//! State changes are awaited by polling with a bound, never by fixed sleeps.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{self, Scripted, TestDownstream, TestGateway, wait_until};

fn files(a: &TestDownstream, b: &TestDownstream, breaker: &str) -> String {
    format!(
        r#"bots:
  - id: bot
    auth: {{ api_key: {{ keys: ["test-key"] }} }}
routes:
  - name: route-a
    bot: bot
    intent: a
    deadline: 5s
    downstream: {{ url: "{a}/crm", timeout: 300ms }}
    retry: {{ attempts: 1 }}
    breaker: {breaker}
    fallback: {{ status: 200, body: '{{"fallback": true, "retry_after": {{{{json retry_after}}}}}}' }}
  - name: route-b
    bot: bot
    intent: b
    downstream: {{ url: "{b}/other" }}
"#,
        a = a.url(),
        b = b.url()
    )
}

async fn start(a: &TestDownstream, b: &TestDownstream, breaker: &str) -> TestGateway {
    TestGateway::builder()
        .file("r.yaml", &files(a, b, breaker))
        .start()
        .await
}

async fn breaker(gw: &TestGateway, route: &str) -> Value {
    let all = support::json(
        gw.client
            .get(gw.admin_url("/admin/routes"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    all["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == route)
        .unwrap()["breaker"]
        .clone()
}

/// How long a breaker may take to change state.
const WITHIN: Duration = Duration::from_secs(10);

async fn metrics(gw: &TestGateway) -> String {
    gw.client
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn failures_open_the_route_and_nothing_is_sent_while_open() {
    let (a, b) = (TestDownstream::start().await, TestDownstream::start().await);
    let gw = start(
        &a,
        &b,
        "{ consecutive_failures: 3, open_for: 1h, open_for_max: 2h }",
    )
    .await;
    a.set_default(Scripted::status(503));
    for _ in 0..3 {
        let (status, _, body) = gw.send("bot", &json!({"intent": "a"})).await;
        assert_eq!((status, body["error"].as_str()), (502, Some("downstream")));
    }
    assert_eq!(breaker(&gw, "route-a").await["state"], "open");
    // open: the fallback answers at once, with Retry-After ≈ open_for; nothing reaches the CRM
    for _ in 0..5 {
        let (status, headers, body) = gw.send("bot", &json!({"intent": "a"})).await;
        assert_eq!((status, body["fallback"].as_bool()), (200, Some(true)));
        let ra: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((3590..=3600).contains(&ra), "retry-after {ra}");
        assert_eq!(body["retry_after"].as_u64(), Some(ra));
    }
    assert_eq!(a.requests().len(), 3);
    // route B is untouched
    let (status, _, _) = gw.send("bot", &json!({"intent": "b"})).await;
    assert_eq!(status, 200);
    assert_eq!(breaker(&gw, "route-b").await["state"], "closed");
    // metrics: state, transition, rejections
    let m = metrics(&gw).await;
    assert!(
        m.contains(r#"gateway_breaker_state{route="route-a",state="open"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"gateway_breaker_state{route="route-b",state="closed"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(
            r#"gateway_breaker_transitions_total{route="route-a",from="closed",to="open"} 1"#
        ),
        "{m}"
    );
    assert!(
        m.contains(r#"gateway_breaker_rejections_total{route="route-a",reason="open"} 5"#),
        "{m}"
    );
    assert!(
        m.contains(r#"gateway_downstream_tries_total{route="route-a",outcome="failure"} 3"#),
        "{m}"
    );
    // admin reset closes it
    let resp = gw
        .client
        .post(gw.admin_url("/admin/breakers/route-a/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(support::json(resp).await["state"], "closed");
    a.set_default(Scripted::status(200));
    assert_eq!(gw.send("bot", &json!({"intent": "a"})).await.0, 200);
    assert_eq!(a.requests().len(), 4);
}

#[tokio::test]
async fn without_a_fallback_open_is_503_with_retry_after() {
    let (a, b) = (TestDownstream::start().await, TestDownstream::start().await);
    let yaml = files(&a, &b, "{ consecutive_failures: 1, open_for: 2m }")
        .replace("    fallback:", "    # fallback:");
    let gw = TestGateway::builder().file("r.yaml", &yaml).start().await;
    a.set_default(Scripted::status(500));
    assert_eq!(gw.send("bot", &json!({"intent": "a"})).await.0, 502);
    let (status, headers, body) = gw.send("bot", &json!({"intent": "a"})).await;
    assert_eq!(
        (status, body["error"].as_str(), body["reason"].as_str()),
        (503, Some("unavailable"), Some("open"))
    );
    let ra: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((110..=120).contains(&ra), "{ra}");
}

#[tokio::test]
async fn hanging_downstream_opens_on_timeouts() {
    let (a, b) = (TestDownstream::start().await, TestDownstream::start().await);
    let gw = start(&a, &b, "{ consecutive_failures: 2, open_for: 1h }").await;
    a.set_default(Scripted::status(200).delay(Duration::from_secs(5)));
    for _ in 0..2 {
        let (status, _, body) = gw.send("bot", &json!({"intent": "a"})).await;
        assert_eq!((status, body["reason"].as_str()), (502, Some("timeout")));
    }
    wait_until(WITHIN, async || {
        breaker(&gw, "route-a").await["state"] == "open"
    })
    .await
    .expect("route-a opens on timeouts");
}

#[tokio::test]
async fn slow_calls_open_the_route_without_any_failure() {
    let (a, b) = (TestDownstream::start().await, TestDownstream::start().await);
    let slow = "{ min_calls: 4, consecutive_failures: 100, slow_call: { threshold: 50ms, rate: 0.5 }, open_for: 1h }";
    // slow, never timed out, however loaded the machine is
    let yaml = files(&a, &b, slow).replace("timeout: 300ms", "timeout: 5s");
    let gw = TestGateway::builder().file("r.yaml", &yaml).start().await;
    a.set_default(Scripted::status(200).delay(Duration::from_millis(120)));
    for _ in 0..4 {
        assert_eq!(gw.send("bot", &json!({"intent": "a"})).await.0, 200);
    }
    let st = breaker(&gw, "route-a").await;
    assert_eq!(st["state"], "open", "{st}");
    let (_, _, body) = gw.send("bot", &json!({"intent": "a"})).await;
    assert_eq!(body["fallback"], true);
}

#[tokio::test]
async fn health_probe_runs_only_while_open_then_half_open_admits_n_and_recovery_closes() {
    let (a, b) = (TestDownstream::start().await, TestDownstream::start().await);
    let breaker_cfg = format!(
        "{{ consecutive_failures: 2, open_for: 1h, half_open_probes: 2, close_after: 2, health: {{ url: \"{}/health\", interval: 20ms }} }}",
        a.url()
    );
    // route-b has the same probe, and is opened below: its probes show that
    // the probe tasks run (they tick alike), so route-a's task has ticked too.
    // route-a's held calls (below) must not time out, however loaded the machine is
    let yaml = files(&a, &b, &breaker_cfg).replace("timeout: 300ms", "timeout: 5s")
        + &format!(
            "    retry: {{ attempts: 1 }}\n    breaker: {{ consecutive_failures: 1, open_for: 1h, health: {{ url: \"{}/health\", interval: 20ms }} }}\n",
            b.url()
        );
    let gw = Arc::new(TestGateway::builder().file("r.yaml", &yaml).start().await);
    b.set_default(Scripted::status(503)); // route-b's calls and probes fail: it stays open
    assert_eq!(gw.send("bot", &json!({"intent": "b"})).await.0, 502);
    // closed: while route-b's probes run (several of them), route-a makes none
    assert_eq!(gw.send("bot", &json!({"intent": "a"})).await.0, 200);
    let b_probes = || b.requests().iter().filter(|r| r.uri == "/health").count();
    wait_until(WITHIN, async || b_probes() >= 5)
        .await
        .expect("route-b's probes run while it is open");
    assert!(
        a.requests().iter().all(|r| r.uri != "/health"),
        "no probe while closed"
    );

    // fail twice: open. The health endpoint answers 503 at first, then 200.
    a.push(Scripted::status(503));
    a.push(Scripted::status(503));
    a.push(Scripted::status(503)); // first probe
    for _ in 0..2 {
        assert_eq!(gw.send("bot", &json!({"intent": "a"})).await.0, 502);
    }
    // the probe (health → 200 by default now) moves the route to half-open early
    wait_until(WITHIN, async || {
        breaker(&gw, "route-a").await["state"] == "half_open"
    })
    .await
    .expect("a successful probe moves route-a to half-open");
    let probes: Vec<String> = a
        .requests()
        .iter()
        .map(|r| r.uri.clone())
        .filter(|u| u == "/health")
        .collect();
    assert!(probes.len() >= 2, "{probes:?}");

    // half-open admits at most 2 concurrent calls; the rest get the fallback at once
    let before = a.requests().iter().filter(|r| r.uri == "/crm").count();
    a.hold(); // the admitted calls stay under way until all others are answered
    let mut tasks = vec![];
    for _ in 0..10 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            gw.send("bot", &json!({"intent": "a"})).await
        }));
    }
    wait_until(WITHIN, async || {
        tasks.iter().filter(|t| t.is_finished()).count() >= 8
    })
    .await
    .expect("8 of 10 calls answered at once while 2 are under way");
    a.release();
    let mut delivered = 0;
    let mut fallback = 0;
    for t in tasks {
        let (status, _, body) = t.await.unwrap();
        assert_eq!(status, 200);
        if body["fallback"] == true {
            fallback += 1
        } else {
            delivered += 1
        }
    }
    assert_eq!((delivered, fallback), (2, 8));
    assert_eq!(
        a.requests().iter().filter(|r| r.uri == "/crm").count() - before,
        2
    );
    assert!(
        a.max_in_flight() <= 2,
        "downstream saw {} concurrent calls",
        a.max_in_flight()
    );
    // two successful probes closed it
    assert_eq!(breaker(&gw, "route-a").await["state"], "closed");
    let m = metrics(&gw).await;
    assert!(m.contains(r#"from="open",to="half_open"} 1"#), "{m}");
    assert!(m.contains(r#"from="half_open",to="closed"} 1"#), "{m}");
    assert!(
        m.contains(r#"gateway_health_probes_total{route="route-a",result="ok"}"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_failed_probe_reopens_with_a_longer_period() {
    let (a, b) = (TestDownstream::start().await, TestDownstream::start().await);
    let breaker_cfg = format!(
        "{{ consecutive_failures: 1, open_for: 1h, open_for_max: 3h, half_open_probes: 1, health: {{ url: \"{}/health\", interval: 20ms }} }}",
        a.url()
    );
    let gw = start(&a, &b, &breaker_cfg).await;
    a.push(Scripted::status(500));
    assert_eq!(gw.send("bot", &json!({"intent": "a"})).await.0, 502);
    assert_eq!(breaker(&gw, "route-a").await["open_for_ms"], 3_600_000);
    wait_until(WITHIN, async || {
        breaker(&gw, "route-a").await["state"] == "half_open"
    })
    .await
    .expect("a successful probe moves route-a to half-open");
    a.push(Scripted::status(500));
    assert_eq!(gw.send("bot", &json!({"intent": "a"})).await.0, 502);
    let st = breaker(&gw, "route-a").await;
    assert_eq!(
        (st["state"].as_str(), st["open_for_ms"].as_u64()),
        (Some("open"), Some(7_200_000)),
        "{st}"
    );
}
