//! Downstream OAuth2 through the real server and a real local token endpoint.

use std::sync::Arc;

use serde_json::json;

use crate::support::{Scripted, TestDownstream, TestGateway};

async fn gateway(ds: &TestDownstream, client_auth: &str) -> TestGateway {
    let files = format!(
        r#"bots:
  - id: b
    auth: {{ api_key: {{ keys: ["test-key"] }} }}
routes:
  - name: crm
    bot: b
    intent: "*"
    deadline: 7s
    downstream:
      url: "{url}/api/contacts"
      max_in_flight: 200
      auth:
        oauth2:
          token_url: "{url}/token"
          client_id: gw-client
          client_secret: "${{CRM_SECRET}}"
          scopes: [contacts.write, contacts.read]
          client_auth: {client_auth}
    retry: {{ attempts: 2, backoff: {{ initial: 1ms, max: 1ms }} }}
"#,
        url = ds.url()
    );
    TestGateway::builder()
        .file("r.yaml", &files)
        .env("CRM_SECRET", "s3cr3t-value")
        // refresh after any 401, however young the token (the age rule: tests/delivered_once.rs)
        .limits(cognigy_gateway::runtime::Limits {
            token_refresh_min_age: std::time::Duration::ZERO,
            ..Default::default()
        })
        .start()
        .await
}

#[tokio::test]
async fn hundred_cold_requests_make_exactly_one_grant() {
    let ds = TestDownstream::start().await;
    let gw = Arc::new(gateway(&ds, "basic").await);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            gw.send("b", &json!({"sessionId": "s"})).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(ds.grants(), 1);
    let reqs = ds.requests();
    assert_eq!(reqs.len(), 100);
    assert!(
        reqs.iter()
            .all(|r| r.header("authorization").as_deref() == Some("Bearer tok-1"))
    );
    // the grant: basic client auth, form body with the scopes
    let tr = &ds.token_requests()[0];
    let basic = tr.header("authorization").unwrap();
    assert!(basic.starts_with("Basic "), "{basic}");
    let form = String::from_utf8(tr.body.to_vec()).unwrap();
    assert!(
        form.contains("grant_type=client_credentials")
            && form.contains("scope=contacts.write+contacts.read"),
        "{form}"
    );
    assert!(
        !form.contains("s3cr3t"),
        "basic auth keeps the secret out of the body"
    );
}

#[tokio::test]
async fn client_auth_body_sends_credentials_in_the_form() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "body").await;
    assert_eq!(gw.send("b", &json!({"sessionId": "s"})).await.0, 200);
    let tr = &ds.token_requests()[0];
    assert!(tr.header("authorization").is_none());
    let form = String::from_utf8(tr.body.to_vec()).unwrap();
    assert!(
        form.contains("client_id=gw-client") && form.contains("client_secret=s3cr3t-value"),
        "{form}"
    );
}

#[tokio::test]
async fn a_401_forces_one_refresh_and_one_retry_never_a_loop() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "basic").await;
    ds.push(Scripted::status(401).body(r#"{"error": "expired"}"#));
    let (status, _, _) = gw.send("b", &json!({"sessionId": "s"})).await;
    assert_eq!(status, 200);
    assert_eq!(ds.grants(), 2);
    let auths: Vec<String> = ds
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap())
        .collect();
    assert_eq!(auths, ["Bearer tok-1", "Bearer tok-2"]);

    // a downstream that always says 401: one refresh, then the 401 is the answer
    ds.set_default(Scripted::status(401).body(r#"{"error": "nope"}"#));
    let (status, _, body) = gw.send("b", &json!({"sessionId": "s"})).await;
    assert_eq!((status, body), (401, json!({"error": "nope"})));
    assert_eq!(ds.grants(), 3);
    assert_eq!(ds.requests().len(), 4, "exactly two sends for that request");
}

#[tokio::test]
async fn token_endpoint_failure_is_a_clear_502_without_secrets() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds, "basic").await;
    ds.push_token(Scripted::status(401).body(
        r#"{"error": "invalid_client", "error_description": "secret s3cr3t-value is wrong"}"#,
    ));
    let resp = gw
        .post("b", &[("x-api-key", "test-key")], r#"{"sessionId": "s"}"#)
        .await;
    assert_eq!(resp.status(), 502);
    let text = resp.text().await.unwrap();
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"], "downstream_auth");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("token endpoint answered 401"),
        "{text}"
    );
    assert!(!text.contains("s3cr3t"), "{text}");
    assert!(ds.requests().is_empty(), "nothing sent without a token");
}
