//! Property: whatever string a payload carries, `"{{x}}"` in a JSON body
//! template yields a downstream body that parses, with the same keys, and the
//! exact string as the value. Runs through the real server.

use proptest::prelude::*;
use serde_json::json;

use crate::support::{TestDownstream, TestGateway};

#[test]
fn json_string_injection_is_impossible() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ds, gw) = rt.block_on(async {
        let ds = TestDownstream::start().await;
        let files = format!(
            "bots:\n  - id: b\n    auth: {{ api_key: {{ keys: [\"test-key\"] }} }}\nroutes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    downstream: {{ url: \"{}/x\" }}\n    body: '{{\"a\": \"{{{{x}}}}\", \"b\": \"fixed\", \"c\": {{{{json x}}}}}}'\n",
            ds.url()
        );
        let gw = TestGateway::builder().file("r.yaml", &files).start().await;
        (ds, gw)
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 200,
        ..ProptestConfig::default()
    });
    runner
        .run(&any::<String>(), |x| {
            let (status, _, _) = rt.block_on(gw.send("b", &json!({"x": x})));
            prop_assert_eq!(status, 200);
            let body = ds.requests().last().unwrap().json();
            let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
            prop_assert_eq!(keys, vec!["a", "b", "c"]);
            prop_assert_eq!(body["a"].as_str(), Some(x.as_str()));
            prop_assert_eq!(body["b"].as_str(), Some("fixed"));
            prop_assert_eq!(body["c"].as_str(), Some(x.as_str()));
            Ok(())
        })
        .unwrap();
}
