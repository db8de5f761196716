//! SPEC §7.4 for stored deliveries: a `${VAR}` value in a route's URL (path
//! and query), headers or body reaches the downstream on every try, and never
//! the store: the raw bytes of the SQLite files hold none of it, through
//! acceptance, a failed try, a dead letter and its replay.

use std::time::Duration;

use serde_json::json;

use crate::support::{self, Scripted, TestDownstream, TestGateway, wait_until};

const PATH_SECRET: &str = "pathsecret-8f3e1c77";
const QUERY_SECRET: &str = "querysecret-42d9b0aa";
const BODY_SECRET: &str = "bodysecret-0c6e5f13";
const HEADER_SECRET: &str = "headersecret-9a1b2c3d";

/// Every byte of the store's files (database, WAL, shared memory).
fn store_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("gateway.db") {
            all.extend(std::fs::read(e.path()).unwrap_or_default());
        }
    }
    all
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_of_a_route_reach_the_downstream_and_never_the_store() {
    let ds = TestDownstream::start().await;
    let routes = format!(
        r#"bots:
  - id: b
    auth: {{ api_key: {{ keys: ["test-key"] }} }}
routes:
  - name: r
    bot: b
    intent: "*"
    mode: async
    idempotency_key: "{{{{inputId}}}}"
    downstream:
      url: "{}/v1/${{PATH_SECRET}}/contacts/{{{{inputId}}}}?api_token=${{QUERY_SECRET}}"
      headers: {{ X-Api-Token: "${{HEADER_SECRET}}" }}
    body: '{{"id": "{{{{inputId}}}}", "key": "${{BODY_SECRET}}"}}'
    retry: {{ schedule: [100ms] }}
"#,
        ds.url()
    );
    let gw = TestGateway::builder()
        .file("r.yaml", &routes)
        .env("PATH_SECRET", PATH_SECRET)
        .env("QUERY_SECRET", QUERY_SECRET)
        .env("BODY_SECRET", BODY_SECRET)
        .env("HEADER_SECRET", HEADER_SECRET)
        .start()
        .await;
    // one delivered at once; one that fails both its tries (a dead letter)
    ds.push(Scripted::status(200));
    ds.push(Scripted::status(503));
    ds.push(Scripted::status(503));
    let (s1, _, first) = gw
        .send("b", &json!({"sessionId": "s", "inputId": "in-1"}))
        .await;
    assert_eq!(s1, 202);
    let ok = wait_until(Duration::from_secs(10), async || ds.requests().len() == 1).await;
    assert!(ok.is_some(), "the first delivery is sent");
    let (s2, _, second) = gw
        .send("b", &json!({"sessionId": "s", "inputId": "in-2"}))
        .await;
    assert_eq!(s2, 202);
    let id = second["delivery_id"].as_str().unwrap().to_owned();
    let dead = wait_until(Duration::from_secs(10), async || {
        let d = support::json(
            gw.client
                .get(gw.admin_url(&format!("/admin/deliveries/{id}")))
                .send()
                .await
                .unwrap(),
        )
        .await;
        (d["state"] == "dead").then_some(d)
    })
    .await;
    assert!(dead.is_some(), "the second delivery is a dead letter");
    // replay it: delivered now, rendered again at send time
    let r = gw
        .client
        .post(gw.admin_url(&format!("/admin/deliveries/{id}/replay")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let all = wait_until(Duration::from_secs(10), async || ds.requests().len() == 4).await;
    assert!(all.is_some(), "sent: {}", ds.requests().len());

    // the downstream got the secrets on every try
    for req in ds.requests() {
        assert!(
            req.uri.contains(PATH_SECRET) && req.uri.contains(QUERY_SECRET),
            "{}",
            req.uri
        );
        assert_eq!(req.json()["key"], BODY_SECRET);
        assert_eq!(req.header("x-api-token").as_deref(), Some(HEADER_SECRET));
    }
    assert!(first["delivery_id"].is_string());
    // and the store never did
    let bytes = store_bytes(gw.dir.path());
    assert!(bytes.len() > 4096, "the store was read");
    for secret in [PATH_SECRET, QUERY_SECRET, BODY_SECRET, HEADER_SECRET] {
        assert!(
            !contains(&bytes, secret),
            "{secret} is in the store's files"
        );
    }
    // nor the admin view of the delivery
    let shown = gw
        .client
        .get(gw.admin_url(&format!("/admin/deliveries/{id}")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for secret in [PATH_SECRET, QUERY_SECRET, BODY_SECRET, HEADER_SECRET] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    gw.stop().await;
}
