//! TLS on the public listener (SPEC §8) with the real binary: `--tls-cert`
//! and `--tls-key` from a throwaway CA; both files replaced (each atomically)
//! while the gateway runs: a new connection gets the new certificate, a
//! connection opened before keeps working, the route configuration is not
//! reloaded. The handshake counts under the header timeout.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::process::{Proc, serve};
use crate::support::tls::{Pem, TestCa, common_name};
use crate::support::{self, TestDownstream, wait_until};

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

fn connector(
    ca: &TestCa,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::TlsConnector {
    support::client(); // the process-wide rustls provider
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.cert.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn connect(c: &tokio_rustls::TlsConnector, addr: &str) -> std::io::Result<TlsStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    c.connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The common name of the certificate the server presented on `s`.
fn server_cn(s: &TlsStream) -> String {
    let der = s.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    common_name(&der).unwrap()
}

/// One HTTP/1.1 request on a kept-alive connection: the status and body.
async fn request(s: &mut TlsStream, head: &str, body: &str) -> (u16, String) {
    let req = format!(
        "{head}\r\nhost: localhost\r\nx-api-key: k\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the connection closed before the answer");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                    return (status, body);
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("an answer within 30 s")
}

fn write_atomic(path: &std::path::Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn generation(admin: &str) -> u64 {
    let s = support::json(
        support::client()
            .get(format!("http://{admin}/admin/status"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    s["generation"].as_u64().unwrap()
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    ca: TestCa,
    gw: Proc,
    _ds: TestDownstream,
}

async fn start(first: &str, extra: &[&str]) -> Setup {
    let ds = TestDownstream::start().await;
    let ca = TestCa::new("test CA");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let routes = dir.join("routes");
    std::fs::create_dir_all(&routes).unwrap();
    std::fs::write(
        routes.join("r.yaml"),
        format!(
            "bots:\n  - id: b\n    auth: {{ api_key: {{ keys: [\"k\"] }} }}\nroutes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    downstream: {{ url: \"{}/crm\" }}\n",
            ds.url()
        ),
    )
    .unwrap();
    ca.server(&["localhost"], first).write(&dir, "gw");
    let (cert, key) = (dir.join("gw.crt"), dir.join("gw.key"));
    let store = format!("sqlite://{}", dir.join("gw.db").display());
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--reload-debounce-ms",
        "50",
    ];
    args.extend_from_slice(extra);
    let gw = serve(&routes, &store, &args, &[]);
    Setup {
        _tmp: tmp,
        dir,
        ca,
        gw,
        _ds: ds,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_reaches_new_connections_and_spares_open_ones() {
    let s = start("gateway-v1", &[]).await;
    let tls = connector(&s.ca, rustls::DEFAULT_VERSIONS);
    let mut old = connect(&tls, &s.gw.listen).await.unwrap();
    assert_eq!(server_cn(&old), "gateway-v1");
    assert_eq!(
        old.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let webhook = "POST /webhooks/b HTTP/1.1";
    let (status, body) = request(&mut old, webhook, r#"{"sessionId":"s"}"#).await;
    assert_eq!(status, 200, "{body}");
    // TLS 1.2 is still offered
    let tls12 = connector(&s.ca, &[&rustls::version::TLS12]);
    let c12 = connect(&tls12, &s.gw.listen).await.unwrap();
    assert_eq!(
        c12.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    drop(c12);
    let generation_before = generation(&s.gw.admin).await;

    // Renewal: both files replaced, each by a rename (the certificate first).
    let renewed: Pem = s.ca.server(&["localhost"], "gateway-v2");
    write_atomic(&s.dir.join("gw.crt"), &renewed.cert);
    write_atomic(&s.dir.join("gw.key"), &renewed.key);
    let fresh = wait_until(Duration::from_secs(20), async || {
        let c = connect(&tls, &s.gw.listen).await.ok()?;
        (server_cn(&c) == "gateway-v2").then_some(c)
    })
    .await
    .expect("a new connection gets the renewed certificate");
    let mut fresh = fresh;
    let (status, _) = request(&mut fresh, webhook, r#"{"sessionId":"s"}"#).await;
    assert_eq!(status, 200);

    // The connection opened before keeps working, on its certificate.
    let (status, _) = request(&mut old, "GET /healthz HTTP/1.1", "").await;
    assert_eq!(status, 200);
    let (status, _) = request(&mut old, webhook, r#"{"sessionId":"s2"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(server_cn(&old), "gateway-v1");
    // The route configuration was not reloaded by it.
    assert_eq!(generation(&s.gw.admin).await, generation_before);

    // A key that does not belong to the certificate is refused; the renewed pair stays.
    let stray = s.ca.server(&["localhost"], "gateway-v3");
    write_atomic(&s.dir.join("gw.key"), &stray.key);
    let saw_refusal = wait_until(Duration::from_secs(20), async || {
        s.gw.lines
            .try_iter()
            .any(|l| l.contains("TLS certificate not reloaded") && l.contains("does not belong"))
    })
    .await;
    assert!(
        saw_refusal.is_some(),
        "a mismatched pair is refused and logged"
    );
    let c = connect(&tls, &s.gw.listen).await.unwrap();
    assert_eq!(server_cn(&c), "gateway-v2");

    let (status, lines) = s.gw.stop("-TERM").await;
    assert!(status.success(), "{lines:?}");
    assert!(!lines.join("\n").contains("PRIVATE KEY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_never_finished_is_closed_by_the_header_timeout() {
    let s = start("gateway", &["--header-timeout", "1s"]).await;
    let mut tcp = tokio::net::TcpStream::connect(&s.gw.listen).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("closed within the header timeout")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    // plain HTTP on the TLS port gets no HTTP answer
    let mut plain = tokio::net::TcpStream::connect(&s.gw.listen).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut out)).await;
    assert!(
        !out.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn unusable_tls_files_stop_serve() {
    let ca = TestCa::new("test CA");
    let tmp = tempfile::tempdir().unwrap();
    let a = ca.server(&["localhost"], "a");
    let b = ca.server(&["localhost"], "b");
    std::fs::write(tmp.path().join("a.crt"), &a.cert).unwrap();
    std::fs::write(tmp.path().join("b.key"), &b.key).unwrap();
    let out = support::gateway_cmd()
        .args(["serve", "--routes"])
        .arg(tmp.path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--store")
        .arg(format!("sqlite://{}", tmp.path().join("gw.db").display()))
        .env("GATEWAY_TLS_CERT", tmp.path().join("a.crt"))
        .env("GATEWAY_TLS_KEY", tmp.path().join("b.key"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS: the key in"), "{err}");
    assert!(err.contains("does not belong to the certificate"), "{err}");
    // one without the other is a usage error
    let out = support::gateway_cmd()
        .args(["serve", "--tls-cert", "x.crt"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
