//! A small HTTP proxy on 127.0.0.1 for tests, which records what passes:
//! `CONNECT host:port` tunnels (https), and absolute-form requests
//! (`GET http://host:port/path`, plain http) forwarded one per connection
//! with `connection: close`. Only loopback targets are served.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What went through the proxy, in order: `CONNECT host:port`, or
/// `METHOD http://host:port/path` for a forwarded request.
pub struct TestProxy {
    pub addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    /// `Proxy-Authorization` values received.
    auth: Arc<Mutex<Vec<String>>>,
}

impl TestProxy {
    pub async fn start() -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let auth = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (seen.clone(), auth.clone());
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let (s, a) = (s.clone(), a.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(60), handle(conn, s, a)).await;
                });
            }
        });
        TestProxy { addr, seen, auth }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    pub fn proxy_authorizations(&self) -> Vec<String> {
        self.auth.lock().unwrap().clone()
    }
}

/// Reads up to the end of the head; returns it and what came after it.
async fn read_head(conn: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Some((head, buf[end + 4..].to_vec()));
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
    }
}

fn loopback(host_port: &str) -> bool {
    host_port.starts_with("127.0.0.1:") || host_port.starts_with("localhost:")
}

async fn handle(
    mut conn: TcpStream,
    seen: Arc<Mutex<Vec<String>>>,
    auth: Arc<Mutex<Vec<String>>>,
) -> Option<()> {
    let (head, rest) = read_head(&mut conn).await?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if let Some((_, v)) = headers.iter().find(|(k, _)| k == "proxy-authorization") {
        auth.lock().unwrap().push(v.clone());
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    if method == "CONNECT" {
        seen.lock().unwrap().push(format!("CONNECT {target}"));
        if !loopback(&target) {
            conn.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                .await
                .ok()?;
            return None;
        }
        let mut upstream = TcpStream::connect(&target).await.ok()?;
        conn.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .ok()?;
        upstream.write_all(&rest).await.ok()?;
        let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
        return Some(());
    }
    // absolute form: http://host:port/path
    seen.lock().unwrap().push(format!("{method} {target}"));
    let without = target.strip_prefix("http://")?;
    let (host_port, path) = match without.find('/') {
        Some(i) => (&without[..i], &without[i..]),
        None => (without, "/"),
    };
    if !loopback(host_port) {
        conn.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            .await
            .ok()?;
        return None;
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = rest;
    while body.len() < len {
        let mut chunk = vec![0u8; len - body.len()];
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in &headers {
        if !matches!(
            k.as_str(),
            "connection" | "proxy-connection" | "proxy-authorization"
        ) {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str("connection: close\r\n\r\n");
    let mut upstream = TcpStream::connect(host_port).await.ok()?;
    upstream.write_all(out.as_bytes()).await.ok()?;
    upstream.write_all(&body).await.ok()?;
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer).await.ok()?;
    conn.write_all(&answer).await.ok()?;
    let _ = conn.shutdown().await;
    Some(())
}
