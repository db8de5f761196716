//! `--egress-proxy` (SPEC §8) with the real binary and a small proxy on
//! loopback that records what passes: downstream calls (plain http
//! forwarded, https through CONNECT), OAuth2 token requests and health
//! probes all go through it; proxy variables of the environment are ignored,
//! with the flag and without it.

use std::time::Duration;

use crate::support::process::serve;
use crate::support::proxy::TestProxy;
use crate::support::tls::{TestCa, https_server};
use crate::support::{self, Scripted, TestDownstream, wait_until};

/// Proxy variables of a typical corporate environment, pointing elsewhere:
/// they must change nothing.
fn proxy_env(bogus: &str) -> Vec<(&'static str, String)> {
    vec![
        ("HTTP_PROXY", bogus.to_owned()),
        ("HTTPS_PROXY", bogus.to_owned()),
        ("ALL_PROXY", bogus.to_owned()),
        ("http_proxy", bogus.to_owned()),
        ("https_proxy", bogus.to_owned()),
        ("NO_PROXY", "127.0.0.1,localhost".to_owned()),
        ("no_proxy", "127.0.0.1,localhost".to_owned()),
    ]
}

struct World {
    _tmp: tempfile::TempDir,
    routes: std::path::PathBuf,
    store: String,
    crm: TestDownstream,
    failing: TestDownstream,
    https_port: u16,
}

async fn world() -> World {
    let crm = TestDownstream::start().await;
    let failing = TestDownstream::start().await;
    failing.set_default(Scripted::status(503));
    let ca = TestCa::new("test CA");
    let server = ca.server(&["localhost"], "crm");
    let router = axum::Router::new().fallback(|| async { r#"{"ok":true}"# });
    let https = https_server(router, &server, None).await;
    let tmp = tempfile::tempdir().unwrap();
    let routes = tmp.path().join("routes");
    std::fs::create_dir_all(&routes).unwrap();
    std::fs::write(tmp.path().join("ca.crt"), &ca.cert).unwrap();
    std::fs::write(
        routes.join("r.yaml"),
        format!(
            r#"bots:
  - id: b
    auth: {{ api_key: {{ keys: ["k"] }} }}
defaults:
  retry: {{ attempts: 1 }}
routes:
  - name: plain
    bot: b
    intent: plain
    downstream:
      url: "{crm}/contacts"
      auth:
        oauth2: {{ token_url: "{crm}/token", client_id: gw, client_secret: s }}
  - name: tls
    bot: b
    intent: tls
    downstream:
      url: "https://localhost:{port}/contacts"
      tls: {{ ca_file: ../ca.crt }}
  - name: probed
    bot: b
    intent: probed
    downstream:
      url: "{failing}/contacts"
    breaker:
      consecutive_failures: 1
      open_for: 10m
      health: {{ url: "{failing}/health", interval: 100ms }}
"#,
            crm = crm.url(),
            failing = failing.url(),
            port = https.port(),
        ),
    )
    .unwrap();
    let store = format!("sqlite://{}", tmp.path().join("gw.db").display());
    World {
        _tmp: tmp,
        routes,
        store,
        crm,
        failing,
        https_port: https.port(),
    }
}

async fn post(client: &reqwest::Client, listen: &str, intent: &str) -> u16 {
    client
        .post(format!("http://{listen}/webhooks/b"))
        .header("x-api-key", "k")
        .body(format!(r#"{{"sessionId":"s","intent":"{intent}"}}"#))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_downstream_token_and_probe_call_goes_through_the_egress_proxy() {
    let w = world().await;
    let proxy = TestProxy::start().await;
    // a closed port: a call that followed the environment would fail
    let bogus = "http://127.0.0.1:9";
    let env = proxy_env(bogus);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let flag = format!("http://user:pw@{}", proxy.addr);
    let gw = serve(&w.routes, &w.store, &["--egress-proxy", &flag], &env);
    let client = support::client();

    assert_eq!(post(&client, &gw.listen, "plain").await, 200);
    assert_eq!(post(&client, &gw.listen, "tls").await, 200);
    // the failing route opens its breaker; its probes then run through the proxy too
    assert_eq!(post(&client, &gw.listen, "probed").await, 502);
    wait_until(Duration::from_secs(20), async || {
        proxy
            .seen()
            .iter()
            .filter(|s| s.ends_with("/health"))
            .count()
            >= 2
    })
    .await
    .expect("health probes through the proxy");

    let seen = proxy.seen();
    let crm = w.crm.addr;
    let failing = w.failing.addr;
    for want in [
        format!("POST http://{crm}/token"),
        format!("POST http://{crm}/contacts"),
        format!("CONNECT localhost:{}", w.https_port),
        format!("POST http://{failing}/contacts"),
        format!("GET http://{failing}/health"),
    ] {
        assert!(seen.contains(&want), "`{want}` not in {seen:?}");
    }
    // and nothing reached the downstreams any other way
    let direct = w.crm.requests().len() + w.crm.token_requests().len();
    let via_proxy = seen
        .iter()
        .filter(|s| s.contains(&format!("http://{crm}/")))
        .count();
    assert_eq!(direct, via_proxy, "{seen:?}");
    let failing_direct = w.failing.requests().len();
    let failing_via = seen
        .iter()
        .filter(|s| s.contains(&format!("http://{failing}/")))
        .count();
    assert!(failing_direct <= failing_via, "{seen:?}");
    // the credentials of the proxy URL went as Proxy-Authorization, and are not logged
    assert!(
        proxy
            .proxy_authorizations()
            .iter()
            .all(|a| a == "Basic dXNlcjpwdw=="),
        "{:?}",
        proxy.proxy_authorizations()
    );
    assert!(!proxy.proxy_authorizations().is_empty());
    let (status, lines) = gw.stop("-TERM").await;
    assert!(status.success());
    assert!(!lines.join("\n").contains("user:pw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_proxy_variables_of_the_environment_are_ignored() {
    let w = world().await;
    let proxy = TestProxy::start().await;
    // the environment names a working proxy: it must not be used
    let env = proxy_env(&proxy.url());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gw = serve(&w.routes, &w.store, &[], &env);
    let client = support::client();
    assert_eq!(post(&client, &gw.listen, "plain").await, 200);
    assert_eq!(post(&client, &gw.listen, "tls").await, 200);
    assert_eq!(w.crm.requests().len(), 1);
    assert_eq!(w.crm.token_requests().len(), 1);
    assert!(proxy.seen().is_empty(), "{:?}", proxy.seen());
    let (status, _) = gw.stop("-TERM").await;
    assert!(status.success());
}

#[test]
fn an_egress_proxy_that_is_not_an_http_url_is_a_usage_error() {
    for bad in [
        "socks5://127.0.0.1:1080",
        "127.0.0.1:3128",
        "http://proxy:3128/path",
    ] {
        let out = support::gateway_cmd()
            .args(["serve", "--egress-proxy", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--egress-proxy"), "{err}");
    }
}
