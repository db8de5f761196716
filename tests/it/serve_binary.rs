//! The real `gateway serve` binary: start-up refusal, admin token rules,
//! reload on SIGHUP, and graceful shutdown on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::process::{kill, start};
use crate::support::{self, Scripted, TestDownstream, gateway_cmd, wait_until};

fn routes_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (n, c) in files {
        std::fs::write(d.path().join(n), c).unwrap();
    }
    d
}

/// `gateway serve` on `dir` and free loopback ports, logging JSON to a pipe;
/// an environment of only PATH (add to it with `.env`).
fn command(dir: &std::path::Path, extra: &[&str]) -> Command {
    let mut c = gateway_cmd();
    let admin = if extra.contains(&"--admin-listen") {
        &[][..]
    } else {
        &["--admin-listen", "127.0.0.1:0"][..]
    };
    // Each process its own store: one SQLite file belongs to one serve (SPEC §7.3).
    static STORES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STORES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = env!("CARGO_TARGET_TMPDIR");
    let store = format!("sqlite://{tmp}/serve_binary-{}-{n}.db", std::process::id());
    c.args(["serve", "--routes"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--store", &store])
        .args(admin)
        .args(extra);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn route_file(url: &str, path: &str) -> String {
    format!(
        "bots:\n  - id: b\n    auth: {{ api_key: {{ keys: [\"k\"] }} }}\nroutes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    downstream: {{ url: \"{url}{path}\" }}\n"
    )
}

#[test]
fn invalid_configuration_refuses_to_start_with_diagnostics() {
    let d = routes_dir(&[(
        "bad.yaml",
        "routes:\n  - name: r\n    intent: x\n    retyr: {}\n    downstream: { url: \"https://h/x\" }\n",
    )]);
    let out = command(d.path(), &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "bad.yaml:4:5: error: routes[0].retyr: unknown key `retyr`; did you mean `retry`?"
        ),
        "{err}"
    );
    assert!(err.contains("not starting"), "{err}");
}

#[test]
fn missing_env_var_is_an_error_for_serve() {
    let d = routes_dir(&[(
        "r.yaml",
        "bots:\n  - id: b\n    auth: { bearer: { tokens: [\"${BOT_TOKEN}\"] } }\n",
    )]);
    let out = command(d.path(), &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`BOT_TOKEN` not set"));
}

#[test]
fn a_lease_under_one_second_is_refused() {
    let d = routes_dir(&[("r.yaml", "")]);
    let flag = command(d.path(), &["--lease", "500ms"]).output().unwrap();
    let env = command(d.path(), &[])
        .env("GATEWAY_LEASE", "999ms")
        .output()
        .unwrap();
    for (out, value) in [(flag, "500ms"), (env, "999ms")] {
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("the lease must be at least 1s, got `{value}`")),
            "{err}"
        );
    }
}

#[test]
fn admin_listener_off_loopback_needs_a_token() {
    let d = routes_dir(&[("r.yaml", "")]);
    let out = command(d.path(), &["--admin-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("GATEWAY_ADMIN_TOKEN is required"));
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_token_is_enforced_and_never_shown() {
    let d = routes_dir(&[("r.yaml", "")]);
    let mut c = command(d.path(), &[]);
    c.env("GATEWAY_ADMIN_TOKEN", "adm1n-t0ken");
    let p = start(c);
    let client = support::client();
    let url = format!("http://{}/admin/status", p.admin);
    assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        client
            .get(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let resp = client
        .get(&url)
        .bearer_auth("adm1n-t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!resp.text().await.unwrap().contains("adm1n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_a_bad_file_keeps_the_running_config() {
    let ds = TestDownstream::start().await;
    let d = routes_dir(&[("r.yaml", &route_file(&ds.url(), "/v1"))]);
    // The file watcher waits an hour for quiet: only SIGHUP and the admin API
    // reload here (a watcher could apply the new file first, or the empty
    // file a write leaves for a moment).
    let p = start(command(d.path(), &["--reload-debounce-ms", "3600000"]));
    let client = support::client();
    let post = || {
        client
            .post(format!("http://{}/webhooks/b", p.listen))
            .header("x-api-key", "k")
            .body("{}")
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 200);
    let status = |c: &reqwest::Client| c.get(format!("http://{}/admin/status", p.admin)).send();
    let gen0 = support::json(status(&client).await.unwrap()).await["generation"]
        .as_u64()
        .unwrap();

    std::fs::write(d.path().join("r.yaml"), route_file(&ds.url(), "/v2")).unwrap();
    kill(&p.child, "-HUP");
    let gen1 = wait_until(Duration::from_secs(10), async || {
        let st = support::json(status(&client).await.unwrap()).await;
        st["generation"].as_u64().filter(|g| *g > gen0)
    })
    .await
    .expect("SIGHUP applies the new file within 10 s");
    assert_eq!(gen1, gen0 + 1);
    assert_eq!(post().await.unwrap().status(), 200);
    assert_eq!(ds.requests().last().unwrap().uri, "/v2");

    // a broken file: the old configuration keeps serving; status shows the failure
    std::fs::write(d.path().join("r.yaml"), "routes: [\n").unwrap();
    let resp = client
        .post(format!("http://{}/admin/reload", p.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let report = support::json(resp).await;
    assert_eq!(report["ok"], false);
    assert!(
        report["diagnostics"][0]
            .as_str()
            .unwrap()
            .contains("r.yaml:"),
        "{report}"
    );
    assert_eq!(post().await.unwrap().status(), 200);
    assert_eq!(ds.requests().last().unwrap().uri, "/v2");
    let st = support::json(status(&client).await.unwrap()).await;
    assert_eq!(
        (st["generation"].as_u64(), st["last_reload"]["ok"].as_bool()),
        (Some(gen1), Some(false))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_requests_and_exits_0() {
    let ds = TestDownstream::start().await;
    ds.hold(); // the request stays in flight until released
    let d = routes_dir(&[("r.yaml", &route_file(&ds.url(), "/slow"))]);
    let p = start(command(d.path(), &[]));
    let client = support::client();
    let url = format!("http://{}/webhooks/b", p.listen);
    let inflight = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .post(url)
                .header("x-api-key", "k")
                .body("{}")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    wait_until(Duration::from_secs(10), async || !ds.requests().is_empty())
        .await
        .expect("the request reaches the downstream");
    kill(&p.child, "-TERM");
    // Shutdown has begun while the request is still in flight; then it is answered.
    wait_until(Duration::from_secs(10), async || {
        p.lines.try_iter().any(|l| l.contains("shutdown requested"))
    })
    .await
    .expect("the gateway logs that shutdown began");
    ds.release();
    assert_eq!(
        inflight.await.unwrap(),
        200,
        "the in-flight request finished"
    );
    let (status, lines) = p.stop_wait().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        lines.iter().any(|l| l.contains("gateway stopped")),
        "{lines:?}"
    );
}

/// A log capture of a whole scripted run (debug level, both formats of auth
/// failures, OAuth2 grants and a rejected token, downstream failures, a
/// reload with a rotated secret) contains none of the configured secrets.
#[tokio::test(flavor = "multi_thread")]
async fn logs_of_a_full_run_contain_no_secret() {
    let ds = TestDownstream::start().await;
    let secrets = [
        "bot-k3y-aaaa",
        "crm-b3arer-bbbb",
        "oauth-s3cret-cccc",
        "adm1n-t0ken-dddd",
        "rotated-k3y-eeee",
    ];
    let files = |bot_key: &str| {
        format!(
            "bots:\n  - id: b\n    auth: {{ api_key: {{ keys: [\"${{BOT_KEY}}\", \"{bot_key}\"] }} }}\nroutes:\n  - name: bearer\n    bot: b\n    intent: x\n    downstream: {{ url: \"{u}/x\", auth: {{ bearer: {{ token: \"${{CRM_TOKEN}}\" }} }} }}\n  - name: oauth\n    bot: b\n    intent: \"*\"\n    downstream:\n      url: \"{u}/y\"\n      auth: {{ oauth2: {{ token_url: \"{u}/token\", client_id: c, client_secret: \"${{CRM_SECRET}}\" }} }}\n",
            u = ds.url()
        )
    };
    let d = routes_dir(&[("r.yaml", &files("literal-placeholder"))]);
    let mut c = command(d.path(), &[]);
    c.env("GATEWAY_LOG", "debug")
        .env("BOT_KEY", secrets[0])
        .env("CRM_TOKEN", secrets[1])
        .env("CRM_SECRET", secrets[2])
        .env("GATEWAY_ADMIN_TOKEN", secrets[3]);
    let p = start(c);
    let client = support::client();
    let hook = format!("http://{}/webhooks/b", p.listen);
    let post = |key: &'static str, body: &'static str| {
        client
            .post(&hook)
            .header("x-api-key", key)
            .body(body)
            .send()
    };
    assert_eq!(
        post("bot-k3y-aaaa", r#"{"intent":"x"}"#)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post("wrong-key", r#"{"intent":"x"}"#)
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        post("bot-k3y-aaaa", r#"{"intent":"y"}"#)
            .await
            .unwrap()
            .status(),
        200
    );
    // a token granted moments ago and refused: the 401 is the answer (SPEC 7.3)
    ds.push(Scripted::status(401));
    assert_eq!(
        post("bot-k3y-aaaa", r#"{"intent":"y"}"#)
            .await
            .unwrap()
            .status(),
        401
    );
    ds.push_token(
        Scripted::status(400)
            .body(r#"{"error":"invalid_client","error_description":"oauth-s3cret-cccc"}"#),
    );
    ds.set_default(Scripted::status(503));
    let _ = post("bot-k3y-aaaa", r#"{"intent":"x"}"#).await.unwrap();
    let admin = support::client();
    let _ = admin
        .get(format!("http://{}/admin/status", p.admin))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    let _ = admin
        .get(format!("http://{}/admin/routes", p.admin))
        .bearer_auth(secrets[3])
        .send()
        .await
        .unwrap();
    // a reload with a rotated (literal) key, then a broken file
    std::fs::write(d.path().join("r.yaml"), files(secrets[4])).unwrap();
    let _ = admin
        .post(format!("http://{}/admin/reload", p.admin))
        .bearer_auth(secrets[3])
        .send()
        .await
        .unwrap();
    std::fs::write(
        d.path().join("r.yaml"),
        format!("{}\n  - name: [", files(secrets[4])),
    )
    .unwrap();
    let _ = admin
        .post(format!("http://{}/admin/reload", p.admin))
        .bearer_auth(secrets[3])
        .send()
        .await
        .unwrap();
    let (_, lines) = p.stop("-TERM").await;
    let log = lines.join("\n");
    assert!(
        log.contains("\"webhook\"") || log.contains("webhook"),
        "the capture holds the run"
    );
    assert!(
        log.contains("reload rejected"),
        "the capture includes the failed reload"
    );
    for s in secrets {
        assert!(!log.contains(s), "secret {s} appeared in the logs:\n{log}");
    }
}

/// Payload values are logged only for fields a route opts into (`log_fields`).
#[tokio::test(flavor = "multi_thread")]
async fn only_opted_in_payload_fields_are_logged() {
    let ds = TestDownstream::start().await;
    let yaml = format!(
        "bots:\n  - id: b\n    auth: {{ api_key: {{ keys: [\"k\"] }} }}\nroutes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    log_fields: [/sessionId]\n    downstream: {{ url: \"{}/x\" }}\n",
        ds.url()
    );
    let d = routes_dir(&[("r.yaml", &yaml)]);
    let p = start(command(d.path(), &[]));
    let resp = support::client()
        .post(format!("http://{}/webhooks/b", p.listen))
        .header("x-api-key", "k")
        .body(r#"{"sessionId":"sess-visible-123","email":"pii-hidden@example.com"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, lines) = p.stop("-TERM").await;
    let webhook = lines
        .iter()
        .find(|l| l.contains("\"webhook\""))
        .expect("one webhook line");
    assert!(webhook.contains("sess-visible-123"), "{webhook}");
    assert!(!lines.iter().any(|l| l.contains("pii-hidden")), "{lines:?}");
}
