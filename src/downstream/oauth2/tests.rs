//! Tests of the client-credentials token cache against a real token endpoint
//! on 127.0.0.1:0 (scripted replies): single flight, refresh timing on paused
//! time, refresh after a 401, what is sent, clear errors, and that no secret
//! or token reaches any output.

use super::*;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::{Notify, Semaphore};

const SECRET: &str = "s3cr&t p@ss:word";
/// Every token the test endpoint issues contains this marker.
const TOKEN_MARK: &str = "TOKENVALUE";

// ---------- a real token endpoint on 127.0.0.1:0 ----------

#[derive(Clone)]
enum Reply {
    /// A valid token answer; `expires_in` as given (None = omitted).
    Token {
        expires_in: Option<serde_json::Value>,
    },
    /// Anything else, verbatim.
    Raw {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
}

struct Received {
    authorization: Option<String>,
    content_type: Option<String>,
    form: Vec<(String, String)>,
}

struct EndpointState {
    grants: AtomicU64,
    received: Mutex<Vec<Received>>,
    reply: Mutex<Reply>,
    /// Each request takes (and forgets) one permit before answering.
    gate: Semaphore,
    /// Signalled when a request arrives.
    arrived: Notify,
}

struct TestEndpoint {
    url: Url,
    state: Arc<EndpointState>,
}

impl TestEndpoint {
    async fn start(reply: Reply) -> Self {
        Self::start_gated(reply, Semaphore::MAX_PERMITS).await
    }

    /// `permits` requests are answered at once; later ones wait for `release`.
    async fn start_gated(reply: Reply, permits: usize) -> Self {
        let state = Arc::new(EndpointState {
            grants: AtomicU64::new(0),
            received: Mutex::default(),
            reply: Mutex::new(reply),
            gate: Semaphore::new(permits),
            arrived: Notify::new(),
        });
        let app = axum::Router::new()
            .route("/oauth/token", axum::routing::post(handle))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let url = Url::parse(&format!("http://{addr}/oauth/token")).unwrap();
        Self { url, state }
    }

    fn grants(&self) -> u64 {
        self.state.grants.load(Ordering::SeqCst)
    }

    fn set_reply(&self, reply: Reply) {
        *self.state.reply.lock().unwrap() = reply;
    }

    fn release(&self, permits: usize) {
        self.state.gate.add_permits(permits);
    }

    fn creds(&self, client_auth: ClientAuth) -> ClientCredentials {
        ClientCredentials {
            token_url: self.url.clone(),
            client_id: "gateway client".to_owned(),
            client_secret: SecretString::from(SECRET),
            scopes: vec!["crm:write".to_owned(), "crm:read".to_owned()],
            client_auth,
            params: Vec::new(),
        }
    }

    fn last_received(&self) -> Received {
        self.state
            .received
            .lock()
            .unwrap()
            .pop()
            .expect("a request")
    }
}

async fn handle(
    State(state): State<Arc<EndpointState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = state.grants.fetch_add(1, Ordering::SeqCst) + 1;
    let header = |name| {
        headers
            .get(name)
            .map(|v: &HeaderValue| v.to_str().unwrap().to_owned())
    };
    state.received.lock().unwrap().push(Received {
        authorization: header(AUTHORIZATION),
        content_type: header(CONTENT_TYPE),
        form: url::form_urlencoded::parse(&body).into_owned().collect(),
    });
    state.arrived.notify_one();
    state.gate.acquire().await.unwrap().forget();
    let reply = state.reply.lock().unwrap().clone();
    match reply {
        Reply::Token { expires_in } => {
            let mut body = serde_json::json!({
                "access_token": format!("tok-{n}-{TOKEN_MARK}"),
                "token_type": "Bearer",
            });
            if let Some(expires_in) = expires_in {
                body["expires_in"] = expires_in;
            }
            axum::Json(body).into_response()
        }
        Reply::Raw {
            status,
            headers,
            body,
        } => {
            let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
            for (name, value) in headers {
                response
                    .headers_mut()
                    .insert(name, HeaderValue::from_str(&value).unwrap());
            }
            response
        }
    }
}

fn token_reply(expires_in: u64) -> Reply {
    Reply::Token {
        expires_in: Some(expires_in.into()),
    }
}

fn raw(status: u16, body: &str) -> Reply {
    Reply::Raw {
        status,
        headers: vec![("content-type", "application/json".to_owned())],
        body: body.to_owned(),
    }
}

fn cache() -> TokenCache {
    // reqwest is built with `rustls-no-provider`; the binary installs
    // ring in main, tests do it here (a second install is a no-op error).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // refresh after a 401 whatever the token's age (tests of the age rule set their own)
    TokenCache::new(client).with_min_refresh_age(Duration::ZERO)
}

/// Failed grants remembered for `ms` milliseconds (doubling up to 100×).
fn short_backoff(ms: u64) -> Backoff {
    Backoff::try_new(Duration::from_millis(ms), Duration::from_millis(ms * 100)).unwrap()
}

fn number(token: &AccessToken) -> u64 {
    let raw = token.expose_secret();
    raw.split('-').nth(1).unwrap().parse().unwrap()
}

// ---------- single flight and caching ----------

#[tokio::test]
async fn hundred_concurrent_cold_calls_make_one_grant() {
    let endpoint = TestEndpoint::start_gated(token_reply(3600), 0).await;
    let cache = Arc::new(cache());
    let creds = Arc::new(endpoint.creds(ClientAuth::Basic));
    let callers: Vec<_> = (0..100)
        .map(|_| {
            let (cache, creds) = (Arc::clone(&cache), Arc::clone(&creds));
            tokio::spawn(async move { cache.token(&creds).await })
        })
        .collect();
    // The grant is in flight (held by the gate) while every caller waits.
    endpoint.state.arrived.notified().await;
    endpoint.release(1);
    for caller in callers {
        let token = caller.await.unwrap().unwrap();
        assert_eq!(number(&token), 1);
    }
    assert_eq!(endpoint.grants(), 1);
    assert_eq!(cache.stats().grants, 1);
}

#[tokio::test]
async fn cached_token_is_reused() {
    let endpoint = TestEndpoint::start(token_reply(3600)).await;
    let cache = cache();
    let creds = endpoint.creds(ClientAuth::Basic);
    let first = cache.token(&creds).await.unwrap();
    for _ in 0..5 {
        assert_eq!(cache.token(&creds).await.unwrap(), first);
    }
    // Same scopes in another order: same key, same token.
    let reordered = ClientCredentials {
        scopes: vec!["crm:read".into(), "crm:write".into(), "crm:read".into()],
        ..creds.clone()
    };
    assert_eq!(cache.token(&reordered).await.unwrap(), first);
    assert_eq!(endpoint.grants(), 1);
    // Other scopes: another key.
    let other = ClientCredentials {
        scopes: vec!["crm:admin".into()],
        ..creds
    };
    assert_ne!(cache.token(&other).await.unwrap(), first);
    assert_eq!(endpoint.grants(), 2);
    assert_eq!(
        cache.stats(),
        TokenCacheStats {
            grants: 2,
            grant_failures: 0,
            keys: 2
        }
    );
}

#[tokio::test]
async fn waiters_share_a_failed_grant() {
    let endpoint = TestEndpoint::start_gated(raw(503, "{}"), 0).await;
    let cache = Arc::new(cache());
    let creds = Arc::new(endpoint.creds(ClientAuth::Basic));
    let callers: Vec<_> = (0..10)
        .map(|_| {
            let (cache, creds) = (Arc::clone(&cache), Arc::clone(&creds));
            tokio::spawn(async move { cache.token(&creds).await })
        })
        .collect();
    endpoint.state.arrived.notified().await;
    endpoint.release(1);
    for caller in callers {
        let error = caller.await.unwrap().unwrap_err();
        assert_eq!(
            error,
            TokenError::Endpoint {
                status: 503,
                error: None
            }
        );
    }
    assert_eq!(endpoint.grants(), 1);
    assert_eq!(cache.stats().grant_failures, 1);

    // A caller arriving after the failure gets it too, without a grant, while
    // the failure is remembered (1 s by default)…
    endpoint.set_reply(token_reply(3600));
    endpoint.release(Semaphore::MAX_PERMITS / 2);
    assert_eq!(
        cache.token(&creds).await.unwrap_err(),
        TokenError::Endpoint {
            status: 503,
            error: None
        }
    );
    assert_eq!(endpoint.grants(), 1);
    // …then tries again.
    tokio::time::sleep(FAILURE_BACKOFF).await;
    assert_eq!(number(&cache.token(&creds).await.unwrap()), 2);
}

#[tokio::test]
async fn a_broken_endpoint_costs_one_grant_per_backoff_period() {
    let endpoint = TestEndpoint::start(raw(500, "{}")).await;
    let cache = cache().with_failure_backoff(short_backoff(200));
    let creds = endpoint.creds(ClientAuth::Basic);
    for _ in 0..20 {
        assert!(cache.token(&creds).await.is_err());
    }
    assert_eq!(endpoint.grants(), 1, "one grant, then the remembered error");
    // after 200 ms, one more grant; it fails too, so the next wait is 400 ms
    tokio::time::sleep(Duration::from_millis(210)).await;
    for _ in 0..20 {
        assert!(cache.token(&creds).await.is_err());
    }
    assert_eq!(endpoint.grants(), 2);
    tokio::time::sleep(Duration::from_millis(210)).await;
    assert!(cache.token(&creds).await.is_err());
    assert_eq!(endpoint.grants(), 2, "the backoff doubled");
    // a rotated secret is tried at once
    let rotated = ClientCredentials {
        client_secret: SecretString::from("new secret"),
        ..creds.clone()
    };
    endpoint.set_reply(token_reply(3600));
    assert!(cache.token(&rotated).await.is_ok());
    assert_eq!(endpoint.grants(), 3);
    // a success forgets the failures
    assert!(cache.token(&rotated).await.is_ok());
    assert_eq!(cache.stats().grant_failures, 2);
}

#[tokio::test]
async fn waiters_take_the_grant_they_waited_for_even_if_already_due() {
    // `expires_in: 0`: the token is due for refresh as soon as it arrives,
    // yet the callers that waited for that grant do not start their own.
    let endpoint = TestEndpoint::start_gated(token_reply(0), 0).await;
    let cache = Arc::new(cache());
    let creds = Arc::new(endpoint.creds(ClientAuth::Basic));
    let callers: Vec<_> = (0..10)
        .map(|_| {
            let (cache, creds) = (Arc::clone(&cache), Arc::clone(&creds));
            tokio::spawn(async move { cache.token(&creds).await })
        })
        .collect();
    endpoint.state.arrived.notified().await;
    endpoint.release(Semaphore::MAX_PERMITS / 2);
    for caller in callers {
        assert_eq!(number(&caller.await.unwrap().unwrap()), 1);
    }
    assert_eq!(endpoint.grants(), 1);
    // A later caller does grant again.
    assert_eq!(number(&cache.token(&creds).await.unwrap()), 2);
}

#[tokio::test]
async fn a_caller_that_stops_waiting_does_not_cancel_the_grant() {
    let endpoint = TestEndpoint::start_gated(token_reply(3600), 0).await;
    let cache = cache();
    let creds = endpoint.creds(ClientAuth::Basic);
    {
        let first = cache.token(&creds);
        tokio::pin!(first);
        tokio::select! {
            _ = &mut first => panic!("the gate holds the answer"),
            () = endpoint.state.arrived.notified() => {}
        }
        // `first` is dropped here: the caller gave up (its try's timeout).
    }
    // the next caller waits for the same grant instead of sending another
    let next = {
        let (cache, creds) = (&cache, &creds);
        async move { cache.token(creds).await }
    };
    endpoint.release(Semaphore::MAX_PERMITS / 2);
    let token = next.await.unwrap();
    assert_eq!(endpoint.grants(), 1);
    assert_eq!(number(&token), 1);
}

#[tokio::test]
async fn a_young_token_refused_with_401_is_kept_and_the_401_is_the_answer() {
    let endpoint = TestEndpoint::start(token_reply(3600)).await;
    let cache = cache().with_min_refresh_age(Duration::from_millis(300));
    let creds = endpoint.creds(ClientAuth::Basic);
    let rejected = cache.token(&creds).await.unwrap();
    assert_eq!(
        cache
            .refresh_after_unauthorized(&creds, &rejected)
            .await
            .unwrap(),
        None
    );
    assert_eq!(endpoint.grants(), 1, "no grant for a token just obtained");
    assert_eq!(cache.token(&creds).await.unwrap(), rejected);
    // older than the minimum age: replaced
    tokio::time::sleep(Duration::from_millis(310)).await;
    let fresh = cache
        .refresh_after_unauthorized(&creds, &rejected)
        .await
        .unwrap()
        .expect("an old token is refreshed");
    assert_ne!(fresh, rejected);
    assert_eq!(endpoint.grants(), 2);
}

#[tokio::test]
async fn rotated_secret_gets_a_new_token_and_retain_forgets_keys() {
    let endpoint = TestEndpoint::start(token_reply(3600)).await;
    let cache = cache();
    let creds = endpoint.creds(ClientAuth::Basic);
    let first = cache.token(&creds).await.unwrap();
    let rotated = ClientCredentials {
        client_secret: SecretString::from("new secret"),
        ..creds.clone()
    };
    let second = cache.token(&rotated).await.unwrap();
    assert_ne!(first, second);
    assert_eq!(cache.token(&rotated).await.unwrap(), second);
    assert_eq!(endpoint.grants(), 2);

    let other = ClientCredentials {
        client_id: "other".into(),
        ..creds.clone()
    };
    cache.token(&other).await.unwrap();
    assert_eq!(cache.stats().keys, 2);
    // Reload keeps `rotated` (same key as creds) and drops `other`.
    cache.retain([&rotated]);
    assert_eq!(cache.stats().keys, 1);
    assert_eq!(cache.token(&rotated).await.unwrap(), second);
    assert_eq!(endpoint.grants(), 3);
    cache.retain([]);
    assert_eq!(cache.stats().keys, 0);
    cache.token(&rotated).await.unwrap();
    assert_eq!(endpoint.grants(), 4);
}

// ---------- refresh timing ----------

#[test]
fn skew_is_ten_percent_capped_at_a_minute() {
    let s = Duration::from_secs;
    assert_eq!(refresh_skew(s(3600)), s(60));
    assert_eq!(refresh_skew(s(600)), s(60));
    assert_eq!(refresh_skew(s(100)), s(10));
    assert_eq!(refresh_skew(s(1)), Duration::from_millis(100));
    assert_eq!(refresh_skew(Duration::ZERO), Duration::ZERO);
    assert_eq!(refresh_skew(Duration::MAX), s(60));
}

#[test]
fn refresh_at_is_lifetime_minus_skew() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    assert_eq!(refresh_at(t0, s(3600)), t0 + s(3540));
    assert_eq!(refresh_at(t0, s(100)), t0 + s(90));
    assert_eq!(refresh_at(t0, Duration::ZERO), t0);
    // Absurd lifetimes are clamped, never overflow.
    assert_eq!(refresh_at(t0, Duration::MAX), t0 + MAX_LIFETIME - s(60));
}

/// Drives the cache on paused time: just before `lifetime - skew` the
/// cached token is used, at that instant a new grant is made.
async fn check_refresh_boundary(lifetime: u64, skew: u64) {
    let endpoint = TestEndpoint::start(token_reply(lifetime)).await;
    let cache = cache();
    let creds = endpoint.creds(ClientAuth::Basic);
    let t0 = Instant::now();
    let first = cache.token(&creds).await.unwrap();
    assert_eq!(endpoint.grants(), 1);
    // `obtained_at` is taken when the grant starts, at or after t0.
    let boundary = t0 + Duration::from_secs(lifetime - skew);
    let just_before = boundary - Duration::from_millis(1);
    tokio::time::advance(just_before.saturating_duration_since(Instant::now())).await;
    assert_eq!(cache.token(&creds).await.unwrap(), first);
    assert_eq!(endpoint.grants(), 1, "no grant before the boundary");

    let obtained_at = t0; // no auto-advance happened while granting
    tokio::time::advance(
        refresh_at(obtained_at, Duration::from_secs(lifetime))
            .saturating_duration_since(Instant::now()),
    )
    .await;
    let second = cache.token(&creds).await.unwrap();
    assert_ne!(second, first);
    assert_eq!(endpoint.grants(), 2, "one grant at the boundary");
    assert_eq!(cache.token(&creds).await.unwrap(), second);
    assert_eq!(endpoint.grants(), 2);
}

#[tokio::test(start_paused = true)]
async fn refresh_boundary_for_an_hour_long_token() {
    check_refresh_boundary(3600, 60).await;
}

#[tokio::test(start_paused = true)]
async fn refresh_boundary_for_a_100_second_token() {
    check_refresh_boundary(100, 10).await;
}

#[tokio::test(start_paused = true)]
async fn missing_expires_in_means_an_hour() {
    let endpoint = TestEndpoint::start(Reply::Token { expires_in: None }).await;
    let cache = cache();
    let creds = endpoint.creds(ClientAuth::Basic);
    cache.token(&creds).await.unwrap();
    tokio::time::advance(Duration::from_secs(3539)).await;
    cache.token(&creds).await.unwrap();
    assert_eq!(endpoint.grants(), 1);
    tokio::time::advance(Duration::from_secs(1)).await;
    cache.token(&creds).await.unwrap();
    assert_eq!(endpoint.grants(), 2);
}

// ---------- 401 from the downstream ----------

#[tokio::test]
async fn refresh_after_unauthorized_replaces_the_rejected_token() {
    let endpoint = TestEndpoint::start(token_reply(3600)).await;
    let cache = cache();
    let creds = endpoint.creds(ClientAuth::Basic);
    let rejected = cache.token(&creds).await.unwrap();
    let fresh = cache
        .refresh_after_unauthorized(&creds, &rejected)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(fresh, rejected);
    assert_eq!(endpoint.grants(), 2);
    assert_eq!(cache.token(&creds).await.unwrap(), fresh);
}

#[tokio::test]
async fn stale_rejection_after_another_refresh_does_not_grant_again() {
    let endpoint = TestEndpoint::start(token_reply(3600)).await;
    let cache = cache();
    let creds = endpoint.creds(ClientAuth::Basic);
    let rejected = cache.token(&creds).await.unwrap();
    // Two requests used `rejected` and both got a 401; the first refreshes…
    let by_first = cache
        .refresh_after_unauthorized(&creds, &rejected)
        .await
        .unwrap();
    // …the second finds the new token already there.
    let by_second = cache
        .refresh_after_unauthorized(&creds, &rejected)
        .await
        .unwrap();
    assert_eq!(by_first, by_second);
    assert_eq!(endpoint.grants(), 2);
}

#[tokio::test]
async fn concurrent_rejections_make_one_refresh() {
    let endpoint = TestEndpoint::start_gated(token_reply(3600), 1).await;
    let cache = Arc::new(cache());
    let creds = Arc::new(endpoint.creds(ClientAuth::Basic));
    let rejected = cache.token(&creds).await.unwrap();
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let (cache, creds, rejected) =
                (Arc::clone(&cache), Arc::clone(&creds), rejected.clone());
            tokio::spawn(async move { cache.refresh_after_unauthorized(&creds, &rejected).await })
        })
        .collect();
    endpoint.state.arrived.notified().await; // the first grant's arrival
    endpoint.state.arrived.notified().await; // the refresh, now held
    endpoint.release(1);
    let tokens: Vec<AccessToken> = futures_join(callers).await;
    assert!(tokens.iter().all(|t| number(t) == 2));
    assert_eq!(endpoint.grants(), 2);
}

async fn futures_join(
    handles: Vec<tokio::task::JoinHandle<Result<Option<AccessToken>, TokenError>>>,
) -> Vec<AccessToken> {
    let mut tokens = Vec::new();
    for handle in handles {
        tokens.push(handle.await.unwrap().unwrap().unwrap());
    }
    tokens
}

// ---------- what is sent ----------

#[tokio::test]
async fn basic_client_auth_is_urlencoded_then_base64() {
    let endpoint = TestEndpoint::start(token_reply(3600)).await;
    let cache = cache();
    cache
        .token(&endpoint.creds(ClientAuth::Basic))
        .await
        .unwrap();
    let got = endpoint.last_received();
    let expected = BASE64.encode("gateway+client:s3cr%26t+p%40ss%3Aword");
    assert_eq!(got.authorization, Some(format!("Basic {expected}")));
    assert_eq!(
        got.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        got.form,
        [
            ("grant_type".to_owned(), "client_credentials".to_owned()),
            ("scope".to_owned(), "crm:write crm:read".to_owned()),
        ]
    );
}

#[tokio::test]
async fn body_client_auth_sends_form_fields() {
    let endpoint = TestEndpoint::start(token_reply(3600)).await;
    let cache = cache();
    let creds = ClientCredentials {
        scopes: vec![],
        ..endpoint.creds(ClientAuth::Body)
    };
    cache.token(&creds).await.unwrap();
    let got = endpoint.last_received();
    assert_eq!(got.authorization, None);
    assert_eq!(
        got.form,
        [
            ("grant_type".to_owned(), "client_credentials".to_owned()),
            ("client_id".to_owned(), "gateway client".to_owned()),
            ("client_secret".to_owned(), SECRET.to_owned()),
        ]
    );
}

#[tokio::test]
async fn params_are_extra_form_fields_and_part_of_the_cache_key() {
    let endpoint = TestEndpoint::start(token_reply(3600)).await;
    let cache = cache();
    let creds = ClientCredentials {
        scopes: vec![],
        params: vec![
            ("audience".into(), "https://crm.example.com/api".into()),
            ("resource".into(), "api://crm & more".into()),
        ],
        ..endpoint.creds(ClientAuth::Basic)
    };
    let first = cache.token(&creds).await.unwrap();
    assert_eq!(
        endpoint.last_received().form,
        [
            ("grant_type".to_owned(), "client_credentials".to_owned()),
            (
                "audience".to_owned(),
                "https://crm.example.com/api".to_owned()
            ),
            ("resource".to_owned(), "api://crm & more".to_owned()),
        ]
    );
    // the same params in another order: the same token
    let reordered = ClientCredentials {
        params: creds.params.iter().rev().cloned().collect(),
        ..creds.clone()
    };
    assert_eq!(cache.token(&reordered).await.unwrap(), first);
    assert_eq!(endpoint.grants(), 1);
    // another audience: another token
    let other = ClientCredentials {
        params: vec![("audience".into(), "https://other.example.com".into())],
        ..creds
    };
    assert_ne!(cache.token(&other).await.unwrap(), first);
    assert_eq!(endpoint.grants(), 2);
}

#[test]
fn bearer_header_is_sensitive() {
    let token = AccessToken::new("abc.DEF-123_~+/=").unwrap();
    let header = token.bearer_header();
    assert_eq!(header, "Bearer abc.DEF-123_~+/=");
    assert!(header.is_sensitive());
    assert_eq!(token.expose_secret(), "abc.DEF-123_~+/=");
    for bad in ["", "a b", "a\r\nb", "tök"] {
        assert!(AccessToken::new(bad).is_none(), "{bad:?}");
    }
}

// ---------- errors ----------

async fn error_for(reply: Reply) -> TokenError {
    let endpoint = TestEndpoint::start(reply).await;
    cache()
        .token(&endpoint.creds(ClientAuth::Basic))
        .await
        .unwrap_err()
}

#[tokio::test]
async fn endpoint_errors_are_clear() {
    let e = error_for(raw(500, "boom")).await;
    assert_eq!(e.to_string(), "token endpoint answered 500");
    assert!(e.is_transient());

    let e = error_for(raw(
        401,
        r#"{"error":"invalid_client","error_description":"secret s3cr&t is wrong"}"#,
    ))
    .await;
    assert_eq!(
        e,
        TokenError::Endpoint {
            status: 401,
            error: Some("invalid_client".into())
        }
    );
    assert_eq!(
        e.to_string(),
        "token endpoint answered 401 (invalid_client)"
    );
    assert!(!e.is_transient());

    // An `error` that is not a plain code is not repeated.
    let e = error_for(raw(400, r#"{"error":"<script>alert(1)</script>"}"#)).await;
    assert_eq!(e.to_string(), "token endpoint answered 400");

    // Redirects are not followed (the secret would go along).
    let e = error_for(Reply::Raw {
        status: 302,
        headers: vec![("location", "http://127.0.0.1:9/steal".to_owned())],
        body: String::new(),
    })
    .await;
    assert_eq!(e.to_string(), "token endpoint answered 302");
}

#[tokio::test]
async fn invalid_token_answers_are_clear() {
    let e = error_for(raw(200, "<html>login</html>")).await;
    assert_eq!(
        e.to_string(),
        "token endpoint sent an invalid response: not a JSON token object"
    );
    let e = error_for(raw(200, r#"{"token_type":"bearer"}"#)).await;
    assert_eq!(
        e.to_string(),
        "token endpoint sent an invalid response: no access_token"
    );
    let e = error_for(raw(200, r#"{"access_token":"x","token_type":"mac"}"#)).await;
    assert_eq!(
        e.to_string(),
        "token endpoint sent an invalid response: token_type \"mac\" is not bearer"
    );
    let big = format!(r#"{{"access_token":"{}"}}"#, "a".repeat(MAX_RESPONSE_BYTES));
    let e = error_for(raw(200, &big)).await;
    assert_eq!(
        e.to_string(),
        "token endpoint sent an invalid response: body over 64 KiB"
    );
    assert!(!e.is_transient());
}

#[tokio::test]
async fn unreachable_endpoint_is_a_transport_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let creds = ClientCredentials {
        token_url: Url::parse(&format!("http://{addr}/token")).unwrap(),
        client_id: "id".into(),
        client_secret: SecretString::from(SECRET),
        scopes: vec![],
        client_auth: ClientAuth::Basic,
        params: vec![],
    };
    let e = cache().token(&creds).await.unwrap_err();
    assert_eq!(e, TokenError::Transport("connect"));
    assert_eq!(e.to_string(), "token request failed (connect)");
    assert!(e.is_transient());
}

#[tokio::test(start_paused = true)]
async fn slow_endpoint_times_out() {
    let endpoint = TestEndpoint::start_gated(token_reply(3600), 0).await;
    let cache = cache().with_grant_timeout(Duration::from_millis(50));
    let e = cache
        .token(&endpoint.creds(ClientAuth::Basic))
        .await
        .unwrap_err();
    assert_eq!(e, TokenError::Transport("timeout"));
}

#[test]
fn token_response_parsing_is_lenient_where_servers_differ() {
    let parse = |body: &str| parse_token_response(body.as_bytes());
    let s = Duration::from_secs;
    let (token, lifetime) =
        parse(r#"{"access_token":"t","token_type":"BEARER","expires_in":120}"#).unwrap();
    assert_eq!((token.expose_secret(), lifetime), ("t", s(120)));
    let cases = [
        (r#"{"access_token":"t"}"#, DEFAULT_EXPIRES_IN),
        (
            r#"{"access_token":"t","token_type":"bearer","expires_in":"300"}"#,
            s(300),
        ),
        (
            r#"{"access_token":"t","expires_in":299.5}"#,
            Duration::from_millis(299_500),
        ),
        (
            r#"{"access_token":"t","expires_in":-5}"#,
            DEFAULT_EXPIRES_IN,
        ),
        (
            r#"{"access_token":"t","expires_in":null}"#,
            DEFAULT_EXPIRES_IN,
        ),
        (
            r#"{"access_token":"t","expires_in":"soon"}"#,
            DEFAULT_EXPIRES_IN,
        ),
        (r#"{"access_token":"t","expires_in":1e300}"#, MAX_LIFETIME),
        (
            r#"{"access_token":"t","expires_in":0,"refresh_token":"r"}"#,
            Duration::ZERO,
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(parse(body).unwrap().1, expected, "{body}");
    }
    for body in [
        r#"{"access_token":""}"#,
        r#"{"access_token":null}"#,
        r#"{"access_token":"a b"}"#,
        r#"{"access_token":42}"#,
        r#"[]"#,
        "",
    ] {
        assert!(
            matches!(parse(body), Err(TokenError::InvalidResponse(_))),
            "{body}"
        );
    }
}

// ---------- no secret, no token in any output ----------

#[tokio::test]
async fn debug_and_display_never_show_secrets_or_tokens() {
    let endpoint = TestEndpoint::start(token_reply(3600)).await;
    let cache = cache();
    let mut creds = endpoint.creds(ClientAuth::Basic);
    creds.token_url.set_username("user").unwrap();
    creds.token_url.set_password(Some(SECRET)).unwrap();
    creds.token_url.query_pairs_mut().append_pair("key", SECRET);
    let token = cache.token(&creds).await.unwrap();
    assert!(token.expose_secret().contains(TOKEN_MARK));

    let errors = [
        error_for(raw(
            401,
            &format!(r#"{{"error":"{SECRET}","error_description":"{TOKEN_MARK}"}}"#),
        ))
        .await,
        error_for(raw(
            200,
            &format!(r#"{{"access_token":"{TOKEN_MARK}","token_type":"{TOKEN_MARK} x"}}"#),
        ))
        .await,
        TokenError::Transport("connect"),
    ];
    let mut outputs = vec![
        format!("{creds:?}"),
        format!("{token:?}"),
        format!("{:?}", token.bearer_header()),
        format!("{cache:?}"),
        format!("{:?}", cache.stats()),
    ];
    for e in &errors {
        outputs.push(format!("{e:?}"));
        outputs.push(e.to_string());
    }
    let encoded_secret: String = url::form_urlencoded::byte_serialize(SECRET.as_bytes()).collect();
    for output in outputs {
        assert!(!output.contains(SECRET), "{output}");
        assert!(!output.contains(&encoded_secret), "{output}");
        assert!(!output.contains("s3cr"), "{output}");
        assert!(!output.contains(TOKEN_MARK), "{output}");
    }
    assert_eq!(format!("{token:?}"), "AccessToken(***)");
}
