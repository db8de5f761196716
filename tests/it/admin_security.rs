//! SPEC §7.4 end to end: `${VAR}` values never leave the gateway except to
//! the downstream (logs at debug level, `/metrics`, every admin answer, the
//! status page, `gateway render`), health probes carry credentials only to
//! the downstream's origin, and the admin listener refuses cross-site and
//! DNS-rebound requests and signs browsers in with a session cookie that is
//! not the token.

use crate::support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{Scripted, TestDownstream, TestGateway, wait_until};
use base64::Engine as _;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

/// One secret per place a `${VAR}` can stand, each its own bytes, so a leak
/// names its place. Letters, digits and `-` only: the same bytes whether
/// percent-encoded, JSON-escaped or not.
const SECRETS: &[(&str, &str)] = &[
    ("PATH_SECRET", "pathsecret-3f9a1c"),
    ("QUERY_SECRET", "querysecret-77b2e0"),
    ("HEADER_SECRET", "headersecret-c41d9e"),
    ("DEFAULT_HEADER_SECRET", "defaultheadersecret-5e8f02"),
    ("BODY_SECRET", "bodysecret-a19c44"),
    ("CLIENT_ID_SECRET", "clientidsecret-0d6b3a"),
    ("CLIENT_SECRET_SECRET", "clientsecretsecret-92fe17"),
    ("BEARER_SECRET", "bearersecret-e3a5d8"),
    ("HEALTH_SECRET", "healthsecret-6c0b91"),
    ("BOT_KEY_SECRET", "botkeysecret-1f2e3d"),
];

fn secret(name: &str) -> &'static str {
    SECRETS.iter().find(|(n, _)| *n == name).unwrap().1
}

/// Route files with a secret in every place: URL path and query, a route
/// header, a `defaults:` header, the body, the OAuth2 client id and secret,
/// a bearer token and the health URL (and the bot's inbound key).
fn secret_routes(ds: &str) -> String {
    format!(
        r#"defaults:
  downstream:
    headers: {{ X-Default-Tenant: "${{DEFAULT_HEADER_SECRET}}" }}
bots:
  - id: b
    auth: {{ api_key: {{ keys: ["${{BOT_KEY_SECRET}}"] }} }}
routes:
  - name: crm-oauth
    bot: b
    intent: oauth
    downstream:
      url: "{ds}/v1/${{PATH_SECRET}}/contacts/{{{{sessionId}}}}?api_token=${{QUERY_SECRET}}&x=1"
      headers: {{ X-Tenant: "${{HEADER_SECRET}}" }}
      auth:
        oauth2:
          token_url: "{ds}/token"
          client_id: "${{CLIENT_ID_SECRET}}"
          client_secret: "${{CLIENT_SECRET_SECRET}}"
    body: '{{"key": "${{BODY_SECRET}}", "session": {{{{json sessionId}}}}}}'
  - name: crm-bearer
    bot: b
    intent: bearer
    downstream:
      url: "{ds}/v2/items"
      auth: {{ bearer: {{ token: "${{BEARER_SECRET}}" }} }}
    retry: {{ attempts: 1 }}
    breaker:
      consecutive_failures: 1
      open_for: 5m
      health: {{ url: "{ds}/health?key=${{HEALTH_SECRET}}", interval: 100ms }}
"#
    )
}

/// A `gateway serve` whose stderr is kept whole (from the first line).
struct Served {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    listen: String,
    admin: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    fn start(routes: &std::path::Path, store: &str, env: &[(&str, &str)]) -> Served {
        let mut child = Command::new(BIN)
            .args(["serve", "--routes"])
            .arg(routes)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--log-format", "json", "--store", store])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GATEWAY_LOG", "debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("gateway serving") {
                    let _ = tx.send(line.clone());
                }
                kept.lock().unwrap().push(line);
            }
        });
        let mut s = Served {
            child,
            lines,
            reader: Some(reader),
            listen: String::new(),
            admin: String::new(),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("gateway starts: {:?}", s.lines.lock().unwrap()));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        s.listen = v["listen"].as_str().unwrap().into();
        s.admin = v["admin"].as_str().unwrap().into();
        s
    }

    /// SIGTERM, wait for the exit, and every line it logged.
    fn stop(mut self) -> Vec<String> {
        support::process::kill(&self.child, "-TERM");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status:?}");
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        self.lines.lock().unwrap().clone()
    }
}

/// Where each secret was found in `outputs`: (output, secret, the text around it).
fn leaks(outputs: &[(String, String)]) -> Vec<(String, &'static str, String)> {
    let mut found = Vec::new();
    for (what, text) in outputs {
        for (name, value) in SECRETS {
            if let Some(i) = text.find(value) {
                let from = text.floor_char_boundary(i.saturating_sub(160));
                let to = text.ceil_char_boundary((i + value.len() + 80).min(text.len()));
                found.push((what.clone(), *name, text[from..to].to_owned()));
            }
        }
    }
    found
}

/// The headline test of SPEC §7.4 (sync traffic; stored deliveries are the
/// store's own tests): the downstream receives every secret, and no output
/// of the gateway holds any of them.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_reach_the_downstream_and_no_output() {
    let ds = TestDownstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes");
    std::fs::create_dir_all(&routes).unwrap();
    std::fs::write(routes.join("r.yaml"), secret_routes(&ds.url())).unwrap();
    let store = format!("sqlite://{}", dir.path().join("gateway.db").display());
    let p = Served::start(&routes, &store, SECRETS);
    let client = crate::support::client();
    let mut outputs: Vec<(String, String)> = Vec::new();

    // sync traffic: both routes, then the bearer route fails and opens
    let post = |intent: &str| {
        client
            .post(format!("http://{}/webhooks/b", p.listen))
            .header("x-api-key", secret("BOT_KEY_SECRET"))
            .header("content-type", "application/json")
            .body(json!({"sessionId": "S-1", "intent": intent}).to_string())
            .send()
    };
    for intent in ["oauth", "bearer"] {
        let resp = post(intent).await.unwrap();
        assert_eq!(resp.status(), 200, "{intent}");
        outputs.push((format!("webhook {intent}"), resp.text().await.unwrap()));
    }
    ds.push(Scripted::status(503));
    let resp = post("bearer").await.unwrap();
    assert_eq!(resp.status(), 502);
    outputs.push(("webhook 502".into(), resp.text().await.unwrap()));
    // the open route is probed on its health URL (same origin: with its token)
    let probe = wait_until(Duration::from_secs(10), async || {
        ds.requests()
            .into_iter()
            .find(|r| r.uri.starts_with("/health"))
    })
    .await
    .expect("the health probe ran");
    let resp = post("bearer").await.unwrap();
    outputs.push(("webhook after probe".into(), resp.text().await.unwrap()));

    // every admin answer and the status page
    let admin = |path: &str| format!("http://{}{path}", p.admin);
    for path in [
        "/",
        "/healthz",
        "/login",
        "/metrics",
        "/metrics/latency",
        "/admin/status",
        "/admin/routes",
        "/admin/deliveries",
        "/admin/deliveries?state=dead",
    ] {
        let resp = client.get(admin(path)).send().await.unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        outputs.push((format!("GET {path}"), resp.text().await.unwrap()));
    }
    let routes_answer = outputs
        .iter()
        .find(|(w, _)| w == "GET /admin/routes")
        .unwrap()
        .1
        .clone();
    assert!(
        routes_answer.contains("${PATH_SECRET}") && routes_answer.contains("${QUERY_SECRET}"),
        "the URL is shown as written: {routes_answer}"
    );
    for path in ["/admin/reload", "/admin/breakers/crm-bearer/reset"] {
        let resp = client.post(admin(path)).send().await.unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        outputs.push((format!("POST {path}"), resp.text().await.unwrap()));
    }
    for path in ["/readyz", "/healthz"] {
        let resp = client
            .get(format!("http://{}{path}", p.listen))
            .send()
            .await
            .unwrap();
        outputs.push((format!("public GET {path}"), resp.text().await.unwrap()));
    }

    // `gateway render` and `gateway validate`, with the same environment
    let payload = dir.path().join("payload.json");
    std::fs::write(&payload, r#"{"sessionId": "S-1", "intent": "oauth"}"#).unwrap();
    for route in ["crm-oauth", "crm-bearer"] {
        let out = Command::new(BIN)
            .args(["render", "--route", route, "--payload"])
            .arg(&payload)
            .arg("--routes")
            .arg(&routes)
            .env_clear()
            .envs(SECRETS.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if route == "crm-oauth" {
            assert!(
                text.contains("/v1/***/contacts/S-1?api_token=***&x=1")
                    && text.contains("x-tenant: ***")
                    && text.contains("x-default-tenant: ***")
                    && text.contains(r#""key": "***""#),
                "render masks each value: {text}"
            );
        }
        outputs.push((format!("render {route}"), text));
        outputs.push((
            format!("render {route} (stderr)"),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let out = Command::new(BIN)
        .args(["validate", "--require-env"])
        .arg(&routes)
        .env_clear()
        .envs(SECRETS.iter().copied())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    outputs.push(("validate".into(), format!("{stdout}{stderr}")));

    // the logs, debug level, start-up to exit
    let logs = p.stop();
    assert!(
        logs.iter().any(|l| l.contains("\"level\":\"DEBUG\"")),
        "debug lines are logged: {logs:?}"
    );
    outputs.push(("logs".into(), logs.join("\n")));

    assert_eq!(leaks(&outputs), vec![], "secrets in outputs");

    // ...while the downstream did receive every one of them
    let reqs = ds.requests();
    let oauth = reqs.iter().find(|r| r.uri.starts_with("/v1/")).unwrap();
    assert_eq!(
        oauth.uri,
        format!(
            "/v1/{}/contacts/S-1?api_token={}&x=1",
            secret("PATH_SECRET"),
            secret("QUERY_SECRET")
        )
    );
    assert_eq!(oauth.header("x-tenant").unwrap(), secret("HEADER_SECRET"));
    assert_eq!(
        oauth.header("x-default-tenant").unwrap(),
        secret("DEFAULT_HEADER_SECRET")
    );
    assert_eq!(oauth.json()["key"], secret("BODY_SECRET"));
    assert_eq!(oauth.header("authorization").unwrap(), "Bearer tok-1");
    let grant = &ds.token_requests()[0];
    let basic = grant.header("authorization").unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.strip_prefix("Basic ").unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(decoded).unwrap(),
        format!(
            "{}:{}",
            secret("CLIENT_ID_SECRET"),
            secret("CLIENT_SECRET_SECRET")
        )
    );
    let bearer = reqs.iter().find(|r| r.uri == "/v2/items").unwrap();
    let expected = format!("Bearer {}", secret("BEARER_SECRET"));
    assert_eq!(bearer.header("authorization").unwrap(), expected);
    assert_eq!(
        bearer.header("x-default-tenant").unwrap(),
        secret("DEFAULT_HEADER_SECRET")
    );
    assert_eq!(
        probe.uri,
        format!("/health?key={}", secret("HEALTH_SECRET"))
    );
    assert_eq!(probe.header("authorization").unwrap(), expected);
}

/// A health URL on another origin than the downstream's is probed without the
/// route's credentials; on the same origin, with them.
#[tokio::test(flavor = "multi_thread")]
async fn health_probes_carry_credentials_only_to_the_downstream_origin() {
    let ds = TestDownstream::start().await;
    let elsewhere = TestDownstream::start().await;
    let route = |name: &str, intent: &str, health: &str| {
        format!(
            "  - name: {name}\n    bot: b\n    intent: {intent}\n    downstream: {{ url: \"{}/{name}\", auth: {{ bearer: {{ token: \"${{TOKEN}}\" }} }} }}\n    retry: {{ attempts: 1 }}\n    breaker: {{ consecutive_failures: 1, open_for: 5m, health: {{ url: \"{health}/health-{name}\", interval: 50ms }} }}\n",
            ds.url()
        )
    };
    let file = format!(
        "bots:\n  - id: b\n    auth: {{ api_key: {{ keys: [\"test-key\"] }} }}\nroutes:\n{}{}",
        route("same", "a", &ds.url()),
        route("other", "b", &elsewhere.url())
    );
    let gw = TestGateway::builder()
        .file("r.yaml", &file)
        .env("TOKEN", "route-token-123")
        .start()
        .await;
    for intent in ["a", "b"] {
        ds.push(Scripted::status(503));
        assert_eq!(gw.send("b", &json!({"intent": intent})).await.0, 502);
    }
    let same = wait_until(Duration::from_secs(10), async || {
        ds.requests().into_iter().find(|r| r.uri == "/health-same")
    })
    .await
    .expect("probed");
    let other = wait_until(Duration::from_secs(10), async || {
        elsewhere
            .requests()
            .into_iter()
            .find(|r| r.uri == "/health-other")
    })
    .await
    .expect("probed");
    assert_eq!(
        same.header("authorization").as_deref(),
        Some("Bearer route-token-123")
    );
    assert_eq!(other.header("authorization"), None);
    gw.stop().await;
}

/// The admin listener's state-changing routes, with a route and a delivery id.
const STATE_CHANGING: &[&str] = &[
    "/admin/reload",
    "/admin/breakers/r/reset",
    "/admin/deliveries/00000000-0000-7000-8000-000000000000/replay",
    "/login",
];

/// Every admin route (GET), for the Host check.
const READS: &[&str] = &[
    "/",
    "/healthz",
    "/login",
    "/metrics",
    "/metrics/latency",
    "/admin/status",
    "/admin/routes",
    "/admin/deliveries",
    "/admin/deliveries/00000000-0000-7000-8000-000000000000",
    "/no-such-page",
];

fn one_route(ds: &TestDownstream) -> String {
    format!(
        "bots:\n  - id: b\n    auth: {{ api_key: {{ keys: [\"test-key\"] }} }}\nroutes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    downstream: {{ url: \"{}/crm\" }}\n",
        ds.url()
    )
}

async fn forbidden(resp: reqwest::Response, what: &str) {
    assert_eq!(resp.status(), 403, "{what}");
    let body = support::json(resp).await;
    assert_eq!(body["error"], "forbidden", "{what}: {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cross_site_and_rebound_requests_are_refused_same_origin_ones_served() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("r.yaml", &one_route(&ds))
        .start()
        .await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let own = format!("http://{}", gw.admin);
    let form = |path: &str| {
        client
            .post(gw.admin_url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("redirect=%2F")
    };
    for path in STATE_CHANGING {
        for (name, value) in [
            ("origin", "http://evil.example"),
            ("origin", "null"),
            ("origin", "http://127.0.0.1:1"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-site"),
        ] {
            let what = format!("POST {path} with {name}: {value}");
            forbidden(form(path).header(name, value).send().await.unwrap(), &what).await;
        }
        let what = format!("POST {path} with a foreign Host");
        forbidden(
            form(path)
                .header("host", "rebound.example")
                .send()
                .await
                .unwrap(),
            &what,
        )
        .await;
        // the status page's own forms (same origin), and clients without an Origin
        let resp = form(path)
            .header("origin", &own)
            .header("sec-fetch-site", "same-origin")
            .send()
            .await
            .unwrap();
        assert_ne!(resp.status(), 403, "same-origin POST {path}");
        let resp = client.post(gw.admin_url(path)).send().await.unwrap();
        assert_ne!(resp.status(), 403, "POST {path} without Origin");
    }
    // the breaker reset really ran for the same-origin form
    let resp = form("/admin/breakers/r/reset")
        .header("origin", &own)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            resp.status().as_u16(),
            resp.headers()["location"].to_str().unwrap()
        ),
        (303, "/")
    );
    // DNS rebinding: a foreign Host is refused on every route, reads included
    for path in READS {
        let resp = client
            .get(gw.admin_url(path))
            .header("host", format!("rebound.example:{}", gw.admin.port()))
            .send()
            .await
            .unwrap();
        forbidden(resp, &format!("GET {path} with a foreign Host")).await;
        for host in [
            format!("127.0.0.1:{}", gw.admin.port()),
            format!("localhost:{}", gw.admin.port()),
            format!("[::1]:{}", gw.admin.port()),
        ] {
            let resp = client
                .get(gw.admin_url(path))
                .header("host", &host)
                .send()
                .await
                .unwrap();
            assert_ne!(resp.status(), 403, "GET {path} with Host {host}");
        }
    }
    // every admin answer forbids framing and carries the policy
    let resp = client.get(gw.admin_url("/")).send().await.unwrap();
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
    let csp = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
    gw.stop().await;
}

/// `--admin-hostnames` (and `GATEWAY_ADMIN_HOSTNAMES`) adds names the admin
/// listener answers to; a bad name is a usage error.
#[tokio::test(flavor = "multi_thread")]
async fn admin_hostnames_flag_and_variable() {
    let ds = TestDownstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes");
    std::fs::create_dir_all(&routes).unwrap();
    std::fs::write(routes.join("r.yaml"), one_route(&ds)).unwrap();
    let client = crate::support::client();
    for (i, (flags, env)) in [
        (
            &["--admin-hostnames", "Gateway.Internal,ops.example"][..],
            &[][..],
        ),
        (
            &[][..],
            &[("GATEWAY_ADMIN_HOSTNAMES", "gateway.internal,ops.example")][..],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let store = format!("sqlite://{}", dir.path().join(format!("g{i}.db")).display());
        let p = support::process::serve(&routes, &store, flags, env);
        let port = p.admin.rsplit(':').next().unwrap().to_string();
        let get = |host: String| {
            client
                .get(format!("http://{}/admin/status", p.admin))
                .header("host", host)
                .send()
        };
        for ok in [
            "gateway.internal",
            "GATEWAY.internal",
            "ops.example",
            "localhost",
        ] {
            let resp = get(format!("{ok}:{port}")).await.unwrap();
            assert_eq!(resp.status(), 200, "{ok} ({flags:?} {env:?})");
        }
        for bad in ["other.example", "gateway.internal.evil.example"] {
            forbidden(get(format!("{bad}:{port}")).await.unwrap(), bad).await;
        }
    }
    let out = Command::new(BIN)
        .args(["serve", "--admin-hostnames", "gw.example:9090", "--routes"])
        .arg(&routes)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected a host name"),
        "{out:?}"
    );
}

/// The sign-in cookie is a signed expiry, not the token: `HttpOnly`,
/// `SameSite=Strict`, at most 12 h; the token itself, or an altered cookie,
/// does not sign in.
#[tokio::test(flavor = "multi_thread")]
async fn the_sign_in_cookie_is_not_the_token() {
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("r.yaml", &one_route(&ds))
        .admin_token("s3cret-admin-token")
        .start()
        .await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = client
        .post(gw.admin_url("/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", format!("http://{}", gw.admin))
        .body("token=s3cret-admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(!set.contains("s3cret"), "{set}");
    let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
    assert!(
        attrs.contains(&"HttpOnly") && attrs.contains(&"SameSite=Strict"),
        "{set}"
    );
    let max_age: u64 = attrs
        .iter()
        .find_map(|a| a.strip_prefix("Max-Age="))
        .expect("Max-Age")
        .parse()
        .unwrap();
    assert!(max_age > 0 && max_age <= 12 * 3600, "{set}");
    let cookie = attrs[0].to_owned();
    let status = |cookie: String| {
        client
            .get(gw.admin_url("/admin/status"))
            .header("cookie", cookie)
            .send()
    };
    assert_eq!(status(cookie.clone()).await.unwrap().status(), 200);
    // the old cookie (the token itself) no longer signs in
    assert_eq!(
        status("gateway_admin=s3cret-admin-token".into())
            .await
            .unwrap()
            .status(),
        401
    );
    // a later expiry under the same signature is refused
    let value = cookie.strip_prefix("gateway_admin=").unwrap();
    let (expires, mac) = value.split_once('.').unwrap();
    let later: u64 = expires.parse::<u64>().unwrap() + 3600;
    assert_eq!(
        status(format!("gateway_admin={later}.{mac}"))
            .await
            .unwrap()
            .status(),
        401
    );
    gw.stop().await;
}

/// The login form in a real headless Chromium: under the CSP it renders,
/// posts (same origin), and leaves a session cookie that is not the token
/// (`tests/browser/sign_in.mjs`; needs what `status_page_browser` needs).
#[tokio::test(flavor = "multi_thread")]
async fn sign_in_in_a_real_browser() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "the browser test needs Chromium and tests/browser/node_modules: run scripts/test.sh (it installs both)"
    );
    let ds = TestDownstream::start().await;
    let gw = TestGateway::builder()
        .file("r.yaml", &one_route(&ds))
        .admin_token("br0wser-admin-token")
        .start()
        .await;
    let admin = format!("http://{}", gw.admin);
    let script = browser_dir.join("sign_in.mjs");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .args([&admin, "br0wser-admin-token"])
            .output()
    })
    .await
    .unwrap()
    .expect("node runs");
    assert!(
        output.status.success(),
        "browser sign-in failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    gw.stop().await;
}
