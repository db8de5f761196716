//! Hostile traffic against the real binary (SPEC §7.1): slow headers and
//! bodies, floods of unknown bot names, forged log lines, credentials checked
//! before the body, JSON errors on both listeners. Each test prints the figures
//! it measured (`cargo test hostile -- --nocapture` shows them).

use crate::support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::TestDownstream;
use crate::support::process::{Proc, serve};

fn routes(url: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("r.yaml"),
        format!(
            "bots:\n  - id: b\n    auth: {{ api_key: {{ keys: [\"k\"] }} }}\nroutes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    downstream: {{ url: \"{url}/crm\" }}\n"
        ),
    )
    .unwrap();
    d
}

fn store(d: &tempfile::TempDir) -> String {
    format!("sqlite://{}", d.path().join("gw.db").display())
}

/// Resident set (now, peak) in KiB and open file descriptors of `pid`.
fn usage(pid: u32) -> (u64, u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (kib("VmRSS:"), kib("VmHWM:"), fds)
}

/// This process's soft limit of open files (the gateway it starts inherits it).
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// Sends `n` ordinary webhooks, `conc` at a time; all must answer 200. Their latencies.
async fn ordinary(client: &reqwest::Client, listen: &str, n: usize, conc: usize) -> Vec<Duration> {
    let mut all = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(conc) {
        let mut set = tokio::task::JoinSet::new();
        for _ in chunk {
            let c = client.clone();
            let url = format!("http://{listen}/webhooks/b");
            set.spawn(async move {
                let t = Instant::now();
                let r = c
                    .post(url)
                    .header("x-api-key", "k")
                    .body(r#"{"sessionId":"s"}"#)
                    .send()
                    .await
                    .expect("an ordinary webhook is answered during the attack");
                assert_eq!(r.status().as_u16(), 200);
                t.elapsed()
            });
        }
        while let Some(d) = set.join_next().await {
            all.push(d.unwrap());
        }
    }
    all
}

/// Opens a connection and sends `head` (without the blank line), then one
/// more header line every `every` until the server closes it. How long it lived.
async fn trickle_headers(listen: String, every: Duration, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect(&listen).await.ok()?;
    s.write_all(b"POST /webhooks/b HTTP/1.1\r\nHost: x\r\n")
        .await
        .ok()?;
    let mut buf = [0u8; 256];
    while start.elapsed() < within {
        if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
            return Some(start.elapsed());
        }
        match tokio::time::timeout(every, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => {} // still open: trickle on
        }
    }
    None
}

/// Sends complete headers (valid key, a 1000-byte body announced), then one
/// body byte every `every`. The status it gets (408 expected) and when, or
/// what happened instead (so a failure says which way it failed).
async fn trickle_body(
    listen: String,
    every: Duration,
    within: Duration,
) -> Result<(u16, Duration), String> {
    let start = Instant::now();
    let mut s = TcpStream::connect(&listen)
        .await
        .map_err(|e| format!("connect failed after {:?}: {e}", start.elapsed()))?;
    s.write_all(b"POST /webhooks/b HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        .await
        .map_err(|e| format!("writing the head failed after {:?}: {e}", start.elapsed()))?;
    let mut buf = vec![0u8; 4096];
    while start.elapsed() < within {
        let _ = s.write_all(b" ").await;
        match tokio::time::timeout(every, s.read(&mut buf)).await {
            Ok(Ok(0)) => {
                return Err(format!(
                    "closed without an answer after {:?}",
                    start.elapsed()
                ));
            }
            Ok(Ok(n)) => {
                let head = String::from_utf8_lossy(&buf[..n]);
                let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok());
                return code.map(|c| (c, start.elapsed())).ok_or_else(|| {
                    format!("not an HTTP answer after {:?}: {head:?}", start.elapsed())
                });
            }
            Ok(Err(e)) => return Err(format!("read failed after {:?}: {e}", start.elapsed())),
            Err(_) => {} // nothing yet: trickle on
        }
    }
    Err(format!("no answer within {within:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_bodies_do_not_starve_ordinary_webhooks() {
    let ds = TestDownstream::start().await;
    let d = routes(&ds.url());
    let p: Proc = serve(
        d.path(),
        &store(&d),
        &["--header-timeout", "3s", "--body-timeout", "3s"],
        &[],
    );
    let pid = p.child.id();
    let listen = p.listen.clone();
    let client = crate::support::client();
    let base = ordinary(&client, &listen, 200, 4).await;
    let (_, _, fds_before) = usage(pid);

    // 2,000 + 200 attack connections; fewer when the fd limit is lower
    // (scripts/test.sh raises it to the hard limit).
    let room = open_files_limit().saturating_sub(300);
    let n_heads = 2000.min(room * 10 / 11);
    let n_bodies = n_heads / 10;
    let slow_heads: Vec<_> = (0..n_heads)
        .map(|_| {
            tokio::spawn(trickle_headers(
                listen.clone(),
                Duration::from_millis(500),
                Duration::from_secs(20),
            ))
        })
        .collect();
    let slow_bodies: Vec<_> = (0..n_bodies)
        .map(|_| {
            tokio::spawn(trickle_body(
                listen.clone(),
                Duration::from_millis(500),
                Duration::from_secs(20),
            ))
        })
        .collect();
    // Let the attack connections open, then measure ordinary traffic among them.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (rss, _, fds_during) = usage(pid);
    let during = ordinary(&client, &listen, 200, 4).await;

    let mut closed_after = Vec::new();
    for h in slow_heads {
        let lived = h
            .await
            .unwrap()
            .expect("a header trickler is closed by the gateway");
        closed_after.push(lived);
    }
    let mut bodies = Vec::new();
    for h in slow_bodies {
        let (code, after) = h
            .await
            .unwrap()
            .unwrap_or_else(|why| panic!("a body trickler gets an answer: {why}"));
        assert_eq!(code, 408, "a slow body is answered 408 body_timeout");
        bodies.push(after);
    }
    let (_, peak, _) = usage(pid);
    let longest_head = closed_after.iter().max().unwrap();
    let longest_body = bodies.iter().max().unwrap();
    // Closed by the 3 s timers (with room for a loaded 2-core machine), not by our 20 s limit.
    assert!(*longest_head < Duration::from_secs(10), "{longest_head:?}");
    assert!(*longest_body < Duration::from_secs(10), "{longest_body:?}");
    eprintln!(
        "hostile/slow: {n_heads} header + {n_bodies} body tricklers; ordinary p99 {:?} without, {:?} during; \
         gateway RSS {} KiB during, peak {} KiB; fds {} before, {} during; \
         tricklers closed after at most {:?} (headers) / {:?} (bodies, 408)",
        p99(base),
        p99(during),
        rss,
        peak,
        fds_before,
        fds_during,
        longest_head,
        longest_body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bot_names_do_not_grow_metrics_or_memory() {
    let ds = TestDownstream::start().await;
    let d = routes(&ds.url());
    let p = serve(d.path(), &store(&d), &[], &[]);
    let pid = p.child.id();
    let client = crate::support::client();
    let metrics = |c: reqwest::Client, admin: String| async move {
        c.get(format!("http://{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // one of each kind first, so the families exist before the flood
    let r = client
        .post(format!("http://{}/webhooks/nobody", p.listen))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let before = metrics(client.clone(), p.admin.clone()).await;
    let (rss_before, _, _) = usage(pid);
    // 20,000 in the suite (a debug build sends ~600/s on 2 cores);
    // HOSTILE_BOT_NAMES=100000 for the full figure.
    let n: usize = std::env::var("HOSTILE_BOT_NAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let started = Instant::now();
    let conc = 32;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..conc {
        let c = client.clone();
        let listen = p.listen.clone();
        set.spawn(async move {
            for i in (w..n).step_by(conc) {
                // long random-looking names, some with encoded newlines
                let name = format!("bot-{i:x}-{}%0Aforged", "x".repeat(200 + i % 300));
                let r = c
                    .post(format!("http://{listen}/webhooks/{name}"))
                    .body("{}")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 404);
                r.bytes().await.unwrap(); // read to the end: the connection is reused
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let took = started.elapsed();
    let after = metrics(client.clone(), p.admin.clone()).await;
    let (rss_after, peak, _) = usage(pid);
    assert!(
        after.len() < before.len() + 512,
        "/metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    assert!(after.contains(r#"bot="_unknown""#), "{after}");
    assert!(!after.contains("forged"));
    eprintln!(
        "hostile/bots: {n} requests to random bot names in {took:?}; /metrics {} -> {} bytes; \
         RSS {rss_before} -> {rss_after} KiB (peak {peak} KiB)",
        before.len(),
        after.len()
    );
}

#[tokio::test]
async fn a_wrong_key_is_refused_before_the_body_arrives() {
    let ds = TestDownstream::start().await;
    let d = routes(&ds.url());
    let p = serve(d.path(), &store(&d), &["--body-timeout", "30s"], &[]);
    // A body of 1000 bytes is announced and never sent.
    let mut s = TcpStream::connect(&p.listen).await.unwrap();
    s.write_all(
        b"POST /webhooks/b HTTP/1.1\r\nHost: x\r\nX-API-Key: wrong\r\nContent-Length: 1000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains(r#""error":"unauthorized""#), "{answer}");
    // An over-limit Content-Length still gets 413 first, even with a wrong key.
    let mut s = TcpStream::connect(&p.listen).await.unwrap();
    s.write_all(b"POST /webhooks/b HTTP/1.1\r\nHost: x\r\nX-API-Key: wrong\r\nContent-Length: 99999999\r\n\r\n")
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 413"));
}

#[tokio::test]
async fn both_listeners_answer_unknown_paths_and_methods_with_json() {
    let ds = TestDownstream::start().await;
    let d = routes(&ds.url());
    let p = serve(d.path(), &store(&d), &[], &[]);
    let c = crate::support::client();
    for (method, url, status) in [
        ("GET", format!("http://{}/webhooks/b", p.listen), 405),
        ("GET", format!("http://{}/nope", p.listen), 404),
        ("POST", format!("http://{}/healthz", p.listen), 405),
        ("GET", format!("http://{}/nope", p.admin), 404),
        ("GET", format!("http://{}/admin/reload", p.admin), 405),
        ("DELETE", format!("http://{}/admin/status", p.admin), 405),
    ] {
        let r = c
            .request(method.parse().unwrap(), &url)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {url}");
        assert!(r.headers().contains_key("x-request-id"), "{method} {url}");
        if status == 405 {
            assert!(r.headers().contains_key("allow"), "{method} {url}");
        }
        let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        let kind = if status == 404 {
            "not_found"
        } else {
            "method_not_allowed"
        };
        assert_eq!(body["error"], kind, "{method} {url}");
    }
}

#[tokio::test]
async fn a_webhook_log_line_cannot_be_forged_or_stretched() {
    let ds = TestDownstream::start().await;
    let d = routes(&ds.url());
    let mut cmd = crate::support::gateway_cmd();
    cmd.args(["serve", "--routes"])
        .arg(d.path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--store", &store(&d), "--log-format", "text"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GATEWAY_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let p = support::process::start_text(cmd);
    let c = crate::support::client();
    let long = "y".repeat(60_000);
    for name in [
        format!("evil%0A2026-12-02T00:00:00Z%20INFO%20forged%20line{long}"),
        "evil%0D%0Aforged".to_owned(),
    ] {
        let r = c
            .post(format!("http://{}/webhooks/{name}", p.listen))
            .header("x-request-id", "rid-forge")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404);
    }
    // A later request: once its line is logged, the two above were too.
    c.post(format!("http://{}/webhooks/b", p.listen))
        .header("x-api-key", "k")
        .header("x-request-id", "rid-last")
        .body(r#"{"sessionId":"s"}"#)
        .send()
        .await
        .unwrap();
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lines.iter().any(|l: &String| l.contains("rid-last")) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = p
            .lines
            .recv_timeout(left)
            .expect("the webhook lines are logged");
        lines.push(line);
    }
    let webhook: Vec<_> = lines.iter().filter(|l| l.contains("rid-forge")).collect();
    assert_eq!(webhook.len(), 2, "{lines:#?}");
    for l in &webhook {
        assert!(
            l.len() < 1024,
            "a webhook line is bounded: {} bytes",
            l.len()
        );
        assert!(l.contains(r"evil\n") || l.contains(r"evil\r\n"), "{l}");
    }
    assert!(
        !lines.iter().any(|l| l.starts_with("2026-12-02T00:00:00Z")),
        "a forged line: {lines:#?}"
    );
}
