//! Test support: a real local downstream (`TestDownstream`, with a token
//! endpoint) and a real gateway (`TestGateway`) on 127.0.0.1:0; [`pg`] gives a
//! real PostgreSQL; [`process`] runs the real binary ([`gateway_cmd`]);
//! [`wait_until`] is the one way to wait for something.

pub mod pg;
pub mod process;
pub mod proxy;
pub mod tls;
pub mod wait;

pub use process::gateway_cmd;
pub use wait::wait_until;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cognigy_gateway::runtime::Limits;
use cognigy_gateway::server::{ServeError, Server, Settings};

/// Installs the rustls provider reqwest is built to use (`rustls-no-provider`)
/// for the whole process; the first call does it, later ones find it there.
fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// An HTTP client for tests: the rustls provider installed first (so no test
/// depends on another having made a client before it), and a 30 s bound on
/// every request (no test waits for an answer without one).
pub fn client() -> reqwest::Client {
    client_builder().build().expect("an HTTP client")
}

/// [`client`]'s builder, for settings of a test's own.
pub fn client_builder() -> reqwest::ClientBuilder {
    init();
    reqwest::Client::builder().timeout(Duration::from_secs(30))
}

/// One request the downstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query exactly as sent (still percent-encoded).
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it arrived (wall clock, comparable with lease times in the store).
    pub received: SystemTime,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("downstream body is JSON")
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Duration,
    /// Close the connection without answering.
    pub drop: bool,
}

impl Scripted {
    pub fn status(status: u16) -> Self {
        Scripted {
            status,
            headers: vec![],
            body: r#"{"id":"crm-1"}"#.into(),
            delay: Duration::ZERO,
            drop: false,
        }
    }
    pub fn body(mut self, b: &str) -> Self {
        self.body = b.into();
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    pub fn dropped() -> Self {
        Scripted {
            drop: true,
            ..Scripted::status(0)
        }
    }
}

#[derive(Default)]
struct DsState {
    requests: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Scripted>>,
    default: Mutex<Option<Scripted>>,
    token_script: Mutex<VecDeque<Scripted>>,
    grants: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// `Idempotency-Key`s of the requests being answered right now, with how many of each.
    keys_in_flight: Mutex<HashMap<String, usize>>,
    /// Keys that arrived again while a request with the same key was still being answered.
    overlaps: Mutex<Vec<String>>,
    /// While true, requests (token requests excepted) wait before being answered.
    held: tokio::sync::watch::Sender<bool>,
}

/// A real HTTP downstream on 127.0.0.1 that records what it receives.
/// `POST /token` is an OAuth2 token endpoint issuing `tok-1`, `tok-2`, …
pub struct TestDownstream {
    pub addr: SocketAddr,
    state: Arc<DsState>,
}

impl TestDownstream {
    pub async fn start() -> Self {
        let state = Arc::new(DsState::default());
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestDownstream { addr, state }
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Answers for the next requests, in order (then the default).
    pub fn push(&self, s: Scripted) {
        self.state.script.lock().unwrap().push_back(s);
    }
    pub fn set_default(&self, s: Scripted) {
        *self.state.default.lock().unwrap() = Some(s);
    }
    pub fn push_token(&self, s: Scripted) {
        self.state.token_script.lock().unwrap().push_back(s);
    }
    /// Requests received (token requests excluded).
    pub fn requests(&self) -> Vec<Recorded> {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.uri != "/token")
            .cloned()
            .collect()
    }
    pub fn token_requests(&self) -> Vec<Recorded> {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.uri == "/token")
            .cloned()
            .collect()
    }
    pub fn grants(&self) -> usize {
        self.state.grants.load(Ordering::SeqCst)
    }
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
    /// Idempotency keys that were in flight twice at once: a second request
    /// with the key arrived before the first one was answered (or abandoned
    /// by its client). Requests without the header are not tracked.
    pub fn overlaps(&self) -> Vec<String> {
        self.state.overlaps.lock().unwrap().clone()
    }
    /// From now on, requests wait unanswered (after being recorded) until [`Self::release`].
    pub fn hold(&self) {
        self.state.held.send_replace(true);
    }
    /// Answers the held requests and stops holding.
    pub fn release(&self) {
        self.state.held.send_replace(false);
    }
}

/// An idempotency key in flight at the downstream, from arrival until its
/// answer is written or its client goes away (the handler is then dropped).
struct KeyInFlight<'a> {
    st: &'a DsState,
    key: String,
}

impl<'a> KeyInFlight<'a> {
    fn enter(st: &'a DsState, key: String) -> Self {
        let mut keys = st.keys_in_flight.lock().unwrap();
        let n = keys.entry(key.clone()).or_default();
        *n += 1;
        if *n > 1 {
            st.overlaps.lock().unwrap().push(key.clone());
        }
        drop(keys);
        KeyInFlight { st, key }
    }
}

impl Drop for KeyInFlight<'_> {
    fn drop(&mut self) {
        let mut keys = self.st.keys_in_flight.lock().unwrap();
        if let Some(n) = keys.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

async fn handle(State(st): State<Arc<DsState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let key = parts
        .headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let _key = key.map(|k| KeyInFlight::enter(&st, k));
    st.requests.lock().unwrap().push(Recorded {
        method: parts.method.to_string(),
        uri: uri.clone(),
        headers: parts.headers,
        body,
        received: SystemTime::now(),
    });
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = Decrement(&st.in_flight);
    if uri == "/token" {
        let scripted = st.token_script.lock().unwrap().pop_front();
        if let Some(s) = scripted {
            return answer(s).await;
        }
        let n = st.grants.fetch_add(1, Ordering::SeqCst) + 1;
        // a little latency so concurrent callers overlap
        tokio::time::sleep(Duration::from_millis(20)).await;
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            format!(r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":3600}}"#),
        )
            .into_response();
    }
    let _ = st.held.subscribe().wait_for(|held| !held).await;
    let next = st.script.lock().unwrap().pop_front();
    let s = next
        .or_else(|| st.default.lock().unwrap().clone())
        .unwrap_or_else(|| Scripted::status(200));
    answer(s).await
}

struct Decrement<'a>(&'a AtomicUsize);
impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(s: Scripted) -> Response {
    if !s.delay.is_zero() {
        tokio::time::sleep(s.delay).await;
    }
    if s.drop {
        // Ends the connection task without an answer (resume_unwind skips the panic hook).
        std::panic::resume_unwind(Box::new("dropped by script"));
    }
    let mut resp = (StatusCode::from_u16(s.status).unwrap(), s.body).into_response();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    for (k, v) in s.headers {
        resp.headers_mut().insert(
            axum::http::HeaderName::try_from(k).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}

/// The body of a response as JSON (reqwest is built without its `json` feature).
pub async fn json(resp: reqwest::Response) -> serde_json::Value {
    let text = resp.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
}

/// Sends a raw HTTP/1.1 request and returns the status line's code (within 30 s).
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A gateway on 127.0.0.1:0 with the given route files.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

pub struct GatewayBuilder {
    files: Vec<(String, String)>,
    env: HashMap<String, String>,
    limits: Limits,
    admin_token: Option<String>,
    watch: bool,
    subdir: Option<String>,
}

impl TestGateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            files: vec![],
            env: HashMap::new(),
            limits: Limits::default(),
            admin_token: None,
            watch: false,
            subdir: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// POSTs `body` to `/webhooks/{bot}` with `headers`.
    pub async fn post(
        &self,
        bot: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .post(self.url(&format!("/webhooks/{bot}")))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(body).send().await.expect("gateway answers")
    }

    /// POSTs JSON with the test bot's key.
    pub async fn send(
        &self,
        bot: &str,
        payload: &serde_json::Value,
    ) -> (u16, HeaderMap, serde_json::Value) {
        let resp = self
            .post(bot, &[("x-api-key", "test-key")], payload.to_string())
            .await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("gateway answer is JSON: {text:?}"));
        (status, headers, body)
    }

    /// `POST /admin/deliveries/{id}/replay`, which must answer 200.
    pub async fn replay(&self, id: &str) {
        let resp = self
            .client
            .post(self.admin_url(&format!("/admin/deliveries/{id}/replay")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl GatewayBuilder {
    pub fn file(mut self, name: &str, content: &str) -> Self {
        self.files.push((name.into(), content.into()));
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }
    pub fn limits(mut self, l: Limits) -> Self {
        self.limits = l;
        self
    }
    pub fn admin_token(mut self, t: &str) -> Self {
        self.admin_token = Some(t.into());
        self
    }

    /// Starts with route files under `<tmp>/<sub>` (the routes dir) and `other` files under `<tmp>`.
    pub async fn start_in_subdir(
        mut self,
        sub: &str,
        routes: &[(&str, &str)],
        other: &[(&str, &str)],
    ) -> TestGateway {
        self.files.clear();
        for (n, c) in routes {
            self.files.push((format!("{sub}/{n}"), (*c).to_string()));
        }
        for (n, c) in other {
            self.files.push(((*n).to_string(), (*c).to_string()));
        }
        self.watch = true;
        self.subdir = Some(sub.to_string());
        self.start().await
    }

    pub async fn start(self) -> TestGateway {
        init();
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in &self.files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        let routes: PathBuf = match &self.subdir {
            Some(sub) => dir.path().join(sub),
            None => dir.path().to_path_buf(),
        };
        std::fs::create_dir_all(&routes).unwrap();
        let env = self.env.clone();
        let mut settings = Settings::new(
            routes,
            format!("sqlite://{}", dir.path().join("gateway.db").display()),
            Box::new(move |k: &str| env.get(k).cloned()),
        );
        settings.limits = self.limits;
        settings.admin_token = self.admin_token.map(Into::into);
        settings.shutdown_grace = Duration::from_secs(5);
        settings.watch = self.watch.then(|| Duration::from_millis(50));
        settings.sighup = false;
        settings.worker.poll = Duration::from_millis(20);
        // The production start-up: the first load, store, worker, watcher, probes.
        let server = match Server::start(settings).await {
            Ok(s) => s,
            Err(e) => panic!(
                "the test gateway does not start: {e}\n{}",
                e.diagnostics_text(std::path::Path::new("/"))
                    .unwrap_or_default()
            ),
        };
        let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (public.local_addr().unwrap(), admin.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(public, admin, async move {
            let _ = rx.await;
        }));
        TestGateway {
            addr,
            admin: admin_addr,
            client: client(),
            dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }
}

/// A bot with `api_key` auth (`test-key`) and a light schema.
pub fn bot_file(id: &str) -> String {
    format!(
        r#"bots:
  - id: {id}
    auth: {{ api_key: {{ keys: ["test-key", "rotated-key"] }} }}
    schema: schemas/payload.json
"#
    )
}

pub const PAYLOAD_SCHEMA: &str = r#"{
  "type": "object",
  "required": ["sessionId"],
  "properties": {
    "sessionId": {"type": "string"},
    "intent": {"type": ["string", "null"]},
    "slots": {"type": "object"}
  }
}"#;

/// A route file for the real binary: bot `b` (API key `k`) and one async route
/// `r` to `{url}/crm`, keyed by the payload's `inputId` (also sent as the
/// body `{"inputId": …}`), with the async `schedule` and `downstream` keys
/// added to its downstream block. The route's keys end the file: append
/// lines of the form `    key: value` for more.
pub fn async_route_file(url: &str, downstream: &[(&str, &str)], schedule: &str) -> String {
    let more: String = downstream
        .iter()
        .map(|(k, v)| format!(", {k}: {v}"))
        .collect();
    format!(
        "bots:\n  - id: b\n    auth: {{ api_key: {{ keys: [\"k\"] }} }}\nroutes:\n  - name: r\n    bot: b\n    intent: \"*\"\n    mode: async\n    idempotency_key: \"{{{{inputId}}}}\"\n    downstream: {{ url: \"{url}/crm\"{more} }}\n    body: '{{\"inputId\": {{{{json inputId}}}}}}'\n    retry: {{ schedule: [{schedule}] }}\n"
    )
}

/// Every request the downstream saw carries an idempotency key, and it is
/// the key of the delivery in its body: a delivery sent twice is sent with
/// the same key. Returns the keys, one per request.
pub fn keys_of_requests(ds: &TestDownstream) -> Vec<String> {
    ds.requests()
        .iter()
        .map(|r| {
            let key = r.header("idempotency-key").expect("an idempotency key");
            assert_eq!(r.json()["inputId"], key.as_str(), "body and key differ");
            key
        })
        .collect()
}

/// POSTs a webhook for [`async_route_file`] with `inputId` = `key` to the
/// gateway listening on `listen`: the delivery id when it answered 202,
/// `None` when it refused or the request failed (e.g. cut off by a kill).
pub async fn post_keyed(client: &reqwest::Client, listen: &str, key: &str) -> Option<String> {
    let resp = client
        .post(format!("http://{listen}/webhooks/b"))
        .header("x-api-key", "k")
        .body(format!(r#"{{"sessionId":"s","inputId":"{key}"}}"#))
        .send()
        .await
        .ok()?;
    if resp.status().as_u16() != 202 {
        return None;
    }
    let body: serde_json::Value = serde_json::from_str(&resp.text().await.ok()?).ok()?;
    body["delivery_id"].as_str().map(str::to_owned)
}
