//! Operations surface: exact metrics after scripted traffic, latency
//! percentiles against injected delays, the status page over HTTP, and the
//! admin token (bearer and browser cookie).

use std::time::Duration;

use serde_json::json;

use crate::support::{self, Scripted, TestDownstream, TestGateway};

fn files(ds: &TestDownstream) -> String {
    format!(
        r#"bots:
  - id: bot
    auth: {{ api_key: {{ keys: ["test-key"] }} }}
routes:
  - name: crm
    bot: bot
    intent: a
    downstream: {{ url: "{u}/crm" }}
    retry: {{ attempts: 2, backoff: {{ initial: 1ms, max: 1ms }} }}
  - name: other
    bot: bot
    intent: "*"
    downstream: {{ url: "{u}/other" }}
"#,
        u = ds.url()
    )
}

async fn text(gw: &TestGateway, path: &str) -> String {
    gw.client
        .get(gw.admin_url(path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn metric(m: &str, key: &str) -> f64 {
    m.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{key} not in\n{m}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_count_exactly_what_happened() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("r.yaml", &files(&ds))
        .start()
        .await;
    for _ in 0..3 {
        assert_eq!(gw.send("bot", &json!({"intent": "a"})).await.0, 200);
    }
    ds.push(Scripted::status(503));
    assert_eq!(
        gw.send("bot", &json!({"intent": "a"})).await.0,
        200,
        "one retry, then success"
    );
    ds.set_default(Scripted::status(404));
    assert_eq!(gw.send("bot", &json!({"intent": "x"})).await.0, 404);
    assert_eq!(gw.post("bot", &[], "{}").await.status(), 401);
    let m = text(&gw, "/metrics").await;
    assert_eq!(
        metric(
            &m,
            r#"gateway_requests_total{bot="bot",route="crm",status="2xx"}"#
        ),
        4.0
    );
    assert_eq!(
        metric(
            &m,
            r#"gateway_requests_total{bot="bot",route="other",status="4xx"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"gateway_requests_total{bot="bot",route="-",status="4xx"}"#
        ),
        1.0,
        "the 401 has no route"
    );
    assert_eq!(
        metric(
            &m,
            r#"gateway_downstream_tries_total{route="crm",outcome="success"}"#
        ),
        4.0
    );
    assert_eq!(
        metric(
            &m,
            r#"gateway_downstream_tries_total{route="crm",outcome="failure"}"#
        ),
        1.0
    );
    assert_eq!(metric(&m, r#"gateway_retries_total{route="crm"}"#), 1.0);
    assert_eq!(
        metric(
            &m,
            r#"gateway_downstream_tries_total{route="other",outcome="refused"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"gateway_request_duration_seconds_count{bot="bot",route="crm"}"#
        ),
        4.0
    );
    assert_eq!(
        metric(&m, r#"gateway_breaker_state{route="crm",state="closed"}"#),
        1.0
    );
    assert_eq!(metric(&m, r#"gateway_reloads_total{result="ok"}"#), 1.0);
    assert_eq!(metric(&m, "gateway_config_generation"), 1.0);
    // no payload values or secrets as labels
    assert!(!m.contains("test-key"));
}

#[tokio::test]
async fn latency_report_matches_injected_delays() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("r.yaml", &files(&ds))
        .limits(cognigy_gateway::runtime::Limits {
            sla: Duration::from_millis(250),
            ..Default::default()
        })
        .start()
        .await;
    // 8 calls at 20 ms and 2 at 500 ms (the downstream's delays), far from
    // the 250 ms SLA. What the gateway measures lies between the delay and
    // what the client measured around the call, so the bounds below hold
    // however loaded the machine is (all tests share one process), and are
    // exact (8 of 10 within the SLA) when it is not.
    let mut client_ms = Vec::new();
    for i in 0..10 {
        let d = if i < 8 { 20 } else { 500 };
        ds.push(Scripted::status(200).delay(Duration::from_millis(d)));
        let started = std::time::Instant::now();
        assert_eq!(gw.send("bot", &json!({"intent": "a"})).await.0, 200);
        client_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    client_ms.sort_by(f64::total_cmp);
    // The histogram keeps two significant digits.
    let at_most = |ms: f64| ms * 1.02 + 1.0;
    let within_sla = client_ms.iter().filter(|ms| **ms < 250.0).count() as f64 / 10.0;
    let v: serde_json::Value = serde_json::from_str(&text(&gw, "/metrics/latency").await).unwrap();
    assert_eq!(v["sla_ms"], 250);
    let crm = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "crm")
        .unwrap();
    for which in ["end_to_end", "downstream"] {
        let s = &crm[which];
        assert_eq!(s["count"], 10, "{which}: {s}");
        let p50 = s["p50_ms"].as_f64().unwrap();
        let p99 = s["p99_ms"].as_f64().unwrap();
        let compliance = s["sla_compliance"].as_f64().unwrap();
        // the 5th of 10 and the slowest, each between its delay and the client's time
        assert!(
            (20.0..=at_most(client_ms[4])).contains(&p50),
            "{which} p50 {p50}, client {client_ms:?}"
        );
        assert!(
            (500.0..=at_most(client_ms[9])).contains(&p99),
            "{which} p99 {p99}, client {client_ms:?}"
        );
        assert!(
            (within_sla..=0.8).contains(&compliance),
            "{which}: {compliance} within 250 ms; 8 of 10 were sent to answer at once, \
             and the client saw {within_sla} answered within it: {client_ms:?}"
        );
    }
    // a route without traffic reports zero observations, fully compliant
    let other = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "other")
        .unwrap();
    assert_eq!(
        (
            other["end_to_end"]["count"].as_u64(),
            other["end_to_end"]["sla_compliance"].as_f64()
        ),
        (Some(0), Some(1.0))
    );
}

#[tokio::test]
async fn status_page_shows_routes_states_and_reload() {
    let ds = TestDownstream::start().await;
    let yaml = files(&ds).replace(
        "    retry: { attempts: 2, backoff: { initial: 1ms, max: 1ms } }",
        "    retry: { attempts: 1 }\n    breaker: { consecutive_failures: 1, open_for: 1h }",
    );
    let gw = TestGateway::builder().file("r.yaml", &yaml).start().await;
    ds.push(Scripted::status(500));
    assert_eq!(gw.send("bot", &json!({"intent": "a"})).await.0, 502);
    let html = text(&gw, "/").await;
    assert!(
        html.contains("<meta http-equiv=\"refresh\""),
        "refreshes itself"
    );
    assert!(html.contains("name=\"viewport\""), "phone-friendly");
    assert!(html.contains("<code>crm</code>") && html.contains("<code>other</code>"));
    assert!(
        html.contains("class=\"state open\">open · half-open in"),
        "{html}"
    );
    assert!(html.contains("502 failed"), "last error shown");
    assert!(html.contains("action=\"/admin/breakers/crm/reset\""));
    assert!(html.contains("id=\"dead-letters\""));
    assert!(!html.contains("test-key"));
    // a form reset redirects back to the page and closes the breaker
    let client = support::client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = client
        .post(gw.admin_url("/admin/breakers/crm/reset"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("redirect=%2F")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert!(
        text(&gw, "/")
            .await
            .contains("class=\"state closed\">closed")
    );
}

#[tokio::test]
async fn admin_token_bearer_and_browser_cookie() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("r.yaml", &files(&ds))
        .admin_token("s3cret-admin")
        .start()
        .await;
    let client = support::client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in [
        "/metrics",
        "/metrics/latency",
        "/admin/status",
        "/admin/routes",
    ] {
        assert_eq!(
            client
                .get(gw.admin_url(path))
                .send()
                .await
                .unwrap()
                .status(),
            401,
            "{path}"
        );
        assert_eq!(
            client
                .get(gw.admin_url(path))
                .bearer_auth("s3cret-admin")
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{path}"
        );
    }
    assert_eq!(
        client
            .post(gw.admin_url("/admin/reload"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // a browser is sent to the login form, signs in, and gets a cookie
    let resp = client
        .get(gw.admin_url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            resp.status().as_u16(),
            resp.headers()["location"].to_str().unwrap()
        ),
        (303, "/login")
    );
    let resp = client
        .post(gw.admin_url("/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = client
        .post(gw.admin_url("/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=s3cret-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let cookie = resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(
        resp.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("HttpOnly")
    );
    let page = client
        .get(gw.admin_url("/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        !page.text().await.unwrap().contains("s3cret-admin"),
        "the page never shows the token"
    );
}
