//! Every inbound auth mode through the real server: good, bad, missing and
//! rotated secrets, known-answer vectors, and one bot's secret on another's path.

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde_json::json;

use crate::support::{TestDownstream, TestGateway};

const SCHEMA: &str = r#"{"type": "object"}"#;
// GitHub's documented X-Hub-Signature-256 example.
const GH_SECRET: &str = "It's a Secret to Everybody";
const GH_BODY: &str = "Hello, World!";
const GH_SIG: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
// Standard Webhooks secret from the spec's example.
const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn gateway(ds: &TestDownstream) -> TestGateway {
    let bots = format!(
        r#"bots:
  - id: key-bot
    auth: {{ api_key: {{ keys: ["k1", "k2"] }} }}
  - id: apikey-auth-bot
    auth: {{ api_key: {{ header: Authorization, keys: ["ak1"] }} }}
  - id: bearer-bot
    auth: {{ bearer: {{ tokens: ["t1", "t2"] }} }}
  - id: basic-bot
    auth: {{ basic: {{ username: cognigy, password: "p@ss:word" }} }}
  - id: hmac-bot
    auth: {{ hmac: {{ secrets: ["old-secret", "{GH_SECRET}"], header: X-Hub-Signature-256 }} }}
  - id: sw-bot
    auth: {{ standard_webhooks: {{ secrets: ["{SW_SECRET}"], tolerance: 5m }} }}
  - id: open-bot
    auth: {{ none: {{}} }}
routes:
  - name: all
    intent: "*"
    downstream: {{ url: "{}/x" }}
"#,
        ds.url()
    );
    let _ = SCHEMA;
    TestGateway::builder()
        .file("bots.yaml", &bots)
        .start()
        .await
}

async fn status(gw: &TestGateway, bot: &str, headers: &[(&str, &str)], body: &str) -> u16 {
    gw.post(bot, headers, body.to_owned())
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn api_key_good_bad_missing_rotated() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds).await;
    assert_eq!(
        status(&gw, "key-bot", &[("x-api-key", "k1")], "{}").await,
        200
    );
    assert_eq!(
        status(&gw, "key-bot", &[("x-api-key", "k2")], "{}").await,
        200,
        "rotated key"
    );
    assert_eq!(
        status(&gw, "key-bot", &[("x-api-key", "k3")], "{}").await,
        401
    );
    assert_eq!(
        status(&gw, "key-bot", &[("x-api-key", "k")], "{}").await,
        401,
        "prefix of a key"
    );
    assert_eq!(status(&gw, "key-bot", &[], "{}").await, 401);
    // Cognigy's "Authorization: ApiKey …" form
    assert_eq!(
        status(
            &gw,
            "apikey-auth-bot",
            &[("authorization", "ApiKey ak1")],
            "{}"
        )
        .await,
        200
    );
    assert_eq!(
        status(
            &gw,
            "apikey-auth-bot",
            &[("authorization", "ApiKey nope")],
            "{}"
        )
        .await,
        401
    );
    assert_eq!(ds.requests().len(), 3);
}

#[tokio::test]
async fn bearer_and_basic() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds).await;
    assert_eq!(
        status(&gw, "bearer-bot", &[("authorization", "Bearer t1")], "{}").await,
        200
    );
    assert_eq!(
        status(&gw, "bearer-bot", &[("authorization", "bearer t2")], "{}").await,
        200
    );
    assert_eq!(
        status(&gw, "bearer-bot", &[("authorization", "Bearer t3")], "{}").await,
        401
    );
    assert_eq!(
        status(&gw, "bearer-bot", &[("authorization", "Basic dDE=")], "{}").await,
        401,
        "wrong scheme"
    );
    assert_eq!(
        status(&gw, "bearer-bot", &[("authorization", "Bearer ")], "{}").await,
        401
    );
    let good = base64::engine::general_purpose::STANDARD.encode("cognigy:p@ss:word");
    let bad = base64::engine::general_purpose::STANDARD.encode("cognigy:p@ss");
    assert_eq!(
        status(
            &gw,
            "basic-bot",
            &[("authorization", &format!("Basic {good}"))],
            "{}"
        )
        .await,
        200
    );
    assert_eq!(
        status(
            &gw,
            "basic-bot",
            &[("authorization", &format!("Basic {bad}"))],
            "{}"
        )
        .await,
        401
    );
    assert_eq!(
        status(&gw, "basic-bot", &[("authorization", "Basic !!!")], "{}").await,
        401
    );
    assert_eq!(ds.requests().len(), 3);
}

#[tokio::test]
async fn hmac_known_answer_rotation_and_tampering() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds).await;
    // GitHub's example body is not JSON; the signature check passes (auth is step 3),
    // then JSON parsing refuses it (step 4): 400, not 401.
    assert_eq!(
        status(&gw, "hmac-bot", &[("x-hub-signature-256", GH_SIG)], GH_BODY).await,
        400
    );
    let body = r#"{"sessionId":"s"}"#;
    let sig = |secret: &str, body: &str| {
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        m.update(body.as_bytes());
        hex::encode(m.finalize().into_bytes())
    };
    assert_eq!(
        status(
            &gw,
            "hmac-bot",
            &[("x-hub-signature-256", &sig(GH_SECRET, body))],
            body
        )
        .await,
        200,
        "bare hex"
    );
    assert_eq!(
        status(
            &gw,
            "hmac-bot",
            &[(
                "x-hub-signature-256",
                &format!("sha256={}", sig("old-secret", body))
            )],
            body
        )
        .await,
        200,
        "rotated"
    );
    assert_eq!(
        status(
            &gw,
            "hmac-bot",
            &[("x-hub-signature-256", &sig("other", body))],
            body
        )
        .await,
        401
    );
    let tampered = r#"{"sessionId":"t"}"#;
    assert_eq!(
        status(
            &gw,
            "hmac-bot",
            &[("x-hub-signature-256", &sig(GH_SECRET, body))],
            tampered
        )
        .await,
        401
    );
    let truncated = sig(GH_SECRET, body)[..40].to_string();
    assert_eq!(
        status(
            &gw,
            "hmac-bot",
            &[("x-hub-signature-256", &truncated)],
            body
        )
        .await,
        401
    );
    assert_eq!(
        status(&gw, "hmac-bot", &[("x-hub-signature-256", "")], body).await,
        401
    );
    assert_eq!(
        status(&gw, "hmac-bot", &[("x-hub-signature-256", "sha256=")], body).await,
        401
    );
    assert_eq!(status(&gw, "hmac-bot", &[], body).await, 401);
    assert_eq!(ds.requests().len(), 2);
}

fn sw_sign(id: &str, ts: u64, body: &str) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SW_SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    m.update(format!("{id}.{ts}.{body}").as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
    )
}

#[tokio::test]
async fn standard_webhooks_known_answer_and_tolerance() {
    // The spec's test vector, computed by our signer.
    assert_eq!(
        sw_sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#
        ),
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let body = r#"{"sessionId":"s"}"#;
    let send = |ts: u64, sig: String| {
        let ts = ts.to_string();
        let gw = &gw;
        async move {
            status(
                gw,
                "sw-bot",
                &[
                    ("webhook-id", "msg_1"),
                    ("webhook-timestamp", &ts),
                    ("webhook-signature", &sig),
                ],
                body,
            )
            .await
        }
    };
    assert_eq!(send(now, sw_sign("msg_1", now, body)).await, 200);
    // several signatures: the valid one last
    assert_eq!(
        send(
            now,
            format!("v1,AAAA v2,xyz {}", sw_sign("msg_1", now, body))
        )
        .await,
        200
    );
    assert_eq!(
        send(now - 400, sw_sign("msg_1", now - 400, body)).await,
        401,
        "too old"
    );
    assert_eq!(
        send(now + 400, sw_sign("msg_1", now + 400, body)).await,
        401,
        "too far in the future"
    );
    assert_eq!(
        send(now, sw_sign("msg_2", now, body)).await,
        401,
        "signed for another id"
    );
    assert_eq!(send(now, "v1,".into()).await, 401, "empty signature");
    assert_eq!(send(now, String::new()).await, 401);
    assert_eq!(ds.requests().len(), 2);
}

#[tokio::test]
async fn one_bots_secret_is_refused_on_another_bots_path() {
    let ds = TestDownstream::start().await;
    let gw = gateway(&ds).await;
    assert_eq!(
        status(&gw, "bearer-bot", &[("x-api-key", "k1")], "{}").await,
        401
    );
    assert_eq!(
        status(&gw, "key-bot", &[("authorization", "Bearer t1")], "{}").await,
        401
    );
    assert_eq!(
        status(
            &gw,
            "apikey-auth-bot",
            &[("authorization", "Bearer t1")],
            "{}"
        )
        .await,
        401
    );
    // none: {} is an explicit opt-out
    assert_eq!(
        status(&gw, "open-bot", &[], &json!({}).to_string()).await,
        200
    );
    assert_eq!(ds.requests().len(), 1);
}
