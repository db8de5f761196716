//! The status page in a real headless Chromium (Debian's `chromium`, driven by
//! playwright-core from `tests/browser/`): load it, check the content, click a
//! breaker's Reset, and save screenshots under `target/artifacts/`. The script
//! also checks the page's Content-Security-Policy breaks nothing: styles apply,
//! the Reset form posts (same origin), and Chromium reports no CSP violation.
//! `scripts/test.sh` installs Chromium and the npm package when missing.

use std::path::Path;

use serde_json::json;

use crate::support::{self, Scripted, TestDownstream, TestGateway};

#[tokio::test(flavor = "multi_thread")]
async fn status_page_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists()
            && Path::new("/usr/bin/chromium").exists(),
        "the browser test needs Chromium and tests/browser/node_modules: run scripts/test.sh (it installs both)"
    );
    let ds = TestDownstream::start().await;
    let files = format!(
        "bots:\n  - id: bot\n    auth: {{ api_key: {{ keys: [\"test-key\"] }} }}\nroutes:\n  - name: crm-contact-upsert\n    bot: bot\n    intent: a\n    downstream: {{ url: \"{u}/crm\" }}\n    retry: {{ attempts: 1 }}\n    breaker: {{ consecutive_failures: 1, open_for: 5m }}\n  - name: default\n    bot: bot\n    intent: \"*\"\n    downstream: {{ url: \"{u}/other\" }}\n",
        u = ds.url()
    );
    let gw = TestGateway::builder().file("r.yaml", &files).start().await;
    for _ in 0..3 {
        gw.send("bot", &json!({"intent": "x"})).await;
    }
    ds.push(Scripted::status(503));
    assert_eq!(gw.send("bot", &json!({"intent": "a"})).await.0, 502);
    let out_dir = root.join("target/artifacts");
    let admin = format!("http://{}", gw.admin);
    let script = browser_dir.join("status_page.mjs");
    // std's blocking Command on a blocking thread: the gateway keeps serving meanwhile
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(script)
            .args([&admin, "crm-contact-upsert"])
            .arg(&out_dir)
            .output()
    })
    .await
    .unwrap()
    .expect("node runs");
    let out_dir = root.join("target/artifacts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
    // the click really reset the breaker
    let routes = support::json(
        gw.client
            .get(gw.admin_url("/admin/routes"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let crm = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "crm-contact-upsert")
        .unwrap();
    assert_eq!(crm["breaker"]["state"], "closed");
    assert!(out_dir.join("status-page.png").exists());
}
