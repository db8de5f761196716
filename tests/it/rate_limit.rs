//! Per-bot inbound rate limit (SPEC §7.1): exact 429 counts for a burst, a
//! `Retry-After` that is honest, recovery with time, other bots unaffected.

use crate::support;

use std::time::Duration;

use crate::support::{TestDownstream, TestGateway};
use serde_json::json;

fn files(url: &str) -> String {
    format!(
        r#"bots:
  - id: limited
    auth: {{ api_key: {{ keys: ["test-key"] }} }}
    rate_limit: {{ per_second: 0.5, burst: 5 }}
  - id: free
    auth: {{ api_key: {{ keys: ["test-key"] }} }}
routes:
  - name: r
    intent: "*"
    downstream: {{ url: "{url}/crm" }}
"#
    )
}

#[tokio::test]
async fn a_burst_gets_exactly_the_bucket_and_then_429_with_retry_after() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("bots.yaml", &files(&ds.url()))
        .start()
        .await;
    let payload = json!({"sessionId": "s"});
    let mut ok = 0;
    let mut limited = Vec::new();
    for _ in 0..20 {
        let (status, headers, body) = gw.send("limited", &payload).await;
        match status {
            200 => ok += 1,
            429 => {
                assert_eq!(body["error"], "rate_limited");
                let secs: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                limited.push(secs);
            }
            s => panic!("unexpected {s}: {body}"),
        }
        // another bot is never limited by this one's bucket
        assert_eq!(gw.send("free", &payload).await.0, 200);
    }
    // 20 requests in well under a second at 0.5/s: the burst of 5 and not one more
    assert_eq!((ok, limited.len()), (5, 15));
    assert!(limited.iter().all(|s| (1..=2).contains(s)), "{limited:?}");
    assert_eq!(ds.requests().len(), 5 + 20);
    // After the Retry-After the gateway gave, a token is back.
    let wait = Duration::from_secs(*limited.last().unwrap());
    tokio::time::sleep(wait).await;
    let back = support::wait_until(Duration::from_secs(5), async || {
        (gw.send("limited", &payload).await.0 == 200).then_some(())
    })
    .await;
    assert!(back.is_some(), "a token comes back with time");
    gw.stop().await;
}
